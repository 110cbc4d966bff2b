"""What every backend needs to know about a VM: its topology, boot files, QEMU, guest.

Records are read from the state directory; nothing here starts or stops a
process except through :mod:`harness.lab.guest` (SSH) and the caller's
backend.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from harness.errors import HarnessError, ImageError, StateError
from harness.lab import guest as guest_mod
from harness.lab import guestdisk, qemu
from harness.lab.state import State, StateDir, VMState, VMStatus
from harness.lab.topology import Topology, VMSpec
from harness.lab.topology import parse as parse_topology

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
SSH_PORT_BASE = 2200
BOOT_TIMEOUT = float(os.environ.get("IVLOOP_BOOT_TIMEOUT", "180"))


def image_dir() -> Path:
    return Path(os.environ.get("IVLOOP_IMAGE_DIR", REPO / "images" / "out"))


def image_paths() -> tuple[Path, Path]:
    d = image_dir()
    kernel, initrd = d / "vmlinuz", d / "initrd.img"
    if not kernel.exists() or not initrd.exists():
        raise ImageError(f"guest image not found in {d}; run 'make image' first")
    return kernel, initrd


def topology_of(state: State) -> Topology:
    return parse_topology(state.topology, state.topology_source)


def recorded_qemu(path: str, banner: str) -> qemu.Binary | None:
    """The QEMU a state record names; None when it names none (an older harness)."""
    if not path or not banner:
        return None
    try:
        return qemu.Binary(path=path, version=qemu.Version.parse(banner), banner=banner)
    except ValueError:
        return None


def vm_qemu(vs: VMState) -> qemu.Binary | None:
    """The QEMU *vs*'s process was started from, as recorded."""
    return recorded_qemu(vs.qemu, vs.qemu_banner)


def qemu_for(state: State) -> qemu.Binary:
    """The topology's QEMU as it is now: the recorded path, probed again.

    Every later QEMU of the topology (restart, a migration destination) is
    started from the binary `harness up` chose; probing it again sees a
    binary replaced meanwhile (a new `make qemu-10`), which callers that need
    the same QEMU as a running one compare (migrate.check_same_qemu).
    """
    binary = qemu.probe(state.qemu or qemu.DEFAULT_BINARY)
    if state.qemu_banner and binary.banner != state.qemu_banner:
        log.warning("%s changed since 'harness up': it was %s, it is %s now",
                    binary.path, state.qemu_banner, binary.banner)
    return binary


def boot_files(sd: StateDir, state: State, vm: VMSpec, *,
               incoming: bool) -> tuple[Path, Path, Path | None]:
    """The kernel, initrd and (for a systemd guest) root disk *vm* boots.

    A Debian guest (``image = "debian"``) boots its own copy of the image's
    disk, made on its first start and kept across restarts and migrations
    (the destination opens the same file) until `harness down`.
    """
    if vm.image != "debian":
        kernel, initrd = image_paths()
        return kernel, initrd, None
    if not driver_for(state, vm):
        raise StateError(f"{vm.name} boots the Debian image, whose own configuration always "
                         "stacks ivl0; without the driver use image = \"initramfs\"")
    img = guestdisk.image()
    disk = sd.file(f"disk-{vm.name}.img")
    if not disk.exists():
        if incoming:
            raise StateError(f"{vm.name}'s disk {disk} is missing: a migration destination "
                             "opens its source's disk")
        guestdisk.prepare(img.disk, disk, vm, guest_mod.ensure_key(sd.key_path))
    return img.kernel, img.initrd, disk


def driver_for(state: State, vm: VMSpec) -> bool:
    """Whether *vm* loads ivloop.ko: its own `driver` key wins over the global flag."""
    return state.driver if vm.driver is None else vm.driver


def wait_ssh(sd: StateDir, state: State, name: str, timeout: float = BOOT_TIMEOUT) -> None:
    vs = state.vms[name]
    try:
        with guest(sd, state, name, timeout=timeout) as g:
            g.run("true")
    except HarnessError as exc:
        console = Path(vs.console)
        tail = console.read_text(errors="replace").splitlines()[-10:] if console.exists() else []
        raise StateError(f"{name} did not come up: {exc}\nconsole:\n" + "\n".join(tail)) from exc
    vs.status = VMStatus.RUNNING
    sd.save(state)


def guest(sd: StateDir, state: State, name: str, timeout: float = 30) -> guest_mod.Guest:
    topology_of(state).vm(name)  # unknown VM -> TopologyError
    vs = state.vms.get(name)
    if vs is None or vs.proc is None or not vs.proc.alive():
        raise StateError(f"VM {name} is down; 'harness restart {name}' starts it")
    g = guest_mod.Guest(name, state.hosts[vs.host].netns, vs.ssh_port, sd.key_path)
    return g.open(timeout=timeout)
