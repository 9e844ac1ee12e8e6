"""x86 instruction decoding (16/32/64-bit) over capstone, with no capstone object in the API.

Never imports ``gdb``.  Other code (the boot stop plan, the position-independence
check, the crash explainer) decodes with :func:`decode` / :func:`decode_one` and
reads plain :class:`Instruction` / :class:`Operand` records:

* ``Instruction``: ``address``, ``size``, ``raw`` bytes, ``mnemonic`` and ``op_str``
  (AT&T syntax, as objdump and GDB print them), ``operands``, ``branch_target``
  (a direct call/jump's destination), ``kinds`` (frozenset of the ``K_*`` flags:
  call, jump, conditional jump, indirect, ret, mov to/from CR3, bad).
* ``Operand``: ``kind`` (REG / IMM / MEM), ``size`` in bytes, ``read``/``written``,
  the register or immediate, or a memory reference: ``base``, ``index``, ``scale``,
  ``disp``, ``segment``, ``rip_relative`` and ``target`` (the absolute address of a
  rip-relative or base/index-less reference, else None).

Undecodable bytes become one-byte ``(bad)`` instructions (kind ``K_BAD``), so a
linear sweep of a range always covers it, as ``objdump -d`` does.

Why capstone: it is maintained (5.0.x releases through 2025/26), ships wheels for
the Pythons GDB embeds, decodes every mode we need (16-bit trampoline code, 32-bit
head.S, 64-bit C), and gives operand access (read/written) used below to tell
``mov %rax,%cr3`` from ``mov %cr3,%rax`` without relying on operand order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import FrozenSet, Iterator, List, NamedTuple, Optional, Tuple

import capstone
from capstone import x86 as _cx

# -- the stable API -----------------------------------------------------------------

REG = "reg"
IMM = "imm"
MEM = "mem"

K_CALL = "call"
K_JUMP = "jump"                # jmp and every conditional jump
K_COND_JUMP = "conditional jump"
K_INDIRECT = "indirect"        # a call or jump through a register or memory
K_RET = "ret"                  # ret, lret, iret
K_MOV_TO_CR3 = "mov to cr3"
K_MOV_FROM_CR3 = "mov from cr3"
K_BAD = "bad"                  # bytes that are not an instruction in this mode

MODES = (16, 32, 64)
_U64 = (1 << 64) - 1


class Operand(NamedTuple):
    kind: str                      # REG, IMM or MEM
    size: int                      # bytes
    read: bool = False
    written: bool = False
    reg: Optional[str] = None      # REG: "rax", "cr3", ...
    imm: Optional[int] = None      # IMM: the value as the CPU uses it (sign-extended to size)
    base: Optional[str] = None     # MEM
    index: Optional[str] = None
    scale: int = 1
    disp: int = 0                  # signed, as encoded
    segment: Optional[str] = None
    rip_relative: bool = False
    target: Optional[int] = None   # MEM: absolute address (rip-relative resolved, or disp alone)

    def as_dict(self) -> dict:
        return self._asdict()


@dataclass(frozen=True, eq=False)
class Instruction:
    address: int
    size: int
    raw: bytes
    mnemonic: str
    op_str: str
    operands: Tuple[Operand, ...] = ()
    branch_target: Optional[int] = None   # direct call / jump: where it goes
    kinds: FrozenSet[str] = field(default_factory=frozenset)
    mode: int = 64

    @property
    def text(self) -> str:
        return f"{self.mnemonic} {self.op_str}".strip()

    @property
    def next_address(self) -> int:
        return self.address + self.size

    @property
    def is_call(self) -> bool:
        return K_CALL in self.kinds

    @property
    def is_jump(self) -> bool:
        return K_JUMP in self.kinds

    @property
    def is_cond_jump(self) -> bool:
        return K_COND_JUMP in self.kinds

    @property
    def is_indirect(self) -> bool:
        return K_INDIRECT in self.kinds

    @property
    def is_ret(self) -> bool:
        return K_RET in self.kinds

    @property
    def is_bad(self) -> bool:
        return K_BAD in self.kinds

    def memory_operands(self) -> List[Operand]:
        return [o for o in self.operands if o.kind == MEM]

    def immediates(self) -> List[Operand]:
        return [o for o in self.operands if o.kind == IMM]

    def as_dict(self) -> dict:
        return {"address": self.address, "size": self.size, "bytes": self.raw.hex(),
                "mnemonic": self.mnemonic, "op_str": self.op_str, "text": self.text,
                "operands": [o.as_dict() for o in self.operands],
                "branch_target": self.branch_target, "kinds": sorted(self.kinds),
                "mode": self.mode}


def decode(code: bytes, address: int, mode: int = 64,
           count: Optional[int] = None) -> List[Instruction]:
    """Decode ``code`` (at ``address``) linearly in ``mode`` (16, 32, 64): every byte
    is covered, undecodable ones as one-byte ``(bad)`` instructions."""
    return list(iter_decode(code, address, mode, count))


def decode_one(code: bytes, address: int, mode: int = 64) -> Optional[Instruction]:
    """The instruction at the start of ``code``, or None if those bytes are not one."""
    for insn in iter_decode(code[:15], address, mode, 1):
        return None if insn.is_bad else insn
    return None


def iter_decode(code: bytes, address: int, mode: int = 64,
                count: Optional[int] = None) -> Iterator[Instruction]:
    d = _decoder(mode)
    n = 0
    for insn in d.md.disasm(code, address):
        if count is not None and n >= count:
            return
        n += 1
        yield d.convert(insn)


# -- capstone, kept in here ------------------------------------------------------------

_CS_MODE = {16: capstone.CS_MODE_16, 32: capstone.CS_MODE_32, 64: capstone.CS_MODE_64}
_JUMP_UNCONDITIONAL = {"jmp", "ljmp", "jmpq", "jmpl", "ljmpl", "ljmpq", "ljmpw"}


class _Decoder:
    def __init__(self, mode: int):
        if mode not in _CS_MODE:
            raise ValueError(f"x86 mode {mode!r}: one of {MODES}")
        self.mode = mode
        md = capstone.Cs(capstone.CS_ARCH_X86, _CS_MODE[mode])
        md.syntax = capstone.CS_OPT_SYNTAX_ATT
        md.detail = True
        md.skipdata = True        # undecodable bytes: id 0, one byte each
        self.md = md
        self._regs: dict = {}

    def reg(self, reg_id: int) -> Optional[str]:
        if reg_id == 0:
            return None
        name = self._regs.get(reg_id)
        if name is None:
            name = self._regs[reg_id] = self.md.reg_name(reg_id)
        return name

    def convert(self, insn) -> Instruction:
        raw = bytes(insn.bytes)
        if insn.id == 0:
            return Instruction(insn.address, insn.size, raw, "(bad)", "", (), None,
                               frozenset((K_BAD,)), self.mode)
        next_va = insn.address + insn.size
        detail = _raw_detail(insn)
        ops = []
        if detail is not None:
            x = detail.arch.x86
            groups = set(detail.groups[:detail.groups_count])
            raw_ops = [x.operands[k] for k in range(x.op_count)]
            for o in raw_ops:
                ops.append(self._operand(o.type, o.size, o.access, o.value, next_va))
        else:  # the public (slower) accessors
            groups = set(insn.groups)
            for o in insn.operands:
                ops.append(self._operand(o.type, o.size, o.access, o.value, next_va))
        mnem = insn.mnemonic
        kinds = set()
        target = None
        if _cx.X86_GRP_CALL in groups:
            kinds.add(K_CALL)
        if _cx.X86_GRP_JUMP in groups:
            kinds.add(K_JUMP)
            if mnem not in _JUMP_UNCONDITIONAL:
                kinds.add(K_COND_JUMP)
        if _cx.X86_GRP_RET in groups or _cx.X86_GRP_IRET in groups:
            kinds.add(K_RET)
        if kinds & {K_CALL, K_JUMP}:
            imms = [o for o in ops if o.kind == IMM]
            if len(ops) == 1 and imms and not mnem.startswith("l"):
                target = imms[0].imm & _U64
                if self.mode != 64:
                    # capstone wraps the target to the mode's width; code linked
                    # above 4 GiB (head.S's 32-bit code in xen-syms) keeps its VA.
                    width = 1 << self.mode
                    rel = (target - next_va) % width
                    target = (next_va + (rel - width if rel >= width // 2 else rel)) & _U64
            elif ops and not imms:
                kinds.add(K_INDIRECT)
        for o in ops:
            if o.kind == REG and o.reg == "cr3":
                kinds.add(K_MOV_TO_CR3 if o.written else K_MOV_FROM_CR3)
        op_str = insn.op_str
        if "$" in op_str:
            op_str = _BIG_DECIMAL.sub(_hex_imm, op_str)
        return Instruction(insn.address, insn.size, raw, mnem, op_str, tuple(ops),
                           target, frozenset(kinds), self.mode)

    def _operand(self, typ: int, size: int, access: int, value, next_va: int) -> Operand:
        read = bool(access & capstone.CS_AC_READ)
        written = bool(access & capstone.CS_AC_WRITE)
        if typ == _cx.X86_OP_REG:
            return Operand(REG, size, read, written, reg=self.reg(value.reg))
        if typ == _cx.X86_OP_IMM:
            imm = value.imm
            bits = 8 * size if size else 64
            return Operand(IMM, size, read, written, imm=imm & ((1 << bits) - 1))
        m = value.mem
        base, index = self.reg(m.base), self.reg(m.index)
        rip = base in ("rip", "eip")
        tgt = None
        if rip:
            tgt = (next_va + m.disp) & (_U64 if base == "rip" else 0xFFFF_FFFF)
        elif base is None and index is None:
            tgt = m.disp & (_U64 if self.mode == 64 else 0xFFFF_FFFF)
        return Operand(MEM, size, read, written, base=base, index=index, scale=m.scale,
                       disp=m.disp, segment=self.reg(m.segment), rip_relative=rip, target=tgt)


def _raw_detail(insn):
    """capstone's cs_detail struct of ``insn`` (what its own ``groups`` property
    reads): building ``insn.operands`` copies every field through ctypes and costs
    4x the decoding itself, which matters for tens of thousands of instructions."""
    raw = getattr(insn, "_raw", None)
    try:
        return raw.detail.contents if raw is not None else None
    except (AttributeError, ValueError):
        return None


# capstone's AT&T printer writes 64-bit immediates above 2^63 in decimal
# ("movabsq $18446606429673488384"); objdump and GDB write them in hex.
_BIG_DECIMAL = re.compile(r"\$(\d{10,})\b")


def _hex_imm(m) -> str:
    return f"${int(m.group(1)):#x}"


_DECODERS: dict = {}


def _decoder(mode: int) -> _Decoder:
    d = _DECODERS.get(mode)
    if d is None:
        d = _DECODERS[mode] = _Decoder(mode)
    return d
