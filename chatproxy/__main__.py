"""``python -m chatproxy check --config FILE``: validate a configuration;
``python -m chatproxy hash-password``: a hash for ``[admin] password_hash``."""

from __future__ import annotations

import sys

from chatproxy.process.check import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
