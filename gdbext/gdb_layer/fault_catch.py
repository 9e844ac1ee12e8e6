"""Catching the guest's CPU exceptions while gdbext drives the boot (``CONTEXT.faults``).

QEMU's gdbstub does not report exceptions, so gdbext plants silent internal
breakpoints where every fatal exception goes:

* until Xen loads its own IDT, on the handlers of vectors 0-31 of the IDT in force
  (the firmware's): IDTR comes from QEMU's ``monitor info registers``, the gates are
  decoded through the current paging (``core.faults.plan_handler_breakpoints``);
* once IDTR points into Xen's image (idt_table), on Xen's fatal paths instead
  (``core.faults.XEN_FATAL_SYMBOLS``): Xen handles its recoverable faults itself.

``arm()`` runs at each stop gdbext makes before it resumes the guest (and at the end
of the commands that leave it to the user's ``continue``); it costs one monitor read
and plans again only when IDTR or CR3 changed. A stop at one of these breakpoints is
the core's STOP_FAULT: ``crash_at()`` builds the report (``core.faults``) and the
``GuestCrashed`` the driving command ends with; at a stop of the user's own
``continue`` the stop event prints it (GDB shows nothing for a silent breakpoint).
The last one is kept for ``xen-fault``.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple

import gdb

from ..core import faults, piccheck, x86decode, xenimage
from ..core.errors import GdbextError, GuestCrashed
from ..core.qemu import parse_descriptor_tables, parse_info_registers
from .command import one_line

# Bytes read at the faulting RIP for the decoder (the longest x86 instruction).
INSN_BYTES = 15
GENERAL = faults.GENERAL_REGISTERS + ("rip",)


class FaultCatcher:
    """The fault-catching breakpoints of one GDB, and the last crash they caught."""

    def __init__(self, ctx) -> None:
        self.ctx = ctx
        self.active = False        # gdbext has driven the boot (arming starts then)
        self.kind: Optional[str] = None
        self.key: Optional[tuple] = None
        self.plan: Optional[faults.HandlerPlan] = None
        self.breakpoints: Dict[int, "gdb.Breakpoint"] = {}   # number -> breakpoint
        self.sites: Dict[int, object] = {}   # address -> vectors (tuple) or Xen symbol
        self.driving = False       # a continue gdbext makes is under way
        self.last: Optional[GuestCrashed] = None
        self.note: Optional[str] = None      # why nothing is planted, if so

    @property
    def enabled(self) -> bool:
        return bool(self.ctx.settings.catch_faults)

    # -- planting -------------------------------------------------------------------------

    def breakpoint_map(self) -> Dict[int, "gdb.Breakpoint"]:
        return {n: bp for n, bp in self.breakpoints.items() if bp.is_valid()}

    def disarm(self) -> None:
        self.ctx.delete_breakpoints(self.breakpoints.values())
        self.breakpoints.clear()
        self.sites.clear()
        self.kind = None
        self.key = None
        self.plan = None

    def arm(self) -> None:
        """Plant (or keep) the breakpoints for the IDT and CR3 in force now. Starts the
        catching on the first call (gdbext drives the boot from then on)."""
        self.active = True
        if not self.enabled:
            self.disarm()
            return
        ctx = self.ctx
        t = ctx.target
        text = t.monitor("info registers")
        idt = parse_descriptor_tables(text).get("idt")
        if idt is None:
            self.disarm()
            self.note = "QEMU's 'info registers' shows no IDT: nothing planted"
            return
        regs = ctx.read_control_registers()
        pctx = ctx.cpu_context(regs)
        syms = ctx.xen.syms
        kind = faults.catch_kind(idt[0], pctx.mode.long_mode, syms)
        # Xen's fatal paths are linked VAs: they do not move with IDTR or CR3.
        key = (kind, idt, regs["cr3"], id(syms)) if kind == faults.CATCH_FIRMWARE \
            else (kind, id(syms))
        if key == self.key:
            return
        self.disarm()
        self.key = key
        self.kind = kind
        # Xen's fatal paths are planted whenever Xen's symbols are known: Xen loads its
        # IDT well into __start_xen (trap_init), between two stops gdbext makes, and
        # only a crash ever gets there (nothing else runs at Xen's linked VAs).
        for name, va in faults.xen_fatal_sites(syms) if syms is not None else ():
            self._plant(va, name)
        self.note = None
        if kind == faults.CATCH_NONE:
            self.note = (f"no 64-bit IDT in force ({pctx.mode.name} paging): a fault here "
                         "is a triple fault")
            return
        if kind == faults.CATCH_XEN:
            if not self.sites:
                self.note = "this build has none of Xen's fatal paths"
            return
        with t.phys_mode():
            plan = faults.plan_handler_breakpoints(idt[0], idt[1], regs["cr3"], pctx, t.cache)
        self.plan = plan
        for site in plan.sites:
            self._plant(site.handler_va, tuple(plan.vectors_at(site.handler_va)))
        if not plan.sites:
            self.note = "no usable gate in the IDT: " + "; ".join(
                f"{s.vector}: {s.reason}" for s in plan.skipped[:3])

    def _plant(self, address: int, what) -> None:
        if address in self.sites:
            return
        bp = self.ctx.quiet_breakpoint(address)
        self.breakpoints[bp.number] = bp
        self.sites[address] = what

    def arm_quietly(self, who: str = "gdbext") -> None:
        """arm(), for the end of a command that leaves the guest to the user's
        'continue': a failure is one line, never the command's error."""
        try:
            self.arm()
        except (GdbextError, gdb.error) as err:
            gdb.write(f"{who}: exceptions will not be caught: {one_line(err)}\n")

    def set_enabled(self, on: bool) -> None:
        """``set xen-catch-faults``: off removes the breakpoints now; on plants them now
        if gdbext drives this boot and the guest is stopped."""
        if not on:
            self.disarm()
            return
        if self.active:
            self.key = None
            try:
                self.ctx.target.check_connected()
            except GdbextError:
                return     # planted at the next stop gdbext makes
            self.arm_quietly("xen-catch-faults")

    def describe(self) -> str:
        """What is caught now, in one line (xen-fault when nothing was caught)."""
        if not self.enabled:
            return "catching is off ('set xen-catch-faults on')"
        if not self.active:
            return "gdbext has not driven this boot yet"
        xen = [str(w) for w in self.sites.values() if isinstance(w, str)]
        vectors = sorted(v for w in self.sites.values() if not isinstance(w, str) for v in w)
        parts = []
        if vectors and self.plan is not None:
            handlers = sum(1 for w in self.sites.values() if not isinstance(w, str))
            parts.append(f"vectors {_ranges(vectors)} at {handlers} handler(s) of the IDT "
                         f"at {self.plan.idt_base:#x}")
        if xen:
            parts.append("Xen's fatal paths (" + ", ".join(xen) + ")")
        text = "catching " + " and ".join(parts) if parts else "nothing planted"
        return text + (f"; {self.note}" if self.note else "")

    def as_dict(self) -> dict:
        return {"enabled": self.enabled, "active": self.active, "kind": self.kind,
                "sites": [{"address": a, "what": w if isinstance(w, str) else list(w)}
                          for a, w in sorted(self.sites.items())],
                "text": self.describe()}

    # -- at a stop ------------------------------------------------------------------------

    def fired(self, event) -> bool:
        """Whether GDB's stop event names one of these breakpoints."""
        numbers = self.breakpoints
        return any(bp.is_valid() and bp.number in numbers
                   for bp in getattr(event, "breakpoints", None) or [])

    def crash_at(self, rip: int) -> GuestCrashed:
        """The crash a stop at ``rip`` (one of these breakpoints) is; kept as the last."""
        what = self.sites.get(rip)
        try:
            if isinstance(what, str):
                report = self._xen_fatal(what, rip)
                err = GuestCrashed("xen-fatal", faults.crash_summary(report), report)
            else:
                report = self._exception(what[0] if what else None, rip)
                err = GuestCrashed("fault", faults.crash_summary(report), report)
        except (GdbextError, gdb.error) as e:
            # Still a crash: say what is known without the explanation.
            where = (f"Xen's fatal path {what}" if isinstance(what, str) else
                     "exception " + "/".join(faults.VECTORS[v].mnemonic or str(v)
                                             for v in what or ()))
            err = GuestCrashed("xen-fatal" if isinstance(what, str) else "fault",
                               f"the guest crashed: {where} (handler at {rip:#x}); it "
                               f"could not be explained: {one_line(e)}")
        self.last = err
        return err

    def _serial(self) -> Tuple[Optional[str], Optional[str]]:
        """(text, path) of the guest's serial log when gdbext knows it.
        Hook: the serial-log setting of issue 11's other half (``settings.serial_log``)."""
        path = getattr(self.ctx.settings, "serial_log", None)
        if not path or not os.path.isfile(path):
            return None, None
        try:
            with open(path, errors="replace") as f:
                return f.read(), path
        except OSError:
            return None, None

    def _xen_fatal(self, symbol: str, rip: int) -> faults.XenFatalReport:
        ctx = self.ctx
        rsp = ctx.target.read_register("rsp")
        raw = ctx.bytes_at(rsp, 8)
        ret = int.from_bytes(raw, "little") if len(raw) == 8 else None
        xen, _why = ctx.loaded_or_note()
        text, path = self._serial()
        return faults.explain_xen_fatal(symbol, rip, ret, xen, text, path)

    def _exception(self, vector: Optional[int], rip: int) -> faults.FaultReport:
        ctx = self.ctx
        t = ctx.target
        if vector is None:
            raise GdbextError(f"stopped at {rip:#x}, which no IDT gate planned names")
        text = t.monitor("info registers")
        cr2 = parse_info_registers(text).get("cr2")
        regs = t.read_registers(GENERAL)
        ctl = ctx.read_control_registers()
        pctx = ctx.cpu_context(ctl)
        cr3 = ctl["cr3"]
        xen, _why = ctx.loaded_or_note()
        root = pctx.root_from_cr3(cr3)
        journal = ctx.merge.journal
        merged = journal is not None and journal.root is not None and journal.root == root
        with t.phys_mode():
            try:
                frame = faults.read_exception_frame(vector, regs["rsp"], cr3, pctx, t.cache)
            except GdbextError:
                frame = None
            hint = None
            if frame is not None:
                try:
                    code = faults.read_virtual(pctx, t.cache, root, frame.rip, INSN_BYTES)
                    hint = faults.instruction_hint(x86decode.decode_one(code, frame.rip), regs)
                except GdbextError:
                    hint = None    # the fetch itself faulted: no instruction there
            report = faults.explain_fault(
                vector, None, frame, cr2, cr3, regs, pctx, t.cache, xen,
                decoded_instruction=hint,
                root_label=("M, the RFC's merged L4 (written by xen-l4merge-apply)"
                            if merged else None),
                judge_root_as=xenimage.IDLE_L4 if merged else None)
        report.predicted_by = self._static_prediction(report)
        return report

    def _static_prediction(self, report: faults.FaultReport) -> Optional[dict]:
        """Which finding of the position-independence check (xen-pic-check) predicted
        this fault. Hook for issue 12's ``piccheck.predict_fault(syms, cr2, rip,
        load_base)``: None until that is on main, or when nothing predicted it."""
        predict = getattr(piccheck, "predict_fault", None)
        syms = self.ctx.xen.syms
        if predict is None or syms is None or report.fault_address is None:
            return None
        # The code that used the address: a fetch fault's caller, else RIP.
        rip = report.caller.address if report.caller is not None else report.rip
        try:
            found = predict(syms, report.fault_address, rip, self.ctx.xen.load_base)
        except GdbextError:
            return None
        return found.as_dict() if found is not None else None

    def on_stop(self, event) -> None:
        """The user's own 'continue' stopped at one of these breakpoints: say why."""
        if self.driving or not self.fired(event):
            return
        try:
            self.ctx.target.invalidate()
            err = self.crash_at(self.ctx.target.read_register("rip"))
        except (GdbextError, gdb.error) as e:
            gdb.write(f"gdbext: stopped at a fault-catching breakpoint: {one_line(e)}\n")
            return
        session = self.ctx.boot_session
        if session is not None and not session.done:
            session.crashed(err)
        gdb.write(f"gdbext: {err.summary}\n" + "\n".join(report_lines(err)) +
                  "\n('xen-fault' shows this again; 'set xen-catch-faults off' stops "
                  "catching)\n")


def _ranges(numbers: List[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    out: List[str] = []
    for n in numbers:
        if out and out[-1][1] == n - 1:
            out[-1][1] = n
        else:
            out.append([n, n])
    return ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in out)


def report_lines(err: GuestCrashed) -> List[str]:
    report = err.report
    if report is None:
        return []
    lines = report.text()
    return lines if isinstance(lines, list) else str(lines).splitlines()
