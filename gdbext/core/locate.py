"""Where Xen is loaded, from the machine's state alone: the cheap sources of ``xen-locate``.

The load base B can be read off the stopped CPU without scanning memory, from
several places, each true only in a stretch of the boot.  ``locate_cheap``
tries them in order of trust and checks every candidate against the ELF's
bytes; it is pure (memory through ``PhysMemory``, registers as a dict, virtual
addresses through ``translate``) so that the order is tested on synthetic memory.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional, Tuple

from . import multiboot2, xenimage
from .errors import GdbextError
from .memory import PhysMemory
from .xensyms import XEN_PHYS_START_SYMBOL

# VA -> PA under the CPU's paging (the VA itself with paging off), None if unmapped.
Translate = Callable[[int], Optional[int]]


def _u64_at(mem: PhysMemory, pa: int) -> Optional[int]:
    try:
        return int.from_bytes(mem.read_phys(pa, 8), "little")
    except GdbextError:
        return None


def locate_cheap(syms, mem: PhysMemory, regs: Mapping[str, Optional[int]],
                 translate: Translate) -> Optional[Tuple[int, str]]:
    """(B, its source) or None, in order of trust:

    1. RIP inside the image at its load address (a linked RIP says nothing of B);
    2. %esi in the stretch of head.S that holds B;
    3. xen_phys_start, at its linked VA, then at its PA for the bases CR3 and RIP suggest;
    4. the multiboot2 MBI's LOAD_BASE_ADDR tag (%rbx, with %eax the multiboot2 magic).
    ``regs`` maps rip, rsi, cr3, rax, rbx to values (None: not readable)."""
    rip = regs.get("rip")
    rip_pa = None
    if rip is not None and not syms.in_image(rip):
        rip_pa = translate(rip)
    if rip_pa is not None:
        b = xenimage.base_from_rip(mem, syms, rip_pa)
        if b is not None:
            return b, f"RIP at {syms.describe(syms.virt_start + rip_pa - b)}"
        esi = regs.get("rsi")
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
        cr3 = regs.get("cr3")
        if cr3 is not None and "idle_pg_table" in syms:
            cands.append((cr3 & ~0xFFF) - syms.offset("idle_pg_table"))
        if rip_pa is not None:
            cands.extend(xenimage.bases_around(syms, rip_pa))
        for b in cands:
            if (xenimage.plausible_base(syms, b)
                    and xenimage.phys_start_holds(mem, syms, b)
                    and xenimage.verify_base(mem, syms, b, image_bytes=0)):
                return b, f"{XEN_PHYS_START_SYMBOL} at its PA"
    eax, rbx = regs.get("rax"), regs.get("rbx")
    if eax is not None and rbx is not None and (
            eax & 0xFFFFFFFF) == multiboot2.MB2_BOOTLOADER_MAGIC:
        b = xenimage.base_from_mbi(mem, syms, rbx & 0xFFFFFFFF)
        if b is not None:
            return b, "multiboot2 MBI (%rbx) tag LOAD_BASE_ADDR"
    return None


CHEAP_REGISTERS = ("rip", "rsi", "cr3", "rax", "rbx")
