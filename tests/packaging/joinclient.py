"""Join an ivloop-server's region as QEMU does; say what was found, as JSON on stdout.

Copied into the nspawn container by test_host_package.py, next to a copy
of tests/server/fakeclient.py (the project's own protocol client, standard
library only), and run there by the system's python3 as an unprivileged
user:

    python3 joinclient.py SOCKET [--wait-status UNIT TEXT] [-- QEMU ARGS...]

The handshake: version 0, own ID, -1 with the region's fd (SCM_RIGHTS),
then the own eventfds.  The region is mapped and its header and the
joiner's directory slot are read.  QEMU ARGS are not used here: they are
on this process's command line for the server, which reads it from
/proc/PID/cmdline to learn the joiner's NIC MAC, as it does for QEMU.
With ``--wait-status``, the unit's StatusText is read while the client is
still a member, until it contains TEXT (5 s at most).

Exit status: 0 joined; 3 the connect was refused (the errno's name is
reported); 1 anything else (a traceback).
"""

from __future__ import annotations

import errno
import json
import struct
import subprocess
import sys
import time
from pathlib import Path

from fakeclient import FakeQemu  # type: ignore[import-not-found]  # copied beside it

# Header offsets (guest-driver/ivl_abi.h): magic, version, region_size, max_peers.
_HDR = struct.Struct("<IIQI")


def _wait_status(unit: str, text: str) -> str:
    cmd = ["systemctl", "show", "-p", "StatusText", "--value", unit]
    deadline = time.monotonic() + 5.0
    while True:
        out = subprocess.run(cmd, capture_output=True, text=True, check=False).stdout.strip()
        if text in out or time.monotonic() > deadline:
            return out
        time.sleep(0.1)


def main(argv: list[str]) -> int:
    own = argv[: argv.index("--")] if "--" in argv else argv
    sock = Path(own[0])
    wait = own[2:4] if len(own) == 4 and own[1] == "--wait-status" else None
    try:
        client = FakeQemu.join(sock)
    except PermissionError as exc:
        print(json.dumps({"refused": errno.errorcode.get(exc.errno or 0, str(exc.errno))}))
        return 3
    with client:
        magic, version, size, max_peers = _HDR.unpack_from(client.region, 0)
        slot = client.my_slot(max_peers)
        half = client.server_half(slot)
        report: dict[str, object] = {
            "own_id": client.own_id,
            "magic": magic,
            "version": version,
            "region_size": size,
            "mapped": len(client.region),
            "max_peers": max_peers,
            "slot": slot,
            "present": half["present"],
            "srv_flags": half["srv_flags"],
            "nic_mac": half["nic_mac"].hex(":"),
            "vectors": len(client.own_vectors),
        }
        if wait is not None:
            report["status"] = _wait_status(wait[0], wait[1])
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
