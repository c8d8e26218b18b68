"""Packaging: the wheel ships the twistd plugin, and the code is mypy-clean."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import chatproxy

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def test_wheel_contains_the_twistd_plugin_and_demo_page(tmp_path):
    """The wheel is the distribution chatproxy-gateway (``chatproxy`` on the package index
    is another project; the import package and the twistd plugin are ``chatproxy``); it
    holds twisted/plugins/chatproxy_plugin.py (find_namespace:), the demo page
    and the py.typed marker (so that plugins type-check against chatproxy.filters and
    chatproxy.testing), and no twisted/__init__.py that would shadow Twisted itself."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    wheel = next(tmp_path.glob("chatproxy_gateway-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    metadata = zipfile.ZipFile(wheel).read(f"chatproxy_gateway-{chatproxy.__version__}.dist-info/METADATA").decode()
    assert "\nName: chatproxy-gateway\n" in metadata
    assert "twisted/plugins/chatproxy_plugin.py" in names
    assert "chatproxy/demo/chat.html" in names
    assert "chatproxy/py.typed" in names
    assert "twisted/__init__.py" not in names
    assert "twisted/plugins/__init__.py" not in names


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
