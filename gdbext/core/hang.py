"""When the guest stops coming back: hangs, triple faults and the resets QEMU paused.

Pure decisions over plain values; the GDB layer (gdb_layer/hang_watch.py) takes the
samples and reads the logs, and raises ``GuestCrashed`` with the reports made here.

Hangs. A stop gdbext waits for that has not come within ``set xen-hang-wait`` seconds
is only a *suspected* hang: the guest may just be slow (a loaded machine, QEMU
descheduled). The GDB layer then interrupts and takes ``SAMPLES`` samples, each after
the guest ran ``SAMPLE_INTERVAL_S`` more seconds, and each made of up to ``TRACE_STEPS``
single steps. A hang is declared only when every sample shows the same thing:

* the CPU halted (QEMU's ``HLT=1``), or about to execute ``hlt``, with interrupts off:
  only an NMI could wake it (Xen's halt loop after a panic);
* the CPU halted with interrupts on, at the same RIP each time: no interrupt comes;
* the CPU running one small loop (the stepped RIPs repeat with a short period), the
  same loop every time (a ``jmp .``, the firmware's CpuDeadLoop after an exception).

Single steps make each sample independent of host load: every step executes exactly
one guest instruction, so a guest that got no host CPU between two samples still
shows, within the sample, whether it leaves its loop. And a bounded wait loop of a
healthy boot (a firmware stall polling a timer) reads a clock that ran for the whole
interval, so it leaves its loop in the next sample: only a loop lasting longer than
(SAMPLES - 1) * SAMPLE_INTERVAL_S of guest time is taken for a spin.

Triple faults. QEMU started with ``-action reboot=shutdown,shutdown=pause`` (the lab
does) pauses the machine instead of resetting it; its gdbstub then reports the stop
as SIGQUIT (GDB_SIGNAL_QUIT for RUN_STATE_SHUTDOWN) and ``info status`` says
``paused (shutdown)``; the registers still hold the state at the fault. Which
exceptions led there is only in QEMU's ``-d int,cpu_reset`` log (core.qemulog).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from . import faults, qemulog

# --- settings and sampling --------------------------------------------------------------

# The default of 'set xen-hang-wait' (seconds without the awaited stop before the CPU
# is sampled). The wait alone never declares a hang (see the module doc): it bounds how
# soon a hang is seen and how often a slow boot is sampled. Measured gaps between two
# stops of a healthy boot of the lab on this 2-core machine: 5-9 s from QEMU's start
# to the entry (firmware and GRUB; the longest), a second or two after that; 12 s and
# more with QEMU held 3 s at each resume (tests/integration/test_slowed_guest.py).
# 20 s leaves a loaded machine twice that before a healthy boot is even sampled (and a
# sample of it costs one interrupt and a few steps), and still reports a hang within
# about 25 s of the last stop.
DEFAULT_HANG_WAIT_S = 20
SAMPLES = 3
SAMPLE_INTERVAL_S = 1.0
TRACE_STEPS = 16
# A loop is at most this many distinct instructions, seen twice in TRACE_STEPS steps
# (a 'jmp .' is 1; the firmware's CpuDeadLoop with its CpuPause call about 6).
MAX_LOOP_INSTRUCTIONS = TRACE_STEPS // 2
# Seconds a single step may take before the sampler gives up on it (a step does not
# return while the CPU sleeps, e.g. in 'hlt' with interrupts off).
STEP_TIMEOUT_S = 20.0
RFLAGS_IF = 1 << 9

HLT = b"\xf4"
MWAIT = b"\x0f\x01\xc9"
MWAITX = b"\x0f\x01\xfb"


def blocks_stepping(code: bytes) -> bool:
    """Whether the instruction at RIP (its first bytes) may sleep until an interrupt:
    stepping it with interrupts masked (QEMU's gdbstub steps with IRQs off) would not
    return. The sampler stops its trace before such an instruction."""
    return code[:1] == HLT or code[:3] in (MWAIT, MWAITX)


@dataclass(frozen=True)
class CpuSample:
    """The CPU as one sample saw it."""
    rip: int
    rflags: int
    halted: bool                      # QEMU: HLT=1 (sleeping in hlt/mwait)
    trace: Tuple[int, ...] = ()       # RIP before each single step, RIP at the end last
    at_hlt: bool = False              # the trace stopped before a hlt/mwait at its end

    @property
    def interrupts_on(self) -> bool:
        return bool(self.rflags & RFLAGS_IF)

    def as_dict(self) -> Dict[str, object]:
        return {"rip": self.rip, "rflags": self.rflags, "halted": self.halted,
                "trace": list(self.trace), "at_hlt": self.at_hlt}


def find_loop(trace: Sequence[int]) -> Optional[Tuple[int, ...]]:
    """The instructions of the loop ``trace`` runs in, in the order it runs them, or None.

    A loop: the trace is periodic from its start (trace[i] == trace[i + p] for every i)
    with a period p of at most MAX_LOOP_INSTRUCTIONS distinct RIPs, seen at least twice
    over."""
    n = len(trace)
    for p in range(1, min(MAX_LOOP_INSTRUCTIONS, n // 2) + 1):
        if all(trace[i] == trace[i + p] for i in range(n - p)):
            body = tuple(trace[:p])
            if len(set(body)) == p:
                return body
    return None


# What the samples show.
HANG_HALT = "halt"          # hlt with interrupts off (or no interrupt comes)
HANG_SPIN = "spin"          # one small loop
NOT_HUNG = "running"        # the CPU moves on: slow, not hung


@dataclass
class HangVerdict:
    kind: str
    rip: int
    loop: Tuple[int, ...] = ()
    why: str = ""

    @property
    def hung(self) -> bool:
        return self.kind != NOT_HUNG


def _halt_state(s: CpuSample) -> Optional[bool]:
    """None if the sample is not halted; else whether interrupts can wake it."""
    if s.halted or s.at_hlt:
        return s.interrupts_on
    return None


def refuted(samples: Sequence[CpuSample]) -> bool:
    """Whether the samples so far already show a CPU that moves on (sampling stops: a
    healthy boot costs one sample): the last is neither halted nor in a loop, or not in
    the state of the first."""
    if not samples:
        return False
    first, last = samples[0], samples[-1]
    h0, h1 = _halt_state(first), _halt_state(last)
    if h1 is not None or h0 is not None:
        return h0 is None or h1 is None or (h1 is True and last.rip != first.rip)
    l0, l1 = find_loop(first.trace), find_loop(last.trace)
    return l1 is None or l0 is None or set(l0) != set(l1)


def judge(samples: Sequence[CpuSample]) -> HangVerdict:
    """Whether ``samples`` (taken SAMPLE_INTERVAL_S of guest running apart) show a hang.
    A halt with interrupts off is final in any number of samples (only an NMI wakes
    it); anything else needs all SAMPLES to agree."""
    if not samples:
        return HangVerdict(NOT_HUNG, 0, why="no sample")
    last = samples[-1]
    halts = [_halt_state(s) for s in samples]
    if all(h is False for h in halts):
        return HangVerdict(HANG_HALT, last.rip,
                           why="halted with interrupts off (hlt with IF clear): only an NMI "
                               "wakes it")
    if len(samples) < SAMPLES:
        return HangVerdict(NOT_HUNG, last.rip, why=f"only {len(samples)} sample(s)")
    if all(h is not None for h in halts) and len({s.rip for s in samples}) == 1:
        return HangVerdict(HANG_HALT, last.rip,
                           why=f"halted at the same RIP in {len(samples)} samples "
                               f"{SAMPLE_INTERVAL_S:g} s apart: no interrupt wakes it for long")
    loops = [find_loop(s.trace) for s in samples]
    if all(lp is not None for lp in loops) and len({frozenset(lp) for lp in loops}) == 1:
        body = loops[-1]
        return HangVerdict(HANG_SPIN, last.rip, body,
                           why=f"spinning in a loop of {len(body)} instruction(s) "
                               f"({min(body):#x}..{max(body):#x}), the same loop in "
                               f"{len(samples)} samples {SAMPLE_INTERVAL_S:g} s apart")
    return HangVerdict(NOT_HUNG, last.rip, why="the CPU moves on (not one loop, not halted)")


# --- the serial console -----------------------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;=?]*[A-Za-z]|\x1b[()][0-9A-Za-z]")
SERIAL_TAIL_LINES = 8
SERIAL_TAIL_BYTES = 64 * 1024


def serial_tail(raw: bytes, lines: int = SERIAL_TAIL_LINES) -> List[str]:
    """The console's last non-empty lines, ANSI escapes and carriage returns removed."""
    text = _ANSI.sub("", raw.decode("utf-8", "replace"))
    kept = [ln.rstrip() for ln in re.split(r"\r\n|\r|\n", text) if ln.strip()]
    return kept[-lines:]


# --- the reports ------------------------------------------------------------------------

@dataclass
class HangReport:
    verdict: HangVerdict
    waited_s: float                    # how long gdbext waited for the stop
    what: str                          # the stop awaited
    rip_name: faults.AddressName
    samples: List[CpuSample] = field(default_factory=list)
    console: List[str] = field(default_factory=list)
    console_note: str = ""             # why there are no console lines

    def summary(self) -> str:
        v = self.verdict
        how = "halted" if v.kind == HANG_HALT else "spinning"
        return (f"the guest hung: no stop at {self.what} within {self.waited_s:.0f} s; "
                f"the CPU is {how} at {v.rip:#x} ({self.rip_name.text})")

    def text(self) -> List[str]:
        v = self.verdict
        lines = [f"hang: no stop at {self.what} within {self.waited_s:.0f} s "
                 f"(set xen-hang-wait)",
                 f"  RIP     {v.rip:#x}  {self.rip_name.text}",
                 f"  state   {v.why}"]
        last = self.samples[-1] if self.samples else None
        if last is not None:
            lines.append(f"  RFLAGS  {last.rflags:#x} (interrupts "
                         f"{'on' if last.interrupts_on else 'off'})")
        if v.loop:
            lines.append("  loop    " + " ".join(f"{a:#x}" for a in v.loop))
        if self.console:
            lines.append("  serial console, last lines:")
            lines.extend(f"    | {ln}" for ln in self.console)
        elif self.console_note:
            lines.append(f"  serial  {self.console_note}")
        return lines

    def as_dict(self) -> Dict[str, object]:
        v = self.verdict
        return {"state": v.kind, "rip": v.rip, "rip_name": self.rip_name.as_dict(),
                "why": v.why, "loop": list(v.loop), "waited_s": round(self.waited_s, 1),
                "waiting_for": self.what,
                "samples": [s.as_dict() for s in self.samples],
                "console": list(self.console), "console_note": self.console_note,
                "text": self.text()}


def timeout_text(what: str, waited_s: float, verdict: Optional[HangVerdict],
                 rip_name: Optional[faults.AddressName]) -> str:
    """The end of the whole --timeout on a guest that still runs (not hung)."""
    text = f"timed out waiting for Xen to reach {what} after {waited_s:.0f} s"
    if verdict is not None and rip_name is not None:
        text += (f": the guest still runs (last sampled at {verdict.rip:#x}, "
                 f"{rip_name.text}; not a loop, not halted); raise --timeout, or see the "
                 "serial log")
    else:
        text += " (is Xen booting? see the serial log)"
    return text


# --- triple faults and shutdowns -----------------------------------------------------------

SHUTDOWN_SIGNAL = "SIGQUIT"     # QEMU's gdbstub: the VM stopped in RUN_STATE_SHUTDOWN
PAUSED_SHUTDOWN = "paused (shutdown)"
RESET_DONE_STATES = ("prelaunch", "running")
QEMU_ACTION_FLAGS = "-action reboot=shutdown,shutdown=pause"


def status_word(info_status: str) -> str:
    """'paused (shutdown)' -> 'shutdown'; 'running' -> 'running' (QEMU's 'info status')."""
    m = re.search(r"VM status:\s*(\w+)(?:\s*\((.+?)\))?", info_status)
    if not m:
        return ""
    return m.group(2) or m.group(1)


def is_shutdown(signal_name: Optional[str], info_status: str) -> bool:
    """A stop that is QEMU pausing the machine at a shutdown or a reset request."""
    return signal_name == SHUTDOWN_SIGNAL and status_word(info_status) == "shutdown"


def reset_took_effect(info_status: str) -> bool:
    """After 'system_reset' on a stopped machine QEMU sets 'prelaunch' once the reset is
    done; with -action reboot=shutdown the reset becomes a shutdown request instead and
    the status stays what it was ('debug')."""
    return status_word(info_status) in RESET_DONE_STATES


def current_triple_fault(log_text: str) -> Optional[qemulog.TripleFaultChain]:
    """The triple fault that ended this log, if the log ends with one: a triple fault
    followed by more exceptions or a CPU reset belongs to an earlier boot."""
    events = qemulog.parse_int_log(log_text)
    # A 'CPU Reset' after it (QEMU logs one at every reset, gdbext's own included)
    # means the machine booted again since.
    if not events or not isinstance(events[-1], qemulog.TripleFault):
        return None
    return qemulog.last_triple_fault(events)


def log_tail_text(raw: bytes, limit: int) -> str:
    """The last ``limit`` bytes of a -d int log, from the first whole record on: a
    triple fault's chain is a few records long, the log of a boot megabytes."""
    if len(raw) <= limit:
        return raw.decode("utf-8", "replace")
    cut = raw[-limit:]
    start = cut.find(b"\ncheck_exception")
    return cut[start + 1 if start >= 0 else 0:].decode("utf-8", "replace")


INT_LOG_TAIL_BYTES = 256 * 1024


@dataclass
class ShutdownReport:
    """QEMU paused the machine at a shutdown: a triple fault (with its chain when the
    -d int log is known), or another reset or power-off request."""
    triple: Optional[faults.TripleFaultReport]
    rip: int
    rip_name: faults.AddressName
    cr2: Optional[int]
    cr3: Optional[int]
    idtr: Optional[Tuple[int, int]]
    log_note: str = ""                 # what is known of the chain, when it is not
    first_name: Optional[faults.AddressName] = None

    @property
    def kind(self) -> str:
        return "triple-fault" if self.triple is not None else "shutdown"

    def summary(self) -> str:
        if self.triple is not None:
            t = self.triple
            names = [faults.vector_info(v).mnemonic or str(v) for v in t.vectors]
            where = (f" at {t.first_rip:#x} ({self.first_name.text})"
                     if t.first_rip is not None and self.first_name is not None else "")
            # A fault while delivering a fault is a #DF; one while delivering the #DF, a
            # triple fault (SDM vol. 3A, 6.15).
            steps = [f"{name} delivering {'it' if i == 1 else 'the #DF'} -> "
                     + ("triple fault" if i == len(names) - 1 else "#DF")
                     for i, name in enumerate(names) if i]
            return (f"the guest triple-faulted: {names[0]}{where}; " + "; ".join(steps)
                    + "; QEMU paused it instead of resetting")
        return (f"the guest reset or shut down (a triple fault, or a reset the guest "
                f"asked for) at RIP {self.rip:#x} ({self.rip_name.text}); QEMU paused it "
                f"instead ({self.log_note})")

    def text(self) -> List[str]:
        lines = []
        if self.triple is not None:
            lines.append(self.triple.text())
            if self.first_name is not None and self.triple.first_rip is not None:
                lines.append(f"  first   {self.triple.first_rip:#x}  {self.first_name.text}")
        else:
            lines.append("shutdown: QEMU paused the machine at a reset or power-off request")
            lines.append(f"  chain   {self.log_note}")
        lines.append(f"  RIP     {self.rip:#x}  {self.rip_name.text} (the state QEMU kept)")
        if self.cr2 is not None:
            lines.append(f"  CR2     {self.cr2:#x}")
        if self.cr3 is not None:
            lines.append(f"  CR3     {self.cr3:#x}")
        if self.idtr is not None:
            lines.append(f"  IDTR    base {self.idtr[0]:#x} limit {self.idtr[1]:#x}")
        lines.append("  the machine stays paused: 'monitor system_reset' (or xen-run-to) "
                     "boots again")
        return lines

    def as_dict(self) -> Dict[str, object]:
        return {"state": self.kind,
                "triple_fault": self.triple.as_dict() if self.triple else None,
                "rip": self.rip, "rip_name": self.rip_name.as_dict(), "cr2": self.cr2,
                "cr3": self.cr3, "idtr": list(self.idtr) if self.idtr else None,
                "first_name": self.first_name.as_dict() if self.first_name else None,
                "log_note": self.log_note, "text": self.text()}


def explain_shutdown(log_text: Optional[str], log_note: str, regs: Dict[str, int],
                     idtr: Optional[Tuple[int, int]], name_of) -> ShutdownReport:
    """``log_text``: the tail of QEMU's -d int log (None: not known, ``log_note`` says
    why); ``regs``: 'info registers' at the pause; ``name_of(va)``: an AddressName."""
    chain = current_triple_fault(log_text) if log_text is not None else None
    rip = regs.get("rip", regs.get("eip", 0))
    cr2 = regs.get("cr2")
    triple = None
    first_name = None
    if chain is not None and chain.steps:
        triple = faults.explain_triple_fault(chain, cr2, idtr)
        if triple.first_rip is not None:
            first_name = name_of(triple.first_rip)
    elif log_text is not None and not log_note:
        log_note = ("QEMU's -d int log does not end with a triple fault: a reset or "
                    "power-off the guest asked for")
    return ShutdownReport(triple, rip, name_of(rip), cr2, regs.get("cr3"), idtr, log_note,
                          first_name)
