"""Xen's image in guest memory: where each Xen object is once loaded at B, and
what a pointer found in a Xen table means.

This is the one home for the load-address arithmetic used by the annotated
output, the merge checks and the diagrams.  Never imports ``gdb``.

* PA(S) = B + offset(S) for S in [_start, _end), offset from ``__image_base__``
  (``XenSymbols.offset``); B itself is PA(``__image_base__``).
* Every qword stored in a Xen boot table is a link-time value: it assumes
  B = 0, so its address part is offset(target).  ``trampoline_setup`` adds B
  once.  A pointer found in memory is therefore, relative to its link value L:

  ==================  ====================================================
  ``relocated``       address == L + B (what Xen's own fix-up produces)
  ``unrelocated``     address == L: points at firmware memory (the RFC's bug)
  ``relocated-twice`` address == L + 2B (a fix-up applied twice)
  ``foreign``         anything else (or a link value of 0: written at run
                      time, e.g. l2_xenmap's fills)
  ``absolute``        an entry Xen never relocates (l1_directmap) and found
                      equal to its link value
  ``not-present``     P clear: not a pointer
  ==================  ====================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from . import x86

RELOCATED = "relocated"
UNRELOCATED = "unrelocated"
RELOCATED_TWICE = "relocated-twice"
FOREIGN = "foreign"
ABSOLUTE = "absolute"
NOT_PRESENT = "not-present"
POINTER_CLASSES = (RELOCATED, UNRELOCATED, RELOCATED_TWICE, FOREIGN, ABSOLUTE, NOT_PRESENT)

# Boot tables whose link-time entries are absolute PAs that no fix-up touches.
ABSOLUTE_TABLES = ("l1_directmap",)

# Entries compared by address only: A and D are set by the CPU as it walks.
_HW_SET_BITS = x86.PTE_A | x86.PTE_D


@dataclass(frozen=True)
class EntryVerdict:
    """One entry of a Xen table compared with its link-time value."""
    table: str            # e.g. "idle_pg_table"
    index: int            # entry index inside the whole table (0..512*pages-1)
    entry_pa: int
    found: int            # the qword in guest memory
    link: int             # the qword in the ELF (B = 0)
    kind: str             # one of POINTER_CLASSES
    target_pa: int        # address part of ``found``
    expected_pa: int      # address part of ``link`` + B (or link for absolute tables)

    def as_dict(self) -> Dict[str, object]:
        return {"table": self.table, "index": self.index, "entry_pa": self.entry_pa,
                "found": self.found, "link": self.link, "kind": self.kind,
                "target_pa": self.target_pa, "expected_pa": self.expected_pa}


def classify_pointer(found_addr: int, link_addr: int, load_base: int,
                     absolute: bool = False) -> str:
    """Classify a pointer's address part against its link-time address part."""
    if absolute:
        return ABSOLUTE if found_addr == link_addr else FOREIGN
    if link_addr == 0:
        return FOREIGN
    if found_addr == link_addr + load_base:
        return RELOCATED
    if found_addr == link_addr:
        return UNRELOCATED
    if found_addr == link_addr + 2 * load_base:
        return RELOCATED_TWICE
    return FOREIGN


class LoadedXen:
    """A Xen image (its symbols) at load base B in physical memory."""

    def __init__(self, syms, load_base: int):
        self.syms = syms
        self.load_base = load_base
        self.virt_start = syms.virt_start
        # The loaded image: [B + offset(_start), B + offset(_end)).
        self.image_pa_start = load_base + syms.offset(syms.image_start)
        self.image_pa_end = load_base + syms.offset(syms.image_end)
        self._tables: List[Tuple[int, int, str, int]] = []  # (pa, end, name, level)
        for table, sym in syms.boot_tables():
            pa = load_base + syms.offset(sym.value)
            self._tables.append((pa, pa + table.pages * x86.PAGE_SIZE, table.name, table.level))
        self._tables.sort()

    # -- addresses -------------------------------------------------------------

    def pa(self, name_or_va) -> int:
        """PA of a Xen symbol (or linked VA) at this load base."""
        return self.syms.pa(name_or_va, self.load_base)

    def in_image(self, pa: int) -> bool:
        return self.image_pa_start <= pa < self.image_pa_end

    def linked_va_of_pa(self, pa: int) -> Optional[int]:
        """The linked VA that PA holds, if PA is inside the loaded image."""
        if not self.in_image(pa):
            return None
        return self.virt_start + (pa - self.load_base)

    def table_at(self, pa: int) -> Optional[Tuple[str, int, int]]:
        """(table name, level, byte offset into the table) if PA is in a boot table."""
        for start, end, name, level in self._tables:
            if start <= pa < end:
                return name, level, pa - start
        return None

    def name_pa(self, pa: int) -> Optional[str]:
        """``l2_directmap+0x1000``-style name of a PA inside the image, else None."""
        hit = self.table_at(pa)
        if hit is not None:
            name, _level, delta = hit
            return f"{name}+{delta:#x}" if delta else name
        va = self.linked_va_of_pa(pa)
        if va is None:
            return None
        return self.syms.describe(va)

    # -- pointers ------------------------------------------------------------------

    def link_entry(self, table: str, index: int) -> int:
        """The link-time qword of ``table[index]`` (from the ELF)."""
        return self.syms.read_u64(self.syms.linked_va(table) + 8 * index)

    def judge_entry(self, table: str, index: int, found: int,
                    addr_mask: int = x86.phys_addr_mask(x86.MAXPHYADDR_ARCH)) -> EntryVerdict:
        """Compare one qword of a Xen boot table in memory with its link value."""
        link = self.link_entry(table, index)
        absolute = table in ABSOLUTE_TABLES
        found_addr = found & addr_mask
        link_addr = link & addr_mask
        if not found & x86.PTE_P:
            kind = NOT_PRESENT
        else:
            kind = classify_pointer(found_addr, link_addr, self.load_base, absolute)
        expected = link_addr if absolute or not link_addr else link_addr + self.load_base
        entry_pa = self.pa(table) + 8 * index
        return EntryVerdict(table, index, entry_pa, found, link, kind, found_addr, expected)

    def expected_entry(self, table: str, index: int) -> int:
        """What Xen's own fix-up makes of ``table[index]`` (link value + B once)."""
        link = self.link_entry(table, index)
        if table in ABSOLUTE_TABLES or not link & x86.PTE_P:
            return link
        return link + self.load_base

    @staticmethod
    def same_entry(a: int, b: int) -> bool:
        """Equal but for the bits the CPU sets while walking (A, D)."""
        return (a & ~_HW_SET_BITS) == (b & ~_HW_SET_BITS)
