"""``python -m chatproxy check --config FILE``: validate a configuration."""

from __future__ import annotations

import sys

from chatproxy.process.check import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
