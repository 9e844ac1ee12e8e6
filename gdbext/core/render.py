"""Text and JSON renderers for walks, range lists and register reports.

Renderers return strings; the GDB layer prints them. Colour (pygments) is only
added when the caller says the output is a terminal. JSON is one line, integers
as numbers.
"""

from __future__ import annotations

import json
from typing import Callable, Dict, List, Optional, Sequence

from tabulate import tabulate

from . import x86
from .paging import (ATTR_NX, ATTR_U, ATTR_W, Enumeration, EntryInfo, Note, Range, Walk,
                     attrs_dict, attrs_flags)

# A callback that names an address (a Xen table or symbol), or returns None.
Namer = Callable[[int], Optional[str]]


def to_json(obj: object) -> str:
    return json.dumps(obj, separators=(",", ":"), sort_keys=False)


def colorize(text: str, lexer: str = "text") -> str:
    """Terminal colours via pygments; callers only use it when on a terminal."""
    from pygments import highlight
    from pygments.formatters import TerminalFormatter
    from pygments.lexers import get_lexer_by_name

    return highlight(text, get_lexer_by_name(lexer), TerminalFormatter()).rstrip("\n")


def hex16(value: int) -> str:
    return f"{value:016x}"


# --- ranges -------------------------------------------------------------------------

def range_dict(r: Range) -> Dict[str, object]:
    va, end, pa, page_size, attrs = r
    d: Dict[str, object] = {"va": va, "end": end, "pa": pa, "page_size": page_size}
    d.update(attrs_dict(attrs))
    return d


def ranges_json(en: Enumeration, ranges: Sequence[Range], truncated: int = 0,
                namer: Optional[Namer] = None, extra: Optional[Dict[str, object]] = None) -> str:
    """``namer`` adds a "maps" key to each range (what its PA start is); ``extra``
    adds top-level keys (e.g. the load base the names were computed at)."""
    def one(r: Range) -> Dict[str, object]:
        d = range_dict(r)
        if namer is not None:
            d["maps"] = namer(r[2])
        return d

    return to_json({
        "root": en.root, "mode": en.mode,
        "ranges": [one(r) for r in ranges],
        "notes": [n.as_dict() for n in en.notes],
        "truncated": truncated,
        "limited": en.limited, "stopped": en.stopped, "notes_dropped": en.notes_dropped,
        **(extra or {}),
    })


def ranges_table(ranges: Sequence[Range], namer: Optional[Namer] = None) -> str:
    rows = []
    for va, end, pa, page_size, attrs in ranges:
        row = [f"{va:#018x}", f"{end:#018x}", f"{pa:#x}", x86.size_name(end - va),
               x86.size_name(page_size), attrs_flags(attrs)]
        if namer is not None:
            row.append(namer(pa) or "")
        rows.append(row)
    headers = ["VA start", "VA end", "PA", "size", "page", "flags"]
    if namer is not None:
        headers.append("maps")
    return tabulate(rows, headers=headers, tablefmt="simple", disable_numparse=True)


def notes_text(notes: Sequence[Note]) -> List[str]:
    out = []
    for n in notes:
        out.append(f"note: L{n.level} entry at {n.entry_pa:#x} = {n.entry:016x} "
                   f"(va {n.va:#x}) -> {n.target:#x}: {n.kind}: {n.detail}")
    return out


# --- single walks -------------------------------------------------------------------

def entry_text(e: EntryInfo) -> str:
    if not e.present:
        return "not present"
    flags = " ".join(e.flag_names())
    what = f"{x86.size_name(e.page_size)} page at {e.addr:#x}" if e.leaf else f"table {e.addr:#x}"
    text = f"{flags}  -> {what}"
    if e.reserved:
        text += f"  RESERVED BITS {e.reserved:#x}"
    return text


def walk_text(w: Walk, namer: Optional[Namer] = None,
              entry_note: Optional[Callable[[object], Optional[str]]] = None) -> str:
    """Xen's show_page_walk() layout, one line per level, then the result.

    ``namer`` names table pages and the final PA; ``entry_note(step)`` may add a
    word about the entry itself (e.g. how a pointer from a Xen table was relocated)."""
    lines = [f"Pagetable walk from {w.va:016x} ({w.mode}, root {w.root:#x}):"]
    for s in w.steps:
        name = namer(s.table_pa) if namer else None
        where = f"  [{name}]" if name else ""
        note = entry_note(s) if entry_note else None
        where += f"  ({note})" if note else ""
        lines.append(f" L{s.level}[{s.index:#05x}] = {hex16(s.entry.raw)}  "
                     f"{entry_text(s.entry)}{where}")
    if w.mapped:
        name = namer(w.pa) if namer else None
        perms = ("RW" if w.writable else "R-") + ("-" if w.nx else "X") + (" user" if w.user
                                                                            else " supervisor")
        lines.append(f" => PA {w.pa:#x}  ({x86.size_name(w.page_size)} page, {perms})"
                     + (f"  [{name}]" if name else ""))
    else:
        lines.append(f" => fault at L{w.fault_level}: {w.fault}")
    return "\n".join(lines)


def walk_dict(w: Walk) -> Dict[str, object]:
    return {
        "va": w.va, "mode": w.mode, "root": w.root,
        "pa": w.pa if w.mapped else None,
        "page_size": w.page_size if w.mapped else None,
        "fault": None if w.mapped else w.fault,
        "fault_level": w.fault_level,
        "writable": bool(w.attrs & ATTR_W) if w.mapped else None,
        "user": bool(w.attrs & ATTR_U) if w.mapped else None,
        "nx": bool(w.attrs & ATTR_NX) if w.mapped else None,
        "levels": [{"level": s.level, "table": s.table_pa, "index": s.index,
                    "entry_pa": s.entry_pa, "entry": s.entry.raw,
                    "present": s.entry.present, "leaf": s.entry.leaf,
                    "reserved": s.entry.reserved}
                   for s in w.steps],
    }
