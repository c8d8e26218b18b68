"""Example values left in a configuration: what ``python -m chatproxy check``
warns about, so that a profile's examples are not shipped by mistake.

The decision is a pure function of the loaded configuration's raw values
(:class:`chatproxy.config.RawValue`, located by file, section and option).
A value is an example placeholder when

- it is the value a shipped profile (``etc/*.ini``) marks ``SITE:``, still
  as shipped: the configuration uses that profile (it sets every option the
  profile marks) and no later file set the option again (a site file loaded
  after the profile replaces it, even with the same text);
- it names a host under ``example.com``, ``example.org`` or ``example.net``
  (the domains reserved for examples, RFC 2606), or a host with a label
  ``mycompany...`` (the profiles' placeholder company);
- it holds ``MySelfServiceApp``, the application name of Pega's examples;
- one of its items is an address or network inside a documentation network
  (``192.0.2.0/24``, ``198.51.100.0/24``, ``203.0.113.0/24``, RFC 5737;
  ``2001:db8::/32``, RFC 3849).

Options a profile marks ``SITE (optional):`` are defaults, not examples, and
are not listed here.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

from attrs import frozen

from chatproxy.config.model import RawValue
from chatproxy.config.values import Network, parse_list, parse_networks


@frozen
class SiteValue:
    """An option a shipped profile marks ``SITE:``, with the text it ships with."""

    section: str
    option: str
    text: str


@frozen
class Profile:
    """A shipped profile (``etc/NAME``) and the values it marks ``SITE:``."""

    name: str
    site_values: tuple[SiteValue, ...]


_NIL_UUID = "00000000-0000-0000-0000-000000000000"

# The SITE: values of etc/*.ini, as shipped. tests/test_cli.py checks that this
# table and the SITE: comments of the files agree.
PROFILES: tuple[Profile, ...] = (
    Profile("pega-chat.ini", (
        SiteValue("listen:public", "endpoint", "tcp:443"),
        SiteValue("listen:public", "certificate", "tls/chat.example.com.crt"),
        SiteValue("listen:public", "key", "tls/chat.example.com.key"),
        SiteValue("upstream:pega", "servers", "https://mycompany-prod.pegacloud.net"),
        SiteValue("filter:trusted-origins", "allow", "https://www.example.com\nhttps://chat.example.com"),
        SiteValue("route:pega-chat", "path", "/prweb/PRChat/app/MySelfServiceApp"),
        SiteValue("route:pega-push", "path", "/prweb/PRPushServlet/app/MySelfServiceApp"),
    )),
    Profile("pega-client-channel.ini", (
        SiteValue("listen:public", "endpoint", "tcp:443"),
        SiteValue("listen:public", "certificate", "tls/webhook.example.com.crt"),
        SiteValue("listen:public", "key", "tls/webhook.example.com.key"),
        SiteValue("listen:integration", "endpoint", "tcp:8080:interface=127.0.0.1"),
        SiteValue("listen:integration", "allow", "127.0.0.1, ::1"),
        SiteValue("upstream:integration", "servers", "http://10.0.0.20:8080"),
        SiteValue("upstream:digital-messaging", "servers", "https://digital-messaging.example.net"),
        SiteValue("filter:pega-token", "issuer", _NIL_UUID),
        SiteValue("filter:pega-token", "secret_file", "/etc/chatproxy/secrets/pega-client-channel.jwt"),
        SiteValue("route:client-webhook", "path", "/client-channel/webhook"),
        SiteValue("filter:sign-for-pega", "issuer", _NIL_UUID),
        SiteValue("filter:sign-for-pega", "secret_file", "/etc/chatproxy/secrets/pega-client-channel.jwt"),
        SiteValue("route:to-digital-messaging", "rewrite_path", f"/dms/client-channel/{_NIL_UUID}"),
    )),
    Profile("cobrowse.ini", (
        SiteValue("listen:public", "endpoint", "tcp:443"),
        SiteValue("listen:public", "certificate", "tls/cobrowse.example.com.crt"),
        SiteValue("listen:public", "key", "tls/cobrowse.example.com.key"),
        SiteValue("listen:agents", "endpoint", "tcp:8443"),
        SiteValue("listen:agents", "certificate", "tls/cobrowse.example.com.crt"),
        SiteValue("listen:agents", "key", "tls/cobrowse.example.com.key"),
        SiteValue("listen:agents", "allow", "10.20.0.0/16"),
        SiteValue("upstream:cobrowse", "servers", "https://cobrowse.internal.example.com"),
        SiteValue("filter:agent-networks", "allow", "10.20.0.0/16"),
    )),
)

# A host name under a domain reserved for examples (a leading "*." included),
# not preceded by another label character: "badexample.com" is not one.
_EXAMPLE_HOST = re.compile(r"(?<![a-z0-9.-])(?:\*\.)?(?:[a-z0-9-]+\.)*example\.(?:com|org|net)(?![a-z0-9-])",
                           re.IGNORECASE)
# A host name with a label that starts with "mycompany" (mycompany.com, mycompany-prod.pegacloud.net).
_PLACEHOLDER_HOST = re.compile(r"(?<![a-z0-9.-])(?:[a-z0-9-]+\.)*mycompany[a-z0-9-]*(?:\.[a-z0-9-]+)+",
                               re.IGNORECASE)
_PLACEHOLDER_APP = re.compile(r"(?<![a-z0-9])MySelfServiceApp(?![a-z0-9])", re.IGNORECASE)
DOCUMENTATION_NETWORKS: tuple[Network, ...] = (
    ipaddress.IPv4Network("192.0.2.0/24"),
    ipaddress.IPv4Network("198.51.100.0/24"),
    ipaddress.IPv4Network("203.0.113.0/24"),
    ipaddress.IPv6Network("2001:db8::/32"),
)


@frozen
class Placeholder:
    """A value that is still an example: where it is set and why it is one."""

    value: RawValue
    reason: str

    def __str__(self) -> str:
        items = ", ".join(parse_list(self.value.text)) or repr(self.value.text)
        shown = items if len(items) <= 100 else items[:100] + "..."
        return f"{self.value.file} [{self.value.section}] {self.value.option}: {shown} {self.reason}"


def _documentation_network(item: str) -> Network | None:
    """The documentation network an address or network item lies in, if any."""
    try:
        (network,) = parse_networks(item)
    except ValueError:
        return None
    first, last = int(network.network_address), int(network.broadcast_address)
    for documentation in DOCUMENTATION_NETWORKS:
        if (network.version == documentation.version and int(documentation.network_address) <= first
                and last <= int(documentation.broadcast_address)):
            return documentation
    return None


def _unique(found: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(found))


def generic_reason(text: str) -> str | None:
    """Why a value, whatever its option, is an example placeholder; None when it is not."""
    reasons = []
    hosts = _unique(m.group(0).lower() for m in _EXAMPLE_HOST.finditer(text))
    if hosts:
        reasons.append(f"the example domain{'s' if len(hosts) > 1 else ''} {', '.join(hosts)}")
    hosts = _unique(m.group(0).lower() for m in _PLACEHOLDER_HOST.finditer(text))
    if hosts:
        reasons.append(f"the placeholder host{'s' if len(hosts) > 1 else ''} {', '.join(hosts)}")
    if _PLACEHOLDER_APP.search(text):
        reasons.append("Pega's placeholder application name MySelfServiceApp")
    networks = []
    for item in parse_list(text):
        network = _documentation_network(item)
        if network is not None:
            networks.append(f"the documentation network {network}" if item == str(network)
                            else f"{item} (in the documentation network {network})")
    if networks:
        reasons.append(", ".join(_unique(networks)))
    return "uses " + " and ".join(reasons) if reasons else None


def profiles_in_use(values: Iterable[RawValue], profiles: Iterable[Profile] = PROFILES) -> list[Profile]:
    """The profiles a configuration is built on: those whose every ``SITE:``
    option it sets (in whichever file)."""
    present = {(value.section, value.option) for value in values}
    return [profile for profile in profiles
            if all((site.section, site.option) in present for site in profile.site_values)]


def find_placeholders(values: Iterable[RawValue], profiles: Iterable[Profile] = PROFILES) -> list[Placeholder]:
    """The values of a configuration that are still example placeholders, in
    the order of ``values``: one per option, a profile's ``SITE:`` value
    (still as shipped, not set again by a later file) before any other reason."""
    values = list(values)
    shipped: dict[tuple[str, str], list[list[str]]] = {}
    for profile in profiles_in_use(values, profiles):
        for site in profile.site_values:
            shipped.setdefault((site.section, site.option), []).append(parse_list(site.text))
    found = []
    for value in values:
        if not value.replaced and parse_list(value.text) in shipped.get((value.section, value.option), []):
            found.append(Placeholder(value, "is the profile's example value (SITE:)"))
            continue
        reason = generic_reason(value.text)
        if reason is not None:
            found.append(Placeholder(value, reason))
    return found
