"""What the benchmark measures: the upstream and the proxies in front of it.

Every server listens on 127.0.0.1 only, writes its configuration, pid file
and temporary files under the run's work directory, and logs to a file there.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from processes import Server, Supervisor
from sources import with_pythonpath

BENCH_DIR = Path(__file__).resolve().parent
PYTHON = sys.executable
TWISTD = str(Path(sys.executable).parent / "twistd")

#: The upstream's fixed response body (a small proxied response).
BODY = b"hello world\n"


@dataclass(frozen=True)
class Context:
    """Everything a target needs to start: where to put files, which ports."""

    supervisor: Supervisor
    workdir: Path
    nginx: str
    upstream_port: int
    certificate: Path
    key: Path
    #: ``workers`` for the chatproxy-*-workers targets (``--workers``, default one per CPU).
    workers: int = 1
    #: PYTHONPATH that runs the chatproxy of ``--baseline`` or ``--baseline-src`` (for the *-baseline targets).
    baseline_path: list[Path] | None = None
    #: Directives added to every nginx's main context (``nginx -g``), e.g. ``user root;``.
    nginx_directives: str = ""


@dataclass(frozen=True)
class Target:
    """One thing wrk drives: a proxy in front of the upstream, or the upstream itself."""

    name: str
    description: str
    tls: bool
    #: Starts the proxy on the given port; None for the upstream itself.
    start: Callable[[Context, int], Server] | None
    #: Runs ``--workers`` chatproxy workers, accepting on the master's listening socket.
    multi_worker: bool = False
    #: Runs the chatproxy of ``--baseline REV`` or ``--baseline-src DIR`` (only selected with one of them).
    baseline: bool = False

    @property
    def nginx_reference(self) -> str:
        """The nginx target this one is compared with (same transport)."""
        return "nginx-tls" if self.tls else "nginx"

    @property
    def one_worker_reference(self) -> str | None:
        """For a several-worker chatproxy target, the one-worker target it is compared with."""
        if not self.multi_worker:
            return None
        return "chatproxy-tls" if self.tls else "chatproxy"

    def listening_processes(self, ctx: Context) -> int:
        """How many processes hold the listening socket once the target is fully
        started: the master and each of its workers."""
        return ctx.workers + 1 if self.multi_worker else 1


# -- certificates


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed P-256 certificate for ``localhost``: (certificate, key)."""
    certificate, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-subj", "/CN=localhost", "-days", "2", "-keyout", str(key), "-out", str(certificate)],
        check=True, capture_output=True,
    )
    return certificate, key


# -- nginx


def _nginx_config(directory: Path, http_body: str, worker_connections: int = 4096) -> str:
    """A complete nginx.conf: one worker, no access log, everything under ``directory``."""
    temp = {kind: directory / kind for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")}
    return textwrap.dedent(f"""\
        worker_processes 1;
        daemon off;
        master_process on;
        pid {directory}/nginx.pid;
        error_log stderr warn;
        events {{
            worker_connections {worker_connections};
        }}
        http {{
            access_log off;
            client_body_temp_path {temp["client_body"]};
            proxy_temp_path {temp["proxy"]};
            fastcgi_temp_path {temp["fastcgi"]};
            uwsgi_temp_path {temp["uwsgi"]};
            scgi_temp_path {temp["scgi"]};
            # Steady-state keep-alive: do not close client connections every 1000 requests.
            keepalive_requests 1000000;
        """) + textwrap.indent(textwrap.dedent(http_body), "    ") + "}\n"


def _start_nginx(ctx: Context, name: str, http_body: str, worker_connections: int = 4096) -> Server:
    directory = ctx.workdir / name
    directory.mkdir(mode=0o755, exist_ok=True)
    config = directory / "nginx.conf"
    config.write_text(_nginx_config(directory, http_body, worker_connections))
    extra = ["-g", ctx.nginx_directives] if ctx.nginx_directives else []
    return ctx.supervisor.start(name, [ctx.nginx, "-p", str(directory), "-e", "stderr", "-c", str(config), *extra])


def start_upstream(ctx: Context) -> Server:
    """The upstream: nginx answering every request with :data:`BODY`."""
    body = BODY.decode("ascii").replace("\n", "\\n")
    return _start_nginx(ctx, "upstream", f"""\
        server {{
            listen 127.0.0.1:{ctx.upstream_port} backlog=4096;
            location / {{
                default_type text/plain;
                return 200 "{body}";
            }}
        }}
        """)


def _tls_listen(ctx: Context, tls: bool) -> str:
    if not tls:
        return ""
    return f"ssl_certificate {ctx.certificate};\n        ssl_certificate_key {ctx.key};\n"


def _start_nginx_proxy(ctx: Context, port: int, tls: bool) -> Server:
    return _start_nginx(ctx, "nginx-tls" if tls else "nginx", f"""\
        upstream app {{
            server 127.0.0.1:{ctx.upstream_port};
            keepalive 64;
            keepalive_requests 1000000;
        }}
        server {{
            listen 127.0.0.1:{port}{" ssl" if tls else ""} backlog=4096;
            {_tls_listen(ctx, tls)}
            location / {{
                proxy_pass http://app;
                proxy_http_version 1.1;
                proxy_set_header Connection "";
            }}
        }}
        """)


def start_nginx(ctx: Context, port: int) -> Server:
    """nginx (one worker) as a keep-alive reverse proxy in front of the upstream."""
    return _start_nginx_proxy(ctx, port, tls=False)


def start_nginx_tls(ctx: Context, port: int) -> Server:
    """The same nginx proxy, terminating TLS."""
    return _start_nginx_proxy(ctx, port, tls=True)


# -- chatproxy


def _chatproxy_config(ctx: Context, port: int, tls: bool, workers: int) -> str:
    tls_lines = f"tls = yes\ncertificate = {ctx.certificate}\nkey = {ctx.key}\n" if tls else ""
    return (
        f"[chatproxy]\naccess_log = off\nworkers = {workers}\n\n"
        f"[listen:main]\nendpoint = tcp:{port}:interface=127.0.0.1:backlog=4096\n{tls_lines}\n"
        f"[upstream:app]\nservers = http://127.0.0.1:{ctx.upstream_port}\nmax_idle_connections = 256\n\n"
        "[route:all]\npath = /\nupstream = app\n"
    )


def _start_chatproxy(ctx: Context, port: int, tls: bool, several: bool = False, baseline: bool = False) -> Server:
    name = ("chatproxy-tls" if tls else "chatproxy") + ("-workers" if several else "") + ("-baseline" if baseline else "")
    workers = ctx.workers if several else 1
    directory = ctx.workdir / name
    directory.mkdir(exist_ok=True)
    config = directory / "chatproxy.ini"
    config.write_text(_chatproxy_config(ctx, port, tls, workers))
    argv = [TWISTD, "-n", "--pidfile=", "chatproxy", "--config", str(config)]
    return ctx.supervisor.start(name, with_pythonpath(argv, ctx.baseline_path if baseline else None), cwd=directory)


def start_chatproxy(ctx: Context, port: int) -> Server:
    """One chatproxy process (``twistd -n chatproxy``, ``workers = 1``), plain HTTP listener."""
    return _start_chatproxy(ctx, port, tls=False)


def start_chatproxy_tls(ctx: Context, port: int) -> Server:
    """One chatproxy process (``workers = 1``) with a TLS listener."""
    return _start_chatproxy(ctx, port, tls=True)


def start_chatproxy_baseline(ctx: Context, port: int) -> Server:
    """``chatproxy`` as committed at ``--baseline REV`` (or from ``--baseline-src DIR``)."""
    return _start_chatproxy(ctx, port, tls=False, baseline=True)


def start_chatproxy_tls_baseline(ctx: Context, port: int) -> Server:
    """``chatproxy-tls`` as committed at ``--baseline REV`` (or from ``--baseline-src DIR``)."""
    return _start_chatproxy(ctx, port, tls=True, baseline=True)


def start_chatproxy_workers(ctx: Context, port: int) -> Server:
    """chatproxy with ``workers = ctx.workers``: a master and that many workers, plain HTTP listener.

    The workers are the master's children, in its process group, so stopping
    and CPU accounting (by process group) cover them."""
    return _start_chatproxy(ctx, port, tls=False, several=True)


def start_chatproxy_tls_workers(ctx: Context, port: int) -> Server:
    """chatproxy with ``workers = ctx.workers`` and a TLS listener."""
    return _start_chatproxy(ctx, port, tls=True, several=True)


# -- twisted.web.proxy.ReverseProxyResource


def start_twisted_rpr(ctx: Context, port: int) -> Server:
    """``twisted.web.proxy.ReverseProxyResource`` in one process (bench/baseline_reverse_proxy.py)."""
    script = BENCH_DIR / "baseline_reverse_proxy.py"
    return ctx.supervisor.start("twisted-rpr", [PYTHON, str(script), "--port", str(port),
                                                "--upstream-port", str(ctx.upstream_port)])


TARGETS: tuple[Target, ...] = (
    Target("direct", "wrk straight to the upstream (no proxy)", False, None),
    Target("nginx", "nginx, 1 worker, reverse proxy with upstream keepalive 64", False, start_nginx),
    Target("nginx-tls", "the same nginx proxy terminating TLS", True, start_nginx_tls),
    Target("chatproxy", "one chatproxy process (twistd, workers = 1), plain HTTP", False, start_chatproxy),
    Target("chatproxy-tls", "one chatproxy process (twistd, workers = 1), TLS", True, start_chatproxy_tls),
    Target("chatproxy-workers", "chatproxy, a master and --workers worker processes, plain HTTP", False,
           start_chatproxy_workers, multi_worker=True),
    Target("chatproxy-tls-workers", "chatproxy, a master and --workers worker processes, TLS", True,
           start_chatproxy_tls_workers, multi_worker=True),
    Target("chatproxy-baseline",
           "the chatproxy target as committed at --baseline REV (or from --baseline-src DIR)", False,
           start_chatproxy_baseline, baseline=True),
    Target("chatproxy-tls-baseline",
           "the chatproxy-tls target as committed at --baseline REV (or from --baseline-src DIR)", True,
           start_chatproxy_tls_baseline, baseline=True),
    Target("twisted-rpr", "twisted.web.proxy.ReverseProxyResource, one process", False, start_twisted_rpr),
)
