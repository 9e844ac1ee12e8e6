"""xen-syms and xen-run-to: Xen's symbols, and stopping where Xen code runs.

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
from dataclasses import dataclass
from typing import List, Optional

import gdb

from ..core import render
from ..core.errors import GdbextError
from ..core.xensyms import load_xen_syms
from .backend import target
from .command import CommandParser, XenCommand, add_json_option, parse_int

# Bytes compared at a candidate stop: enough to make a chance match impossible.
VERIFY_BYTES = 32
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


STATE = XenState()


def require_syms():
    if STATE.syms is None:
        raise GdbextError("no Xen symbols loaded: run 'xen-syms PATH/TO/xen-syms' first")
    return STATE.syms


def set_load_base(value: int, source: str) -> None:
    STATE.load_base = value
    STATE.load_base_source = source


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
            STATE.syms = syms
            STATE.load_base = None
            STATE.load_base_source = ""
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


def _continue(timeout_at: float, symbol: str) -> int:
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
                breakpoints.append(gdb.Breakpoint(f"*{addr:#x}", internal=True))
            while True:
                rip = _continue(timeout_at, symbol)
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


def install() -> None:
    SymsCommand()
    RunToCommand()
