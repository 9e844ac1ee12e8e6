"""Multiboot2, both directions: the header in Xen's image (what the loader reads)
and the boot information (MBI) the loader hands over in %rbx.  Never imports
``gdb``.

Layouts follow the Multiboot2 specification (version 2.0): the header lies
8-byte aligned in the first 32 KiB of the OS image, four u32s (magic,
architecture, header_length, checksum) then 8-byte aligned tags of
u16 type, u16 flags, u32 size; the MBI is u32 total_size, u32 reserved, then
8-byte aligned tags of u32 type, u32 size.  Both end with a tag of type 0.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Tuple

from .errors import GdbextError, MemoryReadError

# --- the header, in the OS image ---------------------------------------------------------

MB2_HEADER_MAGIC = 0xE85250D6
MB2_HEADER_ALIGN = 8
MB2_SEARCH_BYTES = 32768  # the header lies wholly in the first 32 KiB of the image
_HEADER_FIXED = 16        # magic, architecture, header_length, checksum
_U32 = 0xFFFF_FFFF

MB2_TAG_END = 0
MB2_TAG_INFORMATION_REQUEST = 1
MB2_TAG_ADDRESS = 2
MB2_TAG_ENTRY_ADDRESS = 3
MB2_TAG_CONSOLE_FLAGS = 4
MB2_TAG_FRAMEBUFFER = 5
MB2_TAG_MODULE_ALIGN = 6
MB2_TAG_EFI_BS = 7
MB2_TAG_ENTRY_ADDRESS_EFI32 = 8
MB2_TAG_ENTRY_ADDRESS_EFI64 = 9
MB2_TAG_RELOCATABLE = 10
MB2_TAG_OPTIONAL = 1  # flags bit 0

MB2_LOAD_PREFERENCE_NONE = 0
MB2_LOAD_PREFERENCE_LOW = 1
MB2_LOAD_PREFERENCE_HIGH = 2
_PREFERENCE_NAMES = {MB2_LOAD_PREFERENCE_NONE: "none", MB2_LOAD_PREFERENCE_LOW: "low",
                     MB2_LOAD_PREFERENCE_HIGH: "high"}


@dataclass(frozen=True)
class Mb2Tag:
    type: int
    flags: int
    size: int
    offset: int  # from the header start
    data: bytes  # payload after the 8-byte tag header

    @property
    def optional(self) -> bool:
        return bool(self.flags & MB2_TAG_OPTIONAL)

    def u32(self, index: int) -> int:
        return struct.unpack_from("<I", self.data, 4 * index)[0]


@dataclass(frozen=True)
class Mb2Relocatable:
    """The RELOCATABLE tag.  min/max/align apply to the *image start* PA(_start)."""

    min_addr: int
    max_addr: int
    align: int
    preference: int
    optional: bool = True

    @property
    def preference_name(self) -> str:
        return _PREFERENCE_NAMES.get(self.preference, str(self.preference))


@dataclass(frozen=True)
class Mb2Address:
    header_addr: int
    load_addr: int
    load_end_addr: int
    bss_end_addr: int


@dataclass(frozen=True)
class Multiboot2Header:
    """The multiboot2 header found in the image (linked addresses)."""

    va: int  # linked VA of the header
    offset_from_start: int  # header VA - _start (0x18 in 4.17)
    architecture: int
    header_length: int
    checksum: int
    tags: Tuple[Mb2Tag, ...]
    relocatable: Optional[Mb2Relocatable] = None
    address: Optional[Mb2Address] = None
    entry_addr: Optional[int] = None  # tag 3 (i386 entry), link-time PA
    efi32_entry: Optional[int] = None  # tag 8, link-time PA
    efi64_entry: Optional[int] = None  # tag 9 (EFI amd64), link-time PA
    info_requests: Tuple[int, ...] = ()
    module_align: bool = False
    efi_bs: bool = False

    def tag(self, type_: int) -> Optional[Mb2Tag]:
        for t in self.tags:
            if t.type == type_:
                return t
        return None


def is_header(raw: bytes, off: int = 0) -> bool:
    """The 16 bytes at ``off`` start a header: the magic, and the four u32s sum to 0."""
    if off < 0 or off + _HEADER_FIXED > len(raw):
        return False
    magic, arch, hlen, csum = struct.unpack_from("<IIII", raw, off)
    return magic == MB2_HEADER_MAGIC and not (magic + arch + hlen + csum) & _U32


def header_offsets(image: bytes) -> Iterator[int]:
    """Offsets of every valid header start (magic and checksum) where the
    specification allows one: 8-byte aligned, in the first 32 KiB of ``image``."""
    limit = min(len(image), MB2_SEARCH_BYTES) - _HEADER_FIXED
    for off in range(0, limit + 1, MB2_HEADER_ALIGN):
        if is_header(image, off):
            yield off


def find_header(image: bytes) -> Optional[int]:
    """Offset of the first valid header in the first 32 KiB of ``image``, or None."""
    return next(header_offsets(image), None)


def header_in_image(image: bytes, va: int) -> Optional[Multiboot2Header]:
    """The first header of ``image`` (its bytes from ``_start``, linked at ``va``)
    that lies wholly in the search window and whose tags parse up to the end tag."""
    window = min(len(image), MB2_SEARCH_BYTES)
    for off in header_offsets(image):
        _magic, arch, hlen, csum = struct.unpack_from("<IIII", image, off)
        if hlen < _HEADER_FIXED + 8 or off + hlen > window:
            continue
        hdr = _parse_header(image[off:off + hlen], va + off, off, arch, hlen, csum)
        if hdr is not None:
            return hdr
    return None


def _parse_header(raw: bytes, va: int, off: int, arch: int, hlen: int, csum: int
                  ) -> Optional[Multiboot2Header]:
    tags = []
    kw: dict = {}
    p = _HEADER_FIXED
    end_seen = False
    while p + 8 <= hlen:
        ttype, tflags, tsize = struct.unpack_from("<HHI", raw, p)
        if tsize < 8 or p + tsize > hlen:
            return None
        tag = Mb2Tag(ttype, tflags, tsize, p, bytes(raw[p + 8:p + tsize]))
        tags.append(tag)
        if ttype == MB2_TAG_END:
            end_seen = True
            break
        if ttype == MB2_TAG_RELOCATABLE and tsize >= 24:
            kw["relocatable"] = Mb2Relocatable(
                tag.u32(0), tag.u32(1), tag.u32(2), tag.u32(3), tag.optional
            )
        elif ttype == MB2_TAG_ADDRESS and tsize >= 24:
            kw["address"] = Mb2Address(tag.u32(0), tag.u32(1), tag.u32(2), tag.u32(3))
        elif ttype == MB2_TAG_ENTRY_ADDRESS and tsize >= 12:
            kw["entry_addr"] = tag.u32(0)
        elif ttype == MB2_TAG_ENTRY_ADDRESS_EFI32 and tsize >= 12:
            kw["efi32_entry"] = tag.u32(0)
        elif ttype == MB2_TAG_ENTRY_ADDRESS_EFI64 and tsize >= 12:
            kw["efi64_entry"] = tag.u32(0)
        elif ttype == MB2_TAG_INFORMATION_REQUEST:
            kw["info_requests"] = tuple(tag.u32(i) for i in range((tsize - 8) // 4))
        elif ttype == MB2_TAG_MODULE_ALIGN:
            kw["module_align"] = True
        elif ttype == MB2_TAG_EFI_BS:
            kw["efi_bs"] = True
        p += (tsize + 7) & ~7
    if not end_seen:
        return None
    return Multiboot2Header(va, off, arch, hlen, csum, tuple(tags), **kw)


# --- the boot information (MBI), from the loader -------------------------------------------

# %eax holds this magic at the OS entry, %rbx the MBI's physical address.
MB2_BOOTLOADER_MAGIC = 0x36D76289
MBI_TAG_END = 0
MBI_TAG_CMDLINE = 1
MBI_TAG_EFI64_SYSTEM_TABLE = 12
MBI_TAG_EFI64_IMAGE_HANDLE = 20
MBI_TAG_LOAD_BASE_ADDR = 21   # u32 load_base_addr: where the image starts (PA(_start))
MBI_MAX_SIZE = 1 << 20        # sanity bound on total_size (GRUB's MBI is a few KiB)


class NoMbiError(GdbextError):
    """The bytes at the address are no multiboot2 information (total_size out of bounds)."""


@dataclass
class MbiInfo:
    """What the checks need from the multiboot2 information (%rbx at entry)."""
    pa: int
    total_size: int
    efi64_system_table: Optional[int] = None     # tag 12
    efi64_image_handle: Optional[int] = None     # tag 20
    load_base_addr: Optional[int] = None         # tag 21: PA(_start) = B + 2 MiB
    cmdline_pa: Optional[int] = None             # tag 1 (string at tag + 8)
    tags: List[Tuple[int, int, int]] = field(default_factory=list)  # (type, pa, size)


def _mbi_bytes(mem, pa: int) -> bytes:
    """The whole MBI at ``pa``: NoMbiError when its total_size is not plausible,
    MemoryReadError when it cannot be read."""
    total = struct.unpack_from("<I", mem.read_phys(pa, 8))[0]
    if total < 16 or total > MBI_MAX_SIZE:
        raise NoMbiError(f"no multiboot2 information at {pa:#x} (total_size {total:#x})")
    return mem.read_phys(pa, total)


def _mbi_tag_walk(data: bytes) -> Iterator[Tuple[int, int, int]]:
    """(type, offset, size) of each tag, the end tag included; the walk stops at
    a tag smaller than its own header or running past total_size."""
    total = len(data)
    off = 8
    while off + 8 <= total:
        ttype, tsize = struct.unpack_from("<II", data, off)
        if tsize < 8 or off + tsize > total:
            return
        yield ttype, off, tsize
        if ttype == MBI_TAG_END:
            return
        off += (tsize + 7) & ~7


def parse_mbi(mem, pa: int) -> MbiInfo:
    """Parse the multiboot2 information structure at ``pa`` (8-byte aligned
    tags after an 8-byte header; an end tag of type 0 closes it).  Raises
    ``GdbextError`` (one line) when there is none, ``MemoryReadError`` when
    it cannot be read."""
    data = _mbi_bytes(mem, pa)
    info = MbiInfo(pa=pa, total_size=len(data))
    for typ, off, size in _mbi_tag_walk(data):
        info.tags.append((typ, pa + off, size))
        if typ == MBI_TAG_EFI64_SYSTEM_TABLE and size >= 16:
            info.efi64_system_table = struct.unpack_from("<Q", data, off + 8)[0]
        elif typ == MBI_TAG_EFI64_IMAGE_HANDLE and size >= 16:
            info.efi64_image_handle = struct.unpack_from("<Q", data, off + 8)[0]
        elif typ == MBI_TAG_LOAD_BASE_ADDR and size >= 12:
            info.load_base_addr = struct.unpack_from("<I", data, off + 8)[0]
        elif typ == MBI_TAG_CMDLINE:
            info.cmdline_pa = pa + off + 8
    return info


def mbi_tags(mem, mbi_pa: int) -> List[Tuple[int, bytes]]:
    """(type, payload) of every tag but the end tag of the MBI at ``mbi_pa``;
    empty when there is no readable MBI there (for probing, not for reports)."""
    try:
        data = _mbi_bytes(mem, mbi_pa)
    except (MemoryReadError, NoMbiError):
        return []
    return [(ttype, bytes(data[off + 8:off + size])) for ttype, off, size in _mbi_tag_walk(data)
            if ttype != MBI_TAG_END]
