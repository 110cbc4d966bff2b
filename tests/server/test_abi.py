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


def test_slot_peer_id_took_reserved0s_place(probe: list[list[str]]) -> None:
    """peer_id (QEMU peer ID of the occupant) sits where reserved0 was; nothing moved."""
    slot = {row[2]: (int(row[3]), int(row[4])) for row in probe if row[:2] == ["field", "ivl_slot"]}
    assert "reserved0" not in slot
    assert slot["peer_id"] == (4, 4)
    assert (slot["present"], slot["generation"], slot["pad0"]) == ((0, 4), (8, 8), (16, 48))
    assert (slot["mac"], slot["state"], slot["pad1"]) == ((64, 6), (72, 4), (96, 32))
    name = "peer_id"
    descr = getattr(abi.IvlSlot, name)
    assert (descr.offset, descr.size) == (4, 4)
    assert ["sizeof", "ivl_slot", "128"] in probe
