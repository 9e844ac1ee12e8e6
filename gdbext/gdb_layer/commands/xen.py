"""Xen's symbols and where Xen is: xen-syms, xen-run-to, xen-locate, xen-info.

Xen's state (symbols, load base B and its source, the build-id verdict) is the
context's; finding B is ``core.locate`` (the cheap sources) and
``core.xenimage`` (the scan), running to a symbol is ``run_to`` over
``core.runto``'s plan. These commands parse, call and print.
"""

from __future__ import annotations

import os
import time

from ...core import bootstops, paging, xenefi, xenimage
from ...core.walknames import root_owner
from ...core.xenimage import LoadedXen
from ..addresses import PA_SYNTAX_HELP, parse_address
from ..command import CommandParser, XenCommand, add_json_option, emit, parse_int
from ..run_to import run_to


class SymsCommand(XenCommand):
    name = "syms"
    summary = "Load Xen's symbols from xen-syms (or an nm-format .map file)."
    complete_positional = "file"

    def make_parser(self) -> CommandParser:
        p = CommandParser(description=self.summary + " Without PATH, show what is loaded.",
                          epilog="Example: xen-syms .cache/xen-4.17/usr/lib/debug/boot/"
                                 "xen-syms-4.17-amd64")
        p.add_argument("path", nargs="?", metavar="PATH")
        add_json_option(p)
        return p

    def run(self, args, from_tty):
        x = self.ctx.xen
        if args.path:
            path = os.path.expanduser(args.path)
            t0 = time.perf_counter()
            syms = self.ctx.load_syms(path)
            elapsed = time.perf_counter() - t0
        else:
            syms = self.ctx.require_syms()
            elapsed = None
        info = {
            "path": str(syms.path), "build_id": getattr(syms, "build_id_hex", None),
            "version": syms.version, "virt_start": syms.virt_start,
            "image_start": syms.image_start, "image_end": syms.image_end,
            "symbols": len(syms), "load_base": x.load_base,
            "load_base_source": x.load_base_source or None,
        }
        if args.json:
            self.write_json(info)
            return
        lines = [f"Xen symbols: {info['path']}",
                 f"  version {info['version'] or 'unknown'}, build-id {info['build_id'] or 'none'}, "
                 f"{info['symbols']} symbols"
                 + (f", loaded in {elapsed * 1000:.0f} ms" if elapsed is not None else ""),
                 f"  XEN_VIRT_START {syms.virt_start:#x}, image {syms.image_start:#x}.."
                 f"{syms.image_end:#x}"]
        if x.load_base is not None:
            lines.append(f"  load base B = {x.load_base:#x} (from {x.load_base_source})")
        emit("\n".join(lines), from_tty)


class RunToCommand(XenCommand):
    name = "run-to"
    summary = "Continue until Xen executes SYMBOL, at its load address or its linked address."
    complete_positional = "address"

    def make_parser(self) -> CommandParser:
        p = CommandParser(
            description=self.summary + " Works before GRUB has loaded Xen (QEMU TCG keeps "
            "breakpoints per address): plants breakpoints at the likeliest load bases "
            "(top-down, as the image's multiboot2 RELOCATABLE tag prefers), at the linked "
            "address, and at __high_start; a stop counts only if the bytes at RIP are the "
            "ELF's. If the guess misses, B is read from xen_phys_start and the machine is "
            "reset once to stop there on the next boot (--no-reset to refuse).",
            epilog="Example: xen-run-to __efi64_mb2_start")
        p.add_argument("symbol", metavar="SYMBOL")
        p.add_argument("--timeout", type=float, default=120.0, metavar="S",
                       help="give up after S seconds (default 120)")
        p.add_argument("--base", type=parse_int, metavar="B",
                       help="the load base if known (one breakpoint instead of many)")
        p.add_argument("--no-reset", action="store_true",
                       help="if the load base is missed, stop with an error instead of "
                            "resetting the machine and booting again")
        add_json_option(p)
        return p

    def run(self, args, from_tty):
        result = run_to(self.ctx, args.symbol, args.timeout, args.base, allow_reset=not args.no_reset)
        if args.json:
            self.write_json(result)
            return
        where = (f"its load address {result['rip']:#x} (B = {result['load_base']:#x})"
                 if result["at"] == "load address" else f"its linked address {result['rip']:#x}")
        emit(f"Xen reached {args.symbol} at {where} after {result['seconds']:.1f} s", from_tty)


# -- xen-locate: where is the image? ---------------------------------------------------------

class LocateCommand(XenCommand):
    name = "locate"
    summary = "Find Xen's load base B in guest memory and say how it was found."
    complete_values = {"--base": "pa-address"}

    def make_parser(self) -> CommandParser:
        p = CommandParser(
            description=self.summary + " Sources, most trusted first: --base; RIP inside the "
            "image at its load address; %esi where head.S holds B (x86_32_switch.."
            "trampoline_setup); xen_phys_start once stored (at its linked address, or at its "
            "PA); the multiboot2 MBI's LOAD_BASE_ADDR tag (%rbx); then a scan of the 2 MiB-"
            "aligned bases the image's multiboot2 RELOCATABLE tag allows, for its header and "
            "bytes equal to the ELF's. Every candidate is checked against xen-syms' bytes. B "
            "is stored for the other commands, GDB gets Xen's symbols at B and at the linked "
            "addresses, and the build-id in guest memory is compared with xen-syms'.",
            epilog="Examples: xen-locate; xen-locate --scan --json; xen-locate --base 0x3d600000")
        p.add_argument("--base", metavar="PA",
                       help="set B by hand (PA: " + PA_SYNTAX_HELP + ")")
        p.add_argument("--scan", action="store_true",
                       help="only scan memory (skip RIP, %%esi, xen_phys_start and the MBI)")
        add_json_option(p)
        return p

    def run(self, args, from_tty):
        base = None
        if args.base is not None:
            base = parse_address(self.ctx, args.base, "load base", space="pa")
        result = self.ctx.locate(base, scan_only=args.scan)
        if getattr(self.ctx.xen.syms, "efi_layout", False):
            result["pe"] = loaded_pe(self.ctx, result["load_base"])
        if args.json:
            self.write_json(result)
            return
        lines = [f"Xen's load base B = {result['load_base']:#x} (from {result['source']})"]
        if result["verified"] is False:
            lines.append("  warning: the bytes at B are not xen-syms' (is Xen loaded yet?)")
        check = self.ctx.build_id_check()
        if check is not None and check.match is True:
            lines.append(f"  build-id {check.expected.hex()} matches guest memory")
        elif check is not None and check.match is False:
            lines.append("  " + check.mismatch_message(self.ctx.xen.syms.path,
                                                       result["load_base"]))
        pe = result.get("pe")
        if pe:
            lines.append(f"  PE headers at B: ImageBase {pe['image_base']:#x} (the firmware "
                         f"relocated xen.efi there), entry RVA {pe['entry_rva']:#x} "
                         f"({'efi_start' if pe['entry_matches'] else 'not efi_start'})")
        elif "pe" in result:
            lines.append("  no PE headers at B (the firmware did not load xen.efi there?)")
        if self.ctx.xen.gdb_symbols:
            lines.append("  GDB has Xen's symbols at the load address and the linked address")
        emit("\n".join(lines), from_tty)


def loaded_pe(ctx, load_base: int):
    """xen.efi: what the PE headers the firmware left at B say (None: none there)."""
    t = ctx.target
    with t.phys_mode():
        return xenefi.loaded_image(t.cache, load_base, ctx.xen.syms)


# -- xen-info ---------------------------------------------------------------------------------

def info(ctx) -> dict:
    """xen-info's facts, from the context and the stopped CPU."""
    syms = ctx.require_syms()
    x = ctx.xen
    if x.load_base is None and xenimage.has_bytes(syms):
        found = ctx.locate_cheap()
        if found is not None:
            ctx.set_load_base(*found)
    base = x.load_base
    check = ctx.build_id_check()
    regs = ctx.read_control_registers()
    rip = ctx.register("rip")
    pctx = ctx.cpu_context(regs)
    where = where_note = None
    if base is None or rip is None:
        where_note = "load base unknown"
    else:
        loaded = LoadedXen(syms, base)
        with ctx.target.phys_mode():
            trampoline = bootstops.read_trampoline_phys(ctx.target.cache, loaded)
        where = bootstops.where_in_boot(syms, base, rip, trampoline)
    root = None if pctx.mode is paging.MODE_OFF else pctx.root_from_cr3(regs["cr3"])
    root_name = owner = None
    if root is not None and base is not None:
        loaded = LoadedXen(syms, base)
        root_name = loaded.name_pa(root)
        owner = root_owner(loaded, root, rip)
    return {
        "path": str(syms.path), "version": syms.version,
        "compile_version": getattr(syms, "version_info", {}).get("compile_system_version"),
        "build_id": getattr(syms, "build_id_hex", None),
        "build_id_memory": check.found.hex() if check is not None and check.found else None,
        "build_id_match": None if check is None else check.match,
        "load_base": base, "load_base_source": x.load_base_source or None,
        "rip": rip, "where": where, "where_note": where_note,
        "paging_mode": pctx.mode.name, "cr3": regs["cr3"], "root": root,
        "root_name": root_name, "root_owner": owner,
        "gdb_symbols": sorted(x.gdb_symbols),
    }


class InfoCommand(XenCommand):
    name = "info"
    summary = "Summarise Xen here: version, build-ids, load base, where in its boot, paging."

    def make_parser(self) -> CommandParser:
        p = CommandParser(
            description=self.summary + " The build-id is read from xen-syms and from the image "
            "in guest memory; B is found as xen-locate does without scanning; 'where' names "
            "the known stretch of boot code RIP is in; CR3 is named when it is one of Xen's "
            "tables (idle_pg_table), else it is the firmware's (before Xen switches).",
            epilog="Example: xen-info --json")
        add_json_option(p)
        return p

    def run(self, args, from_tty):
        d = info(self.ctx)
        if args.json:
            self.write_json(d)
            return
        lines = [f"Xen {d['version'] or '(version unknown)'}"
                 + (f" ({d['compile_version']})" if d["compile_version"] else "")
                 + f", xen-syms {d['path']}",
                 f"  build-id: xen-syms {d['build_id'] or 'none'}, guest memory "
                 f"{d['build_id_memory'] or 'unknown'}"
                 + {True: " (match)", False: " (MISMATCH)", None: ""}[d["build_id_match"]]]
        if d["build_id_match"] is False:
            lines.append("  " + self.ctx.build_id_check().mismatch_message(d["path"],
                                                                          d["load_base"]))
        if d["load_base"] is not None:
            lines.append(f"  load base B = {d['load_base']:#x} (from {d['load_base_source']})")
        else:
            lines.append("  load base B unknown: run 'xen-locate' (it can scan memory)")
        where = d["where"] or (f"unknown ({d['where_note']})" if d["where_note"]
                               else "outside the known stretches of boot code")
        if d["rip"] is not None:
            lines.append(f"  RIP {d['rip']:#x}: {where}")
        lines.append(f"  paging: {d['paging_mode']}, CR3 {d['cr3']:#x}"
                     + (f" = {d['root_name']} (Xen's)" if d["root_name"] else "")
                     + (" (the firmware's)" if d["root_owner"] == "firmware" else "")
                     + (" (outside Xen's image)" if d["root_owner"] == "other" else ""))
        emit("\n".join(lines), from_tty)


def install(ctx) -> None:
    for cls in (SymsCommand, RunToCommand, LocateCommand, InfoCommand):
        cls(ctx)
