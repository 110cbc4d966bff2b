"""The lab: simulated hosts, QEMU processes, guests and the state directory.

Nothing here knows which backend runs a VM: that is :mod:`harness.backends`.
"""
