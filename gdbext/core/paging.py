"""x86 paging as the CPU does it: modes, entry decoding, single walks, full enumeration.

Works on plain physical memory (``PhysMemory``); never imports gdb.

Levels are numbered as Xen and the SDM do: 5 (PML5) .. 1 (page table). In PAE
mode the PDPT is level 3 (4 entries); in 32-bit mode the page directory is
level 2 (1024 four-byte entries).

Permissions are combined across levels the way the CPU combines them: a page is
writable (or user) only if every level allows it, and not executable if any
level sets NX (with EFER.NXE). QEMU's ``info mem`` ANDs user/write the same way
but ignores NX.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from .errors import GdbextError, MemoryReadError
from .memory import ZERO_PAGE, PageCache, PhysMemory
from . import x86
from .x86 import (PTE_A, PTE_D, PTE_G, PTE_NX, PTE_P, PTE_PCD, PTE_PS, PTE_PWT, PTE_RW,
                  PTE_US, PTE_AVAIL_HIGH, PTE_AVAIL_LOW, PTE_PKEY_MASK, PTE_PKEY_SHIFT,
                  mask)


class NonCanonicalAddress(GdbextError):
    def __init__(self, va: int, va_bits: int):
        super().__init__(
            f"non-canonical address {va:#x}: with {va_bits}-bit virtual addresses, "
            f"bits 63..{va_bits - 1} must all equal bit {va_bits - 1}")


class PagingOff(GdbextError):
    pass


# --- modes ---------------------------------------------------------------------

@dataclass(frozen=True)
class LevelShape:
    level: int     # 5..1
    shift: int     # VA bits below this level's index
    entries: int   # entries in one table of this level


@dataclass(frozen=True)
class PagingMode:
    name: str                      # "4-level", "5-level", "pae", "32-bit", "off"
    entry_size: int                # bytes per entry
    va_bits: int                   # width of a virtual address
    shapes: Tuple[LevelShape, ...]  # top level first

    @property
    def top_level(self) -> int:
        return self.shapes[0].level if self.shapes else 0

    @property
    def long_mode(self) -> bool:
        # Paging off is not long-mode paging, whatever its entry size says.
        return bool(self.shapes) and self.entry_size == 8 and self.va_bits > 32

    def shape(self, level: int) -> LevelShape:
        return self.shapes[self.top_level - level]


def _long_shapes(levels: int) -> Tuple[LevelShape, ...]:
    return tuple(LevelShape(lv, 12 + 9 * (lv - 1), 512) for lv in range(levels, 0, -1))


MODE_OFF = PagingMode("off", 8, 64, ())
MODE_4LEVEL = PagingMode("4-level", 8, 48, _long_shapes(4))
MODE_5LEVEL = PagingMode("5-level", 8, 57, _long_shapes(5))
MODE_PAE = PagingMode("pae", 8, 32, (LevelShape(3, 30, 4), LevelShape(2, 21, 512),
                                     LevelShape(1, 12, 512)))
MODE_32BIT = PagingMode("32-bit", 4, 32, (LevelShape(2, 22, 1024), LevelShape(1, 12, 1024)))
MODES = {m.name: m for m in (MODE_OFF, MODE_4LEVEL, MODE_5LEVEL, MODE_PAE, MODE_32BIT)}


def mode_from_registers(cr0: int, cr4: int, efer: int) -> PagingMode:
    """The paging mode the CPU is in. Long mode is EFER.LMA, not LME: during
    Xen's 32/64-bit switches LME is set while LMA is still (or again) clear."""
    if not cr0 & x86.CR0_PG:
        return MODE_OFF
    if not cr4 & x86.CR4_PAE:
        return MODE_32BIT
    if not efer & x86.EFER_LMA:
        return MODE_PAE
    return MODE_5LEVEL if cr4 & x86.CR4_LA57 else MODE_4LEVEL


# Leaf attributes packed in a small int, so that comparing and combining them in
# the hot loop costs one integer operation.
ATTR_W = 1 << 0
ATTR_U = 1 << 1
ATTR_NX = 1 << 2
ATTR_G = 1 << 3
ATTR_PWT = 1 << 4
ATTR_PCD = 1 << 5
ATTR_PAT = 1 << 6
ATTR_PKEY_SHIFT = 8
ATTR_NAMES = (("writable", ATTR_W), ("user", ATTR_U), ("nx", ATTR_NX), ("global", ATTR_G),
              ("pwt", ATTR_PWT), ("pcd", ATTR_PCD), ("pat", ATTR_PAT))


def attrs_dict(attrs: int) -> Dict[str, object]:
    out: Dict[str, object] = {name: bool(attrs & bit) for name, bit in ATTR_NAMES}
    out["pkey"] = attrs >> ATTR_PKEY_SHIFT
    return out


def attrs_flags(attrs: int) -> str:
    """Compact text: 'RWX', 'R-X', 'RW-' and U/S, G, cache bits."""
    text = "R" + ("W" if attrs & ATTR_W else "-") + ("-" if attrs & ATTR_NX else "X")
    text += " U" if attrs & ATTR_U else " S"
    for name, bit in (("G", ATTR_G), ("PWT", ATTR_PWT), ("PCD", ATTR_PCD), ("PAT", ATTR_PAT)):
        if attrs & bit:
            text += " " + name
    if attrs >> ATTR_PKEY_SHIFT:
        text += f" pkey={attrs >> ATTR_PKEY_SHIFT}"
    return text


# --- the context a walk needs --------------------------------------------------

@dataclass(frozen=True)
class PagingContext:
    """Everything besides memory that decides how an entry is read."""
    mode: PagingMode
    nxe: bool = True
    pke: bool = False
    pse: bool = True            # CR4.PSE: 4 MiB pages in 32-bit mode
    gb_pages: bool = True       # CPUID PDPE1GB: 1 GiB pages in long mode
    maxphyaddr: int = x86.MAXPHYADDR_ARCH
    wp: bool = True             # CR0.WP (reported; it does not change the tables)

    @classmethod
    def from_registers(cls, cr0: int, cr4: int, efer: int, **kw) -> "PagingContext":
        return cls(mode=mode_from_registers(cr0, cr4, efer),
                   nxe=bool(efer & x86.EFER_NXE),
                   pke=bool(cr4 & x86.CR4_PKE),
                   pse=bool(cr4 & x86.CR4_PSE),
                   wp=bool(cr0 & x86.CR0_WP), **kw)

    def root_from_cr3(self, cr3: int) -> int:
        if self.mode is MODE_OFF:
            raise PagingOff("paging is off (CR0.PG=0): virtual addresses are physical")
        if self.mode is MODE_PAE:
            return cr3 & x86.CR3_PAE_ROOT_MASK
        if self.mode is MODE_32BIT:
            return cr3 & 0xFFFF_F000
        return cr3 & x86.phys_addr_mask(self.maxphyaddr)

    # -- per-level facts, computed once per context -----------------------------

    def leaf_size(self, level: int) -> Optional[int]:
        """The page size a leaf at ``level`` maps, or None if PS is not allowed there."""
        if level == 1:
            return 1 << self.mode.shape(1).shift
        if self.mode is MODE_32BIT:
            return x86.SIZE_4M if (level == 2 and self.pse) else None
        if level == 2:
            return x86.SIZE_2M
        if level == 3 and self.mode.long_mode and self.gb_pages:
            return x86.SIZE_1G
        return None


@dataclass(frozen=True)
class EntryInfo:
    """One entry as the CPU reads it at a given level."""
    level: int
    raw: int
    present: bool
    leaf: bool            # maps a page (PS set where allowed, or level 1)
    addr: int             # the next table's PA, or the page's PA
    page_size: Optional[int]
    reserved: int         # reserved bits found set (0 = none)
    attrs: int            # this entry's own contribution (W/U/NX, and leaf attributes)

    def flag_names(self) -> List[str]:
        names = [name for bit, name in x86.FLAG_NAMES if self.raw & bit]
        if self.leaf and self.level == 1 and self.raw & x86.PTE_PAT_4K:
            names[names.index("PS")] = "PAT"
        if self.leaf and self.level > 1 and self.raw & x86.PTE_PAT_LARGE:
            names.append("PAT")
        if self.raw & PTE_NX and self.raw & PTE_P:
            names.append("NX")
        return names


class Decoder:
    """Decodes entries for one PagingContext; precomputes every mask it needs."""

    def __init__(self, ctx: PagingContext):
        self.ctx = ctx
        mode = ctx.mode
        m = ctx.maxphyaddr
        self.entry_size = mode.entry_size
        if mode.entry_size == 8:
            self.table_addr_mask = x86.phys_addr_mask(m)
            # bits M..51 are reserved in every 64-bit entry
            high_rsvd = mask(52) & ~mask(m)
            if mode is MODE_PAE:
                # PAE has no ignored high bits: 62..M are reserved; 63 is XD
                high_rsvd = mask(63) & ~mask(m)
            nx_rsvd = 0 if ctx.nxe else PTE_NX
            self.nx_bit = PTE_NX if ctx.nxe else 0
        else:
            self.table_addr_mask = 0xFFFF_F000
            high_rsvd = 0
            nx_rsvd = 0
            self.nx_bit = 0
        self.high_rsvd = high_rsvd
        self.nx_rsvd = nx_rsvd
        # Per level: (reserved mask for a pointer, reserved mask for a leaf,
        # leaf size or None, leaf address mask)
        self.levels: Dict[int, Tuple[int, int, Optional[int], int]] = {}
        for shape in mode.shapes:
            lv = shape.level
            size = ctx.leaf_size(lv)
            ptr_rsvd = high_rsvd | nx_rsvd
            if mode.long_mode and lv >= 4:
                ptr_rsvd |= PTE_PS  # PS must be 0 in PML4Es and PML5Es
            if mode is MODE_PAE and lv == 3:
                ptr_rsvd = (mask(64) & ~mask(m)) | x86.PAE_PDPTE_RESERVED
            if mode.long_mode and lv == 3 and size is None:
                ptr_rsvd |= PTE_PS  # PS in a PDPTE without 1 GiB pages
            leaf_rsvd = high_rsvd | nx_rsvd
            if size is not None and lv > 1:
                if mode is MODE_32BIT:
                    # PSE-36: bits 20:13 are PA 39:32, valid below MAXPHYADDR (<= 40)
                    valid_high = max(0, min(m, 40) - 32)
                    leaf_rsvd = x86.PSE36_RESERVED | (
                        mask(x86.PSE36_HIGH_BITS) & ~mask(valid_high)) << x86.PSE36_HIGH_SHIFT
                    leaf_addr = 0xFFC0_0000
                else:
                    # address bits between the PAT bit (12) and the page size are reserved
                    leaf_rsvd |= mask(size.bit_length() - 1) & ~mask(13)
                    leaf_addr = self.table_addr_mask & ~mask(size.bit_length() - 1)
            else:
                leaf_addr = self.table_addr_mask
            self.levels[lv] = (ptr_rsvd, leaf_rsvd, size, leaf_addr)

    def attrs_of(self, raw: int, level: int, leaf: bool) -> int:
        """This entry's own attributes (W/U/NX always; G/PWT/PCD/PAT/pkey for leaves)."""
        if self.ctx.mode is MODE_PAE and level == 3:
            a = ATTR_W | ATTR_U  # PDPTEs carry no permissions
        else:
            a = (ATTR_W if raw & PTE_RW else 0) | (ATTR_U if raw & PTE_US else 0)
            if raw & self.nx_bit:
                a |= ATTR_NX
        if leaf:
            if raw & PTE_G:
                a |= ATTR_G
            if raw & PTE_PWT:
                a |= ATTR_PWT
            if raw & PTE_PCD:
                a |= ATTR_PCD
            pat_bit = x86.PTE_PAT_4K if level == 1 else x86.PTE_PAT_LARGE
            if raw & pat_bit:
                a |= ATTR_PAT
            if self.ctx.pke and self.ctx.mode.long_mode:
                a |= ((raw & PTE_PKEY_MASK) >> PTE_PKEY_SHIFT) << ATTR_PKEY_SHIFT
        return a

    def decode(self, level: int, raw: int) -> EntryInfo:
        ptr_rsvd, leaf_rsvd, size, leaf_addr = self.levels[level]
        present = bool(raw & PTE_P)
        if not present:
            return EntryInfo(level, raw, False, False, 0, None, 0, 0)
        is_leaf = level == 1 or (size is not None and bool(raw & PTE_PS))
        reserved = 0
        if is_leaf:
            reserved = raw & leaf_rsvd
            if self.ctx.mode is MODE_32BIT and level == 2:
                high = (raw >> x86.PSE36_HIGH_SHIFT) & mask(x86.PSE36_HIGH_BITS)
                addr = (raw & leaf_addr) | (high << 32)
            else:
                addr = raw & leaf_addr
        else:
            reserved = raw & ptr_rsvd
            addr = raw & self.table_addr_mask
        return EntryInfo(level, raw, True, is_leaf, addr, size if is_leaf else None, reserved,
                         self.attrs_of(raw, level, is_leaf))


# --- single walk -----------------------------------------------------------------

@dataclass(frozen=True)
class WalkStep:
    level: int
    table_pa: int
    index: int
    entry_pa: int
    entry: EntryInfo


@dataclass
class Walk:
    va: int
    mode: str
    root: int
    steps: List[WalkStep] = field(default_factory=list)
    pa: Optional[int] = None
    page_size: Optional[int] = None
    fault: Optional[str] = None       # None when mapped
    fault_level: Optional[int] = None
    attrs: int = 0                    # effective (combined) attributes when mapped

    @property
    def mapped(self) -> bool:
        return self.fault is None and self.pa is not None

    @property
    def writable(self) -> bool:
        return bool(self.attrs & ATTR_W)

    @property
    def user(self) -> bool:
        return bool(self.attrs & ATTR_U)

    @property
    def nx(self) -> bool:
        return bool(self.attrs & ATTR_NX)


def check_va(mode: PagingMode, va: int) -> None:
    if va < 0 or va > mask(64):
        raise GdbextError(f"address {va:#x} does not fit in 64 bits")
    if mode.long_mode:
        if not x86.is_canonical(va, mode.va_bits):
            raise NonCanonicalAddress(va, mode.va_bits)
    elif va > mask(32):
        raise GdbextError(f"address {va:#x} is wider than 32 bits ({mode.name} paging)")


def walk(ctx: PagingContext, mem: PhysMemory, root: int, va: int,
         decoder: Optional[Decoder] = None) -> Walk:
    """Translate ``va`` through the tables at ``root`` exactly as the CPU would.

    Faults (not present, reserved bit, unreadable table) end the walk and are
    reported in ``Walk.fault``; a non-canonical ``va`` raises NonCanonicalAddress.
    """
    mode = ctx.mode
    if mode is MODE_OFF:
        raise PagingOff("paging is off (CR0.PG=0): virtual addresses are physical")
    check_va(mode, va)
    dec = decoder or Decoder(ctx)
    result = Walk(va=va, mode=mode.name, root=root)
    table = root
    attrs_and = ATTR_W | ATTR_U
    attrs_or = 0
    esz = mode.entry_size
    for shape in mode.shapes:
        idx = (va >> shape.shift) & (shape.entries - 1)
        entry_pa = table + idx * esz
        try:
            raw = int.from_bytes(mem.read_phys(entry_pa, esz), "little")
        except MemoryReadError as err:
            result.fault = f"table at {table:#x} unreadable ({err})"
            result.fault_level = shape.level
            return result
        info = dec.decode(shape.level, raw)
        result.steps.append(WalkStep(shape.level, table, idx, entry_pa, info))
        if not info.present:
            result.fault = "not present"
            result.fault_level = shape.level
            return result
        if info.reserved:
            result.fault = f"reserved bits set ({info.reserved:#x})"
            result.fault_level = shape.level
            return result
        attrs_and &= info.attrs | ~(ATTR_W | ATTR_U)
        attrs_or |= info.attrs & ATTR_NX
        if info.leaf:
            size = info.page_size
            result.pa = info.addr + (va & (size - 1))
            result.page_size = size
            leaf_bits = info.attrs & ~(ATTR_W | ATTR_U | ATTR_NX)
            result.attrs = (attrs_and & (ATTR_W | ATTR_U)) | attrs_or | leaf_bits
            return result
        table = info.addr
    raise AssertionError("walk ran past level 1")  # level 1 is always a leaf


# --- enumeration -------------------------------------------------------------------

# A range, as produced by enumerate_ranges: VA start, VA end (exclusive), PA of
# start, leaf page size, packed attributes.
Range = Tuple[int, int, int, int, int]


def translate(ctx: PagingContext, mem: PhysMemory, cr3: int, va: int) -> Optional[int]:
    """PA of VA as the CPU translates it with CR3 (VA itself with paging off); None if
    unmapped or the walk cannot be read."""
    if ctx.mode is MODE_OFF:
        return va
    try:
        w = walk(ctx, mem, ctx.root_from_cr3(cr3), va)
    except GdbextError:
        return None
    return w.pa if w.mapped else None


@dataclass
class Note:
    """Something the enumeration met and reports rather than maps."""
    kind: str        # "cycle", "reserved", "unreadable"
    level: int
    va: int
    entry_pa: int
    entry: int
    target: int
    detail: str = ""

    def as_dict(self) -> Dict[str, object]:
        return {"kind": self.kind, "level": self.level, "va": self.va, "entry_pa": self.entry_pa,
                "entry": self.entry, "target": self.target, "detail": self.detail}


@dataclass
class Enumeration:
    mode: str
    root: int
    ranges: List[Range]
    notes: List[Note]
    tables: Dict[Tuple[int, int], int]   # (table PA, level) -> number of present entries
    pages_read: int = 0
    # Why the enumeration stopped early (the hard cap on work), else None: ``ranges``
    # are then the ones found so far, in order.
    stopped: Optional[str] = None
    # ``limit`` ranges were found and the enumeration stopped there (more may exist).
    limited: bool = False
    notes_dropped: int = 0               # notes found beyond MAX_NOTES, counted only


# Hard caps that keep any table, however built, to bounded time and memory: a table
# whose n entries all point back at itself maps n^levels ranges (n=32: 1,048,576
# ranges, 408 MiB without the cap). A unit of work is one range started or one child
# range carried up a level; the real guest's trees need a few thousand.
MAX_WORK = 100_000
MAX_NOTES = 1_000
MAX_TREE_ROWS = 100_000


def stopped_note(work: int) -> str:
    return (f"stopped after {work} ranges (gdbext's cap on work, for tables that map "
            f"more than that, e.g. entries pointing back at their own table): the ranges "
            f"shown are the first ones; narrow with --range")


class _Budget:
    """Work, notes and the top-level limit shared by the windows of one enumeration."""

    def __init__(self, max_work: int, max_notes: int, limit: Optional[int]):
        self.work = 0
        self.max_work = max_work
        self.max_notes = max_notes
        self.limit = limit
        self.top_ranges = 0
        self.stopped = False
        self.limited = False
        self.notes_dropped = 0

    def spend(self) -> bool:
        """One unit of work; False once the cap is reached (the caller stops)."""
        self.work += 1
        if self.work > self.max_work:
            self.work = self.max_work
            self.stopped = True
        return not self.stopped

    @property
    def done(self) -> bool:
        return self.stopped or self.limited


# Cleared before comparing entries: accessed/dirty and software bits are not
# attributes. PAE has no software bits above 51 (they are reserved there).
_STATUS_BITS_LONG = PTE_A | PTE_D | PTE_AVAIL_LOW | PTE_AVAIL_HIGH
_STATUS_BITS_PAE = PTE_A | PTE_D | PTE_AVAIL_LOW


def _repeat_u64(value: int) -> int:
    return int.from_bytes(struct.pack("<512Q", *([value] * 512)), "little")


_CLEAR_MASK_LONG = _repeat_u64(mask(64) & ~_STATUS_BITS_LONG)
_CLEAR_MASK_PAE = _repeat_u64(mask(64) & ~_STATUS_BITS_PAE)
_U64_512 = struct.Struct("<512Q")
_TABLE_STRUCTS: Dict[Tuple[int, int], struct.Struct] = {}


def read_table(mode: PagingMode, mem: PhysMemory, table_pa: int, level: int
               ) -> Tuple[bytes, Tuple[int, ...]]:
    """One table's bytes and its entries as integers (a PAE PDPT is 4 entries)."""
    shape = mode.shape(level)
    key = (shape.entries, mode.entry_size)
    layout = _TABLE_STRUCTS.get(key)
    if layout is None:
        layout = struct.Struct(f"<{shape.entries}{'Q' if mode.entry_size == 8 else 'I'}")
        _TABLE_STRUCTS[key] = layout
    data = mem.read_phys(table_pa, layout.size)
    return data, layout.unpack(data)


# _Enumerator._uniform: the staircase 0, size, 2*size, ... of 512 qwords per page size,
# and 1 in each of 512 qwords (so e0m * _QWORD_ONES puts e0m in every qword).
_UNIFORM_STEPS: Dict[int, int] = {}
_QWORD_ONES = _repeat_u64(1)


class _Enumerator:
    def __init__(self, ctx: PagingContext, cache: PageCache, lo: int, hi: int,
                 follow_cycles: bool = True, budget: Optional[_Budget] = None):
        self.budget = budget if budget is not None else _Budget(MAX_WORK, MAX_NOTES, None)
        self.ctx = ctx
        self.mode = ctx.mode
        self.dec = Decoder(ctx)
        self.cache = cache
        self.lo = lo            # limits in the mode's non-canonical offset space
        self.hi = hi
        self.follow_cycles = follow_cycles
        self.memo: Dict[Tuple[int, int], List[Range]] = {}
        # With cycles not followed, a subtree's ranges depend on the path to it.
        self.use_memo = follow_cycles
        if ctx.mode is MODE_PAE:
            self.status_bits, self.clear_mask = _STATUS_BITS_PAE, _CLEAR_MASK_PAE
        else:
            self.status_bits, self.clear_mask = _STATUS_BITS_LONG, _CLEAR_MASK_LONG
        self.notes: List[Note] = []
        self.tables: Dict[Tuple[int, int], int] = {}
        self.path: List[int] = []

    def scan(self, table_pa: int, level: int, base: int) -> List[Range]:
        """Ranges (in offsets from this table's VA ``base``) mapped under one table."""
        shape = self.mode.shape(level)
        span = shape.entries << shape.shift
        whole = self.lo <= base and base + span <= self.hi
        key = (table_pa, level)
        if whole and self.use_memo:
            cached = self.memo.get(key)
            if cached is not None:
                return cached
        page, ents = read_table(self.mode, self.cache, table_pa, level)
        result: Optional[List[Range]] = None
        if page == ZERO_PAGE:
            self.tables[key] = 0
            result = []
        elif whole and self.mode.entry_size == 8 and len(ents) == 512:
            result = self._uniform(page, ents, level, shape.shift)
            if result is not None:
                self.tables[key] = 512
        if result is None:
            result = self._scan_entries(ents, table_pa, level, base, shape)
        if whole and self.use_memo and not self.budget.done:
            self.memo[key] = result
        return result

    def _note(self, note: Note) -> None:
        if len(self.notes) < self.budget.max_notes:
            self.notes.append(note)
        else:
            self.budget.notes_dropped += 1

    def _uniform(self, page: bytes, ents: Sequence[int], level: int, shift: int
                 ) -> Optional[List[Range]]:
        """Fast path: a table whose 512 entries are leaves mapping one contiguous run
        with the same attributes (identity maps, Xen's image map) is one range.
        Checked with whole-page integer arithmetic, so it costs microseconds."""
        e0 = ents[0]
        info = self.dec.decode(level, e0)
        if not info.present or not info.leaf or info.reserved:
            return None
        size = info.page_size
        e0m = e0 & ~self.status_bits
        last = e0m + 511 * size
        if last > mask(64) or self.dec.decode(level, ents[511]).reserved:
            return None
        # The 512 qwords e0m, e0m + size, ... as one integer: a per-size staircase
        # (computed once) plus e0m in every qword.
        steps = _UNIFORM_STEPS.get(size)
        if steps is None:
            steps = _UNIFORM_STEPS[size] = int.from_bytes(
                _U64_512.pack(*range(0, 512 * size, size)), "little")
        expected = steps + e0m * _QWORD_ONES
        if int.from_bytes(page, "little") & self.clear_mask != expected:
            return None
        return [(0, 512 << shift, info.addr, size, info.attrs)]

    def _scan_entries(self, ents: Sequence[int], table_pa: int, level: int, base: int,
                      shape: LevelShape) -> List[Range]:
        dec = self.dec
        esz = self.mode.entry_size
        shift = shape.shift
        ptr_rsvd, leaf_rsvd, leaf_size, leaf_addr = dec.levels[level]
        out: List[Range] = []
        # the run being built: start offset, end offset, pa at start, size, attrs
        r_va = r_end = r_pa = r_size = r_attrs = -1
        first = 0
        last = shape.entries
        lo, hi = self.lo, self.hi
        if lo > base:
            first = (lo - base) >> shift
        if hi < base + (shape.entries << shift):
            last = ((hi - base) + (1 << shift) - 1) >> shift
        present = 0
        # In long mode the top table's upper half is the upper canonical half: a
        # range must never run from entry 255 into 256 (non-canonical in between).
        hole = (shape.entries // 2 if self.mode.long_mode and level == self.mode.top_level
                else -1)
        budget = self.budget
        # --limit stops the enumeration once a table has that many ranges (a level above
        # may still merge some: then fewer are shown, and the head says "the first").
        top_limit = budget.limit
        self.path.append(table_pa)
        try:
            for idx in range(first, last):
                if budget.done:
                    break
                if top_limit is not None and len(out) >= top_limit:
                    budget.limited = True
                    break
                if idx == hole and r_va >= 0:
                    out.append((r_va, r_end, r_pa, r_size, r_attrs))
                    r_va = r_end = r_pa = r_size = r_attrs = -1
                raw = ents[idx]
                if not raw & PTE_P:
                    continue
                present += 1
                off = idx << shift
                info = dec.decode(level, raw)
                if info.reserved:
                    self._note(Note("reserved", level, base + off, table_pa + idx * esz,
                                           raw, info.addr,
                                           f"reserved bits {info.reserved:#x}: the CPU faults here"))
                    continue
                if info.leaf:
                    size = info.page_size
                    a = info.attrs
                    pa = info.addr
                    if a == r_attrs and size == r_size and off == r_end and pa == r_pa + (
                            r_end - r_va):
                        r_end = off + (1 << shift)
                        continue
                    if r_va >= 0:
                        out.append((r_va, r_end, r_pa, r_size, r_attrs))
                    budget.spend()   # over the cap: no new entries (loop head), keep this one
                    r_va, r_end, r_pa, r_size, r_attrs = off, off + (1 << shift), pa, size, a
                    continue
                # a pointer to the next level
                target = info.addr
                if target in self.path:
                    self._note(Note(
                        "cycle", level, base + off, table_pa + idx * esz, raw, target,
                        "points to this table" if target == table_pa else
                        "points to a table above it on this path"))
                    if not self.follow_cycles:
                        continue
                try:
                    child = self.scan(target, level - 1, base + off)
                except MemoryReadError as err:
                    self._note(Note("unreadable", level, base + off,
                                           table_pa + idx * esz, raw, target, str(err)))
                    continue
                mine_and = info.attrs | ~(ATTR_W | ATTR_U)
                mine_or = info.attrs & ATTR_NX
                for c_va, c_end, c_pa, c_size, c_attrs in child:
                    a = (c_attrs & mine_and) | mine_or
                    c_va += off
                    c_end += off
                    if a == r_attrs and c_size == r_size and c_va == r_end and c_pa == r_pa + (
                            r_end - r_va):
                        r_end = c_end
                        continue
                    if r_va >= 0:
                        out.append((r_va, r_end, r_pa, r_size, r_attrs))
                    # Over the cap, what was found below is still carried up (bounded by
                    # the work already done, once per level); nothing new is read.
                    budget.spend()
                    r_va, r_end, r_pa, r_size, r_attrs = c_va, c_end, c_pa, c_size, a
        finally:
            self.path.pop()
        if r_va >= 0:
            out.append((r_va, r_end, r_pa, r_size, r_attrs))
        self.tables[(table_pa, level)] = present
        return out


def enumerate_ranges(ctx: PagingContext, mem: PhysMemory, root: int,
                     lo: Optional[int] = None, hi: Optional[int] = None,
                     follow_cycles: bool = True, limit: Optional[int] = None,
                     max_work: int = MAX_WORK, max_notes: int = MAX_NOTES) -> Enumeration:
    """Every mapping under ``root``, coalesced into ranges contiguous in VA and PA
    with the same effective attributes and page size.

    ``lo``/``hi`` (canonical VAs, ``hi`` exclusive) limit the walk: tables outside
    the window are not read. Each table page is read at most once (through a
    PageCache) and a subtree shared by several entries is scanned once.

    ``limit`` stops the enumeration once that many ranges are found (``limited``);
    ``max_work`` caps the work on any table (``stopped``), ``max_notes`` the notes kept.
    """
    mode = ctx.mode
    if mode is MODE_OFF:
        raise PagingOff("paging is off (CR0.PG=0): there are no page tables to walk")
    cache = mem if isinstance(mem, PageCache) else PageCache(mem)
    before = cache.pages_read
    va_mask = mask(mode.va_bits)
    top = mode.shapes[0]
    full = top.entries << top.shift
    # Work in the mode's offset space (canonical VA with the sign bits dropped).
    # A canonical window that wraps from the lower to the upper half is split.
    windows: List[Tuple[int, int]] = []
    if lo is None and hi is None:
        windows.append((0, full))
    else:
        lo_c = 0 if lo is None else lo
        hi_c = (mask(64) + 1) if hi is None else hi
        if hi_c <= lo_c:
            raise GdbextError(f"empty range {lo_c:#x}..{hi_c:#x}: the end must be above the start")
        if mode.long_mode:
            half = 1 << (mode.va_bits - 1)
            upper = mask(64) + 1 - half  # first canonical upper-half address
            # lower half: [0, half); upper half: [upper, 2^64)
            l_lo, l_hi = max(lo_c, 0), min(hi_c, half)
            if l_lo < l_hi:
                windows.append((l_lo, l_hi))
            u_lo, u_hi = max(lo_c, upper), hi_c
            if u_lo < u_hi:
                windows.append(((u_lo & va_mask), (u_hi - upper) + half))
        else:
            windows.append((max(lo_c, 0), min(hi_c, full)))
    all_ranges: List[Range] = []
    notes: List[Note] = []
    tables: Dict[Tuple[int, int], int] = {}
    budget = _Budget(max_work, max_notes, limit if limit else None)
    for w_lo, w_hi in windows:
        if budget.done:
            break
        en = _Enumerator(ctx, cache, w_lo, w_hi, follow_cycles, budget)
        try:
            rel = en.scan(root, top.level, 0)
        except MemoryReadError as err:
            raise GdbextError(f"the root table at {root:#x} cannot be read: {err}") from None
        for r_va, r_end, r_pa, r_size, r_attrs in rel:
            c_lo, c_hi = max(r_va, w_lo), min(r_end, w_hi)
            if c_lo >= c_hi:
                continue
            r_pa += c_lo - r_va
            va = x86.canonical(c_lo, mode.va_bits) if mode.long_mode else c_lo
            end = va + (c_hi - c_lo)
            if all_ranges:
                p = all_ranges[-1]
                if p[1] == va and p[4] == r_attrs and p[3] == r_size and p[2] + (p[1] - p[0]) == r_pa:
                    all_ranges[-1] = (p[0], end, p[2], p[3], p[4])
                    continue
            all_ranges.append((va, end, r_pa, r_size, r_attrs))
        for n in en.notes:
            n.va = x86.canonical(n.va, mode.va_bits) if mode.long_mode else n.va
        notes.extend(en.notes)
        tables.update(en.tables)
    if limit and len(all_ranges) >= limit and (budget.limited or len(windows) > 1):
        budget.limited = budget.limited or len(all_ranges) > limit
        del all_ranges[limit:]
    return Enumeration(mode.name, root, all_ranges, notes, tables, cache.pages_read - before,
                       stopped=stopped_note(budget.work) if budget.stopped else None,
                       limited=budget.limited, notes_dropped=budget.notes_dropped)


def table_pages(ctx: PagingContext, mem: PhysMemory, root: int) -> List[Tuple[int, int]]:
    """(table PA, level) of every table reachable from ``root``, each once.

    Used by the benchmark to list the pages to read beforehand, and by renderers
    that show the tree."""
    mode = ctx.mode
    dec = Decoder(ctx)
    seen: Dict[Tuple[int, int], None] = {}
    stack = [(root, mode.top_level)]
    while stack:
        pa, level = stack.pop()
        if (pa, level) in seen:
            continue
        seen[(pa, level)] = None
        if level == 1:
            continue
        try:
            _, ents = read_table(mode, mem, pa, level)
        except MemoryReadError:
            continue
        for raw in ents:
            if raw & PTE_P:
                info = dec.decode(level, raw)
                if not info.leaf and not info.reserved:
                    stack.append((info.addr, level - 1))
    return list(seen)


def pa_to_vas(ranges: Sequence[Range], pa: int) -> List[Tuple[int, Range]]:
    """Every VA that maps ``pa``, with the range it comes from."""
    out = []
    for r in ranges:
        va, end, r_pa = r[0], r[1], r[2]
        if r_pa <= pa < r_pa + (end - va):
            out.append((va + (pa - r_pa), r))
    return out


def tree_rows(ctx: PagingContext, mem: PhysMemory, root: int, lo: Optional[int] = None,
              hi: Optional[int] = None, namer=None, entry_note=None,
              max_rows: int = MAX_TREE_ROWS) -> List[str]:
    """The tree table by table: one line per pointer, runs of leaves folded into one
    line, shared subtrees shown once, cycles named and not expanded.

    ``namer(pa)`` names tables and targets; ``entry_note(entry_pa, raw)`` may add a
    word on a pointer (e.g. how a Xen table's entry compares with its link value).
    At most ``max_rows`` lines are made (--limit, or the cap on work); a last line says
    where it stopped."""
    mode = ctx.mode
    if mode is MODE_OFF:
        raise PagingOff("paging is off (CR0.PG=0): there are no page tables to walk")
    dec = Decoder(ctx)
    cache = mem if isinstance(mem, PageCache) else PageCache(mem)
    lines = _RowList(max_rows)
    shown: Dict[Tuple[int, int], None] = {}
    esz = mode.entry_size

    def vaddr(off: int) -> int:
        return x86.canonical(off, mode.va_bits) if mode.long_mode else off

    def name_of(pa: int) -> str:
        n = namer(pa) if namer else None
        return f" [{n}]" if n else ""

    def visit(table_pa: int, level: int, base: int, depth: int, path: List[int]) -> None:
        pad = "  " * depth
        key = (table_pa, level)
        head = f"{pad}L{level} table {table_pa:#x}{name_of(table_pa)}"
        if key in shown:
            lines.append(head + "  (shown above)")
            return
        shown[key] = None
        lines.append(head)
        shape = mode.shape(level)
        try:
            _, ents = read_table(mode, cache, table_pa, level)
        except MemoryReadError as err:
            lines.append(f"{pad}  unreadable: {err}")
            return
        run: Optional[list] = None  # [first idx, last idx, va, pa, size, attrs, raw flags]

        def flush() -> None:
            if run is None:
                return
            i0, i1, va0, pa0, size, attrs, _ = run
            count = i1 - i0 + 1
            span = count * size
            idx = f"[{i0:#05x}]" if count == 1 else f"[{i0:#05x}-{i1:#05x}]"
            lines.append(f"{pad}  L{level}{idx} {count} x {x86.size_name(size)}  "
                         f"va {vaddr(va0):#x}-{vaddr(va0) + span:#x} -> pa {pa0:#x}  "
                         f"{attrs_flags(attrs)}{name_of(pa0)}")

        for idx, raw in enumerate(ents):
            off = base + (idx << shape.shift)
            if not raw & PTE_P:
                continue
            if lo is not None or hi is not None:
                v = vaddr(off)
                if (hi is not None and v >= hi) or (lo is not None and v + (1 << shape.shift) <= lo):
                    continue
            info = dec.decode(level, raw)
            if info.leaf and not info.reserved:
                leaf_addr_mask = dec.levels[level][3]
                flags = raw & ~(_STATUS_BITS_LONG | leaf_addr_mask)
                if (run is not None and run[1] == idx - 1 and run[6] == flags
                        and info.addr == run[3] + (idx - run[0]) * info.page_size):
                    run[1] = idx
                    continue
                flush()
                run = [idx, idx, off, info.addr, info.page_size, info.attrs, flags]
                continue
            flush()
            run = None
            text = (f"{pad}  L{level}[{idx:#05x}] = {raw:0{esz * 2}x}  va {vaddr(off):#x}  "
                    f"{' '.join(info.flag_names())}")
            if info.reserved:
                lines.append(text + f"  RESERVED BITS {info.reserved:#x}: the CPU faults here")
                continue
            if info.addr == table_pa or info.addr in path:
                lines.append(text + f" -> {info.addr:#x}  cycle: points back to a table on "
                                    "this path (not expanded)")
                continue
            note = entry_note(table_pa + idx * esz, raw) if entry_note else None
            lines.append(text + f" -> table {info.addr:#x}" + (f"  ({note})" if note else ""))
            visit(info.addr, level - 1, off, depth + 2, path + [table_pa])
        flush()

    try:
        visit(root, mode.top_level, 0, 0, [])
    except _RowsFull:
        out = list(lines)
        out.append(f"... stopped after {max_rows} lines (raise --limit, or narrow with "
                   f"--range)" if max_rows < MAX_TREE_ROWS else
                   f"... stopped after {max_rows} lines (gdbext's cap on work): narrow "
                   f"with --range")
        return out
    return list(lines)


class _RowsFull(Exception):
    pass


class _RowList(list):
    """A list of lines that ends the tree walk when it is full."""

    def __init__(self, max_rows: int):
        super().__init__()
        self.max_rows = max_rows

    def append(self, line: str) -> None:
        if len(self) >= self.max_rows:
            raise _RowsFull()
        super().append(line)
