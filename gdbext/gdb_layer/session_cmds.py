"""xen-mb2-break: the step-by-step session around __efi64_mb2_start.

It runs to Xen's entry with ``xen_cmds.run_to`` (which finds the load base B
without the user's help, before GRUB has loaded Xen, under QEMU TCG), then
plants one silent internal breakpoint per stop of ``core.bootstops``' plan:
B + offset for code that runs at the load address, the linked VA from
``__high_start`` on, and ``trampoline_phys`` + offset for the trampoline's
low copy (planted as soon as ``efi_multiboot2`` has chosen trampoline_phys).

At each stop it reports where the CPU is, what changed in CR3 and the tables
since the previous stop, and the checks that apply there (``merge_cmds``'
``check_here``).  Interactive: the report is printed from GDB's stop event,
so each ``continue`` stops at the next stop with its report.  ``--batch``
continues through every stop itself, with a timeout on each wait.
"""

from __future__ import annotations

import time
from typing import Dict, List, Optional

import gdb

from ..core import bootstops, l4merge, render, x86
from ..core.bootstops import (ENTRY, LOW, STOP_ORDER, BootStop, TablesSnapshot,
                              diff_snapshots, qwords, select_checks, where_in_boot)
from ..core.errors import GdbextError, MemoryReadError
from ..core.xenimage import LoadedXen
from . import merge_cmds, xen_cmds
from .backend import target
from .command import CommandParser, XenCommand, add_json_option, one_line, use_color

# Bytes compared at a stop: the ELF's bytes at the stop's instruction, so that
# a stop at a planted address that is not Xen's code is never reported.
VERIFY_BYTES = 16
# Registers every stop record carries.
STOP_REGISTERS = ("rip", "rsp", "cr0", "cr3", "cr4", "efer")
# Registers that say more at one stop: where x86_32_switch goes next (%r15),
# the load base trampoline_setup works from (%esi).
EXTRA_REGISTERS = {bootstops.SWITCH: ("r15",), bootstops.TRAMPOLINE_SETUP: ("rsi",)}
PAGE = x86.PAGE_SIZE

_SESSION: Optional["Session"] = None
_HANDLER_CONNECTED = False


class _StopBreakpoint(gdb.Breakpoint):
    """A planted stop: internal (no number in 'info breakpoints') and silent (GDB
    prints no 'Breakpoint -N' line; the session prints its report instead)."""

    def __init__(self, address: int):
        super().__init__(f"*{address:#x}", internal=True)
        self.silent = True


class Session:
    """One run of xen-mb2-break: the plan, the planted breakpoints, the records."""

    def __init__(self, syms, args):
        self.syms = syms
        self.plan = bootstops.plan_for(syms)
        self.args = args
        self.selected: List[BootStop] = self.plan.select(args.stops or None,
                                                         args.skip_stops or None)
        # Validate --only/--skip now: a typo is one error line before anything runs.
        select_checks(bootstops.ALL_CHECKS, args.only or None, args.skip or None)
        self.helpers: List[BootStop] = self._helpers()
        self.load_base: Optional[int] = None
        self.xen: Optional[LoadedXen] = None
        self.trampoline_phys: Optional[int] = None
        self.looked_for_trampoline_phys = False
        self.breakpoints: Dict[int, _StopBreakpoint] = {}
        self.pending: List[str] = []   # stops planted later (once trampoline_phys is known)
        self.stop_by_address: Dict[int, BootStop] = {}
        self.snapshot: Optional[TablesSnapshot] = None
        self.records: List[dict] = []
        self.batch_running = False
        self.done = False
        self.error: Optional[str] = None

    # -- the plan ------------------------------------------------------------------------

    def _helpers(self) -> List[BootStop]:
        """A stop planted only to learn trampoline_phys: when the trampoline's stop
        is wanted and no wanted stop lies between efi_multiboot2's return and it."""
        low = [s for s in self.selected if s.kind == LOW]
        if not low:
            return []
        after = STOP_ORDER.index(bootstops.EFI_MB2)
        before = STOP_ORDER.index(low[0].name)
        if any(after < STOP_ORDER.index(s.name) < before for s in self.selected):
            return []
        for s in self.plan.stops:
            if after < STOP_ORDER.index(s.name) < before:
                return [s]
        return []

    def wanted(self, stop: BootStop) -> bool:
        return any(s.name == stop.name for s in self.selected)

    # -- breakpoints ---------------------------------------------------------------------

    def plant(self) -> List[str]:
        """Plant every stop whose address is known now; return the names still pending."""
        pending = []
        for stop in self.selected + self.helpers:
            if stop.name == ENTRY:
                continue
            addr = stop.address(self.load_base, self.trampoline_phys)
            if addr is None:
                pending.append(stop.name)
                continue
            if addr in self.stop_by_address:
                continue
            self.stop_by_address[addr] = stop
            self.breakpoints[addr] = _StopBreakpoint(addr)
        return pending

    def remove_breakpoints(self) -> None:
        for bp in self.breakpoints.values():
            try:
                bp.delete()
            except RuntimeError:
                pass  # already gone (the user deleted it)
        self.breakpoints.clear()

    def finish(self) -> None:
        self.done = True
        self.remove_breakpoints()

    def _learn_trampoline_phys(self) -> None:
        """trampoline_phys, once efi_multiboot2 has chosen it; then plant the low stop."""
        if self.trampoline_phys is not None or self.plan.trampoline_phys_va is None:
            return
        if not any(s.kind == LOW for s in self.selected):
            return
        self.looked_for_trampoline_phys = True
        with target().phys_mode():
            value = bootstops.read_trampoline_phys(target().cache, self.xen)
        if value is not None:
            self.trampoline_phys = value
            self.plant()

    # -- one stop ------------------------------------------------------------------------

    def stop_for(self, rip: int) -> Optional[BootStop]:
        if self.load_base is not None and rip == self.plan.stops[0].address(self.load_base):
            return self.plan.stops[0]
        return self.stop_by_address.get(rip)

    def _verified(self, stop: BootStop, rip: int) -> bool:
        """The bytes at RIP are Xen's (for the low copy: the CR3 load just before)."""
        if stop.kind == LOW:
            want = bootstops.MOV_RAX_CR3
            at = rip - len(want)
        else:
            want = self.syms.read_linked(stop.linked_va, VERIFY_BYTES)
            at = rip
        try:
            got = gdb.selected_inferior().read_memory(at, len(want)).tobytes()
        except gdb.MemoryError:
            return False
        return got == want

    def _registers(self, stop: BootStop) -> Dict[str, int]:
        regs = {}
        for name in STOP_REGISTERS + EXTRA_REGISTERS.get(stop.name, ()):
            try:
                regs[name] = target().read_register(name)
            except GdbextError:
                pass
        return regs

    def _snapshot(self, cr3: int) -> TablesSnapshot:
        cache = target().cache
        root = None
        boot = {}
        with target().phys_mode():
            try:
                root = qwords(cache.read_phys(cr3 & ~x86.CR3_FLAGS_MASK, PAGE))
            except MemoryReadError:
                root = None
            for table, sym in self.syms.boot_tables():
                try:
                    raw = cache.read_phys(self.xen.pa(sym.value), table.pages * PAGE)
                except MemoryReadError:
                    continue
                boot[table.name] = qwords(raw)
        return TablesSnapshot(cr3, root, boot)

    def _checks(self, stop: BootStop) -> dict:
        predict = bool(self.args.predict) and self.plan.predicts_at(stop)
        ids = select_checks(self.plan.checks_for(stop, predict), self.args.only or None,
                            self.args.skip or None)
        if not ids:
            return {"checks": [], "error": None}
        try:
            result = merge_cmds.check_here(stop=stop.name, predict=predict,
                                    assume_relocated=predict and bool(self.args.assume_relocated),
                                    only=ids, skip=None)
        except GdbextError as err:
            return {"checks": [], "error": f"checks at {stop.name}: {err}"}
        return {"checks": list(result.get("checks") or []), "error": None,
                "mode": result.get("mode")}

    def at_stop(self, rip: int) -> Optional[dict]:
        """The record of the stop at RIP; None for a helper stop or a false hit."""
        stop = self.stop_for(rip)
        if stop is None or not self._verified(stop, rip):
            return None
        regs = self._registers(stop)
        snap = self._snapshot(regs.get("cr3", 0))
        firmware_error = None
        if stop.name == ENTRY:
            try:
                merge_cmds.remember_firmware()   # F, for the checks at the later stops
            except GdbextError as err:
                firmware_error = str(err)
        if STOP_ORDER.index(stop.name) > STOP_ORDER.index(bootstops.EFI_MB2):
            self._learn_trampoline_phys()
        if not self.wanted(stop):
            return None  # a helper (or the skipped entry): no report, no diff
        changes = diff_snapshots(self.snapshot, snap)
        self.snapshot = snap
        checks = self._checks(stop)
        record = {
            "stop": stop.name, "rip": rip, "cr3": regs.get("cr3"),
            "kind": stop.kind, "symbol": self.symbolic(stop, rip),
            "where": where_in_boot(self.syms, self.load_base, rip, self.trampoline_phys),
            "registers": regs, "changes": changes, "checks": checks["checks"],
            "counts": _counts(checks["checks"]), "error": checks["error"] or firmware_error,
        }
        for key in ("mode", "note"):
            if key in checks:
                record[key] = checks[key]
        self.records.append(record)
        return record

    # -- driving the guest (xen-mb2-break --batch, xen-walkthrough) -------------------------

    def start(self, timeout: float, announce: bool = True) -> Optional[dict]:
        """Run to __efi64_mb2_start (unless stopped there), learn B, record the entry and
        plant the other stops (``self.pending``: those planted later).  Returns the
        entry's record (None if the entry is not a selected stop)."""
        target().check_connected()   # one clear line instead of GDB's "not being run"
        entry = self.plan.stops[0]
        rip = _current_rip()
        at_entry = (xen_cmds.STATE.load_base is not None
                    and rip == entry.address(xen_cmds.STATE.load_base))
        if not at_entry and rip is not None and _past_high_start(self.syms, rip):
            # Xen never comes back to its entry in this boot (and xen-run-to's
            # __high_start sentinel is behind it): boot again, as xen-run-to does.
            if announce:
                gdb.write("xen-mb2-break: Xen is past __high_start; resetting the machine "
                          "(monitor system_reset) to stop at its entry on the next boot\n")
            target().monitor("system_reset")
            target().invalidate()
        if not at_entry:
            xen_cmds.run_to(ENTRY, timeout)
        self.load_base = xen_cmds.STATE.load_base
        self.xen = LoadedXen(self.syms, self.load_base)
        target().invalidate()
        record = self.at_stop(target().read_register("rip"))
        if record is None and self.wanted(entry):
            raise GdbextError("stopped at __efi64_mb2_start's address but the bytes there "
                              "are not this xen-syms' (wrong xen-syms?)")
        self.pending = self.plant()
        return record

    def next_stop(self, timeout: float) -> dict:
        """Continue to the next selected stop (through helper stops) and return its
        record; a stop anywhere else (the user's breakpoint, a fault) is an error."""
        waiting_for = _next_name(self)
        while True:
            rip = xen_cmds.continue_until(time.monotonic() + timeout, waiting_for)
            if self.stop_for(rip) is None:
                where = where_in_boot(self.syms, self.load_base, rip, self.trampoline_phys)
                raise GdbextError(f"stopped at {rip:#x} ({where or 'not Xen boot code'}) "
                                  f"while waiting for {waiting_for}: not a planned stop")
            record = self.at_stop(rip)
            if record is not None:
                return record

    def symbolic(self, stop: BootStop, rip: int) -> str:
        """``name+0x12`` of the instruction at RIP, saying where that copy runs."""
        name = self.syms.describe(stop.linked_va)
        if stop.kind == LOW:
            return f"{name} (trampoline copy at {self.trampoline_phys:#x})"
        if stop.kind == bootstops.LOAD:
            return f"{name} (load address)"
        return name

    # -- results ---------------------------------------------------------------------------

    def result(self) -> dict:
        all_checks = [c for r in self.records for c in r["checks"]]
        reached = [r["stop"] for r in self.records]
        errors = [r["error"] for r in self.records if r.get("error")]
        error = self.error or (errors[0] if errors else None)
        counts = _counts(all_checks)
        notes = list(self.plan.notes)
        never = [s.name for s in self.selected
                 if s.address(self.load_base, self.trampoline_phys) is None]
        if never and self.looked_for_trampoline_phys:
            notes.append(f"never planted (trampoline_phys unknown): {', '.join(never)}")
        return {"load_base": self.load_base,
                "complete": reached == [s.name for s in self.selected],
                "reached": reached, "stops": self.records, "counts": counts,
                "ok": counts[l4merge.FAIL] == 0 and error is None, "error": error,
                "notes": notes}


def _counts(checks: List[dict]) -> Dict[str, int]:
    return l4merge.tally(c["status"] for c in checks)


def _failed(record: dict) -> bool:
    return any(c["status"] == l4merge.FAIL for c in record["checks"])


# -- interactive mode: reports from GDB's stop event -------------------------------------


def _on_stop(event) -> None:
    session = _SESSION
    if session is None or session.batch_running or session.done:
        return
    bps = getattr(event, "breakpoints", None) or []
    if not any(bp in session.breakpoints.values() for bp in bps):
        return
    try:
        target().invalidate()
        rip = target().read_register("rip")
        record = session.at_stop(rip)
        if record is None:
            stop = session.stop_for(rip)
            if stop is not None and not session.wanted(stop):
                tp = session.trampoline_phys
                what = (f"{stop.name}, a helper stop: trampoline_phys = "
                        + (f"{tp:#x}" if tp is not None else "unknown"))
            else:
                what = f"{rip:#x}, a planted address whose bytes are not Xen's"
            gdb.write(f"xen-mb2-break: stopped at {what}; 'continue' goes on\n")
            return
        _print_record(session, record, len(session.records))
        if record["stop"] == session.selected[-1].name:
            session.finish()
            gdb.write("xen-mb2-break: last stop reached; its breakpoints are removed\n")
    except (GdbextError, gdb.error) as err:
        gdb.write(f"xen-mb2-break: {err}\n")


def _connect_handler() -> None:
    global _HANDLER_CONNECTED
    if not _HANDLER_CONNECTED:
        gdb.events.stop.connect(_on_stop)
        _HANDLER_CONNECTED = True


def _print_record(session: Session, record: dict, number: int) -> None:
    if session.args.json:
        gdb.write(render.to_json(record) + "\n")
        return
    text = bootstops.record_text(record, number, len(session.selected), session.load_base)
    if session.args.color:
        text = render.colorize(text, "text")
    gdb.write(text + "\n")


# -- the command ---------------------------------------------------------------------------


class Mb2BreakCommand(XenCommand):
    name = "mb2-break"
    summary = ("Stop at each step of Xen's multiboot2+EFI boot around __efi64_mb2_start and "
               "report CR3, the tables and the checks there.")

    def make_parser(self) -> CommandParser:
        p = CommandParser(
            description=self.summary + " Runs to __efi64_mb2_start first (no load address "
            "needed; works before GRUB has loaded Xen under QEMU TCG), then plants silent "
            "breakpoints at the stops computed from xen-syms: "
            + ", ".join(STOP_ORDER) + " (those this build has). Without --batch it stops "
            "at the entry with its report and each 'continue' stops at the next stop. If "
            "Xen is already past its entry, the machine is reset (monitor system_reset) and "
            "the session starts on the next boot.",
            epilog="Examples: xen-mb2-break;  xen-mb2-break --batch --predict --json;  "
                   "xen-mb2-break --stops '__efi64_mb2_start,trampoline cr3 load'")
        p.add_argument("--batch", action="store_true",
                       help="continue through every stop to the last one and print a summary")
        p.add_argument("--stops", action="append", default=[], metavar="NAMES",
                       help="only these stops (comma-separated, repeatable)")
        p.add_argument("--skip-stops", action="append", default=[], metavar="NAMES",
                       help="not these stops")
        p.add_argument("--only", action="append", default=[], metavar="IDS",
                       help="only these checks, e.g. I4,I9")
        p.add_argument("--skip", action="append", default=[], metavar="IDS",
                       help="not these checks")
        p.add_argument("--predict", action="store_true",
                       help="at the entry, check the merged L4 the RFC would build")
        p.add_argument("--assume-relocated", action="store_true",
                       help="with --predict: the variant that first adds B to the upper half")
        p.add_argument("--keep-going", action="store_true",
                       help="with --batch: go on after a failed check")
        p.add_argument("--timeout", type=float, default=120.0, metavar="S",
                       help="the longest each wait may take (default 120)")
        add_json_option(p)
        return p

    def run(self, args, from_tty):
        global _SESSION
        if args.assume_relocated and not args.predict:
            raise GdbextError("xen-mb2-break: --assume-relocated qualifies --predict: give both")
        if args.timeout <= 0:
            raise GdbextError(f"xen-mb2-break: --timeout {args.timeout:g}: give seconds > 0")
        syms = xen_cmds.require_syms()
        args.color = use_color(from_tty) and not args.json
        session = Session(syms, args)
        if _SESSION is not None:
            _SESSION.finish()   # a new session replaces the old one's breakpoints
        _SESSION = session
        record = session.start(args.timeout, announce=not args.json)
        pending = session.pending
        if args.batch:
            self._batch(session)
            return
        _connect_handler()
        if record is not None:
            _print_record(session, record, len(session.records))
        if not args.json:
            planted = [s.name for s in session.selected if s.name != ENTRY
                       and s.name not in pending]
            helpers = [f"{h.name} (a helper stop, to learn trampoline_phys)"
                       for h in session.helpers]
            gdb.write("xen-mb2-break: planted " + (", ".join(planted + helpers) or "nothing")
                      + (f"; later: {', '.join(pending)}" if pending else "")
                      + ". 'continue' stops at the next one.\n")
            for note in session.plan.notes:
                gdb.write(f"  note: {note}\n")
        if not _more_to_come(session):
            session.finish()

    def _batch(self, session: Session) -> None:
        args = session.args
        session.batch_running = True
        try:
            if not args.json:
                for r in session.records:
                    _print_record(session, r, len(session.records))
            stopped_on_fail = bool(session.records) and _failed(session.records[-1]) \
                and not args.keep_going
            while not stopped_on_fail and _more_to_come(session):
                record = session.next_stop(args.timeout)
                if not args.json:
                    _print_record(session, record, len(session.records))
                if _failed(record) and not args.keep_going:
                    stopped_on_fail = True
        except GdbextError as err:
            session.error = str(err)
        except gdb.error as err:
            # QEMU died or closed the connection while the guest ran: keep the stops
            # already reached, and say what happened in one line.
            session.error = (f"QEMU is gone (GDB: {one_line(err)}) while waiting for the next "
                             f"stop: {len(session.records)} stop(s) reached are reported")
        finally:
            session.batch_running = False
            session.finish()
        result = session.result()
        if args.json:
            gdb.write(render.to_json(result) + "\n")
        else:
            gdb.write(bootstops.summary_text(result) + "\n")
        failed = [f"{c['id']} at {r['stop']}" for r in result["stops"] for c in r["checks"]
                  if c["status"] == l4merge.FAIL]
        if failed:
            raise GdbextError(f"xen-mb2-break: {len(failed)} check(s) failed: "
                              + ", ".join(failed[:6]) + (" ..." if len(failed) > 6 else ""))
        if result["error"]:
            raise GdbextError(f"xen-mb2-break: {result['error']}")


def _more_to_come(session: Session) -> bool:
    """Whether a wanted stop lies ahead (after the last one reported)."""
    if not session.selected:
        return False
    if not session.records:
        return any(s.name != ENTRY for s in session.selected)
    return session.records[-1]["stop"] != session.selected[-1].name


def _next_name(session: Session) -> str:
    done = {r["stop"] for r in session.records}
    for s in session.selected:
        if s.name not in done:
            return s.name
    return "the next stop"


def _past_high_start(syms, rip: int) -> bool:
    """RIP is in __high_start or later (not the RFC's efi_multiboot2 at its linked VA)."""
    return where_in_boot(syms, None, rip) in (bootstops.HIGH_START, bootstops.START_XEN,
                                              bootstops.AFTER_START_XEN)


def _current_rip() -> Optional[int]:
    try:
        return target().read_register("rip")
    except GdbextError:
        return None


def install() -> None:
    Mb2BreakCommand()
