"""The Xen symbol model: symbols, layout and link-time bytes of a Xen image.

Loaded from ``xen-syms`` (the ELF with symbols shipped in the debug package)
with pyelftools, or from an nm-format ``.map`` file (``xen-syms-*.map``,
``xen-*.efi.map``).  Never imports ``gdb``.

Every number comes from the file: ``XEN_VIRT_START``, the image bounds, the
page tables' addresses and link-time contents, the multiboot2 header.  The few
Xen facts that are *not* in the file (which symbols are the boot page tables,
their levels and page counts, the 2 MiB image offset used only when a map has
no ``__image_base__``) live in the "Xen facts" block below and nowhere else.

Arithmetic (see the reference notes):

* ``offset(S) = S - XEN_VIRT_START`` ("sym_offs"): from ``__image_base__``,
  *not* from ``_start`` (which sits 2 MiB higher).
* ``B`` (load base, ``xen_phys_start``) = PA(``__image_base__``) =
  PA(``_start``) - offset(``_start``); for S in [_start, _end):
  PA(S) = B + offset(S).

Parsing xen-syms with pyelftools takes a few hundred milliseconds, so the
parsed result is cached as JSON under ``CACHE_DIR/syms`` (keyed by the
resolved path, size and mtime_ns) and in-process.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

from gdbext import paths
from gdbext.core.errors import GdbextError
from gdbext.core.xenefi import EFI_BUILD_ID_SECTION, codeview_build_id
from gdbext.core.multiboot2 import (MB2_LOAD_PREFERENCE_LOW, MB2_SEARCH_BYTES, Multiboot2Header,
                                     header_in_image)

# ---------------------------------------------------------------------------
# Xen facts that are not in the file (the single home for them)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BootTable:
    """A statically allocated page table of Xen's early boot (x86-64)."""

    name: str
    level: int  # 4 = L4 (PML4) ... 1 = L1 (PT)
    pages: int  # number of 4 KiB pages (entries = 512 * pages)
    note: str = ""


# In xen/arch/x86/boot/x86_64.S and head.S (4.17).  Addresses and contents come
# from the file; these are only the names, levels and sizes.
BOOT_TABLES: Tuple[BootTable, ...] = (
    BootTable("idle_pg_table", 4, 1, "root L4; CR3 once Xen runs"),
    BootTable("l3_xenmap", 3, 1, "L4 slot of XEN_VIRT_START"),
    BootTable("l2_xenmap", 2, 1, "Xen image, 2 MiB pages"),
    BootTable("l2_fixmap", 2, 1, "fixmap"),
    BootTable("l3_directmap", 3, 1, "directmap L4 slot"),
    BootTable("l2_directmap", 2, 4, "first 4 GiB of the directmap"),
    BootTable("l1_directmap", 1, 1, "PA 0-2 MiB, absolute entries, never relocated"),
    BootTable("l3_bootmap", 3, 1, "identity map used to enter long mode"),
    BootTable("l2_bootmap", 2, 4, "identity map used to enter long mode"),
    BootTable("l1_bootmap", 1, 1, "identity map used to enter long mode"),
    BootTable("l1_fixmap", 1, 1, "in .bss"),
    BootTable("l1_fixmap_x", 1, 1, "in .bss"),
)

# Symbols whose value is XEN_VIRT_START, in order of preference.
VIRT_START_SYMBOLS: Tuple[str, ...] = ("__XEN_VIRT_START", "__image_base__")
IMAGE_START_SYMBOL = "_start"
IMAGE_END_SYMBOL = "_end"
PAGE_TABLES_START_SYMBOL = "__page_tables_start"
PAGE_TABLES_END_SYMBOL = "__page_tables_end"
XEN_PHYS_START_SYMBOL = "xen_phys_start"  # u64 holding B once trampoline_setup ran

# What GRUB loads is xen.gz, an ELF32 made by mkelf32 from xen-syms with the
# same bytes at the same paddr (0x200000) but one PT_LOAD ending at this
# symbol (xen/arch/x86/Makefile passes it as final_exec_addr), not at _end.
LOADED_END_SYMBOL = "__2M_rwdata_end"

# XEN_IMG_OFFSET (asm/config.h): _start - __image_base__.  Used only for a .map
# that lacks __image_base__ (xen.efi's map: the PE ImageBase is not a symbol).
XEN_IMG_OFFSET = 0x200000

# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


class XenSymsError(GdbextError):
    """A Xen symbol file could not be used (one line, names the path)."""


class UnknownSymbolError(GdbextError):
    """No symbol of that name."""


class AmbiguousSymbolError(GdbextError):
    """Several local symbols share the name; qualify it as FILE#NAME."""

    def __init__(self, name: str, candidates: Sequence[str]):
        self.name = name
        self.candidates = tuple(candidates)
        shown = ", ".join(self.candidates[:4])
        more = f", ... ({len(self.candidates)} in all)" if len(self.candidates) > 4 else ""
        hint = "use the address" if "#" in name else "qualify it as FILE#NAME"
        super().__init__(f"symbol {name!r} is ambiguous ({shown}{more}); {hint}")


# ---------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class XenSymbol:
    """One symbol.  ``name`` is the plain name; ``file`` is set for locals."""

    name: str
    value: int
    type: str  # nm letter: T t D d B b R r A W ...
    size: Optional[int] = None  # None when unknown (.map files)
    file: Optional[str] = None  # source file of a local symbol (STT_FILE)

    @property
    def qualname(self) -> str:
        """The name as Xen's .map writes it: ``file#name`` for locals."""
        return f"{self.file}#{self.name}" if self.file else self.name

    @property
    def is_local(self) -> bool:
        return self.type.islower()

    @property
    def is_absolute(self) -> bool:
        return self.type in "Aa"


@dataclass(frozen=True)
class Segment:
    """A PT_LOAD program header."""

    vaddr: int
    paddr: int
    filesz: int
    memsz: int
    offset: int
    flags: int


@dataclass(frozen=True)
class Section:
    name: str
    addr: int
    size: int
    offset: int
    type: str  # SHT_PROGBITS, SHT_NOBITS, ...
    flags: int


SymbolOrVA = Union[str, int]

# ---------------------------------------------------------------------------
# The common symbol table (ELF and .map)
# ---------------------------------------------------------------------------


def _rank(sym: XenSymbol) -> Tuple[int, int, int, str]:
    """Sort key: which of several symbols at one address names it best.

    Sized objects/functions before zero-size markers (l2_directmap, not
    __page_tables_start), globals before locals, fewer leading underscores.
    """
    sized = 0 if (sym.size or 0) > 0 else 1
    local = 1 if sym.is_local else 0
    unders = len(sym.name) - len(sym.name.lstrip("_"))
    return (sized, local, unders, sym.name)


class _SymbolTable:
    """Name and address lookup shared by XenSymbols and XenMapSymbols."""

    path: Path
    build_id: Optional[bytes] = None
    version: Optional[str] = None
    virt_start: int
    virt_start_source: str  # the symbol (or rule) it came from

    def _init_symbols(self, symbols: Sequence[XenSymbol]) -> None:
        self._symlist: Tuple[XenSymbol, ...] = tuple(symbols)
        # qualname -> symbol (globals are unqualified, like Xen's .map)
        self.symbols: Dict[str, XenSymbol] = {}
        # plain name -> every symbol of that name
        self.by_name: Dict[str, List[XenSymbol]] = {}
        # qualnames defined twice (same static name twice in one file): ambiguous
        self._dup_qualnames: Dict[str, List[XenSymbol]] = {}
        for s in self._symlist:
            first = self.symbols.setdefault(s.qualname, s)
            if first is not s:
                self._dup_qualnames.setdefault(s.qualname, [first]).append(s)
            self.by_name.setdefault(s.name, []).append(s)

        for n in (IMAGE_START_SYMBOL, IMAGE_END_SYMBOL):
            if n not in self.symbols:
                raise XenSymsError(
                    f"{self.path}: not a Xen image (no {n} symbol); "
                    f"pass xen-syms or its .map, e.g. {paths.XEN_DEBIAN_SYMS}"
                )
        self.image_start: int = self.symbols[IMAGE_START_SYMBOL].value
        self.image_end: int = self.symbols[IMAGE_END_SYMBOL].value
        pts = self.symbols.get(PAGE_TABLES_START_SYMBOL)
        pte = self.symbols.get(PAGE_TABLES_END_SYMBOL)
        self.page_tables_start: Optional[int] = pts.value if pts else None
        self.page_tables_end: Optional[int] = pte.value if pte else None

        # Address index: best-named symbol per address inside the image.
        best: Dict[int, XenSymbol] = {}
        for s in self._symlist:
            if s.is_absolute or not (self.image_start <= s.value < self.image_end):
                continue
            cur = best.get(s.value)
            if cur is None or _rank(s) < _rank(cur):
                best[s.value] = s
        self._addrs: List[int] = sorted(best)
        self._addr_syms: List[XenSymbol] = [best[a] for a in self._addrs]

    # -- names --------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._symlist)

    def __iter__(self) -> Iterator[XenSymbol]:
        return iter(self._symlist)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (name in self.symbols or name in self.by_name)

    def find(self, name: str) -> List[XenSymbol]:
        """Every symbol matching ``name`` (a plain or FILE#NAME name)."""
        if "#" in name and name in self.symbols:
            return list(self._dup_qualnames.get(name, [self.symbols[name]]))
        return list(self.by_name.get(name, ()))

    def lookup(self, name: str) -> XenSymbol:
        """The one symbol called ``name``.

        ``name`` may be qualified (``common/kernel.c#version``).  A plain name
        that is a global wins over locals of the same name (as the linker
        resolves it); several locals and no global raise AmbiguousSymbolError.
        """
        s = self.symbols.get(name)
        if s is not None:
            dups = self._dup_qualnames.get(name)
            if dups:
                raise AmbiguousSymbolError(name, [f"{d.qualname}@{d.value:#x}" for d in dups])
            return s
        cands = self.by_name.get(name)
        if not cands:
            raise UnknownSymbolError(f"no symbol {name!r} in {self.path}")
        if len(cands) > 1:
            raise AmbiguousSymbolError(name, [c.qualname for c in cands])
        return cands[0]

    def get(self, name: str) -> Optional[XenSymbol]:
        """Like lookup() but None for an unknown name (ambiguity still raises)."""
        try:
            return self.lookup(name)
        except UnknownSymbolError:
            return None

    def linked_va(self, name: str) -> int:
        """The symbol's link-time virtual address."""
        return self.lookup(name).value

    def _va(self, name_or_va: SymbolOrVA) -> int:
        if isinstance(name_or_va, int):
            return name_or_va
        return self.linked_va(name_or_va)

    def offset(self, name_or_va: SymbolOrVA) -> int:
        """Xen's sym_offs: VA - XEN_VIRT_START (from __image_base__, not _start).

        At run time before paging is Xen's own: PA = B + offset.
        """
        return self._va(name_or_va) - self.virt_start

    def va_from_offset(self, off: int) -> int:
        return self.virt_start + off

    def in_image(self, va: int) -> bool:
        return self.image_start <= va < self.image_end

    def symbol_at(self, va: int) -> Optional[Tuple[str, int]]:
        """(qualname, delta) of the nearest symbol at or below ``va``.

        None outside [_start, _end).  Absolute symbols are not addresses.
        """
        if not self.in_image(va):
            return None
        i = bisect.bisect_right(self._addrs, va) - 1
        if i < 0:
            return None
        s = self._addr_syms[i]
        return s.qualname, va - s.value

    def describe(self, va: int) -> str:
        """``name+0x12`` or the hex address."""
        hit = self.symbol_at(va)
        if hit is None:
            return f"{va:#x}"
        name, delta = hit
        return f"{name}+{delta:#x}" if delta else name

    # -- Xen layout ----------------------------------------------------------

    @property
    def image_offset(self) -> int:
        """offset(_start): 2 MiB in every x86 Xen; derived from the symbols."""
        return self.image_start - self.virt_start

    def boot_tables(self) -> List[Tuple[BootTable, XenSymbol]]:
        """The boot page tables present in this image, with their symbols."""
        out = []
        for t in BOOT_TABLES:
            s = self.get(t.name)
            if s is not None:
                out.append((t, s))
        return out

    def pa(self, name_or_va: SymbolOrVA, load_base: int) -> int:
        """PA of an image address once loaded at base B (= PA(__image_base__))."""
        va = self._va(name_or_va)
        if not self.in_image(va):
            raise GdbextError(
                f"{va:#x} is outside Xen's image [{self.image_start:#x}, {self.image_end:#x})"
            )
        return load_base + self.offset(va)


# ---------------------------------------------------------------------------
# ELF: xen-syms
# ---------------------------------------------------------------------------

SHF_WRITE = 0x1
SHF_ALLOC = 0x2
SHF_EXECINSTR = 0x4


def _nm_letter(
    bind: str, stype: str, shndx: Union[int, str], sections: Sequence[Tuple[str, int]]
) -> str:
    """The type letter nm(1) prints for an ELF symbol."""
    if shndx == "SHN_UNDEF":
        return "w" if bind == "STB_WEAK" else "U"
    if bind == "STB_WEAK":
        return "V" if stype == "STT_OBJECT" else "W"
    if shndx == "SHN_ABS":
        c = "a"
    elif shndx == "SHN_COMMON":
        c = "c"
    elif isinstance(shndx, int) and 0 < shndx < len(sections):
        shtype, flags = sections[shndx]
        if flags & SHF_EXECINSTR:
            c = "t"
        elif shtype == "SHT_NOBITS":
            c = "b"
        elif not flags & SHF_ALLOC:
            c = "n"
        elif flags & SHF_WRITE:
            c = "d"
        else:
            c = "r"
    else:
        c = "?"
    return c if bind == "STB_LOCAL" else c.upper()


_CACHE_FORMAT = 1


class XenSymbols(_SymbolTable):
    """Symbols, layout and link-time bytes of a xen-syms ELF.

    Attributes: ``path``, ``build_id`` (bytes or None), ``version`` (str or
    None), ``symbols`` (qualname -> XenSymbol), ``by_name`` (plain name ->
    [XenSymbol]), ``virt_start``, ``virt_start_source``, ``image_start``,
    ``image_end``, ``page_tables_start``, ``page_tables_end``, ``segments``
    (PT_LOAD), ``sections``, ``loaded_from_cache``.
    """

    def __init__(
        self,
        path: Path,
        symbols: Sequence[XenSymbol],
        segments: Sequence[Segment],
        sections: Sequence[Section],
        build_id: Optional[bytes],
        version_info: Optional[Dict[str, str]] = None,
    ):
        self.path = Path(path)
        self.segments: Tuple[Segment, ...] = tuple(segments)
        self.sections: Tuple[Section, ...] = tuple(sections)
        self.build_id = build_id
        self.loaded_from_cache = False
        self._seg_data: Optional[List[bytes]] = None
        self._mb2: Optional[Multiboot2Header] = None
        self._mb2_done = False
        names = {s.qualname for s in symbols}
        missing = [n for n in (IMAGE_START_SYMBOL, IMAGE_END_SYMBOL) if n not in names]
        # xen.efi's ELF twin (xen-*.efi.elf) has no __image_base__ (the PE ImageBase is not
        # a symbol) but the PE's .buildid section: XEN_VIRT_START = _start - XEN_IMG_OFFSET,
        # as for xen.efi's .map. Its layout is xen.efi's (the firmware's PE loader places
        # it), not xen-syms'.
        self.efi_layout = any(sec.name == EFI_BUILD_ID_SECTION for sec in self.sections)
        if not any(n in names for n in VIRT_START_SYMBOLS) and not self.efi_layout:
            missing.insert(0, VIRT_START_SYMBOLS[-1])
        if missing:
            raise XenSymsError(
                f"{self.path} is an ELF file but not a Xen image (no {', '.join(missing)}); "
                f"pass xen-syms from the Xen debug package, e.g. {paths.XEN_DEBIAN_SYMS}"
            )
        self._init_symbols(symbols)
        for n in VIRT_START_SYMBOLS:
            if n in self.symbols:
                self.virt_start = self.symbols[n].value
                self.virt_start_source = n
                break
        else:
            self.virt_start = self.image_start - XEN_IMG_OFFSET
            self.virt_start_source = f"{IMAGE_START_SYMBOL} - XEN_IMG_OFFSET"
        # version: "4.17.7" as Xen prints it; version_info: the pieces, e.g.
        # compile_system_version "4.17.7+13-g2445b30a44-0+deb12u1" (Debian).
        self.version_info: Dict[str, str] = (
            self._find_version_info() if version_info is None else dict(version_info)
        )
        self.version = self._version_from_info(self.version_info)

    # -- construction ----------------------------------------------------------

    @classmethod
    def from_elf(cls, path: Union[str, Path]) -> "XenSymbols":
        """Parse with pyelftools (slow path; see load_xen_syms for the cache)."""
        try:
            from elftools.common.exceptions import ELFError
            from elftools.elf.elffile import ELFFile
            from elftools.elf.sections import SymbolTableSection
        except ImportError:
            raise XenSymsError(
                f"{path}: pyelftools is not installed in GDB's Python; run scripts/setup "
                "or pass the .map file instead"
            ) from None

        path = Path(path)
        try:
            with open(path, "rb") as f:
                elf = ELFFile(f)
                if elf["e_machine"] == "EM_386" and elf.elfclass == 32:
                    raise XenSymsError(
                        f"{path} is a 32-bit ELF (the decompressed xen.gz?), not xen-syms; "
                        f"pass xen-syms from the Xen debug package, e.g. {paths.XEN_DEBIAN_SYMS}"
                    )
                if elf["e_machine"] != "EM_X86_64" or elf.elfclass != 64:
                    raise XenSymsError(
                        f"{path} is an ELF file but not an x86-64 Xen image "
                        f"({elf['e_machine']}, ELF{elf.elfclass}); pass xen-syms, e.g. {paths.XEN_DEBIAN_SYMS}"
                    )
                segments = []
                build_id = None
                for seg in elf.iter_segments():
                    if seg["p_type"] == "PT_LOAD":
                        segments.append(
                            Segment(
                                seg["p_vaddr"], seg["p_paddr"], seg["p_filesz"],
                                seg["p_memsz"], seg["p_offset"], seg["p_flags"],
                            )
                        )
                    elif seg["p_type"] == "PT_NOTE" and build_id is None:
                        build_id = _build_id_from_notes(seg.iter_notes())
                sections = []
                shinfo: List[Tuple[str, int]] = []
                symtab = None
                for sec in elf.iter_sections():
                    shinfo.append((sec["sh_type"], sec["sh_flags"]))
                    sections.append(
                        Section(sec.name, sec["sh_addr"], sec["sh_size"], sec["sh_offset"],
                                sec["sh_type"], sec["sh_flags"])
                    )
                    if build_id is None and sec["sh_type"] == "SHT_NOTE":
                        build_id = _build_id_from_notes(sec.iter_notes())
                    if build_id is None and sec.name == EFI_BUILD_ID_SECTION:
                        build_id = codeview_build_id(sec.data())  # xen.efi's ELF twin
                    if isinstance(sec, SymbolTableSection) and (
                        symtab is None or sec.name == ".symtab"
                    ):
                        symtab = sec
                if symtab is None:
                    raise XenSymsError(
                        f"{path} is an ELF file without symbols (stripped, or xen.gz's ELF); "
                        f"pass xen-syms from the Xen debug package, e.g. {paths.XEN_DEBIAN_SYMS}"
                    )
                symbols = []
                cur_file: Optional[str] = None
                for sym in symtab.iter_symbols():
                    info = sym["st_info"]
                    stype = info["type"]
                    if stype == "STT_FILE":
                        cur_file = sym.name or None
                        continue
                    if stype == "STT_SECTION" or not sym.name:
                        continue
                    bind = info["bind"]
                    letter = _nm_letter(bind, stype, sym["st_shndx"], shinfo)
                    symbols.append(
                        XenSymbol(
                            sym.name, sym["st_value"], letter, sym["st_size"],
                            cur_file if bind == "STB_LOCAL" else None,
                        )
                    )
        except ELFError as e:
            raise XenSymsError(f"{path}: corrupt ELF file ({e}); pass xen-syms, e.g. {paths.XEN_DEBIAN_SYMS}") from None
        except OSError as e:
            raise XenSymsError(f"{path}: cannot read ({e.strerror or e})") from None
        return cls(path, symbols, segments, sections, build_id)

    def _to_json(self) -> dict:
        return {
            "symbols": [[s.name, s.value, s.type, s.size, s.file] for s in self._symlist],
            "segments": [list(_astuple(s)) for s in self.segments],
            "sections": [list(_astuple(s)) for s in self.sections],
            "build_id": self.build_id.hex() if self.build_id is not None else None,
            "version_info": self.version_info,
        }

    @classmethod
    def _from_json(cls, path: Path, d: dict) -> "XenSymbols":
        syms = [XenSymbol(n, v, t, sz, f) for n, v, t, sz, f in d["symbols"]]
        self = cls(
            path,
            syms,
            [Segment(*s) for s in d["segments"]],
            [Section(*s) for s in d["sections"]],
            bytes.fromhex(d["build_id"]) if d["build_id"] is not None else None,
            d["version_info"],
        )
        self.loaded_from_cache = True
        return self

    # -- link-time bytes ---------------------------------------------------------

    @property
    def build_id_hex(self) -> Optional[str]:
        return self.build_id.hex() if self.build_id is not None else None

    def _segment_bytes(self) -> List[bytes]:
        if self._seg_data is None:
            data = []
            try:
                with open(self.path, "rb") as f:
                    for seg in self.segments:
                        f.seek(seg.offset)
                        b = f.read(seg.filesz)
                        if len(b) != seg.filesz:
                            raise XenSymsError(f"{self.path}: truncated (segment at file offset {seg.offset:#x})")
                        data.append(b)
            except OSError as e:
                raise XenSymsError(f"{self.path}: cannot read ({e.strerror or e})") from None
            self._seg_data = data
        return self._seg_data

    def read_linked(self, va: int, size: int) -> bytes:
        """Bytes at [va, va+size) as the ELF lays them out at link time.

        From the PT_LOAD file contents; zeros in the memsz > filesz tail (.bss).
        Raises GdbextError for addresses outside every PT_LOAD.
        """
        if size < 0:
            raise GdbextError(f"negative size {size}")
        out = bytearray()
        data = self._segment_bytes()
        cur, end = va, va + size
        while cur < end:
            for seg, b in zip(self.segments, data):
                if seg.vaddr <= cur < seg.vaddr + seg.memsz:
                    stop = min(end, seg.vaddr + seg.memsz)
                    lo, hi = cur - seg.vaddr, stop - seg.vaddr
                    chunk = b[lo:min(hi, seg.filesz)]
                    out += chunk
                    out += bytes((hi - lo) - len(chunk))
                    cur = stop
                    break
            else:
                raise GdbextError(
                    f"{cur:#x} is not in Xen's loaded image (PT_LOAD segments of {self.path.name})"
                )
        return bytes(out)

    def read_u64(self, name_or_va: SymbolOrVA) -> int:
        return struct.unpack("<Q", self.read_linked(self._va(name_or_va), 8))[0]

    def link_qwords(self, name_or_va: SymbolOrVA, count: int = 512) -> List[int]:
        """``count`` little-endian u64s at a symbol: a page table as stored in the image.

        These are link-time values (they assume B = 0), e.g. the 4.17
        idle_pg_table[261] == 0x46d063.
        """
        va = self._va(name_or_va)
        return list(struct.unpack(f"<{count}Q", self.read_linked(va, 8 * count)))

    def segment_for(self, va: int) -> Optional[Segment]:
        for seg in self.segments:
            if seg.vaddr <= va < seg.vaddr + seg.memsz:
                return seg
        return None

    def section_for(self, va: int) -> Optional[Section]:
        """The allocated ELF section holding ``va`` (the crash report and the
        position-independence check name unnamed data by it)."""
        for sec in self.sections:
            if sec.flags & SHF_ALLOC and sec.addr <= va < sec.addr + sec.size:
                return sec
        return None

    def link_pa(self, name_or_va: SymbolOrVA) -> int:
        """The link-time physical address (p_paddr space) of an image address."""
        va = self._va(name_or_va)
        seg = self.segment_for(va)
        if seg is None:
            raise GdbextError(f"{va:#x} is not in Xen's loaded image")
        return seg.paddr + (va - seg.vaddr)

    # -- multiboot2 ------------------------------------------------------------

    @property
    def multiboot2(self) -> Optional[Multiboot2Header]:
        """The multiboot2 header (None if the image has none)."""
        if not self._mb2_done:
            # Spec: 8-byte aligned, wholly inside the first 32 KiB of the OS image.
            # GRUB searches the file it loads (xen.gz's ELF); here the image is the
            # loaded image, i.e. the bytes from _start.
            window = min(MB2_SEARCH_BYTES, self.image_end - self.image_start)
            self._mb2 = header_in_image(self.read_linked(self.image_start, window),
                                        self.image_start)
            self._mb2_done = True
        return self._mb2

    def load_size(self) -> int:
        """Bytes a multiboot2 loader allocates for the image, from PA(_start).

        xen.gz's PT_LOAD (mkelf32) spans [_start, __2M_rwdata_end) (0x3a7000
        in 4.17); without that symbol, the xen-syms PT_LOADs' extent
        max(p_paddr + p_memsz) - min(p_paddr) (0x3a6140, ends at _end).
        """
        end = self.symbols.get(LOADED_END_SYMBOL)
        if end is not None and end.value >= self.image_end:
            return end.value - self.image_start
        lo = min(s.paddr for s in self.segments)
        hi = max(s.paddr + s.memsz for s in self.segments)
        return hi - lo

    def load_base_candidates(self, ram_top: int, load_size: Optional[int] = None) -> List[int]:
        """The load bases B a multiboot2 loader (GRUB) may choose, best first.

        Reasoning (GRUB's multiboot_elfxx.c and relocator.h; Xen's head.S):

        * GRUB loads xen.gz (an ELF32 with one PT_LOAD whose paddr is
          link_pa(_start) = 0x200000 and whose bytes equal xen-syms').  It
          allocates one chunk: link_base = min(p_paddr) = link_pa(_start),
          load_size = max(p_paddr + p_memsz) - link_base, which for xen.gz
          is __2M_rwdata_end - _start (see load_size(); pass ``load_size`` to
          override).  It calls
          grub_relocator_alloc_chunk_align_safe(min_addr, max_addr, load_size,
          align, preference), which searches chunk starts S in
          [min_addr, max_addr - load_size], S % align == 0.
          So min/max/align constrain S = the loaded image start = PA(_start),
          and max_addr bounds the chunk's *end*.  Xen's own tag agrees: its
          min is sym_offs(start), i.e. "PA(_start) >= 2 MiB".
        * Each segment lands at S + (p_paddr - link_base), so PA(_start) = S
          and B = PA(__image_base__) = PA(_start) - offset(_start) = S - 2 MiB.
        * The chunk must also be in RAM: S + load_size <= ram_top.
        * The EFI entry GRUB jumps to is efi64_entry + (S - link_base) = B +
          offset(__efi64_mb2_start).

        Order follows the tag's preference: HIGH (Xen's) and NONE give the
        highest first, LOW the lowest first.  The real choice also depends on
        which memory the firmware left free; this is the candidate set.
        Without a relocatable tag the only candidate is the link-time base.
        """
        # xen.gz's single PT_LOAD starts at _start, so S = PA(_start).
        link_base = self.link_pa(self.image_start)
        size = self.load_size() if load_size is None else load_size
        to_b = -self.image_offset  # B = S - offset(_start)
        hdr = self.multiboot2
        reloc = hdr.relocatable if hdr is not None else None
        if reloc is None:
            b = link_base + to_b
            return [b] if link_base + size <= ram_top else []
        align = reloc.align or 1
        lo = reloc.min_addr
        hi = min(reloc.max_addr, ram_top) - size  # highest allowed S
        if hi < lo:
            return []
        first = -(-lo // align) * align
        last = (hi // align) * align
        if last < first:
            return []
        starts = range(first, last + 1, align)
        if reloc.preference != MB2_LOAD_PREFERENCE_LOW:
            starts = reversed(starts)
        return [s + to_b for s in starts]

    # -- version -------------------------------------------------------------------

    def _find_version_info(self) -> Dict[str, str]:
        """Best effort: decode xen_*_version() and friends (tiny leaf functions)."""
        info: Dict[str, str] = {}
        for key, func in _VERSION_FUNCS:
            try:
                if key in ("major", "minor"):
                    v = self._decode_mov_eax(func)
                    val = None if v is None else str(v)
                else:
                    val = self._decode_lea_string(func)
            except (GdbextError, struct.error, UnicodeDecodeError):
                val = None
            if val is not None:
                info[key] = val
        return info

    @staticmethod
    def _version_from_info(info: Dict[str, str]) -> Optional[str]:
        if "major" not in info or "minor" not in info:
            return None
        return f"{info['major']}.{info['minor']}{info.get('extra', '')}"

    def _func_bytes(self, name: str, n: int = 16) -> Optional[Tuple[int, bytes]]:
        s = self.get(name)
        if s is None or not self.in_image(s.value):
            return None
        return s.value, self.read_linked(s.value, n)

    def _decode_mov_eax(self, name: str) -> Optional[int]:
        fb = self._func_bytes(name)
        if fb is None:
            return None
        _, b = fb
        if b[0] == 0xB8:  # mov $imm32, %eax
            return struct.unpack_from("<I", b, 1)[0]
        if b[:2] == b"\x31\xc0":  # xor %eax, %eax
            return 0
        return None

    def _decode_lea_string(self, name: str) -> Optional[str]:
        fb = self._func_bytes(name)
        if fb is None:
            return None
        va, b = fb
        if b[:3] != b"\x48\x8d\x05":  # lea rel32(%rip), %rax
            return None
        target = va + 7 + struct.unpack_from("<i", b, 3)[0]
        raw = self.read_linked(target, 128)
        return raw.split(b"\0", 1)[0].decode("ascii")


# Leaf functions of xen/common/version.c whose bodies give the version:
# mov $imm32,%eax (major, minor) or lea str(%rip),%rax (the strings).
_VERSION_FUNCS: Tuple[Tuple[str, str], ...] = (
    ("major", "xen_major_version"),
    ("minor", "xen_minor_version"),
    ("extra", "xen_extra_version"),
    ("changeset", "xen_changeset"),
    ("compile_system_version", "xen_compile_system_version"),
    ("compile_date", "xen_compile_date"),
    ("compiler", "xen_compiler"),
)


def _astuple(obj) -> tuple:
    return tuple(getattr(obj, f) for f in obj.__dataclass_fields__)


def _build_id_from_notes(notes) -> Optional[bytes]:
    for note in notes:
        if note["n_type"] == "NT_GNU_BUILD_ID" and note["n_name"] == "GNU":
            desc = note["n_desc"]
            return bytes.fromhex(desc) if isinstance(desc, str) else bytes(desc)
    return None


# ---------------------------------------------------------------------------
# nm-format .map files
# ---------------------------------------------------------------------------

_MAP_LINE = re.compile(
    r"^\s*(?:0x)?([0-9a-fA-F]+)\s+(?:(?:0x)?([0-9a-fA-F]+)\s+)?([A-Za-z?])\s+(\S+)\s*$"
)


class XenMapSymbols(_SymbolTable):
    """Symbols from an nm-format map (``0xffff82d040200000 T _start``).

    Same lookup interface as XenSymbols; no build id, no bytes.  Xen's maps
    write locals as ``file#name``.  xen.efi's map has no __image_base__ (the
    PE ImageBase is not a symbol): then virt_start is ``_start -
    XEN_IMG_OFFSET`` unless given.
    """

    build_id = None
    version = None
    version_info: Dict[str, str] = {}
    segments: Tuple[Segment, ...] = ()
    sections: Tuple[Section, ...] = ()
    loaded_from_cache = False

    def __init__(self, path: Path, symbols: Sequence[XenSymbol], virt_start: Optional[int] = None):
        self.path = Path(path)
        self._init_symbols(symbols)
        if virt_start is not None:
            self.virt_start, self.virt_start_source = virt_start, "given"
        else:
            for n in VIRT_START_SYMBOLS:
                if n in self.symbols:
                    self.virt_start, self.virt_start_source = self.symbols[n].value, n
                    break
            else:
                self.virt_start = self.image_start - XEN_IMG_OFFSET
                self.virt_start_source = f"{IMAGE_START_SYMBOL} - XEN_IMG_OFFSET"
        # Only xen.efi's map lacks __image_base__ (its ImageBase is no symbol).
        self.efi_layout = not any(n in self.symbols for n in VIRT_START_SYMBOLS)


def _parse_map_text(path: Path, text: str) -> List[XenSymbol]:
    syms = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = _MAP_LINE.match(line)
        if m is None:
            raise XenSymsError(
                f"{path}: line {lineno} is not nm format ('ADDR TYPE NAME'); "
                f"pass xen-syms or its .map, e.g. {paths.XEN_DEBIAN_SYMS}"
            )
        addr, size, letter, qual = m.groups()
        file_, sep, name = qual.rpartition("#")
        syms.append(
            XenSymbol(name, int(addr, 16), letter, int(size, 16) if size else None,
                      file_ if sep else None)
        )
    if not syms:
        raise XenSymsError(f"{path}: empty; pass xen-syms or its .map, e.g. {paths.XEN_DEBIAN_SYMS}")
    return syms


def load_map(path: Union[str, Path], virt_start: Optional[int] = None) -> XenMapSymbols:
    """Load an nm-format .map (``xen-syms-4.17-amd64.map``, ``xen-4.17-amd64.efi.map``)."""
    path = Path(path)
    _check_path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise XenSymsError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise XenSymsError(_not_syms_message(path, raw[:4])) from None
    return XenMapSymbols(path, _parse_map_text(path, text), virt_start)


# ---------------------------------------------------------------------------
# Loading with a cache
# ---------------------------------------------------------------------------

AnySymbols = Union[XenSymbols, XenMapSymbols]
_memo: Dict[Tuple[str, int, int], AnySymbols] = {}


def _check_path(path: Path) -> os.stat_result:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise XenSymsError(
            f"{path}: no such file; pass xen-syms or its .map, e.g. {paths.XEN_DEBIAN_SYMS} "
            "(scripts/setup fetches the Debian files)"
        ) from None
    except OSError as e:
        raise XenSymsError(f"{path}: cannot access ({e.strerror or e})") from None
    if path.is_dir():
        raise XenSymsError(
            f"{path} is a directory; pass the xen-syms file, e.g. {paths.XEN_DEBIAN_SYMS}"
        )
    return st


def _not_syms_message(path: Path, head: bytes) -> str:
    hint = f"pass xen-syms or its .map, e.g. {paths.XEN_DEBIAN_SYMS}"
    if head[:2] == b"\x1f\x8b":
        return f"{path} is gzip-compressed (xen.gz?), not xen-syms; {hint}"
    if head[:2] == b"MZ":
        return f"{path} is a PE/EFI binary (xen.efi?); pass its .map instead, e.g. {paths.XEN_DEBIAN_EFI_MAP}"
    return f"{path} is neither an ELF file nor an nm-format .map; {hint}"


def _cache_file(cache_dir: Path, path: Path) -> Path:
    h = hashlib.sha1(str(path).encode()).hexdigest()[:16]
    return cache_dir / f"{path.name}-{h}.json"


def default_cache_dir() -> Path:
    return paths.CACHE_DIR / "syms"


def load_xen_syms(
    path: Union[str, Path, None] = None,
    *,
    cache_dir: Union[str, Path, None, bool] = None,
) -> AnySymbols:
    """Open xen-syms (ELF, by magic) or an nm-format .map.

    ``path`` defaults to the Debian xen-syms.  Parsed ELFs are cached as JSON
    in ``cache_dir`` (default CACHE_DIR/syms; False disables) keyed by the
    resolved path, size and mtime_ns, and in-process.  Raises XenSymsError
    (one line) for anything that is not a Xen symbol file.
    """
    path = Path(path) if path is not None else paths.XEN_DEBIAN_SYMS
    st = _check_path(path)
    real = path.resolve()
    key = (str(real), st.st_size, st.st_mtime_ns)
    hit = _memo.get(key)
    if hit is not None:
        return hit
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise XenSymsError(f"{path}: cannot read ({e.strerror or e})") from None
    if head != b"\x7fELF":
        if head[:2] in (b"\x1f\x8b", b"MZ"):
            raise XenSymsError(_not_syms_message(path, head))
        result: AnySymbols = load_map(path)
        _memo[key] = result
        return result

    cdir = None
    if cache_dir is not False:
        cdir = Path(cache_dir) if cache_dir not in (None, True) else default_cache_dir()
    result = None
    if cdir is not None:
        cf = _cache_file(cdir, real)
        try:
            d = json.loads(cf.read_text())
            if d.get("format") == _CACHE_FORMAT and d.get("key") == list(key):
                result = XenSymbols._from_json(path, d)
        except (OSError, ValueError, KeyError, TypeError):
            result = None
    if result is None:
        result = XenSymbols.from_elf(path)
        if cdir is not None:
            d = result._to_json()
            d["format"] = _CACHE_FORMAT
            d["key"] = list(key)
            try:
                cdir.mkdir(parents=True, exist_ok=True)
                tmp = cf.with_name(cf.name + f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps(d, separators=(",", ":")))
                os.replace(tmp, cf)
            except OSError:
                pass  # a read-only cache only costs time
    _memo[key] = result
    return result


def clear_memo() -> None:
    """Forget in-process results (tests; a rebuilt xen-syms is caught by mtime anyway)."""
    _memo.clear()
