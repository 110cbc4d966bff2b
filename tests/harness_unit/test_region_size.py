"""The harness checks a topology's region_size with the server's own parser."""

from __future__ import annotations

import argparse

import pytest

from harness.lab import topology
from ivloop_server.options import power_of_two_size


def _server_takes(text: str) -> bool:
    try:
        power_of_two_size(text)
    except argparse.ArgumentTypeError:
        return False
    return True


@pytest.mark.parametrize("size", ["32M", " 32M", "32 M", "64mb", "1GiB", "4096", "0", "3M",
                                  "lots", "", "1.5G", "-32M", "007"])
def test_harness_and_server_agree_on_region_sizes(size: str) -> None:
    assert topology._region_size_ok(size) == _server_takes(size)
