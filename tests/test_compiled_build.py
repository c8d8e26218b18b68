"""The optional compiled build (chatproxy/compiled.py, setup.py): what it compiles
can be compiled and still run under Twisted, CI's second run of the suite really
runs on it, and a running proxy says which build it is."""

from __future__ import annotations

import ast
import importlib
import importlib.machinery
import os
from pathlib import Path
from typing import Any

import pytest

import chatproxy
from chatproxy.compiled import MODULES, compiled_modules, describe

from conftest import admin_ready, basic_config, free_port, http_get, wait_until

ROOT = Path(__file__).resolve().parent.parent
#: Set by .ci/run for its second run of the suite, on the build made with CHATPROXY_COMPILE=1.
EXPECT_COMPILED = os.environ.get("CHATPROXY_EXPECT_COMPILED") == "1"


def _source(name: str) -> Path:
    return ROOT.joinpath(*name.split(".")).with_suffix(".py")


def test_every_listed_module_is_a_source_file_twisted_does_not_drive_as_a_generator() -> None:
    """Each module the compiled build lists is a .py file of the package, and none
    holds what would break once compiled: a function run by ``inlineCallbacks``
    or an ``async def`` (Twisted checks for Python's own generator and coroutine
    types, which Cython's are not)."""
    for name in MODULES:
        path = _source(name)
        assert path.is_file(), f"{name} is listed in chatproxy/compiled.py but {path} does not exist"
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            assert not isinstance(node, ast.AsyncFunctionDef), f"{name}: async def {node.name}"
            if isinstance(node, (ast.Name, ast.Attribute)):
                spelled = node.id if isinstance(node, ast.Name) else node.attr
                assert spelled != "inlineCallbacks", f"{name}, line {node.lineno}: inlineCallbacks"


def test_the_suite_runs_on_the_build_ci_asked_for() -> None:
    """In CI's run on the compiled build every listed module is imported from its
    extension module, in this process too (so the in-memory tests exercise the
    compiled code, not the .py beside it); in a checkout without extension
    modules (CI's first run) nothing is compiled and the build says so."""
    compiled = compiled_modules()
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    if EXPECT_COMPILED:
        assert compiled == list(MODULES)
        for name in MODULES:
            module: Any = importlib.import_module(name)
            assert module.__file__.endswith(suffixes), f"{name} was imported from {module.__file__}"
            assert describe() == f"compiled build: {len(MODULES)} of {len(MODULES)} data-path modules " \
                                 "compiled with Cython"
    elif not any(_source(name).parent.glob(name.rsplit(".", 1)[1] + ".*" + suffix)
                 for name in MODULES for suffix in suffixes):
        # The checkout has no extension modules (the pure build, CI's first run).
        assert compiled == []
        assert describe() == "pure Python (the reference build)"


@pytest.mark.parametrize("workers", [1, 2])
def test_a_running_proxy_says_which_build_it_runs(proxy: Any, upstream: Any, workers: int) -> None:
    """At start-up the proxy logs its version and its build (the one its twistd
    imports, which is the one under test), once (with workers, the master says
    it for all), and it proxies a request."""
    port, admin = free_port(), free_port()
    process = proxy.start(basic_config(upstream.url, port, extra=f"[admin]\nendpoint = tcp:{admin}:interface=127.0.0.1\n"),
                          port=port, workers=workers)
    wait_until(lambda: admin_ready(admin), "readiness (of every worker)")
    line = f"chatproxy {chatproxy.__version__}, {describe()}"
    assert line in process.output()
    if EXPECT_COMPILED:
        assert "compiled build:" in line
    status, body = http_get(port, "/hello")
    assert status == 200 and body
    assert process.stop() == 0
    output = process.output()
    # Each worker (or the single process) ran its service: it drained on SIGTERM.
    assert output.count("[chatproxy.process.service#info] SIGTERM: draining") == workers
    assert output.count(line) == 1
