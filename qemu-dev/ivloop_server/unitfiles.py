"""The systemd unit files shipped in ``ivloop_server/systemd/``, rendered.

The shipped files run :data:`UNIT_BINARY`; :func:`unit_text` puts this
installation's ivloop-server in its place (what ``ivloop-server
--print-unit`` prints), since ``systemd-analyze verify`` and systemd want
an ExecStart that exists.
"""

from __future__ import annotations

import importlib.resources
import os
import sys
from pathlib import Path
from typing import Final

#: The files in ``systemd/``, the unit --print-unit prints by default first.
UNIT_FILES: Final = ("ivloop-server.service", "ivloop-server@.service", "ivloop-server.default")
#: The binary the shipped unit files name; --print-unit puts this installation's.
UNIT_BINARY: Final = "/usr/bin/ivloop-server"


def installed_binary() -> str:
    """This installation's ivloop-server executable, for the unit's ExecStart."""
    name = Path(UNIT_BINARY).name
    candidates = [Path(sys.executable).with_name(name)]
    if Path(sys.argv[0]).name == name:
        candidates.insert(0, Path(sys.argv[0]))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate.absolute())
    return UNIT_BINARY


def unit_text(name: str, binary: str | None = None) -> str:
    """A shipped unit or defaults file, with ExecStart naming ``binary``."""
    text = (importlib.resources.files(__package__) / "systemd" / name).read_text()
    return text.replace(UNIT_BINARY, binary or installed_binary())
