"""chatproxy's configuration: INI files read into a frozen, validated model.

- :mod:`chatproxy.config.model`: the model (:class:`Config` and its parts);
- :mod:`chatproxy.config.values`: the value parsers, shared with filter kinds;
- :mod:`chatproxy.config.loader`: :func:`load_config` (reading, layering,
  sections) and :class:`ConfigError`, which names file, section and option;
- :mod:`chatproxy.config.placeholders`: which values are still examples.

The configuration knows nothing of the data path: filters are built, and
listener certificates loaded, by :func:`chatproxy.proxy.validate.validate`.
"""

from chatproxy.config.loader import ConfigError, load_config
from chatproxy.config.model import (
    AcmeAccount,
    Admin,
    Config,
    Demo,
    FilterSpec,
    Listener,
    QueryRequirement,
    RawValue,
    Route,
    Settings,
    SniCertificate,
    Upstream,
    UpstreamServer,
    WebSocketOptions,
)
from chatproxy.config.values import (
    Network,
    OptionText,
    option_path,
    parse_bool,
    parse_choice,
    parse_duration,
    parse_header_names,
    parse_int,
    parse_list,
    parse_networks,
    parse_size,
    parse_text,
)

__all__ = [
    "AcmeAccount",
    "Admin",
    "Config",
    "ConfigError",
    "Demo",
    "FilterSpec",
    "Listener",
    "Network",
    "OptionText",
    "QueryRequirement",
    "RawValue",
    "Route",
    "Settings",
    "SniCertificate",
    "Upstream",
    "UpstreamServer",
    "WebSocketOptions",
    "load_config",
    "option_path",
    "parse_bool",
    "parse_choice",
    "parse_duration",
    "parse_header_names",
    "parse_int",
    "parse_list",
    "parse_networks",
    "parse_size",
    "parse_text",
]
