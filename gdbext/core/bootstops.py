"""The stops of Xen's multiboot2+EFI boot, computed from xen-syms; where RIP is.

Never imports ``gdb``.  Every address comes from the symbols and from decoding
the ELF's bytes; no offset of any particular build is written here.

The path a multiboot2 loader (GRUB) takes on EFI, and the stops planted on it:

==========================  =======  ==============================================
stop                        address  what it is
==========================  =======  ==============================================
``__efi64_mb2_start``       load     the entry, 64-bit, firmware's identity tables
``merge``                   load     RFC-patched builds only: just after
                                     ``mov %rax,%cr3`` switched to the merged L4
``call efi_multiboot2``     load     the call (``e8`` to efi_multiboot2, or the
                                     RFC's ``call *%rax``)
``efi_multiboot2``          load     (linked VA when the build calls it there)
``efi_multiboot2 return``   load     the instruction after the call
``x86_32_switch``           load     leaves long mode; %r15 = where it goes next
``trampoline_setup``        load     32-bit, paging off; %esi = B
``tables relocated``        load     after the loop adding B to __page_tables
``l2_xenmap filled``        load     after the loop writing l2_xenmap's 2 MiB pages
``trampoline cr3 load``     low      just after ``mov %eax,%cr3`` in the trampoline
                                     copied to ``trampoline_phys`` (so CR3 is Xen's)
``__high_start``            linked   first code at the linked address
``__start_xen``             linked   the C entry
==========================  =======  ==============================================

"load" addresses are B + offset(instruction) (Xen runs at its load address
until ``__high_start``); "linked" ones are the ELF's VAs; "low" ones are
``trampoline_phys`` + (instruction - ``trampoline_start``), known only once
``efi_multiboot2`` has chosen ``trampoline_phys`` (read it from guest memory at
B + offset(``trampoline_phys``) from the ``efi_multiboot2 return`` stop on).

Stops whose instructions cannot be found by decoding are left out of the plan
and the reason is recorded in ``StopPlan.notes`` (e.g. a build without the
RFC's merge has no ``merge`` stop).
"""

from __future__ import annotations

import bisect
import weakref
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from . import x86, x86decode
from .errors import GdbextError
from .x86decode import Instruction
from .merge_catalog import CHECK_IDS, CHECKS_AT_STOP, FAIL, STATUSES

# -- stop names (the shared contract) ------------------------------------------

from .stopnames import (AFTER_START_XEN, CALL, EFI_CR3, EFI_MB2,  # noqa: F401,E402
                        EFI_RELOCATED, EFI_RETURN, EFI_SELF_RELOCATE, EFI_START,
                        EFI_STOP_ORDER, ENTRY, HIGH_START, L2_XENMAP_FILLED,
                        MERGE, START_XEN, STOP_ORDER, SWITCH, TABLES_RELOCATED,
                        TRAMPOLINE_CR3, TRAMPOLINE_SETUP)

# The function xen.efi calls from efi_start, last with XEN_VIRT_START - B: it moves every
# relocated qword back (static pointers to linked VAs, boot-table entries to link + B).
EFI_RELOCATE_IMAGE = "efi_arch_relocate_image"

# The u64 in which efi_multiboot2 (or the 32-bit path) records the trampoline's
# low-memory copy.
TRAMPOLINE_PHYS = "trampoline_phys"


# Address kinds.
LOAD = "load"      # B + offset(instruction)
LINKED = "linked"  # the ELF's VA
LOW = "low"        # trampoline_phys + (instruction - trampoline_start)


# Which invariants each stop judges is merge_catalog's fact (CHECKS_AT_STOP),
# not repeated here; a stop with none (trampoline_setup: paging off) reports what
# changed and runs no check.  With --predict, the entry (and the call of a build
# without the merge, where CR3 is still the firmware's) judges the predicted
# merge: every check (CHECK_IDS).


# -- instruction decoding (core/x86decode, over capstone) ---------------------------

# The bytes of ``mov %eax,%cr3``: xen-mb2-break checks them just before the
# trampoline's low-copy stop (the plan places that stop just after this load).
MOV_RAX_CR3 = b"\x0f\x22\xd8"
# The bytes of ``call *%rax``: the RFC's call at the linked VA, which I6 looks for at RIP.
CALL_RAX = b"\xff\xd0"
# How far after the idle_pg_table immediate the CR3 load may be (one add between).
_CR3_LOAD_WINDOW = 16


@dataclass(frozen=True)
class MergeSite:
    """The RFC's merge inside __efi64_mb2_start (linked VAs of the instructions)."""
    mov_cr3_rsi: int   # reads the firmware's CR3 (F)
    mov_rax_cr3: int   # switches to the merged L4
    call_rax: int      # calls efi_multiboot2 at its linked VA

    def as_dict(self) -> Dict[str, int]:
        return {"mov_cr3_rsi": self.mov_cr3_rsi, "mov_rax_cr3": self.mov_rax_cr3,
                "call_rax": self.call_rax}


def _reg_operand(insn: Instruction, written: bool) -> Optional[str]:
    """The register ``insn`` writes (``written``) or reads, if it has one such operand."""
    regs = [o.reg for o in insn.operands
            if o.kind == x86decode.REG and (o.written if written else o.read)]
    return regs[0] if len(regs) == 1 else None


def _is_cr3_move(insn: Instruction, to_cr3: bool, gpr: str) -> bool:
    if to_cr3:
        return x86decode.K_MOV_TO_CR3 in insn.kinds and _reg_operand(insn, False) == gpr
    return x86decode.K_MOV_FROM_CR3 in insn.kinds and _reg_operand(insn, True) == gpr


def _is_call_through(insn: Instruction, reg: str) -> bool:
    return (insn.is_call and insn.is_indirect and len(insn.operands) == 1
            and insn.operands[0].kind == x86decode.REG and insn.operands[0].reg == reg)


def find_merge(code: bytes, va: int) -> Optional[MergeSite]:
    """The RFC's three instructions, in order, in ``code`` (64-bit, linked at ``va``).

    All three must be there (``mov %cr3,%rsi`` < ``mov %rax,%cr3`` <
    ``call *%rax``), else None: a build without the merge.
    """
    want = [lambda i: _is_cr3_move(i, False, "rsi"), lambda i: _is_cr3_move(i, True, "rax"),
            lambda i: _is_call_through(i, "rax")]
    found: List[int] = []
    for insn in x86decode.iter_decode(code, va, 64):
        if want[len(found)](insn):
            found.append(insn.address)
            if len(found) == len(want):
                return MergeSite(*found)
    return None


def find_call_rel32(code: bytes, va: int, target: int) -> Optional[int]:
    """VA of the first direct call in ``code`` (64-bit, at ``va``) whose target is ``target``."""
    for insn in x86decode.iter_decode(code, va, 64):
        if insn.is_call and insn.branch_target == target:
            return insn.address
    return None


def direct_call_targets(code: bytes, va: int, is_function: Callable[[int], bool]) -> List[int]:
    """Targets of the direct calls in ``code`` (64-bit, at ``va``) that ``is_function``
    accepts (a function symbol's start), in code order, each once."""
    out: List[int] = []
    for insn in x86decode.iter_decode(code, va, 64):
        tgt = insn.branch_target
        if insn.is_call and tgt is not None and tgt not in out and is_function(tgt):
            out.append(tgt)
    return out


def find_call_via(syms, code: bytes, va: int, target: int) -> Optional[Tuple[int, Optional[str]]]:
    """Where ``target`` is called from the code at ``va``: (call VA, None) for a direct
    call, else (call VA inside the callee, callee's name) for a function the code calls
    that itself calls ``target`` (Xen 4.20's entry calls the C efi_multiboot2_prelude,
    which calls efi_multiboot2); None when neither is found."""
    direct = find_call_rel32(code, va, target)
    if direct is not None:
        return direct, None

    def sized_function(tgt: int) -> bool:
        hit = syms.symbol_at(tgt)
        return hit is not None and hit[1] == 0 and (syms.lookup(hit[0]).size or 0) > 0

    for callee_va in direct_call_targets(code, va, sized_function):
        callee = syms.lookup(syms.symbol_at(callee_va)[0])
        inner = find_call_rel32(syms.read_linked(callee_va, callee.size), callee_va, target)
        if inner is not None:
            return inner, callee.name
    return None


# A loop's backward jump lands at most this far before the instruction that
# identifies the loop (its set-up, or a store in its body).
_LOOP_REACH = 32

InsnTest = Callable[[Instruction], bool]


def _back_jcc(insns: Sequence[Instruction], anchor: int) -> Optional[Instruction]:
    """The first conditional jump from ``insns[anchor]`` on that jumps back to near
    that instruction (a loop around or just after it).  Far backward jumps (to an
    error path) are not loops and are passed over."""
    start = insns[anchor].address
    for insn in insns[anchor:]:
        if insn.is_cond_jump and insn.branch_target is not None and \
                start - _LOOP_REACH <= insn.branch_target <= insn.address:
            return insn
    return None


def find_loop_after(code: bytes, va: int, pattern: Union[bytes, InsnTest],
                    mode: int = 64) -> Optional[Tuple[int, int]]:
    """(loop start VA, VA just after the loop) of the loop set up or stored by the
    instruction ``pattern`` (its encoding, or a test on decoded instructions): the
    first backward conditional jump after it that lands near it closes the loop."""
    insns = x86decode.decode(code, va, mode)
    if isinstance(pattern, (bytes, bytearray)):
        raw = bytes(pattern)
        test: InsnTest = lambda i: i.raw.startswith(raw)  # noqa: E731
    else:
        test = pattern
    for k, insn in enumerate(insns):
        if test(insn):
            jcc = _back_jcc(insns, k)
            if jcc is None:
                return None
            return jcc.branch_target, jcc.next_address
    return None


def find_cr3_load(code: bytes, va: int, root_offset: int, mode: int = 32,
                  starts: Iterable[int] = ()) -> Optional[int]:
    """VA of the trampoline's ``mov %eax,%cr3`` loading Xen's root table: it follows
    ``mov $offset(idle_pg_table),%eax`` (plus an add of B) within a few bytes.

    The trampoline mixes 16-, 32- and 64-bit code: decoding restarts at each VA of
    ``starts`` (its labels), so one mode's misreading never runs into the next."""
    cuts = sorted({va, *(s for s in starts if va < s < va + len(code))})
    for lo, hi in zip(cuts, cuts[1:] + [va + len(code)]):
        insns = x86decode.decode(code[lo - va:hi - va], lo, mode)
        for k, insn in enumerate(insns):
            if not (insn.mnemonic.startswith("mov") and _reg_operand(insn, True) == "eax"
                    and [o.imm for o in insn.immediates()] == [root_offset]):
                continue
            for later in insns[k + 1:]:
                if later.address >= insn.next_address + _CR3_LOAD_WINDOW:
                    break
                if _is_cr3_move(later, True, "eax"):
                    return later.address
    return None


def _is_lea_esi_disp(offset: int) -> InsnTest:
    """``lea offset(%esi),%eax``: the relocation loop's set-up."""
    def test(insn: Instruction) -> bool:
        mem = insn.memory_operands()
        return (insn.mnemonic.startswith("lea") and len(mem) == 1 and mem[0].base == "esi"
                and mem[0].index is None and mem[0].disp == offset
                and _reg_operand(insn, True) == "eax")
    return test


def _is_store_eax_indexed(offset: int) -> InsnTest:
    """``mov %eax,offset(%esi,%reg,8)``: the l2_xenmap fill's store."""
    def test(insn: Instruction) -> bool:
        mem = [o for o in insn.memory_operands() if o.written]
        return (insn.mnemonic.startswith("mov") and len(mem) == 1 and mem[0].base == "esi"
                and mem[0].index is not None and mem[0].disp == offset
                and _reg_operand(insn, False) == "eax")
    return test


# -- the plan ----------------------------------------------------------------------


@dataclass(frozen=True)
class BootStop:
    name: str
    kind: str                 # LOAD, LINKED or LOW
    linked_va: int            # the instruction in the ELF
    offset: int               # linked_va - XEN_VIRT_START (B + offset = load address)
    checks: Tuple[str, ...]   # the checks that apply here (merge_catalog.CHECKS_AT_STOP)
    why: str                  # one line: what this stop is for
    low_offset: Optional[int] = None  # LOW: instruction - trampoline_start

    def address(self, load_base: Optional[int],
                trampoline_phys: Optional[int] = None) -> Optional[int]:
        """Where the CPU executes this stop: None while unknown (B, trampoline_phys)."""
        if self.kind == LINKED:
            return self.linked_va
        if self.kind == LOW:
            if trampoline_phys is None or self.low_offset is None:
                return None
            return trampoline_phys + self.low_offset
        if load_base is None:
            return None
        return load_base + self.offset

    def as_dict(self, load_base: Optional[int] = None,
                trampoline_phys: Optional[int] = None) -> Dict[str, object]:
        return {"stop": self.name, "kind": self.kind, "linked_va": self.linked_va,
                "offset": self.offset, "low_offset": self.low_offset,
                "address": self.address(load_base, trampoline_phys),
                "checks": list(self.checks), "why": self.why}


@dataclass
class StopPlan:
    """The stops of one Xen build, in boot order."""
    stops: List[BootStop]
    patched: bool                        # has the RFC's merge
    merge_site: Optional[MergeSite]
    notes: List[str] = field(default_factory=list)  # what is missing, and why
    trampoline_phys_va: Optional[int] = None        # linked VA of the u32/u64 trampoline_phys
    trampoline_size: Optional[int] = None           # trampoline_end - trampoline_start
    relocation_loop: Optional[Tuple[int, int]] = None  # linked VAs [start, after)
    l2_xenmap_fill: Optional[Tuple[int, int]] = None
    order: Tuple[str, ...] = STOP_ORDER    # the names of this path (EFI_STOP_ORDER: xen.efi)

    @property
    def entry(self) -> BootStop:
        """The first stop: where the boot loader (or the firmware) enters Xen."""
        return self.stops[0]

    def names(self) -> List[str]:
        return [s.name for s in self.stops]

    def get(self, name: str) -> Optional[BootStop]:
        for s in self.stops:
            if s.name == name:
                return s
        return None

    def predicts_at(self, stop: BootStop) -> bool:
        """Whether --predict judges the RFC's merge at ``stop``: at the entry, and at
        the call of a build without the merge (CR3 is still the firmware's there)."""
        return stop.name == ENTRY or (stop.name == CALL and not self.patched)

    def checks_for(self, stop: BootStop, predict: bool = False) -> Tuple[str, ...]:
        """The checks that apply at ``stop``: every one for a predicted merge.

        Without the merge and without --predict, CR3 at the call is still the
        firmware's table, as at the entry: the entry's checks apply there, not
        those of a merged table that does not exist."""
        if predict and self.predicts_at(stop):
            return CHECK_IDS
        if stop.name == CALL and not self.patched:
            entry = self.get(ENTRY)
            firmware = entry.checks if entry is not None else ()
            return tuple(c for c in stop.checks if c in firmware)
        return stop.checks

    def select(self, stops: Optional[Iterable[str]] = None,
               skip: Optional[Iterable[str]] = None) -> List[BootStop]:
        """The stops to plant, in boot order. Unknown names raise one line naming them."""
        known = set(self.order)
        want = [stop_name(n) for n in _norm_names(stops)] if stops is not None else None
        drop = [stop_name(n) for n in _norm_names(skip)] if skip is not None else []
        bad = [n for n in (want or []) + drop if n not in known]
        if bad:
            raise GdbextError(
                f"unknown stop {', '.join(repr(b) for b in bad)}; stops are: "
                + ", ".join(self.order))
        missing = [n for n in (want or []) if self.get(n) is None]
        if missing:
            raise GdbextError(
                f"stop {', '.join(repr(m) for m in missing)} is not in this build's plan "
                f"({'; '.join(self.notes) or 'not found by decoding'})")
        return [s for s in self.stops if (want is None or s.name in want) and s.name not in drop]

    def as_dict(self, load_base: Optional[int] = None,
                trampoline_phys: Optional[int] = None) -> Dict[str, object]:
        return {"patched": self.patched,
                "merge": self.merge_site.as_dict() if self.merge_site else None,
                "stops": [s.as_dict(load_base, trampoline_phys) for s in self.stops],
                "notes": list(self.notes)}


def typed_stop_name(name: str) -> str:
    """A stop's name as typed in one word (TAB completion): spaces as dashes."""
    return name.replace(" ", "-")


def stop_name(typed: str) -> str:
    """The stop a user means by ``typed``: its name, or its one-word form."""
    for name in STOP_ORDER + EFI_STOP_ORDER:
        if typed == typed_stop_name(name):
            return name
    return typed


def _norm_names(names: Iterable[str]) -> List[str]:
    """Accept a list or comma-separated strings; stop names contain spaces."""
    out: List[str] = []
    for item in names:
        out.extend(p.strip() for p in str(item).split(",") if p.strip())
    return out


def _next_symbol_va(syms, va: int) -> int:
    """The address of the next symbol above ``va`` (end of an asm label's code)."""
    addrs = _symbol_addrs(syms)
    i = bisect.bisect_right(addrs, va)
    return addrs[i] if i < len(addrs) else syms.image_end


_ADDR_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _symbol_addrs(syms) -> List[int]:
    hit = _ADDR_CACHE.get(syms)
    if hit is None:
        hit = sorted({s.value for s in syms if not s.is_absolute and syms.in_image(s.value)})
        _ADDR_CACHE[syms] = hit
    return hit


def _code(syms, name: str) -> Tuple[int, bytes]:
    """(VA, bytes) of an asm label's code up to the next symbol (sizes are 0)."""
    va = syms.linked_va(name)
    sym = syms.lookup(name)
    end = va + sym.size if sym.size else _next_symbol_va(syms, va)
    return va, syms.read_linked(va, end - va)


def _next_insn(syms, va: int, mode: int) -> int:
    """The VA just after the instruction at ``va``."""
    insn = x86decode.decode_one(syms.read_linked(va, 15), va, mode)
    if insn is None:
        raise GdbextError(f"{syms.path}: no instruction at {va:#x}")
    return insn.next_address


class _PlanBuilder:
    """Collects stops in boot order, and notes for what decoding could not find."""

    def __init__(self, syms):
        self.syms = syms
        self.stops: List[BootStop] = []
        self.notes: List[str] = []

    def add(self, name: str, kind: str, va: int, why: str,
            low_offset: Optional[int] = None) -> None:
        self.stops.append(BootStop(name, kind, va, self.syms.offset(va),
                                   CHECKS_AT_STOP.get(name, ()), why, low_offset))

    def entry_and_call(self) -> Optional[MergeSite]:
        """The entry, the RFC's merge if any, the call of efi_multiboot2, its return."""
        syms = self.syms
        entry_va, entry_code = _code(syms, ENTRY)
        efi_va = syms.linked_va(EFI_MB2)
        self.add(ENTRY, LOAD, entry_va,
                 "Xen's multiboot2+EFI entry: derive B, snapshot the firmware's tables")
        merge = find_merge(entry_code, entry_va)
        if merge is not None:
            self.add(MERGE, LOAD, _next_insn(syms, merge.mov_rax_cr3, 64),
                     "just after the switch to the merged L4 (RFC)")
            call_va: Optional[int] = merge.call_rax
            call_len = _next_insn(syms, call_va, 64) - call_va
            self.add(CALL, LOAD, merge.call_rax,
                     "the call of efi_multiboot2 at its linked VA (call *%rax)")
            self.add(EFI_MB2, LINKED, efi_va,
                     "efi_multiboot2 at its linked VA, through the merged L4")
        else:
            self.notes.append(f"no RFC merge in {ENTRY} (no mov %cr3,%rsi / mov %rax,%cr3 / "
                              "call *%rax): this build calls efi_multiboot2 at its load address")
            site = find_call_via(syms, entry_code, entry_va, efi_va)
            call_va = site[0] if site is not None else None
            call_len = _next_insn(syms, call_va, 64) - call_va if call_va is not None else 0
            if site is None:
                self.notes.append(f"no call of efi_multiboot2 found in {ENTRY} nor in a "
                                  "function it calls")
            elif site[1] is None:
                self.add(CALL, LOAD, call_va, "the call of efi_multiboot2 (at its load address)")
            else:
                self.notes.append(f"{ENTRY} calls {site[1]}, which calls efi_multiboot2: the "
                                  f"call and return stops are inside {site[1]}")
                self.add(CALL, LOAD, call_va, f"the call of efi_multiboot2 in {site[1]}, "
                         f"called by {ENTRY} (at its load address)")
            self.add(EFI_MB2, LOAD, efi_va,
                     "efi_multiboot2 at its load address, firmware's tables")
        if call_va is not None:
            self.add(EFI_RETURN, LOAD, call_va + call_len,
                     "back from efi_multiboot2 (firmware may have changed its tables)")
        return merge

    def trampoline_setup(self) -> Tuple[Optional[Tuple[int, int]], Optional[Tuple[int, int]]]:
        """trampoline_setup and, inside it, the ends of the relocation and fill loops."""
        syms = self.syms
        ts_va, ts_code = _code(syms, TRAMPOLINE_SETUP)
        self.add(TRAMPOLINE_SETUP, LOAD, ts_va,
                 "32-bit, paging off, %esi = B; fixes up the tables")
        reloc_loop = fill_loop = None
        if syms.page_tables_start is not None:
            # lea offset(__page_tables_start)(%esi),%eax sets the loop up.
            reloc_loop = find_loop_after(
                ts_code, ts_va, _is_lea_esi_disp(syms.offset(syms.page_tables_start)), mode=32)
        if reloc_loop is None:
            self.notes.append(f"the loop relocating __page_tables was not found in "
                              f"{TRAMPOLINE_SETUP}")
        else:
            self.add(TABLES_RELOCATED, LOAD, reloc_loop[1],
                     "after the loop adding B to every present entry of __page_tables")
        if "l2_xenmap" in syms:
            # mov %eax,offset(l2_xenmap)(%esi,%ecx,8) in the loop body: any index.
            fill_loop = find_loop_after(
                ts_code, ts_va, _is_store_eax_indexed(syms.offset("l2_xenmap")), mode=32)
        if fill_loop is None:
            self.notes.append(f"the loop filling l2_xenmap was not found in {TRAMPOLINE_SETUP}")
        else:
            self.add(L2_XENMAP_FILLED, LOAD, fill_loop[1],
                     "after the loop writing l2_xenmap's 2 MiB pages (B + i*2 MiB | PSE+RWX)")
        return reloc_loop, fill_loop

    def trampoline_cr3_load(self) -> Tuple[Optional[int], Optional[int]]:
        """The trampoline's CR3 load (low copy); (trampoline_phys VA, trampoline size)."""
        syms = self.syms
        if not all(n in syms for n in ("trampoline_start", "trampoline_end", TRAMPOLINE_PHYS,
                                       "idle_pg_table")):
            self.notes.append("no trampoline symbols; __high_start is the first stop with "
                              "Xen's CR3")
            return None, None
        t0 = syms.linked_va("trampoline_start")
        size = syms.linked_va("trampoline_end") - t0
        labels = [a for a in _symbol_addrs(syms) if t0 < a < t0 + size]
        load = find_cr3_load(syms.read_linked(t0, size), t0, syms.offset("idle_pg_table"),
                             mode=32, starts=labels)
        if load is None:
            self.notes.append("the trampoline's CR3 load was not found; __high_start is the "
                              "first stop with Xen's CR3")
        else:
            after = _next_insn(syms, load, 32)
            self.add(TRAMPOLINE_CR3, LOW, after, "just after the trampoline loaded CR3 = B + "
                     "offset(idle_pg_table), paging still off", low_offset=after - t0)
        return syms.linked_va(TRAMPOLINE_PHYS), size


def read_trampoline_phys(mem, xen) -> Optional[int]:
    """Where trampoline_setup copied the trampoline (the u64 ``trampoline_phys`` at its
    PA), or None: no such symbol, unreadable, or not chosen yet (0, or not a page)."""
    if TRAMPOLINE_PHYS not in xen.syms:
        return None
    try:
        value = int.from_bytes(mem.read_phys(xen.pa(TRAMPOLINE_PHYS), 8), "little")
    except GdbextError:
        return None
    return value if value and value % x86.PAGE_SIZE == 0 else None


_PLAN_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def plan_for(syms) -> StopPlan:
    """build_plan(syms), made once per loaded xen-syms (the plan is only read)."""
    plan = _PLAN_CACHE.get(syms)
    if plan is None:
        plan = _PLAN_CACHE[syms] = build_plan(syms)
    return plan


def _efi_start_code(syms) -> Tuple[int, bytes]:
    """efi_start's linked VA and bytes (to the next symbol: xen.efi's ELF has no sizes)."""
    va = syms.linked_va(EFI_START)
    size = syms.lookup(EFI_START).size or (_next_symbol_va(syms, va) - va)
    return va, syms.read_linked(va, size)


def build_efi_plan(syms) -> StopPlan:
    """The stop plan of xen.efi started by the firmware (symbols of xen.efi's own layout:
    its ELF twin), from the symbols and efi_start's decoded code: the entry; the last
    call of efi_arch_relocate_image (delta XEN_VIRT_START - B, after ExitBootServices:
    the self-relocation; an earlier call with delta 0 changes none of the relocated
    qwords) and its return; just after the ``mov %reg,%cr3`` that follows it (Xen's
    idle_pg_table); __start_xen."""
    for needed in (EFI_START, START_XEN):
        if needed not in syms:
            raise GdbextError(f"{syms.path}: no {needed} symbol: not the symbols of xen.efi")
    if not hasattr(syms, "read_linked"):
        raise GdbextError(f"{syms.path} is an nm-format map: the stop plan of xen.efi's path "
                          "decodes efi_start's code; load xen.efi's ELF twin (xen-*.efi.elf)")
    b = _PlanBuilder(syms)
    entry_va, code = _efi_start_code(syms)
    b.add(EFI_START, LOAD, entry_va, "xen.efi's PE entry: the firmware's tables; static "
          "pointers hold load addresses (the firmware applied the base relocations)")
    relocate_va = syms.linked_va(EFI_RELOCATE_IMAGE) if EFI_RELOCATE_IMAGE in syms else None
    insns = list(x86decode.iter_decode(code, entry_va, 64))
    calls = [i for i in insns if relocate_va is not None and i.is_call
             and i.branch_target == relocate_va]
    if not calls:
        b.notes.append(f"no direct call of {EFI_RELOCATE_IMAGE} in {EFI_START}: no stops at "
                       "the self-relocation")
    else:
        b.add(EFI_SELF_RELOCATE, LOAD, calls[-1].address,
              f"the call of {EFI_RELOCATE_IMAGE}(XEN_VIRT_START - B), after ExitBootServices")
        b.add(EFI_RELOCATED, LOAD, calls[-1].next_address,
              "back from the self-relocation: static pointers hold linked VAs again, the "
              "boot tables' entries link + B")
    after = calls[-1].address if calls else entry_va
    load = next((i for i in insns if i.address > after and x86decode.K_MOV_TO_CR3 in i.kinds),
                None)
    if load is None:
        b.notes.append(f"no mov to %cr3 found in {EFI_START} after the self-relocation")
    else:
        b.add(EFI_CR3, LOAD, load.next_address,
              "just after the switch to Xen's own idle_pg_table (still at the load address)")
    b.add(START_XEN, LINKED, syms.linked_va(START_XEN), "Xen's C entry, at its linked address")
    return StopPlan(b.stops, False, None, b.notes, order=EFI_STOP_ORDER)


def build_plan(syms) -> StopPlan:
    """The stop plan of this build, from its symbols and bytes: GRUB's multiboot2+EFI path
    for xen-syms, the firmware's own for xen.efi's layout (build_efi_plan)."""
    if getattr(syms, "efi_layout", False):
        return build_efi_plan(syms)
    for needed in (ENTRY, EFI_MB2, SWITCH, TRAMPOLINE_SETUP):
        if needed not in syms:
            raise GdbextError(f"{syms.path}: no {needed} symbol: not a multiboot2+EFI x86 Xen "
                              "(xen-mb2-break needs xen-syms of such a build)")
    b = _PlanBuilder(syms)
    merge = b.entry_and_call()
    b.add(SWITCH, LOAD, syms.linked_va(SWITCH), "leaves long mode; %r15 = where it goes next")
    reloc_loop, fill_loop = b.trampoline_setup()
    tphys, tramp_size = b.trampoline_cr3_load()
    for name, why in ((HIGH_START, "first code at the linked address"),
                      (START_XEN, "Xen's C entry")):
        if name in syms:
            b.add(name, LINKED, syms.linked_va(name), why)
    return StopPlan(b.stops, merge is not None, merge, b.notes, tphys, tramp_size,
                    reloc_loop, fill_loop)


# -- where RIP is --------------------------------------------------------------------

def where_in_boot(syms, load_base: Optional[int], rip: int,
                  trampoline_phys: Optional[int] = None) -> Optional[str]:
    """The known stretch of boot code ``rip`` is in, or None.

    At the load address (B + offset): "__efi64_mb2_start", "x86_32_switch"
    (with cs32_switch), "trampoline_setup" (with the helpers it calls: reloc,
    cmdline_parse_early), other head.S labels by their own name (e.g.
    "__start", "trampoline_bios_setup"), and any other image code as
    "efi_multiboot2" (the only C code that runs at the load address on this
    path).  In the trampoline's low copy (``trampoline_phys`` given):
    "trampoline".  At linked VAs: "__high_start" (x86_64.S up to the call),
    "__start_xen", "efi_multiboot2" for the EFI boot code (RFC builds call it
    there), and anything else in the image as "after __start_xen".  For xen.efi's
    layout (the firmware started it) the code at the load address is "efi_start"
    (the EFI boot code it runs before __start_xen).
    """
    if trampoline_phys is not None and "trampoline_start" in syms and "trampoline_end" in syms:
        size = syms.linked_va("trampoline_end") - syms.linked_va("trampoline_start")
        if trampoline_phys <= rip < trampoline_phys + size:
            return "trampoline"
    if syms.in_image(rip):
        return _linked_stretch(syms, rip)
    if load_base is not None:
        va = syms.virt_start + (rip - load_base)
        if rip >= load_base and syms.in_image(va):
            return _load_stretch(syms, va)
    return None


def _load_stretch(syms, va: int) -> str:
    if getattr(syms, "efi_layout", False):
        return EFI_START
    hit = syms.symbol_at(va)
    sym = syms.lookup(hit[0]) if hit else None
    if sym is None or not (sym.file or "").endswith("head.o"):
        return EFI_MB2
    label = sym.name
    if label == "cs32_switch":  # x86_32_switch's second half, in 32-bit mode
        return SWITCH
    if TRAMPOLINE_SETUP in syms and va >= syms.linked_va(TRAMPOLINE_SETUP):
        # reloc / cmdline_parse_early follow trampoline_setup and are called by it.
        return TRAMPOLINE_SETUP
    return label


def _linked_stretch(syms, va: int) -> str:
    if START_XEN in syms:
        sx = syms.lookup(START_XEN)
        if sx.value <= va < sx.value + (sx.size or 1):
            return START_XEN
    if HIGH_START in syms:
        hs = syms.linked_va(HIGH_START)
        if hs <= va < _next_symbol_va(syms, hs):
            return HIGH_START
    hit = syms.symbol_at(va)
    if hit is not None:
        sym = syms.lookup(hit[0])
        if sym.name == EFI_MB2 or (sym.file or "").startswith("common/efi/") or \
                sym.name.startswith("efi_arch_"):
            return EFI_MB2
    return AFTER_START_XEN


def past_high_start(syms, rip: int) -> bool:
    """RIP is in __high_start or later (not the RFC's efi_multiboot2 at its linked VA)."""
    return where_in_boot(syms, None, rip) in (HIGH_START, START_XEN, AFTER_START_XEN)


def stop_at(plan: StopPlan, load_base: Optional[int], rip: int,
            trampoline_phys: Optional[int] = None) -> Optional[BootStop]:
    """The planned stop whose address is ``rip``, if any."""
    for s in plan.stops:
        if s.address(load_base, trampoline_phys) == rip:
            return s
    return None


# -- what changed between two stops ---------------------------------------------------


@dataclass(frozen=True)
class TablesSnapshot:
    """CR3, the root table it names, and Xen's boot tables, as read at one stop."""
    cr3: int
    root: Optional[Tuple[int, ...]]        # 512 qwords at CR3 & ~0xfff (None: unreadable)
    boot: Mapping[str, Tuple[int, ...]]    # table name -> its qwords in guest memory


def diff_snapshots(old: Optional[TablesSnapshot], new: TablesSnapshot) -> Dict[str, object]:
    """What changed in CR3 and the tables since ``old`` (None: the first stop).

    ``l4_changed``: indices whose entry differs between the old root and the new
    one (also across a CR3 switch: what the new root changes for the CPU).
    ``boot_changed``: per Xen boot table, the count of qwords that changed
    (e.g. trampoline_setup relocating them); ``boot_qwords_changed`` their sum.
    """
    out: Dict[str, object] = {"cr3_old": None if old is None else old.cr3,
                              "cr3_new": new.cr3,
                              "cr3_changed": old is not None and old.cr3 != new.cr3,
                              "l4_changed": [], "boot_changed": {}, "boot_qwords_changed": 0}
    if old is None:
        return out
    if old.root is not None and new.root is not None:
        out["l4_changed"] = [i for i, (a, b) in enumerate(zip(old.root, new.root)) if a != b]
    per: Dict[str, int] = {}
    for name, qwords in new.boot.items():
        before = old.boot.get(name)
        if before is None:
            continue
        n = sum(1 for a, b in zip(before, qwords) if a != b)
        if n:
            per[name] = n
    out["boot_changed"] = per
    out["boot_qwords_changed"] = sum(per.values())
    return out


# -- text ------------------------------------------------------------------------------

_U32 = 0xFFFF_FFFF  # %esi: trampoline_setup is 32-bit code
# How many changed L4 indices a report line lists before "...".
_L4_SHOWN = 8


def changes_text(changes: Mapping[str, object]) -> str:
    """One line: CR3 old -> new, the L4 entries that differ, Xen's boot tables."""
    old, new = changes.get("cr3_old"), changes.get("cr3_new")
    if old is None:
        cr3 = f"CR3 {new:#x}"
    elif changes.get("cr3_changed"):
        cr3 = f"CR3 {old:#x} -> {new:#x}"
    else:
        cr3 = f"CR3 {new:#x} (unchanged)"
    if old is None:
        return cr3 + " (first stop)"
    l4 = list(changes.get("l4_changed") or [])
    if l4:
        shown = ", ".join(str(i) for i in l4[:_L4_SHOWN]) + (" ..." if len(l4) > _L4_SHOWN else "")
        l4_text = f"L4 entries changed: {len(l4)} ({shown})"
    else:
        l4_text = "L4: no entry changed"
    per = dict(changes.get("boot_changed") or {})
    if per:
        boot = (f"Xen's boot tables: {changes.get('boot_qwords_changed')} qwords changed ("
                + ", ".join(f"{k} {v}" for k, v in per.items()) + ")")
    else:
        boot = "Xen's boot tables: unchanged"
    return f"{cr3}; {l4_text}; {boot}"


def record_text(record: Mapping[str, object], number: int, total: int,
                load_base: Optional[int]) -> str:
    """The short report printed at one stop."""
    base = f", B {load_base:#x}" if load_base is not None else ""
    lines = [f"xen-mb2-break: [{number}/{total}] {record['stop']}: RIP {record['rip']:#x} = "
             f"{record['symbol']}{base}",
             f"  {changes_text(record['changes'])}"]
    regs = record.get("registers") or {}
    if "r15" in regs:
        lines.append(f"  %r15 {regs['r15']:#x}: where x86_32_switch goes next")
    if "rsi" in regs and record["stop"] == TRAMPOLINE_SETUP:
        esi = regs["rsi"] & _U32
        ok = "== B" if load_base is not None and esi == load_base else "!= B"
        lines.append(f"  %esi {esi:#x} {ok}")
    checks = list(record.get("checks") or [])
    if checks:
        for c in checks:
            lines.append(f"  {c.get('id', '?'):<4} {c.get('status', '?'):<4} "
                         f"{c.get('summary', '')}")
    elif record.get("error") or record.get("note"):
        lines.append(f"  checks: {record.get('error') or record.get('note')}")
    else:
        lines.append("  checks: none apply here")
    return "\n".join(lines)


def summary_text(result: Mapping[str, object]) -> str:
    """The --batch summary: one row per stop reached, then the verdict."""
    from tabulate import tabulate

    rows = []
    for r in result.get("stops") or []:
        counts = r.get("counts") or {}
        failed = [c["id"] for c in r.get("checks") or [] if c["status"] == FAIL]
        cr3 = f"{r['cr3']:#x}" if r.get("cr3") is not None else "-"
        rows.append([r["stop"], f"{r['rip']:#x}", cr3]
                    + [counts.get(s, 0) for s in STATUSES] + [", ".join(failed)])
    table = tabulate(rows, headers=["stop", "RIP", "CR3", *STATUSES, "failed"],
                     tablefmt="simple", disable_numparse=True)
    c = result.get("counts") or {}
    verdict = (f"{'complete' if result.get('complete') else 'incomplete'}: "
               f"{len(result.get('reached') or [])} stops, "
               + ", ".join(f"{c.get(s, 0)} {s}" for s in STATUSES))
    crash = result.get("crash")
    if crash:
        verdict += (f"; {crash.get('summary')}"
                    + (f" (after {crash['after']})" if crash.get("after") else ""))
    elif result.get("error"):
        verdict += f"; error: {result['error']}"
    notes = [f"note: {n}" for n in result.get("notes") or []]
    return "\n".join([table] + notes + [verdict])
