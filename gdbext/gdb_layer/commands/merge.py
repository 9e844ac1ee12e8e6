"""xen-l4merge-check and xen-l4merge-apply: the RFC's merged L4, checked and tried out.

The RFC (``rfc-efi-multiboot2-linked-address.txt``) merges the firmware's L4
lower half with ``idle_pg_table``'s upper half at ``__efi64_mb2_start`` and
calls ``efi_multiboot2`` at its linked VA.  The checks, the prediction and the
choice of what to check where are ``core``'s (``l4merge``, ``merge_here``); the
firmware snapshot F and the journal of what ``xen-l4merge-apply`` wrote are the
context's ``merge`` record, forgotten on a new boot.  This module parses,
prints and (``xen-l4merge-apply``, on request only) writes, journalling every
byte range and register first so that ``--undo`` puts them all back.
"""

from __future__ import annotations

import time
from typing import List

import gdb
from tabulate import tabulate

from ...core import bootstops, merge_here, merge_predict, merge_report, paging, x86
from ...core.errors import GdbextError
from ...core.merge_here import CheckRequest, Change, Journal, describe_pa, failed_line, where
from ...core.xenimage import LoadedXen
from ..command import CommandParser, XenCommand, add_json_option, emit, eval_int
from ..merge_live import evaluate, remember_firmware

ENTRY = bootstops.ENTRY                 # "__efi64_mb2_start"
CALL = bootstops.CALL                   # "call efi_multiboot2"
CALL_TARGET = merge_predict.CALL_TARGET       # "efi_multiboot2", the symbol
# Continuing from the entry to the call instruction takes microseconds of guest time;
# this only bounds a guest that went elsewhere.
RUN_TO_CALL_TIMEOUT_S = 60.0
_U64 = (1 << 64) - 1


class L4MergeCheckCommand(XenCommand):
    name = "l4merge-check"
    summary = ("Check the RFC's merged L4 (call efi_multiboot2 at its linked address) "
               "against invariants I0-I13.")
    complete_values = {"--only": "check", "--skip": "check", "--table": "pa-address",
                       "--firmware-root": "pa-address"}

    def make_parser(self) -> CommandParser:
        p = CommandParser(
            description=self.summary + " With no options it does what fits where the guest "
            f"is stopped: at {ENTRY} (before any merge) it predicts the table the RFC "
            "would build, without writing the guest (the firmware's L4 is captured there "
            "for later); when the merged table is in CR3 (efi_l4_bootmap of a patched "
            "build, or the table xen-l4merge-apply wrote) it checks the real table against "
            "the firmware L4 captured before the switch; elsewhere (e.g. Xen's own tables) "
            "it runs the checks that apply there (I9 at and after the trampoline's CR3 "
            "load) and reports the others as SKIP with the reason.",
            epilog="Exit status: when any check FAILs, the report is printed first and then "
                   "the command fails with one line, e.g. 'xen-l4merge-check: 3 checks "
                   "failed: I3, I4, I6', so that 'gdb -batch -x script.gdb' exits non-zero "
                   "(for CI). WARN and SKIP do not fail. "
                   f"Examples: xen-l4merge-check (at {ENTRY}); xen-l4merge-check "
                   "--assume-relocated --only I3,I4,I6; xen-l4merge-check --json")
        p.add_argument("--predict", action="store_true",
                       help="check the predicted merge (firmware L4 lower half + "
                            "idle_pg_table upper half as in memory + the patch's l2 fills) "
                            "even where a real table is in use")
        p.add_argument("--assume-relocated", action="store_true",
                       help="predict the variant the review asked for: B added to the "
                            "upper-half pointers first (implies --predict)")
        p.add_argument("--table", metavar="ADDR",
                       help="PA (or GDB expression) of the merged table to check live, or "
                            "to place the prediction at")
        p.add_argument("--firmware-root", metavar="ADDR",
                       help=f"PA of the firmware's L4 (default: captured at {ENTRY}, or CR3 "
                            "before any switch)")
        p.add_argument("--only", action="append", metavar="IDS",
                       help="run only these checks (comma-separated, e.g. I3,I4,I6)")
        p.add_argument("--skip", action="append", metavar="IDS",
                       help="leave these checks out (comma-separated)")
        add_json_option(p)
        return p

    def run(self, args, from_tty):
        table = eval_int(args.table, "table") if args.table else None
        fw = eval_int(args.firmware_root, "firmware root") if args.firmware_root else None
        if table is not None and table & x86.CR3_FLAGS_MASK:
            raise GdbextError(f"xen-l4merge-check: --table {table:#x} is not 4 KiB aligned: "
                              "give the table's physical address")
        req = CheckRequest(predict=args.predict, assume_relocated=args.assume_relocated,
                           only=tuple(args.only) if args.only else None,
                           skip=tuple(args.skip) if args.skip else None,
                           table=table, firmware_root=fw)
        ev = evaluate(self.ctx, req)
        result, results, ctx = ev.result, ev.results, ev.header
        if args.json:
            self.write_json(result)
        else:
            head = [f"xen-l4merge-check: {ctx['mode']} at {ctx['stop']}, "
                    f"B = {ctx['load_base']:#x}"]
            if ctx["firmware_root"] is not None:
                head.append(f"firmware L4 F = {ctx['firmware_root']:#x} "
                            f"({ctx['firmware_source']})")
            if ctx["table"] is not None:
                head.append(f"merged L4 M = {ctx['table']:#x} ({ctx['table_source']})")
            emit("; ".join(head) + "\n" + merge_report.render_text(results), from_tty)
        line = failed_line(result)
        if line:
            raise GdbextError(line)


# --- the what-if: apply the merge to the stopped guest ------------------------------------

def _write_checked(ctx, pa: int, data: bytes) -> None:
    t = ctx.target
    t.write_phys(pa, data)
    back = t.read_phys(pa, len(data))
    if back != data:
        raise GdbextError(f"wrote {len(data)} bytes at PA {pa:#x} but they read back different")


def _restore(ctx, ch: Change) -> None:
    if ch.kind == "memory":
        _write_checked(ctx, int(ch.where), bytes(ch.old))  # type: ignore[arg-type]
    else:
        ctx.set_register(str(ch.where), int(ch.old))  # type: ignore[arg-type]


def _rollback(ctx, changes: List[Change]) -> List[Change]:
    """Restore ``changes`` newest first; returns what was restored."""
    done = []
    for ch in reversed(changes):
        _restore(ctx, ch)
        done.append(ch)
    return done


def _rollback_after_error(ctx, changes: List[Change]) -> None:
    """Best effort while another error is on its way to the user: restore what can be."""
    for ch in reversed(changes):
        try:
            _restore(ctx, ch)
        except (GdbextError, gdb.error):
            gdb.write(f"gdbext: could not restore {ch.what} "
                      f"({ch.where if isinstance(ch.where, str) else hex(ch.where)})\n",
                      gdb.STDERR)


def _record_write(ctx, journal: Journal, pa: int, data: bytes, what: str) -> Change:
    old = ctx.target.read_phys(pa, len(data))
    ch = Change("memory", pa, old, data, what)
    journal.changes.append(ch)
    _write_checked(ctx, pa, data)
    return ch


def _record_register(ctx, journal: Journal, name: str, value: int, what: str) -> Change:
    old = ctx.target.read_register(name)
    ch = Change("register", name, old, value, what)
    journal.changes.append(ch)
    ctx.set_register(name, value)
    return ch


def apply_merge(ctx, relocate: bool = False) -> dict:
    """Write the predicted merge into the guest and switch CR3 to it (at the entry only)."""
    lx = ctx.require_loaded()
    syms = lx.syms
    t = ctx.target
    entry_pa = lx.pa(ENTRY)
    rip = t.read_register("rip")
    ctx.forget_merge_if_new_boot(rip)
    journal = ctx.merge.journal
    if journal is not None and journal.root is not None:
        raise GdbextError(
            f"xen-l4merge-apply: already applied (M at {journal.root:#x}, "
            f"{'relocated' if journal.relocated else 'raw, as the RFC'}); run "
            "'xen-l4merge-apply --undo' first")
    if rip != entry_pa:
        raise GdbextError(
            f"xen-l4merge-apply: the guest is at {rip:#x} ({where(lx, rip)}), not at "
            f"{ENTRY} ({entry_pa:#x}): the merge is applied only where the firmware's "
            f"tables are still in CR3 and Xen has run nothing; boot again to {ENTRY} "
            f"('xen-run-to {ENTRY}')")
    remember_firmware(ctx)
    snap = ctx.merge.snapshot_for(lx.load_base)
    assert snap is not None
    with t.phys_mode():
        prediction = merge_predict.predict_merge(syms, t.cache, lx.load_base, snap.root,
                                           relocate=relocate)
    journal = Journal(lx.load_base, relocated=relocate, table_source=prediction.table_source)
    ctx.merge.journal = journal
    fills = merge_predict.fill_slots(lx)
    try:
        for pa in sorted(prediction.writes):
            data = prediction.writes[pa]
            if pa == prediction.root:
                what = ("merged L4 M: firmware L4[0..255] + idle_pg_table[256..511]"
                        + (" + B" if relocate else " (raw, as the RFC)")
                        + f", in {describe_pa(lx, pa, len(data))}")
            else:
                what = f"{describe_pa(lx, pa, len(data))}: {merge_here.why_written(lx, fills, pa)}"
            _record_write(ctx, journal, pa, data, what)
        _record_register(ctx, journal, "cr3", prediction.root, "CR3 switched to M (mov %rax,%cr3)")
    except BaseException:
        _rollback_after_error(ctx, journal.changes)
        ctx.merge.journal = None
        raise
    journal.root = prediction.root
    return {"action": "apply", "relocated": relocate, "root": prediction.root,
            "table_source": prediction.table_source, "firmware_root": snap.root,
            "load_base": lx.load_base, "changes": [c.as_dict() for c in journal.changes]}


def _call_pa(lx: LoadedXen) -> int:
    stop = bootstops.plan_for(lx.syms).get(CALL)
    if stop is None:
        raise GdbextError(f"xen-l4merge-apply: no call of {CALL_TARGET} found in {ENTRY} of "
                          f"this build: nothing to redirect")
    address = stop.address(lx.load_base)
    assert address is not None
    return address


def _run_to(ctx, pa: int, what: str) -> int:
    """Continue until RIP == pa (one internal breakpoint); returns RIP."""
    bp = ctx.quiet_breakpoint(pa)
    try:
        return ctx.continue_until(time.monotonic() + RUN_TO_CALL_TIMEOUT_S, what, [bp])
    except GdbextError as err:
        raise GdbextError(f"xen-l4merge-apply: {err}; it is stopped now, --undo restores "
                          "what was written") from None
    finally:
        try:
            bp.delete()
        except RuntimeError:
            pass


def call_linked(ctx) -> dict:
    """Run to ``call efi_multiboot2`` and make the call at the linked VA, as the RFC's
    ``call *%rax`` does: push the return address (the next instruction, at the load
    address), set %rax and RIP to efi_multiboot2's linked VA.  Needs the merge applied."""
    lx = ctx.require_loaded()
    syms = lx.syms
    t = ctx.target
    plan = bootstops.plan_for(syms)
    if plan.patched:
        raise GdbextError("xen-l4merge-apply: this build makes the call at the linked VA "
                          "itself (call *%rax): just step it (stepi)")
    journal = ctx.merge.journal
    if journal is None or journal.root is None:
        raise GdbextError(
            "xen-l4merge-apply: the linked VA is mapped only by the merged table: apply it "
            "first ('xen-l4merge-apply [--relocate] --call-linked' does both)")
    if journal.called_linked:
        raise GdbextError("xen-l4merge-apply: the call at the linked VA was already made; "
                          "'xen-l4merge-apply --undo' restores the state before it")
    call_pa = _call_pa(lx)
    entry_pa = lx.pa(ENTRY)
    rip = t.read_register("rip")
    ran = False
    if rip == entry_pa:
        rip = _run_to(ctx, call_pa, f"'{CALL}' at {call_pa:#x}")
        ran = True
    if rip != call_pa:
        raise GdbextError(
            f"xen-l4merge-apply: the guest is at {rip:#x} ({where(lx, rip)}), not at "
            f"'{CALL}' ({call_pa:#x}) or {ENTRY}: cannot make the call from here")
    linked = syms.linked_va(CALL_TARGET)
    call_va = syms.va_from_offset(call_pa - lx.load_base)
    call_len = 5  # e8 rel32
    with t.phys_mode():
        code = t.read_phys(call_pa, call_len)
        regs = t.read_registers(("cr0", "cr3", "cr4", "efer", "rsp"))
        pctx = ctx.cpu_context(regs)
        new_rsp = (regs["rsp"] - 8) & _U64
        w = paging.walk(pctx, t.cache, pctx.root_from_cr3(regs["cr3"]), new_rsp)
        # Where the first instruction fetch will go (the raw RFC table does not get there).
        fetch = paging.walk(pctx, t.cache, pctx.root_from_cr3(regs["cr3"]), linked)
    target_pa = lx.pa(CALL_TARGET)
    reachable = merge_here.call_target_reach(fetch, target_pa)
    if code != syms.read_linked(call_va, call_len):
        raise GdbextError(f"xen-l4merge-apply: the bytes at {call_pa:#x} are not the ELF's "
                          f"call of {CALL_TARGET}: is this the build of xen-syms?")
    if not w.mapped or not w.writable:
        raise GdbextError(f"xen-l4merge-apply: the stack slot {new_rsp:#x} is "
                          f"{'read-only' if w.mapped else 'not mapped (' + str(w.fault) + ')'} "
                          "under the current CR3: cannot push the return address")
    return_address = call_pa + call_len
    first = len(journal.changes)
    try:
        _record_write(ctx, journal, w.pa, return_address.to_bytes(8, "little"),
                      f"return address {return_address:#x} pushed at RSP-8 = {new_rsp:#x} "
                      "(the call's push)")
        _record_register(ctx, journal, "rsp", new_rsp, "RSP - 8 (the call's push)")
        _record_register(ctx, journal, "rax", linked,
                         f"%rax = linked VA of {CALL_TARGET} (the RFC computes it there)")
        _record_register(ctx, journal, "rip", linked,
                         f"RIP = linked VA of {CALL_TARGET} (call *%rax)")
    except BaseException:
        _rollback_after_error(ctx, journal.changes[first:])
        del journal.changes[first:]
        raise
    journal.called_linked = True
    return {"action": "call-linked", "ran_to_call": ran, "call": call_pa,
            "return_address": return_address, "target": linked, "target_pa": target_pa,
            "reachable": reachable, "fetch_pa": fetch.pa if fetch.mapped else None,
            "fetch_fault": None if fetch.mapped else f"L{fetch.fault_level}: {fetch.fault}",
            "changes": [c.as_dict() for c in journal.changes[first:]]}


def undo(ctx) -> dict:
    """Restore every byte and register xen-l4merge-apply changed, newest first."""
    journal = ctx.merge.journal
    if journal is None or not journal.changes:
        raise GdbextError("xen-l4merge-apply --undo: nothing to undo: xen-l4merge-apply has "
                          "changed nothing in this boot")
    done = _rollback(ctx, journal.changes)
    ctx.merge.journal = None
    return {"action": "undo",
            "restored": [dict(c.as_dict(), **({"value": c.old} if c.kind == "register" else {}))
                         for c in done]}


def _changes_text(changes: List[dict], verb: str, restored: bool = False) -> str:
    rows = []
    for c in changes:
        if c["kind"] == "memory":
            rows.append([f"{c['pa']:#x}", f"{c['length']} bytes", c["what"]])
        elif restored:
            rows.append([f"${c['name']}", f"= {c['value']:#x}", c["what"]])
        else:
            rows.append([f"${c['name']}", f"= {c['new']:#x} (was {c['old']:#x})", c["what"]])
    head = ["where", "restored" if restored else "written", "what it is"]
    return f"{verb}:\n" + tabulate(rows, headers=head, tablefmt="plain")


class L4MergeApplyCommand(XenCommand):
    name = "l4merge-apply"
    summary = ("Reproduce the RFC's merge in the stopped guest (writes memory and CR3), "
               "or undo it.")

    def make_parser(self) -> CommandParser:
        p = CommandParser(
            description=self.summary + f" Only at {ENTRY}: writes the merged L4 M (the "
            "firmware L4's lower half + idle_pg_table's upper half) into the page the "
            "prediction names, fills l2_xenmap, l2_bootmap and l2_directmap with 2 MiB "
            "pages as the patch does, switches CR3 to M, and prints every range and "
            "register it wrote. Every byte and register is saved first; --undo puts them "
            "all back (also after --call-linked). Nothing is written unless this command "
            "is run.",
            epilog="--call-linked steps the call at the linked address on a build without "
                   f"the patch: it runs to '{CALL}' (the e8 call found by decoding {ENTRY}), "
                   "then makes the call the way the RFC's 'call *%rax' does: pushes the "
                   "return address (the next instruction, at the load address), sets %rax "
                   f"and RIP to {CALL_TARGET}'s linked VA. The guest stops there, at the "
                   "first instruction of efi_multiboot2 through M (stepi to execute it). "
                   "Without a prior apply it applies first. --undo restores the registers "
                   "this command set to their values before it set them (after --call-linked, "
                   f"RIP returns to '{CALL}': the guest itself ran from the entry to there) "
                   "and the bytes it wrote; what the guest did since is kept. A new boot "
                   f"(a stop at {ENTRY} again) forgets the record: the image is loaded anew. "
                   "Examples: xen-l4merge-apply --relocate --call-linked; "
                   "xen-l4merge-apply --undo")
        p.add_argument("--relocate", action="store_true",
                       help="write the variant the review asked for (B added to the "
                            "upper-half pointers) instead of the RFC's raw copy")
        p.add_argument("--call-linked", action="store_true",
                       help=f"then run to '{CALL}' and make it at the linked VA "
                            "(builds without the patch)")
        p.add_argument("--undo", action="store_true",
                       help="restore every byte and register this command changed")
        add_json_option(p)
        return p

    def run(self, args, from_tty):
        if args.undo and (args.relocate or args.call_linked):
            raise GdbextError("xen-l4merge-apply: --undo takes no other option")
        if args.undo:
            result = undo(self.ctx)
            parts = [_changes_text(result["restored"], "restored (newest first)", restored=True)]
        else:
            result = {"action": "apply", "steps": []}
            journal = self.ctx.merge.journal
            if not (args.call_linked and journal is not None and journal.root is not None):
                result["steps"].append(apply_merge(self.ctx, args.relocate))
            elif args.relocate and not journal.relocated:
                raise GdbextError("xen-l4merge-apply: the merge already applied is the RFC's "
                                  "raw copy; --undo first to apply --relocate")
            if args.call_linked:
                result["steps"].append(call_linked(self.ctx))
            parts = []
            for step in result["steps"]:
                if step["action"] == "apply":
                    parts.append(_changes_text(step["changes"], "wrote"))
                    parts.append(f"merged L4 M at {step['root']:#x} "
                                 f"({'relocated' if step['relocated'] else 'raw, as the RFC'}); "
                                 f"firmware L4 F at {step['firmware_root']:#x}; "
                                 "'xen-l4merge-check' checks it, '--undo' restores")
                else:
                    ran = (f"ran to '{CALL}' at {step['call']:#x}; " if step["ran_to_call"]
                           else "")
                    parts.append(_changes_text(step["changes"], f"{ran}called at the linked VA"))
                    parts.append(f"now at {CALL_TARGET}'s linked VA {step['target']:#x}; it "
                                 f"returns to {step['return_address']:#x}")
                    if not step["reachable"]:
                        where = (f"reaches PA {step['fetch_pa']:#x}" if step["fetch_pa"]
                                 is not None else f"faults ({step['fetch_fault']})")
                        parts.append(f"warning: under this CR3 the linked VA {where}, not "
                                     f"{CALL_TARGET} at {step['target_pa']:#x}: the next "
                                     "instruction fetch goes wrong (see xen-l4merge-check "
                                     "I6); --undo restores")
        if args.json:
            self.write_json(result)
        else:
            emit("\n".join(parts), from_tty)


def install(ctx) -> None:
    L4MergeCheckCommand(ctx)
    L4MergeApplyCommand(ctx)
