"""ivloop-server: the host side of QEMU's ivshmem-doorbell device."""

__version__ = "0.1.0"
