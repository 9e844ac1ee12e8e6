"""xen-regs, xen-pt, xen-va2pa, xen-pa2va: the paging commands."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Dict, List, Optional

import gdb

from ..core import paging, render, x86
from ..core.errors import GdbextError
from ..core.paging import ATTR_NX, ATTR_U, ATTR_W, MODES, PagingContext
from .backend import target
from .command import CommandParser, XenCommand, add_json_option, eval_int, parse_int, use_color

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


_MAXPHYADDR: Optional[MaxPhyAddr] = None


def maxphyaddr() -> int:
    return int(_MAXPHYADDR.value) if _MAXPHYADDR is not None else x86.MAXPHYADDR_ARCH


@dataclass
class Situation:
    """What a paging command works from at this stop."""
    regs: Dict[str, int]
    ctx: PagingContext
    root: int
    root_source: str


def read_control_registers() -> Dict[str, int]:
    t = target()
    return {name: t.read_register(name) for name in CONTROL_REGISTERS}


def add_root_options(p: CommandParser) -> None:
    p.add_argument("--root", default="cr3", metavar="ROOT",
                   help="top-level table: 'cr3' (default), or a physical address or GDB "
                        "expression giving one")
    p.add_argument("--mode", choices=sorted(m for m in MODES if m != "off"),
                   help="paging mode to interpret ROOT in (default: the CPU's, from CR0, CR4 "
                        "and EFER.LMA)")


def situation(args: argparse.Namespace) -> Situation:
    regs = read_control_registers()
    if args.mode:
        base = PagingContext.from_registers(regs["cr0"], regs["cr4"], regs["efer"])
        ctx = PagingContext(MODES[args.mode], nxe=base.nxe, pke=base.pke,
                            pse=base.pse, wp=base.wp, maxphyaddr=maxphyaddr())
    else:
        ctx = PagingContext.from_registers(regs["cr0"], regs["cr4"], regs["efer"],
                                           maxphyaddr=maxphyaddr())
    if ctx.mode is paging.MODE_OFF:
        raise GdbextError("paging is off (CR0.PG=0): addresses are physical; pass --mode "
                          "and --root to read a table anyway")
    if args.root == "cr3":
        return Situation(regs, ctx, ctx.root_from_cr3(regs["cr3"]), "cr3")
    root = eval_int(args.root, "root table")
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
        ctx = PagingContext.from_registers(regs["cr0"], regs["cr4"], regs["efer"])
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
            epilog="Examples: xen-pt; xen-pt --range 0xffff82d040000000 0xffff82d040800000; "
                   "xen-pt --wx --json; xen-pt --root 0x3f801000 --levels")
        add_root_options(p)
        p.add_argument("--range", nargs=2, metavar=("LO", "HI"),
                       help="only VAs in [LO, HI): GDB expressions; tables outside are not read")
        p.add_argument("--writable", action="store_true", help="only writable ranges")
        p.add_argument("--exec", action="store_true", help="only executable ranges")
        p.add_argument("--wx", action="store_true", help="only writable and executable ranges")
        p.add_argument("--user", action="store_true", help="only user-accessible ranges")
        p.add_argument("--levels", action="store_true",
                       help="show the tree, table by table, instead of ranges")
        p.add_argument("--limit", type=parse_int, default=0, metavar="N",
                       help="show at most N ranges (0: all)")
        p.add_argument("--no-follow-cycles", action="store_true",
                       help="do not descend through entries that point back to a table above "
                            "(e.g. Xen's linear page-table slot 258)")
        add_json_option(p)
        return p

    def run(self, args, from_tty):
        t = target()
        with t.phys_mode():
            sit = situation(args)
            lo = hi = None
            if args.range:
                lo = eval_int(args.range[0], "range start")
                hi = eval_int(args.range[1], "range end")
            if args.levels:
                text = tree_text(sit, t.cache, lo, hi)
                _emit(text, from_tty)
                return
            en = paging.enumerate_ranges(sit.ctx, t.cache, sit.root, lo, hi,
                                         follow_cycles=not args.no_follow_cycles)
        ranges = _filter(en.ranges, args)
        truncated = 0
        if args.limit and len(ranges) > args.limit:
            truncated = len(ranges) - args.limit
            ranges = ranges[:args.limit]
        if args.json:
            gdb.write(render.ranges_json(en, ranges, truncated) + "\n")
            return
        head = (f"{sit.ctx.mode.name} paging, root {sit.root:#x} ({sit.root_source}): "
                f"{len(en.ranges)} ranges, {len(en.tables)} tables")
        parts = [head, render.ranges_table(ranges)]
        if truncated:
            parts.append(f"... {truncated} more ranges (raise --limit, or 0 for all)")
        parts.extend(render.notes_text(en.notes))
        _emit("\n".join(parts), from_tty)


def tree_text(sit: Situation, cache, lo: Optional[int], hi: Optional[int]) -> str:
    rows = paging.tree_rows(sit.ctx, cache, sit.root, lo, hi)
    return "\n".join(rows)


class Va2paCommand(XenCommand):
    name = "va2pa"
    summary = "Translate a virtual address, showing every level of the walk."

    def make_parser(self) -> CommandParser:
        p = CommandParser(description=self.summary + " The layout follows Xen's "
                          "show_page_walk(): one 'L4[0x105] = <entry>' line per level.",
                          epilog="Examples: xen-va2pa $pc; xen-va2pa 0xffff82d0403e6980 --json")
        p.add_argument("address", nargs="+", metavar="ADDR",
                       help="a GDB expression for the virtual address")
        add_root_options(p)
        add_json_option(p)
        return p

    def run(self, args, from_tty):
        t = target()
        expr = " ".join(args.address)
        with t.phys_mode():
            sit = situation(args)
            va = eval_int(expr, "address")
            w = paging.walk(sit.ctx, t.cache, sit.root, va)
        if args.json:
            gdb.write(render.to_json(render.walk_dict(w)) + "\n")
        else:
            _emit(render.walk_text(w), from_tty)


class Pa2vaCommand(XenCommand):
    name = "pa2va"
    summary = "List every virtual address that maps a physical address."

    def make_parser(self) -> CommandParser:
        p = CommandParser(description=self.summary,
                          epilog="Example: xen-pa2va 0x3d800000")
        p.add_argument("address", nargs="+", metavar="PA", help="a GDB expression")
        add_root_options(p)
        add_json_option(p)
        return p

    def run(self, args, from_tty):
        t = target()
        with t.phys_mode():
            sit = situation(args)
            pa = eval_int(" ".join(args.address), "physical address")
            en = paging.enumerate_ranges(sit.ctx, t.cache, sit.root)
        hits = paging.pa_to_vas(en.ranges, pa)
        if args.json:
            gdb.write(render.to_json({"pa": pa, "root": sit.root, "mode": en.mode,
                                      "vas": [{"va": va, **render.range_dict(r)}
                                              for va, r in hits]}) + "\n")
            return
        if not hits:
            _emit(f"PA {pa:#x} is not mapped under root {sit.root:#x}", from_tty)
            return
        lines = [f"PA {pa:#x} is mapped at {len(hits)} virtual address(es):"]
        for va, r in hits:
            lines.append(f"  {va:#018x}  ({x86.size_name(r[3])} page, "
                         f"{paging.attrs_flags(r[4])})")
        _emit("\n".join(lines), from_tty)


def install() -> None:
    global _MAXPHYADDR
    if _MAXPHYADDR is None:
        _MAXPHYADDR = MaxPhyAddr()
    RegsCommand()
    PtCommand()
    Va2paCommand()
    Pa2vaCommand()
