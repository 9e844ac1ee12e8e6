"""Integration fixtures: real OVMF + GRUB + Debian Xen 4.17 under QEMU, driven by real GDB.

Each boot is session-scoped and shared by every test that needs that stop; every
QEMU and GDB process is stopped by its pid at teardown, pass or fail.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from typing import Dict, List

import pytest

from gdbext import paths
from gdbext.core.qemu import parse_info_registers, parse_xp_qwords
from gdbext.host.gdbdriver import GdbSession, lab_session
from gdbext.host.lab import XEN_LOAD_BASE_RE, Lab, LabConfig

BOOT_TIMEOUT_S = 240
# A function __start_xen calls just after printing "Xen image load base address".
AFTER_LOAD_BASE_LINE = "early_cpu_init"


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/integration/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def xen_syms_path():
    if not paths.XEN_DEBIAN_SYMS.is_file():
        pytest.fail(f"{paths.XEN_DEBIAN_SYMS} is missing: run scripts/setup")
    return paths.XEN_DEBIAN_SYMS


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


def console_load_base(gdb: GdbSession, lab: Lab) -> int:
    """Xen's own word for B: let Xen run until it has printed "Xen image load base
    address" on its serial console (it is stopped just after), and read the line."""
    gdb.execute(f"xen-run-to {AFTER_LOAD_BASE_LINE} --timeout {BOOT_TIMEOUT_S}",
                timeout=BOOT_TIMEOUT_S + 30)
    return int(lab.wait_for_serial(XEN_LOAD_BASE_RE, timeout=120).group(1), 16)


@contextlib.contextmanager
def booted_to(symbol: str, xen_syms, memory_mb: int = 1024):
    with lab_session(LabConfig(memory_mb=memory_mb), xen_syms) as (lab, gdb):
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
