# ivloop — shared-memory networking for co-resident QEMU/KVM guests.
#
#   make demo    the main job: boot, show the shared path, migrate, report
#   make test    every test, VM tests included (installs what is missing)
#
# Setup targets (deps, image) are separate from checks; every target that
# needs them depends on them, so a fresh Debian 12 machine needs nothing else.

SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST := $(VENV)/bin/pytest
HARNESS := $(VENV)/bin/harness
VM_LOCK ?= /tmp/ivloop-vm.lock

# Host packages: QEMU and image tooling, compilers for the module and the
# fuzzer, and the guest's tools (so dpkg can name the packages owning their
# libraries when the image is assembled).
APT_PACKAGES := qemu-system-x86 qemu-utils iproute2 kmod cpio gzip xz-utils zstd \
	binutils gcc libc6-dev make clang libclang-rt-14-dev python3-venv util-linux \
	busybox-static iperf3 sockperf dropbear-bin ethtool pciutils dash \
	linux-source-6.1 dkms debootstrap e2fsprogs libvirt-dev pkg-config \
	libvirt-daemon-system libvirt-clients

# What `make deb` builds with (debian/control's Build-Depends) and checks
# with (lintian); all in Debian 12.
DEB_PACKAGES := debhelper dh-python dh-dkms pybuild-plugin-pyproject python3-all \
	python3-setuptools python3-wheel lintian fakeroot dpkg-dev

# checkpatch.pl and the data files it reads, from the linux-source tarball
CHECKPATCH := build/linux-source-6.1/scripts/checkpatch.pl

# Guest kernel series: 6.1 (Debian 12's, the default) or 6.12
# (bookworm-backports'), e.g. `make image KERNEL=6.12`.  The ABI is resolved
# from the archive at build time, never pinned.
KERNEL ?= 6.1
KERNEL_ERROR := $(shell images/resolve-kernel --check '$(KERNEL)' 2>&1)
ifneq ($(KERNEL_ERROR),)
$(error $(KERNEL_ERROR))
endif
KABI = $(shell images/resolve-kernel $(KERNEL) 2>/dev/null)
KDIR = /usr/src/linux-headers-$(KABI)
# The 6.1 module is built in guest-driver/ (as ever); other series in a
# copy of the sources, so no build clobbers another kernel's ivloop.ko.
DRIVER_DIR = $(if $(filter 6.1,$(KERNEL)),guest-driver,build/driver-$(KERNEL))

.PHONY: help deps apt venv driver image profile-image pycheck test test-deps nspawn-root unit-test vm-test demo lint fuzz bench bench-smp bench-pairs soak clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{ printf "  make %-10s %s\n", $$1, $$2 }'

deps: apt venv $(CHECKPATCH)  ## install system packages and the Python environment (idempotent)

# Always checked (a dpkg query, well under a second): a kernel update in the
# archive means new headers to install.
apt:
	@set -e; \
	missing() { \
		abi=$$(images/resolve-kernel) || return 1; \
		want="$(APT_PACKAGES) linux-headers-$$abi"; \
		dpkg-query -W -f='$${Package} $${Status}\n' $$want 2>/dev/null | \
			awk '$$NF == "installed" { print $$1 }' | sort | \
			comm -13 - <(tr ' ' '\n' <<<"$$want" | sort -u); \
	}; \
	if ! todo=$$(missing 2>/dev/null) || [ -n "$$todo" ]; then \
		apt-get update -q >/dev/null; \
		todo=$$(missing); \
	fi; \
	if [ -n "$$todo" ]; then \
		echo "[deps] installing:" $$todo; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$todo >/dev/null; \
	fi; \
	if [ "$(KERNEL)" != 6.1 ]; then images/install-headers $(KERNEL); fi

$(CHECKPATCH): | apt
	@mkdir -p build
	tar -xJf /usr/src/linux-source-6.1.tar.xz -C build \
		linux-source-6.1/scripts/checkpatch.pl linux-source-6.1/scripts/spelling.txt \
		linux-source-6.1/scripts/const_structs.checkpatch
	@touch $@

# The three Python distributions, editable: ivloop-server (qemu-dev/),
# ivloop-libvirt (libvirt/) and the lab with the dev tools (.).  A venv from
# before the split loses the all-in-one `ivloop` first.  VERSION is a
# prerequisite: an editable install keeps the version it was installed with.
PYPROJECTS := pyproject.toml qemu-dev/pyproject.toml libvirt/pyproject.toml
venv: $(VENV)/.stamp
$(VENV)/.stamp: $(PYPROJECTS) VERSION
	@[ -x $(PY) ] || python3 -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@if $(PY) -m pip show -q ivloop >/dev/null 2>&1; then $(PY) -m pip uninstall -q -y ivloop; fi
	@$(PY) -m pip install -q -e qemu-dev -e libvirt -e '.[dev]'
	@touch $@

# The three wheels, built with the venv's setuptools (no download).  Each
# project builds in its own build/ directory: emptied first, or a module
# deleted from the tree would stay in the wheel.
WHEELS := build/wheels
.PHONY: wheels
wheels: venv  ## build the wheels of ivloop-server, ivloop-libvirt and the lab into build/wheels
	@rm -rf $(WHEELS) qemu-dev/build libvirt/build build/lib build/bdist.*
	@$(PY) -m pip wheel -q --no-deps --no-build-isolation -w $(WHEELS) ./qemu-dev ./libvirt .
	@ls -l $(WHEELS)/*.whl

driver: apt  ## build ivloop.ko against the guest kernel's headers (W=1; KERNEL=6.12: in build/driver-6.12)
	@set -e; [ -e guest-driver/Kbuild ] || exit 0; \
	if [ "$(DRIVER_DIR)" != guest-driver ]; then \
		mkdir -p $(DRIVER_DIR); \
		cp -p VERSION guest-driver/Kbuild guest-driver/Makefile guest-driver/dkms.conf \
			guest-driver/ivl.h guest-driver/ivl_*.[ch] $(DRIVER_DIR)/; \
	fi; \
	$(MAKE) -s -C $(DRIVER_DIR) KDIR=$(KDIR)

image: apt driver  ## build (or reuse) the guest image in images/out (KERNEL=6.12: images/out-6.12)
	@module=""; [ -e $(DRIVER_DIR)/ivloop.ko ] && module="--module $(DRIVER_DIR)/ivloop.ko"; \
	images/build --kernel $(KERNEL) $$module

# Not a dependency of anything: perf and its libraries are big, and only a
# developer profiling the guests needs them (IVLOOP_IMAGE_DIR=images/out-perf).
profile-image: apt driver  ## the guest image plus perf, in images/out-perf (see README)
	@dpkg-query -W -f='$${Status}' linux-perf 2>/dev/null | grep -q 'ok installed' || \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends linux-perf >/dev/null
	@IVLOOP_IMAGE_OUT=$(CURDIR)/images/out-perf images/build --perf --module guest-driver/ivloop.ko

# The systemd Debian 12 guest (debootstrap, kernel 6.1, the ivloop-guest
# package installed with apt, DKMS building its module, and configured as a
# user would; see images/debian/): topologies boot it with `image = "debian"`
# (harness/topologies/debian.toml).
.PHONY: debian-image
debian-image: apt deb  ## build (or reuse) the systemd Debian guest in images/out-debian
	@images/build-debian --package $(DEB_DIR)/ivloop-guest_$$(cat VERSION)-1_all.deb

# The Debian packages ivloop-host and ivloop-guest (debian/), built with
# debhelper from a copy of what they are made of (DEB_INPUTS, git's tracked
# and untracked files) in build/deb/src, with a debian/changelog saying
# VERSION-1, by Debian's own Python (PATH without pyenv or a venv); the
# .debs, .buildinfo and .changes land in build/deb/, checked by lintian.
# Rerun: a no-op unless an input changed (a hash of them all).
DEB_DIR := build/deb
DEB_INPUTS := VERSION debian qemu-dev libvirt guest-driver images/debian
.PHONY: deb deb-deps
deb: deb-deps  ## Debian packages ivloop-host and ivloop-guest in build/deb/
	@set -eo pipefail; mkdir -p $(DEB_DIR); \
	exec 9>$(DEB_DIR)/.lock; flock 9; \
	inputs() { git ls-files -co --exclude-standard -z -- $(DEB_INPUTS) | sort -z | \
		while IFS= read -r -d '' f; do [ ! -e "$$f" ] || printf '%s\0' "$$f"; done; }; \
	version=$$(cat VERSION); \
	debs="$(DEB_DIR)/ivloop-host_$${version}-1_all.deb $(DEB_DIR)/ivloop-guest_$${version}-1_all.deb"; \
	hash=$$(inputs | xargs -0 sha256sum | sha256sum | cut -d' ' -f1); \
	if ls $$debs >/dev/null 2>&1 && [ "$$(cat $(DEB_DIR)/inputs.sha256 2>/dev/null)" = "$$hash" ]; then \
		echo "[deb] up to date:" $$debs; exit 0; \
	fi; \
	rm -rf $(DEB_DIR)/src $(DEB_DIR)/inputs.sha256 $(DEB_DIR)/ivloop*_*; \
	mkdir -p $(DEB_DIR)/src; \
	inputs | tar -cf - --null -T - | tar -xf - -C $(DEB_DIR)/src; \
	maintainer=$$(sed -n 's/^Maintainer: //p' debian/control); \
	{ printf 'ivloop (%s-1) bookworm; urgency=medium\n\n' "$$version"; \
	  printf '  * Built by make deb from the ivloop tree at %s.\n\n' "$$(git describe --always --dirty)"; \
	  printf ' -- %s  %s\n' "$$maintainer" "$$(date -R -d @$$(git log -1 --format=%ct))"; \
	} > $(DEB_DIR)/src/debian/changelog; \
	echo "[deb] building ivloop $$version-1 in $(DEB_DIR)/src (log: $(DEB_DIR)/build.log)"; \
	(cd $(DEB_DIR)/src && env -u PYTHONPATH -u PYTHONHOME -u VIRTUAL_ENV \
		PATH=/usr/sbin:/usr/bin:/sbin:/bin dpkg-buildpackage -us -uc -b) > $(DEB_DIR)/build.log 2>&1 || \
		{ tail -n 30 $(DEB_DIR)/build.log; echo "[deb] dpkg-buildpackage failed; see $(DEB_DIR)/build.log" >&2; exit 1; }; \
	echo "[deb] lintian"; \
	lintian --fail-on error $(DEB_DIR)/ivloop_$${version}-1_*.changes; \
	echo "$$hash" > $(DEB_DIR)/inputs.sha256; \
	echo "[deb] built:" $$debs

# Always checked (a dpkg query): what `make deb` needs.
deb-deps:
	@set -e; \
	missing() { \
		dpkg-query -W -f='$${Package} $${Status}\n' $(DEB_PACKAGES) 2>/dev/null | \
			awk '$$NF == "installed" { print $$1 }' | sort | \
			comm -13 - <(tr -s ' ' '\n' <<<"$(DEB_PACKAGES)" | sort -u); \
	}; \
	todo=$$(missing); \
	if [ -n "$$todo" ]; then \
		apt-get update -q >/dev/null; \
		echo "[deb-deps] installing:" $$todo; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$todo >/dev/null; \
	fi

# A second QEMU next to the system's (Debian 12: 7.2): bookworm-backports'
# 10.0, its firmware and any library the system lacks, unpacked (never
# installed) into build/qemu-10.  Rerun: a no-op unless the archive has a
# new version.  Use: harness up --qemu build/qemu-10/bin/qemu-system-x86_64
.PHONY: qemu-10
qemu-10: apt  ## unpack bookworm-backports' QEMU 10.0 into build/qemu-10
	@images/unpack-qemu

# Static checks of the Python code: part of every test run and of lint.
pycheck: deps  ## ruff and mypy
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

unit-test: pycheck  ## fast tests, no VM
	$(PYTEST) -m "not vm" -n 2 -q

# What the tests build against and boot: both guest kernels (the 6.12
# headers too, for the build and DKMS tests), the systemd Debian guest and
# the second QEMU.
QEMU10 := $(CURDIR)/build/qemu-10/bin/qemu-system-x86_64
# The root the host-package tests boot (a debootstrap, cached in build/nspawn)
# is built alongside the images, so that its downloads overlap their work.
# Without root, debootstrap or systemd-nspawn those tests skip, and so does this.
define nspawn_root
	if command -v debootstrap >/dev/null && command -v systemd-nspawn >/dev/null && \
	    [ "$$(id -u)" = 0 ]; then \
		mkdir -p build; \
		$(VENV)/bin/python -m tests.packaging.nspawn > build/nspawn-root.log 2>&1 || \
			{ cat build/nspawn-root.log >&2; exit 1; }; \
	fi
endef

test-deps: deps deb
	@( $(nspawn_root) ) & root=$$!; \
	$(MAKE) --no-print-directory image debian-image qemu-10 && \
		$(MAKE) -s --no-print-directory image KERNEL=6.12; rc=$$?; \
	wait $$root || rc=1; exit $$rc

nspawn-root: deps deb  ## the cached Debian 12 root the host-package tests boot (build/nspawn)
	@$(nspawn_root)

# The whole VM suite on the default kernel and QEMU, then the `versions`
# subset (ping and stream over shm, a round-trip migration, the hostile
# peer) on the 6.12 kernel and on QEMU 10.0.  All three run even when one
# fails (one report of everything that broke); the slowest tests are listed.
VM_PYTEST = $(PYTEST) -q --durations=8
define vm_suite
	@rc=0; \
	flock $(VM_LOCK) $(VM_PYTEST) -m vm || rc=1; \
	flock $(VM_LOCK) env IVLOOP_IMAGE_DIR=$(CURDIR)/images/out-6.12 $(VM_PYTEST) -m versions tests/vm || rc=1; \
	flock $(VM_LOCK) env IVLOOP_QEMU=$(QEMU10) $(VM_PYTEST) -m versions tests/vm || rc=1; \
	exit $$rc
endef

vm-test: test-deps  ## tests that boot real guests (serialised on $(VM_LOCK))
	$(vm_suite)

test: pycheck test-deps  ## every test: unit tests, then VM tests (both kernels, both QEMUs)
	$(PYTEST) -m "not vm" -n 2 -q
	$(vm_suite)

demo: deps image  ## boot the topology, show the shared path, migrate, report
	flock $(VM_LOCK) $(HARNESS) demo

lint: pycheck  ## ruff, mypy, checkpatch
	@if [ -e guest-driver/Kbuild ]; then $(MAKE) -s -C guest-driver checkpatch CHECKPATCH=$(CURDIR)/$(CHECKPATCH); fi

fuzz: deps  ## fuzz the ring parser for longer (FUZZ_SECONDS, default 600)
	$(MAKE) -C tests/ring fuzz FUZZ_SECONDS=$${FUZZ_SECONDS:-600}

# Per kernel and per QEMU: `make bench KERNEL=6.12`, `make bench QEMU=10`
# (results in bench-results/<kernel>-qemu<version>/ unless the defaults).
QEMU ?=
BENCH_QEMU := $(if $(filter 10,$(QEMU)),$(QEMU10),$(QEMU))
BENCH_ENV := $(if $(filter 6.1,$(KERNEL)),,IVLOOP_IMAGE_DIR=$(CURDIR)/images/out-$(KERNEL)) \
	$(if $(BENCH_QEMU),IVLOOP_QEMU=$(BENCH_QEMU))
BENCH_OUT := bench-results$(if $(filter-out 6.1,$(KERNEL))$(QEMU),/$(KERNEL)-qemu$(or $(QEMU),7.2))
BENCH_DEPS := deps image $(if $(filter 10,$(QEMU)),qemu-10)

# One suite of `harness bench` on its own topology, which is up only while
# the suite runs: $(call bench_suite,SUITE,TOPOLOGY) writes $(BENCH_OUT)/SUITE/.
define bench_suite
	@mkdir -p $(BENCH_OUT)/$(1)
	flock $(VM_LOCK) env $(BENCH_ENV) bash -c '$(HARNESS) up --topology harness/topologies/$(2) && $(HARNESS) bench --suite $(1) --out $(BENCH_OUT)/$(1); rc=$$?; $(HARNESS) down; exit $$rc'
endef

bench: $(BENCH_DEPS)  ## shm vs forced-lower vs wire, the native ring, then bench-smp and bench-pairs (KERNEL=6.12, QEMU=10 or a path)
	@mkdir -p $(BENCH_OUT)
	flock $(VM_LOCK) env $(BENCH_ENV) bash -c '$(MAKE) -s --no-print-directory -C tests/ring bench-native > $(BENCH_OUT)/native.json && $(HARNESS) up && $(HARNESS) bench --out $(BENCH_OUT) --native-json $(BENCH_OUT)/native.json; rc=$$?; $(HARNESS) down; exit $$rc'
	$(MAKE) --no-print-directory bench-smp
	$(MAKE) --no-print-directory bench-pairs

bench-smp: $(BENCH_DEPS)  ## 2-vCPU guests: 1 vs 4 streams, ivl0 vs no driver, a mixture (bench-results/smp/)
	$(call bench_suite,smp,bench-smp.toml)

bench-pairs: $(BENCH_DEPS)  ## 1, 2 and 4 co-resident pairs at once: aggregate shm vs lower (bench-results/pairs/)
	$(call bench_suite,pairs,many.toml)

soak: deps image  ## migrate vm2 A<->B SOAK_COUNT times (default 20) under traffic; not in `make test`
	@mkdir -p build
	flock $(VM_LOCK) bash -c '$(HARNESS) up && $(HARNESS) soak vm2 --from A --to B --count $${SOAK_COUNT:-20} --json-out build/soak.json; rc=$$?; $(HARNESS) down; exit $$rc'

clean:  ## remove build outputs (keeps the downloaded packages)
	@if [ -e guest-driver/Kbuild ]; then $(MAKE) -s -C guest-driver clean; fi
	rm -rf images/out images/out-6.12 images/out-debian images/out-perf tests/ring/build build \
		qemu-dev/build libvirt/build
