"""Registers the ``user_agent_block`` chatproxy filter kind with Twisted's plugin system.

getPlugins() imports every module in ``twisted/plugins`` and collects the
module-level objects that provide the interface asked for: here the kind
object, imported from the package.  There must be no ``__init__.py`` in
``twisted/`` or ``twisted/plugins/``.
"""

from chatproxy_example_filter.user_agent_block import user_agent_block

__all__ = ["user_agent_block"]
