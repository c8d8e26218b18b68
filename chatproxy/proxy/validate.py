"""The data path's part of validating a configuration: what
:func:`chatproxy.config.load_config` reads but does not build.

:func:`validate` builds every ``[filter:NAME]`` section with its kind (an
installed :class:`~chatproxy.filters.IFilterFactory` plugin) and loads every
TLS listener's certificates and keys.  Its mistakes are
:class:`~chatproxy.config.ConfigError` s located like the loader's (the file
that set the option, the section, the option), so every place that loads a
configuration (twistd, ``python -m chatproxy check``, a reload, the master
of workers) refuses a bad one the same way by calling ``load_config`` and
then ``validate``.  The filters it returns are the ones a
:class:`~chatproxy.proxy.plan.Plan` runs: each is built once per plan.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from chatproxy.config import Config, ConfigError, FilterSpec
from chatproxy.filters import FilterOptionError, installed_filter_kinds
from chatproxy.proxy.tls import check_listener_tls

__all__ = ["build_filter", "build_filters", "check_listeners", "validate"]


def validate(config: Config, kinds: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Build the filters of ``config`` and check its listeners' TLS material.

    ``kinds`` maps kind names to ``IFilterFactory`` providers (default: the
    installed plugins).  Returns the built filters by section name; raises
    :class:`~chatproxy.config.ConfigError`.
    """
    filters = build_filters(config, kinds)
    check_listeners(config)
    return filters


def build_filters(config: Config, kinds: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Every filter section of ``config`` built by its kind, by section name
    (the plugins are only looked for when there is a filter section)."""
    if not config.filters:
        return {}
    found = installed_filter_kinds() if kinds is None else kinds
    return {name: build_filter(spec, found) for name, spec in config.filters.items()}


def build_filter(spec: FilterSpec, kinds: Mapping[str, Any]) -> Any:
    """One filter section built by its kind; a kind's
    :class:`~chatproxy.filters.FilterOptionError` (or crash) becomes a
    ConfigError naming the file, the section and the option."""
    section = f"filter:{spec.name}"
    kind = kinds.get(spec.kind)
    if kind is None:
        installed = ", ".join(sorted(kinds)) or "none"
        raise ConfigError(f"unknown filter kind {spec.kind!r} (installed kinds: {installed})", spec.file_of("use"),
                          section, "use")
    try:
        return kind.build(spec.options)
    except FilterOptionError as e:
        raise ConfigError(e.message, spec.file_of(e.option), section, e.option) from None
    except Exception as e:  # a third-party kind's bug must not become a traceback
        raise ConfigError(f"filter kind {spec.kind!r} failed to build: {e!r}", spec.file_of("use"), section) from None


def check_listeners(config: Config) -> None:
    """Load every TLS listener's certificates and keys (see
    :func:`~chatproxy.proxy.tls.check_listener_tls`); an error names the file
    that set the offending option (files are layered)."""
    for listener in config.listeners.values():
        try:
            check_listener_tls(listener)
        except ConfigError as error:
            error.file = _file_that_set(config, error.section, error.option) or error.file
            raise


def _file_that_set(config: Config, section: str | None, option: str | None) -> str | None:
    for value in config.raw_values:
        if value.section == section and value.option == option:
            return value.file
    return None
