"""chatproxy's build backend: setuptools' own (``setuptools.build_meta``), except
that Cython is added to the build requirements only when the compiled build is
asked for (``CHATPROXY_COMPILE=1``, see setup.py), so that a pure-Python install
does not fetch it.  pyproject.toml names this module (``backend-path``)."""

from __future__ import annotations

import os
from typing import Any

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403  (every other hook as setuptools defines it)

#: What the compiled build needs besides setuptools.
COMPILE_REQUIRES = ["Cython>=3.1"]


def _requires(setuptools_hook: Any, config_settings: dict[str, Any] | None) -> list[str]:
    requires = list(setuptools_hook(config_settings))
    return requires + (COMPILE_REQUIRES if os.environ.get("CHATPROXY_COMPILE", "") == "1" else [])


def get_requires_for_build_wheel(config_settings: dict[str, Any] | None = None) -> list[str]:
    """setuptools' requirements for a wheel, and Cython for the compiled build."""
    return _requires(_setuptools.get_requires_for_build_wheel, config_settings)


def get_requires_for_build_editable(config_settings: dict[str, Any] | None = None) -> list[str]:
    """setuptools' requirements for an editable install, and Cython for the compiled build."""
    return _requires(_setuptools.get_requires_for_build_editable, config_settings)
