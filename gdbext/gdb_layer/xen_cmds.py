"""Xen's symbols and where Xen is: xen-syms, xen-run-to, xen-locate, xen-info.

The state every Xen-aware command shares lives here (STATE: symbols, load base B
and its source, the build-id verdict, what was added to GDB's symbol tables);
other modules ask for it with ``require_syms()`` and ``require_loaded()``.

Finding B (``xen-locate``) and checking the build-id are done by
core/xenimage.py on the target's physical memory; this module picks the
sources in order of trust from the registers. Once B is known, GDB gets
xen-syms at the load address and at the linked address.

xen-run-to:

Before ``__high_start`` Xen runs at its load address B + offset(symbol), and B
is chosen by the boot loader at run time. Under QEMU TCG breakpoints live in
QEMU, so they can be planted before GRUB has loaded Xen, but each one slows
the whole guest (measured: 48 breakpoints cost 1.6 s of a 5 s boot, 510 cost
62 s), and GRUB copies the image to its final place only as it jumps, so
polling memory for it does not work either. ``xen-run-to`` therefore plants:

* the likeliest load bases: GRUB honours the multiboot2 RELOCATABLE tag's
  "prefer high" and allocates top-down, so the top candidates below the
  highest RAM under 4 GiB;
* the symbol's linked address (code after ``__high_start`` runs there);
* a sentinel at ``__high_start``: if Xen gets there first, the guess missed;
  B is then read from ``xen_phys_start`` and, unless ``--no-reset``, the
  machine is reset (``monitor system_reset``) and stopped on the next boot
  with a single breakpoint at B + offset(symbol).

Every stop is believed only if the bytes at RIP equal the ELF's bytes there.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import gdb

from ..core import bootstops, paging, render, xenimage
from ..core.errors import GdbextError
from ..core.xenimage import BuildIdCheck, LoadedXen
from ..core.xensyms import XEN_PHYS_START_SYMBOL, load_xen_syms
from .backend import target
from .command import CommandParser, XenCommand, add_json_option, one_line, parse_int

# Bytes compared at a candidate stop: enough to make a chance match impossible.
VERIFY_BYTES = xenimage.CODE_VERIFY_BYTES
# How many of the likeliest load bases get a breakpoint (see the module doc).
TOP_CANDIDATES = 32
SENTINEL_SYMBOL = "__high_start"
# Below 4 GiB: GRUB's multiboot2 loader places the image under the tag's max_addr.
LOW_4G = 1 << 32


@dataclass
class XenState:
    syms: Optional[object] = None
    load_base: Optional[int] = None
    load_base_source: str = ""
    # The build-id verdict for (syms, load_base); a match is kept, anything else re-read.
    build_id: Optional[BuildIdCheck] = None
    # What gdbext added to GDB's symbol tables: kind ("load", "linked") -> (path, offset).
    gdb_symbols: Dict[str, Tuple[str, int]] = field(default_factory=dict)
    loaded: Optional[LoadedXen] = None


STATE = XenState()


class IgnoreBuildId(gdb.Parameter):
    """Use xen-syms even when its build-id differs from the Xen image in guest memory.

Off by default: with symbols of another build, every name, table and pointer class
gdbext prints would be wrong, so Xen-specific results are refused with a one-line
error naming both build-ids. Turn it on only if you know the two builds lay out
the same (e.g. you rebuilt with a changed build-id only)."""

    set_doc = "Set whether gdbext uses xen-syms whose build-id does not match guest memory."
    show_doc = "Show whether gdbext uses xen-syms whose build-id does not match guest memory."

    def __init__(self) -> None:
        super().__init__("xen-ignore-build-id", gdb.COMMAND_DATA, gdb.PARAM_BOOLEAN)
        self.value = False

    def get_set_string(self) -> str:
        return ""


_IGNORE_BUILD_ID: Optional[IgnoreBuildId] = None


def ignore_build_id() -> bool:
    return bool(_IGNORE_BUILD_ID is not None and _IGNORE_BUILD_ID.value)


def require_syms():
    if STATE.syms is None:
        raise GdbextError("no Xen symbols loaded: run 'xen-syms PATH/TO/xen-syms' first")
    return STATE.syms


def set_load_base(value: int, source: str) -> None:
    """Record B (and where it came from); GDB then gets Xen's symbols at B too."""
    if value != STATE.load_base:
        STATE.build_id = None
        STATE.loaded = None
    STATE.load_base = value
    STATE.load_base_source = source
    sync_gdb_symbols()


def forget_load_base() -> None:
    remove_gdb_symbols()
    STATE.load_base = None
    STATE.load_base_source = ""
    STATE.build_id = None
    STATE.loaded = None


def build_id_check() -> Optional[BuildIdCheck]:
    """xen-syms' build-id against guest memory at B (None while syms or B are unknown)."""
    syms, base = STATE.syms, STATE.load_base
    if syms is None or base is None:
        return None
    if STATE.build_id is None or STATE.build_id.match is not True:
        t = target()
        with t.phys_mode():
            STATE.build_id = xenimage.check_build_id(t.cache, syms, base)
    return STATE.build_id


def require_loaded() -> LoadedXen:
    """The Xen image at B, for commands that print Xen-specific results.

    One-line GdbextError when there are no symbols, B cannot be found from the
    machine's state (the cheap sources of xen-locate are tried), or the image in
    memory has another build-id (unless 'set xen-ignore-build-id on')."""
    syms = require_syms()
    if STATE.load_base is None:
        found = locate_cheap() if xenimage.has_bytes(syms) else None
        if found is None:
            raise GdbextError(
                "Xen's load base B is unknown (RIP, %esi and xen_phys_start do not give it "
                "here): run 'xen-locate' (it scans memory), 'xen-locate --base PA', or "
                "'xen-run-to __efi64_mb2_start'")
        set_load_base(*found)
    check = build_id_check()
    if check is not None and check.match is False and not ignore_build_id():
        raise GdbextError(check.mismatch_message(syms.path, STATE.load_base))
    if STATE.loaded is None or STATE.loaded.syms is not syms:
        STATE.loaded = LoadedXen(syms, STATE.load_base)
    return STATE.loaded


def loaded_or_note() -> Tuple[Optional[LoadedXen], Optional[str]]:
    """For output that names Xen things when it can: (LoadedXen, None), or (None, why not);
    (None, None) when no Xen symbols are loaded at all."""
    if STATE.syms is None:
        return None, None
    try:
        return require_loaded(), None
    except GdbextError as err:
        return None, f"no Xen names: {err}"


# -- GDB's own symbol tables --------------------------------------------------------------

def _objfile_offset(kind: str, syms, base: int) -> int:
    # add-symbol-file -o shifts every section: linked VA + offset = PA at load base B.
    # The offset is negative (B < XEN_VIRT_START); GDB takes it as a signed expression.
    return base - syms.virt_start if kind == "load" else 0


def _symbol_at(addr: int) -> Optional[str]:
    try:
        out = gdb.execute(f"info symbol {addr:#x}", to_string=True)
    except gdb.error:
        return None
    return None if out.startswith("No symbol") else out.split()[0]


def _quote(path: str) -> str:
    return f'"{path}"' if any(c.isspace() for c in path) else path


def remove_gdb_symbols(kinds=("load", "linked")) -> None:
    syms = STATE.syms
    for kind in kinds:
        entry = STATE.gdb_symbols.pop(kind, None)
        if entry is None or syms is None:
            continue
        _path, offset = entry
        addr = (syms.image_start + offset) & ((1 << 64) - 1)
        try:
            gdb.execute(f"with confirm off -- remove-symbol-file -a {addr:#x}", to_string=True)
        except gdb.error:
            pass


def sync_gdb_symbols() -> None:
    """Make GDB name Xen's code both at its load address and at its linked address.

    Idempotent and quiet: each (file, offset) is added once; a changed B replaces
    the load-address copy. Skipped for a .map (no ELF to give GDB) and while the
    build-id says these symbols belong to another build."""
    syms, base = STATE.syms, STATE.load_base
    if syms is None or base is None or not getattr(syms, "segments", ()):
        return
    try:
        check = build_id_check()
    except GdbextError:
        check = None
    if check is not None and check.match is False and not ignore_build_id():
        remove_gdb_symbols()
        return
    path = str(syms.path)
    for kind in ("linked", "load"):
        offset = _objfile_offset(kind, syms, base)
        if STATE.gdb_symbols.get(kind) == (path, offset):
            continue
        remove_gdb_symbols((kind,))
        start = (syms.image_start + offset) & ((1 << 64) - 1)
        if _symbol_at(start) is not None:
            continue  # the user (or an earlier gdbext) already gave GDB these symbols there
        opt = f" -o {offset:#x}" if offset else ""
        try:
            gdb.execute(f"with confirm off -- add-symbol-file {_quote(path)}{opt}",
                        to_string=True)
        except gdb.error as err:
            gdb.write(f"gdbext: could not give GDB Xen's symbols ({one_line(err)})\n",
                      gdb.STDERR)
            return
        STATE.gdb_symbols[kind] = (path, offset)


class SymsCommand(XenCommand):
    name = "syms"
    summary = "Load Xen's symbols from xen-syms (or an nm-format .map file)."

    def make_parser(self) -> CommandParser:
        p = CommandParser(description=self.summary + " Without PATH, show what is loaded.",
                          epilog="Example: xen-syms .cache/xen-4.17/usr/lib/debug/boot/"
                                 "xen-syms-4.17-amd64")
        p.add_argument("path", nargs="?", metavar="PATH")
        add_json_option(p)
        return p

    def run(self, args, from_tty):
        if args.path:
            path = os.path.expanduser(args.path)
            t0 = time.perf_counter()
            syms = load_xen_syms(path)
            forget_load_base()
            STATE.syms = syms
            elapsed = time.perf_counter() - t0
        else:
            syms = require_syms()
            elapsed = None
        info = {
            "path": str(syms.path), "build_id": getattr(syms, "build_id_hex", None),
            "version": syms.version, "virt_start": syms.virt_start,
            "image_start": syms.image_start, "image_end": syms.image_end,
            "symbols": len(syms), "load_base": STATE.load_base,
            "load_base_source": STATE.load_base_source or None,
        }
        if args.json:
            gdb.write(render.to_json(info) + "\n")
            return
        lines = [f"Xen symbols: {info['path']}",
                 f"  version {info['version'] or 'unknown'}, build-id {info['build_id'] or 'none'}, "
                 f"{info['symbols']} symbols"
                 + (f", loaded in {elapsed * 1000:.0f} ms" if elapsed is not None else ""),
                 f"  XEN_VIRT_START {syms.virt_start:#x}, image {syms.image_start:#x}.."
                 f"{syms.image_end:#x}"]
        if STATE.load_base is not None:
            lines.append(f"  load base B = {STATE.load_base:#x} (from {STATE.load_base_source})")
        gdb.write("\n".join(lines) + "\n")


class _Timeout:
    """Interrupt GDB's blocking 'continue' after a while, as Ctrl-C would."""

    def __init__(self, seconds: float):
        self.fired = False
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True

    def _fire(self) -> None:
        self.fired = True
        os.kill(os.getpid(), signal.SIGINT)

    def __enter__(self):
        if self._timer.interval > 0:
            self._timer.start()
        return self

    def __exit__(self, *exc):
        self._timer.cancel()


def _ram_top_below_4g() -> int:
    tops = [min(end, LOW_4G) for start, end in target().main_ram() if start < LOW_4G]
    return max(tops) if tops else LOW_4G


def quiet_breakpoint(address: int) -> "gdb.Breakpoint":
    """An internal breakpoint that stops without GDB printing 'Breakpoint -N, ...'
    (the command that planted it reports the stop in its own words)."""
    bp = gdb.Breakpoint(f"*{address:#x}", internal=True)
    bp.silent = True
    return bp


def continue_until(timeout_at: float, symbol: str) -> int:
    """Resume the guest until the next stop; return RIP. Raises on timeout."""
    remaining = timeout_at - time.monotonic()
    msg = (f"timed out waiting for Xen to reach {symbol} (is Xen booting? see the "
           "serial log)")
    if remaining <= 0:
        raise GdbextError(msg)
    with _Timeout(remaining) as tm:
        gdb.execute("continue", to_string=True)
    if tm.fired:
        raise GdbextError(msg)
    try:
        return target().read_register("rip")
    except GdbextError:
        raise GdbextError(f"the guest stopped without registers while waiting for {symbol} "
                          "(did QEMU exit? see its log)") from None


def runs_only_at_load_address(syms, symbol: str) -> bool:
    """Code that runs before ``__high_start`` and never again: head.S (its local
    symbols come from head.o) and the EFI boot-services functions ``efi_*``.
    Missing such a stop means booting again; anything else can still be met at
    its linked address later in the same boot."""
    sym = syms.lookup(symbol)
    return bool(sym.file and sym.file.endswith("head.o")) or symbol.startswith("efi_")


def _bytes_at(va: int, size: int) -> bytes:
    try:
        return gdb.selected_inferior().read_memory(va, size).tobytes()
    except gdb.MemoryError:
        return b""


def run_to(symbol: str, timeout: float, load_base: Optional[int] = None,
           allow_reset: bool = True) -> dict:
    """Continue until Xen executes ``symbol`` (at its load address or linked VA)."""
    syms = require_syms()
    linked = syms.linked_va(symbol)
    offset = syms.offset(symbol)
    expected = syms.read_linked(linked, VERIFY_BYTES)
    sentinel = syms.linked_va(SENTINEL_SYMBOL) if SENTINEL_SYMBOL in syms else None
    if load_base is None:
        load_base = STATE.load_base
    if load_base is not None:
        bases = [load_base]
    else:
        bases = syms.load_base_candidates(_ram_top_below_4g())[:TOP_CANDIDATES]
    started = time.monotonic()
    timeout_at = started + timeout
    false_hits = 0
    resets = 0
    while True:
        addrs = {b + offset: b for b in bases}
        spots = [linked] + [a for a in addrs if a != linked]
        if sentinel is not None and sentinel not in spots:
            spots.append(sentinel)
        breakpoints: List[gdb.Breakpoint] = []
        try:
            for addr in spots:
                breakpoints.append(quiet_breakpoint(addr))
            while True:
                rip = continue_until(timeout_at, symbol)
                if rip not in spots:
                    # Stopped for another reason (the user's breakpoint, a signal): hand over.
                    raise GdbextError(f"stopped at {rip:#x} before reaching {symbol}")
                if rip == sentinel and rip != linked:
                    break
                if _bytes_at(rip, VERIFY_BYTES) == expected:
                    break
                false_hits += 1
        finally:
            for bp in breakpoints:
                try:
                    bp.delete()
                except RuntimeError:
                    pass
        if rip != sentinel or rip == linked:
            break
        # Xen is past its load-address code: learn B from what trampoline_setup stored.
        phys_start = syms.linked_va("xen_phys_start")
        raw = _bytes_at(phys_start, 8)
        base = int.from_bytes(raw, "little") if len(raw) == 8 else 0
        if not base:
            raise GdbextError(f"Xen reached {SENTINEL_SYMBOL} without stopping at {symbol}, "
                              "and xen_phys_start cannot be read")
        set_load_base(base, f"xen_phys_start at {SENTINEL_SYMBOL}")
        if not runs_only_at_load_address(syms, symbol):
            # It runs at its linked address from here on: wait for that alone.
            sentinel = None
            bases = []
            continue
        if not allow_reset or resets:
            raise GdbextError(
                f"missed {symbol}: Xen's load base {base:#x} was not among the "
                f"{len(bases)} likeliest; Xen is now at {SENTINEL_SYMBOL}. Reset the machine "
                f"and run 'xen-run-to {symbol} --base {base:#x}'")
        gdb.write(f"xen-run-to: load base {base:#x} was not among the {len(bases)} likeliest; "
                  "resetting the machine (monitor system_reset) to stop there on the next "
                  "boot\n")
        target().monitor("system_reset")
        target().invalidate()
        resets += 1
        bases = [base]
    result = {"symbol": symbol, "rip": rip, "linked_va": linked, "at": "linked",
              "load_base": STATE.load_base, "false_hits": false_hits, "resets": resets,
              "candidates": len(bases), "seconds": round(time.monotonic() - started, 3)}
    if rip != linked:
        base = addrs[rip]
        set_load_base(base, f"RIP at {symbol}")
        result.update(at="load address", load_base=base)
    return result


class RunToCommand(XenCommand):
    name = "run-to"
    summary = "Continue until Xen executes SYMBOL, at its load address or its linked address."

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
        result = run_to(args.symbol, args.timeout, args.base, allow_reset=not args.no_reset)
        if args.json:
            gdb.write(render.to_json(result) + "\n")
            return
        where = (f"its load address {result['rip']:#x} (B = {result['load_base']:#x})"
                 if result["at"] == "load address" else f"its linked address {result['rip']:#x}")
        gdb.write(f"Xen reached {args.symbol} at {where} after {result['seconds']:.1f} s\n")


# -- xen-locate: where is the image? ---------------------------------------------------------

def _register(name: str) -> Optional[int]:
    try:
        return target().read_register(name)
    except GdbextError:
        return None


def translate(va: int) -> Optional[int]:
    """PA of VA under the CPU's current paging (VA itself with paging off); None if unmapped."""
    from .paging_cmds import cpu_context, read_control_registers  # paging_cmds imports us
    t = target()
    regs = read_control_registers()
    ctx = cpu_context(regs)
    if ctx.mode is paging.MODE_OFF:
        return va
    try:
        with t.phys_mode():
            w = paging.walk(ctx, t.cache, ctx.root_from_cr3(regs["cr3"]), va)
    except GdbextError:
        return None
    return w.pa if w.mapped else None


def _u64_at(mem, pa: int) -> Optional[int]:
    try:
        return int.from_bytes(mem.read_phys(pa, 8), "little")
    except GdbextError:
        return None


def locate_cheap() -> Optional[Tuple[int, str]]:
    """B and its source from the machine's state, without scanning memory, in order of
    trust: RIP inside the image at its load address, %esi in the stretch of head.S
    that holds B, xen_phys_start (at its linked VA, then at its PA), the MBI's
    LOAD_BASE_ADDR tag. Every candidate is checked against the ELF's bytes."""
    syms = require_syms()
    t = target()
    mem = t.cache
    rip = _register("rip")
    with t.phys_mode():
        rip_pa = None
        if rip is not None and not syms.in_image(rip):   # a linked VA says nothing of B
            rip_pa = translate(rip)
        if rip_pa is not None:
            b = xenimage.base_from_rip(mem, syms, rip_pa)
            if b is not None:
                return b, f"RIP at {syms.describe(syms.virt_start + rip_pa - b)}"
            esi = _register("rsi")
            if esi is not None:
                b = xenimage.base_from_esi(mem, syms, rip_pa, esi & 0xFFFFFFFF)
                if b is not None:
                    return b, (f"%esi in head.S ({xenimage.ESI_STRETCH_FROM}.."
                               f"{xenimage.ESI_STRETCH_TO})")
        if XEN_PHYS_START_SYMBOL in syms:
            pa = translate(syms.linked_va(XEN_PHYS_START_SYMBOL))
            value = None if pa is None else _u64_at(mem, pa)
            if (value is not None and xenimage.plausible_base(syms, value)
                    and xenimage.verify_base(mem, syms, value, image_bytes=0)):
                return value, f"{XEN_PHYS_START_SYMBOL} at its linked address"
            cands = []
            cr3 = _register("cr3")
            if cr3 is not None and "idle_pg_table" in syms:
                cands.append((cr3 & ~0xFFF) - syms.offset("idle_pg_table"))
            if rip_pa is not None:
                cands.extend(xenimage.bases_around(syms, rip_pa))
            for b in cands:
                if (xenimage.plausible_base(syms, b)
                        and xenimage.phys_start_holds(mem, syms, b)
                        and xenimage.verify_base(mem, syms, b, image_bytes=0)):
                    return b, f"{XEN_PHYS_START_SYMBOL} at its PA"
        eax, rbx = _register("rax"), _register("rbx")
        if eax is not None and rbx is not None and (
                eax & 0xFFFFFFFF) == xenimage.MB2_BOOTLOADER_MAGIC:
            b = xenimage.base_from_mbi(mem, syms, rbx & 0xFFFFFFFF)
            if b is not None:
                return b, "multiboot2 MBI (%rbx) tag LOAD_BASE_ADDR"
    return None


def locate_scan(stop_at_first: bool = True) -> xenimage.ScanResult:
    """The scan of every candidate base (see xenimage.scan), over QEMU's RAM map."""
    syms = require_syms()
    t = target()
    ram = t.main_ram()
    if not ram:
        raise GdbextError("QEMU's memory map (monitor info mtree -f) gives no RAM: cannot "
                          "scan; give the base with 'xen-locate --base PA'")
    with t.phys_mode():
        return xenimage.scan(t, syms, ram, stop_at_first)   # raw reads: 4 bytes, not pages


def locate(base: Optional[int] = None, scan_only: bool = False) -> dict:
    """xen-locate's work: find B, store it, check the build-id; the JSON result."""
    syms = require_syms()
    t = target()
    started = time.perf_counter()
    result: dict = {"load_base": None, "source": None, "build_id_match": None,
                    "verified": True, "candidates_read": None, "candidates": None}
    found = None
    if base is not None:
        from .paging_cmds import maxphyaddr   # paging_cmds imports this module
        problem = xenimage.user_base_problem(syms, base, maxphyaddr(), t.main_ram())
        if problem:
            raise GdbextError(f"xen-locate --base: {problem}")
        if xenimage.has_bytes(syms):
            with t.phys_mode():
                result["verified"] = xenimage.verify_base(t.cache, syms, base)
        else:
            result["verified"] = None   # a .map: no bytes to check B against
        found = (base, "user (--base)")
    elif not xenimage.has_bytes(syms):
        raise GdbextError(
            f"{syms.path} is an nm-format map: finding Xen needs the image's bytes from "
            "xen-syms (the ELF); load it, or give the base with 'xen-locate --base PA' (Xen "
            "prints it on its console: 'Xen image load base address')")
    elif not scan_only:
        found = locate_cheap()
    if found is None:
        res = locate_scan()
        result.update(candidates_read=res.candidates_read, candidates=res.candidates)
        what = f"{res.candidates_read} of {res.candidates} candidate bases read"
        if res.load_base is not None:
            found = (res.load_base, f"scan ({what})")
        elif len(res.header_only) == 1:
            found = (res.header_only[0], f"scan: a multiboot2 image whose bytes differ from "
                     f"xen-syms ({what})")
            result["verified"] = False
        elif res.header_only:
            raise GdbextError(
                f"several multiboot2 images whose bytes differ from xen-syms, at "
                f"{', '.join(hex(b) for b in res.header_only)}: load the right xen-syms, or "
                "give the base with 'xen-locate --base PA'")
        else:
            raise GdbextError(
                f"Xen's image is not in guest memory ({what}; RIP, %esi, xen_phys_start and "
                "the MBI give nothing): stop where GRUB has loaded it, e.g. 'xen-run-to "
                "__efi64_mb2_start', or give the base with 'xen-locate --base PA'")
    set_load_base(*found)
    check = build_id_check()
    result.update(load_base=found[0], source=found[1],
                  build_id_match=None if check is None else check.match,
                  build_id=syms.build_id_hex if hasattr(syms, "build_id_hex") else None,
                  build_id_memory=(check.found.hex() if check is not None and check.found
                                   else None),
                  gdb_symbols=sorted(STATE.gdb_symbols),
                  seconds=round(time.perf_counter() - started, 3))
    return result


ADDRESS_SYNTAX = ("PA: a GDB expression, or SYMBOL@pa for a Xen symbol's physical address at the "
                  "load address")


class LocateCommand(XenCommand):
    name = "locate"
    summary = "Find Xen's load base B in guest memory and say how it was found."

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
                       help="set B by hand (" + ADDRESS_SYNTAX + ")")
        p.add_argument("--scan", action="store_true",
                       help="only scan memory (skip RIP, %%esi, xen_phys_start and the MBI)")
        add_json_option(p)
        return p

    def run(self, args, from_tty):
        base = None
        if args.base is not None:
            from .addresses import parse_address
            base = parse_address(args.base, "load base", space="pa")
        result = locate(base, scan_only=args.scan)
        if args.json:
            gdb.write(render.to_json(result) + "\n")
            return
        lines = [f"Xen's load base B = {result['load_base']:#x} (from {result['source']})"]
        if result["verified"] is False:
            lines.append("  warning: the bytes at B are not xen-syms' (is Xen loaded yet?)")
        check = build_id_check()
        if check is not None and check.match is True:
            lines.append(f"  build-id {check.expected.hex()} matches guest memory")
        elif check is not None and check.match is False:
            lines.append("  " + check.mismatch_message(STATE.syms.path, result["load_base"]))
        if STATE.gdb_symbols:
            lines.append("  GDB has Xen's symbols at the load address and the linked address")
        gdb.write("\n".join(lines) + "\n")


# -- xen-info ---------------------------------------------------------------------------------

def _trampoline_phys(syms, base: int) -> Optional[int]:
    t = target()
    with t.phys_mode():
        return bootstops.read_trampoline_phys(t.cache, LoadedXen(syms, base))


def _where_in_boot(syms, base: Optional[int], rip: Optional[int]) -> Tuple[Optional[str],
                                                                          Optional[str]]:
    if base is None or rip is None:
        return None, "load base unknown"
    return bootstops.where_in_boot(syms, base, rip, _trampoline_phys(syms, base)), None


def info() -> dict:
    syms = require_syms()
    if STATE.load_base is None and xenimage.has_bytes(syms):
        found = locate_cheap()
        if found is not None:
            set_load_base(*found)
    base = STATE.load_base
    check = build_id_check()
    from .paging_cmds import cpu_context, read_control_registers
    regs = read_control_registers()
    rip = _register("rip")
    ctx = cpu_context(regs)
    where, where_note = _where_in_boot(syms, base, rip)
    root = None if ctx.mode is paging.MODE_OFF else ctx.root_from_cr3(regs["cr3"])
    root_name = owner = None
    if root is not None and base is not None:
        loaded = LoadedXen(syms, base)
        root_name = loaded.name_pa(root)
        if loaded.in_image(root):
            owner = "xen"
        elif rip is not None and not syms.in_image(rip):
            owner = "firmware"   # Xen still runs at its load address on the firmware's tables
        else:
            owner = "other"
    return {
        "path": str(syms.path), "version": syms.version,
        "compile_version": getattr(syms, "version_info", {}).get("compile_system_version"),
        "build_id": getattr(syms, "build_id_hex", None),
        "build_id_memory": check.found.hex() if check is not None and check.found else None,
        "build_id_match": None if check is None else check.match,
        "load_base": base, "load_base_source": STATE.load_base_source or None,
        "rip": rip, "where": where, "where_note": where_note,
        "paging_mode": ctx.mode.name, "cr3": regs["cr3"], "root": root,
        "root_name": root_name, "root_owner": owner,
        "gdb_symbols": sorted(STATE.gdb_symbols),
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
        d = info()
        if args.json:
            gdb.write(render.to_json(d) + "\n")
            return
        lines = [f"Xen {d['version'] or '(version unknown)'}"
                 + (f" ({d['compile_version']})" if d["compile_version"] else "")
                 + f", xen-syms {d['path']}",
                 f"  build-id: xen-syms {d['build_id'] or 'none'}, guest memory "
                 f"{d['build_id_memory'] or 'unknown'}"
                 + {True: " (match)", False: " (MISMATCH)", None: ""}[d["build_id_match"]]]
        if d["build_id_match"] is False:
            lines.append("  " + build_id_check().mismatch_message(d["path"], d["load_base"]))
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
        gdb.write("\n".join(lines) + "\n")


def install() -> None:
    global _IGNORE_BUILD_ID
    if _IGNORE_BUILD_ID is None:
        _IGNORE_BUILD_ID = IgnoreBuildId()
    SymsCommand()
    RunToCommand()
    LocateCommand()
    InfoCommand()
    from . import xen_functions  # imports addresses, which imports this module
    xen_functions.install()
