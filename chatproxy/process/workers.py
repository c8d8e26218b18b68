"""``workers = N``: a master process and N worker processes, one reactor each.

The master does not proxy.  It binds the listeners' TCP sockets, starts N
workers (``twistd chatproxy`` with the same ``--config`` arguments and
``CHATPROXY_WORKER=k`` in their environment), each of which accepts on
its own socket for every listener, bound and kept by the master (see
:mod:`chatproxy.process.sharing`), and it:

- restarts a worker that dies (after a short, growing pause if they keep
  dying); a worker that dies before it ever served stops everything: the
  configuration cannot be served, so the master exits with that worker's
  status;
- passes SIGHUP on to every worker (each reloads as a single process would)
  after checking the new configuration itself, and starts or stops workers
  when ``workers`` changed;
- on SIGTERM passes the drain on and exits 0 once every worker has;
- speaks for all of them to systemd: workers send their sd_notify states to
  a socket of the master's, which reports ``READY=1`` once every worker is
  ready, ``RELOADING=1`` and ``READY=1`` around a reload, ``STOPPING=1``;
- runs the demo upstream (one chat room for everybody) and the ``[admin]``
  listener, whose ``/metrics`` and ``/readyz`` gather each worker's (every
  series gets a ``worker`` label).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import stat
import sys
import tempfile
import time
from typing import Any, Collection, Sequence

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure
from twisted.scripts.twistd import run as run_twistd

from chatproxy.config import Config, ConfigError, Listener, load_config
from chatproxy.demo import demo_site
from chatproxy.process.environment import MASTER_PID_ENV, WORKER_DIR_ENV, WORKER_ENV
from chatproxy.process.lifecycle import (StartupError, announce_build, announce_refused_reload, default_reactor,
                                         ensure_certificate, handle_drain_and_reload, state_directory)
from chatproxy.process.master_admin import master_admin_site
from chatproxy.process.notify import NotifyReceiver, notify_reloading, sd_notify
from chatproxy.proxy.validate import validate
from chatproxy.process.quiet import quiet_twisted_chatter
from chatproxy.process.renewal import Renewer
from chatproxy.process.stapler import Stapler
from chatproxy.proxy.staples import StapleStore
from chatproxy.process.sharing import BROKER_SOCKET, bind_listening, can_share, endpoint_kind, socket_identity
from chatproxy.process.steering import attach as attach_steering

log = Logger()

#: A worker that keeps dying is restarted after this pause, doubled per death in a row, at most MAX.
RESTART_PAUSE = 0.5
MAX_RESTART_PAUSE = 30.0
#: Dying after serving this long resets the pause.
STABLE_AFTER = 60.0
#: How long the master waits for every worker to report a reload.
RELOAD_DEADLINE = 60.0


def unshareable(config: Config) -> str | None:
    """Why several workers cannot serve ``config`` (a listener they cannot share), or None."""
    for name, listener in config.listeners.items():
        if not can_share(listener.endpoint):
            return (f"[listen:{name}] endpoint: {listener.endpoint} cannot be shared by several worker processes "
                    "(tcp:, tcp6:, haproxy:tcp: and systemd: can); set [chatproxy] workers = 1")
    return None


def worker_count(config: Config) -> int:
    """How many workers ``workers`` asks for (``auto``: one per CPU)."""
    return config.settings.workers or os.cpu_count() or 1


def worker_main() -> None:
    """A worker process's entry point: ``twistd`` (its arguments follow), set
    to receive SIGTERM when the master dies however it dies, so that no
    worker outlives its master (Linux's ``PR_SET_PDEATHSIG``)."""
    # SIGHUP's default is to terminate: until the service installs its
    # handler (before it listens), a reload must not kill the worker.
    # The master sends it again once the worker is ready.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # SIGUSR1 (new certificates or OCSP responses on disk) too: a worker
    # starting reads them anyway.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    master = os.environ.get(MASTER_PID_ENV, "")
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass
    if master and str(os.getppid()) != master:  # the master died before prctl took effect
        raise SystemExit(1)
    sys.argv[0] = "twistd"
    run_twistd()


_PR_SET_PDEATHSIG = 1


def _logger_args(argv: Sequence[str]) -> list[str]:
    """The master's ``--logger`` option (twistd's, before ``chatproxy``), for
    its workers to log the same way (``chatproxy.process.journal.observer`` under
    systemd); without one, workers log to standard output, which they share,
    through :func:`chatproxy.process.quiet.worker_observer` (without the start
    lines their master already wrote)."""
    before = list(argv[1:argv.index("chatproxy")] if "chatproxy" in argv else argv[1:])
    for i, arg in enumerate(before):
        if arg.startswith("--logger="):
            return [arg]
        if arg == "--logger" and i + 1 < len(before):
            return [arg, before[i + 1]]
    return ["--logger=chatproxy.process.quiet.worker_observer"]


def _systemd_sockets(env: dict[str, str]) -> int:
    """How many sockets systemd passed to this process (fds 3, 4, ...).

    Twisted's ``systemd:`` endpoint parser reads ``LISTEN_FDS`` and
    ``LISTEN_PID`` when it is imported and removes them from the environment;
    ``LISTEN_FDNAMES`` stays, one name per socket, so the count comes from it
    then.  Only descriptors that are open sockets count."""
    if env.get("LISTEN_PID") == str(os.getpid()):
        count = int(env.get("LISTEN_FDS", "0") or 0)
    elif "LISTEN_PID" not in env and env.get("LISTEN_FDNAMES"):
        count = len(env["LISTEN_FDNAMES"].split(":"))
    else:
        return 0
    for fd in range(3, 3 + count):
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                return 0
        except OSError:
            return 0
    return count


class _Worker(ProcessProtocol):
    """One worker process, as the master sees it."""

    def __init__(self, master: Master, index: int) -> None:
        self.master = master
        self.index = index
        self.pid = 0
        self.ready = False  # sent READY=1 since it started or since the last reload began
        self.served = False  # has been ready at least once
        self.started = time.monotonic()
        self.status = ""
        self.ended = False
        self.reload_pending = False  # SIGHUP it once it is ready (it was starting when a reload came)
        self.tls_pending = False  # SIGUSR1 it once it is ready (new certificates or staples came meanwhile)

    def connectionMade(self) -> None:
        self.pid = int(self.transport.pid)  # type: ignore[union-attr]
        self.transport.closeStdin()  # type: ignore[union-attr]

    def processEnded(self, reason: Failure) -> None:
        self.ended = True
        value: Any = reason.value
        self.master.worker_ended(self, getattr(value, "exitCode", None), getattr(value, "signal", None))

    def signal(self, name: str | int) -> None:
        """Send a signal (``HUP``, ``TERM``, ``KILL``, or a number) if it still runs."""
        if not self.ended and self.transport is not None:
            try:
                self.transport.signalProcess(name)  # type: ignore[attr-defined]
            except Exception:  # already gone
                pass


class _SocketBroker(LineOnlyReceiver):
    """Hands a worker the master's listening socket for the endpoint it names."""

    delimiter = b"\n"

    def __init__(self, master: Master) -> None:
        self.master = master

    def lineReceived(self, line: bytes) -> None:
        try:
            worker, endpoint = line.decode("utf-8").split(" ", 1)
            sock = self.master.listening_socket(endpoint, int(worker))
        except (OSError, ValueError) as e:
            self.sendLine(f"ERR {e}".encode("utf-8", "replace"))
        else:
            self.transport.sendFileDescriptor(sock.fileno())  # type: ignore[union-attr]
            self.sendLine(f"OK {int(sock.family)}".encode("ascii"))
        self.transport.loseConnection()  # type: ignore[union-attr]


class Master(Service):
    """Starts, watches and signals the worker processes; see the module docstring."""

    def __init__(self, config: Config, config_paths: Sequence[str], reactor: Any = None,
                 twistd_args: Sequence[str] = ()) -> None:
        self.reactor = reactor if reactor is not None else default_reactor()
        self.config = config
        self.config_paths = [os.path.abspath(path) for path in config_paths]  # workers may start elsewhere
        self.twistd_args = list(twistd_args) if twistd_args else _logger_args(sys.argv)
        self.workers: dict[int, _Worker] = {}
        self.restarts = 0
        self._deaths_in_a_row: dict[int, int] = {}
        self.directory = ""
        self.ports: dict[str, Any] = {}
        self._draining = False
        self._reloading = False
        self._announced: set[tuple[str, str, bool]] = set()  # listeners logged as listening
        self._ready_sent = False
        self._exit_status = 0
        self.reloads: dict[str, int] = {"success": 0, "failure": 0}
        self._privileged_done = False
        # (socket identity of the endpoint, worker number) -> that worker's listening socket (SO_REUSEPORT)
        self.sockets: dict[tuple[str, int], socket.socket] = {}
        self._reload_generation = 0
        self._reload_again = False
        # The master fetches OCSP responses (and ACME certificates) for its
        # workers, stores them on disk and tells the workers (SIGUSR1).
        self.stapler = Stapler(self.reactor, StapleStore(state_directory(config, "ocsp")), self.tls_changed)
        self.renewer = Renewer(self.reactor, state_directory(config), self.tls_changed)

    @property
    def draining(self) -> bool:
        """Whether SIGTERM started the drain (the admin listener says 503 "draining" meanwhile)."""
        return self._draining

    @property
    def count(self) -> int:
        """How many workers the configuration in force asks for."""
        return worker_count(self.config)

    # -- start

    def privilegedStartService(self) -> None:
        """Create self-signed certificates and open the demo and admin
        listeners (before twistd drops privileges, like a single process).
        SIGTERM and SIGHUP drain and reload from now on."""
        self._privileged_done = True
        quiet_twisted_chatter()
        handle_drain_and_reload(self.reactor, self.drain, self.reload)
        try:
            self._bind_listeners(self.config)
            for listener in self.config.listeners.values():
                if listener.tls:
                    ensure_certificate(listener)  # once, before the workers load it
            if self.config.demo is not None:
                self.ports["demo"] = self._listen("[demo]", self.config.demo.endpoint, demo_site())
                log.info("demo chat upstream listening on {endpoint}", endpoint=self.config.demo.endpoint)
            if self.config.admin is not None:
                self.ports["admin"] = self._listen("[admin]", self.config.admin.endpoint, master_admin_site(self))
                log.info("[admin] health and metrics of all workers on {endpoint}", endpoint=self.config.admin.endpoint)
        except (_ListenError, StartupError) as e:
            for port in self.ports.values():
                port.stopListening()
            self._close_sockets()
            sys.stderr.write(f"chatproxy: {e}\n")
            sys.stderr.flush()
            raise SystemExit(1) from None
        super().privilegedStartService()

    def _bind_listeners(self, config: Config) -> None:
        """Bind every worker's listening socket for ``config``'s TCP listeners
        (those not bound yet).  Raises StartupError."""
        for name, listener in config.listeners.items():
            announced = (name, listener.endpoint, listener.tls)
            if announced not in self._announced:
                self._announced.add(announced)
                log.info("[listen:{name}] listening on {endpoint}{tls} (every worker)", name=name,
                         endpoint=listener.endpoint, tls=" with TLS" if listener.tls else "")
            if endpoint_kind(listener.endpoint) == "systemd":
                continue
            try:
                for index in range(1, worker_count(config) + 1):
                    self.listening_socket(listener.endpoint, index)
            except (OSError, ValueError) as e:
                raise StartupError(f"[listen:{name}]: cannot listen on {listener.endpoint}: {e}") from None
            self._steer(name, listener, worker_count(config))

    def _steer(self, name: str, listener: Listener, workers: int) -> None:
        """Send each client address to one worker on a TLS listener clients
        reach directly (so TLS sessions resume), each connection its own way
        elsewhere (no session to resume, or every connection from one load
        balancer): see :mod:`chatproxy.process.steering`."""
        by_connection = not listener.tls or endpoint_kind(listener.endpoint) == "haproxy"
        try:
            attach_steering(self.listening_socket(listener.endpoint, 1), workers, client_ports=by_connection)
        except OSError as e:
            log.warn("[listen:{name}] cannot steer connections to workers ({error}): the kernel spreads them, "
                     "and a worker that a reload retires may still be handed some; a client that reconnects "
                     "may reach another worker and not resume its TLS session", name=name, error=e)

    def listening_socket(self, endpoint: str, worker: int) -> socket.socket:
        """Worker ``worker``'s listening socket for a TCP endpoint string, bound now if need be."""
        identity = socket_identity(self.reactor, endpoint)
        sock = self.sockets.get((identity, worker))
        if sock is None:
            first = not any(bound == identity for bound, _ in self.sockets)
            sock = self.sockets[(identity, worker)] = bind_listening(self.reactor, endpoint, probe=first)
        return sock

    def _close_sockets(self, keep: Collection[str] = (), workers: int = 0) -> None:
        """Close the master's listening sockets for endpoints (socket identities) not in ``keep``
        or workers above ``workers`` (a worker closes its own copy when it no
        longer uses it)."""
        for endpoint, index in list(self.sockets):
            if endpoint not in keep or index > workers:
                self.sockets.pop((endpoint, index)).close()

    def _listen(self, section: str, endpoint: str, factory: Any) -> Any:
        outcome: list[Any] = []
        serverFromString(self.reactor, endpoint).listen(factory).addBoth(outcome.append)
        if not outcome or isinstance(outcome[0], Failure):
            reason = outcome[0].getErrorMessage() if outcome else "did not open at once"
            raise _ListenError(f"{section}: cannot listen on {endpoint}: {reason}")
        return outcome[0]

    def startService(self) -> None:
        """Make the private directory and notify socket (as the user the
        workers run as), start the workers; SIGHUP and SIGTERM are passed on."""
        if not self._privileged_done:
            self.privilegedStartService()
        self.directory = tempfile.mkdtemp(prefix="chatproxy-")
        os.chmod(self.directory, 0o700)
        self.ports["notify"] = self.reactor.listenUNIXDatagram(os.path.join(self.directory, "notify"),
                                                               NotifyReceiver(self.worker_state))
        broker = Factory.forProtocol(lambda: _SocketBroker(self))
        broker.noisy = False
        self.ports["sockets"] = self.reactor.listenUNIX(os.path.join(self.directory, BROKER_SOCKET), broker, mode=0o600)
        super().startService()
        announce_build()
        log.info("starting {count} worker processes", count=self.count)
        for index in range(1, self.count + 1):
            self._spawn(index)
        self.stapler.update(self.config)
        self.renewer.update(self.config)
        if hasattr(self.reactor, "callWhenRunning"):
            # After the reactor installed its own signal handlers, so ours win.
            self.reactor.callWhenRunning(handle_drain_and_reload, self.reactor, self.drain, self.reload)

    def _spawn(self, index: int) -> None:
        worker = _Worker(self, index)
        self.workers[index] = worker
        env = dict(os.environ)
        env.update({WORKER_ENV: str(index), WORKER_DIR_ENV: self.directory, "PYTHONUNBUFFERED": "1",
                    MASTER_PID_ENV: str(os.getpid()),
                    "NOTIFY_SOCKET": os.path.join(self.directory, "notify")})
        child_fds: dict[int, Any] = {0: "w", 1: 1, 2: 2}
        inherited = _systemd_sockets(env)
        for fd in range(3, 3 + inherited):  # sockets systemd passed: every worker accepts on them
            child_fds[fd] = fd
        for name in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
            env.pop(name, None)
        if inherited:
            # LISTEN_PID names the master: a worker reads these as its own (chatproxy.process.sharing).
            env.update(LISTEN_FDS=str(inherited), LISTEN_PID=str(os.getpid()),
                       LISTEN_FDNAMES=os.environ.get("LISTEN_FDNAMES", ""))
        args = [sys.executable, "-c", "from chatproxy.process.workers import worker_main; worker_main()",
                "--nodaemon", "--pidfile=", *self.twistd_args, "chatproxy"]
        for path in self.config_paths:
            args += ["--config", path]
        self.reactor.spawnProcess(worker, sys.executable, args, env=env, childFDs=child_fds)
        log.info("worker {index} started (pid {pid})", index=index, pid=worker.pid)

    # -- what workers say

    def worker_state(self, fields: dict[str, str]) -> None:
        """A worker's sd_notify message."""
        try:
            worker = self.workers[int(fields.get(WORKER_ENV, "0"))]
        except (KeyError, ValueError):
            return
        if "STATUS" in fields:
            worker.status = fields["STATUS"]
        if fields.get("RELOADING") == "1":
            worker.ready = False
        if fields.get("READY") == "1":
            worker.ready = True
            worker.served = True
            if worker.tls_pending:
                worker.tls_pending = False
                worker.signal(signal.SIGUSR1)
            if worker.reload_pending:
                # It was starting when the reload came: it reloads now, as it may have read the old files.
                worker.reload_pending = False
                worker.ready = False
                worker.signal("HUP")
                return
            self._check_ready()

    def _check_ready(self) -> None:
        if self._draining or not all(w.ready for w in self.workers.values()) or len(self.workers) < self.count:
            return
        if self._reloading:
            self._reloading = False
            refused = [w.index for w in self.workers.values() if w.status.startswith("reload refused")]
            self.reloads["failure" if refused else "success"] += 1
            if refused:
                log.error("reload refused by worker(s) {workers}; they keep the previous configuration",
                          workers=", ".join(map(str, refused)))
            else:
                log.info("reload done in all {count} workers", count=len(self.workers))
            if self._reload_again:
                self._reload_again = False
                self.reactor.callLater(0, self.reload)
        elif self._ready_sent:
            return
        self._ready_sent = True
        sd_notify(f"READY=1\nSTATUS=serving with {len(self.workers)} workers: " + ", ".join(
            f"[listen:{name}] {listener.endpoint}" for name, listener in self.config.listeners.items()))

    def tls_changed(self) -> None:
        """New certificates or OCSP responses are on disk: every worker reads
        them again (SIGUSR1).  A worker not ready yet (starting, reloading)
        gets the signal once it is: before it handles SIGUSR1 the signal
        would end it."""
        for worker in self.workers.values():
            if worker.ready:
                worker.signal(signal.SIGUSR1)  # Twisted knows only some signals by name
            else:
                worker.tls_pending = True

    def worker_ended(self, worker: _Worker, code: int | None, by_signal: int | None) -> None:
        """A worker exited: restart it, finish the drain, or give up."""
        if self.workers.get(worker.index) is not worker:
            return  # a surplus worker stopped after a reload
        how = f"status {code}" if by_signal is None else f"signal {by_signal}"
        if self._draining:
            del self.workers[worker.index]
            log.info("worker {index} exited ({how})", index=worker.index, how=how)
            if not self.workers:
                self._stop()
            return
        if not worker.served:
            log.error("worker {index} exited ({how}) before it could serve: stopping", index=worker.index, how=how)
            self._exit_status = code if code else 1
            self._draining = True
            del self.workers[worker.index]
            self._forget_ended()
            for other in self.workers.values():
                other.signal("TERM")
            if not self.workers:
                self._stop()
            else:
                self.reactor.callLater(self.config.settings.drain_timeout + 10, self._kill_stragglers)
            return
        pause = self._restart_pause(worker, stable=time.monotonic() - worker.started > STABLE_AFTER)
        log.warn("worker {index} (pid {pid}) died ({how}); restarting it in {pause:g}s",
                 index=worker.index, pid=worker.pid, how=how, pause=pause)
        self.restarts += 1
        self.reactor.callLater(pause, self._respawn, worker)

    def _respawn(self, worker: _Worker) -> None:
        if self._draining or self.workers.get(worker.index) is not worker:
            return
        try:
            validate(load_config(self.config_paths))  # a worker reads the files as they are now
        except ConfigError as error:
            pause = self._restart_pause(worker, stable=False)
            log.error("worker {index} not restarted: the configuration files do not validate ({error}); "
                      "trying again in {pause:g}s", index=worker.index, error=str(error), pause=pause)
            self.reactor.callLater(pause, self._respawn, worker)
            return
        self._spawn(worker.index)
        self.workers[worker.index].served = True  # it served before: a later death restarts it again

    def _restart_pause(self, worker: _Worker, stable: bool) -> float:
        """How long to wait before (re)starting ``worker``: doubling with each
        failure in a row (reset when it had served a while: ``stable``)."""
        deaths = 0 if stable else self._deaths_in_a_row.get(worker.index, 0)
        self._deaths_in_a_row[worker.index] = deaths + 1
        return float(min(MAX_RESTART_PAUSE, RESTART_PAUSE * 2 ** deaths))

    def _forget_ended(self) -> None:
        """Drop workers that are dead and waiting for a restart (a drain will not restart them)."""
        for index, worker in list(self.workers.items()):
            if worker.ended:
                del self.workers[index]

    # -- reload and drain

    def reload(self) -> None:
        """SIGHUP: check the configuration, then have every worker reload it.
        A SIGHUP during a reload is applied once that one is done."""
        if self._draining:
            return
        if self._reloading:
            log.info("SIGHUP: a reload is in progress; the files will be read again once it is done")
            self._reload_again = True
            return
        notify_reloading()
        try:
            config = load_config(self.config_paths)
            validate(config)
        except ConfigError as error:
            self.reloads["failure"] += 1
            announce_refused_reload(f"configuration error: {error}")
            return
        wanted = worker_count(config)
        problem = unshareable(config) if wanted > 1 else None
        if problem is None:
            try:
                for listener in config.listeners.values():
                    if listener.tls:
                        ensure_certificate(listener)  # once, before the workers load it
                self._bind_listeners(config)
            except StartupError as error:
                problem = str(error)
        if problem is not None:
            self.reloads["failure"] += 1
            announce_refused_reload(problem)
            return
        self._reopen_master_listeners(self.config, config)
        self.config = config
        self.stapler.update(config)
        self.renewer.update(config)
        log.info("SIGHUP: reloading {count} workers", count=wanted)
        self._reloading = True
        self._reload_generation += 1
        self.reactor.callLater(RELOAD_DEADLINE, self._reload_overdue, self._reload_generation)
        for worker in list(self.workers.values()):
            if worker.index > wanted:
                del self.workers[worker.index]
                worker.signal("TERM")  # drains like a shutdown
            elif worker.ready:
                worker.ready = False
                worker.signal("HUP")
            elif not worker.ended:
                worker.reload_pending = True
        for index in range(1, wanted + 1):
            if index not in self.workers:
                self._spawn(index)
                self.workers[index].served = True  # one that fails to start is restarted, not fatal
        # The workers hold their own copies as long as they use them.
        self._close_sockets({socket_identity(self.reactor, listener.endpoint)
                             for listener in config.listeners.values()}, wanted)
        self._check_ready()

    def _reload_overdue(self, generation: int) -> None:
        """A reload some worker never answered: stop waiting for it."""
        if not self._reloading or generation != self._reload_generation:
            return
        silent = [w.index for w in self.workers.values() if not w.ready]
        self._reloading = False
        self.reloads["failure"] += 1
        log.error("reload: worker(s) {workers} did not report back within {deadline:g}s",
                  workers=", ".join(map(str, silent)), deadline=RELOAD_DEADLINE)
        sd_notify(f"READY=1\nSTATUS=reload incomplete: worker(s) {', '.join(map(str, silent))} did not answer")
        if self._reload_again:
            self._reload_again = False
            self.reactor.callLater(0, self.reload)

    def _reopen_master_listeners(self, old: Config, new: Config) -> None:
        """A reload that changed ``[demo]`` or ``[admin]``: the master's own listeners follow."""
        for key, before, after in (("demo", old.demo, new.demo), ("admin", old.admin, new.admin)):
            if before == after:
                continue
            port = self.ports.pop(key, None)
            closed: defer.Deferred[Any] = defer.maybeDeferred(port.stopListening) if port is not None \
                else defer.succeed(None)
            if after is not None:
                # Listen once the old socket is really closed (it may use the same port).
                closed.addCallback(self._reopen, key, after.endpoint)

    def _reopen(self, _: Any, key: str, endpoint: str) -> None:
        factory = demo_site() if key == "demo" else master_admin_site(self)
        try:
            self.ports[key] = self._listen(f"[{key}]", endpoint, factory)
            log.info("[{key}] now on {endpoint}", key=key, endpoint=endpoint)
        except _ListenError as e:
            log.error("reload: {error}", error=str(e))

    def drain(self) -> None:
        """SIGTERM: every worker drains; the master exits 0 when all are gone."""
        if self._draining:
            return
        self._draining = True
        self.stapler.stop()
        self.renewer.stop()
        timeout = self.config.settings.drain_timeout
        log.info("SIGTERM: draining {count} workers (up to {timeout}s)", count=len(self.workers), timeout=timeout)
        sd_notify(f"STOPPING=1\nSTATUS=draining (up to {timeout:g}s)")
        self._close_sockets()  # once the workers close theirs, new connections are refused
        self._forget_ended()
        if not self.workers:
            self._stop()
            return
        for worker in self.workers.values():
            worker.signal("TERM")
        self.reactor.callLater(timeout + 10, self._kill_stragglers)

    def _kill_stragglers(self) -> None:
        for worker in self.workers.values():
            log.warn("worker {index} did not finish draining: killed", index=worker.index)
            worker.signal("KILL")
        self.reactor.callLater(5, self._stop)  # even if a worker's end is never reported

    def _stop(self) -> None:
        if self._exit_status:
            status, directory = self._exit_status, self.directory

            def exit_with_status() -> None:
                shutil.rmtree(directory, ignore_errors=True)
                os._exit(status)

            self.reactor.addSystemEventTrigger("after", "shutdown", exit_with_status)
        if getattr(self.reactor, "running", False):
            self.reactor.stop()

    def stopService(self) -> defer.Deferred[Any]:
        """Stop the workers still running (a stop that is not a drain) and the master's listeners."""
        self.stapler.stop()
        self.renewer.stop()
        for worker in self.workers.values():
            worker.signal("TERM")
        stops = [defer.maybeDeferred(port.stopListening) for port in self.ports.values()]
        self.ports = {}
        self._close_sockets()
        if self.directory:
            self.reactor.addSystemEventTrigger("after", "shutdown", shutil.rmtree, self.directory, True)
        super().stopService()
        return defer.gatherResults(stops, consumeErrors=True)


class _ListenError(Exception):
    """The master cannot open the demo or admin listener."""
