"""Pictures of a page-table tree from an L4: a model, then SVG and DOT.

For someone learning x86 paging and for Xen developers checking a boot: which
L4 slots are present (index, the 512 GiB of virtual addresses each covers, the
entry and its flags), which L3 table each points to (its PA, its Xen name when
it is a Xen object, whether it lies in Xen's image or outside it, i.e. in the
firmware's memory at the early boot stops), and, for entries of Xen's own
tables, whether the pointer is relocated, unrelocated, relocated twice or
foreign (``xenimage.LoadedXen.judge_entry``).  One more level is shown
compactly: each L3 table's present entries, folded into runs, with the L2 table
each points to summarised ("512 x 2M leaves, identity").

``build_model`` reads memory; ``to_svg`` / ``to_dot`` only format the models,
so several trees (the firmware's, the predicted merge, the relocated merge)
can be drawn side by side in one picture.  Never imports ``gdb``; no
dependency beyond the standard library.  Everything from memory or from the
user (titles) is escaped before it reaches XML or DOT.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple
from xml.sax.saxutils import escape as _xml_escape

from . import paging, x86
from .errors import GdbextError, MemoryReadError
from .memory import PageCache, PhysMemory
from .paging import Decoder, PagingContext
from . import xenimage
from .xenimage import IDLE_L4, LoadedXen  # noqa: F401 (IDLE_L4 re-exported)

# Where a table (or a page an entry points to) lives.
OWNER_XEN = "xen"            # inside Xen's loaded image [B + offset(_start), B + offset(_end))
OWNER_FIRMWARE = "firmware"  # outside it, while the firmware's tables are in use
OWNER_OUTSIDE = "outside"    # outside it, once Xen runs at its linked address (its own allocations)
OWNER_UNKNOWN = "unknown"    # no Xen symbols or load base: cannot tell


# Flags that say nothing about the mapping: the CPU sets them as it walks.
_STATUS_BITS = x86.PTE_A | x86.PTE_D

# Text shown for each owner and pointer class, and their colours (fill, stroke).
OWNER_TEXT = {OWNER_XEN: "Xen image", OWNER_FIRMWARE: "firmware (outside Xen's image)",
              OWNER_OUTSIDE: "outside Xen's image", OWNER_UNKNOWN: "owner unknown"}
OWNER_FILL = {OWNER_XEN: "#fde6c4", OWNER_FIRMWARE: "#dde9f6", OWNER_OUTSIDE: "#e3f0e0",
              OWNER_UNKNOWN: "#eeeeee"}
OWNER_STROKE = {OWNER_XEN: "#b86e00", OWNER_FIRMWARE: "#3f6ea8", OWNER_OUTSIDE: "#4d7f45",
                OWNER_UNKNOWN: "#777777"}
NOT_JUDGED = "not judged"
VERDICT_COLOUR = {
    xenimage.RELOCATED: "#1a8a2e",
    xenimage.UNRELOCATED: "#d0231b",
    xenimage.RELOCATED_TWICE: "#8e2bbf",
    xenimage.FOREIGN: "#e07b00",
    xenimage.ABSOLUTE: "#137a8a",
    xenimage.PE_RELOCATED: "#b0a000",
    NOT_JUDGED: "#555555",
}
VERDICT_TEXT = {
    xenimage.RELOCATED: "relocated (link value + B)",
    xenimage.UNRELOCATED: "unrelocated (link value: firmware memory)",
    xenimage.RELOCATED_TWICE: "relocated twice (link value + 2B)",
    xenimage.FOREIGN: "foreign (neither; or written at run time)",
    xenimage.ABSOLUTE: "absolute (never relocated, as intended)",
    xenimage.PE_RELOCATED: "PE-relocated (link value + B - ImageBase: xen.efi before "
                           "its self-relocation)",
    NOT_JUDGED: "not a Xen table entry: not judged",
}

# Rows of one L3 table drawn before the rest is summarised in one line.
MAX_L3_ROWS = 12


# --- the model ---------------------------------------------------------------------

@dataclass
class L3Row:
    """One present L3 entry, or a run of alike consecutive ones."""
    first: int                    # index of the first entry of the run
    last: int                     # index of the last (== first for a single entry)
    va: int                       # canonical VA the run starts at
    va_end: int                   # VA just past the run (canonical, may wrap to 0)
    raw: int                      # the first entry's qword
    flags: List[str]
    kind: str                     # "table" (points to an L2), "leaf" (1 GiB page), "reserved", "cycle"
    target_pa: int                # the first entry's target
    target_end_pa: int            # the last entry's target
    target_name: Optional[str]    # Xen name of the first target, if a Xen object
    owner: str                    # where the first target lives
    verdict: Optional[str]        # xenimage class, None when the table is not Xen's
    expected_pa: Optional[int]    # where Xen's fix-up would point it (unrelocated & co)
    expected_name: Optional[str]
    summary: str                  # what the L2 (or the leaf) holds

    @property
    def count(self) -> int:
        return self.last - self.first + 1


@dataclass
class L3Table:
    pa: int
    name: Optional[str]
    owner: str
    present: int = 0
    rows: List[L3Row] = field(default_factory=list)
    error: Optional[str] = None   # unreadable


@dataclass
class L4Slot:
    """One present entry of the L4 table."""
    index: int
    va: int
    va_end: int
    raw: int
    flags: List[str]
    target_pa: int
    target_name: Optional[str]
    owner: str
    verdict: Optional[str]
    expected_pa: Optional[int]
    expected_name: Optional[str]
    note: str = ""                # cycle, reserved bits
    table: Optional[L3Table] = None
    same_as: Optional[int] = None  # an earlier slot of this L4 points to the same table


@dataclass
class TreeModel:
    title: str
    root: int
    root_name: Optional[str]
    root_owner: str
    mode: str
    load_base: Optional[int]
    judged_as: Optional[str]      # the Xen table the root's entries were judged against
    slots: List[L4Slot]

    def present_slots(self) -> List[int]:
        return [s.index for s in self.slots]

    def tables(self) -> List[int]:
        """Distinct table PAs drawn as nodes: the root, then every L3 table."""
        out = [self.root]
        for s in self.slots:
            if s.table is not None and s.table.pa not in out:
                out.append(s.table.pa)
        return out

    def pointers(self) -> List[Tuple[int, int, int]]:
        """(L4 index, from table, to table) for every present non-leaf L4 entry."""
        return [(s.index, self.root, s.target_pa) for s in self.slots
                if not s.note.startswith("reserved")]

    def as_dict(self) -> Dict[str, object]:
        return asdict(self)


def _owner(xen: Optional[LoadedXen], pa: int, outside: str) -> str:
    if xen is None:
        return OWNER_UNKNOWN
    return OWNER_XEN if xen.in_image(pa) else outside


def _name(xen: Optional[LoadedXen], pa: int) -> Optional[str]:
    return xen.name_pa(pa) if xen is not None else None


def _xen_table(xen: Optional[LoadedXen], pa: int, level: int) -> Optional[Tuple[str, int]]:
    """(boot table name, index of this page's first entry) if PA is a Xen table of LEVEL."""
    if xen is None:
        return None
    hit = xen.table_at(pa)
    if hit is None or hit[1] != level:
        return None
    name, _level, delta = hit
    return name, delta // 8


class _Builder:
    def __init__(self, ctx: PagingContext, mem: PhysMemory, root: int,
                 xen: Optional[LoadedXen], outside: str = OWNER_FIRMWARE):
        if ctx.mode is not paging.MODE_4LEVEL:
            raise GdbextError(f"the diagram draws 4-level paging trees, not {ctx.mode.name} "
                              "(pass --mode 4-level with --root to read a table as one)")
        self.ctx = ctx
        self.mode = ctx.mode
        self.mem = mem if isinstance(mem, PageCache) else PageCache(mem)
        self.dec = Decoder(ctx)
        self.root = root
        self.xen = xen
        self.outside = outside

    def owner(self, pa: int) -> str:
        return _owner(self.xen, pa, self.outside)

    def judge(self, table: Optional[Tuple[str, int]], index: int, raw: int
              ) -> Tuple[Optional[str], Optional[int]]:
        """The entry's pointer class, and where Xen meant it to point when it points
        elsewhere (None when it is where Xen's own fix-up puts it, or was written at
        run time: no link value to compare with)."""
        if table is None or self.xen is None:
            return None, None
        name, first = table
        v = self.xen.judge_entry(name, first + index, raw, self.dec.table_addr_mask)
        misdirected = v.kind in (xenimage.UNRELOCATED, xenimage.RELOCATED_TWICE) or (
            v.kind == xenimage.FOREIGN and v.link & x86.PTE_P)
        return v.kind, (v.expected_pa if misdirected else None)

    def va(self, off: int) -> int:
        return x86.canonical(off, self.mode.va_bits)

    # -- L2: one line ------------------------------------------------------------

    def l2_summary(self, pa: int, va: int) -> Tuple[str, tuple]:
        """A short description of an L2 table, and a key without addresses that says
        whether two L2 tables look alike (for folding runs of L3 entries)."""
        try:
            _, ents = paging.read_table(self.mode, self.mem, pa, 2)
        except MemoryReadError as err:
            return f"unreadable ({err})", ("unreadable",)
        xen_table = _xen_table(self.xen, pa, 2)
        uniform = self._uniform_leaves(ents)
        if uniform is not None and xen_table is None:
            # 512 contiguous 2 MiB leaves (a firmware identity map): no need to decode each.
            identity = self.va(va) == uniform and va < (1 << 47)
            text = "512 x 2M leaves" + (", identity" if identity else f" -> pa {uniform:#x}")
            return text, (512, 0, 0, identity, ())
        leaves = 0
        leaf_pas: List[Tuple[int, int]] = []   # (va offset in table, pa)
        l1: List[Tuple[int, int]] = []          # (index, target)
        reserved = 0
        verdicts: Dict[str, int] = {}
        for idx, raw in enumerate(ents):
            if not raw & x86.PTE_P:
                continue
            info = self.dec.decode(2, raw)
            if info.reserved:
                reserved += 1
                continue
            if info.leaf:
                leaves += 1
                leaf_pas.append((idx << 21, info.addr))
                continue
            l1.append((idx, info.addr))
            kind, _ = self.judge(xen_table, idx, raw)
            if kind is not None:
                verdicts[kind] = verdicts.get(kind, 0) + 1
        parts: List[str] = []
        identity = bool(leaf_pas) and all(self.va(va + off) == p for off, p in leaf_pas) \
            and va < (1 << 47)
        contiguous = bool(leaf_pas) and all(
            p - leaf_pas[0][1] == off - leaf_pas[0][0] for off, p in leaf_pas)
        if leaves:
            text = f"{leaves} x 2M leaves"
            if identity:
                text += ", identity"
            elif contiguous:
                text += f" -> pa {leaf_pas[0][1]:#x}"
            parts.append(text)
        if l1:
            if len(l1) == 1:
                idx, target = l1[0]
                name = _name(self.xen, target)
                parts.append(f"L1 table at [{idx}]" + (f" {name}" if name else f" {target:#x}"))
            else:
                parts.append(f"{len(l1)} x L1 tables")
        if verdicts:
            parts[-1] += " (" + ", ".join(f"{n} {k}" for k, n in sorted(verdicts.items())) + ")"
        if reserved:
            parts.append(f"{reserved} with reserved bits (fault)")
        if not parts:
            parts.append("empty (no present entry)")
        key = (leaves, len(l1), reserved, identity, tuple(sorted(verdicts.items())))
        return ", ".join(parts), key

    def _uniform_leaves(self, ents: Sequence[int]) -> Optional[int]:
        """The PA mapped by an L2 table whose 512 entries are 2 MiB leaves with the same
        flags mapping one contiguous run (A/D aside), else None."""
        first = self.dec.decode(2, ents[0])
        if not first.present or not first.leaf or first.reserved:
            return None
        if self.dec.decode(2, ents[-1]).reserved:
            return None
        start = ents[0] & ~_STATUS_BITS
        if [e & ~_STATUS_BITS for e in ents] != list(
                range(start, start + len(ents) * x86.SIZE_2M, x86.SIZE_2M)):
            return None
        return first.addr

    # -- L3 ------------------------------------------------------------------------

    def l3_table(self, pa: int, base: int) -> L3Table:
        table = L3Table(pa, _name(self.xen, pa), self.owner(pa))
        try:
            _, ents = paging.read_table(self.mode, self.mem, pa, 3)
        except MemoryReadError as err:
            table.error = str(err)
            return table
        xen_table = _xen_table(self.xen, pa, 3)
        rows: List[L3Row] = []
        fold_key = None
        for idx, raw in enumerate(ents):
            if not raw & x86.PTE_P:
                fold_key = None
                continue
            table.present += 1
            off = base + (idx << 30)
            info = self.dec.decode(3, raw)
            kind_v, expected = self.judge(xen_table, idx, raw)
            owner = self.owner(info.addr)
            if info.reserved:
                kind = "reserved"
                summary = f"reserved bits {info.reserved:#x} set: the CPU faults here"
                key: Optional[tuple] = None
            elif info.leaf:
                kind = "leaf"
                summary = "1G leaf " + ("identity" if self.va(off) == info.addr
                                        else f"-> pa {info.addr:#x}")
                key = ("leaf", self.va(off) == info.addr)
            elif info.addr in (self.root, pa):
                kind = "cycle"
                summary = "points back to a table above: not expanded"
                key = None
            else:
                kind = "table"
                summary, l2key = self.l2_summary(info.addr, off)
                key = ("table", l2key)
            flags = info.flag_names()
            row_key = None if key is None else (
                key, raw & ~(_STATUS_BITS | self.dec.table_addr_mask), owner, kind_v)
            prev = rows[-1] if rows else None
            if (row_key is not None and prev is not None and row_key == fold_key
                    and prev.last == idx - 1 and expected is None and prev.expected_pa is None
                    and (kind != "leaf" or info.addr == prev.target_end_pa + (1 << 30))):
                prev.last = idx
                prev.va_end = self.va(off + (1 << 30)) if off + (1 << 30) < (1 << 48) else 0
                prev.target_end_pa = info.addr
                prev.flags = sorted(set(prev.flags) & set(flags), key=prev.flags.index)
                continue
            fold_key = row_key
            end = off + (1 << 30)
            rows.append(L3Row(idx, idx, self.va(off), self.va(end) if end < (1 << 48) else 0,
                              raw, flags, kind, info.addr, info.addr, _name(self.xen, info.addr),
                              owner, kind_v, expected,
                              _name(self.xen, expected) if expected is not None else None,
                              summary))
        table.rows = rows
        return table

    # -- L4 --------------------------------------------------------------------------

    def model(self, title: str, judge_as: Optional[str]) -> TreeModel:
        try:
            _, ents = paging.read_table(self.mode, self.mem, self.root, 4)
        except MemoryReadError as err:
            raise GdbextError(f"the root table at {self.root:#x} cannot be read: {err}") from None
        own = _xen_table(self.xen, self.root, 4)
        judged_as = own[0] if own else judge_as
        half = 256
        slots: List[L4Slot] = []
        seen: Dict[int, int] = {}
        for idx, raw in enumerate(ents):
            if not raw & x86.PTE_P:
                continue
            off = idx << 39
            info = self.dec.decode(4, raw)
            if own is not None:
                kind, expected = self.judge(own, idx, raw)
            elif judge_as is not None and idx >= half:
                kind, expected = self.judge((judge_as, 0), idx, raw)
            else:
                kind, expected = None, None
            end = off + (1 << 39)
            slot = L4Slot(idx, self.va(off), self.va(end) if end < (1 << 48) else 0, raw,
                          info.flag_names(), info.addr, _name(self.xen, info.addr),
                          self.owner(info.addr), kind, expected,
                          _name(self.xen, expected) if expected is not None else None)
            if info.reserved:
                slot.note = f"reserved bits {info.reserved:#x} set: the CPU faults here"
            elif info.addr == self.root:
                slot.note = "points back to this L4 (a linear page-table slot): not expanded"
            elif info.addr in seen:
                slot.same_as = seen[info.addr]
                slot.table = self.l3_table(info.addr, off)
            else:
                seen[info.addr] = idx
                slot.table = self.l3_table(info.addr, off)
            slots.append(slot)
        return TreeModel(title, self.root, _name(self.xen, self.root),
                         self.owner(self.root), self.mode.name,
                         self.xen.load_base if self.xen else None, judged_as, slots)


def build_model(ctx: PagingContext, mem: PhysMemory, root: int,
                xen: Optional[LoadedXen] = None, title: str = "",
                judge_as: Optional[str] = None, outside: str = OWNER_FIRMWARE) -> TreeModel:
    """Read the tree under the L4 at ``root`` into a TreeModel.

    ``xen`` (symbols and load base) names Xen's objects, tells Xen's image from
    the rest, and judges the entries of Xen's boot tables.  ``judge_as`` names the
    Xen L4 whose link values the root's upper half (slots 256-511) copies, for a
    root that is not itself a Xen boot table: ``IDLE_L4`` for the RFC's merged
    table (``default_judge_as`` picks it).  Entries of a table that is neither
    are not judged.  ``outside`` is what a table outside Xen's image is called:
    ``OWNER_FIRMWARE`` while the firmware's tables are in use, ``OWNER_OUTSIDE``
    once Xen allocates its own.
    """
    b = _Builder(ctx, mem, root, xen, outside)
    return b.model(title or f"L4 at {root:#x}", judge_as)


def default_judge_as(xen: Optional[LoadedXen], root: int) -> Optional[str]:
    """``IDLE_L4`` for an L4 inside Xen's image that is not a boot table (an RFC
    build's efi_l4_bootmap): its upper half is a copy of idle_pg_table."""
    if xen is None or not xen.in_image(root) or xen.table_at(root) is not None:
        return None
    return IDLE_L4


# --- text shared by the formats ------------------------------------------------------

def _hex(v: int) -> str:
    return f"{v:#x}"


def slot_va_text(s: L4Slot) -> str:
    end = s.va_end if s.va_end else (1 << 64)
    return f"VA {s.va:#018x}-{(end - 1) & ((1 << 64) - 1):#018x}"


def slot_lines(s: L4Slot) -> List[str]:
    lines = [f"L4[{s.index}]  (512G of VA)",
             f"{s.va:#018x}",
             f"..{(((s.va_end or 1 << 64) - 1) & ((1 << 64) - 1)):#018x}",
             f"entry {s.raw:#018x}",
             " ".join(s.flags)]
    return lines


def target_text(name: Optional[str], pa: int) -> str:
    return f"{name} ({pa:#x})" if name else f"{pa:#x}"


def row_parts(r: L3Row) -> Tuple[str, str]:
    """An L3 row as (what the entries point to, what is there)."""
    idx = f"[{r.first}]" if r.count == 1 else f"[{r.first}-{r.last}]"
    if r.kind == "leaf":
        body = (f"{r.count} x " if r.count > 1 else "") + r.summary
        if r.count > 1 and "identity" not in r.summary:
            body += f"..{r.target_end_pa:#x}"
        return f"{idx} {body}", ""
    if r.kind in ("reserved", "cycle"):
        return f"{idx} -> {r.target_pa:#x}", r.summary
    if r.count == 1:
        return f"{idx} -> L2 {target_text(r.target_name, r.target_pa)}", r.summary
    first = r.target_name or _hex(r.target_pa)
    return (f"{idx} -> {r.count} L2 tables {first}..{r.target_end_pa:#x}",
            "each: " + r.summary)


def row_text(r: L3Row) -> str:
    head, detail = row_parts(r)
    return f"{head}: {detail}" if detail else head


# Classes that certainly miss the table Xen meant (a foreign pointer may be a run-time change).
MISSED = (xenimage.UNRELOCATED, xenimage.RELOCATED_TWICE)


def expected_label(kind: Optional[str]) -> str:
    """How the table Xen's fix-up would have pointed to is introduced."""
    return "expected" if kind in MISSED else "link value + B"


def verdict_label(kind: Optional[str]) -> str:
    return kind if kind is not None else NOT_JUDGED


def model_caption(m: TreeModel) -> List[str]:
    root = target_text(m.root_name, m.root)
    lines = [f"root L4 {root} - {OWNER_TEXT[m.root_owner]}",
             f"{len(m.slots)} present L4 slots: " + (", ".join(str(i) for i in m.present_slots())
                                                     or "none")]
    if m.load_base is not None:
        lines[-1] += f"; load base B = {m.load_base:#x}"
    if m.judged_as and m.judged_as != (m.root_name or ""):
        lines.append(f"slots 256-511 judged against {m.judged_as}'s link values")
    return lines


# --- SVG ----------------------------------------------------------------------------------

FONT = "DejaVu Sans Mono, Menlo, Consolas, monospace"
FONT_SIZE = 12
CHAR_W = 7.3        # advance of a 12 px monospace glyph (DejaVu Sans Mono: 0.602 em)
LINE_H = 16
PAD = 8
GAP = 48            # between the L4 box and the L3 box (room for the arrow's label)
COL_GAP = 40


def _esc(text: object) -> str:
    return _xml_escape(str(text), {'"': "&quot;", "'": "&apos;"})


def _text_w(lines: Sequence[str]) -> float:
    return max((len(t) for t in lines), default=0) * CHAR_W + 2 * PAD


class _Svg:
    def __init__(self) -> None:
        self.parts: List[str] = []

    def rect(self, x, y, w, h, fill, stroke, dash=False, width=1.2, rx=4) -> None:
        d = ' stroke-dasharray="5,3"' if dash else ""
        self.parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{h:.1f}" '
                          f'rx="{rx}" fill="{fill}" stroke="{stroke}" stroke-width="{width}"{d}/>')

    def text(self, x, y, s, colour="#111111", bold=False, size=FONT_SIZE, anchor="start") -> None:
        b = ' font-weight="bold"' if bold else ""
        a = f' text-anchor="{anchor}"' if anchor != "start" else ""
        fs = f' font-size="{size}"' if size != FONT_SIZE else ""
        self.parts.append(f'<text x="{x:.1f}" y="{y:.1f}" fill="{colour}"{b}{a}{fs} '
                          f'xml:space="preserve">{_esc(s)}</text>')

    def arrow(self, x1, y1, x2, y2, colour, label: str = "") -> None:
        marker = "arrow-" + colour.lstrip("#")
        self.parts.append(f'<path d="M{x1:.1f},{y1:.1f} C{x1 + 20:.1f},{y1:.1f} '
                          f'{x2 - 20:.1f},{y2:.1f} {x2:.1f},{y2:.1f}" fill="none" '
                          f'stroke="{colour}" stroke-width="2.2" marker-end="url(#{marker})"/>')


# A line of a box: text, colour, bold.
_Line = Tuple[str, str, bool]
INK = "#111111"


@dataclass
class _Layout:
    l4_w: float
    l3_w: float

    @property
    def width(self) -> float:
        return self.l4_w + GAP + self.l3_w


def _l4_box(s: L4Slot) -> List[_Line]:
    colour = VERDICT_COLOUR[verdict_label(s.verdict)]
    lines: List[_Line] = [(t, INK, k == 0) for k, t in enumerate(slot_lines(s))]
    if s.verdict:
        lines.append((s.verdict, colour, True))
    if s.expected_pa is not None:
        lines.append((expected_label(s.verdict) + ":", colour, False))
        lines.append((" " + target_text(s.expected_name, s.expected_pa), colour, False))
    return lines


def _l3_box(s: L4Slot) -> List[_Line]:
    """The lines of the box an L4 slot points to: its L3 table, compactly."""
    if s.note:
        return [(f"{s.target_pa:#x}", INK, True), (s.note, INK, False)]
    t = s.table
    assert t is not None
    lines: List[_Line] = [(f"L3 {target_text(t.name, t.pa)}", INK, True),
                          (OWNER_TEXT[t.owner] + (f"; same table as L4[{s.same_as}]"
                                                  if s.same_as is not None else ""),
                           OWNER_STROKE[t.owner], False)]
    if s.verdict in MISSED:
        lines.append(("not the table Xen meant: the CPU walks this page as an L3",
                      VERDICT_COLOUR[s.verdict], False))
    if t.error:
        return lines + [(f"unreadable: {t.error}", VERDICT_COLOUR[xenimage.UNRELOCATED], False)]
    if not t.rows:
        lines.append(("no present entry", INK, False))
    shown = t.rows[:MAX_L3_ROWS]
    for r in shown:
        head, detail = row_parts(r)
        colour = VERDICT_COLOUR[r.verdict] if r.verdict in VERDICT_COLOUR else INK
        strong = r.verdict is not None and r.verdict != xenimage.RELOCATED
        lines.append((head + (f"  {r.verdict}" if r.verdict else ""), colour, strong))
        if r.expected_pa is not None:
            lines.append((f"    {expected_label(r.verdict)} "
                          + target_text(r.expected_name, r.expected_pa),
                          colour, False))
        if detail:
            lines.append(("    " + detail, "#444444", False))
    if len(t.rows) > len(shown):
        rest = t.rows[len(shown):]
        lines.append((f"... {sum(r.count for r in rest)} more entries in {len(rest)} runs",
                      INK, False))
    return lines


def _box_h(lines: Sequence[_Line]) -> float:
    return len(lines) * LINE_H + 2 * PAD


ROW_GAP = 12


HOW_TO_READ = (
    "How to read this: an L4 entry covers 512 GiB of virtual addresses and points to an L3 "
    "table; an L3 entry covers 1 GiB",
    "and points to an L2 table (summarised on the line below it) or maps a 1 GiB page; an L2 "
    "entry maps 2 MiB or points to an L1.")


def _legend(svg: _Svg, x: float, y: float, width: float, owners: Sequence[str]) -> float:
    """Draw the legend (the owners that occur, every pointer class); return its height."""
    h = 5 * LINE_H + 2 * PAD + 12   # two lines of text, the owners, two rows of classes
    svg.rect(x, y, width, h, "#ffffff", "#999999")
    ty = y + PAD + 12
    for line in HOW_TO_READ:
        svg.text(x + PAD, ty, line)
        ty += LINE_H
    ty += 4
    cx = x + PAD
    svg.text(cx, ty, "table lives in:", bold=True)
    cx += 16 * CHAR_W
    for owner in owners:
        svg.rect(cx, ty - 11, 26, 14, OWNER_FILL[owner], OWNER_STROKE[owner], rx=2)
        svg.text(cx + 32, ty, OWNER_TEXT[owner])
        cx += 32 + (len(OWNER_TEXT[owner]) + 3) * CHAR_W
    svg.text(cx, ty, "(dashed: shown again, or not expanded)", colour="#555555")
    ty += LINE_H + 4
    cx = x + PAD
    svg.text(cx, ty, "pointer is:", bold=True)
    cx += 16 * CHAR_W
    row_start = cx
    for i, kind in enumerate(VERDICT_COLOUR):
        if i == 3:
            ty += LINE_H + 2
            cx = row_start
        colour = VERDICT_COLOUR[kind]
        svg.parts.append(f'<line x1="{cx:.1f}" y1="{ty - 4:.1f}" x2="{cx + 26:.1f}" '
                         f'y2="{ty - 4:.1f}" stroke="{colour}" stroke-width="3"/>')
        svg.text(cx + 32, ty, VERDICT_TEXT[kind], colour=colour)
        cx += 32 + (len(VERDICT_TEXT[kind]) + 3) * CHAR_W
    return h


def _owners(models: Sequence[TreeModel]) -> List[str]:
    seen = {m.root_owner for m in models}
    for m in models:
        for sl in m.slots:
            seen.add(sl.owner)
            if sl.table is not None:
                seen.add(sl.table.owner)
                seen.update(r.owner for r in sl.table.rows)
    return [o for o in OWNER_TEXT if o in seen]


def _legend_width(owners: Sequence[str]) -> float:
    """Wide enough for its longest line."""
    item = lambda text: 32 + (len(text) + 3) * CHAR_W  # noqa: E731 - swatch + text
    kinds = [VERDICT_TEXT[k] for k in VERDICT_COLOUR]
    rows = [max(len(t) for t in HOW_TO_READ) * CHAR_W,
            16 * CHAR_W + sum(item(OWNER_TEXT[o]) for o in owners) + 40 * CHAR_W,
            16 * CHAR_W + sum(item(t) for t in kinds[:3]),
            16 * CHAR_W + sum(item(t) for t in kinds[3:])]
    return max(rows) + 2 * PAD


def to_svg(models: Sequence[TreeModel], title: str = "") -> str:
    """One SVG document drawing every model side by side, L4 slots aligned in rows."""
    if not models:
        raise GdbextError("nothing to draw: no page-table tree given")
    layouts: List[_Layout] = []
    for m in models:
        l4_w = _text_w(["entry 0x0000000000000000 "]
                       + [t for s in m.slots for t, _c, _b in _l4_box(s)])
        l3_w = _text_w([t for s in m.slots for t, _c, _b in _l3_box(s)] + ["x" * 44])
        cap_w = _text_w(model_caption(m) + [m.title]) - l4_w - GAP
        layouts.append(_Layout(l4_w, max(l3_w, cap_w)))
    indexes = sorted({s.index for m in models for s in m.slots})
    by_index = [{s.index: s for s in m.slots} for m in models]
    absent_h = LINE_H + 2 * PAD
    row_h = {i: max(max(_box_h(_l4_box(s)), _box_h(_l3_box(s))) if s else absent_h
                    for s in (bi.get(i) for bi in by_index)) + ROW_GAP
             for i in indexes}

    margin = 16
    total_w = margin * 2 + sum(l.width for l in layouts) + COL_GAP * (len(models) - 1)
    owners = _owners(models)
    legend_w = max(total_w - 2 * margin, _legend_width(owners))
    total_w = max(total_w, legend_w + 2 * margin)
    svg = _Svg()
    y = margin
    if title:
        svg.text(margin, y + 16, title, bold=True, size=16)
        y += 28
    y += _legend(svg, margin, y, legend_w, owners) + 16
    cap_lines = max(len(model_caption(m)) + 1 for m in models)
    cap_top = y
    y += cap_lines * LINE_H + 12
    x = margin
    for mi, (m, lay, bi) in enumerate(zip(models, layouts, by_index)):
        svg.parts.append(f'<g class="tree" data-model="{mi}" data-title="{_esc(m.title)}">')
        cy = cap_top + 14
        svg.text(x, cy, m.title, bold=True, size=14)
        for line in model_caption(m):
            cy += LINE_H
            svg.text(x, cy, line, colour="#333333")
        ry = y
        for i in indexes:
            s = bi.get(i)
            h = row_h[i] - ROW_GAP
            if s is None:
                svg.rect(x, ry, lay.l4_w, absent_h, "#ffffff", "#bbbbbb", dash=True)
                svg.text(x + PAD, ry + PAD + 12, f"L4[{i}] not present", colour="#888888")
            else:
                _draw_slot(svg, x, ry, h, lay, m, s)
            ry += row_h[i]
        svg.parts.append("</g>")
        x += lay.width + COL_GAP
    if not indexes:
        svg.text(margin, y + 14, "no present L4 entry")
    total_h = y + sum(row_h.values()) + margin + (LINE_H if not indexes else 0)
    markers = "".join(
        f'<marker id="arrow-{c.lstrip("#")}" viewBox="0 0 10 10" refX="9" refY="5" '
        f'markerWidth="7" markerHeight="7" orient="auto-start-reverse">'
        f'<path d="M0,0 L10,5 L0,10 z" fill="{c}"/></marker>'
        for c in sorted(set(VERDICT_COLOUR.values())))
    head = (f'<?xml version="1.0" encoding="UTF-8"?>\n'
            f'<svg xmlns="http://www.w3.org/2000/svg" version="1.1" '
            f'width="{total_w:.0f}" height="{total_h:.0f}" '
            f'viewBox="0 0 {total_w:.0f} {total_h:.0f}" font-family="{_esc(FONT)}" '
            f'font-size="{FONT_SIZE}">\n'
            f'<title>{_esc(title or " / ".join(m.title for m in models))}</title>\n'
            f'<defs>{markers}</defs>\n'
            f'<rect x="0" y="0" width="{total_w:.0f}" height="{total_h:.0f}" fill="#ffffff"/>\n')
    return head + "\n".join(svg.parts) + "\n</svg>\n"


def _draw_slot(svg: _Svg, x: float, y: float, h: float, lay: _Layout, m: TreeModel,
               s: L4Slot) -> None:
    verdict = verdict_label(s.verdict)
    colour = VERDICT_COLOUR[verdict]
    svg.parts.append(f'<g class="l4-slot" data-index="{s.index}" data-verdict="{_esc(verdict)}">')
    # The L4 entry: filled like the table it belongs to, edged by its verdict.
    svg.rect(x, y, lay.l4_w, h, OWNER_FILL[m.root_owner], colour,
             width=2.4 if s.verdict else 1.2)
    ty = y + PAD + 12
    for text, c, bold in _l4_box(s):
        svg.text(x + PAD, ty, text, colour=c, bold=bold)
        ty += LINE_H
    # What it points to: the L3 table (dashed when shown already or not expanded).
    bx = x + lay.l4_w + GAP
    owner = s.table.owner if s.table is not None else s.owner
    svg.rect(bx, y, lay.l3_w, h, OWNER_FILL[owner], OWNER_STROKE[owner],
             dash=s.same_as is not None or bool(s.note))
    ty = y + PAD + 12
    for text, c, bold in _l3_box(s):
        svg.text(bx + PAD, ty, text, colour=c, bold=bold)
        ty += LINE_H
    ay = y + PAD + 8
    svg.arrow(x + lay.l4_w, ay, bx - 2, ay, colour)
    svg.parts.append("</g>")


# --- DOT ------------------------------------------------------------------------------------

def _dot_str(text: str) -> str:
    """A DOT double-quoted string."""
    return '"' + str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _html(text: object) -> str:
    return _xml_escape(str(text), {'"': "&quot;"})


def _node_id(model_index: int, pa: int) -> str:
    return f"m{model_index}_t{pa:x}"


def to_dot(models: Sequence[TreeModel], title: str = "") -> str:
    """Graphviz text: one node per table (the L4 and each L3 it points to; L2 tables are
    summarised in their L3's rows), one edge per present L4 pointer, one cluster per tree."""
    if not models:
        raise GdbextError("nothing to draw: no page-table tree given")
    head = ["digraph l4_trees {",
           "  rankdir=LR;",
           f'  graph [fontname="DejaVu Sans Mono", label={_dot_str(title or "")}, labelloc=t];',
           '  node [shape=plain, fontname="DejaVu Sans Mono", fontsize=10];',
           '  edge [fontname="DejaVu Sans Mono", fontsize=9];']
    clusters: List[List[str]] = []
    for mi, m in enumerate(models):
        out = []
        clusters.append(out)
        out.append(f"  subgraph cluster_{mi} {{")
        out.append(f"    label={_dot_str(m.title + ' - ' + model_caption(m)[0])};")
        rows = [f'<tr><td colspan="2" bgcolor="{OWNER_STROKE[m.root_owner]}">'
                f'<font color="white"><b>L4 {_html(target_text(m.root_name, m.root))}</b>'
                f'</font></td></tr>']
        for s in m.slots:
            colour = VERDICT_COLOUR[verdict_label(s.verdict)]
            rows.append(f'<tr><td align="left">[{s.index}] '
                        f'{_html(f"{s.va:#x}")}</td><td port="s{s.index}" align="left">'
                        f'<font color="{colour}">{_html(f"{s.raw:#x}")} '
                        f'{_html(" ".join(s.flags))}'
                        f'{_html(" " + s.verdict) if s.verdict else ""}</font></td></tr>')
        if not m.slots:
            rows.append('<tr><td colspan="2">no present entry</td></tr>')
        out.append(f"    {_node_id(mi, m.root)} [label=<<table border=\"1\" cellborder=\"0\" "
                   f"cellspacing=\"0\" bgcolor=\"{OWNER_FILL[m.root_owner]}\">"
                   + "".join(rows) + "</table>>];")
        drawn = {m.root}
        for s in m.slots:
            if s.table is None or s.table.pa in drawn:
                continue
            drawn.add(s.table.pa)
            t = s.table
            rows = [f'<tr><td bgcolor="{OWNER_STROKE[t.owner]}"><font color="white"><b>'
                    f'L3 {_html(target_text(t.name, t.pa))}</b></font></td></tr>',
                    f'<tr><td align="left">{_html(OWNER_TEXT[t.owner])}</td></tr>']
            if t.error:
                rows.append(f'<tr><td align="left">unreadable: {_html(t.error)}</td></tr>')
            for r in t.rows[:MAX_L3_ROWS]:
                c = VERDICT_COLOUR[verdict_label(r.verdict)]
                rows.append(f'<tr><td align="left"><font color="{c}">{_html(row_text(r))}'
                            f'</font></td></tr>')
            if len(t.rows) > MAX_L3_ROWS:
                rest = t.rows[MAX_L3_ROWS:]
                rows.append(f'<tr><td align="left">... {sum(r.count for r in rest)} more '
                            f'entries</td></tr>')
            if not t.rows and not t.error:
                rows.append('<tr><td align="left">no present entry</td></tr>')
            out.append(f"    {_node_id(mi, t.pa)} [label=<<table border=\"1\" cellborder=\"0\" "
                       f"cellspacing=\"0\" bgcolor=\"{OWNER_FILL[t.owner]}\">"
                       + "".join(rows) + "</table>>];")
        for idx, src, dst in m.pointers():
            s = next(x for x in m.slots if x.index == idx)
            colour = VERDICT_COLOUR[verdict_label(s.verdict)]
            label = s.verdict or ""
            if s.expected_pa is not None:
                label += (f" ({expected_label(s.verdict)} "
                          f"{target_text(s.expected_name, s.expected_pa)})")
            out.append(f"    {_node_id(mi, src)}:s{idx}:e -> {_node_id(mi, dst)} "
                       f"[color={_dot_str(colour)}, fontcolor={_dot_str(colour)}, "
                       f"label={_dot_str(label)}];")
        out.append("  }")
    # dot stacks clusters of a left-to-right graph bottom-up: emit the last tree first
    # so that the first one reads at the top.
    lines = head + [line for cluster in reversed(clusters) for line in cluster] + ["}"]
    return "\n".join(lines) + "\n"


# --- text and files -----------------------------------------------------------------------------

def to_text(models: Sequence[TreeModel]) -> str:
    """The same content as lines, for the terminal."""
    lines: List[str] = []
    for m in models:
        lines.append(m.title)
        lines.extend("  " + c for c in model_caption(m))
        for s in m.slots:
            v = f"  {s.verdict}" if s.verdict else ""
            lines.append(f"  L4[{s.index}] {slot_va_text(s)}  {s.raw:#018x} {' '.join(s.flags)}"
                         f" -> {target_text(s.target_name, s.target_pa)} "
                         f"({OWNER_TEXT[s.owner]}){v}")
            if s.expected_pa is not None:
                lines.append(f"      {expected_label(s.verdict)} "
                             f"{target_text(s.expected_name, s.expected_pa)}")
            lines.extend("      " + t for t, _c, _b in _l3_box(s)[2 if s.table else 1:])
    return "\n".join(lines)


def write_files(models: Sequence[TreeModel], svg_path: Optional[str] = None,
                dot_path: Optional[str] = None, title: str = "") -> List[str]:
    """Write the SVG and/or DOT files; return the paths written."""
    written: List[str] = []
    for path, render in ((svg_path, to_svg), (dot_path, to_dot)):
        if not path:
            continue
        path = os.path.expanduser(path)
        text = render(models, title)
        try:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
        except OSError as err:
            raise GdbextError(f"cannot write {path}: {err.strerror}") from None
        written.append(path)
    return written
