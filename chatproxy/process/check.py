"""The ``check`` command: validate a configuration without starting anything,
print the listeners and routes it would serve, and warn (on standard error,
the exit status unchanged) about values still at a profile's examples.
:func:`main` also dispatches ``hash-password``
(:mod:`chatproxy.process.hash_password`)."""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from chatproxy.process import hash_password

from chatproxy.config import Config, ConfigError, Route, load_config
from chatproxy.config.placeholders import find_placeholders
from chatproxy.proxy.routing import RouteTable
from chatproxy.proxy.tls_profiles import listener_settings
from chatproxy.process.workers import unshareable, worker_count
from chatproxy.proxy.validate import validate


def describe_route(route: Route) -> str:
    """One line saying what a route matches and where it goes."""
    parts = [f"path_regex {route.path_regex.pattern}" if route.path_regex is not None else f"path {route.path}"]
    if route.query:
        parts.append("query " + "&".join(q.name if q.value is None else f"{q.name}={q.value}" for q in route.query))
    if route.hosts:
        parts.append("hosts " + ",".join(route.hosts))
    if route.methods:
        parts.append("methods " + ",".join(sorted(route.methods)))
    if route.listeners:
        parts.append("listeners " + ",".join(route.listeners))
    if route.websocket:
        parts.append(f"websocket ({route.ws.mode})")
    if route.rewrite_path:
        parts.append(f"rewrite to {route.rewrite_path}")
    if route.filters:
        parts.append("filters " + ",".join(route.filters))
    return f"  [route:{route.name}] " + ", ".join(parts) + f" -> upstream {route.upstream}"


def describe(config: Config, out: TextIO) -> None:
    """Print what the configuration would serve."""
    out.write("configuration OK: " + ", ".join(config.sources) + "\n")
    out.write("listeners:\n")
    for listener in config.listeners.values():
        extra = []
        if listener.tls:
            settings = listener_settings(listener)
            extra.append(f"TLS {settings.min_version}+ ({settings.profile}) certificate {listener.certificate}")
            if listener.create_self_signed and listener.certificate and not listener.certificate.exists():
                extra.append("(self-signed, created on first start)")
            if listener.acme is not None:
                extra.append(f"(ACME [acme:{listener.acme}] for {','.join(listener.acme_names)})")
            if listener.sni:
                extra.append("SNI " + ",".join(s.host + (f" (ACME [acme:{s.acme}])" if s.acme else "")
                                               for s in listener.sni))
        if listener.redirect_to_https:
            extra.append(f"redirects every request to https (port {listener.https_port})")
        if listener.allow is not None:
            extra.append("allow " + ",".join(str(n) for n in listener.allow))
        out.write(f"  [listen:{listener.name}] {listener.endpoint} {' '.join(extra)}".rstrip() + "\n")
    out.write("upstreams:\n")
    for upstream in config.upstreams.values():
        out.write(f"  [upstream:{upstream.name}] " + ", ".join(s.url for s in upstream.servers) + "\n")
    out.write("routes (most specific first; anything else gets 404):\n")
    for route in RouteTable(config.routes).routes:
        out.write(describe_route(route) + "\n")
    if config.admin is not None:
        guard = [f"allow {','.join(str(n) for n in config.admin.allow)}"] if config.admin.allow is not None else []
        guard += [f"basic auth as {config.admin.user}"] if config.admin.user is not None else []
        out.write(f"admin (healthz, readyz, metrics, status): {config.admin.endpoint}"
                  + (f" ({'; '.join(guard)})" if guard else "") + "\n")
    if config.demo is not None:
        out.write(f"demo upstream: {config.demo.endpoint}\n")
    count = worker_count(config)
    how = "workers = auto: one per CPU" if config.settings.workers == 0 else f"workers = {config.settings.workers}"
    out.write(f"processes: {'a master and ' + str(count) + ' workers' if count > 1 else 'one'} ({how})\n")


def main(argv: list[str], out: TextIO = sys.stdout, err: TextIO = sys.stderr, stdin: TextIO = sys.stdin) -> int:
    """Entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(prog="python -m chatproxy")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="validate a configuration and print what it serves")
    check.add_argument("--config", "-c", action="append", required=True, metavar="FILE",
                       help="an INI file or a directory of *.ini files (repeatable)")
    commands.add_parser("hash-password", help="print a password hash for [admin] password_hash (the password "
                                              "from standard input, or asked for on a terminal)")
    args = parser.parse_args(argv)
    if args.command == "hash-password":
        return hash_password.main(stdin, out, err)
    try:
        config = load_config(args.config)
        validate(config)
    except ConfigError as error:
        err.write(f"chatproxy: configuration error: {error}\n")
        return 2
    problem = unshareable(config) if worker_count(config) > 1 else None
    if problem is not None:  # twistd would refuse it the same way
        err.write(f"chatproxy: configuration error: {problem}\n")
        return 2
    describe(config, out)
    for placeholder in find_placeholders(config.raw_values):
        err.write(f"warning: {placeholder}\n")
    return 0
