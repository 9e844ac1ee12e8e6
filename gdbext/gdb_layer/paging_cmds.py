"""xen-regs, xen-pt, xen-va2pa, xen-pa2va: the paging commands.

Addresses are parsed by addresses.parse_address (Xen symbols, SYMBOL@pa, GDB
expressions). When xen-syms is loaded and B is known (and the build-id
matches), the output names Xen's objects: table pages, the target of each
range, and how each pointer read from a Xen boot table was relocated.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Dict, List, Optional

import gdb

from ..core import l4merge, paging, render, x86, xenimage
from ..core.errors import GdbextError
from ..core.paging import ATTR_NX, ATTR_U, ATTR_W, MODES, PagingContext
from . import xen_cmds
from .addresses import SYNTAX_HELP, parse_address
from .backend import target
from .command import (CommandParser, XenCommand, add_json_option, parse_count, parse_int,
                      use_color)

CONTROL_REGISTERS = ("cr0", "cr3", "cr4", "efer")


class MaxPhyAddr(gdb.Parameter):
    """Physical-address width (MAXPHYADDR) used to find reserved bits in entries.

GDB cannot read CPUID through QEMU's gdbstub. The default 52 is the architectural
maximum and never reports a false fault; set it to the guest CPU's width (QEMU's
TCG CPUs have 40 unless -cpu ...,phys-bits=N) to catch entries above it."""

    set_doc = "Set the physical-address width used by gdbext's page walks."
    show_doc = "Show the physical-address width used by gdbext's page walks."

    def __init__(self) -> None:
        super().__init__("xen-maxphyaddr", gdb.COMMAND_DATA, gdb.PARAM_ZUINTEGER)
        self.value = x86.MAXPHYADDR_ARCH

    def get_set_string(self) -> str:
        if not 32 <= int(self.value) <= 52:
            bad = self.value
            self.value = x86.MAXPHYADDR_ARCH
            raise gdb.GdbError(f"xen-maxphyaddr must be between 32 and 52, not {bad}")
        return ""


class PhysRead(gdb.Parameter):
    """How gdbext reads guest physical memory.

auto: QEMU's Qqemu.PhyMemMode packet when the stub has it, else 'monitor xp'.
packet: always the packet (fast; also needed by xen-l4merge-apply to write).
monitor-xp: always 'monitor xp' (slower; for stubs without the packet, or to check
one reading against the other)."""

    set_doc = "Set how gdbext reads guest physical memory."
    show_doc = "Show how gdbext reads guest physical memory."
    METHODS = {"auto": None, "packet": "phymem", "monitor-xp": "xp"}

    def __init__(self) -> None:
        super().__init__("xen-phys-read", gdb.COMMAND_DATA, gdb.PARAM_ENUM,
                         list(self.METHODS))
        self.value = "auto"

    def get_set_string(self) -> str:
        target().force_method(self.METHODS[self.value])
        return ""


_MAXPHYADDR: Optional[MaxPhyAddr] = None
_PHYS_READ: Optional[PhysRead] = None


def maxphyaddr() -> int:
    return int(_MAXPHYADDR.value) if _MAXPHYADDR is not None else x86.MAXPHYADDR_ARCH


@dataclass
class Situation:
    """What a paging command works from at this stop."""
    regs: Dict[str, int]
    ctx: PagingContext
    root: int
    root_source: str
    # Memory to walk: the guest's (None), or an overlay holding a predicted merge.
    mem: Optional[object] = None
    # The Xen table whose link values the root's entries are copies of (a merged L4's
    # upper half copies idle_pg_table's), for judging its pointers.
    judge_root_as: Optional[str] = None

    def memory(self):
        return self.mem if self.mem is not None else target().cache


# --root values that walk the RFC's merged L4 as predicted (nothing written).
MERGE_ROOTS = {"merge": False, "merge-relocated": True}


def read_control_registers() -> Dict[str, int]:
    return target().read_registers(CONTROL_REGISTERS)


def cpu_context(regs: Dict[str, int]) -> PagingContext:
    """The paging the CPU does with these CR0/CR4/EFER, at 'set xen-maxphyaddr'."""
    return PagingContext.from_registers(regs["cr0"], regs["cr4"], regs["efer"],
                                        maxphyaddr=maxphyaddr())


def add_root_options(p: CommandParser) -> None:
    p.add_argument("--root", default="cr3", metavar="ROOT",
                   help="top-level table: 'cr3' (default), or its physical address: a GDB "
                        "expression, or SYMBOL@pa (e.g. idle_pg_table@pa); or 'merge' / "
                        "'merge-relocated': the RFC's merged L4 as predicted from the "
                        "firmware's (at __efi64_mb2_start; the guest is not written), its "
                        "upper half copied raw / with B added to Xen's pointers")
    p.add_argument("--mode", choices=sorted(m for m in MODES if m != "off"),
                   help="paging mode to interpret ROOT in (default: the CPU's, from CR0, CR4 "
                        "and EFER.LMA)")


def situation(args: argparse.Namespace) -> Situation:
    regs = read_control_registers()
    ctx = cpu_context(regs)
    if args.mode:
        ctx = PagingContext(MODES[args.mode], nxe=ctx.nxe, pke=ctx.pke, pse=ctx.pse,
                            wp=ctx.wp, maxphyaddr=ctx.maxphyaddr)
    if ctx.mode is paging.MODE_OFF:
        raise GdbextError("paging is off (CR0.PG=0): addresses are physical; pass --mode "
                          "and --root to read a table anyway")
    if args.root == "cr3":
        return Situation(regs, ctx, ctx.root_from_cr3(regs["cr3"]), "cr3")
    if args.root in MERGE_ROOTS:
        if ctx.mode is not paging.MODE_4LEVEL:
            raise GdbextError(f"--root {args.root}: the RFC's merge is a 4-level L4; the CPU "
                              f"is in {ctx.mode.name} paging")
        from . import merge_cmds  # here, not at the top: merge_cmds imports this module
        pred = merge_cmds.predicted_merge(relocate=MERGE_ROOTS[args.root])
        return Situation(regs, ctx, pred.root,
                         f"{args.root}: predicted, M in {pred.table_source}",
                         mem=pred.mem, judge_root_as=l4merge.IDLE_L4)
    root = parse_address(args.root, "root table", space="pa")
    align = 32 if ctx.mode is paging.MODE_PAE else x86.PAGE_SIZE
    if root & (align - 1):
        raise GdbextError(f"root table {root:#x} is not {align}-byte aligned (low bits "
                          f"{root & (align - 1):#x} set): give the table's physical address, "
                          "or 'cr3'")
    if root >= 1 << ctx.maxphyaddr:
        raise GdbextError(f"root table {root:#x} is above the {ctx.maxphyaddr}-bit physical "
                          "address space: give a physical address, not a virtual one")
    return Situation(regs, ctx, root, args.root)


def _emit(text: str, from_tty: bool, lexer: str = "text") -> None:
    if use_color(from_tty):
        text = render.colorize(text, lexer)
    gdb.write(text + "\n")


class RegsCommand(XenCommand):
    name = "regs"
    summary = "Show CR0, CR3, CR4, EFER decoded and the paging mode they select."

    def make_parser(self) -> CommandParser:
        p = CommandParser(description=self.summary)
        add_json_option(p)
        return p

    def run(self, args, from_tty):
        t = target()
        regs = read_control_registers()
        regs["rip"] = t.read_register("rip")
        ctx = cpu_context(regs)
        bits = {
            "cr0": [("PE", x86.CR0_PE), ("WP", x86.CR0_WP), ("PG", x86.CR0_PG)],
            "cr4": [("PSE", x86.CR4_PSE), ("PAE", x86.CR4_PAE), ("PGE", x86.CR4_PGE),
                    ("LA57", x86.CR4_LA57), ("SMEP", x86.CR4_SMEP), ("SMAP", x86.CR4_SMAP),
                    ("PKE", x86.CR4_PKE)],
            "efer": [("SCE", x86.EFER_SCE), ("LME", x86.EFER_LME), ("LMA", x86.EFER_LMA),
                     ("NXE", x86.EFER_NXE)],
        }
        decoded = {reg: [n for n, b in pairs if regs[reg] & b] for reg, pairs in bits.items()}
        root = None if ctx.mode is paging.MODE_OFF else ctx.root_from_cr3(regs["cr3"])
        if args.json:
            gdb.write(render.to_json({
                **regs, "mode": ctx.mode.name, "root": root,
                "flags": decoded, "cr3_low_bits": regs["cr3"] & x86.CR3_FLAGS_MASK}) + "\n")
            return
        lines = [f"rip  {regs['rip']:#018x}"]
        for reg in ("cr0", "cr3", "cr4", "efer"):
            extra = " ".join(decoded.get(reg, []))
            if reg == "cr3":
                extra = f"root table {root:#x}" if root is not None else "(unused: paging off)"
                if regs["cr3"] & x86.CR3_FLAGS_MASK:
                    extra += f", low bits {regs['cr3'] & x86.CR3_FLAGS_MASK:#x}"
            lines.append(f"{reg:<4} {regs[reg]:#018x}  {extra}")
        lines.append(f"paging mode: {ctx.mode.name}"
                     + (f" ({ctx.mode.va_bits}-bit virtual addresses)"
                        if ctx.mode is not paging.MODE_OFF else "")
                     + ("" if ctx.mode is paging.MODE_OFF else
                        f", NX {'on' if ctx.nxe else 'off'}, WP {'on' if ctx.wp else 'off'}"))
        _emit("\n".join(lines), from_tty)


def _filter(ranges: List[paging.Range], args) -> List[paging.Range]:
    out = []
    for r in ranges:
        a = r[4]
        if args.writable and not a & ATTR_W:
            continue
        if args.exec and a & ATTR_NX:
            continue
        if args.wx and not (a & ATTR_W and not a & ATTR_NX):
            continue
        if args.user and not a & ATTR_U:
            continue
        out.append(r)
    return out


class PtCommand(XenCommand):
    name = "pt"
    summary = "Dump the page-table tree (from CR3 or any table) as coalesced ranges."

    def make_parser(self) -> CommandParser:
        p = CommandParser(
            description=self.summary + " Ranges are contiguous in VA and PA with the same "
            "effective permissions (combined across levels) and page attributes.",
            epilog="With xen-syms loaded and the load base known, a 'maps' column (JSON key) "
                   "names the Xen object at each range's PA, and --levels names Xen's table "
                   "pages. Examples: xen-pt; xen-pt --range 0xffff82d040000000 "
                   "0xffff82d040800000; xen-pt --range _start _end; xen-pt --wx --json; "
                   "xen-pt --root idle_pg_table@pa --levels")
        add_root_options(p)
        p.add_argument("--range", nargs=2, metavar=("LO", "HI"),
                       help="only VAs in [LO, HI); tables outside are not read. LO, HI: "
                            + SYNTAX_HELP)
        p.add_argument("--writable", action="store_true", help="only writable ranges")
        p.add_argument("--exec", action="store_true", help="only executable ranges")
        p.add_argument("--wx", action="store_true", help="only writable and executable ranges")
        p.add_argument("--user", action="store_true", help="only user-accessible ranges")
        p.add_argument("--levels", action="store_true",
                       help="show the tree, table by table, instead of ranges")
        p.add_argument("--limit", type=parse_count, default=0, metavar="N",
                       help="show at most N ranges, N notes (with --levels: N lines); the "
                            "enumeration stops there (0: all, up to gdbext's cap on work)")
        p.add_argument("--no-follow-cycles", action="store_true",
                       help="do not descend through entries that point back to a table above "
                            "(e.g. Xen's linear page-table slot 258)")
        p.add_argument("--svg", metavar="FILE",
                       help="instead, draw the tree from ROOT as a picture in FILE (SVG; the "
                            "same as xen-diagram --svg, see 'help xen-diagram')")
        p.add_argument("--dot", metavar="FILE",
                       help="instead, write the tree from ROOT as Graphviz DOT to FILE")
        add_json_option(p)
        return p

    def run(self, args, from_tty):
        if args.svg or args.dot:
            # One drawing path for xen-pt and xen-diagram (diagram_cmds owns it).
            from .diagram_cmds import write_diagram
            result = write_diagram(args.svg, args.dot, root=args.root, mode=args.mode)
            if args.json:
                gdb.write(render.to_json({"files": [str(f) for f in result.files],
                                          "note": result.note}) + "\n")
            else:
                gdb.write("".join(f"wrote {f}\n" for f in result.files))
            return
        t = target()
        with t.phys_mode():
            sit = situation(args)
            lo = hi = None
            if args.range:
                lo = parse_address(args.range[0], "range start")
                hi = parse_address(args.range[1], "range end")
            loaded, xen_note = xen_cmds.loaded_or_note()
            namer = situation_namer(sit, loaded)
            if args.levels:
                text = tree_text(sit, sit.memory(), lo, hi, namer, loaded, args.limit)
            else:
                # With a filter, the limit counts filtered ranges: only the cap applies.
                filtered = args.writable or args.exec or args.wx or args.user
                en = paging.enumerate_ranges(sit.ctx, sit.memory(), sit.root, lo, hi,
                                             follow_cycles=not args.no_follow_cycles,
                                             limit=None if filtered else args.limit)
        # Printed only once phys_mode has checked the last replies (restore included).
        if args.levels:
            _emit(text + (f"\n({xen_note})" if xen_note else ""), from_tty)
            return
        ranges = _filter(en.ranges, args)
        truncated = 0
        if args.limit and len(ranges) > args.limit:
            truncated = len(ranges) - args.limit
            ranges = ranges[:args.limit]
        notes = en.notes[:args.limit] if args.limit else en.notes
        notes_more = len(en.notes) - len(notes) + en.notes_dropped
        if args.json:
            gdb.write(render.ranges_json(en, ranges, truncated, namer,
                                         _xen_keys(loaded, xen_note)) + "\n")
            return
        root_name = f" = {namer(sit.root)}" if namer and namer(sit.root) else ""
        counted = "the first " if (en.limited or en.stopped) else ""
        head = (f"{sit.ctx.mode.name} paging, root {sit.root:#x}{root_name} ({sit.root_source}): "
                f"{counted}{len(en.ranges)} ranges, {len(en.tables)} tables")
        parts = [head, render.ranges_table(ranges, namer)]
        if truncated:
            parts.append(f"... {truncated} more ranges (raise --limit, or 0 for all)")
        elif en.limited:
            parts.append(f"... more ranges not enumerated (--limit {args.limit} stopped the "
                         "enumeration; raise it, or 0 for all)")
        parts.extend(render.notes_text(notes))
        if notes_more:
            parts.append(f"... {notes_more} more notes (raise --limit, or narrow with --range)")
        if en.stopped:
            parts.append(f"note: {en.stopped}")
        if xen_note:
            parts.append(f"({xen_note})")
        _emit("\n".join(parts), from_tty)


def tree_text(sit: Situation, cache, lo: Optional[int], hi: Optional[int], namer=None,
              loaded=None, limit: int = 0) -> str:
    def note(entry_pa: int, raw: int) -> Optional[str]:
        v = judge_raw(loaded, entry_pa, raw, sit)
        return verdict_text(v) if v is not None else None

    rows = paging.tree_rows(sit.ctx, cache, sit.root, lo, hi, namer=namer,
                            entry_note=note if loaded is not None else None,
                            max_rows=min(limit, paging.MAX_TREE_ROWS) if limit
                            else paging.MAX_TREE_ROWS)
    return "\n".join(rows)


def _xen_keys(loaded, xen_note: Optional[str]) -> Dict[str, object]:
    """Top-level JSON keys saying what the Xen names were computed from."""
    return {"load_base": loaded.load_base if loaded is not None else None,
            "xen_note": xen_note}


def judge_step(loaded, step, sit: Optional[Situation] = None
               ) -> Optional[xenimage.EntryVerdict]:
    """How a present entry read from one of Xen's boot tables compares with its link value."""
    if not step.entry.present:
        return None
    return judge_raw(loaded, step.entry_pa, step.entry.raw, sit)


def judge_raw(loaded, entry_pa: int, raw: int, sit: Optional[Situation] = None
              ) -> Optional[xenimage.EntryVerdict]:
    """judge_step for an entry known by its PA and value (xen-pt --levels)."""
    if loaded is None or not xenimage.has_bytes(loaded.syms):
        return None   # a .map has no link-time values to compare with
    if sit is not None and sit.judge_root_as and \
            sit.root <= entry_pa < sit.root + x86.PAGE_SIZE:
        index = (entry_pa - sit.root) // 8
        if index < l4merge.L4_HALF:
            return None  # the firmware's half of a merged L4
        return loaded.judge_entry(sit.judge_root_as, index, raw)
    hit = loaded.table_at(entry_pa)
    if hit is None:
        return None
    name, _level, offset = hit
    return loaded.judge_entry(name, offset // 8, raw)


def situation_namer(sit: Situation, loaded):
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


def verdict_text(v: xenimage.EntryVerdict) -> str:
    if v.kind == xenimage.RELOCATED:
        return "relocated"
    if v.kind == xenimage.ABSOLUTE:
        return "absolute, as linked"
    if v.kind == xenimage.FOREIGN and not v.link:
        return "written at run time: link value 0"
    return f"{v.kind}: points at {v.target_pa:#x}, relocated once would be {v.expected_pa:#x}"


class Va2paCommand(XenCommand):
    name = "va2pa"
    summary = "Translate a virtual address, showing every level of the walk."

    def make_parser(self) -> CommandParser:
        p = CommandParser(description=self.summary + " The layout follows Xen's "
                          "show_page_walk(): one 'L4[0x105] = <entry>' line per level.",
                          epilog="With xen-syms loaded and the load base known, each level's "
                                 "table page is named ([idle_pg_table]), each pointer read from "
                                 "a Xen boot table is classified (relocated, unrelocated, "
                                 "relocated-twice, foreign) and the final PA is named; --json "
                                 "adds table_name and pointer to each level and pa_name. "
                                 "Examples: xen-va2pa $pc; xen-va2pa efi_multiboot2; xen-va2pa "
                                 "efi_multiboot2@pa --json")
        p.add_argument("address", nargs="+", metavar="ADDR",
                       help="the virtual address: " + SYNTAX_HELP)
        add_root_options(p)
        add_json_option(p)
        return p

    def run(self, args, from_tty):
        t = target()
        expr = " ".join(args.address)
        with t.phys_mode():
            sit = situation(args)
            va = parse_address(expr, "address")
            w = paging.walk(sit.ctx, sit.memory(), sit.root, va)
            loaded, xen_note = xen_cmds.loaded_or_note()
            verdicts = [judge_step(loaded, step, sit) for step in w.steps]
        namer = situation_namer(sit, loaded)
        if args.json:
            d = render.walk_dict(w)
            for level, step, v in zip(d["levels"], w.steps, verdicts):
                level["table_name"] = namer(step.table_pa) if namer else None
                level["pointer"] = v.as_dict() if v is not None else None
            d["pa_name"] = namer(w.pa) if namer and w.mapped else None
            d.update(_xen_keys(loaded, xen_note))
            gdb.write(render.to_json(d) + "\n")
            return
        notes = {id(step): verdict_text(v) for step, v in zip(w.steps, verdicts) if v}
        text = render.walk_text(w, namer, lambda step: notes.get(id(step)))
        _emit(text + (f"\n({xen_note})" if xen_note else ""), from_tty)


class Pa2vaCommand(XenCommand):
    name = "pa2va"
    summary = "List every virtual address that maps a physical address."

    def make_parser(self) -> CommandParser:
        p = CommandParser(description=self.summary,
                          epilog="Examples: xen-pa2va 0x3d800000; xen-pa2va efi_multiboot2@pa")
        p.add_argument("address", nargs="+", metavar="PA",
                       help="a GDB expression, or SYMBOL@pa for a Xen symbol's physical "
                            "address at the load address")
        add_root_options(p)
        add_json_option(p)
        return p

    def run(self, args, from_tty):
        t = target()
        with t.phys_mode():
            sit = situation(args)
            pa = parse_address(" ".join(args.address), "physical address", space="pa")
            en = paging.enumerate_ranges(sit.ctx, sit.memory(), sit.root)
            loaded, xen_note = xen_cmds.loaded_or_note()
        hits = paging.pa_to_vas(en.ranges, pa)
        name = loaded.name_pa(pa) if loaded is not None else None
        if args.json:
            gdb.write(render.to_json({"pa": pa, "root": sit.root, "mode": en.mode,
                                      "vas": [{**render.range_dict(r), "range_va": r[0],
                                               "va": va}  # the VA of PA, not the range's
                                              for va, r in hits],
                                      "pa_name": name, **_xen_keys(loaded, xen_note)}) + "\n")
            return
        what = f"PA {pa:#x}" + (f" [{name}]" if name else "")
        if not hits:
            _emit(f"{what} is not mapped under root {sit.root:#x}", from_tty)
            return
        lines = [f"{what} is mapped at {len(hits)} virtual address(es):"]
        for va, r in hits:
            lines.append(f"  {va:#018x}  ({x86.size_name(r[3])} page, "
                         f"{paging.attrs_flags(r[4])})")
        _emit("\n".join(lines), from_tty)


def install() -> None:
    global _MAXPHYADDR, _PHYS_READ
    if _MAXPHYADDR is None:
        _MAXPHYADDR = MaxPhyAddr()
    if _PHYS_READ is None:
        _PHYS_READ = PhysRead()
    RegsCommand()
    PtCommand()
    Va2paCommand()
    Pa2vaCommand()
