"""Choosing the accelerator: KVM only where a stock kernel really boots.

A /dev/kvm that opens is not enough: on PVM-based nested hosts a stock
kernel never gets past decompression.  The decision is a pure function of
the facts (tested without a VM); gathering the facts may boot a probe guest
once, and the answer is cached.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from harness.errors import AccelError
from harness.lab.qemu import DEFAULT_BINARY, Binary, Version

log = logging.getLogger(__name__)

KVM_GET_API_VERSION = 0xAE00
KVM_API_VERSION = 12
ACCELS = ("kvm", "tcg")
TCG_RAM_PAD_KIB = 8  # QEMU rounds guest RAM to 8 KiB; see Choice.memory_arg
TCG_DIRTY_WORD_BYTES = 64 * 4096  # one word of QEMU's dirty bitmap
FSRM_IN_TCG_MAX = Version(8, 0)  # see Choice.qemu_args_for
CACHE = Path(os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))) / "ivloop/accel.json"
VHOST_NET = "/dev/vhost-net"


@dataclass(frozen=True)
class Facts:
    kvm_usable: bool  # /dev/kvm opens and speaks the KVM API
    pvm_host: bool  # nested PVM hypervisor (stock kernels hang under KVM)
    probe_booted: bool | None  # a KVM probe guest reached init; None = not probed


@dataclass(frozen=True)
class Choice:
    accel: str
    reason: str

    @property
    def qemu_args(self) -> list[str]:
        if self.accel == "kvm":
            return ["-accel", "kvm", "-cpu", "host"]
        # TCG emulates `rep movsb` one byte at a time; without ERMS the guest
        # kernel copies with `rep movsq`, about 7x faster here.  Both the
        # shared and the lower path gain (every socket copy uses it).
        return ["-accel", "tcg,thread=multi", "-cpu", "max,erms=off"]

    def qemu_args_for(self, qemu: Binary | None) -> list[str]:
        """:attr:`qemu_args` for the QEMU that runs them (None: unknown, as 7.2).

        Newer QEMUs' TCG ``max`` CPU has FSRM (fast short rep movsb; off in
        7.2, on in 10.0).  Linux takes FSRM to imply ERMS: 6.1's memmove
        skips its short-copy check on FSRM and, without ERMS, runs the
        32-byte loop on shorter copies, and the guest hangs early in boot
        ("LSM: Security Framework initializing" is its last line).  So with
        ERMS off, FSRM goes too.  8.0 is the first release after 7.2; the
        flag exists in both, and turning it off where it is off costs nothing.
        """
        args = self.qemu_args
        if self.accel != "kvm" and qemu is not None and qemu.version >= FSRM_IN_TCG_MAX:
            args = [*args[:-1], args[-1] + ",fsrm=off"]
        return args

    def memory_arg(self, mib: int, qemu: Binary | None = None) -> str:
        """The ``-m`` value for a guest of *mib* MiB run by *qemu*.

        QEMU before 9.0 loses guest writes when it migrates a TCG guest
        (fixed upstream by 03bfc2188f, "physmem: Fix migration dirty bitmap
        coherency with TCG memory access").  Syncing the dirty bitmap of a
        RAM block whose size is a multiple of 64 pages clears it a word at
        a time without resetting the vCPUs' TLBs, so stores through TLB
        entries made before the sync are never marked dirty again; the
        destination gets stale pages and the guest kernel soon dies of a
        corrupted list.  One 8 KiB granule more than the even size sends
        the sync down its page-by-page path, which does reset the TLBs.
        KVM tracks dirty pages itself, and QEMU 9.0 and later have the fix:
        both get the plain size.  An unknown *qemu* (None) gets the padding,
        which costs 8 KiB and is always safe.
        """
        if not self._needs_ram_padding(qemu):
            return f"{mib}M"
        return f"{mib * 1024 + TCG_RAM_PAD_KIB}K"

    def loses_migration_writes(self, ram_bytes: int, qemu: Binary | None = None) -> bool:
        """Whether *qemu* may lose writes migrating RAM of this size (see memory_arg)."""
        return self._needs_ram_padding(qemu) and ram_bytes % TCG_DIRTY_WORD_BYTES == 0

    def _needs_ram_padding(self, qemu: Binary | None) -> bool:
        return self.accel != "kvm" and (qemu is None or qemu.tcg_loses_dirty_writes)

    def vhost_net(self, device_usable: bool) -> bool:
        """Whether the data NIC's tap gets ``vhost=on`` (libvirt: ``<driver name='vhost'/>``).

        What users run on a KVM host is virtio-net with vhost-net: the
        host kernel moves the frames, not QEMU's main loop, so the lower
        path ivloop is measured against must be that one where it can be.
        vhost-net needs KVM (its ioeventfds and irqfds are KVM's) and a
        /dev/vhost-net this user can open (*device_usable*,
        :func:`vhost_net_usable`); otherwise QEMU's own user-space virtio-net.
        """
        return self.accel == "kvm" and device_usable


def vhost_net_usable(dev: str = VHOST_NET) -> bool:
    """Whether *dev* opens read-write, as QEMU opens it for ``vhost=on``."""
    try:
        fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def lower_path(accel: str, vhost: bool) -> str:
    """What the lower path (the data NIC: virtio-net on a tap) is, for reports."""
    if vhost:
        return f"virtio-net, vhost-net ({accel.upper()})"
    why = " without a usable /dev/vhost-net" if accel == "kvm" else ""
    return f"virtio-net, user-space ({(accel or '?').upper()}{why})"


def decide(facts: Facts, forced: str | None = None) -> Choice:
    """The accelerator to use for *facts*, honouring a user's *forced* choice."""
    if forced is not None:
        if forced not in ACCELS:
            raise AccelError(f"--accel must be one of {', '.join(ACCELS)}, not '{forced}'")
        if forced == "kvm" and not facts.kvm_usable:
            raise AccelError("--accel kvm requested but /dev/kvm is missing or unusable")
        return Choice(forced, "forced by --accel")
    if not facts.kvm_usable:
        return Choice("tcg", "/dev/kvm missing or unusable")
    if facts.pvm_host:
        return Choice("tcg", "PVM nested hypervisor: stock kernels do not boot under its KVM")
    if facts.probe_booted is False:
        return Choice("tcg", "a KVM probe guest did not boot")
    if facts.probe_booted is None:
        return Choice("tcg", "KVM not probed")
    return Choice("kvm", "a KVM probe guest booted")


def kvm_usable(dev: str = "/dev/kvm") -> bool:
    try:
        fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return fcntl.ioctl(fd, KVM_GET_API_VERSION) == KVM_API_VERSION
    except OSError:
        return False
    finally:
        os.close(fd)


def pvm_host() -> bool:
    return Path("/sys/module/kvm_pvm").exists()


def probe_kvm(kernel: Path, initrd: Path, timeout: float = 30.0,
              qemu: str = DEFAULT_BINARY) -> bool:
    """Boot the guest image under KVM with *qemu* and report whether its init ran."""
    argv = [
        qemu, "-accel", "kvm", "-cpu", "host", "-m", "256",
        "-nodefaults", "-display", "none", "-no-reboot", "-serial", "stdio",
        "-kernel", str(kernel), "-initrd", str(initrd),
        "-append", "console=ttyS0 panic=-1 quiet",
    ]  # fmt: skip
    log.info("probing KVM with a guest boot (up to %.0f s)", timeout)
    with subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
    ) as proc:
        assert proc.stdout is not None
        os.set_blocking(proc.stdout.fileno(), False)
        seen = b""
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline and proc.poll() is None:
                seen += proc.stdout.read() or b""
                if b"ivloop-init:" in seen:
                    return True
                time.sleep(0.2)
            return False
        finally:
            proc.kill()


def _cache_key(kernel: Path, qemu: Binary | None) -> str:
    if qemu is None:
        banner = subprocess.run(
            [DEFAULT_BINARY, "--version"], capture_output=True, text=True, check=False
        ).stdout.split("\n")[0]
    else:
        banner = qemu.banner
    return f"{os.uname().release}|{banner}|{kernel.resolve()}:{kernel.stat().st_size}"


def choose(kernel: Path, initrd: Path, forced: str | None = None,
           qemu: Binary | None = None) -> Choice:
    """Gather the facts (probing at most once per host/QEMU/kernel) and decide.

    *qemu* is the binary the topology runs (None: the default on PATH).
    """
    usable = kvm_usable()
    pvm = pvm_host()
    booted: bool | None = None
    if forced is None and usable and not pvm:
        key = _cache_key(kernel, qemu)
        try:
            cached = json.loads(CACHE.read_text())
        except (OSError, ValueError):
            cached = {}
        if key in cached:
            booted = bool(cached[key])
        else:
            booted = probe_kvm(kernel, initrd,
                               qemu=qemu.path if qemu is not None else DEFAULT_BINARY)
            cached[key] = booted
            CACHE.parent.mkdir(parents=True, exist_ok=True)
            CACHE.write_text(json.dumps(cached))
    return decide(Facts(kvm_usable=usable, pvm_host=pvm, probe_booted=booted), forced)
