"""The systemd Debian guest's per-VM disk (harness.lab.guestdisk) and its QEMU arguments."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from harness.errors import ImageError
from harness.lab import guestdisk, qemu, topology
from harness.lab.accel import Choice

needs_e2fs = pytest.mark.skipif(
    shutil.which("mkfs.ext4") is None or shutil.which("debugfs") is None,
    reason="e2fsprogs not installed")


def debian_vm() -> topology.VMSpec:
    topo = topology.parse({"hosts": {"A": {}}, "vms": {
        "deb1": {"host": "A", "image": "debian"}, "deb2": {"host": "A", "image": "debian"}}})
    return topo.vm("deb2")


def test_networkd_dropin_puts_both_addresses_on_ivl0() -> None:
    text = guestdisk.address_dropin(debian_vm())
    assert "[Network]\nAddress=10.77.0.2/24\n" in text
    assert "[Address]\nAddress=fd77::2/64\nDuplicateAddressDetection=none\n" in text


def test_guest_files_are_per_vm_with_strict_modes() -> None:
    files = {f.path: f for f in guestdisk.guest_files(debian_vm(), "ssh-ed25519 AAAAkey")}
    assert files["/etc/hostname"].data == b"deb2\n"
    assert files["/root/.ssh/authorized_keys"].data == b"ssh-ed25519 AAAAkey\n"
    assert files["/root/.ssh/authorized_keys"].mode == 0o600
    assert files["/etc/ssh/ssh_host_ed25519_key"].mode == 0o600
    assert files["/etc/ssh/ssh_host_ed25519_key"].data.startswith(b"-----BEGIN OPENSSH PRIVATE")
    assert files["/etc/ssh/ssh_host_ed25519_key.pub"].data.startswith(b"ssh-ed25519 ")
    assert len(files["/etc/machine-id"].data.strip()) == 32
    other = {f.path: f for f in guestdisk.guest_files(debian_vm(), "k")}
    # two VMs from one image never share a machine-id or a host key
    assert other["/etc/machine-id"].data != files["/etc/machine-id"].data
    key = "/etc/ssh/ssh_host_ed25519_key"
    assert other[key].data != files[key].data


def test_debugfs_script_replaces_each_file_from_its_directory() -> None:
    f = guestdisk.GuestFile("/root/.ssh/authorized_keys", b"k\n", 0o600)
    script = guestdisk.debugfs_script([f], {f.path: Path("/tmp/x/0")})
    assert script.splitlines() == [
        "cd /root/.ssh", "rm authorized_keys", "write /tmp/x/0 authorized_keys",
        "sif authorized_keys mode 0100600", "sif authorized_keys uid 0",
        "sif authorized_keys gid 0"]


@needs_e2fs
def test_prepare_writes_the_files_into_a_copy_and_leaves_the_base_alone(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    for d in ("etc/ssh", "etc/systemd/network/30-ivl0.network.d", "root/.ssh"):
        (tree / d).mkdir(parents=True)
    (tree / "etc/hostname").write_text("debian\n")
    base = tmp_path / "base.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(base), "8M"], check=True)
    before = base.read_bytes()
    disk = tmp_path / "disk-deb2.img"
    guestdisk.prepare(base, disk, debian_vm(), "ssh-ed25519 AAAAkey")
    assert base.read_bytes() == before
    cat = subprocess.run(["debugfs", "-R", "cat /etc/hostname", str(disk)],
                         capture_output=True, check=True)
    assert cat.stdout == b"deb2\n"
    stat = subprocess.run(["debugfs", "-R", "stat /root/.ssh/authorized_keys", str(disk)],
                          capture_output=True, check=True, text=True).stdout
    assert "Mode:  0600" in stat and "User:     0" in stat
    assert guestdisk.remove(tmp_path) == ["disk-deb2.img"] and not disk.exists()


@needs_e2fs
def test_prepare_fails_loudly_when_a_directory_is_missing(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)  # no /root/.ssh, no networkd drop-in directory
    base = tmp_path / "base.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(base), "8M"], check=True)
    disk = tmp_path / "disk-deb2.img"
    with pytest.raises(ImageError, match="did not reach"):
        guestdisk.prepare(base, disk, debian_vm(), "k")
    assert not disk.exists() and not disk.with_name(disk.name + ".new").exists()


def test_missing_image_names_the_make_target(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(guestdisk.IMAGE_ENV, str(tmp_path))
    with pytest.raises(ImageError, match="make debian-image"):
        guestdisk.image()


def test_render_boots_a_disk_guest_from_its_root_without_ivl_parameters(tmp_path: Path) -> None:
    vm = debian_vm()
    spec = qemu.LaunchSpec(
        vm=vm, kernel=tmp_path / "vmlinuz", initrd=tmp_path / "initrd.img",
        accel_args=Choice("tcg", "test").qemu_args, memory="384M", console=tmp_path / "c.log",
        qmp=tmp_path / "q.sock", pidfile=tmp_path / "q.pid", tap="tap-deb2", ssh_port=2202,
        ssh_key="ssh-ed25519 AAAAkey", disk=tmp_path / "disk-deb2.img")
    argv = qemu.render(spec)
    (append,) = [argv[i + 1] for i, a in enumerate(argv) if a == "-append"]
    assert "root=/dev/vda" in append.split() and "ivl." not in append
    assert f"file={tmp_path}/disk-deb2.img,format=raw,if=none,id=disk0,cache=writeback" in argv
    assert "virtio-blk-pci,drive=disk0,bus=pci.0,addr=0x6" in argv
    # the busybox guest is unchanged: no disk, its parameters on the command line
    plain = qemu.render(qemu.LaunchSpec(**{**spec.__dict__, "disk": None}))
    assert "-drive" not in plain
    assert any("ivl.name=deb2" in a for a in plain)
