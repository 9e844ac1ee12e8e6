"""Integration fixtures: real OVMF + GRUB + Debian Xen under QEMU, driven by real GDB.

Each boot is session-scoped and shared by every test that needs that stop; every
QEMU and GDB process is stopped by its pid at teardown, pass or fail.

The build matrix (gdbext/paths.py BUILDS: 4.17, 4.20): the tests that carry the weight
run on every build, through ``xen_build`` (parametrized: a boot of its own per build) or
``stop_of_build`` (the default build's shared boot, or one shared boot per other build);
everything else runs on the default build alone. GDBEXT_TEST_BUILDS=4.20 (comma-separated
names) narrows the matrix for a quick run; a build whose files are missing fails.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import subprocess
from dataclasses import dataclass
from typing import Dict, List

import pytest

from gdbext import paths
from gdbext.core.qemu import parse_info_registers, parse_xp_qwords
from gdbext.host.gdbdriver import GdbSession, lab_session
from gdbext.host.lab import XEN_LOAD_BASE_RE, Lab, LabConfig

BOOT_TIMEOUT_S = 240


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/integration/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.integration)


def matrix_builds() -> List[str]:
    """The builds the matrix runs on: every build, or those GDBEXT_TEST_BUILDS names."""
    wanted = [n.strip() for n in os.environ.get("GDBEXT_TEST_BUILDS", "").split(",") if n.strip()]
    unknown = [n for n in wanted if n not in paths.BUILDS]
    if unknown:
        raise pytest.UsageError(f"GDBEXT_TEST_BUILDS names unknown builds {unknown}; "
                                f"builds are {sorted(paths.BUILDS)}")
    return wanted or sorted(paths.BUILDS)


def need_build(name: str) -> paths.XenBuild:
    build = paths.BUILDS[name]
    if build.missing():
        pytest.fail(f"Xen {build.name}: {', '.join(map(str, build.missing()))} missing: "
                    "run scripts/setup", pytrace=False)
    return build


@pytest.fixture(scope="session", params=matrix_builds(), ids=lambda n: f"xen{n}")
def xen_build(request) -> paths.XenBuild:
    """One build of the matrix (a test taking it runs once per build)."""
    return need_build(request.param)


@pytest.fixture(scope="session")
def xen_syms_path():
    """The default build's xen-syms (the tests outside the matrix)."""
    return need_build(paths.DEFAULT_BUILD).syms


# The shared boots, by fixture name: the stop each one is at.
SHARED_STOPS = {"at_entry": "__efi64_mb2_start", "at_start_xen": "__start_xen",
                "at_construct_dom0": "construct_dom0"}


@pytest.fixture(scope="session")
def other_build_boots():
    """Shared boots of the builds other than the default one, made on first use, kept for
    the session: {(build, symbol): Stop}."""
    with contextlib.ExitStack() as stack:
        boots: Dict[tuple, Stop] = {}

        def get(build: paths.XenBuild, symbol: str) -> Stop:
            if (build.name, symbol) not in boots:
                boots[build.name, symbol] = stack.enter_context(booted_to(symbol, build.syms))
            return boots[build.name, symbol]

        yield get


def stop_of_build(request, fixture_name: str, build_name: str) -> Stop:
    """The shared boot ``fixture_name`` (at_entry, at_start_xen, ...) of a build: the
    default build's is the fixture itself (shared with every other test), another
    build's is booted once for the session."""
    if build_name == paths.DEFAULT_BUILD:
        return request.getfixturevalue(fixture_name)
    get = request.getfixturevalue("other_build_boots")
    return get(need_build(build_name), SHARED_STOPS[fixture_name])


def matrix_params(*fixture_names: str):
    """pytest params (fixture name, build) for every build of the matrix."""
    return [pytest.param(f, b, id=f"{f}-xen{b}") for f in fixture_names for b in matrix_builds()]


@dataclass
class Stop:
    """A real boot stopped at a Xen symbol, with GDB attached and gdbext loaded."""
    lab: Lab
    gdb: GdbSession
    symbol: str
    run: dict      # xen-run-to's JSON

    def cmd(self, command: str, timeout: float = 120.0):
        return self.gdb.execute(command, timeout=timeout)

    def json(self, command: str, timeout: float = 120.0):
        return self.gdb.execute(command, timeout=timeout).json()

    def monitor(self, command: str) -> str:
        return self.gdb.execute(f"monitor {command}").out

    def console_load_base(self) -> int:
        return console_load_base(self.gdb, self.lab)

    def qemu_registers(self) -> Dict[str, int]:
        return qemu_registers(self.gdb)

    def xp(self, pa: int, size: int) -> bytes:
        return qemu_xp(self.gdb, pa, size)

    def qwords(self, pa: int, count: int) -> List[int]:
        return qemu_qwords(self.gdb, pa, count)

    def phymem_mode(self) -> str:
        return phymem_mode(self.gdb)


# --- QEMU's own view, the oracle (through its monitor, not through gdbext's backend) ---

def qemu_registers(gdb: GdbSession) -> Dict[str, int]:
    """Every register 'monitor info registers' prints as NAME=hex, by lower-case name
    (rip, rsp, ... in 64-bit mode; eip, esp, ... in 32-bit code)."""
    text = gdb.execute("monitor info registers").out
    regs = parse_info_registers(text)
    for name in ("cr0", "cr3", "cr4", "efer"):
        assert name in regs, (name, text)
    assert ("rip" in regs and "rsp" in regs and "rax" in regs) or "eip" in regs, text
    return regs


def qemu_qwords(gdb: GdbSession, pa: int, count: int) -> List[int]:
    """``count`` qwords of guest physical memory from PA (8-aligned) through 'monitor xp'."""
    words = parse_xp_qwords(gdb.execute(f"monitor xp /{count}gx {pa:#x}").out)
    assert len(words) == count, f"short xp answer at {pa:#x}"
    return words


def qemu_xp(gdb: GdbSession, pa: int, size: int) -> bytes:
    """Guest physical memory through 'monitor xp'."""
    start = pa & ~7
    words = qemu_qwords(gdb, start, (pa + size - start + 7) // 8)
    data = b"".join(w.to_bytes(8, "little") for w in words)
    return data[pa - start:pa - start + size]


def phymem_mode(gdb: GdbSession) -> str:
    """The stub's physical-memory mode as it answers now ("0": virtual, as GDB expects)."""
    out = gdb.execute("maintenance packet qqemu.PhyMemMode").out
    return re.search(r'received: "(.*)"', out).group(1)


LOAD_BASE_FORMAT = b"Xen image load base address: "


@functools.lru_cache(maxsize=None)
def after_load_base_printk(xen_syms) -> int:
    """The linked VA just after __start_xen's printk of "Xen image load base address",
    from objdump: the call to printk that follows the load of the format string's address.
    (Which function runs next differs between builds: early_cpu_init precedes the line
    in 4.20, follows it in 4.17.)"""
    from elftools.elf.elffile import ELFFile

    with open(xen_syms, "rb") as f:
        string_vas = set()
        for sec in ELFFile(f).iter_sections():
            if not sec["sh_addr"] or sec["sh_type"] != "SHT_PROGBITS":
                continue
            data, at = sec.data(), 0
            while (at := data.find(LOAD_BASE_FORMAT, at)) >= 0:
                string_vas.add(sec["sh_addr"] + at)
                at += 1
    nm = subprocess.run(["nm", "-n", str(xen_syms)], capture_output=True, text=True,
                        check=True).stdout
    rows_nm = [(int(f[0], 16), f[-1]) for f in (line.split() for line in nm.splitlines())
               if len(f) == 3]
    start = next(a for a, name in rows_nm if name == "__start_xen")
    end = min(a for a, _name in rows_nm if a > start)   # xen.efi's ELF has no sizes
    out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", f"--start-address={start:#x}",
                          f"--stop-address={end:#x}", str(xen_syms)],
                         capture_output=True, text=True, check=True).stdout
    rows = [(int(m.group(1), 16), m.group(2)) for m in
            (re.match(r"^\s*([0-9a-f]+):\s+(.*)$", line) for line in out.splitlines()) if m]
    loads = [i for i, (_a, text) in enumerate(rows)
             if any(f"# {va:x} " in text + " " for va in string_vas)]
    assert loads, f"objdump finds no use of {LOAD_BASE_FORMAT!r} in __start_xen"
    call = next(i for i in range(loads[0], len(rows)) if re.search(r"call\s.*<printk>", rows[i][1]))
    return rows[call + 1][0]


def console_load_base(gdb: GdbSession, lab: Lab) -> int:
    """Xen's own word for B: let Xen run until it has printed "Xen image load base
    address" on its serial console (it is stopped just after the printk), and read it."""
    if not re.search(XEN_LOAD_BASE_RE, lab.serial_text()):
        gdb.execute(f"tbreak *{after_load_base_printk(lab.xen_syms):#x}")
        gdb.execute("continue", timeout=BOOT_TIMEOUT_S)
    return int(lab.wait_for_serial(XEN_LOAD_BASE_RE, timeout=120).group(1), 16)


def image_for(xen_syms) -> "paths.Path":
    """The image of the build whose xen-syms this is (the default build's otherwise)."""
    build = paths.build_of(xen_syms)
    return (build or paths.build()).image


@contextlib.contextmanager
def booted_to(symbol: str, xen_syms, memory_mb: int = 1024):
    config = LabConfig(xen_image=image_for(xen_syms), xen_syms=xen_syms, memory_mb=memory_mb)
    with lab_session(config, xen_syms) as (lab, gdb):
        run = gdb.execute(f"xen-run-to {symbol} --json --timeout {BOOT_TIMEOUT_S}",
                          timeout=BOOT_TIMEOUT_S + 30).json()
        yield Stop(lab, gdb, symbol, run)


@pytest.fixture(scope="session")
def at_entry(xen_syms_path):
    """Stopped at __efi64_mb2_start: firmware (OVMF) page tables, Xen at its load address."""
    with booted_to("__efi64_mb2_start", xen_syms_path) as stop:
        yield stop


@pytest.fixture
def at_entry_consumable(xen_syms_path):
    """A boot of its own at __efi64_mb2_start, for a test that lets the guest run on."""
    with booted_to("__efi64_mb2_start", xen_syms_path) as stop:
        yield stop


@pytest.fixture(scope="session")
def at_construct_dom0(xen_syms_path):
    """Stopped at construct_dom0: Xen's tables complete, linear slot (a self-reference) included."""
    with booted_to("construct_dom0", xen_syms_path) as stop:
        yield stop


@pytest.fixture(scope="session")
def at_start_xen(xen_syms_path):
    """Stopped at __start_xen: Xen's own page tables, at its linked address."""
    with booted_to("__start_xen", xen_syms_path) as stop:
        yield stop
