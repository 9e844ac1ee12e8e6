"""Triple faults, gdbext's own reset under -action reboot=shutdown, and hangs, live.

One boot of the lab (which runs QEMU with -action reboot=shutdown,shutdown=pause,
-d int,cpu_reset and a QMP socket), stopped at __efi64_mb2_start:

1. CR3 set (by the test) to a page of zeros that QEMU's own 'xp' shows: the next fetch
   faults, delivering the #PF faults, delivering the #DF faults: a triple fault.
   xen-run-to reports it as such, with the chain QEMU logged, within seconds.
2. xen-run-to __efi64_mb2_start boots again from that pause (its reset must really
   reset, though QEMU turns resets into pauses) and stops at the entry again.
3. 'jmp .' written at RIP (by the test): no stop comes; after 'set xen-hang-wait' the
   CPU is reported spinning at that RIP, named, with the serial console's last lines.
4. 'cli; hlt' written at RIP: reported halted with interrupts off.

Every expected value comes from QEMU (its -d int log, 'info registers', 'info status',
'xp'), from xen-syms, or from the serial log the lab wrote.
"""

from __future__ import annotations

import time

from gdbext.core import qemulog
from gdbext.core.hang import serial_tail
from gdbext.core.xensyms import load_xen_syms

from .conftest import qemu_registers

HANG_WAIT_S = 5
RUN_TIMEOUT_S = 240


def _zero_page(stop, start=0x1000, end=0x100000):
    """A page QEMU's 'xp' shows all zeros (below 1 MiB: the firmware leaves some)."""
    for pa in range(start, end, 0x1000):
        if not any(stop.qwords(pa, 512)):
            return pa
    raise AssertionError("no page of zeros below 1 MiB")


def _write(stop, va, data: bytes):
    values = ", ".join(str(b) for b in data)
    stop.cmd(f"set {{unsigned char[{len(data)}]}} {va:#x} = {{{values}}}")
    assert stop.xp(va, len(data)) == data      # identity-mapped: VA = PA at the entry


def _run(stop, symbol, timeout=RUN_TIMEOUT_S):
    t = time.monotonic()
    reply = stop.gdb.execute(f"xen-run-to {symbol} --json --timeout {timeout}",
                             timeout=timeout + 60, check=False)
    return reply, time.monotonic() - t


def test_triple_fault_reset_and_hangs(at_entry_consumable, xen_syms_path):
    stop = at_entry_consumable
    syms = load_xen_syms(xen_syms_path)
    lab = stop.lab
    assert lab.int_log is not None and lab.qmp_socket is not None
    entry = stop.run["rip"]

    # 1. a triple fault
    zero = _zero_page(stop)
    stop.cmd(f"python __import__('gdbext.gdb_layer.context', fromlist=['CONTEXT'])"
             f".CONTEXT.set_register('cr3', {zero:#x})")
    reply, took = _run(stop, "__start_xen")
    assert reply.error is not None and took < 30, (reply.error, took)
    assert "paused (shutdown)" in stop.monitor("info status")
    chain = qemulog.last_triple_fault(qemulog.parse_int_log(lab.int_log.read_text()))
    assert chain is not None and chain.first is not None
    regs = qemu_registers(stop.gdb)
    # The CPU state at the fault is kept: QEMU's log and registers agree on RIP.
    assert chain.first.rip == regs["rip"] == entry and regs["cr3"] == zero
    named = f"{syms.describe(syms.linked_va('__efi64_mb2_start'))} (Xen, at its load address)"
    assert reply.error.startswith(f"the guest triple-faulted: #PF at {entry:#x} ({named}); "
                                  "#PF delivering it -> #DF; #PF delivering the #DF -> triple "
                                  "fault"), reply.error
    assert chain.vectors == [14, 14, 14]        # what QEMU logged: the same chain
    crash = reply.json()
    assert crash["error"] == reply.error

    # 2. gdbext's reset under -action reboot=shutdown
    reply, took = _run(stop, "__efi64_mb2_start")
    assert reply.error is None, reply.error
    again = reply.json()
    assert again["rip"] == entry and again["resets"] == 1
    assert "paused (debug)" in stop.monitor("info status")
    assert qemu_registers(stop.gdb)["rip"] == entry

    # 3. a spin
    stop.cmd(f"set xen-hang-wait {HANG_WAIT_S}")
    _write(stop, entry, b"\xeb\xfe")               # jmp .
    reply, took = _run(stop, "__start_xen")
    assert reply.error is not None, reply.out
    # Within the hang wait plus the samples (two seconds of running, 3 x 16 steps).
    assert HANG_WAIT_S <= took < HANG_WAIT_S + 25, took
    regs = qemu_registers(stop.gdb)
    assert regs["rip"] == entry
    assert reply.error.startswith("the guest hung: no stop at __start_xen within "), reply.error
    assert reply.error.endswith(f"the CPU is spinning at {entry:#x} ({named})"), reply.error
    # The console's last lines are quoted as the lab's serial log has them.
    out = stop.gdb.execute("xen-run-to __start_xen --timeout 240", timeout=300, check=False)
    assert out.error.startswith("the guest hung"), out.error
    tail = serial_tail(lab.serial_log.read_bytes())
    assert tail and all(f"| {ln}" in out.out for ln in tail[-3:]), out.out

    # 4. hlt with interrupts off
    _write(stop, entry, b"\xfa\xf4\xeb\xfc")        # cli; hlt; jmp back to the cli
    stop.cmd(f"set $rip = {entry:#x}")
    reply, took = _run(stop, "__start_xen")
    assert reply.error is not None and took < HANG_WAIT_S + 25, (reply.error, took)
    regs = qemu_registers(stop.gdb)
    assert "halted at" in reply.error and f"{regs['rip']:#x}" in reply.error, reply.error
    assert entry <= regs["rip"] <= entry + 2 and not regs["rfl"] & (1 << 9)
