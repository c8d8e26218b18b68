"""Packaging: the wheel ships the twistd plugin, and the code is mypy-clean."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import chatproxy
from chatproxy.compiled import MODULES

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _wheel(tmp_path: Path, compile_: bool, timeout: float) -> tuple[subprocess.CompletedProcess[str], Path]:
    """``pip wheel`` of the checkout (verbosely), with CHATPROXY_COMPILE=1 or without
    it: pip's result and the wheel (after asserting that the build succeeded)."""
    env = {name: value for name, value in os.environ.items() if name != "CHATPROXY_COMPILE"}
    if compile_:
        env["CHATPROXY_COMPILE"] = "1"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-v", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=timeout, env=env,
    )
    assert result.returncode == 0, result.stderr
    return result, next(tmp_path.glob("chatproxy_gateway-*.whl"))


def test_wheel_contains_the_twistd_plugin_and_demo_page(tmp_path):
    """The wheel is the distribution chatproxy-gateway (``chatproxy`` on the package index
    is another project; the import package and the twistd plugin are ``chatproxy``); it
    holds twisted/plugins/chatproxy_plugin.py (find_namespace:), the demo page
    and the py.typed marker (so that plugins type-check against chatproxy.filters and
    chatproxy.testing), and no twisted/__init__.py that would shadow Twisted itself.
    Unless CHATPROXY_COMPILE=1 asks for the compiled build, the wheel is pure Python
    (no extension module, even when a compiled build lies in the checkout) and its
    build does not fetch Cython."""
    result, wheel = _wheel(tmp_path, compile_=False, timeout=300)
    assert "Cython" not in result.stdout + result.stderr  # build_backend.py asks for it for the compiled build only
    names = zipfile.ZipFile(wheel).namelist()
    metadata = zipfile.ZipFile(wheel).read(f"chatproxy_gateway-{chatproxy.__version__}.dist-info/METADATA").decode()
    assert "\nName: chatproxy-gateway\n" in metadata
    assert "twisted/plugins/chatproxy_plugin.py" in names
    assert "chatproxy/demo/chat.html" in names
    assert "chatproxy/py.typed" in names
    assert "twisted/__init__.py" not in names
    assert "twisted/plugins/__init__.py" not in names
    assert [name for name in names if name.endswith((".so", ".c"))] == []
    assert "-py3-none-any.whl" in wheel.name


def test_twistd_lists_the_chatproxy_plugin_outside_the_checkout(tmp_path):
    """Run from a directory outside the checkout, the installed twistd finds the chatproxy plugin."""
    result = subprocess.run([str(BIN / "twistd"), "--help"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0
    assert "chatproxy" in result.stdout


def test_mypy_is_clean_on_the_package():
    """mypy (strict, with the zope plugin) reports no error on chatproxy/."""
    result = subprocess.run([sys.executable, "-m", "mypy", "chatproxy"], cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_compiled_wheel_holds_every_listed_module_compiled(tmp_path):
    """``CHATPROXY_COMPILE=1 pip install .`` (README, "The compiled build") builds a
    wheel for this Python with an extension module for each module chatproxy/compiled.py
    lists, next to the .py files (the reference, and what tracebacks point to).
    Built in CI's run on the compiled build, where a C compiler is installed."""
    if os.environ.get("CHATPROXY_EXPECT_COMPILED") != "1":
        pytest.skip("the compiled wheel is built in CI's second run (CHATPROXY_EXPECT_COMPILED=1)")
    _result, wheel = _wheel(tmp_path, compile_=True, timeout=900)
    assert "-py3-none-any" not in wheel.name  # a wheel for this Python and platform
    names = zipfile.ZipFile(wheel).namelist()
    for name in MODULES:
        stem = name.replace(".", "/")
        assert stem + ".py" in names
        assert [n for n in names if n.startswith(stem + ".") and n.endswith(".so")], f"{name} is not compiled"
    assert not [n for n in names if n.endswith(".c")]
