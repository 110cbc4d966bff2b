"""Per-VM disks of the systemd Debian guest (``image = "debian"``).

``images/build-debian`` (``make debian-image``) leaves one root file system
in ``images/out-debian/disk.img`` (raw ext4, no partition table) with the
kernel and initrd beside it.  Each VM boots its own sparse copy, kept in the
state directory while the topology is up (a migration destination opens the
same file: shared storage on one machine).  What differs between VMs is
written into the copy as ordinary files, with ``debugfs -w`` (no mount):
hostname, machine-id, SSH host key, root's authorized_keys and ivl0's
addresses as a systemd-networkd drop-in.  Nothing else configures the guest:
systemd, udev and networkd do the rest at boot.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from harness.errors import ImageError
from harness.lab.topology import VMSpec

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
IMAGE_ENV = "IVLOOP_DEBIAN_IMAGE_DIR"
#: Where ivl0's addresses go in the guest (a drop-in of images/debian's
#: /etc/systemd/network/30-ivl0.network; the directory is in the image).
ADDRESS_DROPIN = "/etc/systemd/network/30-ivl0.network.d/address.conf"
#: The guest's kernel command line (root is the whole virtio disk).
CMDLINE = "console=ttyS0 root=/dev/vda rw quiet panic=-1"


@dataclass(frozen=True)
class Image:
    kernel: Path
    initrd: Path
    disk: Path


def image_dir() -> Path:
    return Path(os.environ.get(IMAGE_ENV, REPO / "images" / "out-debian"))


def image() -> Image:
    """The built Debian image, or an error naming the target that builds it."""
    d = image_dir()
    img = Image(kernel=d / "vmlinuz", initrd=d / "initrd.img", disk=d / "disk.img")
    missing = [p.name for p in (img.kernel, img.initrd, img.disk) if not p.exists()]
    if missing:
        raise ImageError(f"Debian guest image not found in {d} (missing {', '.join(missing)}); "
                         "run 'make debian-image' first")
    return img


@dataclass(frozen=True)
class GuestFile:
    path: str  # absolute, inside the guest
    data: bytes
    mode: int  # permission bits


def host_key() -> tuple[bytes, bytes]:
    """A fresh ed25519 SSH host key: (private key file, public key line)."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    return private, public + b" root@ivloop\n"


def address_dropin(vm: VMSpec) -> str:
    """ivl0's addresses for systemd-networkd (IPv6 without DAD, as the busybox guest)."""
    return (
        "# Written by the ivloop harness for this VM.\n"
        "[Network]\n"
        f"Address={vm.ip}/{vm.prefixlen}\n"
        "\n"
        "[Address]\n"
        f"Address={vm.ip6}/{vm.prefixlen6}\n"
        "DuplicateAddressDetection=none\n"
    )


def guest_files(vm: VMSpec, pubkey: str, key: tuple[bytes, bytes] | None = None,
                machine_id: str | None = None) -> list[GuestFile]:
    """Every per-VM file, with its contents and mode."""
    private, public = key or host_key()
    return [
        GuestFile("/etc/hostname", f"{vm.name}\n".encode(), 0o644),
        GuestFile("/etc/hosts", (f"127.0.0.1\tlocalhost\n127.0.1.1\t{vm.name}\n"
                                 "::1\t\tlocalhost ip6-localhost ip6-loopback\n").encode(), 0o644),
        GuestFile("/etc/machine-id", f"{machine_id or uuid.uuid4().hex}\n".encode(), 0o444),
        GuestFile("/etc/ssh/ssh_host_ed25519_key", private, 0o600),
        GuestFile("/etc/ssh/ssh_host_ed25519_key.pub", public, 0o644),
        GuestFile("/root/.ssh/authorized_keys", f"{pubkey}\n".encode(), 0o600),
        GuestFile(ADDRESS_DROPIN, address_dropin(vm).encode(), 0o644),
    ]


def debugfs_script(files: list[GuestFile], local: dict[str, Path]) -> str:
    """debugfs commands replacing each file with *local*[path]'s contents, root-owned.

    debugfs's `write` names its target in the current directory, so each
    file is written from its directory; `rm` first, as `write` never replaces.
    """
    lines = []
    for f in files:
        parent, name = os.path.split(f.path)
        lines += [
            f"cd {parent}",
            f"rm {name}",
            f"write {local[f.path]} {name}",
            f"sif {name} mode 0{0o100000 | f.mode:o}",
            f"sif {name} uid 0",
            f"sif {name} gid 0",
        ]
    return "\n".join(lines) + "\n"


def _debugfs(disk: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    try:
        return subprocess.run(["debugfs", *args, str(disk)], capture_output=True, timeout=60,
                              check=False)
    except FileNotFoundError:
        raise ImageError("debugfs not found; 'make deps' installs e2fsprogs") from None


def prepare(base: Path, disk: Path, vm: VMSpec, pubkey: str) -> None:
    """Make *disk*, *vm*'s copy of *base* with its own files, and check them."""
    files = guest_files(vm, pubkey)
    tmp = disk.with_name(disk.name + ".new")
    try:
        subprocess.run(["cp", "--sparse=always", str(base), str(tmp)], check=True,
                       capture_output=True, timeout=120)
    except subprocess.CalledProcessError as exc:
        tmp.unlink(missing_ok=True)
        raise ImageError(f"cannot copy {base} to {tmp}: "
                         f"{exc.stderr.decode(errors='replace').strip()}") from exc
    try:
        with tempfile.TemporaryDirectory(prefix="ivl-disk-") as d:
            local: dict[str, Path] = {}
            for i, f in enumerate(files):
                local[f.path] = Path(d, str(i))
                local[f.path].write_bytes(f.data)
            script = Path(d, "script")
            script.write_text(debugfs_script(files, local))
            done = _debugfs(tmp, "-w", "-f", str(script))
            if done.returncode != 0:
                raise ImageError(f"debugfs could not write {vm.name}'s files into {tmp}: "
                                 f"{done.stderr.decode(errors='replace').strip()[-500:]}")
        for f in files:  # read back: debugfs reports most errors only as text
            got = _debugfs(tmp, "-R", f"cat {f.path}")
            if got.stdout != f.data:
                raise ImageError(f"{vm.name}'s {f.path} did not reach {tmp} "
                                 f"(debugfs: {got.stderr.decode(errors='replace').strip()[-300:]})")
        tmp.replace(disk)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("%s: disk %s (from %s)", vm.name, disk, base)


def remove(state_dir: Path) -> list[str]:
    """Delete the per-VM disks in *state_dir*; the names of those removed."""
    removed = []
    for disk in sorted(state_dir.glob("disk-*.img*")):
        disk.unlink(missing_ok=True)
        removed.append(disk.name)
    return removed


def check_tools() -> None:
    """Refuse early, with the fix, when a tool :func:`prepare` needs is missing."""
    if shutil.which("debugfs") is None:
        raise ImageError("debugfs not found; 'make deps' installs e2fsprogs")
