"""The running ``xen-mb2-break`` session: plant the planned stops, continue, report.

It runs to Xen's entry with ``run_to`` (which finds the load base B without the
user's help, before GRUB has loaded Xen, under QEMU TCG), then plants one silent
internal breakpoint per stop of ``core.bootstops``' plan: B + offset for code
that runs at the load address, the linked VA from ``__high_start`` on, and
``trampoline_phys`` + offset for the trampoline's low copy (planted as soon as
``efi_multiboot2`` has chosen trampoline_phys).  What to plant and what a stop
is are ``core.mb2session``'s bookkeeping; this module drives GDB.

At each stop it records where the CPU is, what changed in CR3 and the tables
since the previous stop, and the checks that apply there (``merge_live``).
``xen-mb2-break`` (interactive: from GDB's stop event, which the context passes
to ``on_stop``; ``--batch``: ``next_stop`` in a loop) and ``xen-walkthrough``
drive it.
"""

from __future__ import annotations

import time
from typing import Dict, List, Optional

import gdb

from ..core import bootstops, render, x86
from ..core.bootstops import LOW, BootStop, TablesSnapshot, diff_snapshots
from ..core.memory import qwords
from ..core.errors import GdbextError, GuestCrashed, MemoryReadError
from ..core.mb2session import VERIFY_BYTES, SessionBook, SessionOptions, failed
from ..core.merge_here import CheckRequest
from ..core.xenimage import LoadedXen
from .command import one_line
from .fault_catch import report_lines
from .merge_live import check_here, remember_firmware
from .run_to import run_to

PAGE = x86.PAGE_SIZE


class BootSession:
    """One run of xen-mb2-break (or the walkthrough): the book, the planted breakpoints."""

    def __init__(self, ctx, syms, options: SessionOptions, who: str = "xen-mb2-break"):
        self.ctx = ctx
        self.who = who          # the command driving it, in what it says
        self.syms = syms
        self.options = options
        self.book = SessionBook(bootstops.plan_for(syms), options)
        self.xen: Optional[LoadedXen] = None
        self.breakpoints: Dict[int, "gdb.Breakpoint"] = {}
        self.pending: List[str] = []   # stops planted later (once trampoline_phys is known)
        self.snapshot: Optional[TablesSnapshot] = None
        self.batch_running = False
        self.done = False

    @property
    def plan(self) -> bootstops.StopPlan:
        return self.book.plan

    @property
    def selected(self) -> List[BootStop]:
        return self.book.selected

    @property
    def load_base(self) -> Optional[int]:
        return self.book.load_base

    @property
    def records(self) -> List[dict]:
        return self.book.records

    # -- breakpoints ---------------------------------------------------------------------

    def plant(self) -> List[str]:
        """Plant every stop whose address is known now; return the names still pending."""
        new, pending = self.book.to_plant()
        for addr, _stop in new:
            self.breakpoints[addr] = self.ctx.quiet_breakpoint(addr)
        return pending

    def crashed(self, err: GuestCrashed) -> dict:
        """The guest crashed during the session: record it after the stops reached, and
        end the session (its breakpoints removed)."""
        rip = self.ctx.register("rip")
        record = self.book.record_crash(dict(err.as_dict(), text=report_lines(err)), rip)
        self.finish()
        return record

    def finish(self) -> None:
        self.done = True
        self.ctx.delete_breakpoints(self.breakpoints.values())
        self.breakpoints.clear()

    def _learn_trampoline_phys(self) -> None:
        """trampoline_phys, once efi_multiboot2 has chosen it; then plant the low stop."""
        if not self.book.wants_trampoline_phys():
            return
        self.book.looked_for_trampoline_phys = True
        t = self.ctx.target
        with t.phys_mode():
            value = bootstops.read_trampoline_phys(t.cache, self.xen)
        if value is not None:
            self.book.trampoline_phys = value
            self.plant()

    # -- one stop ------------------------------------------------------------------------

    def _verified(self, stop: BootStop, rip: int) -> bool:
        """The bytes at RIP are Xen's (for the low copy: the CR3 load just before)."""
        if stop.kind == LOW:
            want = bootstops.MOV_RAX_CR3
            at = rip - len(want)
        else:
            want = self.syms.read_linked(stop.linked_va, VERIFY_BYTES)
            at = rip
        return self.ctx.bytes_at(at, len(want)) == want

    def _registers(self, stop: BootStop) -> Dict[str, int]:
        regs = {}
        for name in self.book.registers_for(stop):
            value = self.ctx.register(name)
            if value is not None:
                regs[name] = value
        return regs

    def _snapshot(self, cr3: int) -> TablesSnapshot:
        t = self.ctx.target
        cache = t.cache
        root = None
        boot = {}
        with t.phys_mode():
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
        ids, predict = self.book.check_ids(stop)
        if not ids:
            return {"checks": [], "error": None}
        req = CheckRequest(stop=stop.name, predict=predict,
                           assume_relocated=predict and bool(self.options.assume_relocated),
                           only=tuple(ids))
        try:
            result = check_here(self.ctx, req)
        except GdbextError as err:
            return {"checks": [], "error": f"checks at {stop.name}: {err}"}
        return {"checks": list(result.get("checks") or []), "error": None,
                "mode": result.get("mode")}

    def at_stop(self, rip: int) -> Optional[dict]:
        """The record of the stop at RIP; None for a helper stop or a false hit."""
        stop = self.book.stop_for(rip)
        if stop is None or not self._verified(stop, rip):
            return None
        regs = self._registers(stop)
        snap = self._snapshot(regs.get("cr3", 0))
        firmware_error = None
        if stop is self.plan.entry:
            try:
                remember_firmware(self.ctx)   # F, for the checks at the later stops
            except GdbextError as err:
                firmware_error = str(err)
        if self.book.after_efi_multiboot2(stop):
            self._learn_trampoline_phys()
        if not self.book.wanted(stop):
            return None  # a helper (or the skipped entry): no report, no diff
        changes = diff_snapshots(self.snapshot, snap)
        self.snapshot = snap
        return self.book.record(self.syms, stop, rip, regs, changes, self._checks(stop),
                                firmware_error)

    # -- driving the guest (xen-mb2-break --batch, xen-walkthrough) -------------------------

    def start(self, timeout: float, announce: bool = True) -> Optional[dict]:
        """Run to __efi64_mb2_start (unless stopped there), learn B, record the entry and
        plant the other stops (``self.pending``: those planted later).  Returns the
        entry's record (None if the entry is not a selected stop)."""
        ctx = self.ctx
        t = ctx.target
        t.check_connected()   # one clear line instead of GDB's "not being run"
        entry = self.plan.stops[0]
        rip = ctx.register("rip")
        base = ctx.xen.load_base
        at_entry = base is not None and rip == entry.address(base)
        if not at_entry:
            # Past the entry in this boot, run_to says so and boots again first.
            run_to(ctx, entry.name, timeout, who=self.who, announce=announce)
        self.book.load_base = ctx.xen.load_base
        self.xen = LoadedXen(self.syms, self.book.load_base)
        t.invalidate()
        record = self.at_stop(t.read_register("rip"))
        if record is None and self.book.wanted(entry):
            raise GdbextError(f"stopped at {entry.name}'s address but the bytes there "
                              "are not this xen-syms' (wrong xen-syms?)")
        self.pending = self.plant()
        return record

    def next_stop(self, timeout: float) -> dict:
        """Continue to the next selected stop (through helper stops) and return its
        record; a stop anywhere else (the user's breakpoint, a fault) is an error."""
        waiting_for = self.book.next_name()
        while True:
            # Returns only when one of the session's breakpoints fired (GDB's stop
            # event says which), never for a stop that merely has a planted RIP.
            rip = self.ctx.continue_until(time.monotonic() + timeout, waiting_for,
                                          list(self.breakpoints.values()))
            if self.book.stop_for(rip) is None:
                where = bootstops.where_in_boot(self.syms, self.load_base, rip,
                                                self.book.trampoline_phys)
                raise GdbextError(f"stopped at {rip:#x} ({where or 'not Xen boot code'}) "
                                  f"while waiting for {waiting_for}: not a planned stop")
            record = self.at_stop(rip)
            if record is not None:
                return record

    def run_batch(self) -> dict:
        """Continue through every selected stop (the entry already recorded by
        ``start``), printing each record unless JSON was asked for; stop after a failed
        check unless ``keep_going``; always remove the breakpoints. The session's result
        (an error in it, never raised: the caller decides)."""
        book, opts = self.book, self.options
        self.batch_running = True
        try:
            if not opts.json:
                for r in self.records:
                    self.print_record(r)
            stopped_on_fail = bool(self.records) and failed(self.records[-1]) \
                and not opts.keep_going
            while not stopped_on_fail and book.more_to_come():
                record = self.next_stop(opts.timeout)
                if not opts.json:
                    self.print_record(record)
                if failed(record) and not opts.keep_going:
                    stopped_on_fail = True
        except GuestCrashed as err:
            self.crashed(err)
            if not opts.json:
                gdb.write(f"{self.who}: {err.summary}\n")
                gdb.write("".join(ln + "\n" for ln in report_lines(err)))
        except GdbextError as err:
            book.error = str(err)
        except gdb.error as err:
            # QEMU died or closed the connection while the guest ran: keep the stops
            # already reached, and say what happened in one line.
            book.error = (f"QEMU is gone (GDB: {one_line(err)}) while waiting for the next "
                          f"stop: {len(self.records)} stop(s) reached are reported")
        finally:
            self.batch_running = False
            self.finish()
        return book.result()

    # -- interactive mode: reports from GDB's stop event -----------------------------------

    def on_stop(self, event) -> None:
        if self.batch_running or self.done:
            return
        bps = getattr(event, "breakpoints", None) or []
        if not any(bp in self.breakpoints.values() for bp in bps):
            return
        try:
            self.ctx.target.invalidate()
            rip = self.ctx.target.read_register("rip")
            record = self.at_stop(rip)
            if record is None:
                stop = self.book.stop_for(rip)
                if stop is not None and not self.book.wanted(stop):
                    tp = self.book.trampoline_phys
                    what = (f"{stop.name}, a helper stop: trampoline_phys = "
                            + (f"{tp:#x}" if tp is not None else "unknown"))
                else:
                    what = f"{rip:#x}, a planted address whose bytes are not Xen's"
                gdb.write(f"xen-mb2-break: stopped at {what}; 'continue' goes on\n")
                return
            self.print_record(record)
            if self.book.last_reached():
                self.finish()
                gdb.write("xen-mb2-break: last stop reached; its breakpoints are removed\n")
            # CR3 or the IDT may have changed since the last stop: catch faults anew.
            self.ctx.faults.arm_quietly(self.who)
        except (GdbextError, gdb.error) as err:
            gdb.write(f"xen-mb2-break: {err}\n")

    def print_record(self, record: dict) -> None:
        if self.options.json:
            gdb.write(render.to_json(record) + "\n")
            return
        text = bootstops.record_text(record, len(self.records), len(self.selected),
                                     self.load_base)
        text = render.fit_width(text, self.options.width)
        if self.options.color:
            text = render.highlight(text)
        gdb.write(text + "\n")
