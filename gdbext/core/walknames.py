"""Xen's words on a page walk: which table a step read, and how each pointer compares
with its link-time value.

Used by every command that shows a walk or a tree (xen-va2pa, xen-pt --levels,
the walkthrough): a ``Situation`` says what is walked (root, memory, paging),
``judge_raw`` compares an entry read from one of Xen's boot tables with the
value it was linked with, and ``verdict_text`` says it in a few words.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional

from . import merge_predict, x86, xenimage
from .memory import PhysMemory
from .paging import PagingContext


@dataclass
class Situation:
    """What a paging command works from at this stop."""
    regs: Dict[str, int]
    ctx: PagingContext
    root: int
    root_source: str
    # Memory to walk: the guest's, or an overlay holding a predicted merge.
    mem: PhysMemory
    # The Xen table whose link values the root's entries are copies of (a merged L4's
    # upper half copies idle_pg_table's), for judging its pointers.
    judge_root_as: Optional[str] = None


def judge_raw(loaded, entry_pa: int, raw: int, sit: Optional[Situation] = None
              ) -> Optional[xenimage.EntryVerdict]:
    """How a present entry at ``entry_pa`` read from one of Xen's boot tables compares
    with its link value (None: not one of Xen's tables, or no bytes to compare with)."""
    if loaded is None or not xenimage.has_bytes(loaded.syms):
        return None   # a .map has no link-time values to compare with
    if sit is not None and sit.judge_root_as and \
            sit.root <= entry_pa < sit.root + x86.PAGE_SIZE:
        index = (entry_pa - sit.root) // 8
        if index < merge_predict.L4_HALF:
            return None  # the firmware's half of a merged L4
        return loaded.judge_entry(sit.judge_root_as, index, raw)
    hit = loaded.table_at(entry_pa)
    if hit is None:
        return None
    name, _level, offset = hit
    return loaded.judge_entry(name, offset // 8, raw)


def judge_step(loaded, step, sit: Optional[Situation] = None
               ) -> Optional[xenimage.EntryVerdict]:
    """judge_raw for one step of a walk (None for an entry that is not present)."""
    if not step.entry.present:
        return None
    return judge_raw(loaded, step.entry_pa, step.entry.raw, sit)


def verdict_text(v: xenimage.EntryVerdict) -> str:
    if v.kind == xenimage.RELOCATED:
        return "relocated"
    if v.kind == xenimage.ABSOLUTE:
        return "absolute, as linked"
    if v.kind == xenimage.FOREIGN and not v.link:
        return "written at run time: link value 0"
    return f"{v.kind}: points at {v.target_pa:#x}, relocated once would be {v.expected_pa:#x}"


def situation_namer(sit: Situation, loaded) -> Optional[Callable[[int], Optional[str]]]:
    """Names for PAs: Xen's objects, and a predicted merge's M called what it is
    (the page it borrows, e.g. l3_bootmap, is not the L3 its name suggests)."""
    if loaded is None:
        return None
    if not sit.judge_root_as:
        return loaded.name_pa

    def name(pa: int):
        if pa == sit.root:
            return f"merged L4 M, in {loaded.name_pa(pa) or hex(pa)}"
        return loaded.name_pa(pa)
    return name


def root_owner(loaded, root: int, rip: Optional[int]) -> str:
    """Whose table CR3's root is: Xen's (in its image), the firmware's (Xen still runs
    at its load address on the firmware's tables), or some other."""
    if loaded.in_image(root):
        return "xen"
    if rip is not None and not loaded.syms.in_image(rip):
        return "firmware"
    return "other"
