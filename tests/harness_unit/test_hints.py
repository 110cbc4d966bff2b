"""Hints name a command that does what they say (issue 19)."""

from __future__ import annotations

import pytest

from harness.errors import StateError
from harness.lab import vms
from harness.lab.state import StateDir


def test_a_down_vm_points_to_restart_not_up(state_dir: StateDir) -> None:
    # `harness up` refuses while a topology is up; `restart VM` boots one VM.
    with pytest.raises(StateError, match=r"'harness restart vm2' starts it") as info:
        vms.guest(state_dir, state_dir.load(), "vm2")
    assert "harness up" not in str(info.value)
