"""Text and JSON renderers for page walks, entries, range lists and the
enumerator's notes, and the one-line JSON encoder and terminal colouring every
command shares.  (The merge checks' reports are in ``merge_report``; the names of
the CR0/CR4/EFER bits that ``xen-regs`` shows are in ``x86``.)

Renderers return strings; the GDB layer prints them. Colour (``highlight``) and
wrapping to GDB's width (``fit_width``) are only applied when the GDB layer says the
output is a person's terminal. JSON is one line, integers as numbers.
"""

from __future__ import annotations

import json
import re
import textwrap
from typing import Callable, Dict, List, Optional, Sequence

from tabulate import tabulate

from . import x86
from .paging import (ATTR_NX, ATTR_U, ATTR_W, Enumeration, EntryInfo, Note, Range, Walk,
                     attrs_dict, attrs_flags)

# A callback that names an address (a Xen table or symbol), or returns None.
Namer = Callable[[int], Optional[str]]


HEX_SUFFIX = "_hex"


def with_hex(obj: object) -> object:
    """``obj`` with a ``KEY_hex`` string ("0xffff82d0403e6980") beside every integer
    field ``KEY`` (and a list of strings beside every list of integers): JSON readers
    that hold numbers as doubles (jq, JavaScript) lose the low bits of upper-half
    addresses, the strings keep them. The numbers stay as they are."""
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            out[key] = with_hex(value)
            hexed = _hex_of(value)
            if hexed is not None and isinstance(key, str) and \
                    not key.endswith(HEX_SUFFIX) and key + HEX_SUFFIX not in obj:
                out[key + HEX_SUFFIX] = hexed
        return out
    if isinstance(obj, (list, tuple)):
        return [with_hex(v) for v in obj]
    return obj


def _hex_of(value: object):
    if isinstance(value, int) and not isinstance(value, bool):
        return hex(value)
    if isinstance(value, (list, tuple)) and value and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        return [hex(v) for v in value]
    return None


def to_json(obj: object) -> str:
    """One line of JSON, every integer also as a hex string (``with_hex``)."""
    return json.dumps(with_hex(obj), separators=(",", ":"), sort_keys=False)


# Colours for a person at a terminal (ANSI SGR), by what a word says: a check's
# status, a pointer's class, a fault. Nothing else is coloured.
ANSI_RESET = "\x1b[0m"
_GOOD, _BAD, _WARN, _DIM = "\x1b[32m", "\x1b[1;31m", "\x1b[33m", "\x1b[2m"
_HIGHLIGHT = re.compile(
    r"(?<![\w-])(PASS|FAIL|WARN|SKIP|MISMATCH|relocated-twice|pe-relocated|unrelocated|relocated|foreign|"
    r"not present|not mapped|faults?|#[A-Z]{2}|error|warning)(?![\w-])")
_COLOUR = {"PASS": _GOOD, "relocated": _GOOD, "WARN": _WARN, "warning": _WARN,
           "SKIP": _DIM, "foreign": _WARN}


def highlight(text: str) -> str:
    """``text`` with statuses, pointer classes and faults coloured (ANSI)."""
    def paint(m: "re.Match[str]") -> str:
        word = m.group(1)
        return f"{_COLOUR.get(word, _BAD)}{word}{ANSI_RESET}"
    return _HIGHLIGHT.sub(paint, text)


def fit_width(text: str, width: Optional[int]) -> str:
    """Lines longer than ``width`` wrapped at spaces, the rest of a line indented under
    its own start (evidence under its row, not a wider table); None: as is."""
    if not width or width < 20:
        return text
    out: List[str] = []
    for line in text.split("\n"):
        if len(line) <= width:
            out.append(line)
            continue
        if set(line) <= set("-= "):
            out.append(line[:width].rstrip())    # a table's rule: as wide as the screen
            continue
        indent = " " * (len(line) - len(line.lstrip()) + 4)
        out.extend(textwrap.wrap(line, width=width, subsequent_indent=indent,
                                 break_long_words=False, break_on_hyphens=False,
                                 drop_whitespace=True) or [line])
    return "\n".join(out)


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
    """``ranges_report`` as one line of JSON."""
    return to_json(ranges_report(en, ranges, truncated, namer, extra))


def ranges_report(en: Enumeration, ranges: Sequence[Range], truncated: int = 0,
                  namer: Optional[Namer] = None, extra: Optional[Dict[str, object]] = None
                  ) -> Dict[str, object]:
    """xen-pt's report: ``namer`` adds a "maps" key to each range (what its PA start
    is); ``extra`` adds top-level keys (e.g. the load base the names were computed at)."""
    def one(r: Range) -> Dict[str, object]:
        d = range_dict(r)
        if namer is not None:
            d["maps"] = namer(r[2])
        return d

    return {
        "root": en.root, "mode": en.mode,
        "ranges": [one(r) for r in ranges],
        "notes": [n.as_dict() for n in en.notes],
        "truncated": truncated,
        "limited": en.limited, "stopped": en.stopped, "notes_dropped": en.notes_dropped,
        **(extra or {}),
    }


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
