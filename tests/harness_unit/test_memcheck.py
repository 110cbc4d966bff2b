"""Reading ivl-memcheck's verdict."""

from __future__ import annotations

import pytest

from harness.errors import GuestError
from harness.lab import memcheck


def test_a_clean_run_is_ok() -> None:
    r = memcheck.parse("ivl-memcheck: sweeps 5120 pages 4096 lost 0 stray 0\n")
    assert r is not None and r.ok and (r.sweeps, r.pages) == (5120, 4096)


def test_lost_and_stray_writes_fail_and_keep_the_pages() -> None:
    text = ("ivl-memcheck: page 17 holds 41 tag 0x69766c6d00000011, want 42: lost write\n"
            "ivl-memcheck: sweeps 900 pages 4096 lost 1 stray 2\n")
    r = memcheck.parse(text)
    assert r is not None and not r.ok and (r.lost, r.stray) == (1, 2)
    assert "page 17" in r.detail


def test_no_summary_is_no_verdict() -> None:
    assert memcheck.parse("") is None
    assert memcheck.parse("ivl-memcheck: mmap: Cannot allocate memory\n") is None


class FakeGuest:
    """Answers like a guest that rebooted since the writer started."""

    vm = "vm2"

    def __init__(self) -> None:
        self.commands: list[str] = []

    def status(self, command: str) -> tuple[int, str]:
        self.commands.append(command)
        return 1, "sh: can't kill pid 143: No such process"

    def run(self, command: str) -> str:
        raise AssertionError(f"no summary to read after a failed kill: {command}")


def test_a_writer_gone_with_its_guest_is_an_error_not_a_pass() -> None:
    g = FakeGuest()
    with pytest.raises(GuestError, match="ivl-memcheck is not running"):
        memcheck.stop(g, 143)  # type: ignore[arg-type]
    assert g.commands[0] == "kill 143"
