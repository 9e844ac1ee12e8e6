"""Synthetic guests for the merge checks: Xen's loaded image (the real xen-syms'
bytes at a load base B), firmware-like identity tables, an MBI, registers.

Entries are encoded here by hand (bits from the SDM), not with the core's
decoder, so the checks are compared against an independent encoding.  No Xen
offset is written here: everything comes from xen-syms.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple

from gdbext.core.memory import SyntheticMemory

P, RW, A, D, PS = 0x1, 0x2, 0x20, 0x40, 0x80
NX = 1 << 63
SIZE_4K, SIZE_2M, SIZE_1G = 1 << 12, 1 << 21, 1 << 30
PAGE = SIZE_4K

CR0_PE, CR0_WP, CR0_PG = 1, 1 << 16, 1 << 31
CR4_PAE, CR4_LA57 = 1 << 5, 1 << 12
EFER_LME, EFER_LMA, EFER_NXE = 1 << 8, 1 << 10, 1 << 11
MB2_BOOTLOADER_MAGIC = 0x36D76289

RAM = 1 << 32           # the synthetic guest's RAM (reads above it fail)
FW_TABLES = 0x0100_0000  # firmware page tables are allocated from here (16 MiB)
MBI_PA = 0x0200_0000
SYSTEM_TABLE = 0x0300_0000
IMAGE_HANDLE = 0x0300_1000
STACK_TOP = 0x0400_0000


def u64(mem, pa: int) -> int:
    return struct.unpack("<Q", mem.read_phys(pa, 8))[0]


def load_image(mem: SyntheticMemory, syms, load_base: int) -> None:
    """Place the ELF's loaded bytes ([_start, _end), link-time values) at B."""
    size = syms.image_end - syms.image_start
    mem.write(load_base + syms.offset(syms.image_start), syms.read_linked(syms.image_start, size))


class FirmwareTables:
    """An identity map of [0, top) in the lower half, as UEFI firmware builds one."""

    def __init__(self, mem: SyntheticMemory, top: int, page_size: int = SIZE_2M,
                 base: int = FW_TABLES, read_only: Sequence[Tuple[int, int]] = (),
                 no_exec: Sequence[Tuple[int, int]] = (), small: Sequence[Tuple[int, int]] = ()):
        self.mem = mem
        self.next = base
        self.root = self.alloc()
        for start in range(0, top, page_size):
            flags = P | RW | A
            if any(lo <= start < hi for lo, hi in read_only):
                flags &= ~RW
            if any(lo <= start < hi for lo, hi in no_exec):
                flags |= NX
            if page_size == SIZE_2M and any(lo <= start < hi for lo, hi in small):
                for pa in range(start, start + SIZE_2M, SIZE_4K):
                    self.set(pa, 1, pa | flags)
            elif page_size == SIZE_1G:
                self.set(start, 3, start | flags | PS)
            else:
                self.set(start, 2, start | flags | PS)

    def alloc(self) -> int:
        pa = self.next
        self.next += PAGE
        return pa

    def table_for(self, va: int, level: int) -> int:
        """The table at ``level`` covering ``va``, allocated on the way down."""
        table = self.root
        for lv in range(4, level, -1):
            idx = (va >> (12 + 9 * (lv - 1))) & 511
            e = u64(self.mem, table + 8 * idx)
            if not e & P:
                new = self.alloc()
                self.mem.write_u64(table + 8 * idx, new | P | RW | A)
                e = new | P
            table = e & 0x000F_FFFF_FFFF_F000
        return table

    def set(self, va: int, level: int, entry: int) -> None:
        idx = (va >> (12 + 9 * (level - 1))) & 511
        self.mem.write_u64(self.table_for(va, level) + 8 * idx, entry)

    def entry_pa(self, va: int, level: int) -> int:
        idx = (va >> (12 + 9 * (level - 1))) & 511
        return self.table_for(va, level) + 8 * idx


def build_mbi(mem: SyntheticMemory, pa: int, load_base_addr: int,
              system_table: int = SYSTEM_TABLE, image_handle: int = IMAGE_HANDLE,
              cmdline: bytes = b"xen console=com1\0") -> int:
    """A multiboot2 information structure as GRUB builds it (tags 1, 12, 20, 21, 0)."""
    tags = []

    def tag(typ: int, payload: bytes) -> None:
        body = struct.pack("<II", typ, 8 + len(payload)) + payload
        tags.append(body + bytes((-len(body)) % 8))

    tag(1, cmdline)
    tag(12, struct.pack("<Q", system_table))
    tag(20, struct.pack("<Q", image_handle))
    tag(21, struct.pack("<I", load_base_addr))
    tag(0, b"")
    data = b"".join(tags)
    total = 8 + len(data)
    mem.write(pa, struct.pack("<II", total, 0) + data)
    return total


@dataclass
class Guest:
    """A guest stopped at __efi64_mb2_start: memory, B, F, registers."""
    syms: object
    mem: SyntheticMemory
    load_base: int
    fw: FirmwareTables
    regs: Dict[str, int] = field(default_factory=dict)

    @property
    def firmware_root(self) -> int:
        return self.fw.root


def entry_guest(syms, load_base: Optional[int] = None, ram_top: int = 1 << 30,
                page_size: int = SIZE_2M, fw_top: Optional[int] = None,
                mbi_pa: int = MBI_PA, **fw_kw) -> Guest:
    """Xen loaded by a GRUB-like loader (the first load-base candidate below
    ``ram_top`` unless given), firmware identity tables over ``fw_top``
    (default ``ram_top``), an MBI in %rbx, stopped at __efi64_mb2_start."""
    mem = SyntheticMemory(ram_size=RAM)
    if load_base is None:
        load_base = syms.load_base_candidates(ram_top)[0]
    load_image(mem, syms, load_base)
    fw = FirmwareTables(mem, ram_top if fw_top is None else fw_top, page_size=page_size,
                        **fw_kw)
    build_mbi(mem, mbi_pa, load_base + syms.offset(syms.image_start))
    regs = {
        "cr0": CR0_PG | CR0_WP | CR0_PE, "cr3": fw.root, "cr4": CR4_PAE,
        "efer": EFER_LME | EFER_LMA | EFER_NXE,
        "rip": load_base + syms.offset("__efi64_mb2_start"),
        "rsp": STACK_TOP - 0x100, "rbx": mbi_pa, "rax": MB2_BOOTLOADER_MAGIC,
    }
    return Guest(syms, mem, load_base, fw, regs)


class SymsWith:
    """A XenSymbols seen through a few changes (an extra symbol, another _end),
    for the cases the Debian build does not have (a patched build's
    efi_l4_bootmap, an image ending on a 2 MiB boundary)."""

    def __init__(self, syms, extra: Optional[Dict[str, object]] = None,
                 image_end: Optional[int] = None):
        self._syms = syms
        self._extra = dict(extra or {})
        if image_end is not None:
            self.image_end = image_end

    def __getattr__(self, name):
        return getattr(self._syms, name)

    def get(self, name):
        if name in self._extra:
            return self._extra[name]
        return self._syms.get(name)

    def lookup(self, name):
        if name in self._extra:
            return self._extra[name]
        return self._syms.lookup(name)

    def in_image(self, va: int) -> bool:
        return self._syms.image_start <= va < self.image_end


def trampoline_relocate(mem: SyntheticMemory, syms, load_base: int, times: int = 1) -> None:
    """What trampoline_setup does to __page_tables: add B to every present qword
    (``times`` times, to model a fix-up applied twice), and store B in
    xen_phys_start."""
    lo = load_base + syms.offset("__page_tables_start")
    hi = load_base + syms.offset("__page_tables_end")
    for _ in range(times):
        for pa in range(lo, hi, 8):
            e = u64(mem, pa)
            if e & P:
                mem.write_u64(pa, e + load_base)
    mem.write_u64(load_base + syms.offset("xen_phys_start"), load_base)
