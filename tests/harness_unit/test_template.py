"""QEMU command lines rendered from the jinja2 template."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from harness.lab import qemu, topology
from harness.lab.accel import Choice


def spec(tmp_path: Path, **kw: object) -> qemu.LaunchSpec:
    vm = topology.load().vm("vm2")
    args: dict[str, object] = {
        "vm": vm, "kernel": tmp_path / "vmlinuz", "initrd": tmp_path / "initrd.img",
        "accel_args": Choice("tcg", "test").qemu_args,
        "memory": Choice("tcg", "test").memory_arg(vm.memory), "console": tmp_path / "c.log",
        "qmp": tmp_path / "q.sock", "pidfile": tmp_path / "q.pid", "tap": "tap-vm2",
        "ssh_port": 2202, "ssh_key": "ssh-ed25519 AAAAkey",
    }
    args.update(kw)
    return qemu.LaunchSpec(**args)  # type: ignore[arg-type]


def opt(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_render_places_devices_at_fixed_pci_addresses(tmp_path: Path) -> None:
    argv = qemu.render(spec(tmp_path, ivshmem_socket=tmp_path / "s.sock"))
    devices = opt(argv, "-device")
    assert "virtio-net-pci,netdev=data,mac=52:54:00:77:00:02,bus=pci.0,addr=0x2" in devices
    assert any(d.startswith("virtio-net-pci,netdev=mgmt") and d.endswith("addr=0x3")
               for d in devices)
    assert (f"ivshmem-doorbell,id={qemu.IVSHMEM_ID},chardev=ivsh0,vectors=2,bus=pci.0,"
            f"addr={qemu.IVSHMEM_ADDR}") in devices
    assert f"socket,id=ivsh0,path={tmp_path}/s.sock" in opt(argv, "-chardev")


def test_render_without_ivshmem_leaves_the_slot_free(tmp_path: Path) -> None:
    argv = qemu.render(spec(tmp_path))
    assert not any("ivshmem-doorbell" in d for d in opt(argv, "-device"))
    assert "-chardev" not in argv and "-incoming" not in argv


def test_render_passes_guest_config_on_the_kernel_command_line(tmp_path: Path) -> None:
    (append,) = opt(qemu.render(spec(tmp_path, lower_only=True)), "-append")
    words = append.split()
    assert "ivl.name=vm2" in words and "ivl.ip=10.77.0.2/24" in words
    assert "ivl.ip6=fd77::2/64" in words and "ivl.mac=52:54:00:77:00:02" in words
    assert "ivl.key=ssh-ed25519:AAAAkey" in words and "ivl.lower=1" in words


def test_render_appends_the_vms_extra_kernel_args(tmp_path: Path) -> None:
    vm = dataclasses.replace(topology.load().vm("vm2"), kernel_args="profile=2 nokaslr")
    append = opt(qemu.render(spec(tmp_path, vm=vm)), "-append")[0]
    assert append.endswith(" profile=2 nokaslr")
    assert "profile" not in opt(qemu.render(spec(tmp_path)), "-append")[0]


def test_render_accel_and_management_network(tmp_path: Path) -> None:
    argv = qemu.render(spec(tmp_path))
    assert opt(argv, "-accel") == ["tcg,thread=multi"] and opt(argv, "-cpu") == ["max,erms=off"]
    (mgmt,) = [n for n in opt(argv, "-netdev") if n.startswith("user,")]
    assert "hostfwd=tcp:127.0.0.1:2202-:22" in mgmt and "restrict=on" in mgmt
    assert "tap,id=data,ifname=tap-vm2,script=no,downscript=no" in opt(argv, "-netdev")


def test_render_incoming_defers_migration(tmp_path: Path) -> None:
    assert opt(qemu.render(spec(tmp_path, incoming=True)), "-incoming") == ["defer"]


def test_render_gives_tcg_guests_the_padded_ram_size(tmp_path: Path) -> None:
    assert opt(qemu.render(spec(tmp_path)), "-m") == [f"{256 * 1024 + 8}K"]


def test_render_tells_the_guest_the_topologys_mtu(tmp_path: Path) -> None:
    vm = dataclasses.replace(topology.load().vm("vm2"), mtu=9000)
    words = opt(qemu.render(spec(tmp_path, vm=vm)), "-append")[0].split()
    assert "ivl.mtu=9000" in words
    # nothing of the kind without [network] mtu: the guest keeps the kernel's 1500
    assert not any(w.startswith("ivl.mtu") for w in opt(qemu.render(spec(tmp_path)),
                                                        "-append")[0].split())


def test_the_data_nic_runs_vhost_net_only_when_asked(tmp_path: Path) -> None:
    """accel.Choice.vhost_net decides (KVM and /dev/vhost-net); the template obeys."""
    data = [n for n in opt(qemu.render(spec(tmp_path, vhost_net=True)), "-netdev")
            if n.startswith("tap,")]
    assert data == ["tap,id=data,ifname=tap-vm2,script=no,downscript=no,vhost=on"]
    plain = [n for n in opt(qemu.render(spec(tmp_path)), "-netdev") if n.startswith("tap,")]
    assert plain == ["tap,id=data,ifname=tap-vm2,script=no,downscript=no"]
