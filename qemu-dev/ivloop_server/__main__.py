"""``python -m ivloop_server``: the ivloop-server command (see :mod:`ivloop_server.cli`)."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
