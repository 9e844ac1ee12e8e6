"""The checks I0-I13 of the RFC's merged L4 (``xen-boot-paging.md``): each a
named function over ``CheckInputs``, registered in ``CHECK_TABLE`` under its
id.  Never imports ``gdb``.

``run_checks()`` evaluates them on a ``MergeState`` (guest memory or a
``merge_predict.Prediction``'s overlay, the registers, the firmware's L4, M)
and returns ``CheckResult`` objects: PASS / FAIL / WARN / SKIP with a reason,
evidence (ints stay ints), and the reviewer's point each one answers.

A check raises ``_Skip`` when an input it needs is missing; memory that cannot
be read makes it FAIL naming the address; a ``GdbextError`` (e.g. a build
without a symbol it needs) makes it SKIP.  Titles, reviewers and the checks that
apply at each stop are in ``merge_catalog``; the JSON and text forms of the
results in ``merge_report``.
"""

from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from . import piccheck, stopnames, x86
from .bootstops import CALL_RAX
from .errors import GdbextError, MemoryReadError
from .memory import PageCache, PhysMemory, qwords
from .merge_catalog import (CHECKS, FAIL, PASS, SKIP, WARN, CheckInfo, CheckResult, result,
                            select)
from .merge_predict import (CALL_TARGET, ENTRIES, FILL_FLAGS, FILL_XENMAP, L4_HALF, entry_name,
                            fill_slots)
from .multiboot2 import MbiInfo, parse_mbi
from .paging import (ATTR_NX, ATTR_W, MODE_4LEVEL, Decoder, PagingContext, Walk,
                     enumerate_ranges, read_table, walk)
from .xenimage import (ABSOLUTE, FOREIGN, IDLE_L4, NOT_PRESENT, RELOCATED, RELOCATED_TWICE,
                       UNRELOCATED, LoadedXen)
from .xensyms import PAGE_TABLES_END_SYMBOL, PAGE_TABLES_START_SYMBOL, XEN_PHYS_START_SYMBOL

# Where I9 judges the tables even if CR3 is not (yet) idle_pg_table.
I9_STOPS = (stopnames.TABLES_RELOCATED, stopnames.L2_XENMAP_FILLED, stopnames.TRAMPOLINE_CR3)
# The stack the checks require to stay mapped (and writable) below %rsp.
STACK_WINDOW = 64 * 1024
# Bytes of efi_multiboot2 compared with the ELF when the symbol has no size.
CALL_TARGET_BYTES = 64
_GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11",
         "r12", "r13", "r14", "r15", "rip")
_LOW32 = 0xFFFF_FFFF


# --- inputs -----------------------------------------------------------------------------

@dataclass
class MergeState:
    """Everything the checks look at.  Unknown things are None / missing keys:
    the checks that need them SKIP with the reason."""
    syms: object                       # XenSymbols (or a map)
    load_base: int                     # B = PA(__image_base__)
    mem: PhysMemory                    # guest memory, or a Prediction's overlay
    regs: Dict[str, int] = field(default_factory=dict)  # cr0 cr3 cr4 efer rip rsp rax rbx ...
    firmware_root: Optional[int] = None  # F: the firmware L4's PA (CR3 at entry, masked)
    firmware_cr3: Optional[int] = None   # CR3 at entry as is (I0 checks its low bits)
    firmware_l4: Optional[bytes] = None  # F's 4096 bytes captured at __efi64_mb2_start
    merged_root: Optional[int] = None    # M's PA
    stop: Optional[str] = None           # bootstops name, or None
    maxphyaddr: int = x86.MAXPHYADDR_ARCH
    mbi: Optional[MbiInfo] = None        # parsed from %rbx when None and rbx is known


# --- judging Xen's pointers ------------------------------------------------------------

_GOOD = (RELOCATED, ABSOLUTE)
# A pointer without a link value (written at run time) that leaves the image.
OUTSIDE_IMAGE = "outside-image"
# I9: the address is link + B but the flags are not the link value's.
FLAGS_DIFFER = "flags-differ"


class _Skip(Exception):
    """Raised inside a check: SKIP with this reason."""


@dataclass
class PointerFault:
    """A bad pointer found while following Xen's tables (for FAIL evidence)."""
    where: str            # "M[261]", "l3_xenmap[321]"
    entry_pa: int
    found: int
    target_pa: int
    kind: str             # xenimage class, or OUTSIDE_IMAGE
    expected_pa: Optional[int]
    target_name: Optional[str]   # the Xen table the pointer should reach

    def text(self) -> str:
        what = self.target_name or "its target"
        if self.kind == UNRELOCATED:
            why = f"unrelocated: the link-time address of {what} (B not added)"
        elif self.kind == RELOCATED_TWICE:
            why = f"relocated-twice: {what} with B added twice"
        elif self.kind == FOREIGN:
            why = f"foreign: neither {what}'s link value, nor link + B, nor link + 2B"
        elif self.kind == OUTSIDE_IMAGE:
            why = f"{OUTSIDE_IMAGE}: a run-time pointer outside Xen's loaded image"
        else:
            why = self.kind
        exp = f"; expected {self.expected_pa:#x} ({what})" if self.expected_pa is not None else ""
        return f"{self.where} = {self.found:#x} -> {self.target_pa:#x}: {why}{exp}"

    def as_dict(self) -> Dict[str, object]:
        return {"where": self.where, "entry_pa": self.entry_pa, "found": self.found,
                "target_pa": self.target_pa, "kind": self.kind,
                "expected_pa": self.expected_pa, "target_name": self.target_name}


class CheckInputs:
    """What every check reads, made once per run: the state, Xen loaded at B,
    guest memory behind a page cache, the paging context M and F are walked
    with, and the helpers that SKIP (``_Skip``) when an input is missing.
    The upper-half tree and the MBI are computed once and shared by the checks."""

    def __init__(self, state: MergeState):
        self.state = state
        self.syms = state.syms
        self.xen = LoadedXen(state.syms, state.load_base)
        mem = state.mem
        self.mem = mem if isinstance(mem, PageCache) else PageCache(mem)
        self.regs = {k.lower(): v for k, v in state.regs.items()}
        self.addr_mask = x86.phys_addr_mask(state.maxphyaddr)
        cr0, cr4, efer = (self.regs.get(r) for r in ("cr0", "cr4", "efer"))
        # M and F are 4-level tables whatever the CPU is doing at this stop;
        # NXE and WP come from the registers when known.
        self.paging = PagingContext(
            MODE_4LEVEL, nxe=bool(efer & x86.EFER_NXE) if efer is not None else True,
            pke=bool(cr4 & x86.CR4_PKE) if cr4 is not None else False,
            maxphyaddr=state.maxphyaddr,
            wp=bool(cr0 & x86.CR0_WP) if cr0 is not None else True)
        self.decoder = Decoder(self.paging)
        self.root = state.merged_root
        self.froot = state.firmware_root
        if self.froot is None and state.firmware_cr3 is not None:
            self.froot = state.firmware_cr3 & self.addr_mask
        self._mbi: Optional[MbiInfo] = state.mbi
        self._mbi_error: Optional[str] = None
        self._upper: Optional[Tuple[List[PointerFault], int, List[Tuple[int, int]]]] = None

    # -- inputs ----------------------------------------------------------------------

    def need_root(self) -> int:
        if self.root is None:
            raise _Skip("no merged table: predict one, or give --table ADDR on a patched build")
        return self.root

    def need_froot(self) -> int:
        if self.froot is None:
            raise _Skip("the firmware's L4 is unknown (capture CR3 at __efi64_mb2_start)")
        return self.froot

    def need_regs(self, *names: str) -> List[int]:
        missing = [n for n in names if n not in self.regs]
        if missing:
            raise _Skip(f"registers not known here: {', '.join(missing)}")
        return [self.regs[n] for n in names]

    def table(self, pa: int) -> Tuple[int, ...]:
        return read_table(MODE_4LEVEL, self.mem, pa, 4)[1]

    def m_entries(self) -> Tuple[int, ...]:
        return self.table(self.need_root())

    def f_captured(self) -> Tuple[int, ...]:
        if self.state.firmware_l4 is not None:
            return qwords(self.state.firmware_l4[:x86.PAGE_SIZE])
        return self.table(self.need_froot())

    def mbi(self) -> Optional[MbiInfo]:
        if self._mbi is None and self._mbi_error is None:
            rbx = self.regs.get("rbx")
            if rbx is None:
                self._mbi_error = "%rbx not known"
            else:
                try:
                    self._mbi = parse_mbi(self.mem, rbx & _LOW32)
                except GdbextError as err:
                    self._mbi_error = str(err)
        return self._mbi

    def walk(self, root: int, va: int) -> Walk:
        return walk(self.paging, self.mem, root, va, self.decoder)

    def image_name(self, pa: int) -> Optional[str]:
        return self.xen.name_pa(pa)

    # -- judging Xen's pointers -----------------------------------------------------

    def judge(self, table_pa: int, index: int, found: int, level: int) -> Optional[PointerFault]:
        """A pointer (present non-leaf entry) of M's upper half or a Xen table,
        judged against its link value; None when it is right."""
        target = found & self.addr_mask
        if table_pa == self.root and level == 4:
            name, idx = IDLE_L4, index
            where = f"M[{index}]"
        else:
            hit = self.xen.table_at(table_pa + 8 * index)
            if hit is None:
                if self.xen.in_image(target):
                    return None
                return PointerFault(entry_name(self.xen, table_pa + 8 * index, -1)
                                    or f"{table_pa + 8 * index:#x}", table_pa + 8 * index,
                                    found, target, OUTSIDE_IMAGE, None, None)
            name, _level, off = hit
            idx = off // 8
            where = f"{name}[{idx}]"
        v = self.xen.judge_entry(name, idx, found, self.addr_mask)
        link_target = v.link & self.addr_mask if v.link & x86.PTE_P else 0
        if v.kind in _GOOD:
            return None
        if v.kind == FOREIGN and not link_target:
            # Written at run time (no link value): only "inside the image" can be said.
            if self.xen.in_image(target):
                return None
            return PointerFault(where, table_pa + 8 * index, found, target, OUTSIDE_IMAGE,
                                None, None)
        expected = v.expected_pa if link_target else None
        tname = self.image_name(expected) if expected is not None else None
        return PointerFault(where, table_pa + 8 * index, found, target, v.kind, expected, tname)

    def upper_tree(self) -> Tuple[List[PointerFault], int, List[Tuple[int, int]]]:
        """Follow every present pointer of M[256..511] and below, descending only
        into tables inside the loaded image: (faults, pointers seen, tables)."""
        if self._upper is not None:
            return self._upper
        root = self.need_root()
        faults: List[PointerFault] = []
        seen = 0
        tables: List[Tuple[int, int]] = []
        done = set()
        stack: List[Tuple[int, int, int]] = [(root, 4, L4_HALF)]
        while stack:
            table_pa, level, first = stack.pop()
            if (table_pa, level) in done:
                continue
            done.add((table_pa, level))
            tables.append((table_pa, level))
            ents = self.table(table_pa)   # unreadable: the check FAILs naming it
            for idx in range(first, ENTRIES):
                raw = ents[idx]
                if not raw & x86.PTE_P:
                    continue
                info = self.decoder.decode(level, raw)
                if info.leaf:
                    continue
                seen += 1
                fault = self.judge(table_pa, idx, raw, level)
                if fault is not None:
                    faults.append(fault)
                    continue
                if self.xen.in_image(info.addr):
                    stack.append((info.addr, level - 1, 0))
        self._upper = (faults, seen, tables)
        return self._upper

    def explain_walk(self, w: Walk) -> Optional[PointerFault]:
        """The first entry on a walk from M that leaves Xen's tables, if any."""
        for step in w.steps:
            if step.table_pa == self.root and step.level == 4 and step.index < L4_HALF:
                return None  # the firmware's half: not Xen's to judge
            e = step.entry
            if not e.present or e.leaf:
                return None
            fault = self.judge(step.table_pa, step.index, e.raw, step.level)
            if fault is not None:
                return fault
        return None


# --- the checks ---------------------------------------------------------------------------

def check_paging_mode(inp: CheckInputs) -> CheckResult:
    """I0: 4-level long mode (PG, PAE, LMA; no LA57), and no low bits in CR3 nor in the
    firmware's CR3 the merge copies from."""
    cr0, cr3, cr4, efer = inp.need_regs("cr0", "cr3", "cr4", "efer")
    bad = []
    if not cr0 & x86.CR0_PG:
        bad.append("CR0.PG=0")
    if not cr4 & x86.CR4_PAE:
        bad.append("CR4.PAE=0")
    if cr4 & x86.CR4_LA57:
        bad.append("CR4.LA57=1 (5-level paging: an L4 merge does not apply)")
    if not efer & x86.EFER_LMA:
        bad.append("EFER.LMA=0")
    if cr3 & x86.CR3_FLAGS_MASK:
        bad.append(f"CR3 low bits {cr3 & x86.CR3_FLAGS_MASK:#x} set")
    fcr3 = inp.state.firmware_cr3
    if fcr3 is not None and fcr3 & x86.CR3_FLAGS_MASK:
        bad.append(f"the firmware's CR3 {fcr3:#x} has low bits set: mov %cr3,%rsi copies "
                   "from the wrong address")
    ev = {"cr0": cr0, "cr3": cr3, "cr4": cr4, "efer": efer}
    if fcr3 is not None:
        ev["firmware_cr3"] = fcr3
    if bad:
        return result("I0", FAIL, "; ".join(bad), ev)
    return result("I0", PASS, "4-level long mode, CR3 low 12 bits clear", ev)


def check_lower_half_copied(inp: CheckInputs) -> CheckResult:
    """I1: M[0..255] equals the firmware's L4, and the firmware has not changed its
    L4 since it was captured."""
    m = inp.m_entries()
    f = inp.f_captured()
    diff = [i for i in range(L4_HALF) if not LoadedXen.same_entry(m[i], f[i])]
    ev: Dict[str, object] = {"table": inp.root, "firmware_root": inp.froot,
                             "captured": inp.state.firmware_l4 is not None}
    problems = []
    if diff:
        ev["differ"] = [{"slot": i, "merged": m[i], "firmware": f[i]} for i in diff[:16]]
        problems.append(f"M[{diff[0]}] = {m[diff[0]]:#x} but the firmware's L4 has "
                        f"{f[diff[0]]:#x} ({len(diff)} slot(s) of 0..255 differ)")
    if inp.state.firmware_l4 is not None and inp.froot is not None:
        now = inp.table(inp.froot)
        changed = [i for i in range(ENTRIES) if not LoadedXen.same_entry(now[i], f[i])]
        if changed:
            ev["firmware_changed"] = [{"slot": i, "captured": f[i], "now": now[i]}
                                      for i in changed[:16]]
            problems.append(f"the firmware changed its L4 since the copy (slot "
                            f"{changed[0]}: {f[changed[0]]:#x} -> {now[changed[0]]:#x}): "
                            "M no longer has it")
    if problems:
        return result("I1", FAIL, "; ".join(problems), ev)
    return result("I1", PASS, "M[0..255] equals the firmware's L4"
                  + (" (and the firmware has not changed it since)"
                     if inp.state.firmware_l4 is not None and inp.froot is not None
                     else ""), ev)


def check_firmware_upper_half_empty(inp: CheckInputs) -> CheckResult:
    """I2: the firmware's L4 has nothing in slots 256..511 (the merge drops them)."""
    f = inp.f_captured()
    present = [i for i in range(L4_HALF, ENTRIES) if f[i] & x86.PTE_P]
    ev: Dict[str, object] = {"firmware_root": inp.froot}
    if present:
        ev["present"] = [{"slot": i, "entry": f[i]} for i in present[:16]]
        return result("I2", FAIL, f"the firmware's L4 maps the upper half (slot "
                      f"{present[0]} = {f[present[0]]:#x}, {len(present)} slot(s)): "
                      "the merge drops it", ev)
    return result("I2", PASS, "the firmware's L4 has nothing in slots 256..511", ev)


def check_upper_half_relocated(inp: CheckInputs) -> CheckResult:
    """I3: M[256..511] equal idle_pg_table's link values + B."""
    m = inp.m_entries()
    faults = []
    for i in range(L4_HALF, ENTRIES):
        exp = inp.xen.expected_entry(IDLE_L4, i)
        if LoadedXen.same_entry(m[i], exp):
            continue
        v = inp.xen.judge_entry(IDLE_L4, i, m[i], inp.addr_mask)
        link_target = v.link & inp.addr_mask if v.link & x86.PTE_P else None
        tname = inp.image_name(v.expected_pa) if link_target else None
        faults.append(PointerFault(f"M[{i}]", inp.root + 8 * i, m[i], v.target_pa,
                                   v.kind, v.expected_pa if link_target else None, tname))
    ev: Dict[str, object] = {"table": inp.root, "load_base": inp.state.load_base}
    if faults:
        ev["faults"] = [f.as_dict() for f in faults[:16]]
        ev["kinds"] = _kind_counts(faults)
        return result("I3", FAIL, f"{faults[0].text()}"
                      + (f" (+{len(faults) - 1} more)" if len(faults) > 1 else ""), ev)
    present = sum(1 for i in range(L4_HALF, ENTRIES) if m[i] & x86.PTE_P)
    ev["present"] = present
    return result("I3", PASS, f"M[256..511] == idle_pg_table + B ({present} present)", ev)


def check_upper_half_pointers(inp: CheckInputs) -> CheckResult:
    """I4: every pointer under M[256..511] reaches Xen's tables in the loaded image,
    relocated once."""
    faults, seen, tables = inp.upper_tree()
    ev: Dict[str, object] = {"pointers": seen, "tables": len(tables),
                             "image_pa_start": inp.xen.image_pa_start,
                             "image_pa_end": inp.xen.image_pa_end}
    if faults:
        ev["faults"] = [f.as_dict() for f in faults[:16]]
        ev["kinds"] = _kind_counts(faults)
        return result("I4", FAIL, f"{faults[0].text()}"
                      + (f" (+{len(faults) - 1} more)" if len(faults) > 1 else ""), ev)
    return result("I4", PASS, f"all {seen} pointers under M[256..511] reach Xen's tables "
                  "in the loaded image, relocated once", ev)


def check_l2_xenmap_fill(inp: CheckInputs) -> CheckResult:
    """I5: l2_xenmap's slots over the image map B + slot * 2 MiB, PSE+RWX."""
    b = inp.state.load_base
    first, last, _pte = fill_slots(inp.xen)[FILL_XENMAP]
    base = inp.xen.pa(FILL_XENMAP)
    ents = inp.table(base)
    bad = []
    problems = []
    if b % x86.SIZE_2M:
        problems.append(f"load base {b:#x} is not 2 MiB aligned")
    for slot in range(first, last + 1):
        exp = (b + slot * x86.SIZE_2M) | FILL_FLAGS
        found = ents[slot]
        info = inp.decoder.decode(2, found)
        if not LoadedXen.same_entry(found, exp) or info.reserved:
            bad.append({"slot": slot, "entry_pa": base + 8 * slot, "found": found,
                        "expected": exp, "reserved": info.reserved})
    ev: Dict[str, object] = {"first_slot": first, "last_slot": last, "load_base": b,
                             "table_pa": base}
    if bad:
        ev["bad"] = bad
        e = bad[0]
        if e["reserved"]:
            problems.append(f"l2_xenmap[{e['slot']}] = {e['found']:#x} has reserved or "
                            f"above-MAXPHYADDR bits {e['reserved']:#x}")
        else:
            problems.append(f"l2_xenmap[{e['slot']}] = {e['found']:#x}, expected "
                            f"{e['expected']:#x} (B + {e['slot']} * 2 MiB | PSE+RWX)"
                            + (f"; {len(bad)} slot(s) wrong" if len(bad) > 1 else ""))
    if problems:
        return result("I5", FAIL, "; ".join(problems), ev)
    return result("I5", PASS, f"l2_xenmap[{first}..{last}] map B + slot * 2 MiB", ev)


def check_call_target_reachable(inp: CheckInputs) -> CheckResult:
    """I6: efi_multiboot2's linked VA translates through M to B + offset, its bytes
    there are the ELF's, [_start, _end) maps B + offset, and the registers agree
    at the call."""
    root = inp.need_root()
    name = CALL_TARGET
    sym = inp.syms.lookup(name)
    va = sym.value
    size = sym.size or CALL_TARGET_BYTES
    expected_pa = inp.xen.pa(name)
    ev: Dict[str, object] = {"symbol": name, "linked_va": va, "expected_pa": expected_pa,
                             "table": root}
    problems: List[str] = []
    w = inp.walk(root, va)
    ev["walk"] = [{"level": s.level, "table": s.table_pa, "index": s.index,
                   "entry": s.entry.raw} for s in w.steps]
    fault = inp.explain_walk(w)
    if fault is not None:
        ev["fault"] = fault.as_dict()
        problems.append(f"{name} at {va:#x} cannot be reached: {fault.text()}")
    elif not w.mapped:
        problems.append(f"{name} at {va:#x} is not mapped: L{w.fault_level}: {w.fault}")
    else:
        ev["pa"] = w.pa
        if w.pa != expected_pa:
            problems.append(f"{name} at {va:#x} translates to {w.pa:#x}, not B + offset "
                            f"= {expected_pa:#x}")
        elif w.nx:
            problems.append(f"{name} at {va:#x} is mapped NX")
        else:
            problems.extend(_compare_bytes(inp, root, va, size, ev))
            if not problems:
                problems.extend(_image_ranges(inp, root, ev))
    problems.extend(_call_registers(inp, va, ev))
    if problems:
        return result("I6", FAIL, "; ".join(problems), ev)
    return result("I6", PASS, f"{name}'s linked VA {va:#x} -> {expected_pa:#x} "
                  f"(B + offset), {ev.get('bytes_compared', 0)} bytes equal the ELF's, "
                  f"[_start, _end) maps B + offset", ev)


def _compare_bytes(inp: CheckInputs, root: int, va: int, size: int,
                   ev: Dict[str, object]) -> List[str]:
    """I6: the bytes at efi_multiboot2's translated address equal the ELF's."""
    want = inp.syms.read_linked(va, size)
    got = bytearray()
    cur = va
    while cur < va + size:
        w = inp.walk(root, cur)
        if not w.mapped:
            return [f"{cur:#x} (inside {CALL_TARGET}) is not mapped"]
        chunk = min(va + size - cur, x86.PAGE_SIZE - (cur & (x86.PAGE_SIZE - 1)))
        try:
            got += inp.mem.read_phys(w.pa, chunk)
        except MemoryReadError as err:
            return [f"the bytes of {CALL_TARGET} at {w.pa:#x} cannot be read ({err})"]
        cur += chunk
    ev["bytes_compared"] = size
    if bytes(got) != want:
        first = next(i for i in range(size) if got[i] != want[i])
        ev["first_difference"] = first
        ev["found_bytes"] = bytes(got[first:first + 16]).hex()
        ev["elf_bytes"] = want[first:first + 16].hex()
        return [f"the bytes at {CALL_TARGET}'s translated address differ from the ELF's "
                f"at +{first:#x} ({bytes(got[first:first + 8]).hex()} != "
                f"{want[first:first + 8].hex()})"]
    return []


def _image_ranges(inp: CheckInputs, root: int, ev: Dict[str, object]) -> List[str]:
    """Every VA of [_start, _end) maps B + offset (one enumeration)."""
    lo, hi = inp.syms.image_start, inp.syms.image_end
    en = enumerate_ranges(inp.paging, inp.mem, root, lo=lo, hi=hi)
    cur = lo
    for va, end, pa, _size, _attrs in en.ranges:
        if va > cur:
            break
        want = inp.xen.pa(va) if inp.syms.in_image(va) else None
        if want is None or pa != want:
            ev["image_mismatch"] = {"va": va, "pa": pa, "expected_pa": want}
            return [f"[_start, _end) is not all B + offset: {va:#x} -> {pa:#x}"]
        cur = max(cur, end)
    if cur < hi:
        ev["image_unmapped"] = cur
        return [f"[_start, _end) is not all mapped: {cur:#x} is not"]
    ev["image_ranges"] = len(en.ranges)
    return []


def _call_registers(inp: CheckInputs, va: int, ev: Dict[str, object]) -> List[str]:
    """At the call: %rax == the linked VA (when the call is ``call *%rax``);
    at efi_multiboot2: where RIP is."""
    stop = inp.state.stop
    rip = inp.regs.get("rip")
    if stop == stopnames.CALL and rip is not None and "cr3" in inp.regs:
        try:
            code = _code_at(inp, inp.regs["cr3"] & inp.addr_mask, rip, 2)
        except (MemoryReadError, GdbextError) as err:
            ev["call"] = f"instruction at RIP unreadable ({err})"
            return []
        if code == CALL_RAX:
            rax = inp.regs.get("rax")
            ev["rax"] = rax
            if rax != va:
                return [f"%rax = {rax:#x} at call *%rax, not {CALL_TARGET}'s linked VA "
                        f"{va:#x}" if rax is not None else "%rax not known at call *%rax"]
            ev["call"] = "call *%rax with %rax == the linked VA"
        else:
            ev["call"] = f"not call *%rax at RIP ({code.hex()}): %rax not checked"
    elif stop == stopnames.EFI_MB2 and rip is not None:
        ev["rip"] = rip
        if rip == va:
            ev["running_at"] = "linked VA"
        elif rip == inp.xen.pa(CALL_TARGET):
            ev["running_at"] = "load address"
        else:
            return [f"RIP {rip:#x} is neither {CALL_TARGET}'s linked VA nor its load address"]
    return []


def _code_at(inp: CheckInputs, cr3_root: int, va: int, n: int) -> bytes:
    w = inp.walk(cr3_root, va)
    if not w.mapped:
        raise GdbextError(f"RIP {va:#x} not mapped")
    return inp.mem.read_phys(w.pa, n)


def check_identity_kept(inp: CheckInputs) -> CheckResult:
    """I7: M maps the code at RIP, the stack, the MBI, the EFI tables and the GDT/IDT
    as the firmware does."""
    root = inp.need_root()
    froot = inp.need_froot()
    items: List[Tuple[str, int, int, bool]] = []
    not_checked: List[str] = []
    rip, rsp = inp.regs.get("rip"), inp.regs.get("rsp")
    half = 1 << (MODE_4LEVEL.va_bits - 1)
    if rip is None:
        not_checked.append("rip (unknown)")
    elif rip >= half:
        not_checked.append("rip (a linked VA: not the identity map)")
    else:
        items.append(("rip", rip, x86.PAGE_SIZE, False))
    if rsp is None:
        not_checked.append("stack (%rsp unknown)")
    else:
        items.append(("stack", max(0, rsp - STACK_WINDOW), STACK_WINDOW + 8, True))
    mbi = inp.mbi()
    if mbi is None:
        not_checked.append(f"MBI ({inp._mbi_error})")
    else:
        items.append(("mbi", mbi.pa, mbi.total_size, False))
        if mbi.efi64_system_table is not None:
            items.append(("system_table", mbi.efi64_system_table, 8, False))
        if mbi.efi64_image_handle is not None:
            items.append(("image_handle", mbi.efi64_image_handle, 8, False))
    for reg in ("gdtr_base", "idtr_base"):
        if reg in inp.regs:
            items.append((reg[:4], inp.regs[reg], 8, False))
        else:
            not_checked.append(f"{reg[:4]} (base unknown)")
    if not items:
        raise _Skip("nothing to check: " + ", ".join(not_checked))
    problems = []
    checked = []
    for what, start, size, need_w in items:
        page = x86.align_down(start, x86.PAGE_SIZE)
        ok_item = True
        while page < start + size:
            wf = inp.walk(froot, page)
            wm = inp.walk(root, page)
            if not wf.mapped:
                not_checked.append(f"{what} page {page:#x} (the firmware does not map it)")
            elif not wm.mapped:
                problems.append(f"{what}: {page:#x} is mapped by the firmware (-> {wf.pa:#x}) "
                                f"but not by M (L{wm.fault_level}: {wm.fault})")
                ok_item = False
            elif wm.pa != wf.pa:
                problems.append(f"{what}: {page:#x} -> {wm.pa:#x} under M but {wf.pa:#x} "
                                "under the firmware")
                ok_item = False
            elif need_w and inp.paging.wp and not wm.writable:
                problems.append(f"{what}: {page:#x} is not writable under M")
                ok_item = False
            if not ok_item:
                break
            page += x86.PAGE_SIZE
        checked.append({"what": what, "start": start, "size": size, "ok": ok_item})
    ev: Dict[str, object] = {"checked": checked, "not_checked": not_checked}
    if problems:
        return result("I7", FAIL, "; ".join(problems[:3]), ev)
    return result("I7", PASS, "M maps " + ", ".join(c["what"] for c in checked)
                  + " as the firmware does", ev)


def check_image_mapped_rwx(inp: CheckInputs) -> CheckResult:
    """I8: the lower half maps the loaded image identity, present, writable and
    executable."""
    root = inp.root if inp.root is not None else inp.need_froot()
    lo, hi = inp.xen.image_pa_start, inp.xen.image_pa_end
    en = enumerate_ranges(inp.paging, inp.mem, root, lo=lo, hi=hi)
    cur = lo
    problems = []
    rwx = 0
    for va, end, pa, _size, attrs in en.ranges:
        if va > cur:
            problems.append(f"{cur:#x}..{va:#x} of the image is not mapped")
            break
        if pa != va:
            problems.append(f"{va:#x} is not identity-mapped (-> {pa:#x})")
            break
        if attrs & ATTR_NX:
            problems.append(f"{va:#x}..{end:#x} of the image is NX")
            break
        if not attrs & ATTR_W and inp.paging.wp:
            problems.append(f"{va:#x}..{end:#x} of the image is read-only (CR0.WP=1)")
            break
        if attrs & ATTR_W:
            rwx += min(end, hi) - max(va, lo)
        cur = max(cur, end)
    if not problems and cur < hi:
        problems.append(f"{cur:#x}..{hi:#x} of the image is not mapped")
    ev: Dict[str, object] = {"root": root, "image_pa_start": lo, "image_pa_end": hi,
                             "ranges": len(en.ranges), "wp": inp.paging.wp,
                             "rwx_bytes": rwx}
    if problems:
        return result("I8", FAIL, problems[0], ev)
    return result("I8", PASS, "the lower half maps the loaded image identity, present, "
                  "writable, executable" + ("" if inp.paging.wp else
                                            " (CR0.WP=0: RW not enforced)"), ev)


def check_relocated_once(inp: CheckInputs) -> CheckResult:
    """I9: from the trampoline's relocation loop to __start_xen's entry, every entry
    of __page_tables holds its link value + B exactly once."""
    b = inp.state.load_base
    idle = inp.xen.pa(IDLE_L4)
    cr3 = inp.regs.get("cr3")
    stop = inp.state.stop
    ev: Dict[str, object] = {"idle_pg_table": idle, "load_base": b}
    problems = []
    cr3_root = cr3 & inp.addr_mask if cr3 is not None else None
    if stop == stopnames.AFTER_START_XEN:
        # Measured on the 4.17 boot at construct_dom0: l2_xenmap split into
        # 4 KiB tables, idle_pg_table[0] replaced, NX on the directmap slot.
        raise _Skip("Xen rewrites its boot tables once __start_xen runs: I9 judges the "
                    "trampoline's fix-up, from the relocation loop to __start_xen's entry")
    if cr3_root == idle:
        ev["cr3"] = cr3
    elif stop in I9_STOPS:
        ev["cr3"] = cr3
        if stop == stopnames.TRAMPOLINE_CR3 and cr3 is not None:
            problems.append(f"CR3 = {cr3:#x} at the trampoline's CR3 load, not "
                            f"B + offset(idle_pg_table) = {idle:#x}")
    else:
        raise _Skip(f"CR3 {cr3:#x} is not idle_pg_table ({idle:#x}): I9 applies from the "
                    "trampoline's CR3 load" if cr3 is not None else "CR3 not known")
    fps = inp.syms.get(XEN_PHYS_START_SYMBOL)
    if fps is not None:  # trampoline_setup stores %esi there before relocating
        stored = struct.unpack("<Q", inp.mem.read_phys(inp.xen.pa(fps.value), 8))[0]
        ev["xen_phys_start"] = stored
        if stored != b:
            problems.append(f"xen_phys_start = {stored:#x}, not B = {b:#x}")
    kinds: Dict[str, int] = {}
    faults: List[Dict[str, object]] = []
    # At an unnamed stop Xen may have removed entries of its own already:
    # a missing entry is then not a relocation fault.
    strict = stop in I9_STOPS + (stopnames.HIGH_START, stopnames.START_XEN)
    ev["strict"] = strict
    lo = b + inp.syms.offset(PAGE_TABLES_START_SYMBOL)
    hi = b + inp.syms.offset(PAGE_TABLES_END_SYMBOL)
    for page in range(lo, hi, x86.PAGE_SIZE):
        hit = inp.xen.table_at(page)
        if hit is None:
            continue
        name, _lv, off = hit
        found = inp.table(page)
        for i, raw in enumerate(found):
            idx = off // 8 + i
            link = inp.xen.link_entry(name, idx)
            if not link & x86.PTE_P:
                continue  # run-time entries (fills): I5 judges l2_xenmap's
            v = inp.xen.judge_entry(name, idx, raw, inp.addr_mask)
            if v.kind == RELOCATED and not LoadedXen.same_entry(
                    raw, inp.xen.expected_entry(name, idx)):
                v = dataclasses.replace(v, kind=FLAGS_DIFFER)
            kinds[v.kind] = kinds.get(v.kind, 0) + 1
            if v.kind == RELOCATED or (v.kind == NOT_PRESENT and not strict):
                continue
            faults.append(v.as_dict())
    ev["kinds"] = kinds
    if faults:
        ev["faults"] = faults[:16]
        f0 = faults[0]
        problems.append(f"{f0['table']}[{f0['index']}] = {f0['found']:#x}: {f0['kind']} "
                        f"(expected {f0['link'] + b:#x}); {len(faults)} of "
                        f"{sum(kinds.values())} entries not relocated exactly once")
    if problems:
        return result("I9", FAIL, "; ".join(problems), ev)
    return result("I9", PASS, f"{kinds.get(RELOCATED, 0)} entries of __page_tables "
                  "relocated exactly once" + (f", CR3 = {cr3:#x}" if cr3_root == idle else ""),
                  ev)


def check_added_rwx(inp: CheckInputs) -> CheckResult:
    """I10: the RWX leaves the merge adds (the 2 MiB fills, M's upper half): WARN."""
    root = inp.need_root()
    fills = []
    for name, (first, last, _pte) in fill_slots(inp.xen).items():
        base = inp.xen.pa(name)
        n = 0
        for slot in range(first, last + 1):
            raw = struct.unpack("<Q", inp.mem.read_phys(base + 8 * slot, 8))[0]
            if (raw & x86.PTE_P and raw & x86.PTE_PS and raw & x86.PTE_RW
                    and not (raw & x86.PTE_NX and inp.paging.nxe)):
                n += 1
        fills.append({"table": name, "first_slot": first, "last_slot": last, "rwx": n})
    ev: Dict[str, object] = {"fills": fills}
    faults, _seen, _tables = inp.upper_tree()
    added: List[Dict[str, object]] = []
    if faults:
        ev["upper_half"] = "not counted: its pointers leave Xen's tables (see I4)"
    else:
        upper_lo = x86.canonical(1 << (MODE_4LEVEL.va_bits - 1), MODE_4LEVEL.va_bits)
        en = enumerate_ranges(inp.paging, inp.mem, root, lo=upper_lo)
        for va, end, pa, size, attrs in en.ranges:
            if attrs & ATTR_W and not attrs & ATTR_NX:
                added.append({"va": va, "end": end, "pa": pa, "page_size": size,
                              "leaves": (end - va) // size})
        ev["upper_rwx_ranges"] = added[:16]
        ev["upper_rwx_leaves"] = sum(a["leaves"] for a in added)
    fill_rwx = sum(f["rwx"] for f in fills)
    ev["fill_rwx"] = fill_rwx
    if fill_rwx or added:
        return result("I10", WARN, f"the merge adds RWX leaves: {fill_rwx} 2 MiB fill "
                      f"entries (PSE+RWX), {sum(a['leaves'] for a in added)} RWX leaves in "
                      "M's upper half", ev)
    return result("I10", PASS, "the merge adds no RWX leaf", ev)


def check_l2_xenmap_overreach(inp: CheckInputs) -> CheckResult:
    """I11: how far l2_xenmap's last 2 MiB page maps past the image end: WARN."""
    first, last, _pte = fill_slots(inp.xen)[FILL_XENMAP]
    base = inp.xen.pa(FILL_XENMAP)
    ents = inp.table(base)
    top = None
    for slot in range(first, last + 1):
        raw = ents[slot]
        if raw & x86.PTE_P and raw & x86.PTE_PS:
            top = slot
    if top is None:
        raise _Skip("l2_xenmap has no 2 MiB page over the image yet (not filled)")
    leaf = inp.decoder.decode(2, ents[top])
    mapped_end = leaf.addr + x86.SIZE_2M
    image_end = inp.xen.image_pa_end
    over = mapped_end - image_end
    va_end = inp.syms.virt_start + (top + 1) * x86.SIZE_2M
    ev: Dict[str, object] = {"last_slot": top, "mapped_end_pa": mapped_end,
                             "mapped_end_va": va_end, "image_end_pa": image_end,
                             "overreach": max(over, 0)}
    if over <= 0:
        return result("I11", PASS, "the last l2_xenmap page ends at the image end", ev)
    inside = []
    mbi = inp.mbi()
    if mbi is not None and mbi.pa < mapped_end and mbi.pa + mbi.total_size > image_end:
        inside.append("the MBI")
    ev["also_mapped"] = inside
    return result("I11", WARN, f"l2_xenmap[{top}] maps {over:#x} bytes past the image end "
                  f"({image_end:#x}..{mapped_end:#x}, B + {mapped_end - inp.state.load_base:#x})"
                  + (f", including {', '.join(inside)}" if inside else ""), ev)


def check_table_placement(inp: CheckInputs) -> CheckResult:
    """I12: M is 4 KiB aligned, inside Xen's image, outside __page_tables."""
    root = inp.need_root()
    b = inp.state.load_base
    pt_lo = b + inp.syms.offset(PAGE_TABLES_START_SYMBOL)
    pt_hi = b + inp.syms.offset(PAGE_TABLES_END_SYMBOL)
    ev: Dict[str, object] = {"table": root, "name": inp.xen.name_pa(root),
                             "image_pa_start": inp.xen.image_pa_start,
                             "image_pa_end": inp.xen.image_pa_end,
                             "page_tables_start": pt_lo, "page_tables_end": pt_hi}
    problems = []
    if root % x86.PAGE_SIZE:
        problems.append(f"M at {root:#x} is not 4 KiB aligned")
    if not (inp.xen.in_image(root) and inp.xen.in_image(root + x86.PAGE_SIZE - 1)):
        problems.append(f"M at {root:#x} is outside Xen's image "
                        f"[{inp.xen.image_pa_start:#x}, {inp.xen.image_pa_end:#x})")
    if pt_lo <= root < pt_hi:
        problems.append(f"M at {root:#x} ({ev['name']}) is inside __page_tables: "
                        "trampoline_setup would add B to the firmware's entries")
    if problems:
        return result("I12", FAIL, "; ".join(problems), ev)
    return result("I12", PASS, f"M at {root:#x} ({ev['name']}): aligned, in the image, "
                  "outside __page_tables", ev)


def check_pointer_provenance(inp: CheckInputs) -> CheckResult:
    """I13: register pointers into Xen at the load address and at the linked VA do
    not live together (WARN when they do); and the static findings on the path from
    the entry to efi_multiboot2's call (xen-pic-check: code run at the load address
    that dereferences linked VAs) are cited with whether the tables checked map those
    linked VAs at the load address (WARN when a finding's VA is not: it faults there)."""
    regs = {r: inp.regs[r] for r in _GPRS if r in inp.regs}
    if not regs:
        raise _Skip("no general registers known")
    low = {r: v for r, v in regs.items() if inp.xen.in_image(v)}
    high = {r: v for r, v in regs.items() if inp.syms.in_image(v)}
    static = _static_findings(inp)
    ev: Dict[str, object] = {"load_address": low, "linked": high,
                             **{k: v for k, v in static.items() if k != "tables_name"}}
    # The texts are in the summary; the evidence keeps the facts.
    if "findings" in ev:
        ev["findings"] = [{k: v for k, v in f.items() if k != "text"}
                          for f in ev["findings"]]
    problems = []
    if low and high:
        problems.append("pointers into Xen at the load address ("
                        + ", ".join(f"%{r}" for r in low) + ") and at the linked address ("
                        + ", ".join(f"%{r}" for r in high) + ") live together: a difference "
                        "or comparison between them is wrong")
    findings = static.get("findings") or []
    unmapped = [f for f in findings if not f["mapped_at_load"]]
    if unmapped:
        problems.append(f"{len(unmapped)} of {len(findings)} finding(s) on the path to "
                        f"{CALL_TARGET}'s call use linked VAs {static['tables_name']} does not "
                        "map at the load address: " + _cited(unmapped))
    if problems:
        return result("I13", WARN, "; ".join(problems), ev)
    where = "linked" if high else "load address" if low else "none"
    summary = f"no mixing: register pointers into Xen are {where}"
    if findings:
        summary += (f"; {len(findings)} finding(s) on the path to {CALL_TARGET}'s call use "
                    f"linked VAs, all mapped at the load address by {static['tables_name']} "
                    "(they work only while it maps the upper half): " + _cited(findings))
    elif "static_note" in static:
        summary += f"; {static['static_note']}"
    else:
        summary += (f"; no finding of {piccheck.PROG} on the path from {stopnames.ENTRY} to "
                    f"{CALL_TARGET}'s call")
    return result("I13", PASS, summary, ev)


def _static_findings(inp: CheckInputs) -> Dict[str, object]:
    """xen-pic-check's findings on the path to efi_multiboot2's call, each with whether
    the tables checked (M, else CR3) map the linked VAs it uses at the load address."""
    root = inp.root
    if root is not None:
        tables_name = f"M at {root:#x}"
    elif "cr3" in inp.regs:
        root = inp.regs["cr3"] & inp.addr_mask & ~x86.CR3_FLAGS_MASK
        owner = inp.image_name(root) or "the firmware's L4"
        tables_name = f"CR3 ({owner} at {root:#x})"
    else:
        return {"static_note": "the tables at the call are unknown (no M, no CR3): the "
                "static findings cannot be judged"}
    try:
        # The verdicts are the firmware's (upper half unmapped); each finding's mapping
        # under the tables checked is judged here, per linked VA.
        found = piccheck.findings_for_call(inp.syms)
    except GdbextError as err:
        return {"static_note": f"no static check ({err})", "tables": root,
                "tables_name": tables_name}
    out = []
    for f in found:
        vas = sorted({v for _, v, _ in f.values} | ({f.value} if f.value is not None else set()))
        wrong = []      # (va, the PA it reaches or None, why not)
        for va in vas:
            try:
                w = inp.walk(root, va)
            except MemoryReadError as err:   # a table the upper half points to is not RAM
                wrong.append((va, None, f"unreadable table: {err}"))
                continue
            if w.pa != inp.state.load_base + inp.syms.offset(va):
                wrong.append((va, w.pa, w.fault))
        out.append(_finding_evidence(f, vas, wrong))
    return {"tables": root, "tables_name": tables_name, "findings": out,
            "upper_half_at_load": all(f["mapped_at_load"] for f in out)}


_VERBS = {piccheck.READS_POINTER: "reads", piccheck.TAKES_ADDRESS: "takes the address of",
          piccheck.JUMP_TABLE: "jumps through", piccheck.ABSOLUTE: "uses"}


def _finding_evidence(f, vas: List[int], wrong) -> Dict[str, object]:
    """One finding for I13's evidence, and its text: function+offset, what it does to
    which object[index], the linked VA and whose it is, and the first VA not mapped at
    the load address under the tables checked."""
    where = f.where.split("#")[-1]
    what = f"{f.value:#x} ({f.value_symbol})" if f.value is not None else "a linked VA"
    if f.object:
        obj = f.object.split("#")[-1]
        if f.values and (f.index is None or f.kind == piccheck.TAKES_ADDRESS):
            i, v, owner = f.values[0]
            slot = "" if f.kind == piccheck.TAKES_ADDRESS else "[reg]"
            what = f"{obj}{slot} ({len(f.values)} linked VA(s), first [{i}] = {v:#x}, {owner})"
        else:
            what = f"{obj}[{f.index}] = {what}"
    text = f"{where} {_VERBS[f.kind]} {what}"
    if wrong:
        va, pa, fault = wrong[0]
        how = f"not mapped ({fault})" if pa is None else f"mapped at {pa:#x}, not at B + offset"
        text += f": {va:#x} {how}" + (f", {len(wrong) - 1} more not at the load address"
                                      if len(wrong) > 1 else "")
    return {"kind": f.kind, "where": f.where, "instruction": f.instruction,
            "object": f.object, "index": f.index, "value": f.value,
            "value_symbol": f.value_symbol, "linked_vas": vas, "chain": list(f.chain),
            "mapped_at_load": not wrong, "unmapped_count": len(wrong),
            "first_unmapped": (dict(zip(("va", "pa", "fault"), wrong[0])) if wrong
                               else None),
            "text": text}


def _cited(findings: Sequence[Dict[str, object]]) -> str:
    """The findings' texts, then each call chain once."""
    chains: List[str] = []
    for f in findings:
        c = piccheck.chain_text(f["chain"])
        if c not in chains:
            chains.append(c)
    return "; ".join(f["text"] for f in findings) + " (" + "; ".join(
        f"chain {c}" for c in chains) + ")"


def _kind_counts(faults: Sequence[PointerFault]) -> Dict[str, int]:
    out: Dict[str, int] = {}
    for f in faults:
        out[f.kind] = out.get(f.kind, 0) + 1
    return out


# --- the registry: id -> (the function that checks it, its catalog entry) --------------

CheckFunction = Callable[[CheckInputs], CheckResult]

CHECK_TABLE: Dict[str, Tuple[CheckFunction, CheckInfo]] = {
    "I0": (check_paging_mode, CHECKS["I0"]),
    "I1": (check_lower_half_copied, CHECKS["I1"]),
    "I2": (check_firmware_upper_half_empty, CHECKS["I2"]),
    "I3": (check_upper_half_relocated, CHECKS["I3"]),
    "I4": (check_upper_half_pointers, CHECKS["I4"]),
    "I5": (check_l2_xenmap_fill, CHECKS["I5"]),
    "I6": (check_call_target_reachable, CHECKS["I6"]),
    "I7": (check_identity_kept, CHECKS["I7"]),
    "I8": (check_image_mapped_rwx, CHECKS["I8"]),
    "I9": (check_relocated_once, CHECKS["I9"]),
    "I10": (check_added_rwx, CHECKS["I10"]),
    "I11": (check_l2_xenmap_overreach, CHECKS["I11"]),
    "I12": (check_table_placement, CHECKS["I12"]),
    "I13": (check_pointer_provenance, CHECKS["I13"]),
}


def run_checks(state: MergeState, only: Optional[Iterable[str]] = None,
               skip: Optional[Iterable[str]] = None) -> List[CheckResult]:
    """Evaluate I0..I13 (or ``only`` of them, minus ``skip``) in order.

    A check that lacks an input SKIPs with the reason; memory that cannot be
    read is a FAIL naming the address (the table the check needs is gone)."""
    inputs = CheckInputs(state)
    out = []
    for cid in select(only, skip):
        check, _info = CHECK_TABLE[cid]
        try:
            out.append(check(inputs))
        except _Skip as why:
            out.append(result(cid, SKIP, str(why)))
        except MemoryReadError as err:
            out.append(result(cid, FAIL, f"memory needed by the check is unreadable: {err}",
                              {"pa": err.pa, "size": err.size}))
        except GdbextError as err:
            # e.g. a build without one of the symbols the check needs
            out.append(result(cid, SKIP, f"cannot be checked: {err}"))
    return out
