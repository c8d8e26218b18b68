"""INI configuration files -> a frozen, validated model.

Every mistake is reported as a :class:`ConfigError` that names the file, the
section and the option, so an operator never sees a Python traceback for a
configuration mistake.  ``load_config`` reads one or more files (or
directories of ``*.ini`` files); later files override earlier ones option by
option.
"""

from __future__ import annotations

import configparser
import ipaddress
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar
from urllib.parse import unquote_plus, urlsplit

from attrs import Factory, define, frozen
from cryptography import x509
from OpenSSL import crypto
from twisted.internet import ssl
from twisted.internet.endpoints import serverFromString

from chatproxy.config.model import (
    AcmeAccount,
    Admin,
    Config,
    Demo,
    FilterSpec,
    Listener,
    QueryRequirement,
    RawValue,
    Route,
    Settings,
    SniCertificate,
    Upstream,
    UpstreamServer,
    WebSocketOptions,
)
from chatproxy.config.values import (
    parse_bool,
    parse_choice,
    parse_duration,
    parse_int,
    parse_list,
    parse_networks,
    parse_size,
    parse_text,
)
from chatproxy.config.values import OptionText
from chatproxy.http.messages import CONNECTION_HEADERS, parse_header_lines
from chatproxy.http.passwords import parse_password_hash
from chatproxy.http.paths import PathError, normalize_path

__all__ = ["ConfigError", "load_config"]

T = TypeVar("T")

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_HOST_RE = re.compile(r"^(\*\.)?[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*\.?$")
_TOKEN_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


class ConfigError(Exception):
    """A configuration mistake, located by file, section and option."""

    def __init__(
        self,
        message: str,
        file: str | None = None,
        section: str | None = None,
        option: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.file = file
        self.section = section
        self.option = option

    def __str__(self) -> str:
        where = []
        if self.file:
            where.append(self.file)
        if self.section:
            where.append(f"[{self.section}]")
        if self.option:
            where.append(self.option)
        prefix = " ".join(where)
        return f"{prefix}: {self.message}" if prefix else self.message


# ---------------------------------------------------------------------------
# Reading the files


@frozen
class _Value:
    text: str
    file: str
    replaced: tuple[str, ...] = ()  # earlier files that set the same option


@frozen
class _RawSection:
    name: str
    file: str
    options: dict[str, _Value]


def _expand_sources(paths: Sequence[str | Path]) -> list[Path]:
    files: list[Path] = []
    if not paths:
        raise ConfigError("no configuration file given (use --config FILE)")
    for given in paths:
        path = Path(given)
        if path.is_dir():
            found = sorted(p for p in path.glob("*.ini") if p.is_file())
            if not found:
                raise ConfigError("directory holds no *.ini file", file=str(path))
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise ConfigError("no such file or directory", file=str(path))
    return files


def _read_raw(files: Iterable[Path]) -> dict[str, _RawSection]:
    sections: dict[str, _RawSection] = {}
    for path in files:
        parser = configparser.ConfigParser(
            interpolation=None,
            strict=True,
            default_section="\x00no default section",
            empty_lines_in_values=False,
        )
        try:
            with path.open(encoding="utf-8") as handle:
                parser.read_file(handle, source=str(path))
        except configparser.DuplicateSectionError as e:
            raise ConfigError(f"section appears twice in this file (line {e.lineno})", str(path), e.section) from None
        except configparser.DuplicateOptionError as e:
            raise ConfigError(f"option appears twice in this section (line {e.lineno})", str(path), e.section, e.option) from None
        except configparser.MissingSectionHeaderError as e:
            raise ConfigError(f"line {e.lineno}: option before any [section] header", str(path)) from None
        except configparser.ParsingError as e:
            lines = ", ".join(str(lineno) for lineno, _ in e.errors)
            raise ConfigError(f"cannot parse line {lines}", str(path)) from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read: {e}", str(path)) from None
        for name in parser.sections():
            raw = sections.setdefault(name, _RawSection(name, str(path), {}))
            for option, text in parser.items(name, raw=True):
                earlier = raw.options.get(option)
                replaced = () if earlier is None else (*earlier.replaced, earlier.file)
                raw.options[option] = _Value(text.strip(), str(path), replaced)
    return sections


# ---------------------------------------------------------------------------
# Value parsers of the core sections (the shared ones are in values.py)


def _positive_int(text: str) -> int:
    return parse_int(text, minimum=1)


def _non_negative_int(text: str) -> int:
    return parse_int(text, minimum=0)


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        return parse_choice(text, allowed)

    return parse


def _endpoint(text: str) -> str:
    # Imported here, not at the top: importing the reactor installs the
    # default one, and twistd must choose the reactor before that.
    from twisted.internet import reactor

    if not text:
        raise ValueError("must not be empty")
    if text.split(":", 1)[0] == "systemd":
        # Sockets passed by systemd exist only in the activated process (and
        # its workers), so only the form is checked here; listening says
        # when systemd passed no such socket.
        options = dict(part.partition("=")[::2] for part in text.split(":")[1:])
        if options.get("domain") not in ("INET", "INET6", "UNIX") or not (options.get("index") or options.get("name")):
            raise ValueError("a systemd endpoint needs domain=INET|INET6|UNIX and index=N or name=NAME")
        return text
    try:
        endpoint = serverFromString(reactor, text)
    except Exception as e:  # endpoint parsers raise many kinds of errors
        raise ValueError(f"not a valid Twisted server endpoint string: {e}") from None
    port = getattr(endpoint, "_port", None)  # tcp:, tcp6:, ssl: keep the port number here
    if isinstance(port, int) and not 0 <= port <= 65535:
        raise ValueError(f"port {port} is out of range 0-65535")
    return text


def _access_log_destination(section: _Section) -> str | None:
    """``-`` (stdout), ``off``, or a file path relative to the file that set it."""
    if not section.has("access_log"):
        return Settings().access_log
    text = section.raw.options["access_log"].text
    if text.lower() == "off":
        return None
    if text == "-":
        return "-"
    path = section.path("access_log")
    assert path is not None
    if not path.parent.is_dir():
        raise section.error("access_log", f"no such directory: {path.parent}")
    if path.is_dir():
        raise section.error("access_log", f"{path} is a directory")
    return str(path)


# ---------------------------------------------------------------------------
# Section readers


class _Section:
    """Reads the options of one raw section, tracking which were used."""

    def __init__(self, raw: _RawSection, kind: str, allowed: Iterable[str]) -> None:
        self.raw = raw
        self.name = raw.name
        self.kind = kind
        self.allowed = set(allowed)
        for option, value in raw.options.items():
            if option not in self.allowed:
                known = ", ".join(sorted(self.allowed))
                raise ConfigError(f"unknown option (a [{kind}] section takes: {known})", value.file, raw.name, option)

    def error(self, option: str | None, message: str) -> ConfigError:
        """A ConfigError located at ``option`` of this section."""
        file = self.raw.options[option].file if option in self.raw.options else self.raw.file
        return ConfigError(message, file, self.name, option)

    def has(self, option: str) -> bool:
        """Whether the option is given."""
        return option in self.raw.options

    def get(self, option: str, parse: Callable[[str], T], default: T) -> T:
        """The parsed value of ``option`` or ``default`` when absent."""
        if option not in self.raw.options:
            return default
        return self.parse(option, parse)

    def parse(self, option: str, parse: Callable[[str], T]) -> T:
        """The parsed value of a present option, errors located."""
        value = self.raw.options[option]
        try:
            return parse(value.text)
        except ValueError as e:
            raise ConfigError(str(e), value.file, self.name, option) from None

    def require(self, option: str, parse: Callable[[str], T]) -> T:
        """The parsed value of a mandatory option."""
        if option not in self.raw.options:
            raise self.error(option, "required option is missing")
        return self.parse(option, parse)

    def path(self, option: str) -> Path | None:
        """A file path; relative paths are relative to the file that set it."""
        if option not in self.raw.options:
            return None
        value = self.raw.options[option]
        if not value.text:
            raise ConfigError("must not be empty", value.file, self.name, option)
        path = Path(value.text).expanduser()
        if not path.is_absolute():
            path = Path(value.file).resolve().parent / path
        return path

    def existing_file(self, option: str) -> Path | None:
        """Like ``path`` but the file must exist and be readable."""
        path = self.path(option)
        if path is not None and not path.is_file():
            raise self.error(option, f"no such file: {path}")
        return path


_SETTINGS_OPTIONS = {
    "access_log", "access_log_format", "max_header_bytes", "max_headers", "max_url_bytes",
    "max_body_bytes", "header_timeout", "idle_timeout", "drain_timeout", "close_timeout",
    "reload_close_window", "workers", "http2_max_streams", "state_directory",
}
_LISTEN_OPTIONS = {
    "endpoint", "tls", "certificate", "key", "sni", "tls_profile", "min_tls_version", "ciphers", "groups",
    "create_self_signed", "ocsp_stapling", "acme", "acme_names", "redirect_to_https", "https_port",
    "allow", "trusted_proxies", "response_headers", "http2",
}
#: Listener options that only a TLS listener takes.
_TLS_ONLY_OPTIONS = ("certificate", "key", "sni", "tls_profile", "min_tls_version", "ciphers", "groups",
                     "create_self_signed", "ocsp_stapling", "acme", "acme_names")
_UPSTREAM_OPTIONS = {
    "servers", "verify", "ca", "client_certificate", "client_key", "host_header",
    "connect_timeout", "response_timeout", "max_idle_connections", "idle_connection_timeout",
    "health_check_path", "health_check_interval", "health_check_timeout", "health_check_status",
    "healthy_threshold", "unhealthy_threshold", "sticky_cookie",
}
_WEBSOCKET_OPTIONS = ("max_message_bytes", "max_frame_bytes", "max_buffered_bytes", "ping_interval", "ping_timeout",
                      "idle_timeout", "max_messages_per_second", "compression")
_ROUTE_OPTIONS = {
    "listeners", "hosts", "path", "path_regex", "query", "methods", "upstream",
    "rewrite_path", "filters", "websocket", "max_body_bytes", *_WEBSOCKET_OPTIONS,
}
_ACME_OPTIONS = {"directory", "contact", "ca"}
_DEMO_OPTIONS = {"endpoint"}
_ADMIN_OPTIONS = {"endpoint", "allow", "user", "password_hash"}


def _default_state_directory(first_file: Path) -> Path:
    """``$STATE_DIRECTORY`` (set by systemd's ``StateDirectory=``), else
    ``state`` beside the first configuration file."""
    given = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    return Path(given) if given else first_file.resolve().parent / "state"


def _read_settings(section: _Section | None, first_file: Path) -> Settings:
    state = _default_state_directory(first_file)
    if section is None:
        return Settings(state_directory=state)
    d = Settings()
    return Settings(
        state_directory=section.path("state_directory") or state,
        access_log=_access_log_destination(section),
        access_log_format=section.get("access_log_format", _choice("combined", "json"), d.access_log_format),
        max_header_bytes=section.get("max_header_bytes", parse_size, d.max_header_bytes),
        max_headers=section.get("max_headers", _positive_int, d.max_headers),
        max_url_bytes=section.get("max_url_bytes", parse_size, d.max_url_bytes),
        max_body_bytes=section.get("max_body_bytes", parse_size, d.max_body_bytes),
        header_timeout=section.get("header_timeout", parse_duration, d.header_timeout),
        idle_timeout=section.get("idle_timeout", parse_duration, d.idle_timeout),
        drain_timeout=section.get("drain_timeout", parse_duration, d.drain_timeout),
        close_timeout=section.get("close_timeout", parse_duration, d.close_timeout),
        reload_close_window=section.get("reload_close_window", parse_duration, d.reload_close_window),
        workers=section.get("workers", _workers, d.workers),
        http2_max_streams=section.get("http2_max_streams", _stream_count, d.http2_max_streams),
    )


def _stream_count(text: str) -> int:
    """``http2_max_streams``: 1 to 1000."""
    return parse_int(text, 1, 1000)


def _workers(text: str) -> int:
    """``workers``: a count of processes, or ``auto`` (0) for one per CPU."""
    if text.strip().lower() == "auto":
        return 0
    count = _positive_int(text)
    if count > 256:
        raise ValueError("at most 256 workers")
    return count


def _parse_sni(section: _Section) -> tuple[SniCertificate, ...]:
    """``sni`` lines: ``host: certificate-file key-file`` (one per line),
    optionally followed by ``acme:NAME`` (the files are then issued and
    renewed for ``host`` by that ACME account, and may not exist yet)."""
    if not section.has("sni"):
        return ()
    value = section.raw.options["sni"]
    base = Path(value.file).resolve().parent
    entries = []
    for line in value.text.splitlines():
        line = line.strip()
        if not line:
            continue
        match = re.fullmatch(r"([^\s:]+)\s*:\s*(\S+)\s+(\S+)(?:\s+acme:(\S+))?", line)
        if not match:
            raise section.error("sni", f"expected 'HOST: CERTIFICATE-FILE KEY-FILE [acme:NAME]', got {line!r}")
        host, acme = match.group(1).lower(), match.group(4)
        if not _HOST_RE.match(host):
            raise section.error("sni", f"{host!r} is not a host name")
        if acme is not None and host.startswith("*."):
            raise section.error("sni", f"{host}: ACME HTTP-01 validation cannot issue wildcard certificates")
        files = []
        for text in match.group(2), match.group(3):
            path = Path(text).expanduser()
            path = path if path.is_absolute() else base / path
            if acme is None and not path.is_file():
                raise section.error("sni", f"no such file: {path}")
            files.append(path)
        entries.append(SniCertificate(host, files[0], files[1], acme))
    return tuple(entries)


def _check_listener_files(section: _Section, certificate: Path | None, key: Path | None) -> None:
    """A TLS listener's certificate and key: both given, and existing unless
    chatproxy makes them (``create_self_signed``, ``acme``)."""
    create = section.get("create_self_signed", parse_bool, False)
    acme = section.has("acme")
    if create and acme:
        raise section.error("create_self_signed", "give either create_self_signed or acme, not both")
    for option, path in ("certificate", certificate), ("key", key):
        if path is None:
            raise section.error(option, "required when tls = yes")
        if not (create or acme) and not path.is_file():
            raise section.error(option, f"no such file: {path}")
    if (create or acme) and certificate is not None and key is not None and certificate.exists() != key.exists():
        present, absent = ("certificate", "key") if certificate.exists() else ("key", "certificate")
        how = "create_self_signed" if create else "acme"
        raise section.error(absent, f"{how}: the {present} exists but the {absent} does not; "
                                    "give both files or neither (nothing is overwritten)")


def _check_listener_kind(section: _Section, tls: bool) -> None:
    """Options only a TLS listener, or only a plain one, takes."""
    if tls:
        for option in ("redirect_to_https", "https_port"):
            if section.has(option):
                raise section.error(option, "only meaningful with tls = no (a plain listener)")
        if section.has("acme_names") != section.has("acme"):
            option = "acme" if section.has("acme_names") else "acme_names"
            raise section.error(option, "acme and acme_names go together")
        return
    for option in _TLS_ONLY_OPTIONS:
        if section.has(option):
            raise section.error(option, "only meaningful with tls = yes")
    if section.has("https_port") and not section.get("redirect_to_https", parse_bool, False):
        raise section.error("https_port", "only meaningful with redirect_to_https = yes")


def _read_listener(section: _Section) -> Listener:
    name = section.name.split(":", 1)[1]
    tls = section.get("tls", parse_bool, False)
    certificate = section.path("certificate")
    key = section.path("key")
    profile = section.get("tls_profile", _choice("intermediate", "modern"), "intermediate")
    min_version = section.get("min_tls_version", _choice("1.2", "1.3"), None)
    if profile == "modern" and min_version == "1.2":
        raise section.error("min_tls_version", "tls_profile = modern is TLS 1.3 only")
    listener = Listener(
        name=name,
        endpoint=section.require("endpoint", _endpoint),
        source=section.raw.file,
        tls=tls,
        certificate=certificate,
        key=key,
        sni=_parse_sni(section),
        tls_profile=profile,
        min_tls_version=min_version,
        ciphers=section.get("ciphers", parse_text, None),
        groups=section.get("groups", _parse_groups, None),
        create_self_signed=section.get("create_self_signed", parse_bool, False),
        ocsp_stapling=section.get("ocsp_stapling", parse_bool, True),
        acme=section.get("acme", _parse_name, None),
        acme_names=section.get("acme_names", _parse_acme_names, ()),
        redirect_to_https=section.get("redirect_to_https", parse_bool, False),
        https_port=section.get("https_port", _port, 443),
        allow=section.get("allow", parse_networks, None),
        trusted_proxies=section.get("trusted_proxies", parse_networks, ()),
        response_headers=section.get("response_headers", _response_headers, ()),
        http2=section.get("http2", parse_bool, True),
    )
    _check_listener_kind(section, tls)
    if tls:
        _check_listener_files(section, certificate, key)
    return listener


def _parse_groups(text: str) -> tuple[str, ...]:
    """``groups``: OpenSSL group names (``X25519``, ``P-256``, ...), in the
    server's order of preference (OpenSSL checks the names: proxy.validate)."""
    names = tuple(item.replace(":", " ").strip() for item in parse_list(text))
    if not names:
        raise ValueError("expected at least one group name, such as X25519, P-256, P-384")
    for name in names:
        if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise ValueError(f"{name!r} is not a group name (such as X25519, P-256, P-384)")
    return names


def _parse_acme_names(text: str) -> tuple[str, ...]:
    """``acme_names``: the host names a certificate is issued for (no
    wildcards: HTTP-01 cannot validate them; no IP addresses)."""
    names = _parse_hosts(text)
    for name in names:
        if name.startswith("*."):
            raise ValueError(f"{name}: ACME HTTP-01 validation cannot issue wildcard certificates")
        if not _HOST_RE.match(name) or "." not in name.rstrip("."):
            raise ValueError(f"{name!r}: give fully qualified host names")
    return tuple(name.rstrip(".") for name in names)


def _port(text: str) -> int:
    port = parse_int(text, minimum=1)
    if port > 65535:
        raise ValueError("a port is 1-65535")
    return port


def _response_headers(text: str) -> tuple[tuple[bytes, bytes], ...]:
    """``response_headers``: ``Name: value`` lines, none of them a connection or framing header."""
    headers = parse_header_lines(text)
    for name, _ in headers:
        if name.lower() in CONNECTION_HEADERS:
            raise ValueError(f"{name.decode('ascii')} is a hop-by-hop or framing header, which chatproxy "
                             "manages itself: it cannot be set")
    return headers


def _parse_server(text: str) -> UpstreamServer:
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as e:
        raise ValueError(f"{text!r} is not a URL: {e}") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{text!r}: the scheme must be http:// or https://")
    if not parts.hostname:
        raise ValueError(f"{text!r}: no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ValueError(f"{text!r}: give only scheme://host[:port] (no path, query or user)")
    default = 443 if parts.scheme == "https" else 80
    return UpstreamServer(text, parts.scheme, parts.hostname, port or default)


def _check_client_tls_files(section: _Section, ca: Path | None, certificate: Path | None, key: Path | None) -> None:
    """Load an upstream's CA and client certificate/key as the proxy will, so a
    bad file or a key that does not match is a config error, not a traceback."""
    if ca is not None:
        try:
            x509.load_pem_x509_certificates(ca.read_bytes())
        except (ValueError, OSError) as e:
            raise section.error("ca", f"cannot load PEM CA certificates from {ca}: {e}") from None
    if certificate is None:
        return
    try:
        cert_pem = certificate.read_bytes()
        ssl.Certificate.loadPEM(cert_pem)
    except (crypto.Error, ValueError, OSError):
        raise section.error("client_certificate", f"cannot load a PEM certificate from {certificate}") from None
    key_option, key_file = ("client_key", key) if key is not None else ("client_certificate", certificate)
    try:
        pem = cert_pem + (b"\n" + key.read_bytes() if key is not None else b"")
        ssl.KeyPair.load(pem, crypto.FILETYPE_PEM)
    except (crypto.Error, ValueError, OSError):
        hint = "" if key is not None else " (set client_key, or put the key in the same file)"
        raise section.error(key_option, f"cannot load a PEM private key from {key_file}{hint}") from None
    try:
        ssl.PrivateCertificate.loadPEM(pem)
    except Exception:  # twisted.internet.error.VerifyError, OpenSSL errors
        raise section.error(key_option, f"the key in {key_file} does not match the certificate in {certificate}") from None


def _read_upstream(section: _Section) -> Upstream:
    name = section.name.split(":", 1)[1]

    def servers(text: str) -> tuple[UpstreamServer, ...]:
        found = tuple(_parse_server(item) for item in parse_list(text))
        if not found:
            raise ValueError("expected at least one server URL")
        return found

    d = Upstream(name, ())
    client_certificate = section.existing_file("client_certificate")
    client_key = section.existing_file("client_key")
    if client_key and not client_certificate:
        raise section.error("client_key", "needs client_certificate")
    ca = section.existing_file("ca")
    _check_client_tls_files(section, ca, client_certificate, client_key)
    health_check_path = section.get("health_check_path", _parse_health_check_path, None)
    if health_check_path is None:
        for option in ("health_check_interval", "health_check_timeout", "health_check_status",
                       "healthy_threshold", "unhealthy_threshold"):
            if section.has(option):
                raise section.error(option, "needs health_check_path (no active health checks without it)")
    health_check_interval = section.get("health_check_interval", parse_duration, d.health_check_interval)
    health_check_timeout = section.get("health_check_timeout", parse_duration, d.health_check_timeout)
    if health_check_timeout > health_check_interval:
        option = "health_check_timeout" if section.has("health_check_timeout") else "health_check_interval"
        raise section.error(option, f"health_check_timeout ({health_check_timeout:g}s) must not be longer than "
                                    f"health_check_interval ({health_check_interval:g}s)")
    return Upstream(
        name=name,
        servers=section.require("servers", servers),
        verify=section.get("verify", parse_bool, True),
        ca=ca,
        client_certificate=client_certificate,
        client_key=client_key,
        host_header=section.get("host_header", _choice("client", "upstream"), d.host_header),
        connect_timeout=section.get("connect_timeout", parse_duration, d.connect_timeout),
        response_timeout=section.get("response_timeout", parse_duration, d.response_timeout),
        max_idle_connections=section.get("max_idle_connections", _non_negative_int, d.max_idle_connections),
        idle_connection_timeout=section.get("idle_connection_timeout", parse_duration, d.idle_connection_timeout),
        health_check_path=health_check_path,
        health_check_interval=health_check_interval,
        health_check_timeout=health_check_timeout,
        health_check_status=section.get("health_check_status", _parse_status_ranges, d.health_check_status),
        healthy_threshold=section.get("healthy_threshold", _positive_int, d.healthy_threshold),
        unhealthy_threshold=section.get("unhealthy_threshold", _positive_int, d.unhealthy_threshold),
        sticky_cookie=section.get("sticky_cookie", _parse_cookie_name, None),
    )


def _parse_health_check_path(text: str) -> str:
    """The path (and optional query) a health check asks for: ``/healthz``."""
    if not text.startswith("/"):
        raise ValueError(f"must start with '/', got {text!r}")
    if any(c.isspace() or ord(c) < 0x21 or ord(c) > 0x7E for c in text) or "#" in text:
        raise ValueError(f"{text!r}: only printable ASCII without spaces or '#' (percent-encode the rest)")
    return text


def _parse_status_ranges(text: str) -> tuple[tuple[int, int], ...]:
    """HTTP statuses and inclusive ranges: ``200-399``, ``200, 204``, ``200-299, 401``."""
    ranges = []
    for item in parse_list(text):
        low_text, dash, high_text = item.partition("-")
        try:
            low = int(low_text.strip())
            high = int(high_text.strip()) if dash else low
        except ValueError:
            raise ValueError(f"{item!r} is not a status or a range of statuses such as 200-399") from None
        if not (100 <= low <= 599 and 100 <= high <= 599):
            raise ValueError(f"{item!r}: statuses are between 100 and 599")
        if high < low:
            raise ValueError(f"{item!r}: the range ends before it starts")
        ranges.append((low, high))
    if not ranges:
        raise ValueError("expected at least one status or range, such as 200-399")
    return tuple(ranges)


def _parse_cookie_name(text: str) -> str:
    """A cookie name (an HTTP token, RFC 6265)."""
    if not _TOKEN_RE.match(text):
        raise ValueError(f"{text!r} is not a valid cookie name (letters, digits and !#$%&'*+.^_`|~-)")
    return text


def _parse_hosts(text: str) -> tuple[str, ...]:
    hosts = []
    for item in parse_list(text):
        host = item.lower().rstrip(".")
        if not _HOST_RE.match(host):
            try:
                ipaddress.ip_address(host.strip("[]"))
            except ValueError:
                raise ValueError(f"{item!r} is not a host name, *.wildcard or IP address") from None
            host = host.strip("[]")
        hosts.append(host)
    if not hosts:
        raise ValueError("expected at least one host name (leave the option out to match any host)")
    return tuple(hosts)


def _parse_path_prefix(text: str) -> str:
    try:
        normal = normalize_path(text)
    except PathError as e:
        raise ValueError(f"{text!r} is not a clean path: {e.reason}") from None
    if normal != text:
        raise ValueError(f"write the path in its normal form: {normal!r}")
    return text


def _parse_regex(text: str) -> re.Pattern[str]:
    try:
        return re.compile(text)
    except re.error as e:
        raise ValueError(f"not a valid regular expression: {e}") from None


def _parse_query(text: str) -> tuple[QueryRequirement, ...]:
    requirements = []
    for item in re.split(r"[&,\n]", text):
        item = item.strip()
        if not item:
            continue
        name, sep, value = item.partition("=")
        name = unquote_plus(name.strip())
        if not name:
            raise ValueError(f"{item!r}: a parameter needs a name")
        # Decoded as a query string is (``+`` is a space), like the request's own.
        requirements.append(QueryRequirement(name, unquote_plus(value.strip()) if sep else None))
    if not requirements:
        raise ValueError("expected at least one NAME=VALUE or NAME")
    return tuple(requirements)


def _parse_methods(text: str) -> frozenset[str]:
    methods = set()
    for item in parse_list(text):
        if not _TOKEN_RE.match(item):
            raise ValueError(f"{item!r} is not an HTTP method")
        methods.add(item.upper())
    if not methods:
        raise ValueError("expected at least one method")
    return frozenset(methods)


def _parse_names(text: str) -> tuple[str, ...]:
    names = parse_list(text)
    for item in names:
        if not _NAME_RE.match(item):
            raise ValueError(f"{item!r} is not a section name")
    return tuple(names)


def _parse_listener_names(text: str) -> tuple[str, ...]:
    names = _parse_names(text)
    if not names:
        raise ValueError("expected at least one listener name (leave the option out to serve on every listener)")
    return names


def _parse_name(text: str) -> str:
    if not _NAME_RE.match(text):
        raise ValueError(f"{text!r} is not a section name")
    return text


def _parse_rewrite(text: str) -> str:
    if not text.startswith("/"):
        raise ValueError("must start with /")
    return _parse_path_prefix(text)


def _read_route(section: _Section, order: int) -> Route:
    name = section.name.split(":", 1)[1]
    if section.has("path") and section.has("path_regex"):
        raise section.error("path_regex", "give either path or path_regex, not both")
    path = section.get("path", _parse_path_prefix, "/")
    mode = section.get("websocket", _parse_websocket_mode, "no")
    return Route(
        name=name,
        order=order,
        upstream=section.require("upstream", _parse_name),
        listeners=section.get("listeners", _parse_listener_names, None),
        hosts=section.get("hosts", _parse_hosts, None),
        path=path,
        path_regex=section.get("path_regex", _parse_regex, None),
        query=section.get("query", _parse_query, ()),
        methods=section.get("methods", _parse_methods, None),
        rewrite_path=section.get("rewrite_path", _parse_rewrite, None),
        filters=section.get("filters", _parse_names, ()),
        websocket=mode != "no",
        max_body_bytes=section.get("max_body_bytes", parse_size, None),
        ws=_read_websocket_options(section, mode),
    )


def _parse_websocket_mode(text: str) -> str:
    lowered = text.lower()
    if lowered in ("bridge", "tunnel"):
        return lowered
    return "bridge" if parse_bool(text) else "no"


def _duration_or_off(text: str) -> float:
    """A duration, or 0 / off for none."""
    if text.strip().lower() in ("0", "off", "no"):
        return 0.0
    return parse_duration(text)


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"expected a number of messages per second, got {text!r}") from None
    if value < 0:
        raise ValueError("must not be negative")
    return value


def _read_websocket_options(section: _Section, mode: str) -> WebSocketOptions:
    if mode == "no":
        for option in _WEBSOCKET_OPTIONS:
            if section.has(option):
                raise section.error(option, "only meaningful with websocket = yes")
        return WebSocketOptions()
    d = WebSocketOptions()
    options = WebSocketOptions(
        mode=mode,
        max_message_bytes=section.get("max_message_bytes", parse_size, d.max_message_bytes),
        max_frame_bytes=section.get("max_frame_bytes", parse_size,
                                    section.get("max_message_bytes", parse_size, d.max_frame_bytes)),
        max_buffered_bytes=section.get("max_buffered_bytes", parse_size, d.max_buffered_bytes),
        ping_interval=section.get("ping_interval", _duration_or_off, d.ping_interval),
        ping_timeout=section.get("ping_timeout", _duration_or_off, d.ping_timeout),
        idle_timeout=section.get("idle_timeout", _duration_or_off, d.idle_timeout),
        max_messages_per_second=section.get("max_messages_per_second", _rate, d.max_messages_per_second),
        compression=section.get("compression", parse_bool, d.compression),
    )
    if mode == "tunnel":
        for option in _WEBSOCKET_OPTIONS:
            if section.has(option):
                raise section.error(option, "only meaningful with websocket = bridge (tunnel mode relays bytes "
                                            "without reading messages)")
    if options.max_frame_bytes > options.max_message_bytes:
        raise section.error("max_frame_bytes", "must not exceed max_message_bytes")
    if options.ping_interval and not options.ping_timeout:
        raise section.error("ping_timeout", "must be set when ping_interval is")
    return options


def _read_filter(raw: _RawSection) -> FilterSpec:
    """A filter section as its kind will get it; the kind itself is looked up,
    and the filter built, by the data path (``chatproxy.proxy.validate``)."""
    name = raw.name.split(":", 1)[1]
    if "use" not in raw.options:
        raise ConfigError("required option is missing", raw.file, raw.name, "use")
    return FilterSpec(
        name=name,
        kind=raw.options["use"].text,
        options={option: OptionText(value.text, Path(value.file).resolve().parent, name)
                 for option, value in raw.options.items() if option not in _GENERIC_FILTER_OPTIONS},
        mode=_read_filter_choice(raw, "mode", ("enforce", "report")),
        refused_message=_read_filter_choice(raw, "refused_message", ("close", "drop")),
        files={option: value.file for option, value in raw.options.items()},
        source=raw.file,
    )


#: Options every ``[filter:NAME]`` section takes; the kind's ``build`` never sees them.
_GENERIC_FILTER_OPTIONS = ("use", "mode", "refused_message")


def _read_filter_choice(raw: _RawSection, option: str, choices: tuple[str, ...]) -> str:
    """A generic filter option that is one of ``choices`` (the first is the default)."""
    if option not in raw.options:
        return choices[0]
    value = raw.options[option]
    text = value.text.lower()
    if text not in choices:
        raise ConfigError(f"expected {' or '.join(choices)}, got {value.text!r}", value.file, raw.name, option)
    return text


def _check_name(raw: _RawSection, kind: str) -> None:
    name = raw.name.split(":", 1)[1] if ":" in raw.name else ""
    if not _NAME_RE.match(name):
        raise ConfigError(f"a [{kind}:NAME] section needs a NAME of letters, digits, '.', '_' or '-'", raw.file, raw.name)


@define
class _Sections:
    """The sections of the files, each read as it comes (references between
    them are checked afterwards)."""

    settings: _Section | None = None
    listeners: dict[str, Listener] = Factory(dict)
    upstreams: dict[str, Upstream] = Factory(dict)
    routes: list[Route] = Factory(list)
    filters: dict[str, FilterSpec] = Factory(dict)
    acme: dict[str, AcmeAccount] = Factory(dict)
    demo: Demo | None = None
    admin: Admin | None = None

    def read(self, raw: _RawSection) -> None:
        """Read one section into its place."""
        kind = raw.name.split(":", 1)[0]
        if raw.name == "chatproxy":
            self.settings = _Section(raw, "chatproxy", _SETTINGS_OPTIONS)  # read once every section is in
        elif raw.name == "admin":
            self.admin = _read_admin(_Section(raw, "admin", _ADMIN_OPTIONS))
        elif raw.name == "demo":
            self.demo = Demo(_Section(raw, "demo", _DEMO_OPTIONS).require("endpoint", _endpoint))
        elif kind in _NAMED_SECTIONS and ":" in raw.name:
            _check_name(raw, kind)
            _NAMED_SECTIONS[kind](self, raw)
        else:
            raise ConfigError("unknown section (expected [chatproxy], [admin], [demo], [listen:NAME], "
                              "[upstream:NAME], [route:NAME], [filter:NAME] or [acme:NAME])", raw.file, raw.name)

    def add_listener(self, raw: _RawSection) -> None:
        """A ``[listen:NAME]`` section."""
        listener = _read_listener(_Section(raw, "listen:NAME", _LISTEN_OPTIONS))
        self.listeners[listener.name] = listener

    def add_upstream(self, raw: _RawSection) -> None:
        """An ``[upstream:NAME]`` section."""
        upstream = _read_upstream(_Section(raw, "upstream:NAME", _UPSTREAM_OPTIONS))
        self.upstreams[upstream.name] = upstream

    def add_route(self, raw: _RawSection) -> None:
        """A ``[route:NAME]`` section."""
        self.routes.append(_read_route(_Section(raw, "route:NAME", _ROUTE_OPTIONS), len(self.routes)))

    def add_filter(self, raw: _RawSection) -> None:
        """A ``[filter:NAME]`` section."""
        spec = _read_filter(raw)
        self.filters[spec.name] = spec

    def add_acme(self, raw: _RawSection) -> None:
        """An ``[acme:NAME]`` section."""
        account = _read_acme(_Section(raw, "acme:NAME", _ACME_OPTIONS))
        self.acme[account.name] = account


_NAMED_SECTIONS: dict[str, Callable[[_Sections, _RawSection], None]] = {
    "listen": _Sections.add_listener,
    "upstream": _Sections.add_upstream,
    "route": _Sections.add_route,
    "filter": _Sections.add_filter,
    "acme": _Sections.add_acme,
}


def _read_admin(section: _Section) -> Admin:
    """The ``[admin]`` section: ``user`` and ``password_hash`` go together."""
    user = section.get("user", _parse_user, None)
    password_hash = section.get("password_hash", _parse_password_hash, None)
    if user is not None and password_hash is None:
        raise section.error("password_hash", "required with user (make it with python -m chatproxy hash-password)")
    if password_hash is not None and user is None:
        raise section.error("user", "required with password_hash")
    return Admin(endpoint=section.get("endpoint", _endpoint, Admin().endpoint),
                 allow=section.get("allow", parse_networks, None), user=user, password_hash=password_hash)


def _parse_user(text: str) -> str:
    if not text or ":" in text or any(ord(c) < 0x21 or ord(c) == 0x7F for c in text):
        raise ValueError("a user name must be non-empty, without ':', spaces or control characters")
    return text


def _parse_password_hash(text: str) -> str:
    return str(parse_password_hash(text))


def _read_acme(section: _Section) -> AcmeAccount:
    return AcmeAccount(
        name=section.name.split(":", 1)[1],
        directory=section.require("directory", _parse_directory_url),
        source=section.raw.file,
        contact=section.get("contact", _parse_contact, ()),
        ca=section.existing_file("ca"),
    )


def _parse_directory_url(text: str) -> str:
    """An ACME directory URL (``https://``; ``http://`` only on loopback, for test CAs)."""
    parts = urlsplit(text)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError(f"{text!r} is not an https:// URL")
    if parts.scheme == "http" and parts.hostname not in ("localhost", "127.0.0.1", "::1"):
        raise ValueError(f"{text!r}: an ACME directory is reached over https://")
    return text


def _parse_contact(text: str) -> tuple[str, ...]:
    """Contact addresses: ``ops@example.com`` or ``mailto:ops@example.com``."""
    contacts = []
    for item in parse_list(text):
        address = item.removeprefix("mailto:")
        if not re.fullmatch(r"[^@\s:,]+@[^@\s:,]+\.[^@\s:,]+", address):
            raise ValueError(f"{item!r} is not an e-mail address")
        contacts.append("mailto:" + address)
    return tuple(contacts)


def _check_tls_references(sections: _Sections, raw_sections: Mapping[str, _RawSection]) -> None:
    """Listeners and SNI names name existing [acme:NAME] sections, and ACME
    has a plain listener to answer HTTP-01 challenges on."""
    uses_acme = False
    for listener in sections.listeners.values():
        raw = raw_sections[f"listen:{listener.name}"]
        for option, name in [("acme", listener.acme), *(("sni", entry.acme) for entry in listener.sni)]:
            if name is None:
                continue
            uses_acme = True
            if name not in sections.acme:
                known = ", ".join(sorted(sections.acme)) or "none defined"
                raise ConfigError(f"no [acme:{name}] section (ACME accounts: {known})",
                                  raw.options[option].file, raw.name, option)
    if uses_acme and not any(not listener.tls for listener in sections.listeners.values()):
        first = next(listener for listener in sections.listeners.values() if listener.tls and (
            listener.acme or any(entry.acme for entry in listener.sni)))
        raw = raw_sections[f"listen:{first.name}"]
        option = "acme" if first.acme else "sni"
        raise ConfigError("ACME validates names with HTTP-01 on port 80: add a plain listener (tls = no), "
                          "for example with redirect_to_https = yes", raw.options[option].file, raw.name, option)


def _check_references(sections: _Sections, raw_sections: Mapping[str, _RawSection]) -> None:
    """Every route names existing upstream, listener and filter sections."""
    for route in sections.routes:
        raw = raw_sections[f"route:{route.name}"]

        def located(option: str) -> tuple[str, str, str]:
            return (raw.options[option].file if option in raw.options else raw.file, raw.name, option)

        if route.upstream not in sections.upstreams:
            known = ", ".join(sorted(sections.upstreams)) or "none defined"
            raise ConfigError(f"no [upstream:{route.upstream}] section (upstreams: {known})", *located("upstream"))
        for listener_name in route.listeners or ():
            if listener_name not in sections.listeners:
                known = ", ".join(sorted(sections.listeners))
                raise ConfigError(f"no [listen:{listener_name}] section (listeners: {known})", *located("listeners"))
            if sections.listeners[listener_name].redirect_to_https:
                raise ConfigError(f"[listen:{listener_name}] has redirect_to_https = yes: it answers every request "
                                  "with a redirect and serves no route", *located("listeners"))
        for filter_name in route.filters:
            if filter_name not in sections.filters:
                known = ", ".join(sorted(sections.filters)) or "none defined"
                raise ConfigError(f"no [filter:{filter_name}] section (filters: {known})", *located("filters"))


def load_config(paths: Sequence[str | Path]) -> Config:
    """Read and validate the configuration files ``paths`` (later ones win).

    Raises :class:`ConfigError`.  Filter sections are read, not built, and
    listener certificates are checked to exist, not loaded: the data path's
    :func:`chatproxy.proxy.validate.validate` does that, with errors located
    the same way.
    """
    files = _expand_sources(paths)
    raw_sections = _read_raw(files)
    sections = _Sections()
    for raw in raw_sections.values():
        sections.read(raw)
    settings = _read_settings(sections.settings, files[0])
    if not sections.listeners:
        raise ConfigError("no [listen:NAME] section: the proxy would not listen anywhere", str(files[-1]))
    _check_references(sections, raw_sections)
    _check_tls_references(sections, raw_sections)
    return Config(
        sources=tuple(str(f) for f in files),
        settings=settings,
        listeners=sections.listeners,
        upstreams=sections.upstreams,
        routes=tuple(sections.routes),
        filters=sections.filters,
        demo=sections.demo,
        admin=sections.admin,
        acme=sections.acme,
        raw_values=tuple(RawValue(value.file, raw.name, option, value.text, value.replaced)
                         for raw in raw_sections.values() for option, value in raw.options.items()),
    )
