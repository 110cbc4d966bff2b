"""Learning a QEMU's data-NIC MAC: command lines, the operator's map, /proc."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.lab import qemu, topology
from harness.lab.accel import Choice
from ivloop_server.errors import ConfigError, NicMapError
from ivloop_server.nic import (
    ProcNicResolver,
    load_nic_map,
    parse_mac,
    parse_nic_map,
    parse_qemu_cmdline,
    read_cmdline,
    split_keyval,
)

MAC1, MAC2, MAC3 = "52:54:00:00:00:01", "52:54:00:00:00:02", "52:54:00:00:00:03"


def mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def data_nic(*argv: str) -> tuple[bytes | None, str]:
    return parse_qemu_cmdline(["qemu-system-x86_64", *argv]).data_nic()


# -- pieces ------------------------------------------------------------------


@pytest.mark.parametrize("text", [MAC1, "52-54-00-00-00-01", "52:54:00:00:00:01".upper()])
def test_parse_mac(text: str) -> None:
    assert parse_mac(text) == mac(MAC1)


@pytest.mark.parametrize(
    "text", ["", "52:54:00:00:00", "52:54:00:00:00:01:02", "52:54:00-00:00:01", "zz:54:00:00:00:01",
             "525400000001", " 52:54:00:00:00:01"],
)  # fmt: skip
def test_parse_mac_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="is not a MAC address"):
        parse_mac(text)


def test_split_keyval_follows_qemuopts() -> None:
    assert split_keyval("virtio-net-pci,netdev=n0,mac=52:54:00:00:00:01", "driver") == {
        "driver": "virtio-net-pci", "netdev": "n0", "mac": MAC1,
    }  # fmt: skip
    assert split_keyval("driver=e1000,id=a,,b", "driver") == {"driver": "e1000", "id": "a,b"}
    assert split_keyval("vm,,1,debug-threads=on", "guest") == {
        "guest": "vm,1", "debug-threads": "on",
    }  # fmt: skip
    assert split_keyval("tap,vhost,id=x,id=y,", "type") == {"type": "tap", "vhost": "on", "id": "y"}
    assert split_keyval("", "type") == {}


# -- command lines -------------------------------------------------------------


def test_harness_command_line_names_the_data_nic(tmp_path: Path) -> None:
    """The harness's own template: data NIC on a tap, management NIC on user-mode."""
    vm = topology.load().vm("vm2")
    argv = qemu.render(qemu.LaunchSpec(
        vm=vm, kernel=tmp_path / "k", initrd=tmp_path / "i",
        accel_args=Choice("tcg", "test").qemu_args, memory="256M", console=tmp_path / "c",
        qmp=tmp_path / "q", pidfile=tmp_path / "p", tap="tap-vm2", ssh_port=2202,
        ssh_key="ssh-ed25519 AAAA", ivshmem_socket=tmp_path / "s.sock",
    ))  # fmt: skip
    cmdline = parse_qemu_cmdline(argv)
    assert cmdline.name == "vm2"
    assert [n.backend for n in cmdline.nics] == ["tap", "user"]
    found, how = cmdline.data_nic()
    assert found == mac(vm.mac), how
    assert found != mac(vm.mgmt_mac)
    assert "not on user-mode" in how


def test_libvirt_json_form() -> None:
    argv = [
        "/usr/bin/qemu-system-x86_64", "-name", "guest=web1,debug-threads=on", "-nodefaults",
        "-netdev", json.dumps({"type": "tap", "fd": "27", "vhost": True, "id": "hostnet0"}),
        "-device", json.dumps({"driver": "virtio-net-pci", "netdev": "hostnet0", "id": "net0",
                               "mac": MAC3, "bus": "pci.0", "addr": "0x3"}),
        "-device", json.dumps({"driver": "ivshmem-doorbell", "id": "shmem0",
                               "chardev": "charshmem0", "vectors": 2}),
    ]  # fmt: skip
    cmdline = parse_qemu_cmdline(argv)
    assert cmdline.name == "web1"
    assert cmdline.data_nic() == (
        mac(MAC3), "command line, its only NIC: -device virtio-net-pci id=net0",
    )  # fmt: skip


@pytest.mark.parametrize(
    "argv",
    [
        ["-nic", f"tap,model=virtio-net-pci,mac={MAC1}"],
        ["-nic", f"bridge,br=br0,mac={MAC1}", "-nic", f"user,mac={MAC2}"],
        ["-net", f"nic,model=e1000,macaddr={MAC1}", "-net", "tap,ifname=t0"],
        ["-netdev", "tap,id=n0", "-net", f"nic,netdev=n0,macaddr={MAC1}"],
        ["-netdev", "tap,id=n0", "-device", f"e1000,netdev=n0,mac={MAC1}"],
        ["-netdev", "tap,id=n0", "-device", f"e1000e,netdev=n0,mac={MAC1}"],
        ["-netdev", "tap,id=n0",
         "--device", f"virtio-net-pci-non-transitional,netdev=n0,mac={MAC1}"],
        ["-netdev", "socket,id=n0", "-device", f"driver=rtl8139,netdev=n0,mac={MAC1}"],
        # A model this server has never heard of is still a NIC if it has a MAC.
        ["-netdev", "tap,id=n0", "-device", f"fancy-nic-9000,netdev=n0,mac={MAC1}"],
        # -set edits a device given earlier.
        ["-netdev", "tap,id=n0", "-device", f"virtio-net-pci,id=d0,netdev=n0,mac={MAC2}",
         "-set", f"device.d0.mac={MAC1}"],
        # Values that look like options are arguments, not options.
        ["-append", "console=ttyS0 -device virtio-net-pci,mac=52:54:00:00:00:09", "-nic",
         f"tap,mac={MAC1}"],
    ],
)  # fmt: skip
def test_nic_forms(argv: list[str]) -> None:
    found, how = data_nic(*argv)
    assert found == mac(MAC1), how


@pytest.mark.parametrize(
    ("argv", "reason"),
    [
        ([], "no NIC on its command line"),
        (["-nodefaults", "-device", "virtio-rng-pci"], "no NIC on its command line"),
        (["-nic", "none"], "no NIC"),
        (["-netdev", "tap,id=a", "-netdev", "tap,id=b",
          "-device", f"virtio-net-pci,netdev=a,mac={MAC1}",
          "-device", f"e1000,netdev=b,mac={MAC2}"], "2 NICs could be the data NIC"),
        (["-nic", f"user,mac={MAC1}", "-nic", f"user,mac={MAC2}"], "2 NICs, all user-mode"),
        (["-netdev", "tap,id=a", "-device", "virtio-net-pci,netdev=a"], "has no mac="),
        (["-device", "virtio-net-pci,netdev=a,mac=52:54:00:zz:00:01"], "is not a MAC address"),
        (["-device", '{"driver": "virtio-net-pci", "mac": '], "JSON does not parse"),
        (["-device", '{"driver": "e1000", "mac": "x"}  '], "is not a MAC address"),
        (["-nic", "tap,mac=banana"], "is not a MAC address"),
        (["-nic", f"tap,mac={MAC1}", "-readconfig", "/etc/vm.cfg"], "-readconfig"),
        (["-nic", f"tap,mac={MAC1}", "-global", f"virtio-net-pci.mac={MAC2}"], "-global"),
        (["-nic", f"tap,mac={MAC1}", "-set", f"device.other.mac={MAC2}"], "-set"),
        (["-nic", f"tap,mac={MAC1}", "-device"], "-device without an argument"),
    ],
)  # fmt: skip
def test_unknown_data_nic_says_why(argv: list[str], reason: str) -> None:
    found, how = data_nic(*argv)
    assert found is None
    assert reason in how


def test_several_nics_are_all_listed() -> None:
    _, how = data_nic("-netdev", "tap,id=a", "-netdev", "tap,id=b",
                      "-device", f"virtio-net-pci,netdev=a,mac={MAC1}",
                      "-device", "e1000,netdev=b")  # fmt: skip
    assert MAC1 in how and "MAC chosen by QEMU" in how and "on tap" in how


@pytest.mark.parametrize(
    ("argv", "name"),
    [(["-name", "vm1"], "vm1"), (["-name", "guest=vm1,debug-threads=on"], "vm1"),
     (["-name", "vm1,process=qemu-vm1"], "vm1"), (["-name", "a,,b"], "a,b"),
     (["-name", "debug-threads=on"], None), ([], None), (["--name", "x"], "x")],
)  # fmt: skip
def test_name_forms(argv: list[str], name: str | None) -> None:
    assert parse_qemu_cmdline(["qemu", *argv]).name == name


def test_garbage_never_raises() -> None:
    rng = random.Random(16)
    words = ["-device", "-nic", "-net", "-netdev", "-name", "-set", "-global", "-readconfig",
             "{", "}", '{"driver":', ",", ",,", "=", "mac=", "netdev=", "id=", "nic", "user",
             "virtio-net-pci", MAC1, "\udcff", "", "--", "-", "e1000,mac=zz"]  # fmt: skip
    for _ in range(3000):
        argv = ["".join(rng.choices(words, k=rng.randint(1, 3))) for _ in range(rng.randint(0, 12))]
        result = parse_qemu_cmdline(argv)
        found, how = result.data_nic()
        assert found is None or len(found) == 6
        assert isinstance(how, str) and how


# -- the operator's map -----------------------------------------------------------


def test_map_file_good(tmp_path: Path) -> None:
    path = tmp_path / "nics"
    path.write_text(
        "# data NICs of the guests with two tap NICs\n"
        f"vm1 {MAC1}\n"
        "\n"
        f"guest=vm2   52-54-00-00-00-02   # libvirt spelling of the name\n"
        f"   db,1 {MAC3}\n"
    )
    assert load_nic_map(path) == {"vm1": mac(MAC1), "vm2": mac(MAC2), "db,1": mac(MAC3)}
    empty = tmp_path / "empty"
    empty.write_text("# nobody yet\n")
    assert load_nic_map(empty) == {}


def test_map_file_bad_lines_are_all_reported() -> None:
    lines = [
        f"vm1 {MAC1}",
        "vm2",  # 2: one field
        f"vm3 {MAC2} extra",  # 3: three fields
        "vm4 52:54:00:00:00",  # 4: bad MAC
        "vm5 01:00:5e:00:00:01",  # 5: multicast
        "vm6 00:00:00:00:00:00",  # 6: zero
        f"vm1 {MAC3}",  # 7: name again
        f"vm8 {MAC1}",  # 8: MAC again
        f"guest= {MAC3}",  # 9: empty name
    ]
    with pytest.raises(NicMapError) as info:
        parse_nic_map(lines, "nics.map")
    problems = info.value.problems
    assert [p.split(":")[0] for p in problems] == [f"line {n}" for n in range(2, 10)]
    text = str(info.value)
    assert text.startswith("bad --nic-macs file nics.map: line 2: expected 'NAME MAC'")
    for part in ("got 3 field(s)", "is not a MAC address", "multicast", "all zeroes",
                 "vm1 already mapped on line 1", "already vm1's (line 1)",
                 "is not a QEMU -name"):  # fmt: skip
        assert part in text, part
    assert "\n" not in text  # the CLI prints errors on one line


def test_map_file_unusable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read --nic-macs file .*missing"):
        load_nic_map(tmp_path / "missing")
    with pytest.raises(ConfigError, match="cannot read"):
        load_nic_map(tmp_path)  # a directory
    binary = tmp_path / "bin"
    binary.write_bytes(b"vm1 \xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_nic_map(binary)
    big = tmp_path / "big"
    big.write_bytes(b"#" * ((1 << 20) + 1))
    with pytest.raises(ConfigError, match="larger than"):
        load_nic_map(big)


# -- /proc ------------------------------------------------------------------------


def test_own_process_through_proc() -> None:
    """The production path on a real pid: this test process has no NIC."""
    ident = ProcNicResolver().resolve(os.getpid())
    assert ident.mac is None
    assert ident.source == "no NIC on its command line"
    assert ident.start_time is not None and ident.key == (os.getpid(), ident.start_time)
    assert read_cmdline(os.getpid())[0] == sys.argv[0] or "python" in read_cmdline(os.getpid())[0]


@pytest.fixture
def fake_qemu_process() -> Iterator[subprocess.Popen[bytes]]:
    """A process whose argv is a QEMU command line (it only sleeps)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; print(flush=True); sys.stdin.read()",
         "-name", "guest=vm7",
         "-netdev", "tap,id=d", "-device", f"virtio-net-pci,netdev=d,mac={MAC1}",
         "-netdev", "user,id=m", "-device", f"virtio-net-pci,netdev=m,mac={MAC2}"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    proc.stdout.readline()  # exec'd and running: /proc shows its own argv
    yield proc
    proc.stdout.close()
    assert proc.stdin is not None
    proc.stdin.close()
    proc.wait(10)


def test_other_process_through_proc(fake_qemu_process: subprocess.Popen[bytes]) -> None:
    ident = ProcNicResolver().resolve(fake_qemu_process.pid)
    assert (ident.mac, ident.name) == (mac(MAC1), "vm7")
    assert ident.source.startswith("command line")


def test_map_wins_and_a_disagreement_is_reported(
    fake_qemu_process: subprocess.Popen[bytes],
) -> None:
    pid = fake_qemu_process.pid
    ident = ProcNicResolver({"vm7": mac(MAC2)}).resolve(pid)
    assert (ident.mac, ident.source, ident.warning) == (mac(MAC2), "--nic-macs map", None)
    ident = ProcNicResolver({"vm7": mac(MAC3)}).resolve(pid)
    assert ident.mac == mac(MAC3)
    assert ident.warning is not None and MAC1 in ident.warning and "using the map" in ident.warning
    assert ProcNicResolver({"other": mac(MAC3)}).resolve(pid).mac == mac(MAC1)


def test_proc_trouble_is_a_reason_not_a_crash() -> None:
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait(10)
    assert ProcNicResolver().resolve(done.pid).source == f"process {done.pid} is gone"
    assert "did not say" in ProcNicResolver().resolve(0).source

    def denied(pid: int, proc: Path) -> list[str]:
        raise PermissionError(13, "Permission denied")

    def broken(pid: int, proc: Path) -> list[str]:
        raise OSError(5, "Input/output error")

    def empty(pid: int, proc: Path) -> list[str]:
        return []

    pid = os.getpid()
    assert ProcNicResolver(reader=denied).resolve(pid).source == (
        f"cannot read /proc/{pid}/cmdline: permission denied"
    )
    assert "Input/output error" in ProcNicResolver(reader=broken).resolve(pid).source
    assert "empty command line" in ProcNicResolver(reader=empty).resolve(pid).source
    for ident in (ProcNicResolver(reader=r).resolve(pid) for r in (denied, broken, empty)):
        assert ident.mac is None


def test_proc_root_is_honoured(tmp_path: Path) -> None:
    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "cmdline").write_bytes(
        b"qemu\0-nic\0tap,mac=52:54:00:00:00:01\0-name\0odd\xffname\0"
    )
    (tmp_path / "42" / "stat").write_text("42 (qemu (x) y) S " + " ".join(["1"] * 18) + " 777 0\n")
    ident = ProcNicResolver(proc=tmp_path).resolve(42)
    assert (ident.mac, ident.start_time) == (mac(MAC1), 777)
    assert ident.name == "odd\udcffname"
