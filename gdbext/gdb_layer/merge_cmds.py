"""xen-l4merge-check and xen-l4merge-apply: the RFC's merged L4, checked and tried out.

The RFC (``rfc-efi-multiboot2-linked-address.txt``) merges the firmware's L4
lower half with ``idle_pg_table``'s upper half at ``__efi64_mb2_start`` and
calls ``efi_multiboot2`` at its linked VA.  The prediction is
``core.merge_predict``'s and the checks ``core.merge_checks``'; this module only
gathers their inputs from the stopped guest, prints, and (``xen-l4merge-apply``,
on request only) writes.

Module state, one per GDB session, forgotten on a new boot (a stop at the
entry again, or the connection going away):

* the firmware snapshot F (``remember_firmware()``): CR3 as is, CR0/CR4/EFER,
  the 4096 bytes of the firmware L4, RIP/RSP/RBX, taken at ``__efi64_mb2_start``
  before anything replaces CR3;
* the journal of ``xen-l4merge-apply``: every byte range and register it
  changed, with the value before, so that ``--undo`` puts them all back.

Python API (for xen-mb2-break and batch runs): ``check_here()``,
``remember_firmware()``, ``firmware_snapshot()``, ``apply_merge()``,
``call_linked()``, ``undo()``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import gdb
from tabulate import tabulate

from ..core import (bootstops, merge_catalog, merge_checks, merge_predict, merge_report,
                    multiboot2, paging, render, x86)
from ..core.errors import GdbextError
from ..core.memory import SyntheticMemory
from ..core.xenimage import LoadedXen
from . import xen_cmds
from .backend import target
from .command import CommandParser, XenCommand, add_json_option, eval_int, use_color
from .paging_cmds import cpu_context, maxphyaddr

ENTRY = bootstops.ENTRY                 # "__efi64_mb2_start"
CALL = bootstops.CALL                   # "call efi_multiboot2"
CALL_TARGET = merge_predict.CALL_TARGET       # "efi_multiboot2", the symbol
MERGE_TABLE_SYMBOL = merge_predict.PATCH_TABLE  # the RFC's merged table (patched builds only)
SNAPSHOT_REGISTERS = ("cr0", "cr3", "cr4", "efer", "rip", "rsp", "rbx")
CHECK_REGISTERS = ("cr0", "cr3", "cr4", "efer", "rip", "rsp", "rax", "rbx")
# Continuing from the entry to the call instruction takes microseconds of guest time;
# this only bounds a guest that went elsewhere.
RUN_TO_CALL_TIMEOUT_S = 60.0
_U64 = (1 << 64) - 1


# --- module state ---------------------------------------------------------------------

@dataclass(frozen=True)
class FirmwareSnapshot:
    """The firmware's paging state at __efi64_mb2_start (F), before any merge."""
    load_base: int
    cr0: int
    cr3: int          # as is: the RFC copies from %cr3 unmasked (I0)
    cr4: int
    efer: int
    rip: int
    rsp: int
    rbx: int          # the multiboot2 information (MBI)
    root: int         # the firmware L4's PA (CR3 without its low bits)
    l4: bytes         # the 4096 bytes of that L4 when the snapshot was taken

    def as_dict(self) -> Dict[str, object]:
        return {"load_base": self.load_base, "cr0": self.cr0, "cr3": self.cr3,
                "cr4": self.cr4, "efer": self.efer, "rip": self.rip, "rsp": self.rsp,
                "rbx": self.rbx, "root": self.root, "l4_bytes": len(self.l4)}


@dataclass
class Change:
    """One thing xen-l4merge-apply changed: a byte range (PA) or a register."""
    kind: str                       # "memory" or "register"
    where: Union[int, str]          # PA, or register name
    old: Union[bytes, int]
    new: Union[bytes, int]
    what: str

    def as_dict(self) -> Dict[str, object]:
        if self.kind == "memory":
            return {"kind": "memory", "pa": self.where, "length": len(self.new),
                    "what": self.what}
        return {"kind": "register", "name": self.where, "old": self.old, "new": self.new,
                "what": self.what}


@dataclass
class Journal:
    """Everything xen-l4merge-apply changed in this boot, in order."""
    load_base: int
    changes: List[Change] = field(default_factory=list)
    root: Optional[int] = None        # M's PA once applied
    relocated: bool = False
    table_source: str = ""
    called_linked: bool = False


@dataclass
class _Session:
    firmware: Optional[FirmwareSnapshot] = None
    journal: Optional[Journal] = None
    # The guest has run since the snapshot / the first write: a stop at the entry
    # then means a new boot (GDB's stop handlers run in any order, so a fresh
    # snapshot taken by another handler at this very stop is not mistaken for it).
    ran: bool = False


SESSION = _Session()


def forget(reason: str = "") -> None:
    """Drop the firmware snapshot and the apply journal (a new boot made them stale)."""
    held = SESSION.firmware is not None or SESSION.journal is not None
    SESSION.firmware = None
    SESSION.journal = None
    SESSION.ran = False
    if held and reason:
        gdb.write(f"gdbext: {reason}: forgot the firmware snapshot"
                  " and what xen-l4merge-apply had written\n")


def _forget_if_new_boot(pc: int) -> None:
    """Back at the entry after the guest ran: a new boot, F and the journal are stale."""
    held = SESSION.firmware or SESSION.journal
    syms = xen_cmds.STATE.syms
    if held is None or not SESSION.ran or syms is None or ENTRY not in syms:
        return
    if pc == held.load_base + syms.offset(ENTRY):
        forget(f"stopped at {ENTRY} again (a new boot)")


def _on_stop(_event) -> None:
    try:
        pc = int(gdb.selected_frame().pc()) & _U64
    except (gdb.error, RuntimeError):
        return
    _forget_if_new_boot(pc)


def _on_cont(_event) -> None:
    SESSION.ran = True


def _on_disconnect(*_args) -> None:
    forget()


# --- guest access ---------------------------------------------------------------------

def _loaded() -> LoadedXen:
    return xen_cmds.require_loaded()


def _set_register(name: str, value: int) -> None:
    """Write a register through GDB (QEMU's gdbstub accepts CR3 too).

    GDB types CR3 as flags, which it will not cast from an integer, so the new
    value is built from bytes in the register's own type.  Always frame 0: after
    RSP or RIP change GDB may select a caller's frame, whose registers are unwound
    values that cannot be assigned."""
    frame = gdb.newest_frame()
    frame.select()
    reg_type = frame.read_register(name).type
    size = reg_type.sizeof
    raw = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
    gdb.set_convenience_variable("_gdbext_reg", gdb.Value(raw, reg_type))
    try:
        gdb.execute(f"set ${name} = $_gdbext_reg", to_string=True)
    finally:
        gdb.set_convenience_variable("_gdbext_reg", None)
        gdb.newest_frame().select()
    target().invalidate()
    got = target().read_register(name)
    if got != value & ((1 << (8 * size)) - 1):
        raise GdbextError(f"the target did not take {name} = {value:#x} (reads back {got:#x})")


def _write_checked(pa: int, data: bytes) -> None:
    t = target()
    t.write_phys(pa, data)
    back = t.read_phys(pa, len(data))
    if back != data:
        raise GdbextError(f"wrote {len(data)} bytes at PA {pa:#x} but they read back different")


def _where(lx: LoadedXen, rip: int) -> str:
    """The planned stop at RIP, else the stretch of boot code, else the address."""
    stop = bootstops.stop_at(bootstops.plan_for(lx.syms), lx.load_base, rip)
    if stop is not None:
        return stop.name
    return bootstops.where_in_boot(lx.syms, lx.load_base, rip) or f"{rip:#x}"


def _describe_pa(lx: LoadedXen, pa: int, length: int) -> str:
    hit = lx.table_at(pa)
    if hit is not None:
        name, _level, delta = hit
        first, last = delta // 8, (delta + length) // 8 - 1
        return f"{name}[{first}]" if first == last else f"{name}[{first}..{last}]"
    return lx.name_pa(pa) or f"PA {pa:#x}"


# --- the firmware snapshot -------------------------------------------------------------

def firmware_snapshot() -> Optional[FirmwareSnapshot]:
    """F for the current load base, or None."""
    snap = SESSION.firmware
    base = xen_cmds.STATE.load_base
    if snap is not None and base is not None and snap.load_base != base:
        return None
    return snap


def remember_firmware() -> dict:
    """Snapshot F (CR3 raw, CR0/CR4/EFER, the firmware L4's 4096 bytes, RIP/RSP/RBX).

    Call it at __efi64_mb2_start, before the merge.  While xen-l4merge-apply's
    table is in CR3 the snapshot taken before it is kept and returned."""
    lx = _loaded()
    t = target()
    _forget_if_new_boot(t.read_register("rip"))
    journal = SESSION.journal
    if journal is not None and SESSION.firmware is not None:
        return SESSION.firmware.as_dict()
    with t.phys_mode():
        regs = target().read_registers(SNAPSHOT_REGISTERS)
        ctx = cpu_context(regs)
        if not ctx.mode.long_mode:
            raise GdbextError(f"remember_firmware: the CPU is in {ctx.mode.name} paging, not "
                              f"long mode: the firmware's 64-bit tables are only in CR3 at "
                              f"{ENTRY}")
        root = ctx.root_from_cr3(regs["cr3"])
        if lx.in_image(root):
            raise GdbextError(
                f"remember_firmware: CR3 {regs['cr3']:#x} points into Xen's image "
                f"({_describe_pa(lx, root, 8)}): these are not the firmware's tables; take the "
                f"snapshot at {ENTRY}, before the merge")
        l4 = t.read_phys(root, x86.PAGE_SIZE)
    SESSION.firmware = FirmwareSnapshot(lx.load_base, regs["cr0"], regs["cr3"], regs["cr4"],
                                        regs["efer"], regs["rip"], regs["rsp"], regs["rbx"],
                                        root, l4)
    SESSION.ran = False
    return SESSION.firmware.as_dict()


def _predict_from(lx: LoadedXen, fw_root: int, fw_l4: Optional[bytes], relocate: bool,
                  table: Optional[int] = None) -> merge_predict.Prediction:
    """The RFC's merge predicted from F as captured (``fw_l4``), even if the firmware
    changed its L4 since; nothing is written to the guest.  Inside phys_mode."""
    fw_mem = SyntheticMemory(ram_size=1 << x86.MAXPHYADDR_ARCH, base=target().cache)
    if fw_l4 is not None:
        fw_mem.write(fw_root, fw_l4)
    return merge_predict.predict_merge(lx.syms, fw_mem, lx.load_base, fw_root,
                                       relocate=relocate, table_pa=table)


def predicted_merge(relocate: bool = False) -> merge_predict.Prediction:
    """The RFC's merged L4 as it would be built from the firmware's L4 (captured at
    __efi64_mb2_start, or CR3 itself while it is still the firmware's), for
    ``xen-pt --root merge`` and friends.  Inside phys_mode; writes nothing."""
    lx = _loaded()
    snap = firmware_snapshot()
    if snap is not None:
        return _predict_from(lx, snap.root, snap.l4, relocate)
    regs = target().read_registers(("cr0", "cr3", "cr4", "efer"))
    ctx = cpu_context(regs)
    root = ctx.root_from_cr3(regs["cr3"]) if ctx.mode.long_mode else None
    if root is None or lx.in_image(root):
        raise GdbextError(f"the merge is predicted from the firmware's L4, which is in CR3 at "
                          f"{ENTRY}: stop there first (xen-run-to {ENTRY})")
    return _predict_from(lx, root, None, relocate)


# --- the checks ---------------------------------------------------------------------

def _skip_result(check_id: str, why: str) -> merge_catalog.CheckResult:
    info = merge_catalog.CHECKS[check_id]
    return merge_catalog.CheckResult(check_id, info.title, merge_catalog.SKIP, why, {},
                                     info.reviewer)


def _evaluate(stop: Optional[str] = None, predict: bool = False,
              assume_relocated: bool = False, only: Optional[Iterable[str]] = None,
              skip: Optional[Iterable[str]] = None, table: Optional[int] = None,
              firmware_root: Optional[int] = None
              ) -> Tuple[dict, List[merge_catalog.CheckResult], Dict[str, object]]:
    """(the JSON contract, the results, context for the text header)."""
    lx = _loaded()
    syms, base = lx.syms, lx.load_base
    wanted = merge_catalog.select(only, skip)
    plan = bootstops.plan_for(syms)
    t = target()
    _forget_if_new_boot(t.read_register("rip"))
    journal = SESSION.journal
    with t.phys_mode():
        regs = target().read_registers(CHECK_REGISTERS)
        ctx = cpu_context(regs)
        cur_root = ctx.root_from_cr3(regs["cr3"]) if ctx.mode.long_mode else None
        here = stop or _where(lx, regs["rip"])
        firmware_in_cr3 = cur_root is not None and not lx.in_image(cur_root)
        if here == ENTRY and journal is None and firmware_in_cr3 and firmware_root is None:
            remember_firmware()
        snap = firmware_snapshot()

        # F: given, captured at the entry, or (before any switch) CR3 itself.
        fw_cr3 = fw_root = None
        fw_l4: Optional[bytes] = None
        fw_source = ""
        if firmware_root is not None:
            fw_cr3, fw_root = firmware_root, firmware_root & ~x86.CR3_FLAGS_MASK
            fw_l4 = t.read_phys(fw_root, x86.PAGE_SIZE)
            fw_source = "given"
        elif snap is not None:
            fw_cr3, fw_root, fw_l4 = snap.cr3, snap.root, snap.l4
            fw_source = f"captured at {ENTRY}"
        elif firmware_in_cr3 and journal is None:
            fw_cr3, fw_root = regs["cr3"], cur_root
            fw_l4 = t.read_phys(cur_root, x86.PAGE_SIZE)
            fw_source = "CR3 now"

        # The merged table in use, if any.
        merged: Optional[int] = None
        merged_source = ""
        if table is not None:
            merged, merged_source = table, "given"
        elif journal is not None and journal.root is not None and cur_root == journal.root:
            merged, merged_source = journal.root, "written by xen-l4merge-apply"
        elif MERGE_TABLE_SYMBOL in syms and cur_root == lx.pa(MERGE_TABLE_SYMBOL):
            merged, merged_source = cur_root, MERGE_TABLE_SYMBOL

        # Before any switch, at the entry (or at the e8 call of a build without the
        # merge), the table to judge is the one the patch would build.
        before_merge = firmware_in_cr3 and (here == ENTRY or (here == CALL and not plan.patched))
        if predict or assume_relocated:
            mode = "predict-relocated" if assume_relocated else "predict"
        elif merged is None and before_merge:
            mode = "predict"
        else:
            mode = "live"

        state_regs = dict(regs)
        prediction = None
        if mode.startswith("predict"):
            if fw_root is None:
                raise GdbextError(
                    "xen-l4merge-check: the prediction needs the firmware's L4: stop at "
                    f"{ENTRY} first (xen-run-to {ENTRY}), or give --firmware-root ADDR")
            prediction = _predict_from(lx, fw_root, fw_l4, assume_relocated, table)
            mem = prediction.mem
            merged = prediction.root
            merged_source = f"predicted ({prediction.table_source})"
            state_regs["cr3"] = prediction.root   # the CPU's CR3 once the patch switched
            applicable: Sequence[str] = merge_catalog.CHECK_IDS
        elif merged is not None:
            mem = t.cache
            applicable = (merge_catalog.CHECK_IDS if here == ENTRY
                          else merge_catalog.CHECKS_AT_STOP.get(here, merge_catalog.CHECK_IDS))
        else:
            mem = t.cache
            applicable = merge_catalog.CHECKS_AT_STOP.get(
                here, ("I9",) if here == bootstops.AFTER_START_XEN else ())

        mbi = None
        if snap is not None:
            try:
                mbi = multiboot2.parse_mbi(mem, snap.rbx & 0xFFFF_FFFF)
            except GdbextError:
                mbi = None
        state = merge_checks.MergeState(syms=syms, load_base=base, mem=mem, regs=state_regs,
                                        firmware_root=fw_root, firmware_cr3=fw_cr3,
                                        firmware_l4=fw_l4, merged_root=merged, stop=here,
                                        maxphyaddr=maxphyaddr(), mbi=mbi)
        run_ids = [c for c in wanted if c in applicable]
        results = list(merge_checks.run_checks(state, only=run_ids)) if run_ids else []
    by_id = {r.id: r for r in results}
    why_not = (f"does not apply at {here} (here: {', '.join(applicable)})" if applicable
               else f"does not apply at {here}: no check does")
    ordered = [by_id.get(c) or _skip_result(c, why_not) for c in wanted]
    result = merge_report.results_as_dict(mode, here, state, ordered)
    context = {"mode": mode, "stop": here, "load_base": base, "firmware_root": fw_root,
               "firmware_source": fw_source, "table": merged, "table_source": merged_source}
    return result, ordered, context


def check_here(stop: Optional[str] = None, predict: bool = False,
               assume_relocated: bool = False, only: Optional[Iterable[str]] = None,
               skip: Optional[Iterable[str]] = None, table: Optional[int] = None,
               firmware_root: Optional[int] = None) -> dict:
    """The checks for where the guest is stopped, as the ``--json`` contract.

    Never raises because a check FAILs (look at ``["ok"]``); raises GdbextError
    for what the user must fix (no symbols, unknown B, bad check id, ...)."""
    return _evaluate(stop, predict, assume_relocated, only, skip, table, firmware_root)[0]


def failed_line(result: dict) -> Optional[str]:
    """The one-line error for a result with FAILs (CI's exit status), else None."""
    failed = [c["id"] for c in result["checks"] if c["status"] == merge_catalog.FAIL]
    if not failed:
        return None
    noun = "check" if len(failed) == 1 else "checks"
    return f"xen-l4merge-check: {len(failed)} {noun} failed: {', '.join(failed)}"


class L4MergeCheckCommand(XenCommand):
    name = "l4merge-check"
    summary = ("Check the RFC's merged L4 (call efi_multiboot2 at its linked address) "
               "against invariants I0-I13.")

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
        result, results, ctx = _evaluate(None, args.predict, args.assume_relocated,
                                         args.only, args.skip, table, fw)
        if args.json:
            gdb.write(render.to_json(result) + "\n")
        else:
            head = [f"xen-l4merge-check: {ctx['mode']} at {ctx['stop']}, "
                    f"B = {ctx['load_base']:#x}"]
            if ctx["firmware_root"] is not None:
                head.append(f"firmware L4 F = {ctx['firmware_root']:#x} "
                            f"({ctx['firmware_source']})")
            if ctx["table"] is not None:
                head.append(f"merged L4 M = {ctx['table']:#x} ({ctx['table_source']})")
            gdb.write("; ".join(head) + "\n")
            gdb.write(merge_report.render_text(results, color=use_color(from_tty)) + "\n")
        line = failed_line(result)
        if line:
            raise GdbextError(line)


# --- the what-if: apply the merge to the stopped guest ------------------------------------

def _restore(ch: Change) -> None:
    if ch.kind == "memory":
        _write_checked(int(ch.where), bytes(ch.old))  # type: ignore[arg-type]
    else:
        _set_register(str(ch.where), int(ch.old))  # type: ignore[arg-type]


def _rollback(changes: List[Change]) -> List[Change]:
    """Restore ``changes`` newest first; returns what was restored."""
    done = []
    for ch in reversed(changes):
        _restore(ch)
        done.append(ch)
    return done


def _rollback_after_error(changes: List[Change]) -> None:
    """Best effort while another error is on its way to the user: restore what can be."""
    for ch in reversed(changes):
        try:
            _restore(ch)
        except (GdbextError, gdb.error):
            gdb.write(f"gdbext: could not restore {ch.what} "
                      f"({ch.where if isinstance(ch.where, str) else hex(ch.where)})\n",
                      gdb.STDERR)


def _record_write(journal: Journal, pa: int, data: bytes, what: str) -> Change:
    old = target().read_phys(pa, len(data))
    ch = Change("memory", pa, old, data, what)
    journal.changes.append(ch)
    _write_checked(pa, data)
    return ch


def _record_register(journal: Journal, name: str, value: int, what: str) -> Change:
    old = target().read_register(name)
    ch = Change("register", name, old, value, what)
    journal.changes.append(ch)
    _set_register(name, value)
    return ch


def _why_written(lx: LoadedXen, fills: Dict[str, Tuple[int, int, int]], pa: int) -> str:
    """A write outside M is either one of the patch's 2 MiB fills or (relocated
    variant) B added in place to a table under M's upper half."""
    hit = lx.table_at(pa)
    if hit is not None and hit[0] in fills:
        first, last, _pte = fills[hit[0]]
        if first <= hit[2] // 8 <= last:
            return "the patch's 2 MiB PSE+RWX fill"
    return "B added in place (pointer under M's upper half, the review's relocation)"


def apply_merge(relocate: bool = False) -> dict:
    """Write the predicted merge into the guest and switch CR3 to it (at the entry only)."""
    lx = _loaded()
    syms = lx.syms
    t = target()
    entry_pa = lx.pa(ENTRY)
    rip = t.read_register("rip")
    _forget_if_new_boot(rip)
    journal = SESSION.journal
    if journal is not None and journal.root is not None:
        raise GdbextError(
            f"xen-l4merge-apply: already applied (M at {journal.root:#x}, "
            f"{'relocated' if journal.relocated else 'raw, as the RFC'}); run "
            "'xen-l4merge-apply --undo' first")
    if rip != entry_pa:
        raise GdbextError(
            f"xen-l4merge-apply: the guest is at {rip:#x} ({_where(lx, rip)}), not at "
            f"{ENTRY} ({entry_pa:#x}): the merge is applied only where the firmware's "
            f"tables are still in CR3 and Xen has run nothing; boot again to {ENTRY} "
            f"('xen-run-to {ENTRY}')")
    remember_firmware()
    snap = firmware_snapshot()
    assert snap is not None
    with t.phys_mode():
        prediction = merge_predict.predict_merge(syms, t.cache, lx.load_base, snap.root,
                                                 relocate=relocate)
    journal = Journal(lx.load_base, relocated=relocate, table_source=prediction.table_source)
    SESSION.journal = journal
    fills = merge_predict.fill_slots(lx)
    try:
        for pa in sorted(prediction.writes):
            data = prediction.writes[pa]
            if pa == prediction.root:
                what = ("merged L4 M: firmware L4[0..255] + idle_pg_table[256..511]"
                        + (" + B" if relocate else " (raw, as the RFC)")
                        + f", in {_describe_pa(lx, pa, len(data))}")
            else:
                what = f"{_describe_pa(lx, pa, len(data))}: {_why_written(lx, fills, pa)}"
            _record_write(journal, pa, data, what)
        _record_register(journal, "cr3", prediction.root, "CR3 switched to M (mov %rax,%cr3)")
    except BaseException:
        _rollback_after_error(journal.changes)
        SESSION.journal = None
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


def _run_to(pa: int, what: str) -> int:
    """Continue until RIP == pa (one internal breakpoint); returns RIP."""
    bp = xen_cmds.quiet_breakpoint(pa)
    try:
        return xen_cmds.continue_until(time.monotonic() + RUN_TO_CALL_TIMEOUT_S, what)
    except GdbextError as err:
        raise GdbextError(f"xen-l4merge-apply: {err}; it is stopped now, --undo restores "
                          "what was written") from None
    finally:
        try:
            bp.delete()
        except RuntimeError:
            pass


def call_linked() -> dict:
    """Run to ``call efi_multiboot2`` and make the call at the linked VA, as the RFC's
    ``call *%rax`` does: push the return address (the next instruction, at the load
    address), set %rax and RIP to efi_multiboot2's linked VA.  Needs the merge applied."""
    lx = _loaded()
    syms = lx.syms
    t = target()
    plan = bootstops.plan_for(syms)
    if plan.patched:
        raise GdbextError("xen-l4merge-apply: this build makes the call at the linked VA "
                          "itself (call *%rax): just step it (stepi)")
    journal = SESSION.journal
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
        rip = _run_to(call_pa, f"'{CALL}' at {call_pa:#x}")
        ran = True
    if rip != call_pa:
        raise GdbextError(
            f"xen-l4merge-apply: the guest is at {rip:#x} ({_where(lx, rip)}), not at "
            f"'{CALL}' ({call_pa:#x}) or {ENTRY}: cannot make the call from here")
    linked = syms.linked_va(CALL_TARGET)
    call_va = syms.va_from_offset(call_pa - lx.load_base)
    call_len = 5  # e8 rel32
    with t.phys_mode():
        code = t.read_phys(call_pa, call_len)
        regs = target().read_registers(("cr0", "cr3", "cr4", "efer", "rsp"))
        ctx = cpu_context(regs)
        new_rsp = (regs["rsp"] - 8) & _U64
        w = paging.walk(ctx, t.cache, ctx.root_from_cr3(regs["cr3"]), new_rsp)
        # Where the first instruction fetch will go (the raw RFC table does not get there).
        fetch = paging.walk(ctx, t.cache, ctx.root_from_cr3(regs["cr3"]), linked)
    target_pa = lx.pa(CALL_TARGET)
    reachable = fetch.mapped and fetch.pa == target_pa and not fetch.nx
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
        _record_write(journal, w.pa, return_address.to_bytes(8, "little"),
                      f"return address {return_address:#x} pushed at RSP-8 = {new_rsp:#x} "
                      "(the call's push)")
        _record_register(journal, "rsp", new_rsp, "RSP - 8 (the call's push)")
        _record_register(journal, "rax", linked,
                         f"%rax = linked VA of {CALL_TARGET} (the RFC computes it there)")
        _record_register(journal, "rip", linked,
                         f"RIP = linked VA of {CALL_TARGET} (call *%rax)")
    except BaseException:
        _rollback_after_error(journal.changes[first:])
        del journal.changes[first:]
        raise
    journal.called_linked = True
    return {"action": "call-linked", "ran_to_call": ran, "call": call_pa,
            "return_address": return_address, "target": linked, "target_pa": target_pa,
            "reachable": reachable, "fetch_pa": fetch.pa if fetch.mapped else None,
            "fetch_fault": None if fetch.mapped else f"L{fetch.fault_level}: {fetch.fault}",
            "changes": [c.as_dict() for c in journal.changes[first:]]}


def undo() -> dict:
    """Restore every byte and register xen-l4merge-apply changed, newest first."""
    journal = SESSION.journal
    if journal is None or not journal.changes:
        raise GdbextError("xen-l4merge-apply --undo: nothing to undo: xen-l4merge-apply has "
                          "changed nothing in this boot")
    done = _rollback(journal.changes)
    SESSION.journal = None
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
            result = undo()
            parts = [_changes_text(result["restored"], "restored (newest first)", restored=True)]
        else:
            result = {"action": "apply", "steps": []}
            journal = SESSION.journal
            if not (args.call_linked and journal is not None and journal.root is not None):
                result["steps"].append(apply_merge(args.relocate))
            elif args.relocate and not journal.relocated:
                raise GdbextError("xen-l4merge-apply: the merge already applied is the RFC's "
                                  "raw copy; --undo first to apply --relocate")
            if args.call_linked:
                result["steps"].append(call_linked())
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
            gdb.write(render.to_json(result) + "\n")
        else:
            gdb.write("\n".join(parts) + "\n")


_HOOKED = False


def install() -> None:
    global _HOOKED
    L4MergeCheckCommand()
    L4MergeApplyCommand()
    if not _HOOKED:
        gdb.events.stop.connect(_on_stop)
        gdb.events.cont.connect(_on_cont)
        for name in ("exited", "connection_removed"):
            registry = getattr(gdb.events, name, None)
            if registry is not None:
                registry.connect(_on_disconnect)
        _HOOKED = True
