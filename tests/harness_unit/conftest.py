from __future__ import annotations

from pathlib import Path

import pytest

from harness.lab.state import StateDir

from .support import record_default_topology


@pytest.fixture
def state_dir(tmp_path: Path) -> StateDir:
    """A state directory that records the default topology with every VM dead."""
    return record_default_topology(tmp_path / "state")
