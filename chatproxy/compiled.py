"""The optional compiled build: which modules it compiles, and which are compiled here.

chatproxy is pure Python; that is the reference build, and what ``pip install``
gives.  ``CHATPROXY_COMPILE=1 pip install ...`` also compiles the modules of
the data path listed in :data:`MODULES` with Cython (``setup.py`` reads this
list), to C extension modules that Python imports instead of the ``.py``
files beside them.  The code is the same, with no Cython syntax in it; what
compiling saves is the interpreter's work between the lines (about a fifth of
the Python time of chatproxy's own code per request, 12-16% of a proxied
request's CPU: bench/README.md).  One exception to "untyped": a ``.pxd``
file beside a listed module (``proxy/exchange.pxd``, ``front.pxd``,
``upstream.pxd``, ``request.pxd``) makes a slotted class of it a C-typed
class with the same attributes, which the module's own code then reads as C
fields (another fifth of chatproxy's own time per request for the first
three); and a ``.pxd`` can give a function's variables C types, which makes
its loops C loops (``masking.pxd``: over a WebSocket payload's bytes;
``exchange.pxd``: over a response's headers; ``request.pxd``,
``forwarding.pxd``: over a request's; ``messages.pxd``: every head's fields
written out).  A class that must also be a Twisted ``Protocol`` (a Python
class, which a C-typed class cannot derive from) is split:
``FrontConnectionBase`` holds the code and state,
``FrontConnection(FrontConnectionBase, Protocol)`` is what Twisted sees.  The test suite runs on both builds in CI.

This module has no imports beyond the standard library, so that ``setup.py``
can read it before chatproxy's dependencies are installed.
"""

from __future__ import annotations

import importlib.machinery
from pathlib import Path
from typing import Final

#: The modules the compiled build compiles: what a request, a response, a
#: tunnel, an HTTP/2 stream or a bridged WebSocket message passes through.
#: (Modules that Twisted drives as generators, ``inlineCallbacks``, stay
#: Python: a Cython generator is not a ``types.GeneratorType``.)
MODULES: Final = (
    "chatproxy.filters.chain",
    "chatproxy.http.messages",
    "chatproxy.http.paths",
    "chatproxy.proxy.accesslog",
    "chatproxy.proxy.core",
    "chatproxy.proxy.exchange",
    "chatproxy.proxy.forwarding",
    "chatproxy.proxy.front",
    "chatproxy.proxy.gate",
    "chatproxy.proxy.h2headers",
    "chatproxy.proxy.http2",
    "chatproxy.proxy.plain",
    "chatproxy.proxy.request",
    "chatproxy.proxy.sending",
    "chatproxy.proxy.stats",
    "chatproxy.proxy.timeouts",
    "chatproxy.proxy.tls",
    "chatproxy.proxy.tls_records",
    "chatproxy.proxy.tunnel",
    "chatproxy.proxy.upstream",
    "chatproxy.proxy.validate",
    "chatproxy.proxy.websocket.bridge",
    "chatproxy.proxy.websocket.closing",
    "chatproxy.proxy.websocket.frames",
    "chatproxy.proxy.websocket.legs",
    "chatproxy.proxy.websocket.masking",
    "chatproxy.proxy.websocket.sockets",
)

#: Cython's settings for them: Python 3 semantics, type annotations ignored
#: (they are for mypy, not C types), functions that behave like Python's
#: (introspection, keyword arguments, binding as methods), and no C types
#: inferred for local variables (Python's integers never overflow).
DIRECTIVES: Final = {
    "language_level": 3,
    "annotation_typing": False,
    "binding": True,
    "always_allow_keywords": True,
    "infer_types": False,
}


def compiled_modules() -> list[str]:
    """Those of :data:`MODULES` that Python imports from an extension module (the
    compiled build), in the order of :data:`MODULES`: those with an extension
    module beside their .py file, which Python's importer takes first.  Nothing
    is imported to find out (a master process never imports the data path)."""
    package = Path(__file__).resolve().parent
    compiled = []
    for name in MODULES:
        stem = package.joinpath(*name.split(".")[1:])
        if any(stem.with_name(stem.name + suffix).is_file() for suffix in importlib.machinery.EXTENSION_SUFFIXES):
            compiled.append(name)
    return compiled


def describe() -> str:
    """One line for the start-up log: which build runs."""
    compiled = compiled_modules()
    if not compiled:
        return "pure Python (the reference build)"
    return f"compiled build: {len(compiled)} of {len(MODULES)} data-path modules compiled with Cython"
