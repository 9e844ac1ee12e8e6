"""Which firmware image an address lies in: the PE/COFF (or TE) image around it, found
the way EDK2's exception dump does ("Find image based on IP"): from the address
down, on 4 KiB boundaries, to the first "MZ" whose e_lfanew leads to "PE\\0\\0"
(or a "VZ" TE header), then its size, entry point and the PDB name of its CodeView
debug record.

Hand-parsed, a dozen fields (PE/COFF spec: DOS header, COFF header, optional
header, data directory 6, debug directory, CodeView RSDS/NB10/MTOC; EDK2's TE
header), because the images are read from guest memory in their *loaded* layout
(an RVA is an offset from the image base, not through the section table as
``pefile`` maps it), the firmware's early images are TE images (which ``pefile``
does not parse), and each field costs one small read through GDB's remote
protocol, where a general parser wants the whole image at once.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from .errors import MemoryReadError
from .memory import PhysMemory

# EDK2's PE_COFF_IMAGE_ALIGN_SIZE (PeCoffGetEntryPointLib): the dump steps down 4 bytes
# at a time, so it also finds headers that are not page aligned (seen: 0x3b990320).
FIRMWARE_SEARCH_ALIGN = 4
PAGE = 0x1000
DEFAULT_SEARCH_BYTES = 64 << 20   # the RFC crash's dump searched 32 MiB down
SEARCH_CHUNK = 64 << 10
DOS_MAGIC = b"MZ"
TE_MAGIC = b"VZ"
PE_SIGNATURE = b"PE\0\0"
E_LFANEW_OFFSET = 0x3C
OPT_MAGIC_PE32 = 0x10B
OPT_MAGIC_PE32_PLUS = 0x20B
DEBUG_DIRECTORY_INDEX = 6
DEBUG_TYPE_CODEVIEW = 2
DEBUG_ENTRY_SIZE = 28
TE_HEADER_SIZE = 40
MAX_PDB_NAME = 512
MACHINES = {0x14C: "IA32", 0x8664: "X64", 0xAA64: "AARCH64", 0x200: "IA64", 0xEBC: "EBC"}
# CodeView signatures and where the file name starts in each record.
CODEVIEW_NAME_OFFSET = {b"RSDS": 24, b"NB10": 16, b"MTOC": 20}


@dataclass(frozen=True)
class PeImage:
    image_base: int              # where the header was found (what the firmware prints)
    kind: str                    # "PE32+", "PE32" or "TE"
    machine: str
    size_of_image: Optional[int]  # None for TE (its header has no such field)
    entry_point: int             # absolute address
    linked_image_base: int       # the optional header's ImageBase (as linked)
    pdb_name: Optional[str]

    @property
    def name(self) -> str:
        """The PDB file's base name without '.pdb' ('CpuDxe'), or the image base."""
        if not self.pdb_name:
            return f"image at {self.image_base:#x}"
        base = self.pdb_name.replace("\\", "/").rsplit("/", 1)[-1]
        return base[:-4] if base.lower().endswith(".pdb") else base

    def contains(self, address: int) -> bool:
        return self.size_of_image is None or self.image_base <= address < \
            self.image_base + self.size_of_image

    def as_dict(self) -> Dict[str, object]:
        return {"image_base": self.image_base, "kind": self.kind, "machine": self.machine,
                "size_of_image": self.size_of_image, "entry_point": self.entry_point,
                "linked_image_base": self.linked_image_base, "pdb_name": self.pdb_name,
                "name": self.name}


def _read(mem: PhysMemory, addr: int, size: int) -> Optional[bytes]:
    try:
        data = mem.read_phys(addr, size)
    except MemoryReadError:
        return None
    return data if len(data) == size else None


def _cstring(mem: PhysMemory, addr: int, limit: int = MAX_PDB_NAME) -> Optional[str]:
    data = _read(mem, addr, limit)
    if data is None:
        # near the end of readable memory: shorten once to the page end
        data = _read(mem, addr, PAGE - (addr % PAGE))
        if data is None:
            return None
    end = data.find(b"\0")
    if end <= 0:
        return None
    return data[:end].decode("utf-8", "replace")


def _pdb_name(mem: PhysMemory, rva_base: int, debug_rva: int, debug_size: int) -> Optional[str]:
    """The file name of the first CodeView record in the debug directory."""
    if not debug_rva or not debug_size:
        return None
    for i in range(min(debug_size // DEBUG_ENTRY_SIZE, 16)):
        entry = _read(mem, rva_base + debug_rva + i * DEBUG_ENTRY_SIZE, DEBUG_ENTRY_SIZE)
        if entry is None:
            return None
        dtype, dsize, draw_rva = struct.unpack_from("<III", entry, 12)
        if dtype != DEBUG_TYPE_CODEVIEW or not draw_rva:
            continue
        sig = _read(mem, rva_base + draw_rva, 4)
        offset = CODEVIEW_NAME_OFFSET.get(sig) if sig else None
        if offset is None:
            continue
        return _cstring(mem, rva_base + draw_rva + offset)
    return None


def parse_image(mem: PhysMemory, base: int) -> Optional[PeImage]:
    """The PE32(+) or TE image whose header starts at ``base``, or None."""
    magic = _read(mem, base, 2)
    if magic == DOS_MAGIC:
        raw = _read(mem, base + E_LFANEW_OFFSET, 4)
        if raw is None:
            return None
        lfanew = int.from_bytes(raw, "little") & 0xFFFF   # as EDK2 reads it
        nt = base + lfanew
        head = _read(mem, nt, 4 + 20 + 2)
        if head is None or head[:4] != PE_SIGNATURE:
            return None
        machine, = struct.unpack_from("<H", head, 4)
        opt_size, = struct.unpack_from("<H", head, 4 + 16)
        opt = nt + 24
        opt_magic, = struct.unpack_from("<H", head, 24)
        if opt_magic == OPT_MAGIC_PE32_PLUS:
            layout, kind, dirs_at, count_at = "<Q", "PE32+", 112, 108
            image_base_at = 24
        elif opt_magic == OPT_MAGIC_PE32:
            layout, kind, dirs_at, count_at = "<I", "PE32", 96, 92
            image_base_at = 28
        else:
            return None
        body = _read(mem, opt, min(opt_size, dirs_at + 16 * 8))
        if body is None or len(body) < dirs_at:
            return None
        entry_rva, = struct.unpack_from("<I", body, 16)
        linked_base, = struct.unpack_from(layout, body, image_base_at)
        size_of_image, = struct.unpack_from("<I", body, 56)
        count, = struct.unpack_from("<I", body, count_at)
        debug_rva = debug_size = 0
        at = dirs_at + DEBUG_DIRECTORY_INDEX * 8
        if count > DEBUG_DIRECTORY_INDEX and len(body) >= at + 8:
            debug_rva, debug_size = struct.unpack_from("<II", body, at)
        return PeImage(base, kind, MACHINES.get(machine, f"{machine:#x}"), size_of_image,
                       base + entry_rva, linked_base, _pdb_name(mem, base, debug_rva, debug_size))
    if magic == TE_MAGIC:
        te = _read(mem, base, TE_HEADER_SIZE)
        if te is None:
            return None
        machine, _nsec, _subsys, stripped, entry_rva, _code, linked_base = struct.unpack_from(
            "<HBBHIIQ", te, 2)
        debug_rva, debug_size = struct.unpack_from("<II", te, 32)
        # A TE image's RVAs count from where the stripped PE header would have begun.
        rva_base = base + TE_HEADER_SIZE - stripped
        return PeImage(base, "TE", MACHINES.get(machine, f"{machine:#x}"), None,
                       rva_base + entry_rva, linked_base,
                       _pdb_name(mem, rva_base, debug_rva, debug_size))
    return None


def _candidates(data: bytes, lo: int, highest: int, align: int):
    """Starts of "MZ"/"VZ" in data (at PA lo), aligned and <= highest, highest first."""
    found = []
    for magic in (DOS_MAGIC, TE_MAGIC):
        i = data.find(magic)
        while i >= 0:
            if (lo + i) % align == 0 and lo + i <= highest:
                found.append(lo + i)
            i = data.find(magic, i + 1)
    return sorted(found, reverse=True)


def search_image_base(mem: PhysMemory, address: int,
                      search_bytes: int = DEFAULT_SEARCH_BYTES,
                      align: int = FIRMWARE_SEARCH_ALIGN) -> Optional[PeImage]:
    """The first valid PE/TE header at or below ``address`` on an ``align`` boundary,
    within ``search_bytes``, as EDK2's PeCoffSearchImageBase finds it (its dump prints
    this image's base and entry point even when ``address`` lies past the image's end).
    None if there is none, or the search meets unreadable memory first.

    Memory is read in 64 KiB chunks and scanned with bytes.find, so the firmware's
    4-byte steps cost no more reads than page steps."""
    cur = address - address % align
    lowest = max(0, address - search_bytes)
    hi = cur + len(DOS_MAGIC)
    while hi > lowest:
        lo = max(lowest, hi - SEARCH_CHUNK)
        data = _read(mem, lo, hi - lo)
        last = data is None
        if last:
            lo, data = _readable_tail(mem, lo, hi)
        for start in _candidates(data, lo, cur, align):
            image = parse_image(mem, start)
            if image is not None:
                return image
        if last or lo == lowest:
            return None   # unreadable memory below, or the bound: the search ends there
        hi = lo + 1   # the next chunk ends one byte into this one: no magic is cut in two
    return None


def _readable_tail(mem: PhysMemory, lo: int, hi: int) -> Tuple[int, bytes]:
    """The readable top of [lo, hi), page by page downwards: (its start, its bytes)."""
    data = b""
    top = hi
    while top > lo:
        start = max(lo, (top - 1) - (top - 1) % PAGE)
        chunk = _read(mem, start, top - start)
        if chunk is None:
            break
        data = chunk + data
        top = start
    return top, data


def find_image(mem: PhysMemory, address: int, search_bytes: int = DEFAULT_SEARCH_BYTES,
               align: int = FIRMWARE_SEARCH_ALIGN) -> Optional[PeImage]:
    """The image ``address`` lies in: ``search_image_base``'s, if its SizeOfImage
    covers ``address`` (a TE header has no size: believed)."""
    image = search_image_base(mem, address, search_bytes, align)
    return image if image is not None and image.contains(address) else None
