"""abi.py against guest-driver/ivl_abi.h, as compiled by gcc.

The probe prints what the compiler sees; the header is also parsed here so
a constant, struct or field added to the header but forgotten in the probe
(and so in abi.py) fails the test instead of passing silently.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from ivloop_server import abi

HERE = Path(__file__).resolve().parent
HEADER = HERE.parent.parent / "guest-driver" / "ivl_abi.h"
PROBE = HERE / "abi_probe.c"


def _strip_comments(text: str) -> str:
    return re.sub(r"/\*.*?\*/", "", text, flags=re.S)


def header_constants() -> set[str]:
    text = _strip_comments(HEADER.read_text())
    names = set(re.findall(r"^#define[ \t]+(IVL_\w+)[ \t]+\S", text, flags=re.M))
    for body in re.findall(r"\benum\s+\w+\s*\{(.*?)\}", text, flags=re.S):
        names |= set(re.findall(r"\b(IVL_\w+)\s*=", body))
    return names


def header_structs() -> dict[str, list[str]]:
    text = _strip_comments(HEADER.read_text())
    structs: dict[str, list[str]] = {}
    for name, body in re.findall(r"\bstruct\s+(ivl_\w+)\s*\{(.*?)\};", text, flags=re.S):
        structs[name] = re.findall(r"^\s*\w+\s+(\w+)\s*(?:\[[^\]]*\])?\s*;", body, flags=re.M)
    return structs


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> list[list[str]]:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc not found: cannot compile the ABI probe")
    exe = tmp_path_factory.mktemp("abi") / "abi_probe"
    subprocess.run(
        [gcc, "-std=c11", "-Wall", "-Wextra", "-Werror", "-I", str(HEADER.parent),
         "-o", str(exe), str(PROBE)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return [line.split() for line in out.splitlines()]


def test_header_parse_finds_things() -> None:
    # Guards the guards: a broken regex would make the completeness checks vacuous.
    assert {"IVL_MAGIC", "IVL_NR_VECTORS", "IVL_STATE_UP"} <= header_constants()
    assert set(header_structs()) == set(abi.STRUCTS)
    assert header_structs()["ivl_slot"][:3] == ["present", "peer_id", "generation"]


def test_probe_covers_whole_header(probe: list[list[str]]) -> None:
    consts = {row[1] for row in probe if row[0] == "const"}
    assert consts == header_constants()
    fields: dict[str, list[str]] = {}
    for row in probe:
        if row[0] == "field":
            fields.setdefault(row[1], []).append(row[2])
    assert fields == header_structs()


def test_constants_match(probe: list[list[str]]) -> None:
    mismatches = {}
    for kind, name, value in (row for row in probe if row[0] == "const"):
        assert kind == "const"
        mirrored = getattr(abi, name, None)
        if mirrored is None or int(mirrored) != int(value):
            mismatches[name] = (value, mirrored)
    assert mismatches == {}


def test_struct_sizes_match(probe: list[list[str]]) -> None:
    for _, name, size in (row for row in probe if row[0] == "sizeof"):
        assert ctypes.sizeof(abi.STRUCTS[name]) == int(size), name


def test_field_offsets_and_sizes_match(probe: list[list[str]]) -> None:
    checked = 0
    for _, struct, field, offset, size in (row for row in probe if row[0] == "field"):
        descr = getattr(abi.STRUCTS[struct], field)
        assert (descr.offset, descr.size) == (int(offset), int(size)), f"{struct}.{field}"
        checked += 1
    assert checked == sum(len(s._fields_) for s in abi.STRUCTS.values())


def test_slot_state_enum_matches_constants() -> None:
    assert [int(s) for s in abi.IvlSlotState] == [0, 1, 2]
    assert abi.IVL_STATE_LEAVING is abi.IvlSlotState.IVL_STATE_LEAVING


# ABI 2 slot, as the header spells it: (offset, size) of every field.
SLOT_V2 = {
    "present": (0, 4), "peer_id": (4, 4), "generation": (8, 8),
    "srv_seq": (16, 4), "srv_flags": (20, 4), "nic_mac": (24, 6), "reserved0": (30, 2),
    "pad0": (32, 32),
    "mac": (64, 6), "reserved1": (70, 2), "state": (72, 4), "seq": (76, 4),
    "heartbeat": (80, 8), "joined_gen": (88, 8), "leave_ack": (96, 8), "pad1": (104, 24),
}  # fmt: skip


def test_slot_layout_is_abi_2(probe: list[list[str]]) -> None:
    """The slot as the compiler lays it out, field by field, and the mirror agrees.

    Fields ABI 1 had kept their places (a version check, not a moved field,
    is what turns an ABI-1 guest away); each half stays in its own cache line.
    """
    slot = {row[2]: (int(row[3]), int(row[4])) for row in probe if row[:2] == ["field", "ivl_slot"]}
    assert slot == SLOT_V2
    mirrored = {name: (getattr(abi.IvlSlot, name).offset, getattr(abi.IvlSlot, name).size)
                for name, *_ in abi.IvlSlot._fields_}  # fmt: skip
    assert mirrored == SLOT_V2
    server_half = {"present", "peer_id", "generation", "srv_seq", "srv_flags", "nic_mac"}
    guest_half = {"mac", "state", "seq", "heartbeat", "joined_gen", "leave_ack"}
    assert all(off + size <= abi.IVL_CACHELINE for name, (off, size) in slot.items()
               if name in server_half)  # fmt: skip
    assert all(off >= abi.IVL_CACHELINE for name, (off, size) in slot.items()
               if name in guest_half)  # fmt: skip
    assert ["sizeof", "ivl_slot", "128"] in probe


def test_abi_2_constants(probe: list[list[str]]) -> None:
    consts = {row[1]: int(row[2]) for row in probe if row[0] == "const"}
    assert consts["IVL_ABI_VERSION"] == abi.IVL_ABI_VERSION == 2
    assert (consts["IVL_SLOT_F_MAC_KNOWN"], consts["IVL_SLOT_F_EVICTED"]) == (1, 2)
    assert consts["IVL_SLOT_KNOWN_FLAGS"] == abi.IVL_SLOT_F_MAC_KNOWN | abi.IVL_SLOT_F_EVICTED
    assert consts["IVL_LEAVE_ACK_MS"] == abi.IVL_LEAVE_ACK_MS == 500
