"""xen-regs, xen-pt, xen-va2pa, xen-pa2va: the paging commands.

Addresses are parsed by addresses.parse_address (Xen symbols, SYMBOL@pa, GDB
expressions); what is walked comes from the context's ``situation()``. When
xen-syms is loaded and B is known (and the build-id matches), the output names
Xen's objects (core.walknames): table pages, the target of each range, and how
each pointer read from a Xen boot table was relocated.
"""

from __future__ import annotations

from typing import Optional

import gdb

from ...core import paging, x86
from ...core.walknames import Situation, judge_raw, situation_namer, verdict_text
from ..addresses import PA_SYNTAX_HELP, SYNTAX_HELP, parse_address
from ..command import (CommandParser, XenCommand, add_json_option, add_root_options, emit,
                       parse_count)
from ..context import RootChoice
from ..drawing import write_diagram
from ..reports import RangeFilter, pa2va_report, ranges_report, walk_report

class RegsCommand(XenCommand):
    name = "regs"
    summary = "Show CR0, CR3, CR4, EFER decoded and the paging mode they select."

    def make_parser(self) -> CommandParser:
        p = CommandParser(description=self.summary)
        add_json_option(p)
        return p

    def run(self, args, from_tty):
        regs = self.ctx.read_control_registers()
        regs["rip"] = self.ctx.target.read_register("rip")
        ctx = self.ctx.cpu_context(regs)
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
            self.write_json({
                **regs, "mode": ctx.mode.name, "root": root,
                "flags": decoded, "cr3_low_bits": regs["cr3"] & x86.CR3_FLAGS_MASK})
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
        emit("\n".join(lines), from_tty)


class PtCommand(XenCommand):
    name = "pt"
    summary = "Dump the page-table tree (from CR3 or any table) as coalesced ranges."
    complete_values = {"--range": "address", "--root": "root"}

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
            # One drawing path for xen-pt, xen-diagram and the walkthrough.
            result = write_diagram(self.ctx, args.svg, args.dot, root=args.root,
                                   mode=args.mode)
            if args.json:
                self.write_json({"files": [str(f) for f in result.files],
                                          "note": result.note})
            else:
                gdb.write("".join(f"wrote {f}\n" for f in result.files))
            return
        choice = RootChoice(args.root, args.mode)
        lo, hi = args.range if args.range else (None, None)
        if args.levels:
            with self.ctx.target.phys_mode():
                sit = self.ctx.situation(choice)
                lo_va = parse_address(self.ctx, lo, "range start") if lo is not None else None
                hi_va = parse_address(self.ctx, hi, "range end") if hi is not None else None
                loaded, xen_note = self.ctx.loaded_or_note()
                text = tree_text(sit, sit.mem, lo_va, hi_va, situation_namer(sit, loaded),
                                 loaded, args.limit)
            emit(text + (f"\n({xen_note})" if xen_note else ""), from_tty)
            return
        report = ranges_report(self.ctx, choice, lo, hi,
                               RangeFilter(args.writable, args.exec, args.wx, args.user),
                               args.limit, follow_cycles=not args.no_follow_cycles)
        self.print_report(report, args.json, from_tty)


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


class Va2paCommand(XenCommand):
    name = "va2pa"
    summary = "Translate a virtual address, showing every level of the walk."
    complete_positional = "address"
    complete_values = {"--root": "root"}

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
        report = walk_report(self.ctx, " ".join(args.address),
                             RootChoice(args.root, args.mode))
        self.print_report(report, args.json, from_tty)


class Pa2vaCommand(XenCommand):
    name = "pa2va"
    summary = "List every virtual address that maps a physical address."
    complete_positional = "pa-address"
    complete_values = {"--root": "root"}

    def make_parser(self) -> CommandParser:
        p = CommandParser(description=self.summary,
                          epilog="Examples: xen-pa2va 0x3d800000; xen-pa2va efi_multiboot2@pa")
        p.add_argument("address", nargs="+", metavar="PA",
                       help=PA_SYNTAX_HELP)
        add_root_options(p)
        add_json_option(p)
        return p

    def run(self, args, from_tty):
        report = pa2va_report(self.ctx, " ".join(args.address),
                              RootChoice(args.root, args.mode))
        self.print_report(report, args.json, from_tty)


def install(ctx) -> None:
    for cls in (RegsCommand, PtCommand, Va2paCommand, Pa2vaCommand):
        cls(ctx)
