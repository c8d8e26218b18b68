"""Example values left in a configuration (``chatproxy.config.placeholders``): the
pure decision over located raw values, and the raw values ``load_config``
exposes (file, section, option, and the earlier files a value replaced)."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from chatproxy.config import RawValue, load_config, parse_list
from chatproxy.config.placeholders import PROFILES, Placeholder, Profile, SiteValue, find_placeholders, generic_reason
from profile_peers import read_profile

TOY = Profile("toy.ini", (
    SiteValue("listen:public", "endpoint", "tcp:443"),
    SiteValue("filter:origins", "allow", "https://www.example.com\nhttps://chat.example.com"),
))


def value(section: str, option: str, text: str, file: str = "toy.ini", replaced: tuple[str, ...] = ()) -> RawValue:
    """A raw value as load_config reports it."""
    return RawValue(file, section, option, text, replaced)


# ---------------------------------------------------------------------------
# Rules that apply to any value


GENERIC = [
    # (text, expected reason or None)
    ("https://www.example.com", "uses the example domain www.example.com"),
    ("https://www.example.com\nhttps://chat.example.com",
     "uses the example domains www.example.com, chat.example.com"),
    ("https://EXAMPLE.org:8443", "uses the example domain example.org"),
    ("https://*.example.net", "uses the example domain *.example.net"),
    ("tls/chat.example.com.crt", "uses the example domain chat.example.com"),  # certificate file names
    ("chat.example.com: /etc/tls/a.crt /etc/tls/a.key", "uses the example domain chat.example.com"),  # sni
    ("https://badexample.com", None),
    ("https://example.community", None),
    ("https://www.example.test", None),  # .test is for tests, not documentation: a site may use it
    ("https://mycompany-prod.pegacloud.net", "uses the placeholder host mycompany-prod.pegacloud.net"),
    ("https://chat.MyCompany.com", "uses the placeholder host chat.mycompany.com"),
    ("https://notmycompany.com", None),
    ("/prweb/PRChat/app/MySelfServiceApp", "uses Pega's placeholder application name MySelfServiceApp"),
    ("/prweb/PRPushServlet/app/MySelfServiceApp/x", "uses Pega's placeholder application name MySelfServiceApp"),
    ("/prweb/PRChat/app/MySelfServiceAppX", None),  # another application
    ("/prweb/PRChat/app/AcmeSelfService", None),
    ("192.0.2.0/24", "uses the documentation network 192.0.2.0/24"),
    ("10.0.0.0/8, 198.51.100.7", "uses 198.51.100.7 (in the documentation network 198.51.100.0/24)"),
    ("203.0.113.0/28", "uses 203.0.113.0/28 (in the documentation network 203.0.113.0/24)"),
    ("2001:db8::/48\n::1", "uses 2001:db8::/48 (in the documentation network 2001:db8::/32)"),
    ("::ffff:192.0.2.9", "uses ::ffff:192.0.2.9 (in the documentation network 192.0.2.0/24)"),
    ("192.0.0.0/16", None),  # holds a documentation network, but is not one
    ("10.20.0.0/16, 127.0.0.1, ::1, 0.0.0.0/0, ::/0", None),
    ("tcp:8443:interface=127.0.0.1", None),
    ("tls/localhost.crt", None),
    ("http://127.0.0.1:8081", None),
    ("https://www.example.com, 192.0.2.1",
     "uses the example domain www.example.com and 192.0.2.1 (in the documentation network 192.0.2.0/24)"),
]


@pytest.mark.parametrize("text, expected", GENERIC)
def test_generic_reasons(text, expected):
    """Example domains (and subdomains, wildcards, file names), mycompany
    hosts, MySelfServiceApp as a whole name, and addresses or networks inside
    the documentation networks are placeholders whatever the option;
    look-alikes, private networks and loopback are not."""
    assert generic_reason(text) == expected


# ---------------------------------------------------------------------------
# A profile's SITE: values


def test_site_value_still_as_shipped_is_reported_first():
    """A SITE: value still as the profile ships it is reported as the
    profile's example (one line per option, even when a generic rule would
    also match), in the order of the values."""
    values = [value("listen:public", "endpoint", "tcp:443"),
              value("filter:origins", "allow", "https://www.example.com\nhttps://chat.example.com"),
              value("route:x", "path", "/a")]
    found = find_placeholders(values, [TOY])
    assert [(p.value.option, p.reason) for p in found] == [
        ("endpoint", "is the profile's example value (SITE:)"),
        ("allow", "is the profile's example value (SITE:)"),
    ]


def test_site_value_written_another_way_is_still_the_shipped_one():
    """A list value is compared item by item: commas instead of newlines is
    the same value."""
    values = [value("listen:public", "endpoint", "tcp:443"),
              value("filter:origins", "allow", "https://www.example.com, https://chat.example.com")]
    assert len(find_placeholders(values, [TOY])) == 2


def test_site_value_replaced_by_a_later_file_is_not_reported():
    """A SITE: option set again by a later file is the site's decision, even
    with the shipped text (tcp:443); a new value is still judged by the
    generic rules, naming the file that set it."""
    values = [value("listen:public", "endpoint", "tcp:443", "site.ini", ("toy.ini",)),
              value("filter:origins", "allow", "https://www.example.org", "site.ini", ("toy.ini",))]
    found = find_placeholders(values, [TOY])
    assert [(p.value.file, p.value.option, p.reason) for p in found] == [
        ("site.ini", "allow", "uses the example domain www.example.org")]


def test_site_value_changed_in_a_copy_is_not_reported():
    """A copy of the profile edited in place: the edited values are not
    reported, those left as shipped are."""
    values = [value("listen:public", "endpoint", "tcp:8443"),
              value("filter:origins", "allow", "https://www.example.com\nhttps://chat.example.com")]
    assert [p.value.option for p in find_placeholders(values, [TOY])] == ["allow"]


def test_site_values_apply_only_to_a_configuration_built_on_the_profile():
    """A configuration that does not set every option the profile marks is not
    built on it: its [listen:public] endpoint = tcp:443 is nobody's example."""
    values = [value("listen:public", "endpoint", "tcp:443", "own.ini")]
    assert find_placeholders(values, [TOY]) == []


def test_placeholder_line_names_file_section_and_option():
    """A placeholder reads FILE [SECTION] OPTION: VALUE REASON, a list value
    on one line, a long one cut at 100 characters."""
    placeholder = Placeholder(value("filter:origins", "allow", "https://a.example.com\nhttps://b.example.com"),
                              "uses the example domains a.example.com, b.example.com")
    assert str(placeholder) == ("toy.ini [filter:origins] allow: https://a.example.com, https://b.example.com "
                                "uses the example domains a.example.com, b.example.com")
    long = Placeholder(value("route:r", "path", "/" + "a" * 200), "why")
    assert str(long) == "toy.ini [route:r] path: /" + "a" * 99 + "... why"


ETC = Path(__file__).resolve().parent.parent / "etc"
_SECTION = re.compile(r"\[([^\]]+)\]\s*")
_OPTION = re.compile(r"([A-Za-z0-9_]+)\s*[=:]")


def site_comments(path: Path) -> tuple[set[tuple[str, str]], set[tuple[str, str]]]:
    """What the ``# SITE:`` comments of a profile mark, read from its lines:
    the option right after each such comment, and every option of a block (the
    comment and option lines between blank lines) that holds such a comment
    (a comment may cover the next few options: "the certificate ... and its
    key"). Comments before the first section (the file's introduction) and
    ``# SITE (optional):`` ones are left out."""
    lines = path.read_text().splitlines()
    first: set[tuple[str, str]] = set()
    covered: set[tuple[str, str]] = set()
    section = None
    block: list[str] = []
    marked = False
    for index, line in enumerate(lines):
        if not line.strip() or _SECTION.fullmatch(line):
            block, marked = [], False
            if line.strip():
                section = _SECTION.fullmatch(line).group(1)  # type: ignore[union-attr]
            continue
        if section is None:
            continue
        if line.startswith("# SITE:"):
            marked = True
            following = next(later for later in lines[index + 1:] if not later.startswith("#"))
            first.add((section, _OPTION.match(following).group(1).lower()))  # type: ignore[union-attr]
        option = _OPTION.match(line)
        if option is not None:
            block.append(option.group(1).lower())
        if marked:
            covered.update((section, name) for name in block)
    return first, covered


@pytest.mark.parametrize("profile", PROFILES, ids=[p.name for p in PROFILES])
def test_profiles_table_agrees_with_the_site_comments(profile: Profile):
    """The table agrees with each shipped profile: the option right after every
    SITE: comment is in it; every option in it stands in a block a SITE:
    comment opens (so "the certificate ... and its key" covers key); each
    option once; with the text the file ships with (compared item by item, as
    the rule compares them)."""
    path = ETC / profile.name
    first, covered = site_comments(path)
    keys = [(site.section, site.option) for site in profile.site_values]
    assert len(keys) == len(set(keys))
    assert first <= set(keys), f"SITE: options missing from chatproxy/config/placeholders.py: {first - set(keys)}"
    assert set(keys) <= covered, f"options in the table without a SITE: comment: {set(keys) - covered}"
    shipped = read_profile(profile.name.removesuffix(".ini"))
    for site in profile.site_values:
        assert parse_list(shipped[site.section][site.option]) == parse_list(site.text), site


def test_profiles_table_names_the_shipped_files():
    """The table covers the three shipped profiles of etc/."""
    assert sorted(p.name for p in PROFILES) == sorted(f.name for f in ETC.glob("*.ini") if f.name != "chatproxy.ini")


# ---------------------------------------------------------------------------
# The raw values load_config exposes


def test_load_config_exposes_located_raw_values(tmp_path: Path):
    """Config.raw_values holds one value per option in force with the file that
    set it, the text as written, and the earlier files it replaced."""
    base = tmp_path / "base.ini"
    base.write_text(textwrap.dedent("""\
        [listen:main]
        endpoint = tcp:8080:interface=127.0.0.1
        allow =
            10.0.0.0/8
            192.0.2.0/24

        [upstream:app]
        servers = http://127.0.0.1:9

        [route:all]
        upstream = app
        """))
    middle = tmp_path / "middle.ini"
    middle.write_text("[listen:main]\nendpoint = tcp:8081:interface=127.0.0.1\n")
    site = tmp_path / "site.ini"
    site.write_text("[listen:main]\nendpoint = tcp:8082:interface=127.0.0.1\n")
    config = load_config([base, middle, site])
    assert config.raw_values == (
        RawValue(str(site), "listen:main", "endpoint", "tcp:8082:interface=127.0.0.1", (str(base), str(middle))),
        RawValue(str(base), "listen:main", "allow", "10.0.0.0/8\n192.0.2.0/24"),
        RawValue(str(base), "upstream:app", "servers", "http://127.0.0.1:9"),
        RawValue(str(base), "route:all", "upstream", "app"),
    )
    assert [str(p) for p in find_placeholders(config.raw_values)] == [
        f"{base} [listen:main] allow: 10.0.0.0/8, 192.0.2.0/24 uses the documentation network 192.0.2.0/24"]
