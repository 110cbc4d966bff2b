"""ivloop harness: simulated hosts, real QEMU guests, migration and path checks."""

from importlib import metadata as _metadata
from pathlib import Path as _Path


def _version() -> str:
    """The version of the installed ivloop-lab distribution; from a source tree
    that is not installed (on PYTHONPATH), its VERSION file."""
    try:
        return _metadata.version("ivloop-lab")
    except _metadata.PackageNotFoundError:
        pass
    try:
        return (_Path(__file__).resolve().parent.parent / "VERSION").read_text().strip()
    except OSError:
        return "unknown"


__version__ = _version()
