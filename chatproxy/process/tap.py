"""``twistd chatproxy``: command-line options and the service they build."""

from __future__ import annotations

import os
import sys

from twisted.application.service import Service
from twisted.python import usage

from chatproxy.config import ConfigError, load_config
from chatproxy.process.environment import WORKER_ENV
from chatproxy.process.service import ChatproxyService
from chatproxy.process.workers import Master, unshareable, worker_count
from chatproxy.proxy.validate import validate


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


def makeService(options: Options) -> Service:
    """Load and validate the configuration, then build the service.

    A configuration error is printed as one line naming file, section and
    option, and twistd exits with status 2 without starting anything.  With
    ``workers`` above 1 this process becomes the master of that many worker
    processes (:mod:`chatproxy.process.workers`); a worker (``CHATPROXY_WORKER`` in
    its environment) is a single proxy process.
    """
    try:
        config = load_config(options["config"])
        filters = validate(config)
    except ConfigError as error:
        sys.stderr.write(f"chatproxy: configuration error: {error}\n")
        sys.stderr.flush()
        raise SystemExit(2) from None
    if os.environ.get(WORKER_ENV) or worker_count(config) == 1:
        return ChatproxyService(config, config_paths=options["config"], filters=filters)
    problem = unshareable(config)
    if problem is not None:
        sys.stderr.write(f"chatproxy: configuration error: {problem}\n")
        sys.stderr.flush()
        raise SystemExit(2)
    return Master(config, options["config"])
