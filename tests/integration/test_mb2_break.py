"""xen-mb2-break on a real boot of Debian's Xen 4.17 (OVMF + GRUB under QEMU TCG).

xen-mb2-break runs to the entry itself, so each test attaches GDB to a fresh lab
that has not run at all: the command must find Xen without being told where it is.
Expected addresses come from xen-syms (build_plan, nm values) and B from Xen's own
console line; registers are cross-checked with QEMU's monitor.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass

import pytest

from gdbext.core import bootstops
from gdbext.core.bootstops import ENTRY, HIGH_START, LOW, START_XEN, TRAMPOLINE_CR3, build_plan
from gdbext.core.merge_catalog import CALL_CHECKS
from gdbext.core.xensyms import load_xen_syms
from gdbext.host.gdbdriver import GdbSession, lab_session
from gdbext.host.lab import Lab, LabConfig

from .conftest import console_load_base, phymem_mode, qemu_qwords, qemu_registers

# Each wait of the session (and of the run to the entry) gives up after this long.
WAIT_S = 120


@dataclass
class Attached:
    lab: Lab
    gdb: GdbSession

    def run(self, command: str, timeout: float = WAIT_S * 4):
        return self.gdb.execute(command, timeout=timeout, check=False)

    def qemu_registers(self) -> dict:
        return qemu_registers(self.gdb)

    def console_load_base(self) -> int:
        return console_load_base(self.gdb, self.lab)

    def read_u64(self, pa: int) -> int:
        return qemu_qwords(self.gdb, pa, 1)[0]


@contextlib.contextmanager
def attached(xen_syms):
    """A lab halted at its first instruction, GDB attached, xen-syms loaded: nothing run."""
    with lab_session(LabConfig(memory_mb=1024), xen_syms) as (lab, gdb):
        yield Attached(lab, gdb)


@pytest.fixture
def fresh(xen_syms_path):
    with attached(xen_syms_path) as a:
        yield a


@pytest.fixture(scope="module")
def syms(xen_syms_path):
    return load_xen_syms(xen_syms_path)


@pytest.fixture(scope="module")
def plan(syms):
    return build_plan(syms)


def json_lines(out: str):
    return [json.loads(line) for line in out.splitlines() if line.strip().startswith("{")]


def test_batch_reaches_start_xen_and_reports_each_stop(fresh, syms, plan):
    reply = fresh.run(f"xen-mb2-break --batch --json --timeout {WAIT_S}")
    assert reply.error is None, reply.error
    result = reply.json()
    assert result["error"] is None and result["ok"] and result["complete"]
    assert result["reached"] == plan.names()
    assert [r["stop"] for r in result["stops"]] == plan.names()
    assert result["reached"][-1] == START_XEN

    # Stopped at __start_xen: QEMU agrees on RIP and CR3.
    qemu = fresh.qemu_registers()
    last = result["stops"][-1]
    assert last["rip"] == qemu["rip"] == syms.linked_va("__start_xen")
    assert last["cr3"] == qemu["cr3"]

    # B as Xen itself prints it; every stop was at the address xen-syms gives for it.
    load_base = fresh.console_load_base()
    assert result["load_base"] == load_base
    trampoline_phys = fresh.read_u64(syms.pa("trampoline_phys", load_base))
    assert 0 < trampoline_phys < 0x100000
    for rec in result["stops"]:
        stop = plan.get(rec["stop"])
        assert rec["rip"] == stop.address(load_base, trampoline_phys), rec["stop"]
        assert rec["kind"] == stop.kind
    low = next(r for r in result["stops"] if r["stop"] == TRAMPOLINE_CR3)
    assert plan.get(TRAMPOLINE_CR3).kind == LOW and low["rip"] < 0x100000

    # Xen's CR3 from the trampoline's load on: B + offset(idle_pg_table).
    idle = load_base + syms.offset("idle_pg_table")
    by = {r["stop"]: r for r in result["stops"]}
    assert by[HIGH_START]["cr3"] == idle == qemu["cr3"]
    assert by[TRAMPOLINE_CR3]["cr3"] == idle
    firmware_cr3 = by[ENTRY]["cr3"]
    assert by[TRAMPOLINE_CR3]["changes"]["cr3_changed"]
    assert by[TRAMPOLINE_CR3]["changes"]["cr3_old"] == firmware_cr3
    # trampoline_setup relocated Xen's boot tables: the report counts the qwords.
    relocated = by[bootstops.TABLES_RELOCATED]["changes"]
    assert relocated["boot_qwords_changed"] > 0 and "idle_pg_table" in relocated["boot_changed"]

    i9 = [c for r in result["stops"] for c in r["checks"] if c["id"] == "I9"]
    assert any(c["status"] == "PASS" for c in i9), i9
    assert result["counts"]["FAIL"] == 0

    # Again, now that Xen is past __start_xen: it never comes back to its entry in this
    # boot, so the machine is reset and the session starts on the next boot (same B).
    again = fresh.run(f"xen-mb2-break --stops {ENTRY} --timeout {WAIT_S}")
    assert again.error is None, again.error
    assert "resetting the machine" in again.out
    assert re.search(r"^xen-mb2-break: \[1/1\] __efi64_mb2_start: RIP ", again.out, re.M)
    assert fresh.qemu_registers()["rip"] == load_base + syms.offset(ENTRY)


def test_interactive_stops_at_entry_then_next_stop_on_continue(fresh, syms, plan):
    bad = fresh.run("xen-mb2-break --stops trampolin")
    assert bad.error and "unknown stop 'trampolin'" in bad.error and "\n" not in bad.error

    reply = fresh.run(f"xen-mb2-break --json --timeout {WAIT_S}")
    assert reply.error is None, reply.error
    (entry,) = json_lines(reply.out)
    assert entry["stop"] == ENTRY
    qemu = fresh.qemu_registers()
    assert entry["rip"] == qemu["rip"] and entry["cr3"] == qemu["cr3"]
    load_base = entry["rip"] - syms.offset(ENTRY)
    assert load_base % 0x200000 == 0
    assert [c["id"] for c in entry["checks"]] == list(plan.checks_for(plan.get(ENTRY)))

    # The planted breakpoints are internal and silent: none for the user to see, and
    # 'continue' prints the next stop's report, not GDB's "Breakpoint -N" line.
    assert "No breakpoints" in fresh.run("info breakpoints").out
    step = fresh.run("continue", timeout=WAIT_S)
    assert step.error is None, step.error
    assert "Breakpoint" not in step.out
    (second,) = json_lines(step.out)
    nxt = plan.stops[1]
    assert second["stop"] == nxt.name
    assert second["rip"] == nxt.address(load_base) == fresh.qemu_registers()["rip"]
    assert second["changes"]["cr3_old"] == entry["cr3"]


def test_batch_text_with_chosen_stops(fresh, plan):
    """Only the entry, the trampoline's CR3 load and __start_xen: trampoline_phys is
    learnt at a helper stop that is not reported; the summary table lists the three."""
    wanted = [ENTRY, TRAMPOLINE_CR3, START_XEN]
    reply = fresh.run(f"xen-mb2-break --batch --timeout {WAIT_S} "
                      f"--stops '{','.join(wanted)}'")
    assert reply.error is None, reply.error
    reports = re.findall(r"^xen-mb2-break: \[(\d+)/3\] ([^:]+):", reply.out, re.M)
    assert [name for _n, name in reports] == wanted
    table = reply.out[reply.out.index("stop  "):]
    assert [line.split("  ")[0] for line in table.splitlines()[2:5]] == wanted
    assert table.strip().splitlines()[-1].startswith("complete: 3 stops")


def test_predicted_failure_stops_unless_keep_going(fresh, syms):
    """--predict on the Debian build: the RFC's merge fails at the entry (slot 261 still
    holds l3_xenmap's link-time address); the batch stops there with one error line,
    and with --keep-going it goes on to __start_xen and still fails at the end."""
    reply = fresh.run(f"xen-mb2-break --batch --predict --json --timeout {WAIT_S}")
    assert reply.error is not None and "\n" not in reply.error
    assert re.search(r"check\(s\) failed: .*\bI3 at __efi64_mb2_start\b", reply.error)
    # The JSON line is printed before the error.
    result = reply.json()
    assert result["reached"] == [ENTRY] and not result["complete"] and not result["ok"]
    i3 = next(c for c in result["stops"][0]["checks"] if c["id"] == "I3")
    assert i3["status"] == "FAIL" and "l3_xenmap" in i3["summary"]
    assert result["stops"][0]["mode"] == "predict"
    # QEMU: the guest is at __efi64_mb2_start's load address (its bytes, 2 MiB-aligned B).
    entry_rip = fresh.qemu_registers()["rip"]
    assert (entry_rip - syms.offset(ENTRY)) % 0x200000 == 0
    code = syms.read_linked(syms.linked_va(ENTRY), 16)
    assert [fresh.read_u64(entry_rip), fresh.read_u64(entry_rip + 8)] == [
        int.from_bytes(code[:8], "little"), int.from_bytes(code[8:], "little")]
    # Still at the entry (each session stopped on the FAIL), so this run starts there.
    again = fresh.run(f"xen-mb2-break --batch --predict --keep-going --json --timeout {WAIT_S}")
    assert again.error is not None and "I3 at __efi64_mb2_start" in again.error
    assert fresh.qemu_registers()["rip"] == syms.linked_va("__start_xen")



def test_relocated_prediction_passes_the_call_checks(fresh):
    """--predict --assume-relocated (Frediano's fix): at the entry and at the call, every
    check that decides whether the call at the linked VA can work passes; --skip drops."""
    reply = fresh.run(f"xen-mb2-break --batch --predict --assume-relocated --json --skip I10 "
                      f"--stops '{ENTRY},{bootstops.CALL}' --timeout {WAIT_S}")
    assert reply.error is None, reply.error
    result = reply.json()
    assert result["ok"] and result["complete"] and result["reached"] == [ENTRY, bootstops.CALL]
    for rec in result["stops"]:
        assert rec["mode"] == "predict-relocated", rec["stop"]
        status = {c["id"]: c["status"] for c in rec["checks"]}
        assert "I10" not in status
        assert all(status[c] == "PASS" for c in CALL_CHECKS), (rec["stop"], status)


def test_paging_commands_where_paging_is_off(fresh, syms):
    """At trampoline_setup x86_32_switch has turned paging off (QEMU's CR0 says so): the
    paging commands say so in one line, and a table can still be read with --mode and
    --root: idle_pg_table's slot for XEN_VIRT_START still holds l3_xenmap's link-time
    address, because the relocation loop has not run yet."""
    reply = fresh.run(f"xen-mb2-break --batch --json --timeout {WAIT_S} "
                      f"--stops '{ENTRY},{bootstops.TRAMPOLINE_SETUP}'")
    assert reply.error is None, reply.error
    assert reply.json()["reached"] == [ENTRY, bootstops.TRAMPOLINE_SETUP]
    cr0 = fresh.qemu_registers()["cr0"]
    assert not cr0 & (1 << 31)                      # PG clear, by QEMU's own account
    assert fresh.gdb.execute("xen-regs --json").json()["mode"] == "off"
    pt = fresh.run("xen-pt")
    assert pt.error and "paging is off" in pt.error and "\n" not in pt.error
    walk = fresh.gdb.execute("xen-va2pa efi_multiboot2 --mode 4-level "
                             "--root idle_pg_table@pa --json").json()
    slot = (syms.virt_start >> 39) & 0x1FF
    top = walk["levels"][0]
    assert top["index"] == slot and top["table_name"] == "idle_pg_table"
    assert top["pointer"]["kind"] == "unrelocated"
    assert top["pointer"]["target_pa"] == syms.offset("l3_xenmap")
    assert phymem_mode(fresh.gdb) == "0"


def test_backtrace_names_xen_functions_at_the_load_address(fresh):
    """Once B is known GDB has xen-syms at the load address too: at efi_multiboot2
    (called from __efi64_mb2_start, both at B + offset) the backtrace names both, and
    info symbol places RIP in Xen's .init.text."""
    reply = fresh.run(f"xen-mb2-break --batch --timeout {WAIT_S} "
                      f"--stops '{ENTRY},{bootstops.EFI_MB2}'")
    assert reply.error is None, reply.error
    frames = fresh.gdb.execute("bt 2").out.splitlines()
    assert re.search(r"^#0 .* in efi_multiboot2 \(\)", frames[0]), frames
    assert re.search(r"^#1 .* in __efi64_mb2_start \(\)", frames[1]), frames
    assert fresh.gdb.execute("info symbol $pc").out.startswith("efi_multiboot2 in section")


KILL_AFTER_ENTRY = """
import os, signal, gdb
from gdbext.gdb_layer.context import CONTEXT
from gdbext.core.bootstops import build_plan
def _kill_qemu_after_entry(event, _pid={pid}):
    base = CONTEXT.xen.load_base
    if base is None or CONTEXT.xen.syms is None:
        return
    entry = build_plan(CONTEXT.xen.syms).stops[0].address(base)
    if int(gdb.parse_and_eval("$pc")) & ((1 << 64) - 1) != entry:
        gdb.events.stop.disconnect(_kill_qemu_after_entry)
        os.kill(_pid, signal.SIGKILL)
gdb.events.stop.connect(_kill_qemu_after_entry)
"""


def test_qemu_dying_mid_session_keeps_the_stops_reached(fresh, tmp_path):
    """QEMU killed (by its pid) at the first stop after the entry: one line says QEMU is
    gone, and the result keeps the entry's stop instead of being dropped."""
    hook = tmp_path / "kill_after_entry.py"
    hook.write_text(KILL_AFTER_ENTRY.format(pid=fresh.lab.pid))
    fresh.gdb.execute(f"source {hook}")
    reply = fresh.run(f"xen-mb2-break --batch --json --timeout {WAIT_S}")
    assert reply.error is not None and "\n" not in reply.error
    assert "QEMU is gone" in reply.error, reply.error
    result = reply.json()
    assert result is not None and result["stops"], result
    assert result["reached"][0] == ENTRY
    assert "QEMU is gone" in result["error"]
    assert fresh.lab.wait_exit(60), "QEMU still runs after it was killed"
