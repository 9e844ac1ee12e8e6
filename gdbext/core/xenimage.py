"""Xen's image in guest memory: where each Xen object is once loaded at B, and
what a pointer found in a Xen table means.

This is the one home for the load-address arithmetic used by the annotated
output, the merge checks and the diagrams.  Never imports ``gdb``.

* PA(S) = B + offset(S) for S in [_start, _end), offset from ``__image_base__``
  (``XenSymbols.offset``); B itself is PA(``__image_base__``).
* Every qword stored in a Xen boot table is a link-time value: it assumes
  B = 0, so its address part is offset(target).  ``trampoline_setup`` adds B
  once.  A pointer found in memory is therefore, relative to its link value L:

  ==================  ====================================================
  ``relocated``       address == L + B (what Xen's own fix-up produces)
  ``unrelocated``     address == L: points at firmware memory (the RFC's bug)
  ``relocated-twice`` address == L + 2B (a fix-up applied twice)
  ``foreign``         anything else (or a link value of 0: written at run
                      time, e.g. l2_xenmap's fills)
  ``absolute``        an entry Xen never relocates (l1_directmap) and found
                      equal to its link value
  ``not-present``     P clear: not a pointer
  ==================  ====================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from . import x86
from .errors import GdbextError, MemoryReadError
from .multiboot2 import MB2_HEADER_MAGIC, MBI_TAG_LOAD_BASE_ADDR, is_header, mbi_tags
from .xenefi import codeview_build_id
from .xensyms import XEN_PHYS_START_SYMBOL

RELOCATED = "relocated"
UNRELOCATED = "unrelocated"
RELOCATED_TWICE = "relocated-twice"
FOREIGN = "foreign"
ABSOLUTE = "absolute"
NOT_PRESENT = "not-present"
# xen.efi before its self-relocation: the firmware's PE loader added B - ImageBase
# (ImageBase = XEN_VIRT_START) to every base relocation, the boot tables' entries included.
PE_RELOCATED = "pe-relocated"
POINTER_CLASSES = (RELOCATED, UNRELOCATED, RELOCATED_TWICE, FOREIGN, ABSOLUTE, NOT_PRESENT,
                   PE_RELOCATED)

# The L4 Xen boots from (CR3 once Xen runs); a merged root (the RFC's
# efi_l4_bootmap) copies its upper half.
IDLE_L4 = "idle_pg_table"

# Boot tables whose link-time entries are absolute PAs that no fix-up touches.
ABSOLUTE_TABLES = ("l1_directmap",)

# Entries compared by address only: A and D are set by the CPU as it walks.
_HW_SET_BITS = x86.PTE_A | x86.PTE_D


@dataclass(frozen=True)
class EntryVerdict:
    """One entry of a Xen table compared with its link-time value."""
    table: str            # e.g. "idle_pg_table"
    index: int            # entry index inside the whole table (0..512*pages-1)
    entry_pa: int
    found: int            # the qword in guest memory
    link: int             # the qword in the ELF (B = 0)
    kind: str             # one of POINTER_CLASSES
    target_pa: int        # address part of ``found``
    expected_pa: int      # address part of ``link`` + B (or link for absolute tables)

    def as_dict(self) -> Dict[str, object]:
        return {"table": self.table, "index": self.index, "entry_pa": self.entry_pa,
                "found": self.found, "link": self.link, "kind": self.kind,
                "target_pa": self.target_pa, "expected_pa": self.expected_pa}


def classify_pointer(found_addr: int, link_addr: int, load_base: int,
                     absolute: bool = False, pe_delta: Optional[int] = None,
                     addr_mask: int = x86.phys_addr_mask(x86.MAXPHYADDR_ARCH)) -> str:
    """Classify a pointer's address part against its link-time address part.

    ``pe_delta`` (xen.efi's layout: B - XEN_VIRT_START, mod 2**64) also recognises an
    entry the firmware's PE loader relocated as it relocates every pointer of the image
    (the address part of link + pe_delta): what xen.efi's tables hold from efi_start
    until its self-relocation (efi_arch_relocate_image) makes them link + B."""
    if absolute:
        return ABSOLUTE if found_addr == link_addr else FOREIGN
    if link_addr == 0:
        return FOREIGN
    if found_addr == link_addr + load_base:
        return RELOCATED
    if found_addr == link_addr:
        return UNRELOCATED
    if found_addr == link_addr + 2 * load_base:
        return RELOCATED_TWICE
    if pe_delta is not None and found_addr == (link_addr + pe_delta) % (1 << 64) & addr_mask:
        return PE_RELOCATED
    return FOREIGN


# Static pointers (a qword of Xen's data holding a linked VA, a PE base relocation's site
# in xen.efi): what they hold on the way. On GRUB's multiboot2 path nothing relocates
# them: they hold linked VAs throughout. On xen.efi's path the firmware's PE loader
# applied the base relocations for the load address B (ImageBase = XEN_VIRT_START), so
# they hold load addresses (B + offset of the target) until Xen relocates itself back
# (efi_arch_relocate_image(XEN_VIRT_START - B), just before it switches to its own tables).
STATIC_LINKED = "linked VA"
STATIC_LOAD_ADDRESS = "load address"
STATIC_FOREIGN = "foreign"


def static_pointer_class(found: int, link_value: int, load_base: int, virt_start: int) -> str:
    """Which of the two a static pointer holds: its linked VA (``link_value``, the ELF's
    qword), or the load address of the same target (what the PE loader makes of it)."""
    if found == link_value:
        return STATIC_LINKED
    if found == (link_value - virt_start + load_base) % (1 << 64):
        return STATIC_LOAD_ADDRESS
    return STATIC_FOREIGN


def expected_static_pointer_class(efi_path: bool, relocated_back: bool) -> str:
    """What a static pointer should hold: load addresses on xen.efi's path until Xen's
    self-relocation, linked VAs otherwise."""
    return STATIC_LOAD_ADDRESS if efi_path and not relocated_back else STATIC_LINKED


class LoadedXen:
    """A Xen image (its symbols) at load base B in physical memory."""

    def __init__(self, syms, load_base: int):
        self.syms = syms
        self.load_base = load_base
        self.virt_start = syms.virt_start
        # xen.efi's layout: what the firmware's PE loader adds to each relocated qword.
        self.pe_delta = ((load_base - syms.virt_start) % (1 << 64)
                         if getattr(syms, "efi_layout", False) else None)
        # The loaded image: [B + offset(_start), B + offset(_end)).
        self.image_pa_start = load_base + syms.offset(syms.image_start)
        self.image_pa_end = load_base + syms.offset(syms.image_end)
        self._tables: List[Tuple[int, int, str, int]] = []  # (pa, end, name, level)
        for table, sym in syms.boot_tables():
            pa = load_base + syms.offset(sym.value)
            self._tables.append((pa, pa + table.pages * x86.PAGE_SIZE, table.name, table.level))
        self._tables.sort()

    # -- addresses -------------------------------------------------------------

    def pa(self, name_or_va) -> int:
        """PA of a Xen symbol (or linked VA) at this load base."""
        return self.syms.pa(name_or_va, self.load_base)

    def in_image(self, pa: int) -> bool:
        return self.image_pa_start <= pa < self.image_pa_end

    def linked_va_of_pa(self, pa: int) -> Optional[int]:
        """The linked VA that PA holds, if PA is inside the loaded image."""
        if not self.in_image(pa):
            return None
        return self.virt_start + (pa - self.load_base)

    def table_at(self, pa: int) -> Optional[Tuple[str, int, int]]:
        """(table name, level, byte offset into the table) if PA is in a boot table."""
        for start, end, name, level in self._tables:
            if start <= pa < end:
                return name, level, pa - start
        return None

    def name_pa(self, pa: int) -> Optional[str]:
        """``l2_directmap+0x1000``-style name of a PA inside the image, else None."""
        hit = self.table_at(pa)
        if hit is not None:
            name, _level, delta = hit
            return f"{name}+{delta:#x}" if delta else name
        va = self.linked_va_of_pa(pa)
        if va is None:
            return None
        return self.syms.describe(va)

    # -- pointers ------------------------------------------------------------------

    def link_entry(self, table: str, index: int) -> int:
        """The link-time qword of ``table[index]`` (from the ELF)."""
        return self.syms.read_u64(self.syms.linked_va(table) + 8 * index)

    def judge_entry(self, table: str, index: int, found: int,
                    addr_mask: int = x86.phys_addr_mask(x86.MAXPHYADDR_ARCH)) -> EntryVerdict:
        """Compare one qword of a Xen boot table in memory with its link value."""
        link = self.link_entry(table, index)
        absolute = table in ABSOLUTE_TABLES
        found_addr = found & addr_mask
        link_addr = link & addr_mask
        if not found & x86.PTE_P:
            kind = NOT_PRESENT
        else:
            kind = classify_pointer(found_addr, link_addr, self.load_base, absolute,
                                    self.pe_delta, addr_mask)
        expected = link_addr if absolute or not link_addr else link_addr + self.load_base
        entry_pa = self.pa(table) + 8 * index
        return EntryVerdict(table, index, entry_pa, found, link, kind, found_addr, expected)

    def expected_entry(self, table: str, index: int) -> int:
        """What Xen's own fix-up makes of ``table[index]`` (link value + B once)."""
        link = self.link_entry(table, index)
        if table in ABSOLUTE_TABLES or not link & x86.PTE_P:
            return link
        return link + self.load_base

    @staticmethod
    def same_entry(a: int, b: int) -> bool:
        """Equal but for the bits the CPU sets while walking (A, D)."""
        return (a & ~_HW_SET_BITS) == (b & ~_HW_SET_BITS)


# ---------------------------------------------------------------------------
# Finding the image in guest memory, and checking it is the one in xen-syms
# ---------------------------------------------------------------------------
#
# Everything below works on a ``PhysMemory`` (``read_phys(pa, size)``) and a
# XenSymbols: the GDB layer passes the real target, the unit tests synthetic
# memory holding the real xen-syms bytes at a chosen B.

# The build-id note is inside the loaded image (it is in xen.gz's PT_LOAD).
BUILD_ID_NOTE_START = "__note_gnu_build_id_start"
BUILD_ID_NOTE_END = "__note_gnu_build_id_end"
BUILD_ID_SECTION = ".note.gnu.build-id"
NT_GNU_BUILD_ID = 3
GNU_NOTE_NAME = b"GNU\0"

# Bytes of the image compared with the ELF before a candidate B is believed:
# at RIP (code that has not run yet is byte-identical), and from PA(_start)
# (the image's head: its jump, the multiboot headers, the first functions).
CODE_VERIFY_BYTES = 32
IMAGE_VERIFY_BYTES = 4096

# head.S, x86_32_switch: ``lea __image_base__(%rip), %esi`` puts B in %esi,
# which stays B through cs32_switch until trampoline_setup stores it.
ESI_STRETCH_FROM = "x86_32_switch"
ESI_STRETCH_TO = "trampoline_setup"
_LEA_RIP_ESI = b"\x8d\x35"    # lea disp32(%rip), %esi (no REX)


def _u32(raw: bytes, off: int) -> int:
    return int.from_bytes(raw[off:off + 4], "little")


def parse_build_id_note(raw: bytes) -> Optional[bytes]:
    """The desc of the first NT_GNU_BUILD_ID/"GNU" note in ``raw``, else None."""
    off = 0
    while off + 12 <= len(raw):
        namesz, descsz, ntype = _u32(raw, off), _u32(raw, off + 4), _u32(raw, off + 8)
        name_off = off + 12
        desc_off = name_off + ((namesz + 3) & ~3)
        end = desc_off + ((descsz + 3) & ~3)
        if end > len(raw) or desc_off + descsz > len(raw):
            return None
        if ntype == NT_GNU_BUILD_ID and raw[name_off:name_off + namesz] == GNU_NOTE_NAME:
            return bytes(raw[desc_off:desc_off + descsz])
        off = end
    return None


def build_id_note_span(syms) -> Optional[Tuple[int, int]]:
    """(linked VA, size) of the build-id note inside the image, or None (a .map)."""
    start, end = syms.get(BUILD_ID_NOTE_START), syms.get(BUILD_ID_NOTE_END)
    if start is not None and end is not None and end.value > start.value:
        return start.value, end.value - start.value
    for sec in getattr(syms, "sections", ()):
        if sec.name == BUILD_ID_SECTION and sec.size:
            return sec.addr, sec.size
    return None


def build_id_in_memory(mem, syms, load_base: int) -> Optional[bytes]:
    """The build-id in the note of the image loaded at B (None: no valid note there).

    Raises MemoryReadError if the note's place cannot be read."""
    span = build_id_note_span(syms)
    if span is None:
        return None
    va, size = span
    raw = mem.read_phys(load_base + syms.offset(va), size)
    # xen.efi keeps its build-id as a PE CodeView record in the same span (core/xenefi).
    return parse_build_id_note(raw) or codeview_build_id(raw)


@dataclass(frozen=True)
class BuildIdCheck:
    """xen-syms' build-id against the one in the image in guest memory."""
    expected: Optional[bytes]    # from xen-syms (None: a .map has none)
    found: Optional[bytes]       # from guest memory (None: no note there, or unreadable)
    readable: bool               # False: the note's place could not be read

    @property
    def match(self) -> Optional[bool]:
        """True/False, or None when it cannot be told (no build-id in xen-syms, unreadable)."""
        if self.expected is None or not self.readable:
            return None
        return self.found == self.expected

    def mismatch_message(self, path, load_base: int) -> str:
        found = self.found.hex() if self.found else "no build-id note"
        return (f"build-id mismatch: xen-syms {path} has {self.expected.hex()} but the Xen "
                f"image in guest memory at B={load_base:#x} has {found}: load that Xen's "
                f"xen-syms ('xen-syms PATH'), or 'set xen-ignore-build-id on' to use these "
                f"symbols anyway")

    def as_dict(self) -> Dict[str, object]:
        return {"expected": self.expected.hex() if self.expected else None,
                "found": self.found.hex() if self.found else None,
                "match": self.match}


def check_build_id(mem, syms, load_base: int) -> BuildIdCheck:
    try:
        found = build_id_in_memory(mem, syms, load_base)
    except MemoryReadError:
        return BuildIdCheck(syms.build_id, None, False)
    return BuildIdCheck(syms.build_id, found, True)


# -- verifying a candidate B ------------------------------------------------------------

def has_bytes(syms) -> bool:
    """True for xen-syms (an ELF: the image's bytes are at hand); False for a .map."""
    return hasattr(syms, "read_linked")


def header_pa(syms, load_base: int) -> Optional[int]:
    """PA of the multiboot2 header of the image at B (None: the image has none)."""
    hdr = getattr(syms, "multiboot2", None)
    return None if hdr is None else load_base + syms.offset(hdr.va)


def _read(mem, pa: int, size: int) -> Optional[bytes]:
    try:
        return mem.read_phys(pa, size)
    except MemoryReadError:
        return None


def _elf_bytes(syms, va: int, size: int) -> Optional[bytes]:
    if not has_bytes(syms):
        return None
    try:
        return syms.read_linked(va, size)
    except GdbextError:
        return None


def header_at(mem, syms, load_base: int) -> bool:
    """A valid multiboot2 header (magic, checksum) where this image has its own, at B.

    True for any Xen build with its header at the same offset: the cheap test
    (and what tells "a Xen, but not this xen-syms" apart from "no Xen")."""
    hdr = getattr(syms, "multiboot2", None)
    if hdr is None:
        return False
    raw = _read(mem, header_pa(syms, load_base), 16)
    return raw is not None and is_header(raw)


def same_bytes(mem, syms, load_base: int, va: int, size: int) -> bool:
    """Guest bytes at PA(va) equal the ELF's bytes at va."""
    elf = _elf_bytes(syms, va, size)
    return elf is not None and _read(mem, load_base + syms.offset(va), size) == elf


def verify_base(mem, syms, load_base: int, image_bytes: int = IMAGE_VERIFY_BYTES) -> bool:
    """This xen-syms' image is at B: its multiboot2 header (whole, checksum included)
    and the first ``image_bytes`` of the image equal the ELF's. Always False for a
    .map: there are no bytes to compare."""
    if not has_bytes(syms):
        return False
    hdr = getattr(syms, "multiboot2", None)
    if hdr is not None and not (header_at(mem, syms, load_base)
                                and same_bytes(mem, syms, load_base, hdr.va,
                                               hdr.header_length)):
        return False
    size = min(image_bytes, syms.image_end - syms.image_start)
    return same_bytes(mem, syms, load_base, syms.image_start, size)


def base_align(syms) -> int:
    """The alignment of B: the RELOCATABLE tag's (image start and B differ by 2 MiB)."""
    hdr = getattr(syms, "multiboot2", None)
    reloc = hdr.relocatable if hdr is not None else None
    return reloc.align if reloc is not None and reloc.align else x86.PAGE_SIZE


# -- sources of B -------------------------------------------------------------------------

def bases_around(syms, pa: int) -> List[int]:
    """Every aligned B for which ``pa`` falls inside the image at B (highest first)."""
    align = base_align(syms)
    lo_off = syms.offset(syms.image_start)
    hi_off = syms.offset(syms.image_end)
    first = -(-(pa - hi_off + 1) // align) * align
    last = ((pa - lo_off) // align) * align
    return [b for b in range(last, first - 1, -align) if b >= 0]


def base_from_rip(mem, syms, rip_pa: int, verify_bytes: int = CODE_VERIFY_BYTES) -> Optional[int]:
    """B if the CPU executes this image at its load address: RIP's PA is inside the
    image at B, the code bytes at RIP are the ELF's there and so is the header."""
    for b in bases_around(syms, rip_pa):
        va = syms.virt_start + (rip_pa - b)
        if same_bytes(mem, syms, b, va, verify_bytes) and verify_base(mem, syms, b,
                                                                      image_bytes=0):
            return b
    return None


def esi_stretch(syms) -> Optional[Tuple[int, int]]:
    """[first, last] offsets of head.S code that runs with %esi = B.

    From just after x86_32_switch's ``lea __image_base__(%rip), %esi`` up to and
    including trampoline_setup's first instruction (which stores %esi in
    xen_phys_start). Found in the ELF's bytes; None if this image has no such code."""
    start, end = syms.get(ESI_STRETCH_FROM), syms.get(ESI_STRETCH_TO)
    if start is None or end is None or end.value <= start.value:
        return None
    code = _elf_bytes(syms, start.value, end.value - start.value)
    if code is None:
        return None
    i = code.find(_LEA_RIP_ESI)
    while i >= 0:
        nxt = start.value + i + 6
        disp = int.from_bytes(code[i + 2:i + 6], "little", signed=True)
        if nxt + disp == syms.virt_start:          # target is __image_base__
            return syms.offset(nxt), syms.offset(end.value)
        i = code.find(_LEA_RIP_ESI, i + 1)
    return None


def base_from_esi(mem, syms, rip_pa: int, esi: int) -> Optional[int]:
    """B from %esi while RIP is in the stretch where head.S holds it there."""
    stretch = esi_stretch(syms)
    if stretch is None or esi % base_align(syms):
        return None
    if not stretch[0] <= rip_pa - esi <= stretch[1]:
        return None
    return esi if verify_base(mem, syms, esi, image_bytes=0) else None


def phys_start_holds(mem, syms, load_base: int) -> bool:
    """xen_phys_start, read at its PA for this B, holds B (trampoline_setup stored it)."""
    if XEN_PHYS_START_SYMBOL not in syms:
        return False
    raw = _read(mem, syms.pa(XEN_PHYS_START_SYMBOL, load_base), 8)
    return raw is not None and int.from_bytes(raw, "little") == load_base


def plausible_base(syms, value: int) -> bool:
    """A physical address aligned as the RELOCATABLE tag demands, and not 0 (what
    xen_phys_start holds before trampoline_setup sets it)."""
    return 0 < value < 1 << x86.MAXPHYADDR_ARCH and value % base_align(syms) == 0


def user_base_problem(syms, base: int, maxphyaddr: int = x86.MAXPHYADDR_ARCH,
                      ram: Sequence[Tuple[int, int]] = ()) -> Optional[str]:
    """Why B given by the user cannot be Xen's load base (None if it can): it must be
    a physical address aligned as plausible_base demands, with the whole image below
    MAXPHYADDR and, when QEMU's memory map is known, inside the guest's RAM."""
    end = base + syms.offset(syms.image_end)
    if not plausible_base(syms, base):
        return (f"{base:#x} is not a plausible load base: it must be a physical address "
                f"above 0, below 2^{x86.MAXPHYADDR_ARCH}, and a multiple of "
                f"{base_align(syms):#x} (Xen prints it: 'Xen image load base address')")
    if end > 1 << maxphyaddr:
        return (f"{base:#x} is not a plausible load base: Xen's image would end at "
                f"{end:#x}, above MAXPHYADDR ({maxphyaddr} bits, 'set xen-maxphyaddr')")
    if ram and not any(lo <= base and end <= hi for lo, hi in ram):
        return (f"{base:#x} is not a plausible load base: Xen's image ({base:#x}..{end:#x}) "
                f"is not inside the guest's RAM ("
                + ", ".join(f"{lo:#x}..{hi:#x}" for lo, hi in ram) + ")")
    return None


def base_from_mbi(mem, syms, mbi_pa: int) -> Optional[int]:
    """B from the MBI's LOAD_BASE_ADDR tag (PA(_start)), verified against the ELF."""
    for ttype, payload in mbi_tags(mem, mbi_pa):
        if ttype == MBI_TAG_LOAD_BASE_ADDR and len(payload) >= 4:
            b = _u32(payload, 0) - syms.image_offset
            if b >= 0 and verify_base(mem, syms, b):
                return b
    return None


@dataclass
class ScanResult:
    load_base: Optional[int]          # this xen-syms' image, verified
    candidates_read: int              # candidate bases whose header place was read
    candidates: int                   # candidate bases in RAM
    header_only: List[int]            # bases with a valid multiboot2 header but other bytes


def scan_candidates(syms, ram_ranges: Sequence[Tuple[int, int]]) -> List[int]:
    """Bases the image's RELOCATABLE tag allows with the whole image in one RAM range,
    in the order a loader honouring its preference tries them."""
    if not ram_ranges or not has_bytes(syms):
        return []
    size = syms.load_size()
    top = max(end for _start, end in ram_ranges)
    out = []
    for b in syms.load_base_candidates(top):
        s = b + syms.image_offset
        if any(lo <= s and s + size <= hi for lo, hi in ram_ranges):
            out.append(b)
    return out


def scan(mem, syms, ram_ranges: Sequence[Tuple[int, int]], stop_at_first: bool = True,
         image_bytes: int = IMAGE_VERIFY_BYTES) -> ScanResult:
    """Look for the image at every candidate base: first the 4-byte multiboot2 magic
    where this image has its header (one small read per candidate), then, where it
    is, the checksum, the whole header and ``image_bytes`` of the image."""
    hdr = getattr(syms, "multiboot2", None)
    cands = scan_candidates(syms, ram_ranges)
    result = ScanResult(None, 0, len(cands), [])
    if hdr is None:
        return result
    magic = MB2_HEADER_MAGIC.to_bytes(4, "little")
    hdr_off = syms.offset(hdr.va)
    for b in cands:
        result.candidates_read += 1
        if _read(mem, b + hdr_off, 4) != magic:
            continue
        if verify_base(mem, syms, b, image_bytes):
            if result.load_base is None:
                result.load_base = b
            if stop_at_first:
                break
        elif header_at(mem, syms, b):
            result.header_only.append(b)
    return result
