"""The RFC's merged L4 ("call efi_multiboot2() at its linked address"), predicted:
every byte the patch would write, computed on top of guest memory without
writing the guest.  Never imports ``gdb``.

The RFC (``rfc-efi-multiboot2-linked-address.txt``) builds a table M at
``__efi64_mb2_start``: the firmware L4's lower half (entries 0-255, copied from
%cr3), ``idle_pg_table``'s upper half (256-511) copied raw, then fills
``l2_xenmap``, ``l2_bootmap`` and ``l2_directmap`` with 2 MiB PSE+RWX entries,
switches CR3 to M and calls ``efi_multiboot2`` at its linked VA.

* ``predict_merge()`` computes M (and every qword the patch changes) as a
  ``Prediction``; ``relocate=True`` first adds B to the pointers as Frediano's
  review asks.
* ``default_table_pa()`` says where M goes in a build without ``efi_l4_bootmap``;
  ``fill_slots()`` which slots the patch's 2 MiB fills write.

The checks of M are in ``merge_checks``.  All load-address arithmetic comes from
``xenimage``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from . import x86
from .errors import GdbextError
from .memory import PhysMemory, SyntheticMemory, qwords
from .xenimage import IDLE_L4, LoadedXen
from .xensyms import PAGE_TABLES_END_SYMBOL, PAGE_TABLES_START_SYMBOL

# --- what the patch does, in Xen's terms ----------------------------------------------------

# The function the RFC calls at its linked VA.
CALL_TARGET = "efi_multiboot2"
# PAGE_HYPERVISOR_RWX (P RW A D G) and the patch's 2 MiB fill: _PAGE_PSE + that = 0x1e3.
PAGE_HYPERVISOR_RWX = x86.PTE_P | x86.PTE_RW | x86.PTE_A | x86.PTE_D | x86.PTE_G
FILL_FLAGS = x86.PTE_PS | PAGE_HYPERVISOR_RWX
# The tables the patch fills with 2 MiB pages, and how it indexes them.
FILL_XENMAP = "l2_xenmap"                      # by (VA - XEN_VIRT_START) >> 21
FILL_BY_PA = ("l2_bootmap", "l2_directmap")    # by PA >> 21
PATCH_TABLE = "efi_l4_bootmap"                 # the RFC's M (patched builds)
# Where M goes in a build without the patch: see default_table_pa().
SCRATCH_TABLE = "l3_bootmap"
L4_HALF = 256
ENTRIES = 512
_LOW32 = 0xFFFF_FFFF


@dataclass
class WriteEntry:
    """One qword the patch changes (for reports and for --undo)."""
    pa: int
    old: int
    new: int
    name: Optional[str]                # "M[261]", "l2_xenmap[1]", ...


@dataclass
class Prediction:
    """The merged table the RFC would build, on top of guest memory.

    ``mem`` is an overlay (SyntheticMemory with base=guest memory) holding every
    write; ``writes`` is exactly what the patch writes (PA -> bytes: M as a full
    page, other tables as runs of changed qwords); ``originals`` the bytes they
    replace (for --undo)."""
    mem: SyntheticMemory               # overlay: base = the guest memory given
    root: int                          # M's PA
    writes: Dict[int, bytes]
    originals: Dict[int, bytes]
    relocated: bool
    load_base: int
    firmware_root: int
    table_source: str                  # "efi_l4_bootmap", "l3_bootmap" or "given"
    entries: List[WriteEntry] = field(default_factory=list)


def default_table_pa(xen: LoadedXen) -> Tuple[int, str]:
    """Where M goes: ``efi_l4_bootmap`` in a patched build, else ``l3_bootmap``.

    Why ``l3_bootmap`` when the build has no ``efi_l4_bootmap``: it is a 4 KiB
    page-table page inside Xen's image (I12) and outside ``__page_tables``
    (so ``trampoline_setup``'s relocation loop never adds B to M's firmware
    pointers); it is all zeros in the ELF and nothing writes it before
    ``trampoline_setup`` (the RFC's fills write ``l2_bootmap``, not
    ``l3_bootmap``; ``efi_arch_memory_setup`` returns before touching the boot
    maps on the multiboot2 path); so it is unused while ``efi_multiboot2``
    runs, and restoring it is writing back 4096 zeros.  It must be restored
    (``xen-l4merge-apply --undo``) before ``trampoline_setup``: that code
    writes only the low dwords of ``l3_bootmap[0..3]`` and expects the rest of
    the page to be zero.  The same holds for the relocated variant's in-place
    ``+B`` on the tables under the upper half: ``trampoline_setup`` would add
    B a second time (I9 reports it as relocated twice).
    """
    syms = xen.syms
    for name in (PATCH_TABLE, SCRATCH_TABLE):
        sym = syms.get(name)
        if sym is not None:
            return xen.pa(sym.value), name
    raise GdbextError(f"{getattr(syms, 'path', 'xen-syms')}: neither {PATCH_TABLE} nor "
                      f"{SCRATCH_TABLE}: give the merged table's address (--table ADDR)")


def _pack(values: Sequence[int]) -> bytes:
    return struct.pack(f"<{len(values)}Q", *values)


def entry_name(xen: LoadedXen, pa: int, root: int) -> Optional[str]:
    """How reports name the qword at ``pa``: "M[i]" inside M at ``root``, else
    "table[i]" inside a Xen boot table, else the Xen symbol there (or None)."""
    if root <= pa < root + x86.PAGE_SIZE:
        return f"M[{(pa - root) // 8}]"
    hit = xen.table_at(pa)
    if hit is not None:
        name, _level, off = hit
        return f"{name}[{off // 8}]"
    return xen.name_pa(pa)


def fill_slots(xen: LoadedXen) -> Dict[str, Tuple[int, int, int]]:
    """The patch's fills as (first slot, last slot, first PTE) per table, computed
    as its assembly does: l2_xenmap by sym_offs(_start) >> 21 .. sym_offs(_end - 1)
    >> 21, l2_bootmap and l2_directmap by PA(_start) >> 21 .. PA(_end - 1) >> 21,
    each PTE = (PA(_start) + n * 2 MiB) | 0x1e3 (32-bit: %eax)."""
    syms = xen.syms
    off_start = syms.offset(syms.image_start)
    off_last = syms.offset(syms.image_end - 1)
    pte = (xen.load_base + off_start + FILL_FLAGS) & _LOW32
    out = {FILL_XENMAP: (off_start >> 21, off_last >> 21, pte)}
    first = (xen.load_base + off_start) >> 21
    last = (xen.load_base + off_last) >> 21
    for name in FILL_BY_PA:
        out[name] = (first, last, pte)
    return out


def _relocate_upper(xen: LoadedXen, overlay: SyntheticMemory, upper: List[int],
                    addr_mask: int) -> List[int]:
    """Frediano's "adjust the pointers": B added to M's present upper-half
    entries and, in place, to every present qword of the tables they reach that
    ``trampoline_setup`` relocates (pages inside ``__page_tables``)."""
    syms = xen.syms
    b = xen.load_base
    pt_lo = b + syms.offset(PAGE_TABLES_START_SYMBOL)
    pt_hi = b + syms.offset(PAGE_TABLES_END_SYMBOL)
    out = [e + b if e & x86.PTE_P else e for e in upper]
    pending = [((e & addr_mask), 3) for e in out if e & x86.PTE_P and not e & x86.PTE_PS]
    done = set()
    while pending:
        pa, level = pending.pop()
        if pa in done or not pt_lo <= pa < pt_hi:
            continue
        done.add(pa)
        ents = [e + b if e & x86.PTE_P else e for e in qwords(overlay.read_phys(pa, x86.PAGE_SIZE))]
        overlay.write(pa, _pack(ents))
        if level > 1:
            pending.extend(((e & addr_mask), level - 1) for e in ents
                           if e & x86.PTE_P and not e & x86.PTE_PS)
    return out


def predict_merge(syms, mem: PhysMemory, load_base: int, firmware_root: int,
                  relocate: bool = False, table_pa: Optional[int] = None,
                  maxphyaddr: int = x86.MAXPHYADDR_ARCH) -> Prediction:
    """Compute, without writing the guest, the table the RFC builds.

    ``firmware_root`` is where the patch copies the lower half from (``%cr3``;
    the patch does not mask it: pass CR3 & ~0xfff and let I0 report low bits).
    ``idle_pg_table``'s upper half is taken as it is in ``mem`` (link-time
    values at ``__efi64_mb2_start``).  The fills are written as the patch does
    (32-bit stores of %eax: the high dword of each entry is left alone).
    ``table_pa``: where M goes (default: ``default_table_pa``).
    """
    xen = LoadedXen(syms, load_base)
    if table_pa is None:
        table_pa, source = default_table_pa(xen)
    else:
        source = "given"
    if table_pa % x86.PAGE_SIZE:
        raise GdbextError(f"the merged table's address {table_pa:#x} is not 4 KiB aligned")
    addr_mask = x86.phys_addr_mask(maxphyaddr)
    overlay = SyntheticMemory(ram_size=1 << x86.MAXPHYADDR_ARCH, base=mem)
    lower = list(qwords(mem.read_phys(firmware_root, L4_HALF * 8)))
    upper = list(qwords(mem.read_phys(xen.pa(IDLE_L4) + L4_HALF * 8, L4_HALF * 8)))
    if relocate:
        upper = _relocate_upper(xen, overlay, upper, addr_mask)
    overlay.write(table_pa, _pack(lower + upper))
    for name, (first, last, pte) in fill_slots(xen).items():
        sym = syms.lookup(name)
        entries = (sym.size // 8) if sym.size else ENTRIES
        if last >= entries:
            raise GdbextError(f"{name} has {entries} entries but the fill would write slot "
                              f"{last} (load base {load_base:#x} too high for the patch)")
        base = xen.pa(name)
        for slot in range(first, last + 1):
            overlay.write_u32(base + 8 * slot, (pte + (slot - first) * x86.SIZE_2M) & _LOW32)
    # What changed: M as a full page, the rest as runs of changed qwords.
    writes: Dict[int, bytes] = {table_pa: overlay.read_phys(table_pa, x86.PAGE_SIZE)}
    originals: Dict[int, bytes] = {table_pa: mem.read_phys(table_pa, x86.PAGE_SIZE)}
    entries_out: List[WriteEntry] = []
    for i, (old, new) in enumerate(zip(qwords(originals[table_pa]), qwords(writes[table_pa]))):
        if old != new:
            entries_out.append(WriteEntry(table_pa + 8 * i, old, new, f"M[{i}]"))
    for page in sorted(overlay.pages):
        if page == table_pa:
            continue
        new_q = qwords(overlay.read_phys(page, x86.PAGE_SIZE))
        old_raw = mem.read_phys(page, x86.PAGE_SIZE)
        old_q = qwords(old_raw)
        i = 0
        while i < ENTRIES:
            if new_q[i] == old_q[i]:
                i += 1
                continue
            j = i
            while j < ENTRIES and new_q[j] != old_q[j]:
                entries_out.append(WriteEntry(page + 8 * j, old_q[j], new_q[j],
                                              entry_name(xen, page + 8 * j, table_pa)))
                j += 1
            writes[page + 8 * i] = _pack(new_q[i:j])
            originals[page + 8 * i] = old_raw[8 * i:8 * j]
            i = j
    return Prediction(overlay, table_pa, writes, originals, relocate, load_base, firmware_root,
                      source, entries_out)

