"""What gdbext does when the guest it drives stops coming back: it hung, or QEMU paused
it at a triple fault or reset; and gdbext's own reset under -action reboot=shutdown.

The decisions are core.hang's; this module takes the samples (single steps through
GDB, 'monitor info registers'), reads the serial console and QEMU's -d int log named
by the settings, and raises ``GuestCrashed`` ("hang", "triple-fault"; "shutdown" for
a reset or power-off the guest asked for).
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Dict, Optional

import gdb

from ..core import faults, hang, qemu, qmp
from ..core.errors import GdbextError, GuestCrashed
from .command import one_line
from .interrupt_timer import Timeout

_HALTED = re.compile(r"\bHLT=(\d)")
RESET_POLL_S = 0.05
RESET_WAIT_S = 10.0


class WaitTimedOut(GdbextError):
    """The wait's own timer ended it (the guest still runs where it was interrupted)."""


# --- naming where the CPU is -----------------------------------------------------------

def name_code(ctx, va: int) -> faults.AddressName:
    """Xen's symbol at its load or linked address, the firmware image, or unknown."""
    loaded, _ = ctx.loaded_or_note()
    pa = None
    try:
        pa = ctx.translate(va)
    except (GdbextError, gdb.error):
        pa = None
    t = ctx.target
    try:
        with t.phys_mode():
            return faults.name_address(va, loaded, t.cache, pa)
    except (GdbextError, gdb.error):
        return faults.name_address(va, loaded)


def console_lines(ctx):
    """(the serial console's last lines, why none)."""
    path = ctx.settings.serial_log
    if not path:
        return [], "no serial log known ('set xen-serial-log PATH' to quote it)"
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - hang.SERIAL_TAIL_BYTES))
            raw = f.read()
    except OSError as err:
        return [], f"cannot read the serial log {path}: {err.strerror or err}"
    lines = hang.serial_tail(raw)
    return lines, ("" if lines else f"the serial log {path} is empty")


# --- samples -----------------------------------------------------------------------------

def _stop_fired(event, planted: Dict[int, "gdb.Breakpoint"]) -> bool:
    return any(bp.is_valid() and bp.number in planted
               for bp in getattr(event, "breakpoints", None) or [])


def _planted_addresses(planted) -> set:
    return {loc.address & ((1 << 64) - 1) for bp in planted.values() if bp.is_valid()
            for loc in bp.locations}


def take_sample(ctx, planted: Dict[int, "gdb.Breakpoint"]):
    """One sample of the stopped CPU: (CpuSample, None), or (None, RIP) when a single
    step reached one of the planted breakpoints (the stop awaited: the guest was slow,
    not hung). Never steps a halted CPU or over a hlt/mwait (the step would not return
    with interrupts masked)."""
    t = ctx.target
    t.invalidate()
    info = t.monitor("info registers")
    m = _HALTED.search(info)
    halted = bool(m and m.group(1) == "1")
    rip = t.read_register("rip")
    rflags = t.read_register("eflags")
    trace = [rip]
    at_hlt = False
    addresses = _planted_addresses(planted)
    if not halted:
        for _ in range(hang.TRACE_STEPS):
            if hang.blocks_stepping(ctx.bytes_at(trace[-1], 3)):
                at_hlt = True
                break
            events = []
            catcher = ctx.faults
            with Timeout(hang.STEP_TIMEOUT_S) as tm:
                def on_stop(event) -> None:
                    tm.stopped()
                    events.append(event)
                gdb.events.stop.connect(on_stop)
                catcher.driving = True
                try:
                    gdb.execute("stepi", to_string=True)
                finally:
                    catcher.driving = False
                    gdb.events.stop.disconnect(on_stop)
            t.invalidate()
            if tm.fired:
                break          # the step did not end: the CPU sleeps (an NMI-only wait)
            rip = t.read_register("rip")
            if events and catcher.fired(events[-1]):
                raise catcher.crash_at(rip)   # the step entered an exception handler
            # A step that lands on a planted address executed the instruction before it:
            # the guest really got there (GDB may or may not name the breakpoint for a
            # step), and a 'continue' from here would step over it unseen.
            if (events and _stop_fired(events[-1], planted)) or rip in addresses:
                return None, rip
            trace.append(rip)
        rflags = t.read_register("eflags")
    return hang.CpuSample(trace[-1], rflags, halted, tuple(trace), at_hlt), None


def after_wait(ctx, started: float, timeout_at: float, what: str, breakpoints) -> int:
    """The hang wait ended without the stop: sample the CPU, declare a hang or let the
    guest run on (until the next hang wait or the command's timeout). Returns RIP of the
    awaited stop when it comes meanwhile; raises GuestCrashed("hang", ...) or, at the
    end of the timeout on a guest that still runs, a GdbextError saying where it is."""
    planted = {bp.number: bp for bp in breakpoints if bp.is_valid()}
    while True:
        samples = []
        for i in range(hang.SAMPLES):
            if i:
                rip = _run_for(ctx, min(time.monotonic() + hang.SAMPLE_INTERVAL_S, timeout_at),
                               what, breakpoints)
                if rip is not None:
                    return rip
            sample, reached = take_sample(ctx, planted)
            if reached is not None:
                return reached
            samples.append(sample)
            if hang.refuted(samples) or time.monotonic() >= timeout_at:
                break
        verdict = hang.judge(samples)
        if verdict.hung:
            lines, note = console_lines(ctx)
            report = hang.HangReport(verdict, time.monotonic() - started, what,
                                     name_code(ctx, verdict.rip), samples, lines, note)
            raise GuestCrashed("hang", report.summary(), report)
        if time.monotonic() >= timeout_at:
            raise WaitTimedOut(hang.timeout_text(what, time.monotonic() - started, verdict,
                                                 name_code(ctx, verdict.rip)))
        rip = _run_for(ctx, min(time.monotonic() + ctx.settings.hang_wait, timeout_at), what,
                       breakpoints)
        if rip is not None:
            return rip


def _run_for(ctx, until: float, what: str, breakpoints) -> Optional[int]:
    """Let the guest run until ``until``: RIP if the awaited stop came, None if the wait
    ended (the guest is stopped where the timer interrupted it)."""
    try:
        return ctx.continue_until(until, what, breakpoints, hang_check=False)
    except WaitTimedOut:
        return None


# --- triple faults and shutdowns --------------------------------------------------------------

def shutdown_crash(ctx, what: str) -> Optional[GuestCrashed]:
    """If QEMU paused the machine at a shutdown (the stop GDB reports as SIGQUIT), the
    crash to raise: a triple fault with its chain from QEMU's -d int log, or a reset
    the guest asked for. None when the machine is not in that state."""
    t = ctx.target
    if not paused_at_shutdown(ctx):
        return None
    info = t.monitor("info registers")
    regs = qemu.parse_info_registers(info)
    idtr = qemu.parse_descriptor_tables(info).get("idt")
    log_text, note = None, ""
    path = ctx.settings.qemu_int_log
    if not path:
        note = ("which exceptions led there is not known: QEMU's -d int log is not known "
                "('set xen-qemu-int-log PATH' for a QEMU run with -d int,cpu_reset -D PATH)")
    else:
        try:
            raw = Path(path).read_bytes()
            log_text = hang.log_tail_text(raw, hang.INT_LOG_TAIL_BYTES)
        except OSError as err:
            note = f"cannot read QEMU's -d int log {path}: {err.strerror or err}"
    report = hang.explain_shutdown(log_text, note, regs, idtr, lambda va: name_code(ctx, va))
    summary = report.summary() + f" (while waiting for {what})"
    return GuestCrashed(report.kind, summary, report)


def paused_at_shutdown(ctx) -> bool:
    """QEMU holds the machine paused at a shutdown: 'continue' does nothing until a reset.
    False when the stub has no QEMU monitor to ask."""
    try:
        return hang.status_word(ctx.target.monitor("info status")) == "shutdown"
    except (GdbextError, gdb.error):
        return False


def reset_machine(ctx) -> None:
    """'monitor system_reset' that really resets: with -action reboot=shutdown in force
    QEMU would turn it into a shutdown (and, the machine being stopped, do nothing);
    through the QMP socket the reboot action is 'reset' for the reset itself, and
    'shutdown' again after it (the lab's action: only the lab sets the socket). Checked:
    QEMU's status is 'prelaunch' once a reset of the stopped machine is done."""
    t = ctx.target
    sock = ctx.settings.qmp_socket
    if sock:
        qmp.qmp_execute(sock, "set-action", {"reboot": "reset"})
    try:
        t.monitor("system_reset")
        deadline = time.monotonic() + RESET_WAIT_S
        while True:
            status = t.monitor("info status")
            if hang.reset_took_effect(status):
                break
            if time.monotonic() > deadline:
                raise GdbextError(
                    f"QEMU did not reset the machine ({one_line(status)}): it runs with "
                    "-action reboot=shutdown? give gdbext its QMP socket ('set "
                    "xen-qmp-socket PATH', QEMU -qmp unix:PATH,server=on,wait=off) so that "
                    "it can switch the action for its own reset")
            time.sleep(RESET_POLL_S)
    finally:
        if sock:
            qmp.qmp_execute(sock, "set-action", {"reboot": "shutdown"})
        t.invalidate()
