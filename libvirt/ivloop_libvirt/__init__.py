"""ivloop on libvirt hosts: the ``<shmem>`` device XML, plug/unplug, migration, server restart.

The functions a program calls (the ``ivloop-libvirt`` command is a thin layer
over them):

- :func:`ivloop_libvirt.lv.connect`, :func:`ivloop_libvirt.lv.lookup`
- :mod:`ivloop_libvirt.shmem`: render the device (and a q35 hot-plug port), find
  it in a domain's XML
- :func:`ivloop_libvirt.plug.plug`, :func:`ivloop_libvirt.plug.unplug`
- :func:`ivloop_libvirt.migrate.migrate` (and ``migrate_by_name``)
- :func:`ivloop_libvirt.restart.server_restart`
"""

from importlib import metadata as _metadata
from pathlib import Path as _Path


def _version() -> str:
    """The version of the installed ivloop-libvirt distribution; from a source tree
    that is not installed (on PYTHONPATH), its VERSION file."""
    try:
        return _metadata.version("ivloop-libvirt")
    except _metadata.PackageNotFoundError:
        pass
    try:
        return (_Path(__file__).resolve().parent.parent / "VERSION").read_text().strip()
    except OSError:
        return "unknown"


__version__ = _version()
