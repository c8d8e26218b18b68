"""A thin binding to ModSecurity v3 (libmodsecurity) through its C API, with cffi.

The library is Debian's ``libmodsecurity3`` (``libmodsecurity.so.3``), opened
with :func:`cffi.FFI.dlopen` (cffi's ABI mode: nothing is compiled, and cffi
releases the GIL around every call into the library, so transactions run in
threads in parallel with the reactor).  Only the calls chatproxy needs are
declared: a process-wide engine with a log callback, rule sets loaded from
text and files, and one request transaction run from start to end
(:meth:`ModSecurity.run`).

What is decided about the configuration and the results is in
:mod:`chatproxy.filters.waf_setup` (no I/O); this module only talks to the
library.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from attrs import frozen
from cffi import FFI

__all__ = ["ENGINE_PACKAGE", "EngineMissing", "ModSecurity", "Response", "Rules", "RulesError", "Transaction", "engine"]

LIBRARY = "libmodsecurity.so.3"
ENGINE_PACKAGE = "libmodsecurity3"
"""The Debian package that installs :data:`LIBRARY`."""

_CDEF = """
typedef struct ModSecurity_t ModSecurity;
typedef struct Transaction_t Transaction;
typedef struct Rules_t RulesSet;
typedef struct {
    int status;
    int pause;
    char *url;
    char *log;
    int disruptive;
} ModSecurityIntervention;
typedef void (*ModSecLogCb)(void *, const void *);

ModSecurity *msc_init(void);
const char *msc_who_am_i(ModSecurity *msc);
void msc_set_connector_info(ModSecurity *msc, const char *connector);
void msc_set_log_cb(ModSecurity *msc, ModSecLogCb cb);

RulesSet *msc_create_rules_set(void);
int msc_rules_add(RulesSet *rules, const char *plain_rules, const char **error);
int msc_rules_add_file(RulesSet *rules, const char *file, const char **error);
int msc_rules_cleanup(RulesSet *rules);

Transaction *msc_new_transaction(ModSecurity *ms, RulesSet *rules, void *logCbData);
int msc_process_connection(Transaction *transaction, const char *client, int cPort, const char *server, int sPort);
int msc_process_uri(Transaction *transaction, const char *uri, const char *protocol, const char *http_version);
int msc_add_n_request_header(Transaction *transaction, const unsigned char *key, size_t len_key,
                             const unsigned char *value, size_t len_value);
int msc_process_request_headers(Transaction *transaction);
int msc_append_request_body(Transaction *transaction, const unsigned char *body, size_t size);
int msc_process_request_body(Transaction *transaction);
int msc_add_n_response_header(Transaction *transaction, const unsigned char *key, size_t len_key,
                              const unsigned char *value, size_t len_value);
int msc_process_response_headers(Transaction *transaction, int code, const char *protocol);
int msc_append_response_body(Transaction *transaction, const unsigned char *body, size_t size);
int msc_process_response_body(Transaction *transaction);
int msc_intervention(Transaction *transaction, ModSecurityIntervention *it);
int msc_process_logging(Transaction *transaction);
void msc_transaction_cleanup(Transaction *transaction);

void free(void *);
"""


class EngineMissing(Exception):
    """libmodsecurity cannot be loaded: the message says which package to install."""


class RulesError(Exception):
    """ModSecurity refused a configuration (its own message)."""


@frozen
class Response:
    """A response as the engine sees it: status, headers and the start of the
    body (``protocol`` as ModSecurity's connectors write it)."""

    status: int
    headers: Sequence[tuple[bytes, bytes]]
    body: bytes = b""
    protocol: str = "HTTP 1.1"


@frozen
class Transaction:
    """One HTTP request as the engine sees it.  ``body`` None: the request body
    phase runs without a body.  With a ``response``, the response phases run
    too (when the request phases did not intervene)."""

    method: str
    uri: bytes
    version: str
    headers: Sequence[tuple[bytes, bytes]]
    body: bytes | None = None
    client: str = "127.0.0.1"
    client_port: int = 0
    server: str = "127.0.0.1"
    server_port: int = 0
    response: Response | None = None


@frozen
class Outcome:
    """What the engine did with a transaction: the status of its intervention
    (None: none, the request may pass) and the log messages of the rules that
    matched, in order (ModSecurity's text form)."""

    status: int | None
    messages: tuple[str, ...]


class Rules:
    """A ModSecurity rule set (``RulesSet``), loaded piece by piece.  Read-only
    once loaded: transactions on several threads share it."""

    def __init__(self, engine: ModSecurity) -> None:
        self._engine = engine
        self._ffi = engine.ffi
        self._lib = engine.lib
        self.handle = self._ffi.gc(self._lib.msc_create_rules_set(), self._lib.msc_rules_cleanup)

    def add_text(self, text: str) -> None:
        """Add configuration directives and rules; raises :class:`RulesError`."""
        self._check(self._lib.msc_rules_add(self.handle, text.encode("utf-8"), self._error()))

    def add_file(self, path: str) -> None:
        """Add a configuration file (its ``Include`` and data files are found
        relative to it); raises :class:`RulesError`."""
        self._check(self._lib.msc_rules_add_file(self.handle, path.encode("utf-8"), self._error()))

    def _error(self) -> Any:
        self._pending = self._ffi.new("const char **")
        return self._pending

    def _check(self, result: int) -> None:
        if result < 0:
            error = self._pending[0]
            message = self._ffi.string(error).decode("utf-8", "replace") if error else "unknown error"
            raise RulesError(message.strip())


class ModSecurity:
    """The process's ModSecurity engine (``msc_init``), its log callback, and
    transactions run on it.  Use :func:`engine` for the shared instance."""

    def __init__(self, library: str = LIBRARY) -> None:
        self.ffi = FFI()
        self.ffi.cdef(_CDEF)
        try:
            self.lib: Any = self.ffi.dlopen(library)
        except OSError as e:
            raise EngineMissing(f"ModSecurity ({library}) is not installed: install Debian's {ENGINE_PACKAGE} "
                                f"package (apt-get install {ENGINE_PACKAGE}) [{e}]") from None
        self._libc: Any = self.ffi.dlopen(None)
        self.handle = self.lib.msc_init()
        self.lib.msc_set_connector_info(self.handle, b"chatproxy")
        self._callback = self.ffi.callback("void(void *, const void *)", self._logged)
        self.lib.msc_set_log_cb(self.handle, self._callback)
        self.version = self.ffi.string(self.lib.msc_who_am_i(self.handle)).decode("latin-1")

    def _logged(self, data: Any, message: Any) -> None:
        if data != self.ffi.NULL and message != self.ffi.NULL:
            collected: list[str] = self.ffi.from_handle(data)
            collected.append(self.ffi.string(self.ffi.cast("const char *", message)).decode("utf-8", "replace"))

    def rules(self) -> Rules:
        """A new, empty rule set."""
        return Rules(self)

    def run(self, rules: Rules, request: Transaction) -> Outcome:
        """Run one request through every request phase, then the response
        phases when it has a response, and the logging phase: the status of
        the first intervention, if any, and the messages the matching rules
        logged.  Safe to call from several threads at once (each call has its
        own transaction)."""
        ffi, lib = self.ffi, self.lib
        messages: list[str] = []
        handle = ffi.new_handle(messages)
        transaction = lib.msc_new_transaction(self.handle, rules.handle, handle)
        try:
            lib.msc_process_connection(transaction, request.client.encode("latin-1"), request.client_port,
                                       request.server.encode("latin-1"), request.server_port)
            lib.msc_process_uri(transaction, request.uri, request.method.encode("latin-1"),
                                request.version.encode("latin-1"))
            for name, value in request.headers:
                lib.msc_add_n_request_header(transaction, name, len(name), value, len(value))
            lib.msc_process_request_headers(transaction)
            status = self._intervention(transaction, messages)
            if status is None:
                if request.body:
                    lib.msc_append_request_body(transaction, request.body, len(request.body))
                lib.msc_process_request_body(transaction)
                status = self._intervention(transaction, messages)
            response = request.response
            if status is None and response is not None:
                status = self._respond(transaction, response, messages)
            lib.msc_process_logging(transaction)
        finally:
            lib.msc_transaction_cleanup(transaction)
        return Outcome(status, tuple(messages))

    def _respond(self, transaction: Any, response: Response, messages: list[str]) -> int | None:
        """The response phases (headers, then body): the intervention's status, or None."""
        lib = self.lib
        for name, value in response.headers:
            lib.msc_add_n_response_header(transaction, name, len(name), value, len(value))
        lib.msc_process_response_headers(transaction, response.status, response.protocol.encode("latin-1"))
        status = self._intervention(transaction, messages)
        if status is None:
            if response.body:
                lib.msc_append_response_body(transaction, response.body, len(response.body))
            lib.msc_process_response_body(transaction)
            status = self._intervention(transaction, messages)
        return status

    def _intervention(self, transaction: Any, messages: list[str]) -> int | None:
        """The status of a disruptive intervention, or None; the rule's message
        (a disruptive rule's is not given to the log callback) is added to
        ``messages``, and the C strings are freed."""
        ffi = self.ffi
        found = ffi.new("ModSecurityIntervention *")
        found.status = 200
        disruptive = self.lib.msc_intervention(transaction, found)
        if found.log != ffi.NULL:
            messages.append(ffi.string(found.log).decode("utf-8", "replace"))
        for text in (found.url, found.log):
            if text != ffi.NULL:
                self._libc.free(text)
        return int(found.status) if disruptive and found.disruptive else None


_lock = threading.Lock()
_engine: ModSecurity | None = None


def engine() -> ModSecurity:
    """The process's engine, made on first use; raises :class:`EngineMissing`."""
    global _engine
    with _lock:
        if _engine is None:
            _engine = ModSecurity()
        return _engine
