"""Which code runs at Xen's load address, and which of its instructions need linked VAs.

Never imports ``gdb``; works offline from xen-syms alone.

On the multiboot2+EFI path Xen runs at its load address B from ``__efi64_mb2_start``
until the trampoline switches to the linked address, and the firmware's page
tables map only the identity (the upper half, where Xen is linked, is not
mapped).  Any instruction there that ends up dereferencing a *linked VA* faults.
Upstream Xen crashed exactly so: ``PrintErrMesg`` (reached from efi_multiboot2's
error paths) read its static table of string pointers, ``ErrCodeToStr``.

The check walks the code reached from the entries (default: ``__efi64_mb2_start``)
over decoded direct calls and jumps, rip-relative ``lea`` of code addresses
(head.S hands the next stop to ``x86_32_switch`` in %r15 that way) and
fall-through between asm labels; indirect calls and jumps (retpoline thunk calls
included) are listed as edges it cannot follow.  The trampoline is not entered: it
runs from its low copy at ``trampoline_phys``, relocated by its own table.
Function bounds are the ELF symbols' sizes (asm labels: up to the next symbol).

For every reached instruction it reports (``Finding.kind``):

``absolute``       an immediate or displacement that is a linked VA of the image
                   (``movabs``, a sign-extended ``mov $imm32``, an absolute operand);
``reads pointer``  a read from an object of the image that holds static pointers
                   (8 bytes whose link-time value is a linked VA in
                   [XEN_VIRT_START, _end)), rip-relative or through a register
                   loaded by ``lea`` of that object;
``takes address``  ``lea`` of such an object (a pointer table handed on);
``jump table``     a jump or call through a value read from such an object.

Where the static pointers are comes from xen-syms' link-time bytes, or, when
xen.efi is given, from its PE base relocation table (exactly the locations the
EFI loader would relocate), mapped to xen-syms through xen.efi's .map (the two
images are laid out differently).  ``PicReport.pointer_source`` says which.

The result is cached as JSON per build-id under CACHE_DIR/syms, beside the parsed
symbols (core/xensyms).
"""

from __future__ import annotations

import argparse
import bisect
import collections
import difflib
import hashlib
import json
import os
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

from . import x86decode
from .errors import GdbextError
from .stopnames import ENTRY, EFI_MB2
from .x86 import PAGE_SIZE
from .x86decode import IMM, MEM, REG, Instruction

# -- finding kinds -----------------------------------------------------------------

ABSOLUTE = "absolute"
READS_POINTER = "reads pointer"
TAKES_ADDRESS = "takes address"
JUMP_TABLE = "jump table"
KINDS: Tuple[str, ...] = (ABSOLUTE, READS_POINTER, TAKES_ADDRESS, JUMP_TABLE)

# Edge kinds of the call graph.
E_CALL = "call"
E_JUMP = "jump"                  # a direct jump out of the function (tail call, next label)
E_FALLS = "falls through"        # an asm label running into the next one
E_ADDRESS = "address taken"      # rip-relative lea of a code address (an indirect target)
E_INDIRECT_CALL = "indirect call"
E_INDIRECT_JUMP = "indirect jump"
FOLLOWED = (E_CALL, E_JUMP, E_FALLS, E_ADDRESS)

# Pointer sources.
SRC_ELF = "xen-syms link-time values"
SRC_PE = "xen.efi base relocations"

# -- Xen facts (the one home for them) ------------------------------------------------

# head.S is .code32 except for the multiboot2+EFI entry and the first half of
# x86_32_switch (its lretq enters cs32_switch in 32-bit mode).
HEAD_OBJECT = "head.o"
HEAD_CODE64 = (ENTRY, "x86_32_switch")
# The trampoline runs from its low copy (trampoline_phys), not at the load address.
TRAMPOLINE = ("trampoline_start", "trampoline_end")
# GCC's retpoline thunks: ``call __x86_indirect_thunk_rax`` is ``call *%rax``.
RETPOLINE_THUNK = "__x86_indirect_thunk_"

_CACHE_FORMAT = 2   # 2: values of unnamed data named by section
_STOPS_FLOW = ("jmp", "ret", "lret", "iret", "ud2", "hlt")  # mnemonic prefixes ending a label


# -- results ----------------------------------------------------------------------------


@dataclass
class Slot:
    """One static pointer: at ``location`` (index in its object), the linked VA ``value``."""
    location: int
    index: int
    value: int
    value_symbol: str


@dataclass
class Finding:
    kind: str                    # one of KINDS
    function: str
    offset: int                  # from the function's start
    address: int                 # linked VA of the instruction
    instruction: str             # AT&T text
    object: Optional[str]        # the image object involved (qualname), if any
    object_va: Optional[int]
    index: Optional[int]         # slot index in the object (None: a register index)
    value: Optional[int]         # the linked VA the instruction gets (or the slot's)
    value_symbol: Optional[str]  # whose linked VA that is
    slots: int                   # static pointers the object holds
    chain: List[str]             # functions from the entry to ``function``
    faults: bool                 # under the firmware's tables at the load address
    verdict: str
    via: Optional[str] = None    # the instruction that loaded the register used here
    values: List[List[object]] = field(default_factory=list)  # [index, value, symbol] of
    # the object's pointers, when the index is a register (or for a lea of the object)

    @property
    def where(self) -> str:
        return f"{self.function}+{self.offset:#x}"

    def as_dict(self) -> dict:
        d = asdict(self)
        d["where"] = self.where
        return d


@dataclass
class Edge:
    kind: str                    # E_*
    site: int                    # linked VA of the instruction
    function: str                # where the site is
    offset: int
    instruction: str
    target: Optional[int]        # None: indirect
    target_function: Optional[str]
    note: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class FunctionSummary:
    name: str
    va: int
    size: int
    mode: int
    instructions: int
    chain: List[str]
    counts: Dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class PicReport:
    image: str
    build_id: Optional[str]
    pointer_source: str
    pointer_source_detail: str
    static_pointers: int
    entries: List[str]
    upper_half_mapped: bool
    functions: List[FunctionSummary]
    findings: List[Finding]
    unresolved: List[Edge]
    not_followed: List[Edge]     # followed-kind edges deliberately not entered (trampoline)
    notes: List[str]
    from_cache: bool = False

    @property
    def counts(self) -> Dict[str, int]:
        c = collections.Counter(f.kind for f in self.findings)
        return {k: c.get(k, 0) for k in KINDS}

    def text(self) -> str:
        return render_text(self)

    def function(self, name: str) -> Optional[FunctionSummary]:
        for f in self.functions:
            if f.name == name or f.name.split("#")[-1] == name:
                return f
        return None

    def findings_in(self, names: Iterable[str]) -> List[Finding]:
        want = set(names)
        return [f for f in self.findings if f.function in want or
                f.function.split("#")[-1] in want]

    def as_dict(self) -> dict:
        return {"image": self.image, "build_id": self.build_id,
                "pointer_source": self.pointer_source,
                "pointer_source_detail": self.pointer_source_detail,
                "static_pointers": self.static_pointers, "entries": list(self.entries),
                "upper_half_mapped": self.upper_half_mapped,
                "counts": self.counts, "findings_total": len(self.findings),
                "functions": [f.as_dict() for f in self.functions],
                "findings": [f.as_dict() for f in self.findings],
                "unresolved": [e.as_dict() for e in self.unresolved],
                "not_followed": [e.as_dict() for e in self.not_followed],
                "notes": list(self.notes)}

    @classmethod
    def from_dict(cls, d: dict) -> "PicReport":
        return cls(d["image"], d["build_id"], d["pointer_source"], d["pointer_source_detail"],
                   d["static_pointers"], list(d["entries"]), d["upper_half_mapped"],
                   [FunctionSummary(**f) for f in d["functions"]],
                   [Finding(**{k: v for k, v in f.items() if k != "where"})
                    for f in d["findings"]],
                   [Edge(**e) for e in d["unresolved"]],
                   [Edge(**e) for e in d["not_followed"]], list(d["notes"]))


# -- static pointers ----------------------------------------------------------------------


class StaticPointers:
    """Where the image's static pointers are (sorted locations) and what they hold."""

    def __init__(self, syms, locations: Dict[int, int], source: str, detail: str):
        self.syms = syms
        self.values = locations                  # location -> linked VA
        self.locations = sorted(locations)
        self.source = source
        self.detail = detail

    def __len__(self) -> int:
        return len(self.locations)

    def in_range(self, lo: int, hi: int) -> List[int]:
        i = bisect.bisect_left(self.locations, lo)
        j = bisect.bisect_left(self.locations, hi)
        return self.locations[i:j]


def _require_bytes(syms) -> None:
    if not getattr(syms, "segments", ()):
        raise GdbextError(f"{syms.path} is a symbol map: it has no code bytes to decode; "
                          "pass xen-syms (the ELF from the Xen debug package)")


def elf_static_pointers(syms) -> StaticPointers:
    """Qwords of the image's initialised sections whose link-time value is a linked VA
    inside [XEN_VIRT_START, _end), at every 4-byte boundary (packed tables such as
    autogen_entrypoints hold pointers at 4 mod 8; xen.efi's relocations list them)."""
    _require_bytes(syms)
    from .xensyms import SHF_ALLOC, SHF_EXECINSTR
    lo, hi = syms.virt_start, syms.image_end
    found: Dict[int, int] = {}
    for sec in syms.sections:
        # Code is left to the decoder (a movabs immediate is an instruction, not an object).
        if sec.type != "SHT_PROGBITS" or not sec.flags & SHF_ALLOC or \
                sec.flags & SHF_EXECINSTR or not syms.in_image(sec.addr):
            continue
        start = (sec.addr + 3) & ~3
        data = syms.read_linked(start, sec.addr + sec.size - start)
        for phase in (0, 4):
            count = (len(data) - phase) // 8
            if count <= 0:
                continue
            vals = struct.unpack_from(f"<{count}Q", data, phase)
            for k, v in enumerate(vals):
                if lo <= v < hi:
                    found[start + phase + 8 * k] = v
    return StaticPointers(syms, found, SRC_ELF,
                          f"qwords of {syms.path.name}'s data sections holding a linked VA")


def pe_static_pointers(syms, efi_path: Union[str, Path],
                       efi_map: Union[str, Path, None] = None) -> StaticPointers:
    """The locations xen.efi's base relocation table lists (DIR64), mapped to
    xen-syms by symbol through xen.efi's .map (xen.efi is laid out differently)."""
    _require_bytes(syms)
    try:
        import pefile
    except ImportError:
        raise GdbextError("pefile is not installed: run scripts/setup") from None
    efi_path = Path(efi_path)
    try:
        pe = pefile.PE(str(efi_path), fast_load=True)
    except (OSError, pefile.PEFormatError) as e:
        raise GdbextError(f"{efi_path}: not a PE image ({e}); pass xen.efi") from None
    base = pe.OPTIONAL_HEADER.ImageBase
    rvas, skipped = _base_relocations(pe, efi_path)
    map_path = Path(efi_map) if efi_map else _efi_map_for(efi_path, syms)
    if map_path is None:
        raise GdbextError(f"{efi_path}: no {efi_path.name}.map found beside it or xen-syms; "
                          "xen.efi is laid out differently from xen-syms and its map is needed "
                          "to place the relocations (pass --efi-map)")
    from .xensyms import load_map
    emap = load_map(map_path)
    from .xensyms import SHF_EXECINSTR
    found: Dict[int, int] = {}
    unplaced = in_code = not_va = 0
    for rva in rvas:
        va = _efi_to_syms(emap, syms, base + rva)
        if va is None:
            unplaced += 1
            continue
        sec = syms.section_for(va)
        if sec is not None and sec.flags & SHF_EXECINSTR:
            in_code += 1  # an instruction's immediate (movabs): decoding finds those
            continue
        value = struct.unpack("<Q", syms.read_linked(va, 8))[0]
        if not syms.virt_start <= value < syms.image_end:
            not_va += 1  # relocated, but not a pointer into the image (a page-table entry)
            continue
        found[va] = value
    detail = (f"{len(rvas)} DIR64 entries of {efi_path.name}'s .reloc, placed in xen-syms "
              f"through {map_path.name}")
    if not_va:
        detail += f"; {not_va} hold no linked VA (page-table entries: physical addresses)"
    if in_code:
        detail += f"; {in_code} in code (instruction immediates, left to the decoder)"
    if skipped:
        detail += f" ({skipped} leading bytes of the directory are not relocation blocks)"
    if unplaced:
        detail += f"; {unplaced} could not be placed (no matching symbol)"
    return StaticPointers(syms, found, SRC_PE, detail)


def _base_relocations(pe, path: Path) -> Tuple[List[int], int]:
    """RVAs of the DIR64 base relocations.  pefile reads the headers and sections; its
    own .reloc walk gives up on Xen's xen.efi, whose directory starts with bytes that
    are not a block, so the blocks are walked here from the first offset where a
    chain of well-formed blocks runs to the directory's end."""
    import pefile
    d = pe.OPTIONAL_HEADER.DATA_DIRECTORY[pefile.DIRECTORY_ENTRY["IMAGE_DIRECTORY_ENTRY_BASERELOC"]]
    if not d.Size:
        raise GdbextError(f"{path}: no base relocation table")
    # (pefile's get_section_by_rva misses it: Xen's .reloc follows a .bss with no raw data)
    sec = next((s for s in pe.sections if s.VirtualAddress <= d.VirtualAddress <
                s.VirtualAddress + max(s.Misc_VirtualSize, s.SizeOfRawData)), None)
    if sec is None:
        raise GdbextError(f"{path}: base relocation directory outside every section")
    raw = sec.get_data()
    start = d.VirtualAddress - sec.VirtualAddress
    end = start + d.Size
    image = pe.OPTIONAL_HEADER.SizeOfImage

    def chain(o: int) -> Optional[List[Tuple[int, int]]]:
        blocks = []
        while o < end:
            if o + 8 > len(raw):
                return None
            page, size = struct.unpack_from("<II", raw, o)
            if size < 8 or size % 2 or page % 0x1000 or page >= image or o + size > len(raw):
                return None
            blocks.append((o, page))
            o += size
        return blocks

    for skip in range(0, min(d.Size, 0x1000), 4):
        blocks = chain(start + skip)
        if blocks:
            break
    else:
        raise GdbextError(f"{path}: its base relocation table is not readable")
    rvas = []
    for o, page in blocks:
        size = struct.unpack_from("<I", raw, o + 4)[0]
        for k in range(o + 8, o + size, 2):
            e = struct.unpack_from("<H", raw, k)[0]
            if e >> 12 == pefile.RELOCATION_TYPE["IMAGE_REL_BASED_DIR64"]:
                rvas.append(page + (e & 0xFFF))
    return rvas, skip


def _efi_map_for(efi_path: Path, syms) -> Optional[Path]:
    for cand in (efi_path.with_name(efi_path.name + ".map"),
                 syms.path.with_name(efi_path.name + ".map")):
        if cand.is_file():
            return cand
    return None


def _efi_to_syms(emap, syms, efi_va: int) -> Optional[int]:
    """xen.efi's ``efi_va`` as a xen-syms VA: same symbol, same offset in it."""
    hit = emap.symbol_at(efi_va)
    if hit is None:
        return None
    qual, delta = hit
    file_, _, name = qual.rpartition("#")
    cands = [s for s in syms.find(name) if not file_ or (s.file or "").startswith(file_)]
    if not cands:
        cands = syms.find(name)
    if len(cands) != 1:
        return None
    return cands[0].value + delta


# -- the code ------------------------------------------------------------------------------


class _Functions:
    """Function bounds from the symbol table: st_size, or up to the next symbol."""

    def __init__(self, syms):
        self.syms = syms
        self._starts = sorted({s.value for s in syms
                               if not s.is_absolute and syms.in_image(s.value)})

    def containing(self, va: int) -> Optional[Tuple[str, int, int]]:
        hit = self.syms.symbol_at(va)
        if hit is None:
            return None
        qual, delta = hit
        start = va - delta
        sym = self.syms.symbols.get(qual) or self.syms.find(qual.split("#")[-1])[0]
        if sym.size:
            end = start + sym.size
        else:
            i = bisect.bisect_right(self._starts, start)
            end = self._starts[i] if i < len(self._starts) else self.syms.image_end
        if va >= end:  # padding after a sized function: belongs to nothing named
            return None
        return qual, start, end

    def is_code(self, va: int) -> bool:
        sec = self.syms.section_for(va)
        from .xensyms import SHF_EXECINSTR
        return sec is not None and bool(sec.flags & SHF_EXECINSTR)


def _mode_of(syms, qual: str, sym) -> int:
    if (sym.file or "").endswith(HEAD_OBJECT) and sym.name not in HEAD_CODE64:
        return 32
    return 64


def value_name(syms, va: int) -> str:
    """Whose linked VA ``va`` is: ``name+0x12`` inside a sized symbol, else its section
    (a string literal has no symbol: the nearest one below would be a lie)."""
    # Imported here: the crash report (faults) may come to import this module.
    from .faults import describe_linked
    return describe_linked(syms, va)


class _Walker:
    def __init__(self, syms, pointers: StaticPointers, upper_half_mapped: bool):
        self.syms = syms
        self.ptr = pointers
        self.fns = _Functions(syms)
        self.upper_half_mapped = upper_half_mapped
        self.tramp = None
        if all(n in syms for n in TRAMPOLINE):
            self.tramp = (syms.linked_va(TRAMPOLINE[0]), syms.linked_va(TRAMPOLINE[1]))
        self.functions: List[FunctionSummary] = []
        self.findings: List[Finding] = []
        self.unresolved: List[Edge] = []
        self.not_followed: List[Edge] = []
        self.notes: List[str] = []
        self._objects: Dict[int, Optional[Tuple[str, int, int]]] = {}

    # objects holding static pointers
    def object_at(self, va: int) -> Optional[Tuple[str, int, int, List[int]]]:
        """(qualname, start, end, pointer locations) of the image object at ``va`` when it
        holds static pointers, else None."""
        if not self.syms.in_image(va):
            return None
        hit = self.syms.symbol_at(va)
        if hit is None:
            return None
        qual, delta = hit
        start = va - delta
        sym = self.syms.symbols.get(qual)
        size = sym.size if sym is not None and sym.size else None
        if size is None:
            bounds = self.fns.containing(va)
            end = bounds[2] if bounds else start + 8
        else:
            end = start + size
        if va >= end:
            return None
        locs = self.ptr.in_range(start, end)
        if not locs:
            return None
        return qual, start, end, locs

    def describe(self, va: int) -> str:
        return self.syms.describe(va)

    def name_value(self, va: int) -> str:
        return value_name(self.syms, va)

    def verdict(self, kind: str, value: Optional[int]) -> Tuple[bool, str]:
        if self.upper_half_mapped:
            return False, "works only while the upper half is mapped (the merged L4)"
        v = f"{value:#x}" if value is not None else "one of the object's linked VAs"
        if kind == JUMP_TABLE:
            return True, f"faults: fetches code at {v}, and the firmware's tables do not " \
                         "map the upper half"
        if kind == READS_POINTER:
            return True, f"reads {v}: dereferencing it at the load address faults " \
                     "(the firmware's tables do not map the upper half)"
        if kind == TAKES_ADDRESS:
            return True, "hands on a table of linked VAs: dereferencing an entry faults " \
                         "(the firmware's tables do not map the upper half)"
        return True, f"uses the linked VA {v}: a dereference or jump faults (the firmware's " \
                     "tables do not map the upper half)"

    def walk(self, entries: Sequence[str]) -> None:
        queue: collections.deque = collections.deque()
        seen: Dict[int, List[str]] = {}
        for name in entries:
            sym = self.syms.lookup(name)
            bounds = self.fns.containing(sym.value)
            if bounds is None:
                raise GdbextError(f"{name} is not code of the image")
            if bounds[1] not in seen:
                seen[bounds[1]] = [bounds[0]]
                queue.append(bounds)
        while queue:
            qual, start, end = queue.popleft()
            chain = seen[start]
            for kind, target, edge in self._function(qual, start, end, chain):
                if target is None:
                    continue
                bounds = self.fns.containing(target)
                if bounds is None or not self.fns.is_code(target):
                    continue
                if self.tramp and self.tramp[0] <= target < self.tramp[1]:
                    edge.note = "the trampoline runs from its low copy (trampoline_phys): " \
                                "not followed"
                    self.not_followed.append(edge)
                    continue
                if bounds[1] == start or bounds[1] in seen:
                    continue
                seen[bounds[1]] = chain + [bounds[0]]
                queue.append(bounds)

    def _function(self, qual: str, start: int, end: int, chain: List[str]):
        sym = self.syms.symbols.get(qual) or self.syms.find(qual.split("#")[-1])[0]
        mode = _mode_of(self.syms, qual, sym)
        insns = x86decode.decode(self.syms.read_linked(start, end - start), start, mode)
        summary = FunctionSummary(qual, start, end - start, mode, len(insns), list(chain))
        self.functions.append(summary)
        n_before = len(self.findings)
        # Registers holding the address of a pointer-holding object (from lea), or a
        # value read from one: reg -> (object tuple, loading instruction, value or None)
        tables: Dict[str, Tuple[tuple, Instruction]] = {}
        loaded: Dict[str, Tuple[tuple, Instruction, Optional[int], Optional[int]]] = {}
        edges = []
        for insn in insns:
            edges.extend(self._edges(insn, qual, start, end, mode))
            self._classify(insn, qual, start, chain, tables, loaded)
        last = insns[-1] if insns else None
        if last is not None and not last.mnemonic.startswith(_STOPS_FLOW) and \
                not (last.is_jump and not last.is_cond_jump) and not last.is_bad:
            e = Edge(E_FALLS, last.address, qual, last.address - start, last.text, end,
                     self.describe(end))
            edges.append((E_FALLS, end, e))
        c = collections.Counter(f.kind for f in self.findings[n_before:])
        summary.counts = {k: c[k] for k in KINDS if c[k]}
        return edges

    def _edges(self, insn: Instruction, qual: str, start: int, end: int, mode: int):
        out = []
        off = insn.address - start
        if insn.is_call or insn.is_jump:
            tgt = insn.branch_target
            if tgt is not None and tgt not in range(start, end):
                name = self.describe(tgt)
                if insn.is_call and name.startswith(RETPOLINE_THUNK):
                    reg = name[len(RETPOLINE_THUNK):]
                    e = Edge(E_INDIRECT_CALL, insn.address, qual, off, insn.text, None, None,
                             f"retpoline thunk: call *%{reg}")
                    self.unresolved.append(e)
                    return out
                kind = E_CALL if insn.is_call else E_JUMP
                out.append((kind, tgt, Edge(kind, insn.address, qual, off, insn.text, tgt, name)))
            elif tgt is None and insn.is_indirect:
                kind = E_INDIRECT_CALL if insn.is_call else E_INDIRECT_JUMP
                self.unresolved.append(Edge(kind, insn.address, qual, off, insn.text, None,
                                            None))
        elif insn.mnemonic.startswith("lea") and self._is_asm(qual):
            # head.S hands code addresses on in registers (%r15 -> x86_32_switch's
            # jmp *%rdi); in C a function's address is a callback stored for later.
            for o in insn.memory_operands():
                if o.rip_relative and o.target is not None and self.syms.in_image(o.target) \
                        and self.fns.is_code(o.target) and not (start <= o.target < end):
                    hit = self.fns.containing(o.target)
                    if hit is not None and hit[1] == o.target:
                        out.append((E_ADDRESS, o.target,
                                    Edge(E_ADDRESS, insn.address, qual, off, insn.text,
                                         o.target, hit[0])))
        return out

    def _is_asm(self, qual: str) -> bool:
        sym = self.syms.symbols.get(qual)
        return sym is not None and not sym.size

    def _finding(self, kind: str, insn: Instruction, qual: str, start: int, chain: List[str],
                 obj: Optional[tuple], index: Optional[int], value: Optional[int],
                 via: Optional[Instruction] = None) -> None:
        faults, verdict = self.verdict(kind, value)
        values: List[List[object]] = []
        if obj is not None and (index is None or kind == TAKES_ADDRESS):
            values = [[(loc - obj[1]) // 8, self.ptr.values[loc],
                       self.name_value(self.ptr.values[loc])] for loc in obj[3]]
        self.findings.append(Finding(
            kind, qual, insn.address - start, insn.address, insn.text,
            obj[0] if obj else None, obj[1] if obj else None, index, value,
            self.name_value(value) if value is not None else None,
            len(obj[3]) if obj else 0, list(chain), faults, verdict,
            f"{self.describe(via.address)}: {via.text}" if via is not None else None,
            values))

    def _slot(self, obj: tuple, location: int) -> Tuple[Optional[int], Optional[int]]:
        """(index, value) of the static pointer at ``location`` in ``obj``."""
        value = self.ptr.values.get(location)
        return (location - obj[1]) // 8, value

    def _classify(self, insn: Instruction, qual: str, start: int, chain: List[str],
                  tables: dict, loaded: dict) -> None:
        lo, hi = self.syms.virt_start, self.syms.image_end
        is_lea = insn.mnemonic.startswith("lea")
        written = [o.reg for o in insn.operands if o.kind == REG and o.written]
        new_tables: Dict[str, tuple] = {}
        new_loaded: Dict[str, tuple] = {}
        # (a) absolute addresses of the image
        for o in insn.operands:
            if o.kind == IMM and o.size == 8 and lo <= o.imm < hi and not (insn.is_call or
                                                                         insn.is_jump):
                self._finding(ABSOLUTE, insn, qual, start, chain, self.object_at(o.imm),
                              None, o.imm)
            elif o.kind == MEM and not o.rip_relative:
                disp = o.disp & ((1 << 64) - 1)
                if lo <= disp < hi:
                    obj = self.object_at(disp)
                    self._finding(ABSOLUTE, insn, qual, start, chain, obj, None, disp)
                    if obj is not None and insn.is_indirect:
                        self._finding(JUMP_TABLE, insn, qual, start, chain, obj, None, None)
        # (b), (c), (d)
        for o in insn.memory_operands():
            if o.rip_relative and o.target is not None:
                obj = self.object_at(o.target)
                if obj is None:
                    continue
                if is_lea:
                    index, value = self._slot(obj, o.target)
                    self._finding(TAKES_ADDRESS, insn, qual, start, chain, obj, index, value)
                    for r in written:
                        new_tables[r] = (obj, insn)
                elif o.read:
                    index, value = self._slot(obj, o.target)
                    if value is None:
                        continue  # a field set at run time, not a static pointer
                    self._finding(JUMP_TABLE if insn.is_indirect else READS_POINTER, insn,
                                  qual, start, chain, obj, index, value)
                    for r in written:
                        new_loaded[r] = (obj, insn, index, value)
            elif o.base in tables and not is_lea:
                obj, via = tables[o.base]
                index = value = None
                if o.index is None:
                    index, value = self._slot(obj, obj[1] + o.disp)
                    if value is None:
                        continue  # a field of the object that holds no pointer
                if o.read:
                    self._finding(JUMP_TABLE if insn.is_indirect else READS_POINTER, insn,
                                  qual, start, chain, obj, index, value, via)
                    for r in written:
                        new_loaded[r] = (obj, insn, index, value)
        # a call or jump through a register that holds a value read from a pointer table
        thunk_reg = None
        if insn.is_call and insn.branch_target is not None:
            name = self.describe(insn.branch_target)
            if name.startswith(RETPOLINE_THUNK):
                thunk_reg = name[len(RETPOLINE_THUNK):]
        if insn.is_indirect or thunk_reg:
            regs = [thunk_reg] if thunk_reg else [o.reg for o in insn.operands if o.kind == REG]
            for r in regs:
                if r in loaded:
                    obj, via, index, value = loaded[r]
                    self._finding(JUMP_TABLE, insn, qual, start, chain, obj, index, value, via)
        for r in written:
            tables.pop(r, None)
            loaded.pop(r, None)
            _drop_aliases(tables, loaded, r)
        tables.update(new_tables)
        loaded.update(new_loaded)
        if insn.is_call or thunk_reg:  # the callee clobbers the caller-saved registers
            for r in list(tables) + list(loaded):
                if r in _CALLER_SAVED:
                    tables.pop(r, None)
                    loaded.pop(r, None)


_CALLER_SAVED = {"rax", "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11",
                 "eax", "ecx", "edx", "esi", "edi"}
_SUBREGS = {"rax": "eax", "rbx": "ebx", "rcx": "ecx", "rdx": "edx", "rsi": "esi",
            "rdi": "edi", "rbp": "ebp", "rsp": "esp"}


def _drop_aliases(tables: dict, loaded: dict, reg: str) -> None:
    """Writing %eax also ends what %rax held (and the reverse)."""
    alias = _SUBREGS.get(reg) or next((k for k, v in _SUBREGS.items() if v == reg), None)
    if reg.startswith("r") and reg[1:].rstrip("dwb").isdigit():
        alias = reg.rstrip("dwb")
    if alias:
        tables.pop(alias, None)
        loaded.pop(alias, None)


# -- entry points -------------------------------------------------------------------------


def check(syms, functions: Optional[Sequence[str]] = None,
          efi: Union[str, Path, None] = None, efi_map: Union[str, Path, None] = None,
          upper_half_mapped: bool = False, cache: bool = True) -> PicReport:
    """The position-independence check of the code reached from ``functions``
    (default: ``__efi64_mb2_start``), cached per build-id."""
    _require_bytes(syms)
    entries = list(functions) if functions else [ENTRY]
    for name in entries:
        resolve_function(syms, name)
    for path in (efi, efi_map):
        if path is not None and not Path(path).is_file():
            raise GdbextError(f"{path}: no such file (give xen.efi of the same build as "
                              f"{Path(syms.path).name}, and its .map)")
    key = _cache_key(syms, entries, efi, efi_map, upper_half_mapped)
    cf = _cache_path(syms, key) if cache else None
    if cf is not None:
        try:
            d = json.loads(cf.read_text())
            if d.get("format") == _CACHE_FORMAT and d.get("key") == key:
                report = PicReport.from_dict(d["report"])
                report.from_cache = True
                return report
        except (OSError, ValueError, KeyError, TypeError):
            pass
    report = _run(syms, entries, efi, efi_map, upper_half_mapped)
    if cf is not None:
        try:
            cf.parent.mkdir(parents=True, exist_ok=True)
            tmp = cf.with_name(cf.name + f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"format": _CACHE_FORMAT, "key": key,
                                       "report": report.as_dict()}, separators=(",", ":")))
            os.replace(tmp, cf)
        except OSError:
            pass  # a read-only cache only costs time
    return report


def _run(syms, entries, efi, efi_map, upper_half_mapped) -> PicReport:
    pointers = (pe_static_pointers(syms, efi, efi_map) if efi is not None
                else elf_static_pointers(syms))
    w = _Walker(syms, pointers, upper_half_mapped)
    w.walk([resolve_function(syms, n) for n in entries])
    notes = list(w.notes)
    if w.not_followed:
        notes.append(f"{len(w.not_followed)} edge(s) into the trampoline not followed: it runs "
                     "from its low copy at trampoline_phys, relocated by its own table")
    w.findings.sort(key=lambda f: (f.chain.__len__(), f.address))
    return PicReport(str(syms.path), syms.build_id_hex, pointers.source, pointers.detail,
                     len(pointers), entries, upper_half_mapped, w.functions, w.findings,
                     w.unresolved, w.not_followed, notes)


def resolve_function(syms, name: str) -> str:
    """``name`` as a symbol of the image's code (FILE#NAME for an ambiguous local), or
    a one-line error suggesting the nearest names."""
    from .xensyms import AmbiguousSymbolError
    try:
        sym = syms.lookup(name)
    except AmbiguousSymbolError:
        raise
    except GdbextError:
        near = difflib.get_close_matches(name, function_names(syms), n=4, cutoff=0.6)
        hint = f"; nearest: {', '.join(near)}" if near else ""
        raise GdbextError(f"no function {name!r} in {syms.path.name}{hint}") from None
    if sym.type not in CODE_TYPES:
        raise GdbextError(f"{name!r} in {syms.path.name} is not code (nm type {sym.type})")
    return sym.qualname


CODE_TYPES = "TtWw"   # nm's letters for code (a W symbol in .text is a weak function)


def function_names(syms) -> List[str]:
    """The names xen-pic-check accepts (and TAB offers): the image's code symbols."""
    return sorted({s.name for s in syms if s.type in CODE_TYPES})


def findings_for_call(syms, callee: str = EFI_MB2, entry: str = ENTRY,
                      efi: Union[str, Path, None] = None,
                      upper_half_mapped: bool = False) -> List[Finding]:
    """For l4merge's I13: the findings on the path from ``entry`` to its call of
    ``callee`` and in the code that call runs: the entry function's own instructions,
    ``callee`` and everything it reaches, with call chains from ``entry``.

    ``upper_half_mapped``: the call runs under the RFC's merged L4 (the verdicts then
    say the code works only while that mapping lasts).  Both checks are cached."""
    report = check(syms, [entry], efi=efi, upper_half_mapped=upper_half_mapped)
    inside = check(syms, [callee], efi=efi, upper_half_mapped=upper_half_mapped)
    reach = {f.name for f in inside.functions} | {report.functions[0].name}
    return [f for f in report.findings if f.function in reach]


# -- which finding predicted a fault (for the crash report) -------------------------------

# How a fault matches a finding, strongest first.
AT_INSTRUCTION = "the faulting instruction is the finding's"
AT_VALUE = "CR2 is a linked VA the finding's object holds"
IN_OBJECT = "CR2 is inside the object a held linked VA points into"
IN_PAGE = "CR2 is on the page of a held linked VA"
_HOW_RANK = (AT_INSTRUCTION, AT_VALUE, IN_OBJECT, IN_PAGE)
# Which kind of finding is the likelier cause, by what the fault was: a value read from
# a table is what gets dereferenced (a lea only hands the table on); a fetch at CR2
# (RIP == CR2) went through a jump table; at the finding's own instruction, a CR2 that
# is no value the object holds is the object itself read at its linked VA (absolute).
_KIND_RANK_DATA = (READS_POINTER, JUMP_TABLE, ABSOLUTE, TAKES_ADDRESS)
_KIND_RANK_FETCH = (JUMP_TABLE, READS_POINTER, ABSOLUTE, TAKES_ADDRESS)
_KIND_RANK_OBJECT = (ABSOLUTE, READS_POINTER, JUMP_TABLE, TAKES_ADDRESS)


@dataclass
class FaultPrediction:
    """The static finding that predicted a fault at the linked VA ``cr2``."""
    finding: Finding
    how: str                     # AT_INSTRUCTION, AT_VALUE, IN_OBJECT or IN_PAGE
    cr2: int
    indices: List[int]           # the object's slots holding the matching value
    value: Optional[int]         # that value (the linked VA the finding's code gets)
    value_symbol: Optional[str]
    others: List[str] = field(default_factory=list)  # findings that match as well

    @property
    def slot(self) -> Optional[str]:
        """``object[index]`` of the static pointer the value came from."""
        f = self.finding
        if f.object is None:
            return None
        name = f.object.split("#")[-1]
        return f"{name}[{self.indices[0]}]" if self.indices else name

    def text(self) -> str:
        f = self.finding
        got = f" = {self.value:#x} ({self.value_symbol})" if self.value is not None else ""
        return (f"predicted by xen-pic-check: {f.kind} at {f.where} ({f.instruction})"
                + (f", {self.slot}{got}" if self.slot else got)
                + f"; {self.how}; chain {chain_text(f.chain)}"
                + (f" (also: {', '.join(self.others)})" if self.others else ""))

    def as_dict(self) -> dict:
        return {"finding": self.finding.as_dict(), "how": self.how, "cr2": self.cr2,
                "indices": list(self.indices), "value": self.value,
                "value_symbol": self.value_symbol, "slot": self.slot,
                "others": list(self.others), "text": self.text()}


def _held_values(f: Finding) -> List[Tuple[Optional[int], int]]:
    """(slot index, linked VA) of what the finding's instruction gets or hands on."""
    held = [(int(i), int(v)) for i, v, _ in f.values]
    if f.value is not None and all(v != f.value for _, v in held):
        held.insert(0, (f.index, f.value))
    return held


def _object_bounds(syms, va: int) -> Optional[Tuple[int, int]]:
    """[start, end) of the sized symbol holding ``va`` (string literals have none)."""
    hit = syms.symbol_at(va)
    if hit is None:
        return None
    sym = syms.symbols.get(hit[0])
    if sym is None or not sym.size or hit[1] >= sym.size:
        return None
    return va - hit[1], va - hit[1] + sym.size


def _linked_rip(syms, rip: Optional[int], load_base: Optional[int]) -> Optional[int]:
    if rip is None:
        return None
    if syms.in_image(rip):
        return rip
    if load_base is not None:
        offset = rip - load_base
        if syms.image_start - syms.virt_start <= offset < syms.image_end - syms.virt_start:
            return syms.virt_start + offset
    return None


def _match(syms, f: Finding, cr2: int, rip: Optional[int]):
    """(how, indices, value) when ``f`` predicts a fault at ``cr2``, else None."""
    held = _held_values(f)
    if rip is not None and rip == f.address:
        same = [(i, v) for i, v in held if v == cr2]
        return AT_INSTRUCTION, [i for i, _ in same if i is not None], cr2 if same else None
    def in_object(v: int) -> bool:
        bounds = _object_bounds(syms, v)
        return bounds is not None and bounds[0] <= cr2 < bounds[1]

    for how, hit in ((AT_VALUE, lambda v: v == cr2), (IN_OBJECT, in_object),
                     (IN_PAGE, lambda v: v // PAGE_SIZE == cr2 // PAGE_SIZE)):
        same = [(i, v) for i, v in held if hit(v)]
        if same:
            return how, [i for i, _ in same if i is not None], same[0][1]
    return None


def fault_prediction(findings: Sequence[Finding], cr2: int, rip: Optional[int], syms,
                     load_base: Optional[int] = None) -> Optional[FaultPrediction]:
    """Which static finding predicted a fault at ``cr2`` (a linked VA of the image),
    with how it matches: the faulting instruction (``rip``, a linked VA or an address
    at the load address ``load_base``) is the finding's, or ``cr2`` is a linked VA the
    finding's object holds (then which slots), or lies in the object or on the page such
    a value points into.  None when ``cr2`` is no linked VA or no finding predicted it."""
    if not syms.virt_start <= cr2 < syms.image_end:
        return None
    linked = _linked_rip(syms, rip, load_base)
    matches = []
    for f in findings:
        m = _match(syms, f, cr2, linked)
        if m is not None:
            matches.append((f, m))
    if not matches:
        return None
    strongest = min(_HOW_RANK.index(how) for _, (how, _, _) in matches)
    matches = [(f, m) for f, m in matches if _HOW_RANK.index(m[0]) == strongest]
    if _HOW_RANK[strongest] == AT_INSTRUCTION:
        held = any(v == cr2 for f, _ in matches for _, v in _held_values(f)
                   if f.kind != ABSOLUTE)
        order = _KIND_RANK_DATA if held else _KIND_RANK_OBJECT
    else:
        order = _KIND_RANK_FETCH if linked == cr2 else _KIND_RANK_DATA
    matches.sort(key=lambda fm: (order.index(fm[0].kind), len(fm[0].chain), fm[0].address))
    f, (how, indices, value) = matches[0]
    others = [f"{o.kind} at {o.where}" for o, _ in matches[1:]]
    return FaultPrediction(f, how, cr2, indices, value,
                           value_name(syms, value) if value is not None else None, others)


def finding_for_fault(findings: Sequence[Finding], cr2: int, rip_linked_or_load: Optional[int],
                      syms, load_base: Optional[int] = None) -> Optional[Finding]:
    """The finding ``fault_prediction`` names, or None."""
    p = fault_prediction(findings, cr2, rip_linked_or_load, syms, load_base)
    return p.finding if p is not None else None


def predict_fault(syms, cr2: int, rip: Optional[int], load_base: Optional[int] = None,
                  efi: Union[str, Path, None] = None) -> Optional[FaultPrediction]:
    """``fault_prediction`` over the default check (from the multiboot2+EFI entry,
    cached per build-id); None for a symbol map (no bytes to check)."""
    if not getattr(syms, "segments", ()):
        return None
    return fault_prediction(check(syms, efi=efi).findings, cr2, rip, syms, load_base)


def _cache_key(syms, entries, efi, efi_map, upper) -> list:
    st = os.stat(syms.path)
    efi_key = None
    if efi is not None:
        e = os.stat(efi)
        efi_key = [str(Path(efi).resolve()), e.st_size, e.st_mtime_ns, str(efi_map or "")]
    return [syms.build_id_hex, str(Path(syms.path).resolve()), st.st_size, st.st_mtime_ns,
            list(entries), efi_key, bool(upper)]


def _cache_path(syms, key: list) -> Path:
    from .xensyms import default_cache_dir
    h = hashlib.sha1(json.dumps(key).encode()).hexdigest()[:16]
    return default_cache_dir() / f"pic-{syms.build_id_hex or 'nobuildid'}-{h}.json"


# -- the command (xen-pic-check in GDB and on the command line share it) ------------------

PROG = "xen-pic-check"
EXIT_CLEAN, EXIT_FINDINGS, EXIT_ERROR = 0, 1, 2


class _ArgParser(argparse.ArgumentParser):
    """Errors become one-line GdbextErrors (GDB must not exit, nor see a traceback)."""

    def error(self, message: str) -> None:
        usage = " ".join(self.format_usage().split()[1:])
        raise GdbextError(f"{self.prog}: {message} (usage: {usage})")

    def exit(self, status: int = 0, message: Optional[str] = None) -> None:
        raise _HelpShown(message or "")


class _HelpShown(Exception):
    pass


SUMMARY = ("Which instructions of the code Xen runs at its load address (multiboot2+EFI) "
           "need linked VAs: absolute addresses, static pointers, pointer tables, jump tables.")
DESCRIPTION = (SUMMARY + " Offline: decodes xen-syms' own bytes (no target needed) from "
               f"{ENTRY} (or the FUNCTIONs given) through every function reached by direct "
               "calls and jumps; indirect calls and jumps are listed with their site as edges "
               "not followed. Each finding names the function and offset, the instruction, the "
               "object and index, the linked VA it holds and whose it is, the call chain from "
               "the entry, and the verdict under the firmware's tables (the upper half is not "
               "mapped at the load address). The result is cached per build-id.")
EPILOG = (f"Examples: {PROG}; {PROG} PrintErrMesg; {PROG} --json; "
          f"{PROG} --efi xen.efi (static pointers from xen.efi's base relocations)")


def arg_parser(prog: str = PROG, with_syms: bool = False) -> argparse.ArgumentParser:
    """The command's options; ``with_syms`` adds --xen-syms (the offline form: in GDB
    the loaded xen-syms is used)."""
    p = _ArgParser(prog=prog, description=DESCRIPTION, epilog=EPILOG)
    add_options(p, with_syms)
    return p


def add_options(p: argparse.ArgumentParser, with_syms: bool = False) -> None:
    """The options on ``p`` (the CLI's parser, or the GDB command's CommandParser)."""
    p.add_argument("functions", nargs="*", metavar="FUNCTION",
                   help=f"start from these functions (default: {ENTRY})")
    if with_syms:
        p.add_argument("--xen-syms", metavar="FILE", help="xen-syms ELF (default: Debian's 4.17)")
    p.add_argument("--efi", "--xen-efi", dest="xen_efi", metavar="XEN_EFI",
                   help="xen.efi of the same build: take the static pointers from its base "
                        "relocation table")
    p.add_argument("--efi-map", "--xen-efi-map", dest="xen_efi_map", metavar="MAP",
                   help="xen.efi's .map (default: XEN_EFI.map beside xen.efi or xen-syms)")
    p.add_argument("--json", action="store_true", help="the whole result as JSON")
    p.add_argument("--no-cache", action="store_true",
                   help="recompute (the result is cached per build-id)")


def parse_args(argv: Sequence[str], prog: str = PROG, with_syms: bool = False):
    """The parsed options, or None when --help was printed (``help_text`` holds it)."""
    p = arg_parser(prog, with_syms)
    try:
        return p.parse_args(list(argv))
    except _HelpShown:
        return None


def help_text(prog: str = PROG, with_syms: bool = False) -> str:
    return arg_parser(prog, with_syms).format_help()


def check_for_args(syms, args) -> PicReport:
    """The check the parsed ``args`` ask for on ``syms`` (the GDB command prints it
    its own way).  Bad input raises GdbextError (one line)."""
    return check(syms, args.functions or None, efi=args.xen_efi, efi_map=args.xen_efi_map,
                 cache=not args.no_cache)


def run_command(syms, args) -> Tuple[str, PicReport, int]:
    """(what to print, the report, exit status) for parsed ``args`` on ``syms``:
    0 no finding, 1 findings.  Bad input raises GdbextError (one line)."""
    report = check_for_args(syms, args)
    text = json.dumps(report.as_dict(), indent=1) if args.json else render_text(report)
    return text, report, EXIT_FINDINGS if report.findings else EXIT_CLEAN


# -- text ------------------------------------------------------------------------------------

_CHAIN_SHOWN = 6


def chain_text(chain: Sequence[str]) -> str:
    names = [c.split("#")[-1] for c in chain]
    if len(names) > _CHAIN_SHOWN:
        names = names[:2] + ["..."] + names[-(_CHAIN_SHOWN - 3):]
    return " -> ".join(names)


def render_text(report: PicReport, limit: Optional[int] = None) -> str:
    lines = [f"xen-pic-check: {report.image} (build-id {report.build_id or '?'})",
             f"  from {', '.join(report.entries)}: {len(report.functions)} functions reached, "
             f"{sum(f.instructions for f in report.functions)} instructions",
             f"  static pointers: {report.static_pointers} ({report.pointer_source}: "
             f"{report.pointer_source_detail})",
             "  tables at the load address: " + ("merged (upper half mapped)"
                                                 if report.upper_half_mapped else
                                                 "the firmware's (upper half not mapped)")]
    shown = report.findings if limit is None else report.findings[:limit]
    for f in shown:
        obj = ""
        if f.object:
            obj = f" {f.object}" + (f"[{f.index}]" if f.index is not None else "[reg]") + \
                  f" ({f.slots} pointer{'s' if f.slots != 1 else ''})"
        val = f" = {f.value:#x} ({f.value_symbol})" if f.value is not None else ""
        lines.append(f"{f.kind.upper():<14} {f.where}: {f.instruction}")
        lines.append(f"    object:{obj or ' -'}{val}")
        if f.via:
            lines.append(f"    via {f.via}")
        lines.append(f"    chain: {chain_text(f.chain)}")
        lines.append(f"    verdict: {f.verdict}")
    if limit is not None and len(report.findings) > limit:
        lines.append(f"... {len(report.findings) - limit} more findings (--json for all)")
    lines.append("per function (reached from the entry, in call-graph order):")
    for f in report.functions:
        counts = ", ".join(f"{v} {k}" for k, v in f.counts.items()) or "no finding"
        lines.append(f"  {f.name.split('#')[-1]:<32} {f.mode}-bit {f.instructions:>5} insns  "
                     f"{counts}")
    lines.append(f"indirect edges not followed: {len(report.unresolved)}")
    for e in report.unresolved[:10]:
        lines.append(f"  {e.function.split('#')[-1]}+{e.offset:#x}: {e.instruction}"
                     + (f" ({e.note})" if e.note else ""))
    if len(report.unresolved) > 10:
        lines.append(f"  ... {len(report.unresolved) - 10} more")
    for n in report.notes:
        lines.append(f"note: {n}")
    c = report.counts
    lines.append(f"{len(report.findings)} findings: " + ", ".join(f"{c[k]} {k}" for k in KINDS)
                 + (" (cached)" if report.from_cache else ""))
    return "\n".join(lines)
