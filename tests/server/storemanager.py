"""A service manager's file-descriptor store, played in the test process.

:class:`StoreManager` does what systemd does for a ``Type=notify`` unit with
``FileDescriptorStoreMax=``: it listens on the notification socket (in a
thread, so that BARRIER=1 is answered while the test waits), keeps every
descriptor sent with ``FDSTORE=1``/``FDNAME=`` (replacing one of the same
name, dropping what does not fit), takes one out on ``FDSTOREREMOVE=1``,
closes a barrier's pipe once every earlier datagram is handled, and starts
the service with the stored descriptors from fd 3 on, named in
``LISTEN_FDNAMES``, ``LISTEN_PID`` being the service's own PID.

It is a model for fast tests of the server's side of the protocol; the
nspawn test (tests/packaging/test_host_package.py) runs the real systemd.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Self

from harness.lab.fdstore import FdStore, exec_with_fds, read_notification


class StoreManager:
    def __init__(self, directory: Path, store_max: int = 4163) -> None:
        self.address = str(directory / "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.address)
        self.fdstore = FdStore(store_max)
        #: name -> fd, in the order stored (what LISTEN_FDNAMES lists).
        self.store = self.fdstore.fds
        #: Every notification, as key -> value (fds are not shown).
        self.received: list[dict[str, str]] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name="store-manager", daemon=True)
        self._thread.start()

    # -- the notification socket -----------------------------------------

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self._closed:
            try:
                got = read_notification(self.sock)
            except OSError:
                return
            if got is None:
                continue
            fields, fds = got
            with self._cond:
                self.fdstore.apply(fields, fds)
                self.received.append(fields)
                self._cond.notify_all()

    def wait_for(self, predicate: Callable[[dict[str, str]], bool], start: int = 0,
                 timeout: float = 10.0) -> int:  # fmt: skip
        """Index of the first notification from ``start`` on that satisfies ``predicate``."""
        def found() -> int | None:
            for n in range(start, len(self.received)):
                if predicate(self.received[n]):
                    return n
            return None

        with self._cond:
            if not self._cond.wait_for(lambda: found() is not None, timeout):
                raise AssertionError(f"no such notification in {timeout} s: {self.received}")
            index = found()
            assert index is not None
            return index

    def wait_ready(self, start: int = 0) -> dict[str, str]:
        return self.received[self.wait_for(lambda f: f.get("READY") == "1", start)]

    def stored(self) -> list[str]:
        with self._cond:
            return list(self.store)

    def wait_store_empty(self, timeout: float = 10.0) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: not self.store, timeout):
                raise AssertionError(f"the store still holds {list(self.store)}")

    # -- the service ---------------------------------------------------------

    def start(self, argv: Sequence[str], stderr: Path,
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:  # fmt: skip
        """Start ``argv`` as the service, with the store's descriptors from fd 3 on."""
        with self._cond:
            fds = list(self.store.values())
            listen = self.fdstore.listen_env()
        environ = {**os.environ, "NOTIFY_SOCKET": self.address,
                   "FDSTORE": str(self.fdstore.limit), **(env or {})}  # fmt: skip
        for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            environ.pop(key, None)
        environ.update(listen)
        with stderr.open("ab") as err:
            return subprocess.Popen(
                exec_with_fds(list(argv), fds), env=environ, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=err, pass_fds=fds,
            )  # fmt: skip

    def flush(self) -> None:
        """The unit went down: the store is emptied."""
        with self._cond:
            self.fdstore.close()

    def close(self) -> None:
        self._closed = True
        self._thread.join(5)
        self.sock.close()
        self.flush()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.address)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
