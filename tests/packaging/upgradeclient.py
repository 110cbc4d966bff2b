"""Members that live through an upgrade of ivloop-host; what they saw, as JSON files.

Copied into the nspawn container by test_host_package.py next to
fakeclient.py, and started there in the background as a user of group
ivloop:

    python3 upgradeclient.py SOCKET DIR

The test and this script take turns through files in DIR:

1. join members a and b, write ``joined.json``;
2. wait for ``upgraded`` (the test installed a newer package, whose
   postinst had the server hand over); check that a and b noticed nothing
   (no EOF, no message, the same region by inode, their slots present
   with the generation unchanged); join c, and check that it gets the same
   region, that a and b are told of it, and that doorbells ring between
   old and new members; b leaves and a must see its slot go absent
   (the new server serves them); write ``after.json``;
3. wait for ``crashed`` (the test killed the server with SIGKILL and the
   unit restarted it): a and c must see their connections close, since
   after a take-over only the server held them; write ``final.json``.

Each file holds ``{"ok": bool, "problems": [...], ...}``; a failed check
is a problem, not an exception, so the test always gets the whole story.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import time
from pathlib import Path

from fakeclient import FakeQemu  # type: ignore[import-not-found]  # copied beside it

MAX_PEERS = 8
_GENERATION = struct.Struct("<Q")
_GENERATION_OFF = 0x30  # ivl_region_hdr.generation (guest-driver/ivl_abi.h)
WAIT = 300.0


def write(directory: Path, name: str, report: dict[str, object]) -> None:
    problems = report.setdefault("problems", [])
    report["ok"] = not problems
    tmp = directory / f".{name}.tmp"
    tmp.write_text(json.dumps(report))
    tmp.replace(directory / name)


def wait_for(path: Path) -> None:
    deadline = time.monotonic() + WAIT
    while not path.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"{path} never came")
        time.sleep(0.1)


def generation(client: FakeQemu) -> int:
    value: int = _GENERATION.unpack_from(client.region, _GENERATION_OFF)[0]
    return value


def inode(client: FakeQemu) -> int:
    assert client.shm_fd is not None
    return os.fstat(client.shm_fd).st_ino


def main(sock: Path, directory: Path) -> int:
    a = FakeQemu.join(sock)
    b = FakeQemu.join(sock)
    a.expect_join(b.own_id)
    slots = {"a": a.my_slot(MAX_PEERS), "b": b.my_slot(MAX_PEERS)}
    before = {"ids": [a.own_id, b.own_id], "slots": slots, "inode": inode(a),
              "generation": generation(a)}  # fmt: skip
    write(directory, "joined.json", dict(before))

    wait_for(directory / "upgraded")
    problems: list[str] = []
    for name, client in (("a", a), ("b", b)):
        if client.pending():
            problems.append(f"{name} heard from the server across the upgrade (a message or EOF)")
        if inode(client) != before["inode"]:
            problems.append(f"{name} maps another region")
        half = client.server_half(slots[name])
        if half["present"] != 1 or half["peer_id"] != client.own_id:
            problems.append(f"{name}'s slot {slots[name]} is no longer its: {half}")
    if generation(a) != before["generation"]:
        problems.append(f"the directory changed: generation {before['generation']} -> "
                        f"{generation(a)}")  # fmt: skip
    c = FakeQemu.join(sock)
    report: dict[str, object] = {"c_id": c.own_id, "c_inode": inode(c),
                                 "generation_after_c": generation(a)}  # fmt: skip
    if inode(c) != before["inode"]:
        problems.append("c, joining after the upgrade, got another region")
    for name, client in (("a", a), ("b", b)):
        try:
            client.expect_join(c.own_id)
        except (AssertionError, OSError, EOFError) as exc:
            problems.append(f"{name} was not told of c: {exc}")
    if not problems:
        c.ring(a.own_id, 1)
        a.ring(c.own_id, 1)
        b.ring(a.own_id, 1)
        rung = {"a": a.take_interrupts(1), "c": c.take_interrupts(1)}
        report["rung"] = rung
        if rung != {"a": 2, "c": 1}:
            problems.append(f"doorbells did not ring between old and new members: {rung}")
    b.close()
    deadline = time.monotonic() + 10
    while a.server_half(slots["b"])["present"] and time.monotonic() < deadline:
        time.sleep(0.05)
    if a.server_half(slots["b"])["present"]:
        problems.append("b left, and its slot is still present 10 s later")
    report["problems"] = problems
    write(directory, "after.json", report)

    wait_for(directory / "crashed")
    final: dict[str, object] = {"problems": []}
    for name, client in (("a", a), ("c", c)):
        if not client.at_eof(timeout=10):
            final["problems"].append(  # type: ignore[attr-defined]
                f"{name}'s connection stayed open after the server was killed: something "
                "besides the server still holds it (the file-descriptor store?)")
    write(directory, "final.json", final)
    for client in (a, c):
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
