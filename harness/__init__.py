"""ivloop harness: simulated hosts, real QEMU guests, migration and path checks."""

__version__ = "0.1.0"
