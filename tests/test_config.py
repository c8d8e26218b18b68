"""Unit tests for the INI configuration loader (chatproxy.config.load_config).

Every configuration mistake must be a ConfigError whose text names the file,
the ``[section]`` and the option; valid files must produce the documented model
with its defaults; layered files and directories override option by option.
"""

from __future__ import annotations

import ipaddress
import shutil
import textwrap
from pathlib import Path
from typing import Any

import pytest

from chatproxy.config import (
    ConfigError,
    Settings,
    load_config,
    parse_duration,
    parse_networks,
    parse_size,
)
from chatproxy.filters import FilterOptionError
from chatproxy.proxy.validate import validate

LISTEN = """
[listen:main]
endpoint = tcp:8080:interface=127.0.0.1
"""
UPSTREAM = """
[upstream:app]
servers = http://127.0.0.1:9000
"""
ROUTE = """
[route:all]
upstream = app
"""
BASE = LISTEN + UPSTREAM + ROUTE


def write(directory: Path, text: str, name: str = "chatproxy.ini") -> Path:
    """Write a (dedented) config file and return its path."""
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def load_built(paths: list[Path] | Path, kinds: Any = None) -> tuple[Any, dict[str, Any]]:
    """load_config, then the data path's validate (filters built, listener TLS
    loaded) with no installed filter kinds unless ``kinds`` is given: the
    configuration and its built filters."""
    if isinstance(paths, Path):
        paths = [paths]
    config = load_config(paths)
    return config, validate(config, {} if kinds is None else kinds)


def load(paths: list[Path] | Path, kinds: Any = None) -> Any:
    """The configuration as :func:`load_built` loads and validates it."""
    return load_built(paths, kinds)[0]


def config_error(paths: list[Path] | Path, kinds: Any = None) -> ConfigError:
    """Load expecting a ConfigError and return it."""
    with pytest.raises(ConfigError) as info:
        load(paths, kinds)
    return info.value


def assert_located(error: ConfigError, file: Path, section: str | None, option: str | None, fragment: str) -> None:
    """The error names file, [section] and option both as attributes and in its text."""
    text = str(error)
    assert error.file == str(file), text
    assert str(file) in text
    assert error.section == section, text
    if section is not None:
        assert f"[{section}]" in text
    assert error.option == option, text
    if option is not None:
        assert option in text
    assert fragment in text
    assert "\n" not in text, "an operator gets one line"


# ---------------------------------------------------------------------------
# Error table: config text -> section, option, message fragment

ERROR_CASES = [
    # sections and options
    ("unknown-section", BASE + "[bogus]\nx = 1\n", "bogus", None, "unknown section"),
    ("section-without-name", BASE + "[route:]\nupstream = app\n", "route:", None, "needs a NAME"),
    ("section-bad-name", BASE + "[upstream:a b]\nservers = http://h\n", "upstream:a b", None, "needs a NAME"),
    ("unknown-option-chatproxy", BASE + "[chatproxy]\ncolour = blue\n", "chatproxy", "colour",
     "max_header_bytes, max_headers"),
    ("unknown-option-listen", BASE.replace("[listen:main]", "[listen:main]\nport = 80"), "listen:main", "port",
     "allow, certificate, ciphers, create_self_signed, endpoint"),
    ("unknown-option-route", BASE + "prefix = /x\n", "route:all", "prefix", "path, path_regex"),
    ("duplicate-option", BASE + "upstream = app\n", "route:all", "upstream", "appears twice"),
    ("duplicate-section", BASE + ROUTE, "route:all", None, "appears twice"),
    # bool / int / size / duration
    ("bad-bool-tls", LISTEN + "tls = maybe\n", "listen:main", "tls", "expected yes or no, got 'maybe'"),
    ("bad-bool-websocket", BASE + "websocket = sometimes\n", "route:all", "websocket", "expected yes or no"),
    ("bad-bool-verify", BASE.replace("servers =", "verify = perhaps\nservers ="), "upstream:app", "verify",
     "expected yes or no"),
    ("bad-int", BASE + "[chatproxy]\nmax_headers = many\n", "chatproxy", "max_headers", "whole number"),
    ("int-zero", BASE + "[chatproxy]\nmax_headers = 0\n", "chatproxy", "max_headers", "at least 1"),
    ("int-negative", BASE.replace("servers =", "max_idle_connections = -1\nservers ="), "upstream:app",
     "max_idle_connections", "must not be negative"),
    ("bad-size", BASE + "[chatproxy]\nmax_body_bytes = 10 parsecs\n", "chatproxy", "max_body_bytes",
     "expected a size"),
    ("bad-size-fraction", BASE + "[chatproxy]\nmax_header_bytes = 1.5k\n", "chatproxy", "max_header_bytes",
     "expected a size"),
    ("bad-size-route", BASE + "max_body_bytes = lots\n", "route:all", "max_body_bytes", "expected a size"),
    ("bad-duration", BASE + "[chatproxy]\nheader_timeout = soon\n", "chatproxy", "header_timeout",
     "expected a duration"),
    ("duration-zero", BASE + "[chatproxy]\nidle_timeout = 0\n", "chatproxy", "idle_timeout", "greater than zero"),
    ("duration-negative", BASE + "[chatproxy]\nidle_timeout = -5\n", "chatproxy", "idle_timeout",
     "expected a duration"),
    ("bad-duration-unit", BASE.replace("servers =", "connect_timeout = 5 days\nservers ="), "upstream:app",
     "connect_timeout", "expected a duration"),
    ("bad-choice-format", BASE + "[chatproxy]\naccess_log_format = xml\n", "chatproxy", "access_log_format",
     "expected one of combined, json"),
    ("empty-access-log", BASE + "[chatproxy]\naccess_log =\n", "chatproxy", "access_log", "must not be empty"),
    ("bad-host-header", BASE.replace("servers =", "host_header = mine\nservers ="), "upstream:app", "host_header",
     "expected one of client, upstream"),
    ("bad-min-tls", LISTEN + "min_tls_version = 1.1\n", "listen:main", "min_tls_version", "1.2, 1.3"),
    # networks
    ("bad-cidr-allow", LISTEN + "allow = 10.0.0.0/33\n", "listen:main", "allow", "'10.0.0.0/33' is not an IP"),
    ("bad-cidr-second-item", LISTEN + "allow = 10.0.0.1, 300.1.1.1\n", "listen:main", "allow", "'300.1.1.1'"),
    ("bad-trusted-proxies", LISTEN + "trusted_proxies = proxy.example\n", "listen:main", "trusted_proxies",
     "not an IP address or network"),
    ("empty-allow", LISTEN + "allow =\n", "listen:main", "allow", "at least one network"),
    # endpoints
    ("endpoint-unknown-type", "[listen:main]\nendpoint = nosuch:80\n", "listen:main", "endpoint",
     "not a valid Twisted server endpoint string"),
    ("endpoint-bad-port", "[listen:main]\nendpoint = tcp:http\n", "listen:main", "endpoint",
     "not a valid Twisted server endpoint string"),
    ("endpoint-bad-argument", "[listen:main]\nendpoint = tcp:80:colour=blue\n", "listen:main", "endpoint",
     "not a valid Twisted server endpoint string"),
    ("endpoint-port-out-of-range", "[listen:main]\nendpoint = tcp:70000\n", "listen:main", "endpoint",
     "out of range"),
    ("endpoint-empty", "[listen:main]\nendpoint =\n", "listen:main", "endpoint", "must not be empty"),
    ("endpoint-missing", "[listen:main]\nallow = 127.0.0.1\n", "listen:main", "endpoint", "required option"),
    ("demo-bad-endpoint", BASE + "[demo]\nendpoint = tcp:x\n", "demo", "endpoint", "not a valid Twisted"),
    ("demo-unknown-option", BASE + "[demo]\nendpoint = tcp:8081\nport = 1\n", "demo", "port", "unknown option"),
    # TLS options without TLS
    ("tls-without-certificate", LISTEN + "tls = yes\n", "listen:main", "certificate", "required when tls = yes"),
    ("certificate-without-tls", LISTEN + "certificate = x.crt\n", "listen:main", "certificate",
     "only meaningful with tls = yes"),
    # routes
    ("route-unknown-upstream", BASE.replace("upstream = app", "upstream = nosuch"), "route:all", "upstream",
     "no [upstream:nosuch] section (upstreams: app)"),
    ("route-missing-upstream", BASE.replace("upstream = app", "path = /x"), "route:all", "upstream",
     "required option is missing"),
    ("route-unknown-listener", BASE + "listeners = main, side\n", "route:all", "listeners",
     "no [listen:side] section (listeners: main)"),
    ("route-empty-listeners", BASE + "listeners =\n", "route:all", "listeners", "at least one listener"),
    ("route-unknown-filter", BASE + "filters = auth\n", "route:all", "filters",
     "no [filter:auth] section (filters: none defined)"),
    ("path-and-regex", BASE + "path = /a\npath_regex = ^/b\n", "route:all", "path_regex", "not both"),
    ("path-dot-dot", BASE + "path = /a/../b\n", "route:all", "path", "normal form: '/b'"),
    ("path-double-slash", BASE + "path = /a//b\n", "route:all", "path", "normal form: '/a/b'"),
    ("path-dot", BASE + "path = /a/./b\n", "route:all", "path", "normal form: '/a/b'"),
    ("path-above-root", BASE + "path = /../etc\n", "route:all", "path", "above the root"),
    ("path-relative", BASE + "path = api\n", "route:all", "path", "must start with /"),
    ("path-encoded-slash", BASE + "path = /a%2Fb\n", "route:all", "path", "encoded slash"),
    ("bad-regex", BASE + "path_regex = ^/(chat\n", "route:all", "path_regex", "not a valid regular expression"),
    ("bad-host", BASE + "hosts = chat.example.com, bad_host!\n", "route:all", "hosts", "'bad_host!'"),
    ("empty-hosts", BASE + "hosts =\n", "route:all", "hosts", "at least one host"),
    ("bad-method", BASE + "methods = GET, P OST\n", "route:all", "methods", "'P OST' is not an HTTP method"),
    ("bad-query", BASE + "query = =x\n", "route:all", "query", "needs a name"),
    ("bad-rewrite", BASE + "rewrite_path = api\n", "route:all", "rewrite_path", "must start with /"),
    ("rewrite-not-normal", BASE + "rewrite_path = /a//b\n", "route:all", "rewrite_path", "normal form"),
    # upstream servers
    ("server-ftp", BASE.replace("http://127.0.0.1:9000", "ftp://files.example"), "upstream:app", "servers",
     "scheme must be http:// or https://"),
    ("server-with-path", BASE.replace("http://127.0.0.1:9000", "http://127.0.0.1:9000/api"), "upstream:app",
     "servers", "no path, query or user"),
    ("server-with-query", BASE.replace("http://127.0.0.1:9000", "http://h?x=1"), "upstream:app", "servers",
     "no path, query or user"),
    ("server-no-host", BASE.replace("http://127.0.0.1:9000", "http://"), "upstream:app", "servers", "no host"),
    ("server-bad-port", BASE.replace("http://127.0.0.1:9000", "http://h:99999"), "upstream:app", "servers",
     "is not a URL"),
    ("server-second-bad", BASE.replace("http://127.0.0.1:9000", "http://a:1, localhost:2"), "upstream:app",
     "servers", "'localhost:2'"),
    ("servers-empty", BASE.replace("http://127.0.0.1:9000", ""), "upstream:app", "servers", "at least one server"),
    ("servers-missing", LISTEN + "[upstream:app]\nverify = no\n", "upstream:app", "servers", "required option"),
    ("upstream-missing-ca", BASE.replace("servers =", "ca = no-such-ca.pem\nservers ="), "upstream:app", "ca",
     "no such file"),
    # listener response headers, close timeout
    ("response-headers-no-colon", LISTEN + "response_headers = Strict-Transport-Security\n" + UPSTREAM + ROUTE,
     "listen:main", "response_headers", "expected 'Name: value'"),
    ("response-headers-bad-name", LISTEN + "response_headers = Bad Name: x\n" + UPSTREAM + ROUTE,
     "listen:main", "response_headers", "'Bad Name' is not a header name"),
    ("response-headers-framing", LISTEN + "response_headers =\n    X-A: 1\n    Content-Length: 5\n" + UPSTREAM + ROUTE,
     "listen:main", "response_headers", "Content-Length is a hop-by-hop or framing header"),
    ("response-headers-hop", LISTEN + "response_headers = Connection: close\n" + UPSTREAM + ROUTE,
     "listen:main", "response_headers", "Connection is a hop-by-hop"),
    ("close-timeout-zero", "[chatproxy]\nclose_timeout = 0\n" + BASE, "chatproxy", "close_timeout",
     "greater than zero"),
    # filters
    ("filter-unknown-kind", BASE + "[filter:f]\nuse = nosuch\n", "filter:f", "use",
     "unknown filter kind 'nosuch' (installed kinds: none)"),
    ("filter-missing-use", BASE + "[filter:f]\nrate = 5\n", "filter:f", "use", "required option is missing"),
]


@pytest.mark.parametrize(("text", "section", "option", "fragment"),
                         [pytest.param(*case[1:], id=case[0]) for case in ERROR_CASES])
def test_config_error_names_file_section_and_option(tmp_path, text, section, option, fragment):
    """Each configuration mistake raises ConfigError naming the file, the [section] and
    the option (where there is one), with a message that says what is wrong."""
    path = write(tmp_path, text)
    assert_located(config_error(path), path, section, option, fragment)


TLS_LISTEN = "[listen:main]\nendpoint = tcp:8443\ntls = yes\ncertificate = {cert}\nkey = {key}\n"
TLS_UPSTREAM = TLS_LISTEN + "[upstream:app]\nservers = https://127.0.0.1:9443\n"

# Templates: {cert}, {key}, {other_key}, {client_cert}, {client_key}, {chat_cert}, {ca}, {dir} are PKI paths.
TLS_ERROR_CASES = [
    ("missing-certificate", TLS_LISTEN.replace("{cert}", "{dir}/missing.crt"), "listen:main", "certificate",
     "no such file: {dir}/missing.crt"),
    ("missing-key", TLS_LISTEN.replace("{key}", "{dir}/missing.key"), "listen:main", "key",
     "no such file: {dir}/missing.key"),
    ("tls-without-key", TLS_LISTEN.replace("key = {key}\n", ""), "listen:main", "key", "required when tls = yes"),
    ("certificate-key-mismatch", TLS_LISTEN.replace("{key}", "{other_key}"), "listen:main", "key", "{other_key}"),
    ("mismatch-with-create-self-signed", TLS_LISTEN.replace("{key}", "{other_key}") + "create_self_signed = yes\n",
     "listen:main", "key", "{other_key}"),
    ("certificate-is-not-a-certificate", TLS_LISTEN.replace("{cert}", "{key}"), "listen:main", "certificate",
     "cannot load a PEM certificate"),
    ("key-is-not-a-key", TLS_LISTEN.replace("{key}", "{cert}"), "listen:main", "key",
     "cannot load a PEM private key"),
    ("bad-ciphers", TLS_LISTEN + "ciphers = NO-SUCH-CIPHER\n", "listen:main", "ciphers",
     "accepts none of the ciphers"),
    ("sni-key-mismatch", TLS_LISTEN + "sni = chat.example.test: {chat_cert} {other_key}\n", "listen:main", "sni",
     "{other_key}"),
    ("sni-bad-line", TLS_LISTEN + "sni = chat.example.test {chat_cert}\n", "listen:main", "sni",
     "expected 'HOST: CERTIFICATE-FILE KEY-FILE [acme:NAME]'"),
    ("sni-missing-file", TLS_LISTEN + "sni = chat.example.test: {dir}/nope.crt {key}\n", "listen:main", "sni",
     "no such file: {dir}/nope.crt"),
    ("sni-bad-host", TLS_LISTEN + "sni = bad_host!: {chat_cert} {key}\n", "listen:main", "sni",
     "not a host name"),
    ("upstream-client-key-mismatch", TLS_UPSTREAM + "client_certificate = {client_cert}\nclient_key = {other_key}\n",
     "upstream:app", "client_key", "does not match the certificate in {client_cert}"),
    ("upstream-client-certificate-without-key", TLS_UPSTREAM + "client_certificate = {client_cert}\n",
     "upstream:app", "client_certificate", "cannot load a PEM private key"),
    ("upstream-client-certificate-not-pem", TLS_UPSTREAM + "client_certificate = {other_key}\n"
     "client_key = {client_key}\n", "upstream:app", "client_certificate", "cannot load a PEM certificate"),
    ("upstream-client-key-not-pem", TLS_UPSTREAM + "client_certificate = {client_cert}\nclient_key = {ca}\n",
     "upstream:app", "client_key", "cannot load a PEM private key"),
    ("upstream-client-key-alone", TLS_UPSTREAM + "client_key = {client_key}\n", "upstream:app", "client_key",
     "needs client_certificate"),
    ("upstream-missing-client-certificate", TLS_UPSTREAM + "client_certificate = {dir}/nope.crt\n",
     "upstream:app", "client_certificate", "no such file"),
    ("upstream-ca-not-certificates", TLS_UPSTREAM + "ca = {other_key}\n", "upstream:app", "ca",
     "cannot load PEM CA certificates"),
]


def pki_paths(pki: Any) -> dict[str, str]:
    """The PKI's file paths by template name."""
    return {name: str(getattr(pki, name)) for name in
            ("cert", "key", "other_key", "client_cert", "client_key", "chat_cert", "ca", "dir")}


@pytest.mark.parametrize(("text", "section", "option", "fragment"),
                         [pytest.param(*case[1:], id=case[0]) for case in TLS_ERROR_CASES])
def test_tls_material_errors_name_file_section_and_option(tmp_path, pki, text, section, option, fragment):
    """Missing, unloadable or mismatching certificates and keys (listener, SNI and
    upstream client TLS) are ConfigErrors naming file, section and option."""
    paths = pki_paths(pki)
    path = write(tmp_path, text.format(**paths))
    assert_located(config_error(path), path, section, option, fragment.format(**paths))


def test_valid_tls_listener_loads(tmp_path, pki):
    """A listener with a matching certificate and key (and an SNI entry) loads."""
    path = write(tmp_path, f"""
        [listen:main]
        endpoint = tcp:8443:interface=127.0.0.1
        tls = yes
        certificate = {pki.cert}
        key = {pki.key}
        sni = chat.example.test: {pki.chat_cert} {pki.chat_key}
        min_tls_version = 1.3
    """)
    listener = load(path).listeners["main"]
    assert listener.tls is True
    assert listener.certificate == pki.cert and listener.key == pki.key
    assert [(s.host, s.certificate, s.key) for s in listener.sni] == [("chat.example.test", pki.chat_cert,
                                                                      pki.chat_key)]
    assert listener.min_tls_version == "1.3"


def test_create_self_signed_accepts_missing_files(tmp_path):
    """With create_self_signed = yes the certificate and key need not exist yet."""
    path = write(tmp_path, LISTEN + "tls = yes\ncertificate = tls/new.crt\nkey = tls/new.key\n"
                                    "create_self_signed = yes\n")
    listener = load(path).listeners["main"]
    assert listener.create_self_signed is True
    assert listener.certificate == tmp_path / "tls" / "new.crt"
    assert not listener.certificate.exists()


def test_create_self_signed_refuses_half_a_pair(tmp_path, pki):
    """With create_self_signed = yes, an existing certificate without its key is an error naming
    the missing option, so an operator's certificate is never overwritten."""
    (tmp_path / "tls").mkdir()
    (tmp_path / "tls" / "have.crt").write_bytes(pki.cert.read_bytes())
    path = write(tmp_path, LISTEN + "tls = yes\ncertificate = tls/have.crt\nkey = tls/missing.key\n"
                                    "create_self_signed = yes\n")
    error = config_error(path)
    assert_located(error, path, "listen:main", "key", "nothing is overwritten")
    assert (tmp_path / "tls" / "have.crt").read_bytes() == pki.cert.read_bytes()


def test_upstream_client_tls_files_load(tmp_path, pki):
    """A matching upstream client certificate/key and a CA file are accepted."""
    path = write(tmp_path, LISTEN + f"""
[upstream:app]
servers = https://127.0.0.1:9443
ca = {pki.ca}
client_certificate = {pki.client_cert}
client_key = {pki.client_key}
""")
    upstream = load(path).upstreams["app"]
    assert upstream.ca == pki.ca
    assert upstream.client_certificate == pki.client_cert and upstream.client_key == pki.client_key
    assert upstream.servers[0].tls


# ---------------------------------------------------------------------------
# Syntax errors, missing files, directories


def test_unparseable_line_names_file_and_line(tmp_path):
    """A line that is not INI syntax is an error naming the file and the line number."""
    path = write(tmp_path, BASE + "this is not ini\n")
    error = config_error(path)
    assert error.file == str(path)
    assert str(path) in str(error) and "line" in str(error)


def test_option_before_any_section(tmp_path):
    """An option above the first [section] header is an error naming the file."""
    path = write(tmp_path, "endpoint = tcp:80\n" + BASE)
    error = config_error(path)
    assert str(path) in str(error) and "before any [section]" in str(error)


def test_no_listener_is_an_error(tmp_path):
    """A configuration without any [listen:NAME] section is refused (it would serve nothing)."""
    path = write(tmp_path, UPSTREAM + ROUTE)
    error = config_error(path)
    assert error.file == str(path)
    assert str(path) in str(error) and "no [listen:NAME] section" in str(error)


def test_empty_file_is_an_error(tmp_path):
    """An empty configuration file has no listener and is refused."""
    path = write(tmp_path, "")
    assert "no [listen:NAME] section" in str(config_error(path))


def test_missing_file(tmp_path):
    """A --config path that does not exist is an error naming it."""
    missing = tmp_path / "nope.ini"
    error = config_error(missing)
    assert error.file == str(missing)
    assert str(missing) in str(error) and "no such file" in str(error)


def test_missing_second_file(tmp_path):
    """A missing later file is reported even if the earlier one is fine."""
    good = write(tmp_path, BASE)
    missing = tmp_path / "override.ini"
    error = config_error([good, missing])
    assert error.file == str(missing)


def test_empty_directory(tmp_path):
    """A directory holding no *.ini file is an error naming the directory."""
    directory = tmp_path / "conf.d"
    directory.mkdir()
    (directory / "README.txt").write_text("not a config")
    error = config_error(directory)
    assert error.file == str(directory)
    assert str(directory) in str(error) and "no *.ini" in str(error)


def test_no_paths_at_all():
    """load_config with no paths says a --config FILE is needed."""
    with pytest.raises(ConfigError, match="--config"):
        load_config([])


def test_undecodable_file(tmp_path):
    """A file that is not UTF-8 text is an error naming it, not a UnicodeDecodeError."""
    path = tmp_path / "binary.ini"
    path.write_bytes(b"[listen:main]\nendpoint = tcp:\xff\xfe\n")
    error = config_error(path)
    assert error.file == str(path) and "cannot read" in str(error)


# ---------------------------------------------------------------------------
# Filters


class FakeKind:
    """A filter kind as the loader sees it: a ``name`` and a ``build(options)``."""

    def __init__(self, name: str, error: Exception | None = None) -> None:
        self.name = name
        self.error = error
        self.built_with: list[dict[str, str]] = []

    def build(self, options: Any) -> Any:
        """Record the options; raise the configured error if any."""
        self.built_with.append(dict(options))
        if self.error is not None:
            raise self.error
        return ("built", self.name, dict(options))


def test_unknown_filter_kind_lists_installed_kinds(tmp_path):
    """``use = nosuch`` names the option and lists the installed kinds, sorted."""
    path = write(tmp_path, BASE + "[filter:f]\nuse = nosuch\n")
    kinds = {"ratelimit": FakeKind("ratelimit"), "allowlist": FakeKind("allowlist")}
    assert_located(config_error(path, kinds), path, "filter:f", "use",
                   "unknown filter kind 'nosuch' (installed kinds: allowlist, ratelimit)")


def test_filter_build_option_error_names_option(tmp_path):
    """A kind's build() raising FilterOptionError(option, ...) becomes a ConfigError
    naming the file, the filter section and that option."""
    path = write(tmp_path, BASE + "filters = limit\n[filter:limit]\nuse = ratelimit\nrate = fast\n")
    kinds = {"ratelimit": FakeKind("ratelimit", FilterOptionError("rate", "expected requests per second"))}
    assert_located(config_error(path, kinds), path, "filter:limit", "rate", "expected requests per second")


def test_filter_build_error_in_later_file_names_that_file(tmp_path):
    """A filter option set by a later file is reported against that file."""
    first = write(tmp_path, BASE + "[filter:limit]\nuse = ratelimit\nrate = 5\n", "a.ini")
    second = write(tmp_path, "[filter:limit]\nrate = fast\n", "b.ini")
    kinds = {"ratelimit": FakeKind("ratelimit", FilterOptionError("rate", "bad rate"))}
    assert_located(config_error([first, second], kinds), second, "filter:limit", "rate", "bad rate")


def test_filter_build_section_error(tmp_path):
    """FilterOptionError(None, ...) (a section-wide problem) names file and section."""
    path = write(tmp_path, BASE + "[filter:limit]\nuse = ratelimit\n")
    kinds = {"ratelimit": FakeKind("ratelimit", FilterOptionError(None, "needs rate or burst"))}
    assert_located(config_error(path, kinds), path, "filter:limit", None, "needs rate or burst")


def test_filter_build_missing_option_error(tmp_path):
    """FilterOptionError for an option the section does not set still names it."""
    path = write(tmp_path, BASE + "[filter:limit]\nuse = ratelimit\n")
    kinds = {"ratelimit": FakeKind("ratelimit", FilterOptionError("rate", "required option is missing"))}
    assert_located(config_error(path, kinds), path, "filter:limit", "rate", "required option is missing")


def test_filter_build_crash_is_a_config_error(tmp_path):
    """A third-party kind whose build() crashes gives a ConfigError, not a traceback."""
    path = write(tmp_path, BASE + "[filter:limit]\nuse = ratelimit\n")
    kinds = {"ratelimit": FakeKind("ratelimit", ZeroDivisionError("oops"))}
    error = config_error(path, kinds)
    assert error.file == str(path) and error.section == "filter:limit"
    assert "failed to build" in str(error) and "oops" in str(error)


def test_filter_built_and_attached(tmp_path):
    """A valid filter section is built with its options (minus ``use``) and a route can name it."""
    path = write(tmp_path, BASE + "filters = limit\n[filter:limit]\nuse = ratelimit\nrate = 5\nburst = 10\n")
    kind = FakeKind("ratelimit")
    config, built = load_built(path, {"ratelimit": kind})
    spec = config.filters["limit"]
    assert spec.kind == "ratelimit"
    assert dict(spec.options) == {"rate": "5", "burst": "10"}
    assert built["limit"] == ("built", "ratelimit", {"rate": "5", "burst": "10"})
    assert kind.built_with == [{"rate": "5", "burst": "10"}]
    assert config.routes[0].filters == ("limit",)


def test_generic_filter_options_are_read_and_not_passed_to_the_kind(tmp_path):
    """``mode`` and ``refused_message`` are taken by every filter section: read
    case-insensitively into the spec (defaults enforce and close), never passed
    to the kind's build()."""
    path = write(tmp_path, BASE + "[filter:plain]\nuse = ratelimit\nrate = 5\n"
                                  "[filter:lenient]\nuse = ratelimit\nrate = 5\nmode = report\n"
                                  "refused_message = DROP\n")
    kind = FakeKind("ratelimit")
    config = load(path, {"ratelimit": kind})
    plain, lenient = config.filters["plain"], config.filters["lenient"]
    assert (plain.mode, plain.refused_message) == ("enforce", "close")
    assert (lenient.mode, lenient.refused_message) == ("report", "drop")
    assert kind.built_with == [{"rate": "5"}, {"rate": "5"}]


@pytest.mark.parametrize("option, value, expected", [
    ("refused_message", "ignore", "expected close or drop, got 'ignore'"),
    ("refused_message", "", "expected close or drop, got ''"),
    ("mode", "dry-run", "expected enforce or report, got 'dry-run'"),
])
def test_bad_generic_filter_option_names_file_section_and_option(tmp_path, option, value, expected):
    """A generic filter option with a value it does not take is an error naming
    the file that set it, the filter section and the option."""
    first = write(tmp_path, BASE + "[filter:words]\nuse = ratelimit\nrate = 5\n", "a.ini")
    second = write(tmp_path, f"[filter:words]\n{option} = {value}\n", "b.ini")
    kinds = {"ratelimit": FakeKind("ratelimit")}
    assert_located(config_error([first, second], kinds), second, "filter:words", option, expected)


# ---------------------------------------------------------------------------
# Layering: several files, directories


def test_later_file_overrides_option(tmp_path):
    """With two files the second one's value of an option wins; others are kept."""
    first = write(tmp_path, BASE + "[chatproxy]\nheader_timeout = 5\nidle_timeout = 7\n", "a.ini")
    second = write(tmp_path, "[listen:main]\nendpoint = tcp:9090:interface=127.0.0.1\n"
                             "[chatproxy]\nidle_timeout = 9\n", "b.ini")
    config = load([first, second])
    assert config.listeners["main"].endpoint == "tcp:9090:interface=127.0.0.1"
    assert config.settings.header_timeout == 5.0
    assert config.settings.idle_timeout == 9.0
    assert config.sources == (str(first), str(second))


def test_later_file_bad_value_names_later_file(tmp_path):
    """A bad value set by the second file is reported against the second file."""
    first = write(tmp_path, BASE, "a.ini")
    second = write(tmp_path, "[listen:main]\nallow = 10.0.0.0/40\n", "b.ini")
    assert_located(config_error([first, second]), second, "listen:main", "allow", "10.0.0.0/40")


def test_earlier_file_bad_value_names_earlier_file(tmp_path):
    """A bad value in the first file that the second does not override names the first file."""
    first = write(tmp_path, BASE + "[chatproxy]\nmax_headers = lots\n", "a.ini")
    second = write(tmp_path, "[listen:main]\nendpoint = tcp:9090\n", "b.ini")
    assert_located(config_error([first, second]), first, "chatproxy", "max_headers", "whole number")


def test_later_file_unknown_option_names_later_file(tmp_path):
    """An unknown option added by the second file names the second file."""
    first = write(tmp_path, BASE, "a.ini")
    second = write(tmp_path, "[upstream:app]\nretries = 3\n", "b.ini")
    assert_located(config_error([first, second]), second, "upstream:app", "retries", "unknown option")


def test_later_file_overrides_bad_value(tmp_path):
    """A value overridden by a later file is never used, so a later good value replaces an earlier bad one."""
    first = write(tmp_path, BASE + "[chatproxy]\nheader_timeout = soon\n", "a.ini")
    second = write(tmp_path, "[chatproxy]\nheader_timeout = 3\n", "b.ini")
    assert load([first, second]).settings.header_timeout == 3.0


def test_key_mismatch_from_later_file_names_later_file(tmp_path, pki):
    """A key set by the second file that does not match the certificate of the first
    is reported against the second file (the one that set ``key``)."""
    first = write(tmp_path, f"[listen:main]\nendpoint = tcp:8443\ntls = yes\ncertificate = {pki.cert}\n"
                            f"key = {pki.key}\n", "a.ini")
    second = write(tmp_path, f"[listen:main]\nkey = {pki.other_key}\n", "b.ini")
    assert_located(config_error([first, second]), second, "listen:main", "key", str(pki.other_key))


def test_route_in_one_file_upstream_in_another(tmp_path):
    """Sections from different files may refer to each other."""
    first = write(tmp_path, LISTEN + ROUTE, "a.ini")
    second = write(tmp_path, UPSTREAM, "b.ini")
    config = load([first, second])
    assert config.routes[0].upstream == "app" and "app" in config.upstreams


def test_unknown_upstream_reference_from_later_file(tmp_path):
    """A route's upstream changed by a later file to an unknown name is reported against that file."""
    first = write(tmp_path, BASE, "a.ini")
    second = write(tmp_path, "[route:all]\nupstream = gone\n", "b.ini")
    assert_located(config_error([first, second]), second, "route:all", "upstream", "no [upstream:gone]")


def test_directory_read_in_sorted_order(tmp_path):
    """A directory's *.ini files are read in sorted order (later names win); other files are ignored."""
    directory = tmp_path / "conf.d"
    write(directory, "[listen:main]\nendpoint = tcp:9002\n", "20-port.ini")
    write(directory, BASE, "10-base.ini")
    write(directory, "[listen:main]\nendpoint = tcp:9003\n", "30-port.ini.disabled")
    write(directory, "this is not even ini", "notes.txt")
    config = load(directory)
    assert config.listeners["main"].endpoint == "tcp:9002"
    assert config.sources == (str(directory / "10-base.ini"), str(directory / "20-port.ini"))


def test_directory_then_file(tmp_path):
    """A file given after a directory overrides what the directory's files set."""
    directory = tmp_path / "conf.d"
    write(directory, BASE, "10-base.ini")
    override = write(tmp_path, "[listen:main]\nendpoint = tcp:9004\n", "local.ini")
    config = load([directory, override])
    assert config.listeners["main"].endpoint == "tcp:9004"
    assert config.sources[-1] == str(override)


def test_directory_error_names_the_file_inside(tmp_path):
    """An error in one of a directory's files names that file, not the directory."""
    directory = tmp_path / "conf.d"
    write(directory, BASE, "10-base.ini")
    bad = write(directory, "[route:all]\npath = /a/../b\n", "20-bad.ini")
    assert_located(config_error(directory), bad, "route:all", "path", "normal form")


def test_duplicate_option_across_files_is_an_override(tmp_path):
    """The same option in two files is an override, not a duplicate-option error."""
    first = write(tmp_path, BASE, "a.ini")
    second = write(tmp_path, "[route:all]\nupstream = app\n", "b.ini")
    assert load([first, second]).routes[0].upstream == "app"


# ---------------------------------------------------------------------------
# Relative paths


def test_relative_certificate_paths_resolve_against_config_directory(tmp_path, pki, monkeypatch):
    """Relative certificate/key paths are relative to the directory of the config file,
    not to the current directory."""
    confdir = tmp_path / "etc"
    (confdir / "tls").mkdir(parents=True)
    shutil.copy(pki.cert, confdir / "tls" / "site.crt")
    shutil.copy(pki.key, confdir / "tls" / "site.key")
    path = write(confdir, "[listen:main]\nendpoint = tcp:8443\ntls = yes\n"
                          "certificate = tls/site.crt\nkey = tls/site.key\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    listener = load(path).listeners["main"]
    assert listener.certificate == (confdir / "tls" / "site.crt").resolve()
    assert listener.key == (confdir / "tls" / "site.key").resolve()


def test_relative_path_resolves_against_the_file_that_set_it(tmp_path, pki, monkeypatch):
    """With layered files in different directories, a relative path is resolved
    against the directory of the file that set that option."""
    base_dir, local_dir = tmp_path / "base", tmp_path / "local"
    local_dir.mkdir()
    shutil.copy(pki.cert, local_dir / "site.crt")
    shutil.copy(pki.key, local_dir / "site.key")
    first = write(base_dir, "[listen:main]\nendpoint = tcp:8443\ntls = yes\ncertificate = site.crt\n"
                            "key = site.key\n")
    second = write(local_dir, "[listen:main]\ncertificate = site.crt\nkey = site.key\n")
    monkeypatch.chdir(tmp_path)
    listener = load([first, second]).listeners["main"]
    assert listener.certificate == (local_dir / "site.crt").resolve()


def test_missing_relative_certificate_reports_resolved_path(tmp_path):
    """A missing relative certificate is reported with the path it was looked for at."""
    path = write(tmp_path, "[listen:main]\nendpoint = tcp:8443\ntls = yes\ncertificate = tls/x.crt\n"
                           "key = tls/x.key\n")
    assert_located(config_error(path), path, "listen:main", "certificate",
                   f"no such file: {(tmp_path / 'tls' / 'x.crt').resolve()}")


def test_relative_upstream_ca_resolves_against_config_directory(tmp_path, pki, monkeypatch):
    """An upstream's relative ca path is resolved against the config file's directory."""
    confdir = tmp_path / "conf"
    confdir.mkdir()
    shutil.copy(pki.ca, confdir / "ca.crt")
    path = write(confdir, LISTEN + "[upstream:app]\nservers = https://127.0.0.1:9443\nca = ca.crt\n")
    monkeypatch.chdir(tmp_path)
    assert load(path).upstreams["app"].ca == (confdir / "ca.crt").resolve()


# ---------------------------------------------------------------------------
# Defaults and values


def test_defaults(tmp_path):
    """A minimal config yields the documented defaults for settings, listener, upstream and route."""
    config = load(write(tmp_path, BASE))
    assert config.settings == Settings(state_directory=tmp_path / "state")
    assert config.settings.access_log == "-"
    assert config.settings.access_log_format == "combined"
    assert config.settings.max_header_bytes == 32768
    assert config.settings.max_headers == 100
    assert config.settings.max_body_bytes == 10 * 1024 * 1024
    assert config.settings.header_timeout == 15.0
    assert config.settings.idle_timeout == 60.0
    listener = config.listeners["main"]
    assert (listener.tls, listener.allow, listener.trusted_proxies, listener.min_tls_version) == (False, None, (),
                                                                                                  None)
    assert (listener.tls_profile, listener.groups, listener.ocsp_stapling) == ("intermediate", None, True)
    assert listener.source == str(tmp_path / "chatproxy.ini")
    upstream = config.upstreams["app"]
    assert upstream.verify is True
    assert upstream.host_header == "client"
    assert (upstream.connect_timeout, upstream.response_timeout) == (5.0, 60.0)
    assert (upstream.max_idle_connections, upstream.idle_connection_timeout) == (32, 30.0)
    assert upstream.ca is None and upstream.client_certificate is None
    route = config.routes[0]
    assert route.path == "/"
    assert route.path_regex is None
    assert (route.listeners, route.hosts, route.methods) == (None, None, None)
    assert (route.filters, route.query, route.websocket, route.max_body_bytes) == ((), (), False, None)
    assert config.filters == {} and config.demo is None


def test_listener_response_headers_and_close_timeout(tmp_path):
    """``response_headers`` lines become (name, value) pairs in order; ``close_timeout``
    defaults to 5 s and takes a duration."""
    text = ("[chatproxy]\nclose_timeout = 750ms\n" + LISTEN
            + "response_headers =\n    Strict-Transport-Security: max-age=63072000\n    X-Frame-Options: DENY\n"
            + UPSTREAM + ROUTE)
    config = load(write(tmp_path, text))
    assert config.listeners["main"].response_headers == (
        (b"Strict-Transport-Security", b"max-age=63072000"), (b"X-Frame-Options", b"DENY"))
    assert config.settings.close_timeout == 0.75
    assert load(write(tmp_path, BASE, "plain.ini")).settings.close_timeout == 5.0


def test_route_path_defaults_to_root_even_with_regex(tmp_path):
    """A route with only path_regex keeps path "/" and compiles the regex."""
    config = load(write(tmp_path, BASE + "path_regex = ^/chat/[0-9]+$\n"))
    route = config.routes[0]
    assert route.path == "/"
    assert route.path_regex is not None and route.path_regex.match("/chat/42")


def test_access_log_off(tmp_path):
    """``access_log = off`` disables the access log (None)."""
    assert load(write(tmp_path, BASE + "[chatproxy]\naccess_log = off\n")).settings.access_log is None


@pytest.mark.parametrize(("text", "expected"), [
    ("65536", 65536), ("64k", 65536), ("64K", 65536), ("64kb", 65536), ("64KiB", 65536),
    ("10m", 10 * 1024 * 1024), ("10MB", 10 * 1024 * 1024), ("1g", 1024 ** 3), ("0", 0), ("512b", 512),
])
def test_parse_size(text, expected):
    """Sizes are byte counts with optional binary k/m/g units."""
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "k", "1.5k", "-1", "10 parsecs", "10t"])
def test_parse_size_rejects(text):
    """Malformed sizes raise ValueError."""
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize(("text", "expected"), [
    ("30", 30.0), ("1.5", 1.5), ("1.5s", 1.5), ("250ms", 0.25), ("2m", 120.0), ("2min", 120.0), ("1h", 3600.0),
    ("10 s", 10.0),
])
def test_parse_duration(text, expected):
    """Durations are seconds with optional ms/s/m/min/h units."""
    assert parse_duration(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["", "0", "0ms", "-1", "soon", "5d", "1e3"])
def test_parse_duration_rejects(text):
    """Malformed or non-positive durations raise ValueError."""
    with pytest.raises(ValueError):
        parse_duration(text)


def test_sizes_and_durations_through_load_config(tmp_path):
    """Sizes and durations in sections are parsed into bytes and seconds."""
    path = write(tmp_path, BASE + "max_body_bytes = 10m\n" + """
[chatproxy]
max_header_bytes = 64k
max_body_bytes = 1g
header_timeout = 250ms
idle_timeout = 2m
""")
    config = load(path)
    assert config.settings.max_header_bytes == 65536
    assert config.settings.max_body_bytes == 1024 ** 3
    assert config.settings.header_timeout == pytest.approx(0.25)
    assert config.settings.idle_timeout == 120.0
    assert config.routes[0].max_body_bytes == 10 * 1024 * 1024


def test_upstream_timeouts(tmp_path):
    """Upstream durations accept units too."""
    path = write(tmp_path, LISTEN + "[upstream:app]\nservers = http://h\nconnect_timeout = 500ms\n"
                                    "response_timeout = 2m\nidle_connection_timeout = 1.5\n"
                                    "max_idle_connections = 0\nverify = off\nhost_header = upstream\n")
    upstream = load(path).upstreams["app"]
    assert upstream.connect_timeout == pytest.approx(0.5)
    assert upstream.response_timeout == 120.0
    assert upstream.idle_connection_timeout == 1.5
    assert upstream.max_idle_connections == 0
    assert upstream.verify is False
    assert upstream.host_header == "upstream"


@pytest.mark.parametrize(("text", "expected"), [
    ("::ffff:10.0.0.0/104", ["10.0.0.0/8"]),
    ("::ffff:192.168.1.5", ["192.168.1.5/32"]),
    ("::ffff:0:0/96", ["0.0.0.0/0"]),
    ("10.1.2.3/8", ["10.0.0.0/8"]),
    ("2001:db8::/32, 127.0.0.1", ["2001:db8::/32", "127.0.0.1/32"]),
])
def test_parse_networks_normalises(text, expected):
    """Networks are normalised: host bits cleared, IPv4-mapped IPv6 turned into IPv4."""
    assert [str(n) for n in parse_networks(text)] == expected


def test_mapped_networks_through_load_config(tmp_path):
    """allow and trusted_proxies hold IPv4 networks for IPv4-mapped IPv6 input."""
    path = write(tmp_path, LISTEN + "allow = ::ffff:10.0.0.0/104, 2001:db8::/48\n"
                                    "trusted_proxies = ::ffff:127.0.0.1\n")
    listener = load(path).listeners["main"]
    assert listener.allow == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::/48"))
    assert listener.trusted_proxies == (ipaddress.ip_network("127.0.0.1/32"),)


def test_server_urls(tmp_path):
    """Server URLs become scheme/host/port with default ports; IPv6 hosts are bracketed in the authority."""
    path = write(tmp_path, LISTEN + "[upstream:app]\nservers = http://a.example, https://b.example,\n"
                                    "  http://[::1]:8080\n  https://c.example:8443/\n")
    servers = load(path).upstreams["app"].servers
    assert [(s.scheme, s.host, s.port) for s in servers] == [
        ("http", "a.example", 80), ("https", "b.example", 443), ("http", "::1", 8080), ("https", "c.example", 8443)]
    assert [s.authority for s in servers] == ["a.example", "b.example", "[::1]:8080", "c.example:8443"]
    assert [s.tls for s in servers] == [False, True, False, True]


def test_route_values(tmp_path):
    """Route options are parsed: hosts lower-cased, methods upper-cased, query requirements, order kept."""
    path = write(tmp_path, BASE + """
hosts = Chat.Example.COM., *.example.net, [::1]
methods = get, Post
query = room=a%20b & debug
path = /api/v1
rewrite_path = /v1
websocket = yes

[route:second]
upstream = app
listeners = main
""")
    config = load(path)
    first, second = config.routes
    assert first.hosts == ("chat.example.com", "*.example.net", "::1")
    assert first.methods == frozenset({"GET", "POST"})
    assert [(q.name, q.value) for q in first.query] == [("room", "a b"), ("debug", None)]
    assert (first.path, first.rewrite_path, first.websocket) == ("/api/v1", "/v1", True)
    assert (first.order, second.order) == (0, 1)
    assert second.listeners == ("main",)


def test_option_names_are_case_insensitive(tmp_path):
    """INI option names are matched case-insensitively (``Endpoint`` is ``endpoint``)."""
    path = write(tmp_path, "[listen:main]\nEndpoint = tcp:8080\n")
    assert load(path).listeners["main"].endpoint == "tcp:8080"


def test_demo_section(tmp_path):
    """[demo] endpoint is read into Config.demo."""
    config = load(write(tmp_path, BASE + "[demo]\nendpoint = tcp:8081:interface=127.0.0.1\n"))
    assert config.demo is not None and config.demo.endpoint == "tcp:8081:interface=127.0.0.1"


def test_error_message_format(tmp_path):
    """The error text reads ``FILE [SECTION] OPTION: message`` on one line."""
    path = write(tmp_path, LISTEN + "tls = maybe\n")
    assert str(config_error(path)) == f"{path} [listen:main] tls: expected yes or no, got 'maybe'"


# ---------------------------------------------------------------------------
# Filters are built by the data path, once per plan


def test_twistd_start_builds_each_filter_once_and_the_plan_runs_it(tmp_path, monkeypatch):
    """twistd's makeService validates the configuration (building its filters, so a bad
    one exits 2 before anything starts) and the service's plan runs those very filter
    objects: a kind's build is called once per filter section, not again at start."""
    from chatproxy.process.tap import Options, makeService

    kind = FakeKind("counting")
    monkeypatch.setattr("chatproxy.proxy.validate.installed_filter_kinds", lambda: {"counting": kind})
    path = write(tmp_path, "[chatproxy]\nworkers = 1\naccess_log = off\n"
                           "[listen:main]\nendpoint = tcp:0:interface=127.0.0.1\n" + UPSTREAM + ROUTE
                           + "filters = f\n[filter:f]\nuse = counting\nrate = 5\n")
    options = Options()
    options.parseOptions(["--config", str(path)])
    service = makeService(options)
    assert kind.built_with == [{"rate": "5"}]
    service.privilegedStartService()
    try:
        chain = service.core.plan.chain(service.core.plan.routes["all"])
        assert [f.filter for f in chain.filters] == [("built", "counting", {"rate": "5"})]
        assert kind.built_with == [{"rate": "5"}]
    finally:
        service.stopService()


def test_each_plan_builds_its_filters_once(tmp_path, monkeypatch):
    """A plan given the filters validate built uses them; a plan built without them (a
    reload) validates its configuration itself, building each filter once."""
    from twisted.internet.testing import MemoryReactorClock

    from chatproxy.proxy.core import ProxyCore
    from chatproxy.proxy.plan import Plan

    kind = FakeKind("counting")
    path = write(tmp_path, BASE + "filters = f\n[filter:f]\nuse = counting\n")
    config, built = load_built(path, {"counting": kind})
    core = ProxyCore(MemoryReactorClock(), config, built)
    assert len(kind.built_with) == 1
    monkeypatch.setattr("chatproxy.proxy.validate.installed_filter_kinds", lambda: {"counting": kind})
    Plan(core.reactor, load_config([path]), core.sweeper, core.stats, previous=core.plan)
    assert len(kind.built_with) == 2
