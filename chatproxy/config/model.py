"""The configuration model: frozen attrs values, built by the loader
(:mod:`chatproxy.config.loader`) and never changed afterwards."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from attrs import field, frozen

from chatproxy.config.values import Network, OptionText

__all__ = [
    "AcmeAccount",
    "Admin",
    "Config",
    "Demo",
    "FilterSpec",
    "Listener",
    "QueryRequirement",
    "RawValue",
    "Route",
    "Settings",
    "SniCertificate",
    "Upstream",
    "UpstreamServer",
    "WebSocketOptions",
]


@frozen
class Settings:
    """Process-wide settings from ``[chatproxy]``."""

    access_log: str | None = "-"
    access_log_format: str = "combined"
    max_header_bytes: int = 32768
    max_headers: int = 100
    max_url_bytes: int = 8192
    max_body_bytes: int = 10 * 1024 * 1024
    header_timeout: float = 15.0
    idle_timeout: float = 60.0
    drain_timeout: float = 30.0
    close_timeout: float = 5.0
    http2_max_streams: int = 100  # concurrent streams per HTTP/2 connection
    reload_close_window: float = 10.0
    workers: int = 0  # 0: one per CPU
    # Where chatproxy keeps what it makes: OCSP responses, ACME accounts and
    # challenges.  None: $STATE_DIRECTORY (systemd's StateDirectory=), else
    # "state" beside the first configuration file (see state_directory()).
    state_directory: Path | None = None


@frozen
class SniCertificate:
    """One extra certificate chosen when the client's SNI names ``host``."""

    host: str
    certificate: Path
    key: Path
    acme: str | None = None  # the [acme:NAME] that issues this certificate for ``host``


@frozen
class Listener:
    """A ``[listen:NAME]`` section: where clients connect and how."""

    name: str
    endpoint: str
    source: str
    tls: bool = False
    certificate: Path | None = None
    key: Path | None = None
    sni: tuple[SniCertificate, ...] = ()
    tls_profile: str = "intermediate"  # Mozilla's "intermediate" or "modern"
    min_tls_version: str | None = None  # None: the profile's
    ciphers: str | None = None  # None: the profile's TLS 1.2 suites
    groups: tuple[str, ...] | None = None  # None: the profile's key exchange groups
    create_self_signed: bool = False
    ocsp_stapling: bool = True
    acme: str | None = None  # the [acme:NAME] that issues ``certificate`` for ``acme_names``
    acme_names: tuple[str, ...] = ()
    redirect_to_https: bool = False  # plain listener: every request gets a redirect to https
    https_port: int = 443  # where redirect_to_https sends clients
    allow: tuple[Network, ...] | None = None
    trusted_proxies: tuple[Network, ...] = ()
    response_headers: tuple[tuple[bytes, bytes], ...] = ()  # on every answer this listener sends
    http2: bool = True  # ALPN offers h2 (TLS listeners)


@frozen
class UpstreamServer:
    """One server of an upstream: ``scheme://host:port``."""

    url: str
    scheme: str
    host: str
    port: int

    @property
    def tls(self) -> bool:
        """Whether this server is reached over TLS."""
        return self.scheme == "https"

    @property
    def authority(self) -> str:
        """``host[:port]`` as written in a Host header for this server."""
        default = 443 if self.tls else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"


@frozen
class Upstream:
    """An ``[upstream:NAME]`` section: the servers a route forwards to."""

    name: str
    servers: tuple[UpstreamServer, ...]
    verify: bool = True
    ca: Path | None = None
    client_certificate: Path | None = None
    client_key: Path | None = None
    host_header: str = "client"
    connect_timeout: float = 5.0
    response_timeout: float = 60.0
    max_idle_connections: int = 32
    idle_connection_timeout: float = 30.0
    health_check_path: str | None = None  # None: no active health checks
    health_check_interval: float = 5.0
    health_check_timeout: float = 2.0
    health_check_status: tuple[tuple[int, int], ...] = ((200, 399),)  # inclusive ranges
    healthy_threshold: int = 2
    unhealthy_threshold: int = 3
    sticky_cookie: str | None = None  # None: no sticky sessions


@frozen
class QueryRequirement:
    """A query parameter a route requires (``value`` None: present with any value)."""

    name: str
    value: str | None


@frozen
class WebSocketOptions:
    """How a route carries WebSocket sessions (bridge mode limits and liveness)."""

    mode: str = "bridge"  # "bridge" (Autobahn on both legs) or "tunnel" (bytes spliced)
    max_message_bytes: int = 16 * 1024 * 1024
    max_frame_bytes: int = 16 * 1024 * 1024
    max_buffered_bytes: int = 32 * 1024 * 1024
    ping_interval: float = 30.0  # 0: no pings
    ping_timeout: float = 10.0
    idle_timeout: float = 0.0  # 0: sessions may stay silent for ever
    max_messages_per_second: float = 0.0  # 0: no limit
    compression: bool = False


@frozen
class Route:
    """A ``[route:NAME]`` section: which requests go to which upstream."""

    name: str
    upstream: str
    order: int
    listeners: tuple[str, ...] | None = None
    hosts: tuple[str, ...] | None = None
    path: str = "/"
    path_regex: re.Pattern[str] | None = None
    query: tuple[QueryRequirement, ...] = ()
    methods: frozenset[str] | None = None
    rewrite_path: str | None = None
    filters: tuple[str, ...] = ()
    websocket: bool = False
    max_body_bytes: int | None = None
    ws: WebSocketOptions = WebSocketOptions()


@frozen
class FilterSpec:
    """A ``[filter:NAME]`` section: which kind (``use``), the options its
    ``build`` gets, and the generic options every section takes.

    The filter itself is not here: the data path builds it (once per
    :class:`~chatproxy.proxy.plan.Plan`, see :mod:`chatproxy.proxy.validate`).
    ``options`` are every option but ``use``, ``mode`` and
    ``refused_message``, each an :class:`~chatproxy.config.OptionText` that
    knows the directory of the file that set it; ``files`` says which file set
    each option of the section (the generic ones included) and ``source``
    where the section first appears, so that errors name them."""

    name: str
    kind: str
    options: Mapping[str, OptionText]
    mode: str = "enforce"  # "report": log and count what would be refused, let it pass
    # What a refusal by the WebSocket message hook does: "close" ends the
    # session (the hook's CloseSession), "drop" drops only that message.
    refused_message: str = "close"
    files: Mapping[str, str] = field(factory=dict, eq=False)
    source: str = field(default="", eq=False)

    def file_of(self, option: str | None) -> str | None:
        """The file to name in an error about ``option`` (None: about the
        section as a whole): the file that set it, else the section's first."""
        if option is not None and option in self.files:
            return self.files[option]
        return self.source or None


@frozen
class AcmeAccount:
    """An ``[acme:NAME]`` section: an ACME (RFC 8555) account at a CA that
    issues the certificates of listeners and SNI names that name it."""

    name: str
    directory: str  # the CA's directory URL
    source: str
    contact: tuple[str, ...] = ()  # mailto: URLs
    ca: Path | None = None  # the CA certificates that verify the directory's TLS (None: the system's)


@frozen
class Demo:
    """The ``[demo]`` section: the bundled demo chat upstream."""

    endpoint: str


@frozen
class Admin:
    """The ``[admin]`` section: health, metrics and status endpoints, and who may
    read ``/status`` and ``/metrics``: clients in ``allow`` (None: any that can
    connect), with basic auth when ``user`` is set (``password_hash`` as made by
    ``python -m chatproxy hash-password``; both or neither)."""

    endpoint: str = "tcp:9180:interface=127.0.0.1"
    allow: tuple[Network, ...] | None = None
    user: str | None = None
    password_hash: str | None = None


@frozen
class RawValue:
    """One option as the files set it: the text of the value in force (as
    written, before parsing), the file that set it, and the earlier files
    whose values for the same option it replaced (in load order)."""

    file: str
    section: str
    option: str
    text: str
    replaced: tuple[str, ...] = ()


@frozen
class Config:
    """The whole validated configuration.

    ``raw_values`` are the options it was built from, one per option in
    force, located by file, section and option (sections in the order they
    first appear, options in the order they were first set)."""

    sources: tuple[str, ...]
    settings: Settings
    listeners: Mapping[str, Listener]
    upstreams: Mapping[str, Upstream]
    routes: tuple[Route, ...]
    filters: Mapping[str, FilterSpec]
    demo: Demo | None = None
    admin: Admin | None = None
    acme: Mapping[str, AcmeAccount] = field(factory=dict)
    raw_values: tuple[RawValue, ...] = field(default=(), eq=False)
