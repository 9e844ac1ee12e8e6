"""Run the guest until Xen executes a symbol, at its load address or its linked address.

``xen-run-to`` and the ``xen-mb2-break`` session both start here. Where the
breakpoints go and what a stop there means are ``core.runto``'s decisions (see
its module doc for why several load bases are guessed); this module plants them,
continues, and resets the machine once if the load base was missed.
"""

from __future__ import annotations

import time
from typing import Optional

import gdb

from ..core import runto
from ..core.errors import GdbextError
from . import hang_watch


def _reset(ctx, who: str, why: str, announce: bool) -> None:
    """Boot again (monitor system_reset), saying so first."""
    if announce:
        gdb.write(f"{who}: {why}; resetting the machine (monitor system_reset) to stop "
                  "there on the next boot\n")
    hang_watch.reset_machine(ctx)


def run_to(ctx, symbol: str, timeout: float, load_base: Optional[int] = None,
           allow_reset: bool = True, who: str = "xen-run-to", announce: bool = True) -> dict:
    """Continue until Xen executes ``symbol``; records B in the context when the stop
    is at the load address. Returns the JSON result of xen-run-to. ``who`` names the
    command in what it says before it resets the machine."""
    syms = ctx.require_syms()
    t = ctx.target
    if load_base is None:
        load_base = ctx.xen.load_base
    started = time.monotonic()
    timeout_at = started + timeout
    false_hits = 0
    resets = 0
    if hang_watch.paused_at_shutdown(ctx):
        why = "QEMU holds the machine paused at a shutdown (a triple fault or reset)"
        if not allow_reset:
            raise GdbextError(f"{why}: 'continue' cannot run it; reset the machine, or run "
                              "without --no-reset")
        _reset(ctx, who, why, announce)
        resets += 1
    rip = ctx.register("rip")
    if runto.where_from_here(syms, symbol, rip, load_base) == runto.BEHIND:
        why = f"Xen is past {symbol} in this boot (RIP {rip:#x})"
        if not allow_reset:
            raise GdbextError(f"{why}: it runs only once, at the load address; reset the "
                              f"machine, or run without --no-reset")
        _reset(ctx, who, why, announce)
        resets += 1
    p = runto.first_plan(syms, symbol, load_base, t.main_ram() if load_base is None else ())
    while True:
        breakpoints = []
        try:
            for addr in p.addresses:
                breakpoints.append(ctx.quiet_breakpoint(addr))
            while True:
                # Only a stop at one of these breakpoints returns; any other raises.
                rip = ctx.continue_until(timeout_at, symbol, breakpoints)
                hit = runto.classify_hit(p, rip, ctx.bytes_at(rip, runto.VERIFY_BYTES))
                if hit != runto.HIT_FALSE:
                    break
                false_hits += 1
        finally:
            ctx.delete_breakpoints(breakpoints)
        if hit == runto.HIT_TARGET:
            break
        # Xen is past its load-address code: learn B from what trampoline_setup stored.
        sentinel = runto.sentinel_symbol(syms)
        base = runto.missed_base_from(
            ctx.bytes_at(syms.linked_va("xen_phys_start"), 8))
        if not base:
            raise GdbextError(f"Xen reached {sentinel} without stopping at "
                              f"{symbol}, and xen_phys_start cannot be read")
        ctx.set_load_base(base, f"xen_phys_start at {sentinel}")
        if not runto.runs_only_at_load_address(syms, symbol):
            # It runs at its linked address from here on: wait for that alone.
            p = runto.plan(syms, symbol, [], with_sentinel=False)
            continue
        guessed = base in p.base_by_address.values()
        why = (f"Xen reached {sentinel} without executing {symbol} at "
               f"{base + p.offset:#x}: it had run before the breakpoint was planted" if guessed
               else f"load base {base:#x} was not among the {p.candidates} likeliest")
        if not allow_reset or resets:
            raise GdbextError(
                f"missed {symbol}: {why}; Xen is now at {sentinel}. Reset the "
                f"machine and run 'xen-run-to {symbol} --base {base:#x}'")
        _reset(ctx, who, why, announce)
        resets += 1
        p = runto.plan(syms, symbol, [base])
    result = {"symbol": symbol, "rip": rip, "linked_va": p.linked_va, "at": "linked",
              "load_base": ctx.xen.load_base, "false_hits": false_hits, "resets": resets,
              "candidates": p.candidates, "seconds": round(time.monotonic() - started, 3)}
    if rip != p.linked_va:
        base = p.base_by_address[rip]
        ctx.set_load_base(base, f"RIP at {symbol}")
        result.update(at="load address", load_base=base)
    # The user's own 'continue' from here is caught too (IDT and CR3 of this stop).
    ctx.faults.arm_quietly(who)
    return result
