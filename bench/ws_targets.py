"""What bench/ws_run.py measures: the WebSocket echo upstream and the proxies in front of it.

The upstream is a Node process (``bench/ws/echo_server.js``, the ``ws``
package) echoing every message.  The proxies: nginx (one worker) with the
usual WebSocket configuration, and chatproxy with a ``websocket = yes``
(bridge) or ``websocket = tunnel`` route.  Each proxy can listen with TLS
(wss) or without (ws); the upstream leg is always plain ws on 127.0.0.1.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from processes import BenchError, Server
from sources import with_pythonpath
from targets import BENCH_DIR, TWISTD, Context, _start_nginx

WS_DIR = BENCH_DIR / "ws"
ECHO_SERVER = WS_DIR / "echo_server.js"
LOAD = WS_DIR / "load.js"
#: The path the clients open (any path: every target routes / to the upstream).
WS_PATH = "/chat"


@dataclass(frozen=True)
class WsContext:
    """Everything a WebSocket target needs to start."""

    base: Context
    node: str
    #: The most connections a proxy must hold at once (client and upstream legs together).
    max_connections: int
    #: PYTHONPATH for chatproxy (an exported revision or another copy), or None for the working tree.
    chatproxy_path: list[Path] | None


@dataclass(frozen=True)
class WsTarget:
    """One thing the load generator drives: a proxy in front of the upstream, or the upstream itself."""

    name: str
    description: str
    #: Starts the proxy on the given port, with TLS or not; None for the upstream itself.
    start: Callable[[WsContext, int, bool], Server] | None


# -- tools


def find_node() -> str:
    """The path of ``node``; the ``ws`` package is installed into bench/ws/ with ``npm ci`` if missing."""
    node = shutil.which("node")
    if node is None:
        raise BenchError("node is not installed (Debian: apt-get install nodejs npm)")
    if not (WS_DIR / "node_modules" / "ws" / "package.json").exists():
        npm = shutil.which("npm")
        if npm is None:
            raise BenchError("npm is not installed, and bench/ws/node_modules is missing (apt-get install npm)")
        print("installing the ws package into bench/ws/node_modules with npm ci ...", flush=True)
        completed = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=WS_DIR, capture_output=True,
                                   text=True, timeout=300, check=False)
        if completed.returncode != 0:
            raise BenchError(f"npm ci failed in {WS_DIR}:\n{completed.stdout}{completed.stderr}")
    return node


# -- the upstream


def start_echo_upstream(ctx: WsContext) -> Server:
    """The upstream: one Node process echoing every WebSocket message (and answering GET / with BODY)."""
    return ctx.base.supervisor.start("upstream", [ctx.node, str(ECHO_SERVER), str(ctx.base.upstream_port)],
                                     cwd=WS_DIR)


# -- nginx


def start_nginx_ws(ctx: WsContext, port: int, tls: bool) -> Server:
    """nginx, one worker, proxying WebSocket upgrades to the upstream (the usual configuration)."""
    base = ctx.base
    tls_lines = f"ssl_certificate {base.certificate};\n        ssl_certificate_key {base.key};" if tls else ""
    return _start_nginx(base, "nginx-wss" if tls else "nginx-ws", f"""\
        map $http_upgrade $connection_upgrade {{
            default upgrade;
            ''      close;
        }}
        server {{
            listen 127.0.0.1:{port}{" ssl" if tls else ""} backlog=4096;
            {tls_lines}
            location / {{
                proxy_pass http://127.0.0.1:{base.upstream_port};
                proxy_http_version 1.1;
                proxy_set_header Upgrade $http_upgrade;
                proxy_set_header Connection $connection_upgrade;
                proxy_read_timeout 1h;
                proxy_send_timeout 1h;
            }}
        }}
        """, worker_connections=max(4096, ctx.max_connections * 3 // 2 + 1024))


# -- chatproxy


def chatproxy_config(upstream_port: int, port: int, mode: str, tls: bool, certificate: Path, key: Path,
                     single_worker: bool = True) -> str:
    """A chatproxy configuration with one WebSocket route; ``mode`` is ``bridge`` or ``tunnel``.

    ``single_worker``: write ``workers = 1`` (one process, as before ``workers`` existed;
    its default is one per CPU).  Off for a chatproxy that does not know the option."""
    tls_lines = f"tls = yes\ncertificate = {certificate}\nkey = {key}\n" if tls else ""
    websocket = "websocket = yes\nping_interval = 0\n" if mode == "bridge" else "websocket = tunnel\n"
    workers = "workers = 1\n" if single_worker else ""
    return (
        f"[chatproxy]\naccess_log = off\n{workers}\n"
        f"[listen:main]\nendpoint = tcp:{port}:interface=127.0.0.1:backlog=4096\n{tls_lines}\n"
        f"[upstream:ws]\nservers = http://127.0.0.1:{upstream_port}\n\n"
        f"[route:ws]\npath = /\nupstream = ws\n{websocket}"
    )


def _knows_workers(ctx: WsContext) -> bool:
    """Whether the chatproxy to run has the ``workers`` option (``--chatproxy-at`` may name an older one)."""
    sources = [BENCH_DIR.parent] if ctx.chatproxy_path is None else ctx.chatproxy_path
    return any((source / "chatproxy" / place / "workers.py").exists()
               for source in sources for place in (".", "process"))


def _start_chatproxy(ctx: WsContext, port: int, tls: bool, mode: str) -> Server:
    base = ctx.base
    name = f"chatproxy-{mode}" + ("-tls" if tls else "")
    directory = base.workdir / name
    directory.mkdir(exist_ok=True)
    config = directory / "chatproxy.ini"
    config.write_text(chatproxy_config(base.upstream_port, port, mode, tls, base.certificate, base.key,
                                       _knows_workers(ctx)))
    argv = with_pythonpath([TWISTD, "-n", "--pidfile=", "chatproxy", "--config", str(config)], ctx.chatproxy_path)
    return base.supervisor.start(name, argv, cwd=directory)


def start_chatproxy_bridge(ctx: WsContext, port: int, tls: bool) -> Server:
    """chatproxy, ``websocket = yes`` (bridge: Autobahn on both legs, messages relayed), no pings."""
    return _start_chatproxy(ctx, port, tls, "bridge")


def start_chatproxy_tunnel(ctx: WsContext, port: int, tls: bool) -> Server:
    """chatproxy, ``websocket = tunnel`` (the bytes after the 101 are spliced)."""
    return _start_chatproxy(ctx, port, tls, "tunnel")


WS_TARGETS: tuple[WsTarget, ...] = (
    WsTarget("direct", "the load generator straight to the echo upstream (no proxy)", None),
    WsTarget("nginx", "nginx, 1 worker, WebSocket proxying (Upgrade/Connection headers, HTTP/1.1)", start_nginx_ws),
    WsTarget("chatproxy-bridge", "one chatproxy process, websocket = yes (bridge), ping_interval = 0",
             start_chatproxy_bridge),
    WsTarget("chatproxy-tunnel", "one chatproxy process, websocket = tunnel (bytes spliced)", start_chatproxy_tunnel),
)
