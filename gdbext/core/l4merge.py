"""The RFC's merged L4 ("call efi_multiboot2() at its linked address"): predict it,
check it, explain what is wrong.  Never imports ``gdb``.

The RFC (``rfc-efi-multiboot2-linked-address.txt``) builds a table M at
``__efi64_mb2_start``: the firmware L4's lower half (entries 0-255, copied from
%cr3), ``idle_pg_table``'s upper half (256-511) copied raw, then fills
``l2_xenmap``, ``l2_bootmap`` and ``l2_directmap`` with 2 MiB PSE+RWX entries,
switches CR3 to M and calls ``efi_multiboot2`` at its linked VA.

* ``predict_merge()`` computes M (and every byte the patch writes) on top of
  guest memory, without writing the guest; ``relocate=True`` first adds B to
  the pointers as Frediano's review asks.
* ``run_checks()`` evaluates the invariants I0-I13 of ``xen-boot-paging.md``
  on a ``MergeState`` and returns ``CheckResult`` objects (PASS / FAIL / WARN /
  SKIP with a reason, evidence, and the reviewer's point each one answers).
* ``results_as_dict()`` is the ``xen-l4merge-check --json`` contract and
  ``render_text()`` its text form.

All load-address arithmetic and pointer classes come from ``xenimage``.

Public API (stable; B2's commands and bootstops build on it):

* ``CheckResult`` (``as_dict()`` = the brief's check contract), ``PASS``,
  ``FAIL``, ``WARN``, ``SKIP``, ``CHECKS`` (id -> title, reviewer),
  ``CHECK_IDS``, ``CALL_CHECKS``, ``CHECKS_AT_STOP`` (stop name -> ids).
* ``MergeState`` (inputs; ``firmware_cr3`` is the raw CR3 for I0's low-bits
  test, ``firmware_root`` its PA; registers by lower-case name, optional
  ``gdtr_base`` / ``idtr_base`` for I7).
* ``predict_merge(syms, mem, load_base, firmware_root, relocate=False,
  table_pa=None, maxphyaddr=52) -> Prediction`` (``mem``, ``root``,
  ``writes``, ``originals``, ``entries``, ``table_source``);
  ``default_table_pa(xen)`` explains where M goes without ``efi_l4_bootmap``.
* ``run_checks(state, only=None, skip=None)``, ``select(only, skip)``,
  ``counts``, ``ok``, ``results_as_dict(mode, stop, state, results)``,
  ``render_text(results, color=False)``, ``parse_mbi(mem, pa)``.
"""

from __future__ import annotations

import dataclasses
import struct
import weakref
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from tabulate import tabulate

from . import x86
from .errors import GdbextError, MemoryReadError
from .memory import PageCache, PhysMemory, SyntheticMemory
from .paging import (ATTR_NX, ATTR_W, MODE_4LEVEL, Decoder, PagingContext, Walk,
                     enumerate_ranges, read_table, walk)
from .xenimage import (ABSOLUTE, FOREIGN, NOT_PRESENT, RELOCATED, RELOCATED_TWICE,
                       UNRELOCATED, IDLE_L4, LoadedXen)
from .xensyms import (SHF_ALLOC, SHF_EXECINSTR, PAGE_TABLES_END_SYMBOL,
                      PAGE_TABLES_START_SYMBOL, XEN_PHYS_START_SYMBOL)

# --- statuses and the registry of checks ------------------------------------------

PASS = "PASS"
FAIL = "FAIL"
WARN = "WARN"
SKIP = "SKIP"
STATUSES = (PASS, FAIL, WARN, SKIP)

# The reviewers' points (the RFC thread), quoted short.
ANDREW_CR3 = "Andrew: the merge copies the firmware L4 from %cr3 as is (mov %cr3,%rsi)"
ANDREW_FILL = "Andrew: map Xen into the higher mappings using 2M superpages"
ANDREW_CALL = ("Andrew: call efi_multiboot2 via the high mappings "
               "(efi_multiboot2 - __image_base__ + __XEN_VIRT_START)")
FREDIANO_ADJUST = ("Frediano: adjust the pointers already present in the half table "
                   "you are copying")
FREDIANO_BACK = ("Frediano: relocating could leave pointers that are not relocated back "
                 "(each pointer must get B exactly once)")
JAN_FIRMWARE_L4 = ("Jan: assumes firmware adds no L4 entries later "
                   "(Frediano: or restores %cr3)")
JAN_UPPER_HALF = "Jan: assumes firmware puts nothing in the upper half of the L4"
JAN_EBS = ("Jan: page tables are replaced before ExitBootServices(): the firmware's "
           "mappings must stay as they were")
JAN_RWX = "Jan: new RWX mappings, when the goal is to get rid of any such"
JAN_POINTERS = ("Jan: static pointers vs %rip-relative addresses: pointers made at the "
                "load address and at the linked address must not be mixed")


@dataclass(frozen=True)
class CheckInfo:
    """One invariant of the reference doc."""
    id: str
    title: str
    reviewer: Optional[str]


CHECKS: Dict[str, CheckInfo] = {c.id: c for c in (
    CheckInfo("I0", "long mode, CR3 low bits clear", ANDREW_CR3),
    CheckInfo("I1", "M lower half == firmware L4 lower half", JAN_FIRMWARE_L4),
    CheckInfo("I2", "firmware upper half empty", JAN_UPPER_HALF),
    CheckInfo("I3", "M upper half == idle_pg_table link value + B", FREDIANO_ADJUST),
    CheckInfo("I4", "upper-half pointers stay inside the loaded image", FREDIANO_ADJUST),
    CheckInfo("I5", "l2_xenmap maps the image at B", ANDREW_FILL),
    CheckInfo("I6", "efi_multiboot2's linked VA reaches its bytes", ANDREW_CALL),
    CheckInfo("I7", "identity kept for code, stack, MBI, EFI", JAN_EBS),
    CheckInfo("I8", "firmware maps the image present, writable, executable", None),
    CheckInfo("I9", "relocated exactly once at the trampoline", FREDIANO_BACK),
    CheckInfo("I10", "W+X leaves (which the merge added)", JAN_RWX),
    CheckInfo("I11", "l2_xenmap overreach past the image end", None),
    CheckInfo("I12", "M aligned, inside the image, outside __page_tables", None),
    CheckInfo("I13", "pointer provenance (load address vs linked VA)", JAN_POINTERS),
)}
CHECK_IDS: Tuple[str, ...] = tuple(CHECKS)

# The checks that decide whether the call of efi_multiboot2 at its linked VA
# can work (the relocated prediction must PASS all of them).
CALL_CHECKS: Tuple[str, ...] = ("I0", "I1", "I2", "I3", "I4", "I5", "I6", "I7", "I8", "I12")

# Boot stop names: their one home is stopnames.py (bootstops plants the stops).
from .stopnames import (AFTER_START_XEN as STOP_AFTER_START_XEN,  # noqa: E402
                        CALL as STOP_CALL, EFI_MB2 as STOP_EFI_MB2,
                        EFI_RETURN as STOP_EFI_RETURN, ENTRY as STOP_ENTRY,
                        HIGH_START as STOP_HIGH_START,
                        L2_XENMAP_FILLED as STOP_L2_XENMAP_FILLED, MERGE as STOP_MERGE,
                        START_XEN as STOP_START_XEN, SWITCH as STOP_SWITCH,
                        TABLES_RELOCATED as STOP_TABLES_RELOCATED,
                        TRAMPOLINE_CR3 as STOP_TRAMPOLINE_CR3,
                        TRAMPOLINE_SETUP as STOP_TRAMPOLINE_SETUP)

# Which checks mean something at each boot stop of a live guest.  Predict mode
# (at the entry, or at the call of an unpatched build) runs them all.
CHECKS_AT_STOP: Dict[str, Tuple[str, ...]] = {
    # Firmware state; I2: the firmware's upper half, lost by a merge.
    STOP_ENTRY: ("I0", "I2"),
    # CR3 is the merged L4 now; the l2 fills have not run yet.
    STOP_MERGE: ("I0", "I1", "I2", "I3", "I4", "I12", "I13"),
    # Everything the call through the high mapping needs.
    STOP_CALL: ("I0", "I1", "I2", "I3", "I4", "I5", "I6", "I7", "I8", "I10", "I11", "I12",
                "I13"),
    STOP_EFI_MB2: ("I0", "I6", "I7", "I13"),
    # The firmware may have added L4 entries during the call.
    STOP_EFI_RETURN: ("I0", "I1", "I13"),
    STOP_SWITCH: ("I0",),
    # 32-bit, paging off: no table is in use; the fix-ups are checked after.
    STOP_TRAMPOLINE_SETUP: (),
    STOP_TABLES_RELOCATED: ("I9",),
    STOP_L2_XENMAP_FILLED: ("I5", "I11"),
    # Paging is still off at the trampoline's CR3 load (it is turned on after): no I0.
    STOP_TRAMPOLINE_CR3: ("I5", "I9", "I11"),
    STOP_HIGH_START: ("I0", "I9"),
    STOP_START_XEN: ("I0", "I9"),
}
# Where I9 judges the tables even if CR3 is not (yet) idle_pg_table.
I9_STOPS = (STOP_TABLES_RELOCATED, STOP_L2_XENMAP_FILLED, STOP_TRAMPOLINE_CR3)
# The function the RFC calls at its linked VA, and the instruction it uses.
CALL_TARGET = "efi_multiboot2"
CALL_RAX = b"\xff\xd0"          # call *%rax


@dataclass
class CheckResult:
    id: str
    title: str
    status: str                      # PASS / FAIL / WARN / SKIP
    summary: str                     # one line (the reason, for FAIL / WARN / SKIP)
    evidence: Dict[str, object] = field(default_factory=dict)  # ints stay ints
    reviewer: Optional[str] = None

    def as_dict(self) -> Dict[str, object]:
        return {"id": self.id, "title": self.title, "status": self.status,
                "summary": self.summary, "evidence": self.evidence,
                "reviewer": self.reviewer}


# --- inputs -----------------------------------------------------------------------------

@dataclass
class MbiInfo:
    """What the checks need from the multiboot2 information (%rbx at entry)."""
    pa: int
    total_size: int
    efi64_system_table: Optional[int] = None     # tag 12
    efi64_image_handle: Optional[int] = None     # tag 20
    load_base_addr: Optional[int] = None         # tag 21: PA(_start) = B + 2 MiB
    cmdline_pa: Optional[int] = None             # tag 1 (string at tag + 8)
    tags: List[Tuple[int, int, int]] = field(default_factory=list)  # (type, pa, size)


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


@dataclass
class WriteEntry:
    """One qword the patch changes (for reports and for --undo)."""
    pa: int
    old: int
    new: int
    name: Optional[str]                # "M[261]", "l2_xenmap[1]", ...


@dataclass
class Prediction:
    """The merged table the RFC would build, on top of guest memory.

    ``mem`` is an overlay (SyntheticMemory with base=guest memory) holding every
    write; ``writes`` is exactly what the patch writes (PA -> bytes: M as a full
    page, other tables as runs of changed qwords); ``originals`` the bytes they
    replace (for --undo)."""
    mem: SyntheticMemory               # overlay: base = the guest memory given
    root: int                          # M's PA
    writes: Dict[int, bytes]
    originals: Dict[int, bytes]
    relocated: bool
    load_base: int
    firmware_root: int
    table_source: str                  # "efi_l4_bootmap", "l3_bootmap" or "given"
    entries: List[WriteEntry] = field(default_factory=list)


# --- Xen facts the patch uses --------------------------------------------------------------

# PAGE_HYPERVISOR_RWX (P RW A D G) and the patch's 2 MiB fill: _PAGE_PSE + that = 0x1e3.
PAGE_HYPERVISOR_RWX = x86.PTE_P | x86.PTE_RW | x86.PTE_A | x86.PTE_D | x86.PTE_G
FILL_FLAGS = x86.PTE_PS | PAGE_HYPERVISOR_RWX
# The tables the patch fills with 2 MiB pages, and how it indexes them.
FILL_XENMAP = "l2_xenmap"                      # by (VA - XEN_VIRT_START) >> 21
FILL_BY_PA = ("l2_bootmap", "l2_directmap")    # by PA >> 21
PATCH_TABLE = "efi_l4_bootmap"                 # the RFC's M
# Where M goes in a build without the patch: see default_table_pa().
SCRATCH_TABLE = "l3_bootmap"
L4_HALF = 256
ENTRIES = 512
_LOW32 = 0xFFFF_FFFF
# The stack the checks require to stay mapped (and writable) below %rsp.
STACK_WINDOW = 64 * 1024
# Bytes of efi_multiboot2 compared with the ELF when the symbol has no size.
CALL_TARGET_BYTES = 64
_GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11",
         "r12", "r13", "r14", "r15", "rip")


def default_table_pa(xen: LoadedXen) -> Tuple[int, str]:
    """Where M goes: ``efi_l4_bootmap`` in a patched build, else ``l3_bootmap``.

    Why ``l3_bootmap`` when the build has no ``efi_l4_bootmap``: it is a 4 KiB
    page-table page inside Xen's image (I12) and outside ``__page_tables``
    (so ``trampoline_setup``'s relocation loop never adds B to M's firmware
    pointers); it is all zeros in the ELF and nothing writes it before
    ``trampoline_setup`` (the RFC's fills write ``l2_bootmap``, not
    ``l3_bootmap``; ``efi_arch_memory_setup`` returns before touching the boot
    maps on the multiboot2 path); so it is unused while ``efi_multiboot2``
    runs, and restoring it is writing back 4096 zeros.  It must be restored
    (``xen-l4merge-apply --undo``) before ``trampoline_setup``: that code
    writes only the low dwords of ``l3_bootmap[0..3]`` and expects the rest of
    the page to be zero.  The same holds for the relocated variant's in-place
    ``+B`` on the tables under the upper half: ``trampoline_setup`` would add
    B a second time (I9 reports it as relocated twice).
    """
    syms = xen.syms
    for name in (PATCH_TABLE, SCRATCH_TABLE):
        sym = syms.get(name)
        if sym is not None:
            return xen.pa(sym.value), name
    raise GdbextError(f"{getattr(syms, 'path', 'xen-syms')}: neither {PATCH_TABLE} nor "
                      f"{SCRATCH_TABLE}: give the merged table's address (--table ADDR)")


def _qwords(data: bytes) -> Tuple[int, ...]:
    return struct.unpack(f"<{len(data) // 8}Q", data)


def _pack(values: Sequence[int]) -> bytes:
    return struct.pack(f"<{len(values)}Q", *values)


def _entry_name(xen: LoadedXen, pa: int, root: int) -> Optional[str]:
    if root <= pa < root + x86.PAGE_SIZE:
        return f"M[{(pa - root) // 8}]"
    hit = xen.table_at(pa)
    if hit is not None:
        name, _level, off = hit
        return f"{name}[{off // 8}]"
    return xen.name_pa(pa)


def fill_slots(xen: LoadedXen) -> Dict[str, Tuple[int, int, int]]:
    """The patch's fills as (first slot, last slot, first PTE) per table, computed
    as its assembly does: l2_xenmap by sym_offs(_start) >> 21 .. sym_offs(_end - 1)
    >> 21, l2_bootmap and l2_directmap by PA(_start) >> 21 .. PA(_end - 1) >> 21,
    each PTE = (PA(_start) + n * 2 MiB) | 0x1e3 (32-bit: %eax)."""
    syms = xen.syms
    off_start = syms.offset(syms.image_start)
    off_last = syms.offset(syms.image_end - 1)
    pte = (xen.load_base + off_start + FILL_FLAGS) & _LOW32
    out = {FILL_XENMAP: (off_start >> 21, off_last >> 21, pte)}
    first = (xen.load_base + off_start) >> 21
    last = (xen.load_base + off_last) >> 21
    for name in FILL_BY_PA:
        out[name] = (first, last, pte)
    return out


def _relocate_upper(xen: LoadedXen, overlay: SyntheticMemory, upper: List[int],
                    addr_mask: int) -> List[int]:
    """Frediano's "adjust the pointers": B added to M's present upper-half
    entries and, in place, to every present qword of the tables they reach that
    ``trampoline_setup`` relocates (pages inside ``__page_tables``)."""
    syms = xen.syms
    b = xen.load_base
    pt_lo = b + syms.offset(PAGE_TABLES_START_SYMBOL)
    pt_hi = b + syms.offset(PAGE_TABLES_END_SYMBOL)
    out = [e + b if e & x86.PTE_P else e for e in upper]
    pending = [((e & addr_mask), 3) for e in out if e & x86.PTE_P and not e & x86.PTE_PS]
    done = set()
    while pending:
        pa, level = pending.pop()
        if pa in done or not pt_lo <= pa < pt_hi:
            continue
        done.add(pa)
        ents = [e + b if e & x86.PTE_P else e for e in _qwords(overlay.read_phys(pa, x86.PAGE_SIZE))]
        overlay.write(pa, _pack(ents))
        if level > 1:
            pending.extend(((e & addr_mask), level - 1) for e in ents
                           if e & x86.PTE_P and not e & x86.PTE_PS)
    return out


def predict_merge(syms, mem: PhysMemory, load_base: int, firmware_root: int,
                  relocate: bool = False, table_pa: Optional[int] = None,
                  maxphyaddr: int = x86.MAXPHYADDR_ARCH) -> Prediction:
    """Compute, without writing the guest, the table the RFC builds.

    ``firmware_root`` is where the patch copies the lower half from (``%cr3``;
    the patch does not mask it: pass CR3 & ~0xfff and let I0 report low bits).
    ``idle_pg_table``'s upper half is taken as it is in ``mem`` (link-time
    values at ``__efi64_mb2_start``).  The fills are written as the patch does
    (32-bit stores of %eax: the high dword of each entry is left alone).
    ``table_pa``: where M goes (default: ``default_table_pa``).
    """
    xen = LoadedXen(syms, load_base)
    if table_pa is None:
        table_pa, source = default_table_pa(xen)
    else:
        source = "given"
    if table_pa % x86.PAGE_SIZE:
        raise GdbextError(f"the merged table's address {table_pa:#x} is not 4 KiB aligned")
    addr_mask = x86.phys_addr_mask(maxphyaddr)
    overlay = SyntheticMemory(ram_size=1 << x86.MAXPHYADDR_ARCH, base=mem)
    lower = list(_qwords(mem.read_phys(firmware_root, L4_HALF * 8)))
    upper = list(_qwords(mem.read_phys(xen.pa(IDLE_L4) + L4_HALF * 8, L4_HALF * 8)))
    if relocate:
        upper = _relocate_upper(xen, overlay, upper, addr_mask)
    overlay.write(table_pa, _pack(lower + upper))
    for name, (first, last, pte) in fill_slots(xen).items():
        sym = syms.lookup(name)
        entries = (sym.size // 8) if sym.size else ENTRIES
        if last >= entries:
            raise GdbextError(f"{name} has {entries} entries but the fill would write slot "
                              f"{last} (load base {load_base:#x} too high for the patch)")
        base = xen.pa(name)
        for slot in range(first, last + 1):
            overlay.write_u32(base + 8 * slot, (pte + (slot - first) * x86.SIZE_2M) & _LOW32)
    # What changed: M as a full page, the rest as runs of changed qwords.
    writes: Dict[int, bytes] = {table_pa: overlay.read_phys(table_pa, x86.PAGE_SIZE)}
    originals: Dict[int, bytes] = {table_pa: mem.read_phys(table_pa, x86.PAGE_SIZE)}
    entries_out: List[WriteEntry] = []
    for i, (old, new) in enumerate(zip(_qwords(originals[table_pa]), _qwords(writes[table_pa]))):
        if old != new:
            entries_out.append(WriteEntry(table_pa + 8 * i, old, new, f"M[{i}]"))
    for page in sorted(overlay.pages):
        if page == table_pa:
            continue
        new_q = _qwords(overlay.read_phys(page, x86.PAGE_SIZE))
        old_raw = mem.read_phys(page, x86.PAGE_SIZE)
        old_q = _qwords(old_raw)
        i = 0
        while i < ENTRIES:
            if new_q[i] == old_q[i]:
                i += 1
                continue
            j = i
            while j < ENTRIES and new_q[j] != old_q[j]:
                entries_out.append(WriteEntry(page + 8 * j, old_q[j], new_q[j],
                                              _entry_name(xen, page + 8 * j, table_pa)))
                j += 1
            writes[page + 8 * i] = _pack(new_q[i:j])
            originals[page + 8 * i] = old_raw[8 * i:8 * j]
            i = j
    return Prediction(overlay, table_pa, writes, originals, relocate, load_base, firmware_root,
                      source, entries_out)


# --- the multiboot2 information ----------------------------------------------------------

MBI_TAG_CMDLINE = 1
MBI_TAG_EFI64_SYSTEM_TABLE = 12
MBI_TAG_EFI64_IMAGE_HANDLE = 20
MBI_TAG_LOAD_BASE_ADDR = 21
MBI_MAX_SIZE = 1 << 20   # sanity bound: GRUB's MBI is a few KiB


def parse_mbi(mem: PhysMemory, pa: int) -> MbiInfo:
    """Parse the multiboot2 information structure at ``pa`` (8-byte aligned
    tags after an 8-byte header; an end tag of type 0 closes it)."""
    head = mem.read_phys(pa, 8)
    total = struct.unpack_from("<I", head)[0]
    if total < 16 or total > MBI_MAX_SIZE:
        raise GdbextError(f"no multiboot2 information at {pa:#x} (total_size {total:#x})")
    data = mem.read_phys(pa, total)
    info = MbiInfo(pa=pa, total_size=total)
    off = 8
    while off + 8 <= total:
        typ, size = struct.unpack_from("<II", data, off)
        if size < 8:
            break
        info.tags.append((typ, pa + off, size))
        if typ == 0:
            break
        if typ == MBI_TAG_EFI64_SYSTEM_TABLE and size >= 16:
            info.efi64_system_table = struct.unpack_from("<Q", data, off + 8)[0]
        elif typ == MBI_TAG_EFI64_IMAGE_HANDLE and size >= 16:
            info.efi64_image_handle = struct.unpack_from("<Q", data, off + 8)[0]
        elif typ == MBI_TAG_LOAD_BASE_ADDR and size >= 12:
            info.load_base_addr = struct.unpack_from("<I", data, off + 8)[0]
        elif typ == MBI_TAG_CMDLINE:
            info.cmdline_pa = pa + off + 8
        off += (size + 7) & ~7
    return info


# --- checks -----------------------------------------------------------------------------

_GOOD = (RELOCATED, ABSOLUTE)
# A pointer without a link value (written at run time) that leaves the image.
OUTSIDE_IMAGE = "outside-image"
# I9: the address is link + B but the flags are not the link value's.
FLAGS_DIFFER = "flags-differ"


def _result(cid: str, status: str, summary: str, evidence: Optional[Dict[str, object]] = None
            ) -> CheckResult:
    info = CHECKS[cid]
    return CheckResult(cid, info.title, status, summary, evidence or {}, info.reviewer)


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


class _Checker:
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
            return _qwords(self.state.firmware_l4[:x86.PAGE_SIZE])
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
                return PointerFault(_entry_name(self.xen, table_pa + 8 * index, -1)
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

    # -- the invariants --------------------------------------------------------------

    def i0(self) -> CheckResult:
        cr0, cr3, cr4, efer = self.need_regs("cr0", "cr3", "cr4", "efer")
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
        fcr3 = self.state.firmware_cr3
        if fcr3 is not None and fcr3 & x86.CR3_FLAGS_MASK:
            bad.append(f"the firmware's CR3 {fcr3:#x} has low bits set: mov %cr3,%rsi copies "
                       "from the wrong address")
        ev = {"cr0": cr0, "cr3": cr3, "cr4": cr4, "efer": efer}
        if fcr3 is not None:
            ev["firmware_cr3"] = fcr3
        if bad:
            return _result("I0", FAIL, "; ".join(bad), ev)
        return _result("I0", PASS, "4-level long mode, CR3 low 12 bits clear", ev)

    def i1(self) -> CheckResult:
        m = self.m_entries()
        f = self.f_captured()
        diff = [i for i in range(L4_HALF) if not LoadedXen.same_entry(m[i], f[i])]
        ev: Dict[str, object] = {"table": self.root, "firmware_root": self.froot,
                                 "captured": self.state.firmware_l4 is not None}
        problems = []
        if diff:
            ev["differ"] = [{"slot": i, "merged": m[i], "firmware": f[i]} for i in diff[:16]]
            problems.append(f"M[{diff[0]}] = {m[diff[0]]:#x} but the firmware's L4 has "
                            f"{f[diff[0]]:#x} ({len(diff)} slot(s) of 0..255 differ)")
        if self.state.firmware_l4 is not None and self.froot is not None:
            now = self.table(self.froot)
            changed = [i for i in range(ENTRIES) if not LoadedXen.same_entry(now[i], f[i])]
            if changed:
                ev["firmware_changed"] = [{"slot": i, "captured": f[i], "now": now[i]}
                                          for i in changed[:16]]
                problems.append(f"the firmware changed its L4 since the copy (slot "
                                f"{changed[0]}: {f[changed[0]]:#x} -> {now[changed[0]]:#x}): "
                                "M no longer has it")
        if problems:
            return _result("I1", FAIL, "; ".join(problems), ev)
        return _result("I1", PASS, "M[0..255] equals the firmware's L4"
                       + (" (and the firmware has not changed it since)"
                          if self.state.firmware_l4 is not None and self.froot is not None
                          else ""), ev)

    def i2(self) -> CheckResult:
        f = self.f_captured()
        present = [i for i in range(L4_HALF, ENTRIES) if f[i] & x86.PTE_P]
        ev: Dict[str, object] = {"firmware_root": self.froot}
        if present:
            ev["present"] = [{"slot": i, "entry": f[i]} for i in present[:16]]
            return _result("I2", FAIL, f"the firmware's L4 maps the upper half (slot "
                           f"{present[0]} = {f[present[0]]:#x}, {len(present)} slot(s)): "
                           "the merge drops it", ev)
        return _result("I2", PASS, "the firmware's L4 has nothing in slots 256..511", ev)

    def i3(self) -> CheckResult:
        m = self.m_entries()
        faults = []
        for i in range(L4_HALF, ENTRIES):
            exp = self.xen.expected_entry(IDLE_L4, i)
            if LoadedXen.same_entry(m[i], exp):
                continue
            v = self.xen.judge_entry(IDLE_L4, i, m[i], self.addr_mask)
            link_target = v.link & self.addr_mask if v.link & x86.PTE_P else None
            tname = self.image_name(v.expected_pa) if link_target else None
            faults.append(PointerFault(f"M[{i}]", self.root + 8 * i, m[i], v.target_pa,
                                       v.kind, v.expected_pa if link_target else None, tname))
        ev: Dict[str, object] = {"table": self.root, "load_base": self.state.load_base}
        if faults:
            ev["faults"] = [f.as_dict() for f in faults[:16]]
            ev["kinds"] = _kind_counts(faults)
            return _result("I3", FAIL, f"{faults[0].text()}"
                           + (f" (+{len(faults) - 1} more)" if len(faults) > 1 else ""), ev)
        present = sum(1 for i in range(L4_HALF, ENTRIES) if m[i] & x86.PTE_P)
        ev["present"] = present
        return _result("I3", PASS, f"M[256..511] == idle_pg_table + B ({present} present)", ev)

    def i4(self) -> CheckResult:
        faults, seen, tables = self.upper_tree()
        ev: Dict[str, object] = {"pointers": seen, "tables": len(tables),
                                 "image_pa_start": self.xen.image_pa_start,
                                 "image_pa_end": self.xen.image_pa_end}
        if faults:
            ev["faults"] = [f.as_dict() for f in faults[:16]]
            ev["kinds"] = _kind_counts(faults)
            return _result("I4", FAIL, f"{faults[0].text()}"
                           + (f" (+{len(faults) - 1} more)" if len(faults) > 1 else ""), ev)
        return _result("I4", PASS, f"all {seen} pointers under M[256..511] reach Xen's tables "
                       "in the loaded image, relocated once", ev)

    def i5(self) -> CheckResult:
        b = self.state.load_base
        first, last, _pte = fill_slots(self.xen)[FILL_XENMAP]
        base = self.xen.pa(FILL_XENMAP)
        ents = self.table(base)
        bad = []
        problems = []
        if b % x86.SIZE_2M:
            problems.append(f"load base {b:#x} is not 2 MiB aligned")
        for slot in range(first, last + 1):
            exp = (b + slot * x86.SIZE_2M) | FILL_FLAGS
            found = ents[slot]
            info = self.decoder.decode(2, found)
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
            return _result("I5", FAIL, "; ".join(problems), ev)
        return _result("I5", PASS, f"l2_xenmap[{first}..{last}] map B + slot * 2 MiB", ev)

    def i6(self) -> CheckResult:
        root = self.need_root()
        name = CALL_TARGET
        sym = self.syms.lookup(name)
        va = sym.value
        size = sym.size or CALL_TARGET_BYTES
        expected_pa = self.xen.pa(name)
        ev: Dict[str, object] = {"symbol": name, "linked_va": va, "expected_pa": expected_pa,
                                 "table": root}
        problems: List[str] = []
        w = self.walk(root, va)
        ev["walk"] = [{"level": s.level, "table": s.table_pa, "index": s.index,
                       "entry": s.entry.raw} for s in w.steps]
        fault = self.explain_walk(w)
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
                problems.extend(self._compare_bytes(root, va, size, ev))
                if not problems:
                    problems.extend(self._image_ranges(root, ev))
        problems.extend(self._call_registers(va, ev))
        if problems:
            return _result("I6", FAIL, "; ".join(problems), ev)
        return _result("I6", PASS, f"{name}'s linked VA {va:#x} -> {expected_pa:#x} "
                       f"(B + offset), {ev.get('bytes_compared', 0)} bytes equal the ELF's, "
                       f"[_start, _end) maps B + offset", ev)

    def _compare_bytes(self, root: int, va: int, size: int, ev: Dict[str, object]) -> List[str]:
        want = self.syms.read_linked(va, size)
        got = bytearray()
        cur = va
        while cur < va + size:
            w = self.walk(root, cur)
            if not w.mapped:
                return [f"{cur:#x} (inside {CALL_TARGET}) is not mapped"]
            chunk = min(va + size - cur, x86.PAGE_SIZE - (cur & (x86.PAGE_SIZE - 1)))
            try:
                got += self.mem.read_phys(w.pa, chunk)
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

    def _image_ranges(self, root: int, ev: Dict[str, object]) -> List[str]:
        """Every VA of [_start, _end) maps B + offset (one enumeration)."""
        lo, hi = self.syms.image_start, self.syms.image_end
        en = enumerate_ranges(self.paging, self.mem, root, lo=lo, hi=hi)
        cur = lo
        for va, end, pa, _size, _attrs in en.ranges:
            if va > cur:
                break
            want = self.xen.pa(va) if self.syms.in_image(va) else None
            if want is None or pa != want:
                ev["image_mismatch"] = {"va": va, "pa": pa, "expected_pa": want}
                return [f"[_start, _end) is not all B + offset: {va:#x} -> {pa:#x}"]
            cur = max(cur, end)
        if cur < hi:
            ev["image_unmapped"] = cur
            return [f"[_start, _end) is not all mapped: {cur:#x} is not"]
        ev["image_ranges"] = len(en.ranges)
        return []

    def _call_registers(self, va: int, ev: Dict[str, object]) -> List[str]:
        """At the call: %rax == the linked VA (when the call is ``call *%rax``);
        at efi_multiboot2: where RIP is."""
        stop = self.state.stop
        rip = self.regs.get("rip")
        if stop == STOP_CALL and rip is not None and "cr3" in self.regs:
            try:
                code = self._code_at(self.regs["cr3"] & self.addr_mask, rip, 2)
            except (MemoryReadError, GdbextError) as err:
                ev["call"] = f"instruction at RIP unreadable ({err})"
                return []
            if code == CALL_RAX:
                rax = self.regs.get("rax")
                ev["rax"] = rax
                if rax != va:
                    return [f"%rax = {rax:#x} at call *%rax, not {CALL_TARGET}'s linked VA "
                            f"{va:#x}" if rax is not None else "%rax not known at call *%rax"]
                ev["call"] = "call *%rax with %rax == the linked VA"
            else:
                ev["call"] = f"not call *%rax at RIP ({code.hex()}): %rax not checked"
        elif stop == STOP_EFI_MB2 and rip is not None:
            ev["rip"] = rip
            if rip == va:
                ev["running_at"] = "linked VA"
            elif rip == self.xen.pa(CALL_TARGET):
                ev["running_at"] = "load address"
            else:
                return [f"RIP {rip:#x} is neither {CALL_TARGET}'s linked VA nor its load address"]
        return []

    def _code_at(self, cr3_root: int, va: int, n: int) -> bytes:
        w = self.walk(cr3_root, va)
        if not w.mapped:
            raise GdbextError(f"RIP {va:#x} not mapped")
        return self.mem.read_phys(w.pa, n)

    def i7(self) -> CheckResult:
        root = self.need_root()
        froot = self.need_froot()
        items: List[Tuple[str, int, int, bool]] = []
        not_checked: List[str] = []
        rip, rsp = self.regs.get("rip"), self.regs.get("rsp")
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
        mbi = self.mbi()
        if mbi is None:
            not_checked.append(f"MBI ({self._mbi_error})")
        else:
            items.append(("mbi", mbi.pa, mbi.total_size, False))
            if mbi.efi64_system_table is not None:
                items.append(("system_table", mbi.efi64_system_table, 8, False))
            if mbi.efi64_image_handle is not None:
                items.append(("image_handle", mbi.efi64_image_handle, 8, False))
        for reg in ("gdtr_base", "idtr_base"):
            if reg in self.regs:
                items.append((reg[:4], self.regs[reg], 8, False))
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
                wf = self.walk(froot, page)
                wm = self.walk(root, page)
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
                elif need_w and self.paging.wp and not wm.writable:
                    problems.append(f"{what}: {page:#x} is not writable under M")
                    ok_item = False
                if not ok_item:
                    break
                page += x86.PAGE_SIZE
            checked.append({"what": what, "start": start, "size": size, "ok": ok_item})
        ev: Dict[str, object] = {"checked": checked, "not_checked": not_checked}
        if problems:
            return _result("I7", FAIL, "; ".join(problems[:3]), ev)
        return _result("I7", PASS, "M maps " + ", ".join(c["what"] for c in checked)
                       + " as the firmware does", ev)

    def i8(self) -> CheckResult:
        root = self.root if self.root is not None else self.need_froot()
        lo, hi = self.xen.image_pa_start, self.xen.image_pa_end
        en = enumerate_ranges(self.paging, self.mem, root, lo=lo, hi=hi)
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
            if not attrs & ATTR_W and self.paging.wp:
                problems.append(f"{va:#x}..{end:#x} of the image is read-only (CR0.WP=1)")
                break
            if attrs & ATTR_W:
                rwx += min(end, hi) - max(va, lo)
            cur = max(cur, end)
        if not problems and cur < hi:
            problems.append(f"{cur:#x}..{hi:#x} of the image is not mapped")
        ev: Dict[str, object] = {"root": root, "image_pa_start": lo, "image_pa_end": hi,
                                 "ranges": len(en.ranges), "wp": self.paging.wp,
                                 "rwx_bytes": rwx}
        if problems:
            return _result("I8", FAIL, problems[0], ev)
        return _result("I8", PASS, "the lower half maps the loaded image identity, present, "
                       "writable, executable" + ("" if self.paging.wp else
                                                 " (CR0.WP=0: RW not enforced)"), ev)

    def i9(self) -> CheckResult:
        b = self.state.load_base
        idle = self.xen.pa(IDLE_L4)
        cr3 = self.regs.get("cr3")
        stop = self.state.stop
        ev: Dict[str, object] = {"idle_pg_table": idle, "load_base": b}
        problems = []
        cr3_root = cr3 & self.addr_mask if cr3 is not None else None
        if stop == STOP_AFTER_START_XEN:
            # Measured on the 4.17 boot at construct_dom0: l2_xenmap split into
            # 4 KiB tables, idle_pg_table[0] replaced, NX on the directmap slot.
            raise _Skip("Xen rewrites its boot tables once __start_xen runs: I9 judges the "
                        "trampoline's fix-up, from the relocation loop to __start_xen's entry")
        if cr3_root == idle:
            ev["cr3"] = cr3
        elif stop in I9_STOPS:
            ev["cr3"] = cr3
            if stop == STOP_TRAMPOLINE_CR3 and cr3 is not None:
                problems.append(f"CR3 = {cr3:#x} at the trampoline's CR3 load, not "
                                f"B + offset(idle_pg_table) = {idle:#x}")
        else:
            raise _Skip(f"CR3 {cr3:#x} is not idle_pg_table ({idle:#x}): I9 applies from the "
                        "trampoline's CR3 load" if cr3 is not None else "CR3 not known")
        fps = self.syms.get(XEN_PHYS_START_SYMBOL)
        if fps is not None:  # trampoline_setup stores %esi there before relocating
            stored = struct.unpack("<Q", self.mem.read_phys(self.xen.pa(fps.value), 8))[0]
            ev["xen_phys_start"] = stored
            if stored != b:
                problems.append(f"xen_phys_start = {stored:#x}, not B = {b:#x}")
        kinds: Dict[str, int] = {}
        faults: List[Dict[str, object]] = []
        # At an unnamed stop Xen may have removed entries of its own already:
        # a missing entry is then not a relocation fault.
        strict = stop in I9_STOPS + (STOP_HIGH_START, STOP_START_XEN)
        ev["strict"] = strict
        lo = b + self.syms.offset(PAGE_TABLES_START_SYMBOL)
        hi = b + self.syms.offset(PAGE_TABLES_END_SYMBOL)
        for page in range(lo, hi, x86.PAGE_SIZE):
            hit = self.xen.table_at(page)
            if hit is None:
                continue
            name, _lv, off = hit
            found = self.table(page)
            for i, raw in enumerate(found):
                idx = off // 8 + i
                link = self.xen.link_entry(name, idx)
                if not link & x86.PTE_P:
                    continue  # run-time entries (fills): I5 judges l2_xenmap's
                v = self.xen.judge_entry(name, idx, raw, self.addr_mask)
                if v.kind == RELOCATED and not LoadedXen.same_entry(
                        raw, self.xen.expected_entry(name, idx)):
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
            return _result("I9", FAIL, "; ".join(problems), ev)
        return _result("I9", PASS, f"{kinds.get(RELOCATED, 0)} entries of __page_tables "
                       "relocated exactly once" + (f", CR3 = {cr3:#x}" if cr3_root == idle else ""),
                       ev)

    def i10(self) -> CheckResult:
        root = self.need_root()
        fills = []
        for name, (first, last, _pte) in fill_slots(self.xen).items():
            base = self.xen.pa(name)
            n = 0
            for slot in range(first, last + 1):
                raw = struct.unpack("<Q", self.mem.read_phys(base + 8 * slot, 8))[0]
                if (raw & x86.PTE_P and raw & x86.PTE_PS and raw & x86.PTE_RW
                        and not (raw & x86.PTE_NX and self.paging.nxe)):
                    n += 1
            fills.append({"table": name, "first_slot": first, "last_slot": last, "rwx": n})
        ev: Dict[str, object] = {"fills": fills}
        faults, _seen, _tables = self.upper_tree()
        added: List[Dict[str, object]] = []
        if faults:
            ev["upper_half"] = "not counted: its pointers leave Xen's tables (see I4)"
        else:
            upper_lo = x86.canonical(1 << (MODE_4LEVEL.va_bits - 1), MODE_4LEVEL.va_bits)
            en = enumerate_ranges(self.paging, self.mem, root, lo=upper_lo)
            for va, end, pa, size, attrs in en.ranges:
                if attrs & ATTR_W and not attrs & ATTR_NX:
                    added.append({"va": va, "end": end, "pa": pa, "page_size": size,
                                  "leaves": (end - va) // size})
            ev["upper_rwx_ranges"] = added[:16]
            ev["upper_rwx_leaves"] = sum(a["leaves"] for a in added)
        fill_rwx = sum(f["rwx"] for f in fills)
        ev["fill_rwx"] = fill_rwx
        if fill_rwx or added:
            return _result("I10", WARN, f"the merge adds RWX leaves: {fill_rwx} 2 MiB fill "
                           f"entries (PSE+RWX), {sum(a['leaves'] for a in added)} RWX leaves in "
                           "M's upper half", ev)
        return _result("I10", PASS, "the merge adds no RWX leaf", ev)

    def i11(self) -> CheckResult:
        first, last, _pte = fill_slots(self.xen)[FILL_XENMAP]
        base = self.xen.pa(FILL_XENMAP)
        ents = self.table(base)
        top = None
        for slot in range(first, last + 1):
            raw = ents[slot]
            if raw & x86.PTE_P and raw & x86.PTE_PS:
                top = slot
        if top is None:
            raise _Skip("l2_xenmap has no 2 MiB page over the image yet (not filled)")
        leaf = self.decoder.decode(2, ents[top])
        mapped_end = leaf.addr + x86.SIZE_2M
        image_end = self.xen.image_pa_end
        over = mapped_end - image_end
        va_end = self.syms.virt_start + (top + 1) * x86.SIZE_2M
        ev: Dict[str, object] = {"last_slot": top, "mapped_end_pa": mapped_end,
                                 "mapped_end_va": va_end, "image_end_pa": image_end,
                                 "overreach": max(over, 0)}
        if over <= 0:
            return _result("I11", PASS, "the last l2_xenmap page ends at the image end", ev)
        inside = []
        mbi = self.mbi()
        if mbi is not None and mbi.pa < mapped_end and mbi.pa + mbi.total_size > image_end:
            inside.append("the MBI")
        ev["also_mapped"] = inside
        return _result("I11", WARN, f"l2_xenmap[{top}] maps {over:#x} bytes past the image end "
                       f"({image_end:#x}..{mapped_end:#x}, B + {mapped_end - self.state.load_base:#x})"
                       + (f", including {', '.join(inside)}" if inside else ""), ev)

    def i12(self) -> CheckResult:
        root = self.need_root()
        b = self.state.load_base
        pt_lo = b + self.syms.offset(PAGE_TABLES_START_SYMBOL)
        pt_hi = b + self.syms.offset(PAGE_TABLES_END_SYMBOL)
        ev: Dict[str, object] = {"table": root, "name": self.xen.name_pa(root),
                                 "image_pa_start": self.xen.image_pa_start,
                                 "image_pa_end": self.xen.image_pa_end,
                                 "page_tables_start": pt_lo, "page_tables_end": pt_hi}
        problems = []
        if root % x86.PAGE_SIZE:
            problems.append(f"M at {root:#x} is not 4 KiB aligned")
        if not (self.xen.in_image(root) and self.xen.in_image(root + x86.PAGE_SIZE - 1)):
            problems.append(f"M at {root:#x} is outside Xen's image "
                            f"[{self.xen.image_pa_start:#x}, {self.xen.image_pa_end:#x})")
        if pt_lo <= root < pt_hi:
            problems.append(f"M at {root:#x} ({ev['name']}) is inside __page_tables: "
                            "trampoline_setup would add B to the firmware's entries")
        if problems:
            return _result("I12", FAIL, "; ".join(problems), ev)
        return _result("I12", PASS, f"M at {root:#x} ({ev['name']}): aligned, in the image, "
                       "outside __page_tables", ev)

    def i13(self) -> CheckResult:
        regs = {r: self.regs[r] for r in _GPRS if r in self.regs}
        if not regs:
            raise _Skip("no general registers known")
        low = {r: v for r, v in regs.items() if self.xen.in_image(v)}
        high = {r: v for r, v in regs.items() if self.syms.in_image(v)}
        ev: Dict[str, object] = {"load_address": low, "linked": high,
                                 "static_pointers": static_pointer_count(self.syms)}
        if low and high:
            return _result("I13", WARN, "pointers into Xen at the load address ("
                           + ", ".join(f"%{r}" for r in low) + ") and at the linked address ("
                           + ", ".join(f"%{r}" for r in high) + ") live together: a difference "
                           "or comparison between them is wrong", ev)
        where = "linked" if high else "load address" if low else "none"
        return _result("I13", PASS, f"no mixing: register pointers into Xen are {where}; "
                       f"{ev['static_pointers']} static pointers hold linked VAs (valid only "
                       "while the high half is mapped)", ev)


def _kind_counts(faults: Sequence[PointerFault]) -> Dict[str, int]:
    out: Dict[str, int] = {}
    for f in faults:
        out[f.kind] = out.get(f.kind, 0) + 1
    return out


_STATIC_POINTERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def static_pointer_count(syms) -> int:
    """Qwords in the ELF's initialised non-code sections holding a linked VA
    inside [_start, _end): the static pointers Jan's review is about."""
    hit = _STATIC_POINTERS.get(syms)
    if hit is not None:
        return hit
    n = 0
    lo, hi = syms.image_start, syms.image_end
    for sec in getattr(syms, "sections", ()):
        if sec.type != "SHT_PROGBITS" or not sec.flags & SHF_ALLOC or sec.flags & SHF_EXECINSTR:
            continue
        start = (sec.addr + 7) & ~7
        count = (sec.addr + sec.size - start) // 8
        if count <= 0:
            continue
        vals = struct.unpack(f"<{count}Q", syms.read_linked(start, 8 * count))
        n += sum(1 for v in vals if lo <= v < hi)
    try:
        _STATIC_POINTERS[syms] = n
    except TypeError:
        pass
    return n


_CHECK_METHODS = {cid: getattr(_Checker, cid.lower()) for cid in CHECK_IDS}


def select(only: Optional[Iterable[str]] = None, skip: Optional[Iterable[str]] = None
           ) -> List[str]:
    """The check ids to run, in order; unknown ids are a one-line error."""
    def norm(ids: Iterable[str]) -> List[str]:
        out = []
        for i in ([ids] if isinstance(ids, str) else ids):
            for part in str(i).replace(",", " ").split():
                out.append(part.upper())
        return out
    want = norm(only) if only is not None else None
    drop = set(norm(skip)) if skip is not None else set()
    bad = [b for b in sorted(set(want or ()) | drop) if b not in CHECKS]
    if bad:
        raise GdbextError(f"unknown check {', '.join(bad)}; checks are I0..I13")
    return [c for c in CHECK_IDS if (want is None or c in want) and c not in drop]


def run_checks(state: MergeState, only: Optional[Iterable[str]] = None,
               skip: Optional[Iterable[str]] = None) -> List[CheckResult]:
    """Evaluate I0..I13 (or ``only`` of them, minus ``skip``) in order.

    A check that lacks an input SKIPs with the reason; memory that cannot be
    read is a FAIL naming the address (the table the check needs is gone)."""
    checker = _Checker(state)
    out = []
    for cid in select(only, skip):
        try:
            out.append(_CHECK_METHODS[cid](checker))
        except _Skip as why:
            out.append(_result(cid, SKIP, str(why)))
        except MemoryReadError as err:
            out.append(_result(cid, FAIL, f"memory needed by the check is unreadable: {err}",
                               {"pa": err.pa, "size": err.size}))
        except GdbextError as err:
            # e.g. a build without one of the symbols the check needs
            out.append(_result(cid, SKIP, f"cannot be checked: {err}"))
    return out


def tally(statuses: Iterable[str]) -> Dict[str, int]:
    """PASS/FAIL/WARN/SKIP -> how many (the contract's "counts")."""
    out = {s: 0 for s in STATUSES}
    for status in statuses:
        out[status] += 1
    return out


def counts(results: Sequence[CheckResult]) -> Dict[str, int]:
    return tally(r.status for r in results)


def ok(results: Sequence[CheckResult]) -> bool:
    """No FAIL (WARN and SKIP do not make a run fail)."""
    return not any(r.status == FAIL for r in results)


def results_as_dict(mode: str, stop: Optional[str], state: MergeState,
                    results: Sequence[CheckResult]) -> Dict[str, object]:
    """The ``xen-l4merge-check --json`` object (see the brief's contract)."""
    froot = state.firmware_root
    if froot is None and state.firmware_cr3 is not None:
        froot = state.firmware_cr3 & x86.phys_addr_mask(state.maxphyaddr)
    return {"mode": mode, "stop": stop, "load_base": state.load_base,
            "firmware_root": froot, "table": state.merged_root,
            "checks": [r.as_dict() for r in results],
            "counts": counts(results), "ok": ok(results)}


# --- text -------------------------------------------------------------------------------

_ANSI = {PASS: "\x1b[32m", FAIL: "\x1b[1;31m", WARN: "\x1b[33m", SKIP: "\x1b[2m"}
_ANSI_RESET = "\x1b[0m"
SUMMARY_WIDTH = 100


def _value_text(v: object) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, int):
        return f"{v:#x}" if v >= 10 else str(v)
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_value_text(x)}" for k, x in v.items()) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value_text(x) for x in v) + "]"
    return str(v)


def evidence_lines(result: CheckResult) -> List[str]:
    lines = []
    for key, value in result.evidence.items():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            lines.append(f"    {key}:")
            lines.extend(f"      {_value_text(item)}" for item in value)
        else:
            lines.append(f"    {key}: {_value_text(value)}")
    return lines


def render_text(results: Sequence[CheckResult], color: bool = False) -> str:
    """A tabulate table (id, status, title, summary), then the evidence of
    every FAIL and WARN, one line per item, with the reviewer's point."""
    def status(s: str) -> str:
        return f"{_ANSI[s]}{s}{_ANSI_RESET}" if color else s

    rows = [[r.id, status(r.status), r.title, r.summary] for r in results]
    text = tabulate(rows, headers=["id", "status", "check", "summary"], tablefmt="simple",
                    disable_numparse=True, maxcolwidths=[None, None, 32, SUMMARY_WIDTH])
    out = [text]
    for r in results:
        if r.status not in (FAIL, WARN):
            continue
        out.append("")
        out.append(f"{r.id} {status(r.status)}: {r.summary}")
        if r.reviewer:
            out.append(f"    reviewer: {r.reviewer}")
        out.extend(evidence_lines(r))
    c = counts(results)
    out.append("")
    out.append(", ".join(f"{c[s]} {s}" for s in STATUSES) + (" - ok" if ok(results) else
                                                                  " - FAILED"))
    return "\n".join(out)
