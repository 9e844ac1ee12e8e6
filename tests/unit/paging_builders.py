"""Helpers that build x86 page tables in SyntheticMemory, for every paging mode.

Nothing here uses gdbext.core.paging's Decoder: entries are encoded by hand from
the Intel SDM (vol. 3A, ch. 4) so that tests compare the decoder against an
independent encoding.

    b = PTBuilder("4-level")
    b.map(0xffff_8000_0000_0000, 0x20_0000, SIZE_2M, flags=P | RW)
    en = b.enumerate()
"""

from __future__ import annotations

from collections import Counter
from typing import Dict, Iterable, List, Optional, Tuple, Union

from gdbext.core import paging
from gdbext.core.memory import SyntheticMemory
from gdbext.core.paging import MODES, PagingContext, PagingMode
from gdbext.core.x86 import (PTE_A, PTE_D, PTE_G, PTE_NX, PTE_P, PTE_PAT_4K, PTE_PAT_LARGE,
                             PTE_PCD, PTE_PS, PTE_PWT, PTE_RW, PTE_US, SIZE_1G, SIZE_2M,
                             SIZE_4K, SIZE_4M)

P, RW, US, PWT, PCD, A, D, PS, G, NX = (PTE_P, PTE_RW, PTE_US, PTE_PWT, PTE_PCD, PTE_A,
                                        PTE_D, PTE_PS, PTE_G, PTE_NX)
# Flags for a plain "everything allowed" entry.
PRW = P | RW
PRWU = P | RW | US

TABLE_BASE = 0x10_0000      # table pages are handed out from here up
PAGE = 0x1000

MASK64 = (1 << 64) - 1


def canonical(va: int, va_bits: int) -> int:
    """Sign-extend (written here rather than imported, for independence)."""
    va &= (1 << va_bits) - 1
    if va >> (va_bits - 1):
        va |= MASK64 ^ ((1 << va_bits) - 1)
    return va


def mode_of(mode: Union[str, PagingMode]) -> PagingMode:
    return MODES[mode] if isinstance(mode, str) else mode


def entry_bytes(mode: PagingMode) -> int:
    return 4 if mode.name == "32-bit" else 8


def level_shift(mode: PagingMode, level: int) -> int:
    if mode.name == "32-bit":
        return {2: 22, 1: 12}[level]
    return 12 + 9 * (level - 1)


def level_entries(mode: PagingMode, level: int) -> int:
    if mode.name == "32-bit":
        return 1024
    if mode.name == "pae" and level == 3:
        return 4
    return 512


def size_level(mode: PagingMode, size: int) -> int:
    """The level whose leaves map pages of ``size``."""
    if size == SIZE_4K:
        return 1
    if mode.name == "32-bit":
        if size == SIZE_4M:
            return 2
    elif size == SIZE_2M:
        return 2
    elif size == SIZE_1G and mode.name in ("4-level", "5-level"):
        return 3
    raise ValueError(f"no {size:#x} pages in {mode.name} mode")


def leaf_entry(mode: Union[str, PagingMode], level: int, pa: int, flags: int = PRWU,
               pat: bool = False) -> int:
    """Encode a leaf mapping ``pa`` at ``level``. Sets PS for level > 1 and
    places the PAT bit where that level keeps it. A 32-bit 4 MiB leaf puts PA
    bits 39:32 in entry bits 20:13 (PSE-36)."""
    mode = mode_of(mode)
    if level == 1:
        return pa | flags | (PTE_PAT_4K if pat else 0)
    value = flags | PS | (PTE_PAT_LARGE if pat else 0)
    if mode.name == "32-bit":
        assert pa % SIZE_4M == 0 and pa < (1 << 40)
        return value | (pa & 0xFFC0_0000) | (((pa >> 32) & 0xFF) << 13)
    return value | pa


def pointer_entry(pa: int, flags: int = PRWU) -> int:
    return pa | flags


class CountingMemory:
    """Wraps a backend and counts reads per 4 KiB page (and calls)."""

    def __init__(self, backend):
        self.backend = backend
        self.page_reads: Counter = Counter()
        self.calls = 0

    def read_phys(self, pa: int, size: int) -> bytes:
        self.calls += 1
        page = pa & ~(PAGE - 1)
        while page < pa + size:
            self.page_reads[page] += 1
            page += PAGE
        return self.backend.read_phys(pa, size)

    @property
    def max_reads_per_page(self) -> int:
        return max(self.page_reads.values(), default=0)


class PTBuilder:
    """Builds page tables for one paging mode in a SyntheticMemory.

    ``map(va, pa, size, flags)`` creates missing intermediate tables with
    ``table_flags`` (by mode: P|RW|US, or just P for PAE PDPTEs). ``point``,
    ``set_entry`` and ``update`` write arbitrary entries for corner cases.
    """

    def __init__(self, mode: Union[str, PagingMode] = "4-level", *,
                 mem: Optional[SyntheticMemory] = None, ram_size: int = 1 << 32,
                 table_base: int = TABLE_BASE, pae_root_offset: int = 0x40,
                 table_flags: Optional[int] = None):
        self.mode = mode_of(mode)
        assert self.mode.name != "off"
        self.mem = mem if mem is not None else SyntheticMemory(ram_size)
        self.next_table = table_base
        self.table_flags = PRWU if table_flags is None else table_flags
        self.tables: Dict[int, int] = {}        # table PA -> level it was made for
        if self.mode.name == "pae":
            page = self.alloc_page()
            self.root = page + pae_root_offset    # a 32-byte aligned PDPT inside a page
            self.tables[self.root] = 3
        else:
            self.root = self.alloc_table(self.mode.top_level)

    # -- allocation ----------------------------------------------------------------

    def alloc_page(self) -> int:
        pa = self.next_table
        self.next_table += PAGE
        return pa

    def alloc_table(self, level: int) -> int:
        pa = self.alloc_page()
        self.tables[pa] = level
        return pa

    # -- raw entries ------------------------------------------------------------------

    @property
    def esz(self) -> int:
        return entry_bytes(self.mode)

    def index(self, va: int, level: int) -> int:
        return (va >> level_shift(self.mode, level)) & (level_entries(self.mode, level) - 1)

    def entry_pa(self, table: int, index: int) -> int:
        return table + index * self.esz

    def set_entry(self, table: int, index: int, value: int) -> int:
        epa = self.entry_pa(table, index)
        self.mem.write(epa, value.to_bytes(self.esz, "little"))
        return epa

    def get_entry(self, table: int, index: int) -> int:
        return int.from_bytes(self.mem.read_phys(self.entry_pa(table, index), self.esz), "little")

    def default_table_flags(self, level: int) -> int:
        if self.mode.name == "pae" and level == 3:
            return P            # PDPTEs have no RW/US (they are reserved there)
        return self.table_flags

    # -- paths ---------------------------------------------------------------------

    def table_at(self, va: int, level: int, create: bool = True,
                 table_flags: Optional[Dict[int, int]] = None) -> int:
        """The table of ``level`` on ``va``'s path, creating the path down to it.
        ``table_flags`` maps level -> flags for pointer entries made at that level."""
        table = self.root
        for lv in range(self.mode.top_level, level, -1):
            idx = self.index(va, lv)
            raw = self.get_entry(table, idx)
            if raw & P and not (raw & PS and lv > 1 and self._ps_is_leaf(lv)):
                table = raw & 0x000F_FFFF_FFFF_F000 if self.esz == 8 else raw & 0xFFFF_F000
                continue
            if not create:
                raise KeyError(f"no level-{lv - 1} table for {va:#x}")
            new = self.alloc_table(lv - 1)
            flags = (table_flags or {}).get(lv, self.default_table_flags(lv))
            self.set_entry(table, idx, pointer_entry(new, flags))
            table = new
        return table

    def _ps_is_leaf(self, level: int) -> bool:
        if self.mode.name == "32-bit":
            return level == 2
        return level in (2, 3) and not (self.mode.name == "pae" and level == 3)

    def entry_pa_for(self, va: int, level: int) -> int:
        return self.entry_pa(self.table_at(va, level, create=False), self.index(va, level))

    # -- mapping -------------------------------------------------------------------

    def map(self, va: int, pa: int, size: int = SIZE_4K, flags: int = PRWU, *,
            pat: bool = False, table_flags: Optional[Dict[int, int]] = None,
            raw_extra: int = 0) -> int:
        """Map one page; returns the leaf entry's PA. ``raw_extra`` is ORed into the
        entry as is (for reserved or ignored bits)."""
        level = size_level(self.mode, size)
        assert va % size == 0 and pa % size == 0, (hex(va), hex(pa), hex(size))
        table = self.table_at(va, level, table_flags=table_flags)
        return self.set_entry(table, self.index(va, level),
                              leaf_entry(self.mode, level, pa, flags, pat) | raw_extra)

    def map_range(self, va: int, pa: int, length: int, size: int = SIZE_4K,
                  flags: int = PRWU, **kw) -> List[int]:
        return [self.map(va + off, pa + off, size, flags, **kw) for off in range(0, length, size)]

    def point(self, va: int, level: int, target: int, flags: Optional[int] = None,
              raw_extra: int = 0) -> int:
        """Write a pointer entry at ``level`` on ``va``'s path, to ``target``."""
        table = self.table_at(va, level)
        f = self.default_table_flags(level) if flags is None else flags
        return self.set_entry(table, self.index(va, level), pointer_entry(target, f) | raw_extra)

    def update(self, va: int, level: int, set_bits: int = 0, clear_bits: int = 0) -> int:
        """Set/clear bits of the existing entry at ``level`` on ``va``'s path."""
        table = self.table_at(va, level, create=False)
        idx = self.index(va, level)
        value = (self.get_entry(table, idx) | set_bits) & ~clear_bits
        self.set_entry(table, idx, value)
        return value

    # -- running the code under test -------------------------------------------------------------

    def ctx(self, **kw) -> PagingContext:
        return PagingContext(mode=self.mode, **kw)

    def walk(self, va: int, mem=None, **kw) -> paging.Walk:
        return paging.walk(self.ctx(**kw), mem if mem is not None else self.mem, self.root, va)

    def enumerate(self, lo: Optional[int] = None, hi: Optional[int] = None, mem=None,
                  follow_cycles: bool = True, **kw) -> paging.Enumeration:
        return paging.enumerate_ranges(self.ctx(**kw), mem if mem is not None else self.mem,
                                       self.root, lo, hi, follow_cycles=follow_cycles)


def find_range(ranges: Iterable[Tuple[int, int, int, int, int]], va: int):
    for r in ranges:
        if r[0] <= va < r[1]:
            return r
    return None


def notes_of(en: paging.Enumeration, kind: str) -> List[paging.Note]:
    return [n for n in en.notes if n.kind == kind]
