"""The values ivloop-server's options take, parsed and checked.

Each ``str -> value`` parser here is an argparse ``type=``: it raises
:class:`argparse.ArgumentTypeError` with the message the command line
prints.  They are public so that other tools read values the way the server
does (the harness checks a topology's region size with :func:`parse_size`
and :func:`power_of_two_size`).  :func:`hugetlbfs_page_size` checks the
``-m`` directory once the options are parsed, raising
:class:`~ivloop_server.errors.ConfigError`.
"""

from __future__ import annotations

import argparse
import grp
import os
import re
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

from . import abi
from .errors import ConfigError
from .region import format_size, is_power_of_two
from .server import MAX_VECTORS

#: QEMU's size syntax (qemu_strtosz, which ivshmem-server's -l uses): a
#: number, possibly with a fraction, and one of B K M G T P E; ours adds
#: KiB/KB-style spellings.  Binary multiples throughout.
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:([kmgtpe])(?:i?b)?|b)?\s*$", re.IGNORECASE)
_SHIFTS = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}
_SIZE_EXAMPLES = "examples: 4096, 256K, 4M, 1.5G"


def parse_size(text: str) -> int:
    """Parse 4096, 64K, 32M, 1G, 1.5G, 0x400000 (also 32MiB, 32mb): binary multiples."""
    if text.strip().lower().startswith("0x"):
        try:
            return int(text.strip(), 16)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a size ({_SIZE_EXAMPLES})") from None
    match = _SIZE_RE.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size ({_SIZE_EXAMPLES})")
    value = Fraction(match.group(1)) * (1 << _SHIFTS[(match.group(2) or "").lower()])
    if value.denominator != 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of bytes")
    return int(value)


def power_of_two_size(text: str) -> int:
    """A size as :func:`parse_size` reads it that is also a power of two (-l, --ring-size)."""
    value = parse_size(text)
    if not is_power_of_two(value):
        raise argparse.ArgumentTypeError(
            f"{text} is not a power of two (try {format_size(1 << max(value, 1).bit_length())})"
        )
    return value


def socket_mode(text: str) -> int:
    """Permission bits written in octal, like 0660 (--socket-mode)."""
    try:
        return int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an octal mode like 0660") from None


def group(text: str) -> int:
    """A group's GID, given as a number or a name (--socket-group)."""
    if text.isdigit():
        return int(text)
    try:
        return grp.getgrnam(text).gr_gid
    except KeyError:
        raise argparse.ArgumentTypeError(f"no group named {text!r}") from None


def int_in(low: int, high: int) -> Callable[[str], int]:
    """A parser of integers (decimal, 0x, 0o, 0b) from ``low`` to ``high`` inclusive."""

    def parse(text: str) -> int:
        try:
            value = int(text, 0)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is outside {low}..{high}")
        return value

    return parse


def vectors(text: str) -> int:
    """Doorbell vectors per peer: at least the ones ivloop uses, at most MAX_VECTORS (-n)."""
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < abi.IVL_NR_VECTORS:
        raise argparse.ArgumentTypeError(
            f"{value} vectors is too few for ivloop, which needs {abi.IVL_NR_VECTORS} (0: "
            f"membership, 1: data): use {abi.IVL_NR_VECTORS}, and vectors={abi.IVL_NR_VECTORS} on "
            "QEMU's ivshmem-doorbell"
        )
    if value > MAX_VECTORS:
        raise argparse.ArgumentTypeError(f"{value} is outside {abi.IVL_NR_VECTORS}..{MAX_VECTORS}")
    return value


def hugetlbfs_page_size(directory: Path) -> int:
    """Huge page size of the hugetlbfs mount ``directory`` is in, or ConfigError."""
    try:
        real = directory.resolve(strict=True)
        mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"-m {directory}: {exc.strerror or exc}") from exc
    best, fstype = "", ""
    for line in mounts:
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        point = fields[4].replace("\\040", " ")
        inside = str(real) == point or str(real).startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, fstype = point, line.split(" - ", 1)[1].split()[0]
    if fstype != "hugetlbfs":
        raise ConfigError(
            f"-m {directory}: not a hugetlbfs mount ({fstype or 'unknown'} at {best or '?'}); "
            "ivloop-server keeps its region in a sealed memfd, so -m only makes sense for huge "
            "pages (mount -t hugetlbfs none DIR); drop -m otherwise"
        )
    return os.statvfs(real).f_bsize
