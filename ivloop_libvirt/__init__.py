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

__version__ = "0.1.0"
