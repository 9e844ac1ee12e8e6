"""The RFC's merge at the stop the guest is in: what to check, from which inputs.

``xen-l4merge-check``, ``xen-mb2-break`` and the walkthrough all ask the same
question at a stop: which table is the merged L4 here (predicted, or in CR3),
which firmware L4 F it is compared with, and which checks apply.  The answer
depends only on the machine's state (registers, memory) and on what gdbext
recorded earlier in this boot (``MergeRecord``: F as captured at the entry,
and the journal of ``xen-l4merge-apply``), so it is decided here, as pure
functions over ``PhysMemory`` and a register dict; the GDB layer reads the
registers, calls ``evaluate`` and prints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

from . import bootstops, merge_catalog, merge_checks, merge_predict, merge_report, multiboot2, x86
from .errors import GdbextError
from .memory import PhysMemory, SyntheticMemory
from .paging import PagingContext
from .xenimage import LoadedXen

ENTRY = bootstops.ENTRY                 # "__efi64_mb2_start"
CALL = bootstops.CALL                   # "call efi_multiboot2"
MERGE_TABLE_SYMBOL = merge_predict.PATCH_TABLE  # the RFC's merged table (patched builds only)

# The check modes, and what each judges.
PREDICT = "predict"                     # the table the patch would build, nothing written
PREDICT_RELOCATED = "predict-relocated"  # the same with B added to its upper half
LIVE = "live"                           # the table in CR3 (or --table) as it is


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


SNAPSHOT_REGISTERS = ("cr0", "cr3", "cr4", "efer", "rip", "rsp", "rbx")
CHECK_REGISTERS = ("cr0", "cr3", "cr4", "efer", "rip", "rsp", "rax", "rbx")


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
class MergeRecord:
    """What gdbext remembers of the merge in this boot: F and the apply journal."""
    firmware: Optional[FirmwareSnapshot] = None
    journal: Optional[Journal] = None
    # The guest has run since the snapshot / the first write: a stop at the entry
    # then means a new boot (GDB's stop handlers run in any order, so a fresh
    # snapshot taken by another handler at this very stop is not mistaken for it).
    ran: bool = False

    def held(self) -> bool:
        return self.firmware is not None or self.journal is not None

    def forget(self) -> None:
        self.firmware = None
        self.journal = None
        self.ran = False

    def stale_at(self, syms, pc: int) -> bool:
        """Back at the entry after the guest ran: a new boot, F and the journal are stale."""
        held = self.firmware or self.journal
        if held is None or not self.ran or syms is None or ENTRY not in syms:
            return False
        return pc == held.load_base + syms.offset(ENTRY)

    def snapshot_for(self, load_base: Optional[int]) -> Optional[FirmwareSnapshot]:
        """F for this load base, or None."""
        snap = self.firmware
        if snap is not None and load_base is not None and snap.load_base != load_base:
            return None
        return snap


def describe_pa(lx: LoadedXen, pa: int, length: int) -> str:
    """``table[i]`` / ``table[i..j]`` for a range inside Xen's tables, else its name."""
    hit = lx.table_at(pa)
    if hit is not None:
        name, _level, delta = hit
        first, last = delta // 8, (delta + length) // 8 - 1
        return f"{name}[{first}]" if first == last else f"{name}[{first}..{last}]"
    return lx.name_pa(pa) or f"PA {pa:#x}"


def where(lx: LoadedXen, rip: int) -> str:
    """The planned stop at RIP, else the stretch of boot code, else the address."""
    stop = bootstops.stop_at(bootstops.plan_for(lx.syms), lx.load_base, rip)
    if stop is not None:
        return stop.name
    return bootstops.where_in_boot(lx.syms, lx.load_base, rip) or f"{rip:#x}"


def take_snapshot(lx: LoadedXen, mem: PhysMemory, regs: Mapping[str, int],
                  ctx: PagingContext) -> FirmwareSnapshot:
    """F from the registers (``SNAPSHOT_REGISTERS``) and the L4 in CR3; refused
    unless the CPU is in long mode on tables outside Xen's image."""
    if not ctx.mode.long_mode:
        raise GdbextError(f"remember_firmware: the CPU is in {ctx.mode.name} paging, not "
                          f"long mode: the firmware's 64-bit tables are only in CR3 at "
                          f"{ENTRY}")
    root = ctx.root_from_cr3(regs["cr3"])
    if lx.in_image(root):
        raise GdbextError(
            f"remember_firmware: CR3 {regs['cr3']:#x} points into Xen's image "
            f"({describe_pa(lx, root, 8)}): these are not the firmware's tables; take the "
            f"snapshot at {ENTRY}, before the merge")
    l4 = mem.read_phys(root, x86.PAGE_SIZE)
    return FirmwareSnapshot(lx.load_base, regs["cr0"], regs["cr3"], regs["cr4"],
                            regs["efer"], regs["rip"], regs["rsp"], regs["rbx"], root, l4)


def predict_from(lx: LoadedXen, mem: PhysMemory, fw_root: int, fw_l4: Optional[bytes],
                 relocate: bool, table: Optional[int] = None) -> merge_predict.Prediction:
    """The RFC's merge predicted from F as captured (``fw_l4``), even if the firmware
    changed its L4 since; nothing is written to the guest."""
    fw_mem = SyntheticMemory(ram_size=1 << x86.MAXPHYADDR_ARCH, base=mem)
    if fw_l4 is not None:
        fw_mem.write(fw_root, fw_l4)
    return merge_predict.predict_merge(lx.syms, fw_mem, lx.load_base, fw_root, relocate=relocate,
                                 table_pa=table)


def predicted_merge(lx: LoadedXen, mem: PhysMemory, regs: Mapping[str, int],
                    ctx: PagingContext, snapshot: Optional[FirmwareSnapshot],
                    relocate: bool = False) -> merge_predict.Prediction:
    """The RFC's merged L4 as it would be built from the firmware's L4: the one captured
    at __efi64_mb2_start, or CR3 itself while it is still the firmware's."""
    if snapshot is not None:
        return predict_from(lx, mem, snapshot.root, snapshot.l4, relocate)
    root = ctx.root_from_cr3(regs["cr3"]) if ctx.mode.long_mode else None
    if root is None or lx.in_image(root):
        raise GdbextError(f"the merge is predicted from the firmware's L4, which is in CR3 at "
                          f"{ENTRY}: stop there first (xen-run-to {ENTRY})")
    return predict_from(lx, mem, root, None, relocate)


@dataclass(frozen=True)
class CheckRequest:
    """What the user asked of xen-l4merge-check (or a session asks at a stop)."""
    stop: Optional[str] = None                 # the stop's name, if the caller knows it
    predict: bool = False
    assume_relocated: bool = False
    only: Optional[Tuple[str, ...]] = None
    skip: Optional[Tuple[str, ...]] = None
    table: Optional[int] = None                # --table: the merged L4's PA
    firmware_root: Optional[int] = None        # --firmware-root: F's CR3


@dataclass(frozen=True)
class FirmwareChoice:
    cr3: Optional[int]
    root: Optional[int]
    l4: Optional[bytes]
    source: str


def choose_firmware(req: CheckRequest, snapshot: Optional[FirmwareSnapshot],
                    firmware_in_cr3: bool, journal: Optional[Journal], cr3: int,
                    cur_root: Optional[int], mem: PhysMemory) -> FirmwareChoice:
    """F: given, captured at the entry, or (before any switch) CR3 itself."""
    if req.firmware_root is not None:
        root = req.firmware_root & ~x86.CR3_FLAGS_MASK
        return FirmwareChoice(req.firmware_root, root, mem.read_phys(root, x86.PAGE_SIZE),
                              "given")
    if snapshot is not None:
        return FirmwareChoice(snapshot.cr3, snapshot.root, snapshot.l4,
                              f"captured at {ENTRY}")
    if firmware_in_cr3 and journal is None and cur_root is not None:
        return FirmwareChoice(cr3, cur_root, mem.read_phys(cur_root, x86.PAGE_SIZE),
                              "CR3 now")
    return FirmwareChoice(None, None, None, "")


def choose_merged(req: CheckRequest, journal: Optional[Journal], cur_root: Optional[int],
                  patch_table_pa: Optional[int]) -> Tuple[Optional[int], str]:
    """The merged table in use, if any: given, written by xen-l4merge-apply and in CR3,
    or a patched build's efi_l4_bootmap in CR3."""
    if req.table is not None:
        return req.table, "given"
    if journal is not None and journal.root is not None and cur_root == journal.root:
        return journal.root, "written by xen-l4merge-apply"
    if patch_table_pa is not None and cur_root == patch_table_pa:
        return cur_root, MERGE_TABLE_SYMBOL
    return None, ""


def choose_mode(req: CheckRequest, merged: Optional[int], before_merge: bool) -> str:
    """predict / predict-relocated when asked, or at the entry before any merged table;
    live otherwise."""
    if req.predict or req.assume_relocated:
        return PREDICT_RELOCATED if req.assume_relocated else PREDICT
    if merged is None and before_merge:
        return PREDICT
    return LIVE


def applicable_checks(mode: str, merged: Optional[int], here: str) -> Sequence[str]:
    """The checks that can be judged in this mode at this stop."""
    if mode != LIVE:
        return merge_catalog.CHECK_IDS
    if merged is not None:
        return (merge_catalog.CHECK_IDS if here == ENTRY
                else merge_catalog.CHECKS_AT_STOP.get(here, merge_catalog.CHECK_IDS))
    return merge_catalog.CHECKS_AT_STOP.get(
        here, ("I9",) if here == bootstops.AFTER_START_XEN else ())


def wants_snapshot(here: str, record: MergeRecord, firmware_in_cr3: bool,
                   req: CheckRequest) -> bool:
    """At the entry, before any merge: capture F for the later stops."""
    return (here == ENTRY and record.journal is None and firmware_in_cr3
            and req.firmware_root is None)


@dataclass
class Evaluation:
    result: dict                          # the --json contract
    results: List[merge_catalog.CheckResult]    # in the order asked for
    header: Dict[str, object]             # mode, stop, F and M with their sources


def _skip_result(check_id: str, why: str) -> merge_catalog.CheckResult:
    info = merge_catalog.CHECKS[check_id]
    return merge_catalog.CheckResult(check_id, info.title, merge_catalog.SKIP, why, {}, info.reviewer)


def evaluate(lx: LoadedXen, mem: PhysMemory, regs: Mapping[str, int], ctx: PagingContext,
             record: MergeRecord, req: CheckRequest) -> Evaluation:
    """The checks for where the guest is stopped (``regs``: ``CHECK_REGISTERS``).

    May capture F into ``record`` (at the entry, before any merge).  Never raises
    because a check FAILs; raises GdbextError for what the user must fix."""
    syms, base = lx.syms, lx.load_base
    wanted = merge_catalog.select(req.only, req.skip)
    plan = bootstops.plan_for(syms)
    journal = record.journal
    cur_root = ctx.root_from_cr3(regs["cr3"]) if ctx.mode.long_mode else None
    here = req.stop or where(lx, regs["rip"])
    firmware_in_cr3 = cur_root is not None and not lx.in_image(cur_root)
    if wants_snapshot(here, record, firmware_in_cr3, req):
        record.firmware = take_snapshot(lx, mem, regs, ctx)
        record.ran = False
    snap = record.snapshot_for(base)
    fw = choose_firmware(req, snap, firmware_in_cr3, journal, regs["cr3"], cur_root, mem)
    patch_pa = lx.pa(MERGE_TABLE_SYMBOL) if MERGE_TABLE_SYMBOL in syms else None
    merged, merged_source = choose_merged(req, journal, cur_root, patch_pa)
    # Before any switch, at the entry (or at the e8 call of a build without the
    # merge), the table to judge is the one the patch would build.
    before_merge = firmware_in_cr3 and (here == ENTRY or (here == CALL and not plan.patched))
    mode = choose_mode(req, merged, before_merge)

    state_regs = dict(regs)
    check_mem = mem
    if mode != LIVE:
        if fw.root is None:
            raise GdbextError(
                "xen-l4merge-check: the prediction needs the firmware's L4: stop at "
                f"{ENTRY} first (xen-run-to {ENTRY}), or give --firmware-root ADDR")
        prediction = predict_from(lx, mem, fw.root, fw.l4, mode == PREDICT_RELOCATED,
                                  req.table)
        check_mem = prediction.mem
        merged = prediction.root
        merged_source = f"predicted ({prediction.table_source})"
        state_regs["cr3"] = prediction.root   # the CPU's CR3 once the patch switched
    applicable = applicable_checks(mode, merged, here)

    mbi = None
    if snap is not None:
        try:
            mbi = multiboot2.parse_mbi(check_mem, snap.rbx & 0xFFFF_FFFF)
        except GdbextError:
            mbi = None
    state = merge_checks.MergeState(syms=syms, load_base=base, mem=check_mem, regs=state_regs,
                               firmware_root=fw.root, firmware_cr3=fw.cr3,
                               firmware_l4=fw.l4, merged_root=merged, stop=here,
                               maxphyaddr=ctx.maxphyaddr, mbi=mbi)
    run_ids = [c for c in wanted if c in applicable]
    results = list(merge_checks.run_checks(state, only=run_ids)) if run_ids else []
    by_id = {r.id: r for r in results}
    why_not = (f"does not apply at {here} (here: {', '.join(applicable)})" if applicable
               else f"does not apply at {here}: no check does")
    ordered = [by_id.get(c) or _skip_result(c, why_not) for c in wanted]
    result = merge_report.results_as_dict(mode, here, state, ordered)
    header = {"mode": mode, "stop": here, "load_base": base, "firmware_root": fw.root,
              "firmware_source": fw.source, "table": merged, "table_source": merged_source}
    return Evaluation(result, ordered, header)


def failed_line(result: Mapping[str, object]) -> Optional[str]:
    """The one-line error for a result with FAILs (CI's exit status), else None."""
    failed = [c["id"] for c in result["checks"] if c["status"] == merge_catalog.FAIL]
    if not failed:
        return None
    noun = "check" if len(failed) == 1 else "checks"
    return f"xen-l4merge-check: {len(failed)} {noun} failed: {', '.join(failed)}"


def call_target_reach(fetch, target_pa: int) -> bool:
    """Whether the first fetch at the linked VA lands on efi_multiboot2, executable."""
    return bool(fetch.mapped and fetch.pa == target_pa and not fetch.nx)


def why_written(lx: LoadedXen, fills: Dict[str, Tuple[int, int, int]], pa: int) -> str:
    """A write outside M is either one of the patch's 2 MiB fills or (relocated
    variant) B added in place to a table under M's upper half."""
    hit = lx.table_at(pa)
    if hit is not None and hit[0] in fills:
        first, last, _pte = fills[hit[0]]
        if first <= hit[2] // 8 <= last:
            return "the patch's 2 MiB PSE+RWX fill"
    return "B added in place (pointer under M's upper half, the review's relocation)"

