"""``twistd chatproxy``: command-line options and the service they build."""

from __future__ import annotations

import sys

from twisted.python import usage

from chatproxy.config import ConfigError, load_config
from chatproxy.service import ChatproxyService


class Options(usage.Options):
    """Options of ``twistd chatproxy``."""

    synopsis = "--config FILE [--config FILE ...]"
    longdesc = (
        "Run chatproxy. --config names an INI file or a directory of *.ini files; "
        "give it more than once to layer files (later files override earlier ones)."
    )

    def __init__(self) -> None:
        super().__init__()
        self["config"] = []

    def opt_config(self, path: str) -> None:
        """An INI file or a directory of *.ini files (repeatable)."""
        self["config"].append(path)

    opt_c = opt_config

    def postOptions(self) -> None:
        """Require at least one --config."""
        if not self["config"]:
            raise usage.UsageError("give at least one --config FILE")


def makeService(options: Options) -> ChatproxyService:
    """Load and validate the configuration, then build the service.

    A configuration error is printed as one line naming file, section and
    option, and twistd exits with status 2 without starting anything.
    """
    try:
        config = load_config(options["config"])
    except ConfigError as error:
        sys.stderr.write(f"chatproxy: configuration error: {error}\n")
        sys.stderr.flush()
        raise SystemExit(2) from None
    return ChatproxyService(config)
