"""The RFC's merge judged at the stop the guest is in, for every command that asks.

``xen-l4merge-check``, ``xen-mb2-break`` and the walkthrough read the same
registers and memory and get the same answer from ``core.merge_here``; this
module is that reading.  Nothing here writes the guest.
"""

from __future__ import annotations

from ..core import merge_here
from ..core.merge_here import CHECK_REGISTERS, SNAPSHOT_REGISTERS, CheckRequest, Evaluation


def evaluate(ctx, req: CheckRequest = CheckRequest()) -> Evaluation:
    """The checks for where the guest is stopped (the context ``ctx``'s target)."""
    lx = ctx.require_loaded()
    t = ctx.target
    ctx.forget_merge_if_new_boot(t.read_register("rip"))
    with t.phys_mode():
        regs = t.read_registers(CHECK_REGISTERS)
        return merge_here.evaluate(lx, t.cache, regs, ctx.cpu_context(regs), ctx.merge, req)


def check_here(ctx, req: CheckRequest = CheckRequest()) -> dict:
    """The checks as the ``--json`` contract. Never raises because a check FAILs (look
    at ``["ok"]``); raises GdbextError for what the user must fix."""
    return evaluate(ctx, req).result


def remember_firmware(ctx) -> dict:
    """Snapshot F (CR3 raw, CR0/CR4/EFER, the firmware L4's 4096 bytes, RIP/RSP/RBX).

    Call it at __efi64_mb2_start, before the merge.  While xen-l4merge-apply's
    table is in CR3 the snapshot taken before it is kept and returned."""
    lx = ctx.require_loaded()
    t = ctx.target
    ctx.forget_merge_if_new_boot(t.read_register("rip"))
    record = ctx.merge
    if record.journal is not None and record.firmware is not None:
        return record.firmware.as_dict()
    with t.phys_mode():
        regs = t.read_registers(SNAPSHOT_REGISTERS)
        record.firmware = merge_here.take_snapshot(lx, t.cache, regs, ctx.cpu_context(regs))
    record.ran = False
    return record.firmware.as_dict()
