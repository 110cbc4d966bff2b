"""Who runs QEMU: the harness itself, or a libvirtd per simulated host."""
