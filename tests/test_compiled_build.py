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
#: .ci/run sets CHATPROXY_EXPECT_COMPILED to 0 for its first run of the suite (pure Python)
#: and to 1 for its second, on the build made with CHATPROXY_COMPILE=1.
EXPECTED_BUILD = os.environ.get("CHATPROXY_EXPECT_COMPILED")
EXPECT_COMPILED = EXPECTED_BUILD == "1"


def _source(name: str) -> Path:
    return ROOT.joinpath(*name.split(".")).with_suffix(".py")


def test_every_listed_module_is_a_source_file_that_compiles_to_the_same_behaviour() -> None:
    """Each module the compiled build lists is a .py file of the package, and none
    holds what behaves differently once compiled: a function run by
    ``inlineCallbacks`` or an ``async def`` (Twisted checks for Python's own
    generator and coroutine types, which Cython's are not), a look at the
    caller's frame (compiled code has none), or a ``Logger()`` without a
    namespace (Twisted names it from the importing frame: compiled, every
    line it logs would say ``importlib._bootstrap``)."""
    for name in MODULES:
        path = _source(name)
        assert path.is_file(), f"{name} is listed in chatproxy/compiled.py but {path} does not exist"
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            where = f"{name}, line {getattr(node, 'lineno', '?')}"
            assert not isinstance(node, ast.AsyncFunctionDef), f"{where}: async def"
            if isinstance(node, ast.alias):
                assert node.name != "inlineCallbacks", f"{where}: imports inlineCallbacks"
            if isinstance(node, (ast.Name, ast.Attribute)):
                spelled = node.id if isinstance(node, ast.Name) else node.attr
                assert spelled not in ("inlineCallbacks", "_getframe", "currentframe"), f"{where}: {spelled}"
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Logger":
                assert any(keyword.arg == "namespace" for keyword in node.keywords) or node.args, \
                    f"{where}: Logger() without a namespace"


def test_each_module_logs_under_its_own_name() -> None:
    """The listed modules' loggers are named after their modules, in whichever
    build runs (compiled, a bare ``Logger()`` would be named after the importer)."""
    for name in MODULES:
        module: Any = importlib.import_module(name)
        if hasattr(module, "log"):
            assert module.log.namespace == name


def test_the_suite_runs_on_the_build_ci_asked_for() -> None:
    """In CI's run on the compiled build every listed module is imported from its
    extension module, in this process too (so the in-memory tests exercise the
    compiled code, not the .py beside it); in CI's first run (pure Python)
    nothing is compiled and the build says so."""
    compiled = compiled_modules()
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    if EXPECTED_BUILD is None:
        pytest.skip("CHATPROXY_EXPECT_COMPILED is set by .ci/run: 0 for its first run, 1 for its second")
    if EXPECT_COMPILED:
        assert compiled == list(MODULES)
        for name in MODULES:
            module: Any = importlib.import_module(name)
            assert module.__file__.endswith(suffixes), f"{name} was imported from {module.__file__}"
        assert describe() == f"compiled build: {len(MODULES)} of {len(MODULES)} data-path modules " \
                             "compiled with Cython"
    else:
        assert compiled == []
        for name in MODULES:
            module = importlib.import_module(name)
            assert module.__file__.endswith(".py"), f"{name} was imported from {module.__file__}"
        assert describe() == "pure Python (the reference build)"


def test_no_extension_module_in_the_checkout_is_stale_or_unlisted() -> None:
    """An extension module in the checkout shadows the .py beside it: each one
    must be of a listed module and built after its .py was last changed (else
    the tests would run old code: rebuild, or delete the extension modules)."""
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    listed = {_source(name).with_suffix("") for name in MODULES}
    for built in (ROOT / "chatproxy").rglob("*.so"):
        stem = Path(str(built)[:-len(next(s for s in suffixes if str(built).endswith(s)))])
        assert stem in listed, f"{built} is not of a module chatproxy/compiled.py lists: delete it"
        for source in (stem.with_suffix(".py"), stem.with_suffix(".pxd")):
            if source.exists():
                assert built.stat().st_mtime >= source.stat().st_mtime, \
                    f"{built} is older than {source}: rebuild (CHATPROXY_COMPILE=1 pip install -e .) or delete it"


def _pxd_declarations() -> tuple[dict[str, dict[str, list[str]]], dict[str, dict[str, list[str]]]]:
    """What the .pxd files beside listed modules declare: (C-typed classes,
    typed functions), each module -> name -> its attributes or parameters, in
    order.  The .pxd files hold only ``cdef class NAME:`` and ``cdef public
    object a, b, ...`` lines, ``cpdef TYPE NAME(TYPE a, TYPE b=*)`` lines each
    after a ``@cython.locals(...)`` (which may span lines), ``cimport cython``
    and comments."""
    classes_of: dict[str, dict[str, list[str]]] = {}
    functions_of: dict[str, dict[str, list[str]]] = {}
    for name in MODULES:
        pxd = _source(name).with_suffix(".pxd")
        if not pxd.exists():
            continue
        classes = classes_of[name] = {}
        functions = functions_of[name] = {}
        current: list[str] | None = None
        open_parentheses = 0
        for number, line in enumerate(pxd.read_text().splitlines(), 1):
            code = line.split("#", 1)[0].strip()
            if open_parentheses or code.startswith("@cython.locals("):
                open_parentheses += code.count("(") - code.count(")")  # the locals' C types
            elif code.startswith("cdef class ") and code.endswith(":"):
                current = classes[code[len("cdef class "):-1].strip()] = []
            elif code.startswith("cdef public object ") and current is not None:
                current.extend(attribute.strip() for attribute in code[len("cdef public object "):].split(","))
            elif code.startswith("cpdef ") and code.endswith(")"):
                head, _, parameters = code[:-1].partition("(")
                functions[head.split()[-1]] = [parameter.split()[-1].split("=")[0]  # (a default: "=*")
                                               for parameter in parameters.split(",")]
                current = None
            else:
                assert not code or code == "cimport cython", \
                    f"{pxd}, line {number}: not a declaration this test knows: {line!r}"
    return classes_of, functions_of


def _typed_classes() -> dict[str, dict[str, list[str]]]:
    """The C-typed classes the .pxd files declare: module -> class -> its attributes, in order."""
    return _pxd_declarations()[0]


def test_each_typed_function_is_a_function_of_its_module_with_the_same_parameters() -> None:
    """A function a .pxd types for the compiled build (``cpdef``, C types for
    its variables) is a module-level function of the .py beside it, with the
    same parameters in the same order (Cython would otherwise refuse the
    module, or type another function than the one meant)."""
    typed = _pxd_declarations()[1]
    assert any(typed.values()), "no typed function in any .pxd: this test checks nothing"
    for name, functions in typed.items():
        tree = ast.parse(_source(name).read_text())
        defined = {node.name: [argument.arg for argument in node.args.args]
                   for node in tree.body if isinstance(node, ast.FunctionDef)}
        for function, parameters in functions.items():
            assert function in defined, f"{name}.{function} is typed in its .pxd but not defined in the .py"
            assert parameters == defined[function], f"{name}.{function}: .pxd {parameters} != .py {defined[function]}"


def test_each_typed_class_declares_exactly_the_attributes_of_its_slots() -> None:
    """A class a .pxd types for the compiled build declares the attributes the
    class's ``__slots__`` name in its .py, in the same order: the two builds
    then keep the same attributes in the same kind of place (an attribute
    missing from one list would fail, or go to a ``Protocol`` subclass's
    ``__dict__`` where the compiled code does not read it, in one build only).
    And no .pxd sits beside a module the build does not compile (it would do
    nothing)."""
    declared = _typed_classes()
    assert declared, "no .pxd beside any listed module: this test checks nothing"
    for pxd in (ROOT / "chatproxy").rglob("*.pxd"):
        module = ".".join(pxd.relative_to(ROOT).with_suffix("").parts)
        assert module in MODULES, f"{pxd} is beside {module}, which chatproxy/compiled.py does not list"
    for name, classes in declared.items():
        tree = ast.parse(_source(name).read_text())
        slots: dict[str, list[str]] = {}
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                for statement in node.body:
                    if isinstance(statement, ast.Assign) and any(
                            isinstance(target, ast.Name) and target.id == "__slots__" for target in statement.targets):
                        slots[node.name] = list(ast.literal_eval(statement.value))
        for cls, attributes in classes.items():
            assert cls in slots, f"{name}.{cls} is typed in its .pxd but has no __slots__"
            assert attributes == slots[cls], f"{name}.{cls}: .pxd {attributes} != __slots__ {slots[cls]}"


def test_typed_classes_are_typed_in_the_compiled_build_and_slotted_in_the_pure_one() -> None:
    """In the compiled build each class a .pxd declares is an extension type
    whose attributes are C fields (``getset_descriptor``), in the pure build a
    slotted Python class (``member_descriptor``), without a ``__dict__`` of its
    own.  And every class of the module built on one (``FrontConnection`` on
    ``FrontConnectionBase``) finds those attributes on it, not on another base
    (Twisted's ``Protocol`` has class attributes ``transport``, ``connected``,
    ``factory``: with the bases the other way round, Twisted would store the
    transport where the compiled code never reads it)."""
    if EXPECTED_BUILD is None:
        pytest.skip("CHATPROXY_EXPECT_COMPILED is set by .ci/run: 0 for its first run, 1 for its second")
    for name, classes in _typed_classes().items():
        module: Any = importlib.import_module(name)
        for cls_name, attributes in classes.items():
            cls = getattr(module, cls_name)
            kinds = {type(vars(cls)[attribute]).__name__ for attribute in attributes}
            assert kinds == {"getset_descriptor" if EXPECT_COMPILED else "member_descriptor"}, (cls, kinds)
            assert cls.__dictoffset__ == 0, f"{cls} instances have a __dict__"
            built_on = [c for c in vars(module).values() if isinstance(c, type) and c is not cls and cls in c.__mro__]
            for subclass in built_on:
                for attribute in attributes:
                    owner = next(c for c in subclass.__mro__ if attribute in vars(c))
                    assert owner is cls, f"{subclass.__name__}.{attribute} is {owner.__name__}'s, not {cls_name}'s"


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
