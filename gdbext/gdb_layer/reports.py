"""What the paging commands report, as objects: a walk, the ranges, the VAs of a PA.

``xen-va2pa``, ``xen-pt`` and ``xen-pa2va`` print these (``text()`` or ``as_dict()``
as JSON), and the Python API (``gdbext.api``) returns the same dictionaries, so a
script and the command line never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

from ..core import paging, render, x86
from ..core.paging import ATTR_NX, ATTR_U, ATTR_W
from ..core.walknames import Situation, judge_step, situation_namer, verdict_text
from .addresses import parse_address
from .context import RootChoice


def xen_keys(loaded, xen_note: Optional[str]) -> Dict[str, object]:
    """Top-level JSON keys saying what the Xen names were computed from."""
    return {"load_base": loaded.load_base if loaded is not None else None,
            "xen_note": xen_note}


def _with_note(text: str, xen_note: Optional[str]) -> str:
    return text + (f"\n({xen_note})" if xen_note else "")


@dataclass
class WalkReport:
    sit: Situation
    walk: paging.Walk
    loaded: object
    xen_note: Optional[str]
    verdicts: list

    @property
    def namer(self):
        return situation_namer(self.sit, self.loaded)

    def as_dict(self) -> dict:
        namer, w = self.namer, self.walk
        d = render.walk_dict(w)
        for level, step, v in zip(d["levels"], w.steps, self.verdicts):
            level["table_name"] = namer(step.table_pa) if namer else None
            level["pointer"] = v.as_dict() if v is not None else None
        d["pa_name"] = namer(w.pa) if namer and w.mapped else None
        d.update(xen_keys(self.loaded, self.xen_note))
        return d

    def text(self) -> str:
        notes = {id(step): verdict_text(v) for step, v in zip(self.walk.steps, self.verdicts)
                 if v}
        return _with_note(render.walk_text(self.walk, self.namer,
                                           lambda step: notes.get(id(step))), self.xen_note)


def walk_report(ctx, address: str, choice: RootChoice = RootChoice()) -> WalkReport:
    """The walk of ``address`` (the commands' address syntax) from ``choice``'s root."""
    t = ctx.target
    with t.phys_mode():
        sit = ctx.situation(choice)
        va = parse_address(ctx, address, "address")
        w = paging.walk(sit.ctx, sit.mem, sit.root, va)
        loaded, xen_note = ctx.loaded_or_note()
        verdicts = [judge_step(loaded, step, sit) for step in w.steps]
    return WalkReport(sit, w, loaded, xen_note, verdicts)


@dataclass(frozen=True)
class RangeFilter:
    """xen-pt's filters on the effective permissions of a range."""
    writable: bool = False
    executable: bool = False
    wx: bool = False
    user: bool = False

    def keep(self, r: paging.Range) -> bool:
        a = r[4]
        if self.writable and not a & ATTR_W:
            return False
        if self.executable and a & ATTR_NX:
            return False
        if self.wx and not (a & ATTR_W and not a & ATTR_NX):
            return False
        return not (self.user and not a & ATTR_U)


@dataclass
class RangesReport:
    sit: Situation
    en: paging.Enumeration
    ranges: List[paging.Range]       # filtered, at most ``limit``
    truncated: int                   # how many more the limit left out
    loaded: object
    xen_note: Optional[str]
    limit: int = 0                   # --limit: at most this many ranges and notes

    @property
    def namer(self):
        return situation_namer(self.sit, self.loaded)

    def as_dict(self) -> dict:
        return render.ranges_report(self.en, self.ranges, self.truncated, self.namer,
                                    xen_keys(self.loaded, self.xen_note))

    def text(self) -> str:
        namer, sit, en = self.namer, self.sit, self.en
        root_name = f" = {namer(sit.root)}" if namer and namer(sit.root) else ""
        counted = "the first " if (en.limited or en.stopped) else ""
        head = (f"{sit.ctx.mode.name} paging, root {sit.root:#x}{root_name} "
                f"({sit.root_source}): {counted}{len(en.ranges)} ranges, "
                f"{len(en.tables)} tables")
        parts = [head, render.ranges_table(self.ranges, namer)]
        if self.truncated:
            parts.append(f"... {self.truncated} more ranges (raise --limit, or 0 for all)")
        elif en.limited:
            parts.append(f"... more ranges not enumerated (--limit {self.limit} stopped the "
                         "enumeration; raise it, or 0 for all)")
        notes = en.notes[:self.limit] if self.limit else en.notes
        notes_more = len(en.notes) - len(notes) + en.notes_dropped
        parts.extend(render.notes_text(notes))
        if notes_more:
            parts.append(f"... {notes_more} more notes (raise --limit, or narrow with --range)")
        if en.stopped:
            parts.append(f"note: {en.stopped}")
        if self.xen_note:
            parts.append(f"({self.xen_note})")
        return "\n".join(parts)


def ranges_report(ctx, choice: RootChoice = RootChoice(), lo: Optional[str] = None,
                  hi: Optional[str] = None, keep: RangeFilter = RangeFilter(),
                  limit: int = 0, follow_cycles: bool = True) -> RangesReport:
    """The coalesced ranges from ``choice``'s root, VAs in [lo, hi) when given."""
    t = ctx.target
    with t.phys_mode():
        sit = ctx.situation(choice)
        lo_va = parse_address(ctx, lo, "range start") if lo is not None else None
        hi_va = parse_address(ctx, hi, "range end") if hi is not None else None
        loaded, xen_note = ctx.loaded_or_note()
        # With a filter, the limit counts filtered ranges: only the cap applies.
        filtered = keep != RangeFilter()
        en = paging.enumerate_ranges(sit.ctx, sit.mem, sit.root, lo_va, hi_va,
                                     follow_cycles=follow_cycles,
                                     limit=None if filtered else (limit or None))
    ranges = [r for r in en.ranges if keep.keep(r)]
    truncated = 0
    if limit and len(ranges) > limit:
        truncated = len(ranges) - limit
        ranges = ranges[:limit]
    return RangesReport(sit, en, ranges, truncated, loaded, xen_note, limit)


@dataclass
class Pa2vaReport:
    sit: Situation
    en: paging.Enumeration
    pa: int
    hits: list
    name: Optional[str]
    loaded: object
    xen_note: Optional[str]

    def as_dict(self) -> dict:
        return {"pa": self.pa, "root": self.sit.root, "mode": self.en.mode,
                "vas": [{**render.range_dict(r), "range_va": r[0],
                         "va": va}  # the VA of PA, not the range's
                        for va, r in self.hits],
                "pa_name": self.name, **xen_keys(self.loaded, self.xen_note)}

    def text(self) -> str:
        what = f"PA {self.pa:#x}" + (f" [{self.name}]" if self.name else "")
        if not self.hits:
            return f"{what} is not mapped under root {self.sit.root:#x}"
        lines = [f"{what} is mapped at {len(self.hits)} virtual address(es):"]
        for va, r in self.hits:
            lines.append(f"  {va:#018x}  ({x86.size_name(r[3])} page, "
                         f"{paging.attrs_flags(r[4])})")
        return "\n".join(lines)


def pa2va_report(ctx, pa: str, choice: RootChoice = RootChoice()) -> Pa2vaReport:
    """Every VA that maps ``pa`` (a GDB expression or SYMBOL@pa) under ``choice``'s root."""
    t = ctx.target
    with t.phys_mode():
        sit = ctx.situation(choice)
        value = parse_address(ctx, pa, "physical address", space="pa")
        en = paging.enumerate_ranges(sit.ctx, sit.mem, sit.root)
        loaded, xen_note = ctx.loaded_or_note()
    hits = paging.pa_to_vas(en.ranges, value)
    name = loaded.name_pa(value) if loaded is not None else None
    return Pa2vaReport(sit, en, value, hits, name, loaded, xen_note)
