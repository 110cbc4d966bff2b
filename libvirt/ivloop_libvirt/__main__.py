"""``python -m ivloop_libvirt``: the ivloop-libvirt command."""

import sys

from .cli import main

sys.exit(main())
