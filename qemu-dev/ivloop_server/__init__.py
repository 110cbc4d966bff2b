"""ivloop-server: the host side of QEMU's ivshmem-doorbell device."""

from importlib import metadata as _metadata
from pathlib import Path as _Path


def _version() -> str:
    """The version of the installed ivloop-server distribution; from a source tree
    that is not installed (on PYTHONPATH), its VERSION file."""
    try:
        return _metadata.version("ivloop-server")
    except _metadata.PackageNotFoundError:
        pass
    try:
        return (_Path(__file__).resolve().parent.parent / "VERSION").read_text().strip()
    except OSError:
        return "unknown"


__version__ = _version()
