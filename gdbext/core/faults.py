"""CPU exceptions in early boot: the vectors, the IDT's gates, the frame a handler
sees, the error codes, and an explanation of one caught exception.

Pure functions over ``PhysMemory`` and plain register values; never imports gdb.
The GDB layer reads IDTR/CR2 (QEMU's ``info registers``), plants breakpoints on
``plan_handler_breakpoints``'s sites, and at a hit hands the stop to
``read_exception_frame`` and ``explain_fault``.

Everything that names an address inside Xen goes through ``xenimage.LoadedXen``;
firmware code is named by the PE/COFF image it lies in (``peimage``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from . import paging, peimage, x86, xenimage
from .walknames import Situation, judge_step
from .errors import GdbextError, MemoryReadError
from .memory import PhysMemory
from .paging import MODE_OFF, PagingContext


# --- the vectors -------------------------------------------------------------------

@dataclass(frozen=True)
class Vector:
    number: int
    mnemonic: str          # "#PF"
    name: str              # "Page-Fault"
    has_error_code: bool

    @property
    def label(self) -> str:
        return f"{self.mnemonic} ({self.name})" if self.mnemonic else self.name


# SDM vol. 3A, table 6-1 (and AMD's #VC, #SX); names as the SDM writes them.
_VECTOR_NAMES = {
    0: ("#DE", "Divide Error"), 1: ("#DB", "Debug"), 2: ("NMI", "Non-Maskable Interrupt"),
    3: ("#BP", "Breakpoint"), 4: ("#OF", "Overflow"), 5: ("#BR", "BOUND Range Exceeded"),
    6: ("#UD", "Invalid Opcode"), 7: ("#NM", "Device Not Available"),
    8: ("#DF", "Double Fault"), 9: ("", "Coprocessor Segment Overrun"),
    10: ("#TS", "Invalid TSS"), 11: ("#NP", "Segment Not Present"),
    12: ("#SS", "Stack-Segment Fault"), 13: ("#GP", "General Protection"),
    14: ("#PF", "Page-Fault"), 15: ("", "Reserved"), 16: ("#MF", "x87 FPU Floating-Point Error"),
    17: ("#AC", "Alignment Check"), 18: ("#MC", "Machine-Check"),
    19: ("#XM", "SIMD Floating-Point"), 20: ("#VE", "Virtualization"),
    21: ("#CP", "Control Protection"), 28: ("#HV", "Hypervisor Injection"),
    29: ("#VC", "VMM Communication"), 30: ("#SX", "Security"),
}

VECTORS: Tuple[Vector, ...] = tuple(
    Vector(n, *_VECTOR_NAMES.get(n, ("", "Reserved")), n in x86.ERROR_CODE_VECTORS)
    for n in range(x86.EXCEPTION_VECTORS))
PAGE_FAULT = 14
DOUBLE_FAULT = 8
SELECTOR_ERROR_VECTORS = frozenset((10, 11, 12, 13))


def vector_info(number: int) -> Vector:
    if not 0 <= number < x86.EXCEPTION_VECTORS:
        raise GdbextError(f"vector {number} is not an exception vector (0-31)")
    return VECTORS[number]


# --- reading through the paging of the moment -------------------------------------------

class VirtualReadError(GdbextError):
    """A virtual address does not translate (or its page cannot be read)."""

    def __init__(self, va: int, why: str, walk: Optional[paging.Walk] = None):
        self.va = va
        self.walk = walk
        super().__init__(f"virtual address {va:#x} {why}")


def _pa_or_raise(ctx: PagingContext, mem: PhysMemory, root: Optional[int], va: int) -> int:
    """The PA of ``va`` (``paging.walk``), or VirtualReadError saying why not: where
    paging.translate answers None, the IDT plan and the frame reader report the reason."""
    if ctx.mode is MODE_OFF:
        return va
    try:
        w = paging.walk(ctx, mem, root, va)
    except paging.NonCanonicalAddress as err:
        raise VirtualReadError(va, f"is non-canonical ({err})") from None
    if not w.mapped:
        raise VirtualReadError(va, f"is not mapped (L{w.fault_level}: {w.fault})", w)
    return w.pa


def read_virtual(ctx: PagingContext, mem: PhysMemory, root: Optional[int], va: int,
                 size: int) -> bytes:
    """``size`` bytes at ``va`` through the tables at ``root``, page by page."""
    out = bytearray()
    while size > 0:
        chunk = min(size, x86.PAGE_SIZE - (va & (x86.PAGE_SIZE - 1)))
        pa = _pa_or_raise(ctx, mem, root, va)
        try:
            out += mem.read_phys(pa, chunk)
        except MemoryReadError as err:
            raise VirtualReadError(va, f"maps to {pa:#x}, which cannot be read ({err})") from None
        va = (va + chunk) & x86.mask(64)
        size -= chunk
    return bytes(out)


# --- IDT gates --------------------------------------------------------------------------

@dataclass(frozen=True)
class IdtGate:
    vector: int
    offset: int            # the handler's VA
    selector: int
    ist: int
    gate_type: int         # 0xE interrupt, 0xF trap
    dpl: int
    present: bool
    raw: bytes

    @property
    def kind(self) -> str:
        return {x86.GATE_TYPE_INTERRUPT: "interrupt", x86.GATE_TYPE_TRAP: "trap"}.get(
            self.gate_type, f"type {self.gate_type:#x}")

    def as_dict(self) -> Dict[str, object]:
        return {"vector": self.vector, "offset": self.offset, "selector": self.selector,
                "ist": self.ist, "type": self.gate_type, "kind": self.kind, "dpl": self.dpl,
                "present": self.present}


def decode_gate(vector: int, raw: bytes) -> IdtGate:
    """One 16-byte long-mode gate (layout in x86.IDT_GATE_SIZE_LONG's comment)."""
    if len(raw) != x86.IDT_GATE_SIZE_LONG:
        raise GdbextError(f"an IDT gate is {x86.IDT_GATE_SIZE_LONG} bytes, got {len(raw)}")
    lo = int.from_bytes(raw[0:2], "little")
    selector = int.from_bytes(raw[2:4], "little")
    attr = raw[5]
    mid = int.from_bytes(raw[6:8], "little")
    hi = int.from_bytes(raw[8:12], "little")
    return IdtGate(vector, lo | mid << 16 | hi << 32, selector, raw[4] & x86.GATE_IST_MASK,
                   attr & 0xF, (attr >> 5) & 3, bool(attr & x86.GATE_PRESENT), bytes(raw))


@dataclass(frozen=True)
class HandlerSite:
    """Where to plant a breakpoint: vector's handler, by VA (what the CPU fetches) and PA."""
    vector: int
    handler_va: int
    handler_pa: int

    def as_dict(self) -> Dict[str, object]:
        return {"vector": self.vector, "mnemonic": VECTORS[self.vector].mnemonic,
                "handler_va": self.handler_va, "handler_pa": self.handler_pa}


@dataclass(frozen=True)
class SkippedGate:
    vector: int
    reason: str

    def as_dict(self) -> Dict[str, object]:
        return {"vector": self.vector, "reason": self.reason}


@dataclass
class HandlerPlan:
    idt_base: int
    idt_limit: int
    cr3: int
    sites: List[HandlerSite] = field(default_factory=list)
    skipped: List[SkippedGate] = field(default_factory=list)
    gates: List[IdtGate] = field(default_factory=list)

    @property
    def key(self) -> Tuple[int, int, int]:
        """What the plan depends on: re-plan when IDTR or CR3 changed."""
        return (self.idt_base, self.idt_limit, self.cr3)

    def vectors_at(self, va: int) -> List[int]:
        """The vectors whose handler is at ``va`` (a breakpoint hit there: which one)."""
        return [s.vector for s in self.sites if s.handler_va == va]

    def as_dict(self) -> Dict[str, object]:
        return {"idt_base": self.idt_base, "idt_limit": self.idt_limit, "cr3": self.cr3,
                "sites": [s.as_dict() for s in self.sites],
                "skipped": [s.as_dict() for s in self.skipped]}


def plan_handler_breakpoints(idt_base: int, idt_limit: int, cr3: int, ctx: PagingContext,
                             mem: PhysMemory, vectors: Sequence[int] = range(x86.EXCEPTION_VECTORS)
                             ) -> HandlerPlan:
    """The handlers of ``vectors`` in the IDT at IDTR = (base VA, limit), read through
    the paging in force (CR3 and ``ctx``). Absent gates, gates past the limit, and
    gates or handlers that do not translate are skipped, each with its reason.

    Only long mode's 16-byte gates are decoded: in 32-bit code the boot has no IDT
    of its own (Xen's 32-bit stretch runs with interrupts off and no IDT loaded)."""
    plan = HandlerPlan(idt_base, idt_limit, cr3)
    if not ctx.mode.long_mode:
        plan.skipped = [SkippedGate(v, f"not in long mode ({ctx.mode.name} paging): "
                                       "only 64-bit IDT gates are decoded") for v in vectors]
        return plan
    root = ctx.root_from_cr3(cr3)
    size = x86.IDT_GATE_SIZE_LONG
    for v in vectors:
        gate_va = (idt_base + v * size) & x86.mask(64)
        if v * size + size - 1 > idt_limit:
            plan.skipped.append(SkippedGate(v, f"past the IDT limit {idt_limit:#x}"))
            continue
        try:
            gate = decode_gate(v, read_virtual(ctx, mem, root, gate_va, size))
        except VirtualReadError as err:
            plan.skipped.append(SkippedGate(v, f"gate unreadable: {err}"))
            continue
        plan.gates.append(gate)
        if not gate.present:
            plan.skipped.append(SkippedGate(v, "gate not present (P clear)"))
            continue
        if gate.gate_type not in (x86.GATE_TYPE_INTERRUPT, x86.GATE_TYPE_TRAP):
            plan.skipped.append(SkippedGate(v, f"not an interrupt or trap gate ({gate.kind})"))
            continue
        try:
            handler_pa = _pa_or_raise(ctx, mem, root, gate.offset)
        except VirtualReadError as err:
            plan.skipped.append(SkippedGate(v, f"handler {err}"))
            continue
        plan.sites.append(HandlerSite(v, gate.offset, handler_pa))
    return plan


# --- the frame at handler entry -------------------------------------------------------------

@dataclass(frozen=True)
class ExceptionFrame:
    """What the CPU pushed before entering the handler (64-bit mode: always SS:RSP)."""
    vector: int
    frame_va: int              # RSP at handler entry
    error_code: Optional[int]  # None for vectors without one
    rip: int
    cs: int
    rflags: int
    rsp: int
    ss: int

    def as_dict(self) -> Dict[str, object]:
        return {"vector": self.vector, "frame_va": self.frame_va, "error_code": self.error_code,
                "rip": self.rip, "cs": self.cs, "rflags": self.rflags, "rsp": self.rsp,
                "ss": self.ss}


def read_exception_frame(vector: int, rsp: int, cr3: int, ctx: PagingContext,
                         mem: PhysMemory) -> ExceptionFrame:
    """The frame at a handler's first instruction, RSP pointing at it: [error code],
    RIP, CS, RFLAGS, RSP, SS (8 bytes each), read through the paging of the moment.
    Raises VirtualReadError if the stack does not translate."""
    has_code = vector_info(vector).has_error_code
    count = 6 if has_code else 5
    root = None if ctx.mode is MODE_OFF else ctx.root_from_cr3(cr3)
    raw = read_virtual(ctx, mem, root, rsp, 8 * count)
    q = [int.from_bytes(raw[i:i + 8], "little") for i in range(0, len(raw), 8)]
    code = q.pop(0) if has_code else None
    # CS and SS are pushed as 8-byte slots holding a 16-bit selector.
    return ExceptionFrame(vector, rsp, code, q[0], q[1] & 0xFFFF, q[2], q[3], q[4] & 0xFFFF)


# --- error codes ----------------------------------------------------------------------

@dataclass(frozen=True)
class PageFaultCode:
    raw: int
    present: bool       # P: a protection violation (else: not present)
    write: bool
    user: bool
    reserved: bool
    fetch: bool
    pkey: bool
    shadow_stack: bool
    sgx: bool

    @property
    def access(self) -> str:
        if self.fetch:
            return "instruction fetch"
        if self.shadow_stack:
            return "shadow-stack " + ("write" if self.write else "read")
        return "write" if self.write else "read"

    def text(self) -> str:
        """'instruction fetch, not present', 'write, protection violation, user mode', ..."""
        parts = [self.access]
        if self.reserved:
            parts.append("reserved bit set in a paging entry")
        else:
            parts.append("protection violation" if self.present else "not present")
        if self.user:
            parts.append("user mode")
        if self.pkey:
            parts.append("protection key")
        if self.sgx:
            parts.append("SGX")
        return ", ".join(parts)

    def as_dict(self) -> Dict[str, object]:
        return {"raw": self.raw, "present": self.present, "write": self.write,
                "user": self.user, "reserved": self.reserved, "fetch": self.fetch,
                "pkey": self.pkey, "shadow_stack": self.shadow_stack, "sgx": self.sgx,
                "text": self.text()}


def decode_pf_error(code: int) -> PageFaultCode:
    return PageFaultCode(code, bool(code & x86.PFEC_P), bool(code & x86.PFEC_W),
                         bool(code & x86.PFEC_U), bool(code & x86.PFEC_RSVD),
                         bool(code & x86.PFEC_I), bool(code & x86.PFEC_PK),
                         bool(code & x86.PFEC_SS), bool(code & x86.PFEC_SGX))


@dataclass(frozen=True)
class SelectorErrorCode:
    raw: int
    external: bool
    table: str          # "GDT", "LDT" or "IDT"
    index: int

    def text(self) -> str:
        if self.raw == 0:
            return "error code 0 (no selector: not caused by a segment)"
        what = (f"IDT vector {self.index}" if self.table == "IDT"
                else f"{self.table} selector {self.index << x86.SELEC_INDEX_SHIFT:#x} "
                     f"(index {self.index})")
        return what + (", external event" if self.external else "")

    def as_dict(self) -> Dict[str, object]:
        return {"raw": self.raw, "external": self.external, "table": self.table,
                "index": self.index, "text": self.text()}


def decode_selector_error(code: int) -> SelectorErrorCode:
    if code & x86.SELEC_IDT:
        table = "IDT"
    else:
        table = "LDT" if code & x86.SELEC_TI else "GDT"
    return SelectorErrorCode(code, bool(code & x86.SELEC_EXT), table,
                             (code & 0xFFFF) >> x86.SELEC_INDEX_SHIFT)


def error_code_text(vector: int, code: Optional[int]) -> Optional[str]:
    if code is None:
        return None
    if vector == PAGE_FAULT:
        return decode_pf_error(code).text()
    if vector in SELECTOR_ERROR_VECTORS:
        return decode_selector_error(code).text()
    return f"error code {code:#x}"


def error_code_dict(vector: int, code: Optional[int]) -> Optional[Dict[str, object]]:
    if code is None:
        return None
    if vector == PAGE_FAULT:
        return decode_pf_error(code).as_dict()
    if vector in SELECTOR_ERROR_VECTORS:
        return decode_selector_error(code).as_dict()
    return {"raw": code, "text": error_code_text(vector, code)}


# --- naming code and data addresses ------------------------------------------------------

XEN_LINKED = "xen-linked"      # a Xen linked VA (XEN_VIRT_START + offset)
XEN_LOAD = "xen-load"          # numerically inside the image as loaded at B (the load address)
FIRMWARE = "firmware"          # inside a PE/COFF image found in memory
UNKNOWN = "unknown"


@dataclass(frozen=True)
class AddressName:
    address: int
    kind: str                        # XEN_LINKED, XEN_LOAD, FIRMWARE, UNKNOWN
    text: str                        # "efi_multiboot2+0x12 (Xen, linked VA)"
    symbol: Optional[str] = None     # Xen's "name+0x12", or the PE image's name
    image: Optional[peimage.PeImage] = None

    def as_dict(self) -> Dict[str, object]:
        return {"address": self.address, "kind": self.kind, "text": self.text,
                "symbol": self.symbol, "image": self.image.as_dict() if self.image else None}


def name_address(va: int, xen: Optional[xenimage.LoadedXen], mem: Optional[PhysMemory] = None,
                 pa: Optional[int] = None, search_firmware: bool = True,
                 search_bytes: int = peimage.DEFAULT_SEARCH_BYTES) -> AddressName:
    """Name a code address: a Xen symbol at its linked VA or at its load address (the
    identity map makes that VA the PA B + offset), else the firmware image holding
    ``pa`` (or ``va``, the firmware identity-maps), searched for as EDK2's dump does."""
    if xen is not None:
        syms = xen.syms
        if syms.in_image(va):
            sym = syms.describe(va)
            return AddressName(va, XEN_LINKED, f"{sym} (Xen, at its linked VA)", sym)
        if xen.in_image(va):
            sym = syms.describe(xen.linked_va_of_pa(va))
            return AddressName(va, XEN_LOAD, f"{sym} (Xen, at its load address)", sym)
    if search_firmware and mem is not None:
        where = va if pa is None else pa
        image = peimage.find_image(mem, where, search_bytes)
        if image is not None:
            name = f"{image.name}+{where - image.image_base:#x}"
            return AddressName(va, FIRMWARE, f"{name} (firmware image at {image.image_base:#x})",
                               name, image)
    return AddressName(va, UNKNOWN, f"{va:#x} (in no known image)")


def describe_linked(syms, va: int) -> str:
    """``name+0x12`` when inside a sized symbol; for unnamed data past a symbol's end
    (string literals have no symbol), its section: ``.init.rodata+0x70b0 (no symbol)``."""
    hit = syms.symbol_at(va)
    if hit is None:
        return f"{va:#x}"
    qualname, delta = hit
    sym = syms.symbols.get(qualname)
    if sym is not None and sym.size and delta >= sym.size:
        section_for = getattr(syms, "section_for", None)
        sec = section_for(va) if section_for is not None else None
        if sec is not None:
            return f"{sec.name}+{va - sec.addr:#x} (no symbol)"
        return f"{va:#x} (no symbol, past {_display_name(syms, qualname)})"
    return syms.describe(va)


def runs_where(rip: int, xen: Optional[xenimage.LoadedXen]) -> str:
    """Where the faulting code runs: XEN_LINKED, XEN_LOAD, or UNKNOWN (firmware or other)."""
    if xen is None:
        return UNKNOWN
    if xen.syms.in_image(rip):
        return XEN_LINKED
    if xen.in_image(rip):
        return XEN_LOAD
    return UNKNOWN


# --- where a bad pointer is stored: the image's static pointers --------------------------

@dataclass(frozen=True)
class StoredPointer:
    """One place where an 8-byte value is stored in Xen's image."""
    linked_va: int
    where: str                  # "ErrCodeToStr.16[5]" or "some_obj+0x13"
    object_name: Optional[str]  # the symbol holding it
    index: Optional[int]        # qword index inside the object (None: not 8-aligned in it)
    section: Optional[str]
    source: str                 # "xen-syms" (link-time bytes) or "memory" (the loaded image)

    def as_dict(self) -> Dict[str, object]:
        return {"linked_va": self.linked_va, "where": self.where, "object": self.object_name,
                "index": self.index, "section": self.section, "source": self.source}


def _display_name(syms, qualname: str) -> str:
    """A local's plain name when no other symbol has it, else FILE#NAME."""
    plain = qualname.rsplit("#", 1)[-1]
    return plain if len(syms.by_name.get(plain, ())) == 1 else qualname


def name_location(syms, va: int, source: str = "xen-syms") -> StoredPointer:
    """``obj[i]`` for the i-th qword of an object, ``obj+0x13`` when not qword-aligned
    in it, ``obj+0x40 (past its end)`` in padding after a sized object."""
    hit = syms.symbol_at(va)
    section = None
    section_for = getattr(syms, "section_for", None)
    if section_for is not None:
        sec = section_for(va)
        section = sec.name if sec is not None else None
    if hit is None:
        return StoredPointer(va, f"{va:#x}", None, None, section, source)
    qualname, delta = hit
    sym = syms.symbols.get(qualname)
    name = _display_name(syms, qualname)
    size = sym.size if sym is not None else None
    if size and delta >= size:
        return StoredPointer(va, f"{name}+{delta:#x} (past its end)", name, None, section, source)
    if delta % 8 == 0:
        return StoredPointer(va, f"{name}[{delta // 8}]", name, delta // 8, section, source)
    return StoredPointer(va, f"{name}+{delta:#x}", name, None, section, source)


class StaticPointerIndex:
    """Finds where an 8-byte value is stored in the image's link-time bytes (xen-syms'
    PT_LOAD contents). One per build (``static_pointer_index``); each value's answer
    is kept, and a search is a few ``bytes.find`` over the ~2 MiB image."""

    def __init__(self, syms):
        self.syms = syms
        self._blobs: Optional[List[Tuple[int, bytes]]] = None
        self._memo: Dict[int, Tuple[int, ...]] = {}

    def _segments(self) -> List[Tuple[int, bytes]]:
        if self._blobs is None:
            # the file-backed part of each PT_LOAD: .bss holds no link-time pointer
            self._blobs = [(seg.vaddr, self.syms.read_linked(seg.vaddr, seg.filesz))
                           for seg in self.syms.segments]
        return self._blobs

    def find(self, value: int) -> Tuple[int, ...]:
        """Linked VAs of every 8-aligned qword equal to ``value`` (pointers are aligned;
        an unaligned match is an immediate inside code, not a stored pointer)."""
        hit = self._memo.get(value)
        if hit is not None:
            return hit
        needle = (value & x86.mask(64)).to_bytes(8, "little")
        out: List[int] = []
        for vaddr, data in self._segments():
            i = data.find(needle)
            while i >= 0:
                if (vaddr + i) % 8 == 0:
                    out.append(vaddr + i)
                i = data.find(needle, i + 1)
        self._memo[value] = tuple(out)
        return self._memo[value]

    def locations(self, value: int) -> List[StoredPointer]:
        return [name_location(self.syms, va) for va in self.find(value)]


_INDEXES: Dict[Tuple[str, Optional[bytes]], StaticPointerIndex] = {}


def static_pointer_index(syms) -> Optional[StaticPointerIndex]:
    """The index of this build (cached per path and build-id); None for a .map (no bytes)."""
    if not xenimage.has_bytes(syms):
        return None
    key = (str(syms.path), syms.build_id)
    idx = _INDEXES.get(key)
    if idx is None:
        idx = _INDEXES[key] = StaticPointerIndex(syms)
    return idx


def search_loaded_image(mem: PhysMemory, xen: xenimage.LoadedXen, value: int,
                        chunk: int = 1 << 20) -> List[StoredPointer]:
    """Where ``value`` is stored in the image as it is now in guest memory (pointers
    written at run time, or a table Xen relocated), each named by its linked VA."""
    needle = (value & x86.mask(64)).to_bytes(8, "little")
    out: List[StoredPointer] = []
    pa = xen.image_pa_start
    while pa < xen.image_pa_end:
        size = min(chunk, xen.image_pa_end - pa)
        try:
            data = mem.read_phys(pa, size + min(7, xen.image_pa_end - pa - size))
        except MemoryReadError:
            pa += size
            continue
        i = data.find(needle)
        while 0 <= i < size:
            if (pa + i) % 8 == 0:
                out.append(name_location(xen.syms, xen.linked_va_of_pa(pa + i), "memory"))
            i = data.find(needle, i + 1)
        pa += size
    return out


# --- the decoded faulting instruction ---------------------------------------------------

@dataclass(frozen=True)
class InstructionHint:
    """The faulting instruction as a decoder reads it (gdbext.core.x86decode, wired by the
    GDB layer): its text and the effective address of each memory operand."""
    text: str                                          # "mov (%rax),%rdx"
    memory_operands: Tuple[Tuple[str, int], ...] = ()  # (operand text, effective address)

    def as_dict(self) -> Dict[str, object]:
        return {"text": self.text,
                "memory_operands": [{"operand": o, "address": a}
                                    for o, a in self.memory_operands]}


# --- the walk of the faulting address ----------------------------------------------------

def verdict_words(xen: xenimage.LoadedXen, v: xenimage.EntryVerdict) -> str:
    """'holds l3_xenmap's link-time address: unrelocated', ..."""
    link_addr = v.link & x86.phys_addr_mask(x86.MAXPHYADDR_ARCH)
    if v.kind == xenimage.NOT_PRESENT:
        return "not present"
    if v.kind == xenimage.ABSOLUTE:
        return "absolute, as linked"
    if v.kind == xenimage.FOREIGN and not link_addr:
        return f"written at run time (link value 0): points at {v.target_pa:#x}"
    target = xen.name_pa(link_addr + xen.load_base) or f"{link_addr + xen.load_base:#x}"
    if v.kind == xenimage.UNRELOCATED:
        return (f"holds {target}'s link-time address: unrelocated (points at {v.target_pa:#x}, "
                f"{target} is at {v.expected_pa:#x})")
    if v.kind == xenimage.RELOCATED:
        return f"holds {target}'s address: relocated"
    if v.kind == xenimage.RELOCATED_TWICE:
        return (f"holds {target}'s address relocated twice (points at {v.target_pa:#x}, "
                f"{target} is at {v.expected_pa:#x})")
    return f"foreign: points at {v.target_pa:#x}, {target} is at {v.expected_pa:#x}"


@dataclass
class WalkLine:
    level: int
    index: int
    entry_pa: int
    raw: int
    present: bool
    target_pa: Optional[int]
    table_name: Optional[str]          # the table this entry is in, if Xen's
    verdict: Optional[xenimage.EntryVerdict]
    note: Optional[str]                # verdict_words, when judged

    def text(self) -> str:
        where = f" in {self.table_name}" if self.table_name else ""
        head = f"L{self.level}[{self.index}] = {self.raw:#018x} at {self.entry_pa:#x}{where}"
        if not self.present:
            return head + ": not present"
        out = head + f" -> {self.target_pa:#x}"
        return out + (f": {self.note}" if self.note else "")

    def as_dict(self) -> Dict[str, object]:
        return {"level": self.level, "index": self.index, "entry_pa": self.entry_pa,
                "raw": self.raw, "present": self.present, "target_pa": self.target_pa,
                "table_name": self.table_name,
                "pointer": self.verdict.as_dict() if self.verdict else None, "note": self.note,
                "text": self.text()}


@dataclass
class WalkReport:
    va: int
    lines: List[WalkLine]
    mapped: bool
    pa: Optional[int]
    reason: str                        # why the access faults (or that it maps now)

    def as_dict(self) -> Dict[str, object]:
        return {"va": self.va, "mapped": self.mapped, "pa": self.pa, "reason": self.reason,
                "levels": [ln.as_dict() for ln in self.lines]}


def explain_walk(ctx: PagingContext, mem: PhysMemory, root: int, va: int,
                 xen: Optional[xenimage.LoadedXen] = None,
                 pf: Optional[PageFaultCode] = None,
                 judge_root_as: Optional[str] = None) -> WalkReport:
    """The walk of ``va`` under ``root`` level by level, each Xen-table entry judged
    against its link value, and the reason the access fails."""
    try:
        w = paging.walk(ctx, mem, root, va)
    except paging.NonCanonicalAddress as err:
        return WalkReport(va, [], False, None, str(err))
    lines: List[WalkLine] = []
    # The paging commands' judge (walknames): a merged root's upper half is judged as
    # ``judge_root_as``'s copy, any other entry by the Xen table it lies in.
    sit = Situation({}, ctx, root, "fault", mem, judge_root_as)
    for step in w.steps:
        e = step.entry
        verdict = judge_step(xen, step, sit)
        table_name = None
        if xen is not None:
            hit = xen.table_at(step.table_pa)
            table_name = hit[0] if hit else None
        lines.append(WalkLine(step.level, step.index, step.entry_pa, e.raw, e.present,
                              e.addr if e.present else None, table_name, verdict,
                              verdict_words(xen, verdict) if verdict is not None else None))
    if not w.mapped:
        reason = f"L{w.fault_level}[{w.steps[-1].index if w.steps else '?'}]: {w.fault}"
        bad = [ln for ln in lines if ln.verdict is not None and ln.verdict.kind in (
            xenimage.UNRELOCATED, xenimage.RELOCATED_TWICE, xenimage.FOREIGN)]
        if bad:
            first = bad[0]
            reason += (f", under L{first.level}[{first.index}], which {first.note}")
        return WalkReport(va, lines, False, None, reason)
    problems = []
    if pf is not None:
        if pf.fetch and w.nx:
            problems.append("mapped no-execute (NX)")
        if pf.write and not w.writable and (ctx.wp or pf.user):
            problems.append("mapped read-only")
        if pf.user and not w.user:
            problems.append("mapped supervisor-only")
    if problems:
        reason = f"maps to {w.pa:#x} but is " + " and ".join(problems)
    else:
        reason = (f"maps to {w.pa:#x} now, allowing this access: the tables (or CR3) "
                  "changed after the fault, or a stale TLB entry faulted")
    return WalkReport(va, lines, True, w.pa, reason)


# --- provenance: where the bad pointer came from ----------------------------------------

LINKED_AT_LOAD = "linked-va-at-load"      # a linked VA used while Xen runs at its load address
LOAD_AT_LINKED = "load-address-at-linked"  # a load-address value used by code at linked VAs


@dataclass
class Provenance:
    value: int
    kind: str                         # LINKED_AT_LOAD or LOAD_AT_LINKED
    owner: str                        # whose address it is: "ErrCodeToStr.16+0x18" ...
    registers: List[str]              # general registers holding the value at the fault
    stored_at: List[StoredPointer]    # static pointers holding it (xen-syms, and memory)
    operands: List[str]               # operands of the faulting instruction that used it
    message: str

    def as_dict(self) -> Dict[str, object]:
        return {"value": self.value, "kind": self.kind, "owner": self.owner,
                "registers": list(self.registers),
                "stored_at": [s.as_dict() for s in self.stored_at],
                "operands": list(self.operands), "message": self.message}


GENERAL_REGISTERS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
                     "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")


def registers_holding(regs: Mapping[str, int], value: int) -> List[str]:
    return [r for r in GENERAL_REGISTERS if regs.get(r) == value]


def provenance(value: int, rip: int, xen: Optional[xenimage.LoadedXen],
               regs: Mapping[str, int], mem: Optional[PhysMemory] = None,
               instruction: Optional[InstructionHint] = None,
               search_memory: bool = False) -> Optional[Provenance]:
    """Why ``value`` (the faulting address) is wrong, when it is a Xen address of the
    other kind than the one Xen runs at: a linked VA used while the code runs at the
    load address (or in firmware called from there), or a load-address value used by
    code at linked VAs. None when it is neither (or without xen-syms)."""
    if xen is None:
        return None
    syms = xen.syms
    where = runs_where(rip, xen)
    if syms.in_image(value) and where != XEN_LINKED:
        kind = LINKED_AT_LOAD
        owner = describe_linked(syms, value)
    elif xen.in_image(value) and where == XEN_LINKED:
        kind = LOAD_AT_LINKED
        owner = describe_linked(syms, xen.linked_va_of_pa(value))
    else:
        return None
    index = static_pointer_index(syms)
    stored = index.locations(value) if index is not None else []
    if search_memory and mem is not None:
        seen = {s.linked_va for s in stored}
        stored += [s for s in search_loaded_image(mem, xen, value) if s.linked_va not in seen]
    operands = [o for o, a in (instruction.memory_operands if instruction else ())
                if a == value]
    holders = registers_holding(regs, value)
    runner = {XEN_LOAD: "code running at the load address",
              XEN_LINKED: "code running at the linked address"}.get(
        where, "code outside Xen's image (firmware?), called from Xen")
    if kind == LINKED_AT_LOAD:
        what = f"{value:#x} is the linked VA of {owner}, used by {runner}"
        pointer = "a static pointer holding a linked VA"
    else:
        what = f"{value:#x} is {owner} at its load address, used by {runner}"
        pointer = "a static pointer holding a load address"
    parts = [what]
    if holders:
        parts.append("held in " + ", ".join(holders))
    if operands:
        parts.append("used by operand " + ", ".join(operands))
    if stored:
        static = [s for s in stored if s.source == "xen-syms"]
        first = (static or stored)[0]
        parts.append("stored in " + ", ".join(s.where for s in stored[:4])
                     + (f" (+{len(stored) - 4} more)" if len(stored) > 4 else ""))
        parts.append(f"{pointer} ({first.where}), dereferenced by {runner}")
    else:
        parts.append("stored in no static pointer of the image (computed at run time?)")
    return Provenance(value, kind, owner, holders, stored, operands, "; ".join(parts))


# --- the explanation --------------------------------------------------------------------

@dataclass
class FaultReport:
    vector: Vector
    error_code: Optional[int]
    error: Optional[Dict[str, object]]   # decoded error code (error_code_dict)
    frame: Optional[ExceptionFrame]
    rip: int
    rip_name: AddressName
    cr2: Optional[int]
    cr2_name: Optional[AddressName]
    cr3: int
    root_pa: Optional[int]
    root_name: str                       # "idle_pg_table", "not a Xen table (the firmware's?)"
    fault_address: Optional[int]         # the address analysed: CR2 for #PF, else an operand's
    walk: Optional[WalkReport]
    provenance: Optional[Provenance]
    instruction: Optional[InstructionHint]
    caller: Optional[AddressName] = None   # a fetch fault's return address at RSP, named
    # The static finding of the position-independence check that predicted this fault
    # (piccheck's prediction as a dict with "text"), when the GDB layer found one.
    predicted_by: Optional[Dict[str, object]] = None

    @property
    def error_text(self) -> Optional[str]:
        return None if self.error is None else str(self.error["text"])

    def summary(self) -> str:
        """One line: '#PF at 0x... (efi_multiboot2 ...): instruction fetch, not present, CR2 ...'."""
        out = f"{self.vector.mnemonic or self.vector.name} at {self.rip:#x} ({self.rip_name.text})"
        if self.error_text:
            out += f": {self.error_text}"
        if self.cr2 is not None:
            out += f", CR2 {self.cr2:#x}"
        return out

    def text(self) -> List[str]:
        v = self.vector
        lines = [f"CPU exception {v.number}: {v.label}"]
        lines.append(f"  RIP     {self.rip:#x}  {self.rip_name.text}")
        if self.error_code is not None:
            lines.append(f"  error   {self.error_code:#x}: {self.error_text}")
        if self.cr2 is not None:
            name = f"  {self.cr2_name.text}" if self.cr2_name else ""
            lines.append(f"  CR2     {self.cr2:#x}{name}")
        lines.append(f"  CR3     {self.cr3:#x}  {self.root_name}")
        if self.caller is not None:
            lines.append(f"  caller  {self.caller.address:#x}  {self.caller.text} "
                         "(return address at RSP: the call that jumped to RIP)")
        if self.frame is not None:
            f = self.frame
            lines.append(f"  frame   at {f.frame_va:#x}: CS {f.cs:#x} RFLAGS {f.rflags:#x} "
                         f"RSP {f.rsp:#x} SS {f.ss:#x}")
        if self.instruction is not None:
            lines.append(f"  insn    {self.instruction.text}")
        if self.walk is not None:
            lines.append(f"  walk of {self.walk.va:#x} under CR3:")
            lines.extend(f"    {ln.text()}" for ln in self.walk.lines)
            lines.append(f"  why     {self.walk.reason}")
        if self.provenance is not None:
            lines.append(f"  origin  {self.provenance.message}")
        if self.predicted_by is not None:
            lines.append(f"  static  {self.predicted_by.get('text')}")
        return lines

    def as_dict(self) -> Dict[str, object]:
        return {"vector": self.vector.number, "mnemonic": self.vector.mnemonic,
                "name": self.vector.name, "error_code": self.error_code, "error": self.error,
                "frame": self.frame.as_dict() if self.frame else None, "rip": self.rip,
                "rip_name": self.rip_name.as_dict(), "cr2": self.cr2,
                "cr2_name": self.cr2_name.as_dict() if self.cr2_name else None,
                "cr3": self.cr3, "root_pa": self.root_pa, "root_name": self.root_name,
                "fault_address": self.fault_address,
                "walk": self.walk.as_dict() if self.walk else None,
                "provenance": self.provenance.as_dict() if self.provenance else None,
                "instruction": self.instruction.as_dict() if self.instruction else None,
                "caller": self.caller.as_dict() if self.caller else None,
                "predicted_by": self.predicted_by, "summary": self.summary()}


def root_name(root: int, xen: Optional[xenimage.LoadedXen], given: Optional[str] = None) -> str:
    if given:
        return given
    if xen is not None:
        name = xen.name_pa(root)
        if name:
            return f"{name} (in Xen's image)"
    return "not a Xen table (the firmware's, or built at run time)"


def explain_fault(vector: int, error_code: Optional[int], frame: Optional[ExceptionFrame],
                  cr2: Optional[int], cr3: int, regs: Mapping[str, int], ctx: PagingContext,
                  mem: PhysMemory, xen: Optional[xenimage.LoadedXen] = None, *,
                  decoded_instruction: Optional[InstructionHint] = None,
                  root_label: Optional[str] = None, judge_root_as: Optional[str] = None,
                  search_firmware: bool = True, search_memory: bool = False,
                  firmware_search_bytes: int = peimage.DEFAULT_SEARCH_BYTES) -> FaultReport:
    """Everything gdbext can say about one exception caught at its handler.

    ``frame`` is what ``read_exception_frame`` read (its RIP is the faulting one; with
    no frame, ``regs['rip']``). ``regs`` are the general registers at the handler's
    entry (the CPU changes none of them when it delivers an exception). ``cr2`` is
    read for #PF only. ``decoded_instruction`` comes from the decoder (x86decode):
    without a CR2, its memory operands are the addresses analysed. ``root_label`` /
    ``judge_root_as`` name and judge a merged root as the GDB layer knows it
    (``judge_root_as='idle_pg_table'`` for the RFC's merged L4)."""
    vec = vector_info(vector)
    rip = frame.rip if frame is not None else regs.get("rip", 0)
    if error_code is None and frame is not None:
        error_code = frame.error_code
    is_pf = vector == PAGE_FAULT
    if not is_pf:
        cr2 = None
    pf = decode_pf_error(error_code) if is_pf and error_code is not None else None
    long_paging = ctx.mode is not MODE_OFF
    root = ctx.root_from_cr3(cr3) if long_paging else None

    def pa_of(va: int) -> Optional[int]:
        return paging.translate(ctx, mem, cr3, va)

    rip_name = name_address(rip, xen, mem, pa_of(rip), search_firmware, firmware_search_bytes)
    cr2_name = None
    if cr2 is not None:
        cr2_name = name_address(cr2, xen, mem, pa_of(cr2), search_firmware=False)
    fault_address = cr2
    if fault_address is None and decoded_instruction is not None \
            and decoded_instruction.memory_operands:
        fault_address = decoded_instruction.memory_operands[0][1]
    walk_report = None
    if fault_address is not None and root is not None:
        walk_report = explain_walk(ctx, mem, root, fault_address, xen, pf, judge_root_as)
    # An instruction fetch that faulted on RIP itself ran no code there: the code that
    # used the address is the caller, whose return address the call left at RSP
    # (the firmware's dump names that image too).
    runner_rip = rip
    caller = None
    if pf is not None and pf.fetch and frame is not None and fault_address == rip:
        try:
            raw = read_virtual(ctx, mem, root, frame.rsp, 8)
            runner_rip = int.from_bytes(raw, "little")
            caller = name_address(runner_rip, xen, mem, pa_of(runner_rip), search_firmware,
                                  firmware_search_bytes)
        except VirtualReadError:
            pass
    prov = None
    if fault_address is not None:
        prov = provenance(fault_address, runner_rip, xen, regs, mem, decoded_instruction,
                          search_memory)
    return FaultReport(vec, error_code, error_code_dict(vector, error_code), frame, rip,
                       rip_name, cr2, cr2_name, cr3, root,
                       root_name(root, xen, root_label) if root is not None else "paging off",
                       fault_address, walk_report, prov, decoded_instruction,
                       caller)


# --- triple faults ------------------------------------------------------------------------

@dataclass
class TripleFaultReport:
    """A triple fault from QEMU's -d int chain and the state it left (the CPU is not
    reset when QEMU runs with -action reboot=shutdown,shutdown=pause)."""
    vectors: List[int]               # the chain: first exception, then each nested one
    first_rip: Optional[int]
    first_error_code: Optional[int]
    cr2: Optional[int]               # CR2 at the pause: the last #PF's address
    idt_gate: Optional[int]          # the gate CR2 falls in, if inside the IDT

    def text(self) -> str:
        names = [vector_info(v).mnemonic or str(v) for v in self.vectors]
        parts = [names[0] + (f" at RIP {self.first_rip:#x}" if self.first_rip is not None else "")
                 + (f" (error code {self.first_error_code:#x}: "
                    f"{error_code_text(self.vectors[0], self.first_error_code)})"
                    if self.first_error_code is not None
                    and vector_info(self.vectors[0]).has_error_code else "")]
        # A fault while delivering a fault is a #DF; one while delivering the #DF, a
        # triple fault (SDM vol. 3A, 6.15, interrupt 8).
        delivering = names[0]
        for i, name in enumerate(names[1:], 1):
            last = i == len(names) - 1
            parts.append(f"{name} while delivering {delivering}" + (
                " -> triple fault: the CPU resets" if last else " -> #DF"))
            delivering = "#DF"
        text = "triple fault: " + "; ".join(parts)
        if self.idt_gate is not None:
            text += (f"; CR2 {self.cr2:#x} is IDT gate {self.idt_gate}'s address: the IDT "
                     "does not translate under this CR3")
        return text

    def as_dict(self) -> Dict[str, object]:
        return {"vectors": list(self.vectors), "first_rip": self.first_rip,
                "first_error_code": self.first_error_code, "cr2": self.cr2,
                "idt_gate": self.idt_gate, "text": self.text()}


def explain_triple_fault(chain, cr2: Optional[int] = None,
                         idtr: Optional[Tuple[int, int]] = None) -> TripleFaultReport:
    """``chain``: qemulog.last_triple_fault's; ``cr2``/``idtr`` as QEMU shows them at the
    pause (``info registers``)."""
    first = chain.first
    gate = None
    if cr2 is not None and idtr is not None and idtr[0] <= cr2 <= idtr[0] + idtr[1]:
        gate = (cr2 - idtr[0]) // x86.IDT_GATE_SIZE_LONG
    return TripleFaultReport(chain.vectors, first.rip if first else None,
                             first.error_code if first else None, cr2, gate)


# --- what to catch at this stop ---------------------------------------------------------

CATCH_FIRMWARE = "firmware"   # the IDT in force is not Xen's: breakpoints on its handlers
CATCH_XEN = "xen"             # Xen's own IDT is loaded: breakpoints on Xen's fatal paths
CATCH_NONE = "none"           # no 64-bit IDT (real mode, 32-bit code, paging off)

# Where every fatal path of a running Xen ends: fatal_trap() prints the state and the
# page walk, then calls panic(), which prints its message and the "****" frame, then
# machine_halt() ('noreboot') or machine_restart(). A stop at their entry has Xen's
# console lines about the crash written already; the return address names the caller.
XEN_FATAL_SYMBOLS = ("machine_halt", "machine_restart")


def catch_kind(idt_base: int, long_mode: bool, syms=None) -> str:
    """Which fault catching applies with IDTR.base = ``idt_base``: Xen's fatal paths once
    Xen's own IDT (idt_table, in Xen's image at its linked VA) is loaded, the handlers of
    the IDT in force in long mode before that (the firmware's), nothing otherwise."""
    if syms is not None and syms.in_image(idt_base):
        return CATCH_XEN
    return CATCH_FIRMWARE if long_mode else CATCH_NONE


def xen_fatal_sites(syms) -> List[Tuple[str, int]]:
    """(symbol, linked VA) of each of XEN_FATAL_SYMBOLS this build has."""
    return [(name, syms.linked_va(name)) for name in XEN_FATAL_SYMBOLS if name in syms]


def instruction_hint(insn, regs: Mapping[str, int]) -> Optional[InstructionHint]:
    """The decoded faulting instruction (an ``x86decode.Instruction``) with the effective
    address of each memory operand computed from the registers at the fault (a
    register the stop did not give leaves that operand out). None without an insn."""
    if insn is None:
        return None
    operands = []
    for op in insn.memory_operands():
        if op.rip_relative or (op.base is None and op.index is None):
            if op.target is not None:
                operands.append((_operand_text(op), op.target & x86.mask(64)))
            continue
        address = op.disp
        known = True
        for name, scale in ((op.base, 1), (op.index, op.scale)):
            if name is None:
                continue
            value = _register_value(regs, name)
            if value is None:
                known = False
                break
            address += value * scale
        if known:
            operands.append((_operand_text(op), address & x86.mask(64)))
    return InstructionHint(f"{insn.address:#x}: {insn.text}", tuple(operands))


def _register_value(regs: Mapping[str, int], name: str) -> Optional[int]:
    """A 64-bit register's value, or a 32-bit one's (eax, r12d) as its low half."""
    name = name.lower()
    if name in regs:
        return regs[name]
    if name.startswith("e") and "r" + name[1:] in regs:
        return regs["r" + name[1:]] & 0xFFFFFFFF
    if name.startswith("r") and name.endswith("d") and name[:-1] in regs:
        return regs[name[:-1]] & 0xFFFFFFFF
    return None


def _operand_text(op) -> str:
    """AT&T text of a memory operand: ``0x10(%rax,%rbx,8)``, ``0x1234(%rip)``."""
    inner = ",".join(p for p in (f"%{op.base}" if op.base else "",
                                 f"%{op.index}" if op.index else "",
                                 str(op.scale) if op.index else "") if p)
    if op.rip_relative:
        inner = "%rip"
    disp = f"{op.disp:#x}" if op.disp else ""
    seg = f"%{op.segment}:" if op.segment else ""
    return f"{seg}{disp}({inner})" if inner else f"{seg}{op.target or op.disp:#x}"


# --- Xen's own fatal path ----------------------------------------------------------------

XEN_CONSOLE_PREFIX = "(XEN)"
XEN_PANIC_HEAD = "Panic on CPU"
XEN_CONSOLE_TAIL_LINES = 12


def xen_console_report(text: str, tail: int = XEN_CONSOLE_TAIL_LINES
                       ) -> Tuple[List[str], List[str]]:
    """(the message of Xen's last panic, Xen's last console lines) from the serial log:
    the message is what panic() printed between "Panic on CPU N:" and its closing
    "****" line; the tail is the last ``tail`` lines Xen wrote ("(XEN) " prefix
    dropped). Either is empty when the log has none."""
    lines = [ln.rstrip("\r") for ln in text.splitlines()]
    # "(XEN) text", or "(XEN)" alone for an empty line
    xen = [ln[len(XEN_CONSOLE_PREFIX) + 1:] for ln in lines
           if ln.startswith(XEN_CONSOLE_PREFIX)]
    message: List[str] = []
    heads = [i for i, ln in enumerate(xen) if ln.startswith(XEN_PANIC_HEAD)]
    if heads:
        for ln in xen[heads[-1] + 1:]:
            if ln.startswith("****"):
                break
            message.append(ln)
    return message, xen[-tail:] if tail else []


@dataclass
class XenFatalReport:
    """A stop at one of Xen's fatal paths (XEN_FATAL_SYMBOLS), with Xen's own words."""
    symbol: str                       # "machine_halt"
    rip: int
    caller: Optional[AddressName]     # the return address at RSP: panic+0x...
    message: List[str]                # panic's message from the console
    console: List[str]                # Xen's last console lines
    console_source: Optional[str]     # the serial log read, or None (none known)

    def summary(self) -> str:
        via = f" from {self.caller.symbol or self.caller.text}" if self.caller else ""
        what = f"Xen's fatal path: {self.symbol}{via}"
        if self.message:
            what += ": " + " / ".join(m.strip() for m in self.message if m.strip())[:200]
        return what

    def text(self) -> List[str]:
        lines = [f"Xen's fatal path: {self.symbol} at {self.rip:#x}"]
        if self.caller is not None:
            lines.append(f"  caller  {self.caller.address:#x}  {self.caller.text}")
        if self.message:
            lines.append("  panic   " + self.message[0])
            lines.extend("          " + m for m in self.message[1:])
        if self.console:
            lines.append(f"  console (last {len(self.console)} lines of {self.console_source}):")
            lines.extend("    " + c for c in self.console)
        elif self.console_source is None:
            lines.append("  console unknown here: Xen printed why on its serial console "
                         "(give gdbext the serial log to show it)")
        return lines

    def as_dict(self) -> Dict[str, object]:
        return {"symbol": self.symbol, "rip": self.rip,
                "caller": self.caller.as_dict() if self.caller else None,
                "message": list(self.message), "console": list(self.console),
                "console_source": self.console_source, "summary": self.summary()}


def explain_xen_fatal(symbol: str, rip: int, return_address: Optional[int],
                      xen: Optional[xenimage.LoadedXen], serial_text: Optional[str] = None,
                      serial_source: Optional[str] = None) -> XenFatalReport:
    caller = None
    if return_address is not None:
        caller = name_address(return_address, xen, search_firmware=False)
    message, console = ([], []) if serial_text is None else xen_console_report(serial_text)
    return XenFatalReport(symbol, rip, caller, message, console,
                          serial_source if serial_text is not None else None)


def crash_summary(report) -> str:
    """The one line of GuestCrashed: 'the guest crashed: #PF at ... CR2 ...'."""
    return f"the guest crashed: {report.summary()}"
