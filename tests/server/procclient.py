"""Connect to an ivloop-server as a process whose argv is a QEMU command line.

    python procclient.py SOCKET CHANNEL_FD [QEMU ARGS...]

The server reads the connecting process's /proc/PID/cmdline, so the test
needs a real process carrying the QEMU arguments.  This one connects, hands
the connected socket to the test over CHANNEL_FD (SCM_RIGHTS), so the test
can speak the protocol with its FakeQemu, and stays alive until the test
closes its end of the channel.
"""

from __future__ import annotations

import socket
import sys


def main() -> int:
    path, channel_fd = sys.argv[1], int(sys.argv[2])
    channel = socket.socket(fileno=channel_fd)
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(path)
    socket.send_fds(channel, [b"fd"], [conn.fileno()])
    conn.close()
    channel.recv(1)  # until the test closes its end
    return 0


if __name__ == "__main__":
    sys.exit(main())
