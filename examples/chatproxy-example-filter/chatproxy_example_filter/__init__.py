"""An example third-party filter kind for chatproxy: ``user_agent_block``."""

__version__ = "1.0.0"
