"""xen-walkthrough: a guided tour of Xen's early boot paging, stop by stop.

For someone who knows C but not x86 paging. It runs the ``__efi64_mb2_start``
session of ``xen-mb2-break`` (``boot_session.BootSession``: the same plan and
breakpoints) and at each stop prints a short lesson (``core.walkthrough``),
the one walk that matters with every table named, what changed since the last
stop and the checks made there; at the entry it compares the RFC's predicted
merge with the relocated one. It writes an SVG of the tree per stop with
``xen-diagram``'s ``write_diagram`` (``--svg-dir``) and waits for Enter between
stops (``--no-wait`` runs straight through). Nothing is written to the guest.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import gdb

from ...core import bootstops as bs
from ...core import merge_catalog, paging, x86
from ...core import walkthrough as wt
from ...core.errors import GdbextError, GuestCrashed
from ...core.mb2session import SessionOptions
from ...core.merge_here import CheckRequest
from ...core.walknames import judge_step, verdict_text
from ...core.xenimage import LoadedXen
from ..boot_session import BootSession
from ..command import CommandParser, XenCommand, add_json_option
from ..command import emit as write   # the walkthrough's own 'emit' is a local
from ..drawing import write_diagram
from ..fault_catch import report_lines
from ..merge_live import check_here
from ..run_to import run_to


def _session_options(timeout: float) -> SessionOptions:
    """Every stop, the live checks of each stop, no prediction (the entry's comparison
    is ours)."""
    return SessionOptions(keep_going=True, timeout=timeout)


# -- the walks -----------------------------------------------------------------------------


def _four_level(regs: Dict[str, int], maxphyaddr: int) -> paging.PagingContext:
    """The context the CPU uses once long mode is on (for tables read while paging is off)."""
    return paging.PagingContext(paging.MODES["4-level"], nxe=True,
                                wp=bool(regs.get("cr0", 0) & x86.CR0_WP), maxphyaddr=maxphyaddr)


def _cpu_context(gctx, regs: Dict[str, int]) -> Optional[paging.PagingContext]:
    ctx = gctx.cpu_context(regs)
    return None if ctx.mode is paging.MODE_OFF else ctx


def stop_walk(gctx, xen: LoadedXen, plan, lesson: wt.Lesson, regs: Dict[str, int]):
    """(the lesson's walk at this stop, None), or (None, why there is no walk);
    ``gctx``: the context."""
    syms = xen.syms
    linked = syms.linked_va(wt.CALL_TARGET)
    ctx = _cpu_context(gctx, regs)
    maxphyaddr = gctx.settings.maxphyaddr
    cr3_root = regs["cr3"] & x86.phys_addr_mask(maxphyaddr) & ~0xFFF
    if lesson.walk == wt.WALK_TARGET_IDLE:
        root, va, ctx = xen.pa("idle_pg_table"), linked, _four_level(regs, maxphyaddr)
    elif lesson.walk == wt.WALK_TARGET_CR3:
        root, va, ctx = cr3_root, linked, ctx or _four_level(regs, maxphyaddr)
    elif lesson.walk == wt.WALK_CALL:
        if ctx is None:
            return None, "paging is off"
        va = linked if plan.patched else xen.pa(wt.CALL_TARGET)
        root = ctx.root_from_cr3(regs["cr3"])
    else:
        if ctx is None:
            return None, "paging is off: RIP is a physical address"
        root, va = ctx.root_from_cr3(regs["cr3"]), regs["rip"]
    w = paging.walk(ctx, gctx.target.cache, root, va)
    return w, None


def _changes_text(changes: Dict[str, object]) -> List[str]:
    out = []
    if changes.get("cr3_old") is None:
        return out
    if changes.get("cr3_changed"):
        out.append(f"CR3 changed: {changes['cr3_old']:#x} -> {changes['cr3_new']:#x}")
    slots = changes.get("l4_changed") or []
    if slots:
        shown = ", ".join(str(s) for s in slots[:12]) + (" ..." if len(slots) > 12 else "")
        out.append(f"L4 slots that differ from the last stop's L4: {shown}")
    per = changes.get("boot_changed") or {}
    if per:
        out.append("Xen's boot tables changed in memory: "
                   + ", ".join(f"{name} {n} entr{'y' if n == 1 else 'ies'}"
                               for name, n in per.items()))
    if not out:
        out.append("nothing changed in CR3 or the tables since the last stop")
    return out


def _checks_text(checks: List[dict], mode: Optional[str]) -> Optional[str]:
    if not checks:
        return None
    how = f" (xen-l4merge-check, {mode} mode)" if mode else ""
    return f"checks here{how}: " + ", ".join(f"{c['id']} {c['status']}" for c in checks)


def _entry_note(xen: LoadedXen, merged_root: Optional[int] = None):
    """xen-va2pa's word on a pointer read from one of Xen's boot tables; in a predicted
    merged L4 (which borrows another table's page), on its upper half as copied from
    idle_pg_table."""
    def note(step) -> Optional[str]:
        if merged_root is not None and step.table_pa == merged_root:
            v = wt.merged_entry_verdict(xen, merged_root, step)
        else:
            v = judge_step(xen, step)
        return verdict_text(v) if v is not None else None
    return note


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]+", "-", name).strip("-")


# -- the entry's comparison -------------------------------------------------------------------


def entry_comparison(gctx, xen: LoadedXen, regs: Dict[str, int]) -> dict:
    """The RFC's raw merge vs the relocated one, predicted from the firmware's L4."""
    ctx = _cpu_context(gctx, regs)
    linked = xen.syms.linked_va(wt.CALL_TARGET)
    walks = []
    for relocate, label in ((False, wt.RAW_LABEL), (True, wt.RELOCATED_LABEL)):
        pred = gctx.predicted_merge(relocate)
        walks.append(wt.merge_walk(xen, ctx, pred.mem, pred.root, linked,
                                   f"{label}, in {pred.table_source}"))
    verdicts = {}
    try:
        for relocate in (False, True):
            res = check_here(gctx, CheckRequest(stop=bs.ENTRY, predict=True,
                                                assume_relocated=relocate,
                                                only=tuple(merge_catalog.CALL_CHECKS)))
            verdicts["relocated" if relocate else "raw"] = [
                {"id": c["id"], "status": c["status"], "summary": c["summary"]}
                for c in res.get("checks") or []]
    except GdbextError as err:
        verdicts["error"] = str(err)
    return {"linked_va": linked, "raw": walks[0], "relocated": walks[1], "verdicts": verdicts}


def comparison_text(xen: LoadedXen, comp: dict) -> str:
    raw, rel = comp["raw"], comp["relocated"]
    parts = ["-- The RFC's merged L4, predicted: raw copy vs relocated copy",
             wt.wrap(wt.COMPARISON_TEXT.format(slot=raw.slot)), "",
             f"efi_multiboot2's linked address {comp['linked_va']:#x} through {raw.label}:",
             wt.walk_text(xen, raw.walk, {raw.root: raw.label}, _entry_note(xen, raw.root)), "",
             f"The same address through {rel.label}:",
             wt.walk_text(xen, rel.walk, {rel.root: rel.label}, _entry_note(xen, rel.root)), "",
             wt.comparison_table(xen, raw, rel)]
    verdicts = comp["verdicts"]
    for key, title in (("raw", "xen-l4merge-check --predict"),
                       ("relocated", "xen-l4merge-check --predict --assume-relocated")):
        if key in verdicts:
            failed = [c for c in verdicts[key] if c["status"] == "FAIL"]
            line = f"{title} (the call's checks): " + ", ".join(
                f"{c['id']} {c['status']}" for c in verdicts[key])
            parts.append("")
            parts.append(line)
            for c in failed:
                parts.append(f"  {c['id']} FAIL: {c['summary']}")
    return "\n".join(parts)


def comparison_dict(xen: LoadedXen, comp: dict) -> dict:
    linked = comp["linked_va"]
    title = f"efi_multiboot2 {linked:#x}"
    return {"linked_va": linked,
            "raw": comp["raw"].as_dict(xen, title, _entry_note(xen, comp["raw"].root)),
            "relocated": comp["relocated"].as_dict(xen, title,
                                                   _entry_note(xen, comp["relocated"].root)),
            "verdicts": comp["verdicts"]}


# -- diagrams ----------------------------------------------------------------------------------


def _write_svg(gctx, svg_dir: Path, number: int, stop: str, xen: LoadedXen,
               regs: Dict[str, int]) -> Optional[str]:
    path = svg_dir / f"{number:02d}-{_slug(stop)}.svg"
    paging_on = bool(regs["cr0"] & x86.CR0_PG)
    title = f"{stop}: {wt.lesson(stop).title}"
    kwargs = {"title": title}
    if stop == bs.ENTRY:
        kwargs["compare"] = True          # firmware, raw merge, relocated merge
    elif stop in (bs.TRAMPOLINE_SETUP, bs.TABLES_RELOCATED, bs.L2_XENMAP_FILLED):
        kwargs.update(root=f"{xen.pa('idle_pg_table'):#x}", mode="4-level")
    elif not paging_on:
        kwargs["mode"] = "4-level"        # CR3 is loaded, paging not yet on
    write_diagram(gctx, svg=str(path), **kwargs)
    return str(path)


# -- the command -------------------------------------------------------------------------------


def _wait(no_wait: bool, from_tty: bool) -> bool:
    """Wait for Enter; False if the user wants to stop here."""
    if no_wait or not from_tty or not sys.stdin.isatty():
        return True
    try:
        answer = input(wt.PROMPT)
    except EOFError:
        return True
    return answer.strip().lower() not in ("q", "quit")


class WalkthroughCommand(XenCommand):
    name = "walkthrough"
    summary = ("A guided tour of Xen's boot paging around __efi64_mb2_start: at each stop, "
               "what the CPU is doing, what the tables hold, and the walk that matters.")

    def make_parser(self) -> CommandParser:
        p = CommandParser(
            description=self.summary + " For C programmers new to x86 paging. Runs the "
            "xen-mb2-break session (from reset or wherever the guest is, before "
            "__efi64_mb2_start) and stops at: " + ", ".join(bs.STOP_ORDER) + " (those this "
            "build has). Nothing is written to the guest, except by --crash's last stop "
            "(undone after it). Needs 'xen-syms' first.",
            epilog="Examples: xen-walkthrough;  xen-walkthrough --no-wait --svg-dir /tmp/wt;  "
                   "xen-walkthrough --only-crash")
        p.add_argument("--no-wait", action="store_true",
                       help="run straight through instead of waiting for Enter at each stop")
        p.add_argument("--svg-dir", type=Path, metavar="DIR",
                       help="write a diagram of the tables at each stop as DIR/NN-STOP.svg")
        p.add_argument("--crash", action="store_true",
                       help="end with the RFC's crash, live: boot again to the entry, apply "
                            "the raw merge and call efi_multiboot2 at its linked VA "
                            "(xen-l4merge-apply --call-linked), catch and explain the #PF, "
                            "then undo it (this stop writes the guest)")
        p.add_argument("--only-crash", action="store_true",
                       help="that last stop alone, without the tour")
        p.add_argument("--timeout", type=float, default=120.0, metavar="S",
                       help="the longest each wait for the next stop may take (default 120)")
        add_json_option(p)
        return p

    def run(self, args, from_tty):
        # The walkthrough pauses after each stop itself; GDB's pager pausing in the
        # middle of a stop as well would be one prompt too many. Restored after.
        paging = gdb.parameter("pagination")
        gdb.execute("set pagination off", to_string=True)
        try:
            self._run(args, from_tty)
        finally:
            gdb.execute(f"set pagination {'on' if paging else 'off'}", to_string=True)

    def _run(self, args, from_tty):
        if args.timeout <= 0:
            raise GdbextError(f"xen-walkthrough: --timeout {args.timeout:g}: give seconds > 0")
        syms = self.ctx.require_syms()
        if args.svg_dir is not None:
            try:
                args.svg_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise GdbextError(f"xen-walkthrough: cannot create --svg-dir {args.svg_dir}: "
                                  f"{e.strerror or e}") from None
        emit = (lambda text: None) if args.json else (lambda text: (write(text, from_tty),
                                                                     gdb.flush()))
        if args.only_crash:
            out = {"stops": [], "complete": True, "error": None}
            try:
                out["crash_stop"] = self._crash_stop(args, emit, 1, 1)
            except GdbextError as err:
                out["error"] = str(err)
                if not args.json:
                    raise
            if args.json:
                self.write_json(out)
                if out["error"]:
                    raise GdbextError(f"xen-walkthrough: {out['error']}")
            return
        running = self.ctx.boot_session
        if running is not None and not running.done:
            # Say it before anything runs: the tour starts from the entry on its own.
            if not args.json:
                write("xen-walkthrough: ending the xen-mb2-break session in progress (its "
                      "breakpoints are removed); the tour starts at __efi64_mb2_start",
                      from_tty)
            running.finish()
        session = BootSession(self.ctx, syms, _session_options(args.timeout),
                              who="xen-walkthrough")
        total = len(session.selected) + (1 if args.crash else 0)
        out: Dict[str, object] = {"load_base": None, "patched": session.plan.patched,
                                  "stops": [], "complete": False, "error": None,
                                  "notes": list(session.plan.notes)}
        if not args.json:
            emit(f"xen-walkthrough: {total} stops on this build: "
                 + ", ".join(s.name for s in session.selected)
                 + (f", then {wt.CRASH_STOP}" if args.crash else ""))
            for note in session.plan.notes:
                emit(f"  note: {note}")
        try:
            record = session.start(args.timeout, announce=not args.json)
            # Xen-specific lessons only for the Xen these symbols describe (build-id).
            self.ctx.require_loaded()
            out["load_base"] = session.load_base
            number = 1
            while True:
                stop_out = self._teach(session, record, number, total, args, emit)
                out["stops"].append(stop_out)
                if record["stop"] == session.selected[-1].name:
                    out["complete"] = True
                    if args.crash:
                        session.finish()
                        if not _wait(args.no_wait or args.json, from_tty):
                            emit("xen-walkthrough: ended here; the guest stays stopped")
                            break
                        out["crash_stop"] = self._crash_stop(args, emit, number + 1, total)
                    break
                if not _wait(args.no_wait or args.json, from_tty):
                    emit("xen-walkthrough: ended here; the guest stays stopped")
                    break
                record = session.next_stop(args.timeout)
                number += 1
        except GdbextError as err:
            out["error"] = str(err)
            if not args.json:
                raise
        finally:
            session.finish()
        if args.json:
            self.write_json(out)
            if out["error"]:
                raise GdbextError(f"xen-walkthrough: {out['error']}")
        elif out["complete"] and "crash_stop" in out:
            emit(f"xen-walkthrough: done, {len(out['stops']) + 1} stops; the guest is stopped "
                 "where the call at the linked VA was made, everything written undone")
        elif out["complete"]:
            emit(f"xen-walkthrough: done, {len(out['stops'])} stops; Xen is stopped at "
                 f"{session.selected[-1].name}")

    def _teach(self, session, record: dict, number: int, total: int, args, emit) -> dict:
        xen: LoadedXen = session.xen
        stop = record["stop"]
        lesson = wt.lesson(stop)
        regs = dict(record.get("registers") or {})
        for name in ("cr0", "cr3", "cr4", "efer", "rip"):
            if name not in regs:
                regs[name] = self.ctx.target.read_register(name)
        item: Dict[str, object] = {"stop": stop, "title": lesson.title, "rip": record["rip"],
                                   "cr3": regs["cr3"], "paging": bool(regs["cr0"] & x86.CR0_PG),
                                   "where": record.get("where"), "lesson": lesson.text,
                                   "walk": None, "changes": record.get("changes"),
                                   "checks": [{"id": c["id"], "status": c["status"],
                                               "summary": c["summary"]}
                                              for c in record.get("checks") or []],
                                   "svg": None}
        emit("")
        emit(wt.stop_header(number, total, stop, record["rip"], regs["cr3"], regs["cr0"],
                            record.get("symbol") or record.get("where")))
        if stop == bs.ENTRY:
            emit(wt.load_base_line(xen))
        emit(wt.wrap(lesson.text))
        with self.ctx.target.phys_mode():
            w, why = stop_walk(self.ctx, xen, session.plan, lesson, regs)
            emit("")
            emit(f"-- {lesson.walk_title}")
            if w is None:
                emit(f"(no walk: {why})")
            else:
                emit(wt.walk_text(xen, w, entry_note=_entry_note(xen)))
                item["walk"] = wt.walk_record(xen, w, lesson.walk_title,
                                              entry_note=_entry_note(xen))
            if stop == bs.ENTRY:
                comp = entry_comparison(self.ctx, xen, regs)
                emit("")
                emit(comparison_text(xen, comp))
                item["comparison"] = comparison_dict(xen, comp)
        changes = _changes_text(record.get("changes") or {})
        checks = _checks_text(record.get("checks") or [], record.get("mode"))
        if changes or checks or record.get("error"):
            emit("")
        for line in changes:
            emit(line)
        if checks:
            emit(checks)
        if record.get("error"):
            emit(f"checks not made here: {record['error']}")
            item["checks_error"] = record["error"]
        if args.svg_dir is not None:
            item["svg"] = _write_svg(self.ctx, args.svg_dir, number, stop, xen, regs)
            if item["svg"]:
                emit(f"diagram: {item['svg']}")
        return item


    def _merge_command(self, command: str, json_wanted: bool, emit):
        """Run one xen-l4merge-apply (a GDB command: command modules do not import each
        other); its text is shown as typed at the prompt, its JSON returned."""
        try:
            if json_wanted:
                text = gdb.execute(f"{command} --json", to_string=True)
                for line in reversed(text.splitlines()):
                    if line.strip().startswith("{"):
                        return json.loads(line)
                return None
            text = gdb.execute(command, to_string=True)
        except gdb.error as err:
            raise GdbextError(f"xen-walkthrough: {command} failed: {err}") from None
        emit(f"(gdb) {command}")
        emit(text.rstrip("\n"))
        return None

    def _crash_stop(self, args, emit, number: int, total: int) -> dict:
        """Boot again to the entry, make the RFC's call with the raw merge, let the guest
        run into its crash (caught by the fault catcher: GuestCrashed from
        continue_until), explain it, undo what was written."""
        ctx = self.ctx
        lesson = wt.CRASH_LESSON
        item: Dict[str, object] = {"stop": wt.CRASH_STOP, "title": lesson.title,
                                   "lesson": lesson.text, "apply": None, "crash": None,
                                   "undo": None}
        emit("")
        emit(f"== Stop {number}/{total}: {wt.CRASH_STOP} - {lesson.title}")
        emit(wt.wrap(lesson.text))
        emit("")
        run_to(ctx, bs.ENTRY, args.timeout, who="xen-walkthrough", announce=not args.json)
        xen = ctx.require_loaded()
        item["load_base"] = xen.load_base
        emit(wt.load_base_line(xen))
        item["apply"] = self._merge_command("xen-l4merge-apply --call-linked", args.json, emit)
        emit("(gdb) continue")
        crash = None
        try:
            ctx.continue_until(time.monotonic() + args.timeout,
                               f"{wt.CALL_TARGET} at its linked VA", [])
        except GuestCrashed as err:
            crash = err
        except GdbextError as err:
            item["error"] = str(err)
            emit(f"no crash was caught: {err}")
        if crash is not None:
            item["crash"] = crash.as_dict()
            emit(f"gdbext: {crash.summary}")
            for line in report_lines(crash):
                emit(line)
            emit("")
            emit(wt.wrap(wt.CRASH_AFTER))
        emit("")
        item["undo"] = self._merge_command("xen-l4merge-apply --undo", args.json, emit)
        frame = getattr(getattr(crash, "report", None), "frame", None)
        if frame is not None:
            # Entering the handler through an interrupt gate cleared IF: RFLAGS as the
            # CPU pushed it, the value at the call.
            ctx.set_register("eflags", frame.rflags)
            item["rflags_restored"] = frame.rflags
        return item


def install(ctx) -> None:
    WalkthroughCommand(ctx)
