"""core/x86decode against objdump: instruction boundaries, branch targets, rip-relative
targets, kinds and operands, on code assembled by GNU as and on the real xen-syms."""

import re
import subprocess

import pytest

from gdbext import paths
from gdbext.core import x86decode
from gdbext.core.x86decode import (IMM, K_CALL, K_COND_JUMP, K_INDIRECT, K_JUMP, K_MOV_FROM_CR3,
                                   K_MOV_TO_CR3, K_RET, MEM, REG, decode, decode_one)
from gdbext.core.xensyms import load_xen_syms

ASM = r"""
        .code64
        .text
start:
        mov     %cr3, %rsi
        mov     %rax, %cr3
        call    *%rax
        call    there
        jmp     there
        jne     start
        je      there
        movabs  $0xffff82d040200000, %rax
        movq    $-0x7fe00000, %rcx
        lea     data(%rip), %rdx
        mov     data+8(%rip), %rdi
        mov     (%rdx,%rdi,8), %rax
        jmp     *8(%rax)
        call    *data(%rip)
        lea     0x466000(%esi), %eax
        ret
there:  nop
        .byte   0x0f, 0x0b
        .balign 16
data:   .quad 0, 0
"""


def _objdump_rows(path, extra=()):
    out = subprocess.run(["objdump", "-d", "-w", *extra, str(path)], capture_output=True,
                         text=True, check=True).stdout
    rows = []
    for line in out.splitlines():
        m = re.match(r"^\s*([0-9a-f]+):\s+((?:[0-9a-f]{2} )+)\s*(.*)$", line)
        if m:
            rows.append((int(m.group(1), 16), bytes.fromhex(m.group(2).replace(" ", "")),
                         m.group(3).strip()))
    return rows


@pytest.fixture(scope="module")
def assembled(tmp_path_factory):
    d = tmp_path_factory.mktemp("dec")
    (d / "a.s").write_text(ASM)
    subprocess.run(["as", "--64", "-o", str(d / "a.o"), str(d / "a.s")], check=True)
    subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(d / "a.o"), str(d / "a.bin")],
                   check=True)
    return (d / "a.bin").read_bytes(), _objdump_rows(d / "a.o")


def _by_text(insns, rows, pattern):
    for a, _, text in rows:
        if re.search(pattern, text):
            return next(i for i in insns if i.address == a), text
    raise AssertionError(f"objdump has no {pattern!r}")


def test_boundaries_are_objdumps(assembled):
    code, rows = assembled
    insns = decode(code, 0)
    ours = {i.address: i.raw for i in insns if not i.is_bad}
    theirs = {a: raw for a, raw, text in rows if "(bad)" not in text}
    # Over the code, up to its last instruction (ud2); the padding and data after it
    # are decoded by both, but objdump skips some padding.
    end = next(a for a, _, text in rows if text.startswith("ud2"))
    assert {a: r for a, r in theirs.items() if a <= end} == \
        {a: r for a, r in ours.items() if a <= end}
    assert sum(i.size for i in insns) == len(code)     # every byte covered


def test_kinds_targets_and_operands(assembled):
    code, rows = assembled
    insns = decode(code, 0)
    i, _ = _by_text(insns, rows, r"^mov\s+%cr3,%rsi$")
    assert K_MOV_FROM_CR3 in i.kinds and [o.reg for o in i.operands if o.written] == ["rsi"]
    i, _ = _by_text(insns, rows, r"^mov\s+%rax,%cr3$")
    assert K_MOV_TO_CR3 in i.kinds and [o.reg for o in i.operands if o.written] == ["cr3"]
    i, _ = _by_text(insns, rows, r"^call\s+\*%rax$")
    assert {K_CALL, K_INDIRECT} <= i.kinds and i.branch_target is None
    for pattern, kinds in ((r"^call\s+[0-9a-f]+ <there>", {K_CALL}),
                           (r"^jmp\s+[0-9a-f]+ <there>", {K_JUMP}),
                           (r"^jne\s+[0-9a-f]+ <start>", {K_JUMP, K_COND_JUMP}),
                           (r"^je\s+[0-9a-f]+ <there>", {K_JUMP, K_COND_JUMP})):
        i, text = _by_text(insns, rows, pattern)
        assert i.kinds == kinds, text
        assert i.branch_target == int(text.split()[1], 16), text
    i, text = _by_text(insns, rows, r"^movabs\s+\$0x")
    assert [o.imm for o in i.immediates()] == [int(re.search(r"\$(0x[0-9a-f]+)", text)[1], 16)]
    assert i.op_str.startswith("$0x")                    # hex, as objdump writes it
    i, text = _by_text(insns, rows, r"^mov\s+\$0xffffffff80200000,%rcx")
    assert i.immediates()[0].imm == 0xFFFFFFFF80200000   # sign-extended imm32, as the CPU uses
    for pattern in (r"^lea\s+0x[0-9a-f]+\(%rip\),%rdx", r"^mov\s+0x[0-9a-f]+\(%rip\),%rdi",
                    r"^call\s+\*0x[0-9a-f]+\(%rip\)"):
        i, text = _by_text(insns, rows, pattern)
        mem = i.memory_operands()[0]
        assert mem.rip_relative and mem.target == int(text.split("#")[1].split()[0], 16), text
    i, _ = _by_text(insns, rows, r"^mov\s+\(%rdx,%rdi,8\),%rax")
    mem = i.memory_operands()[0]
    assert (mem.base, mem.index, mem.scale, mem.disp, mem.target) == ("rdx", "rdi", 8, 0, None)
    assert mem.read and not mem.written
    i, _ = _by_text(insns, rows, r"^jmp\s+\*0x8\(%rax\)")
    assert {K_JUMP, K_INDIRECT} <= i.kinds and K_COND_JUMP not in i.kinds
    i, _ = _by_text(insns, rows, r"^lea\s+0x466000\(%esi\),%eax")
    assert i.memory_operands()[0].base == "esi" and i.memory_operands()[0].disp == 0x466000
    i, _ = _by_text(insns, rows, r"^ret")
    assert i.kinds == {K_RET}
    i, _ = _by_text(insns, rows, r"^ud2")
    assert i.mnemonic == "ud2"
    assert {o.kind for i in insns for o in i.operands} == {REG, IMM, MEM}


def test_public_accessors_give_the_same_records(assembled, monkeypatch):
    """The fast path reads capstone's detail struct; the public accessors must agree."""
    code, _ = assembled
    fast = decode(code, 0x1000)
    monkeypatch.setattr(x86decode, "_raw_detail", lambda insn: None)
    slow = decode(code, 0x1000)
    assert [i.as_dict() for i in fast] == [i.as_dict() for i in slow]


def test_bad_bytes_and_decode_one():
    insns = decode(b"\x06\x90", 0, 64)       # push %es does not exist in 64-bit mode
    assert [i.is_bad for i in insns] == [True, False] and insns[0].size == 1
    assert decode_one(b"\x06", 0, 64) is None
    assert decode_one(b"\x06", 0, 32).mnemonic.startswith("push")
    with pytest.raises(ValueError):
        decode(b"\x90", 0, 8)


def test_32bit_branch_targets_keep_a_64bit_va():
    """head.S's 32-bit code is linked above 4 GiB in xen-syms: targets keep the VA."""
    va = 0xFFFF82D0403DD7C2
    jb = decode_one(b"\x72\xf3", va, 32)                 # jb .-11
    assert jb.branch_target == va + 2 - 13


def test_a_real_function_decodes_as_objdump_does():
    """efi_multiboot2 of Debian's xen-syms: same boundaries and call targets as objdump."""
    syms = load_xen_syms(paths.XEN_DEBIAN_SYMS)
    sym = syms.lookup("efi_multiboot2")
    rows = _objdump_rows(paths.XEN_DEBIAN_SYMS, [f"--start-address={sym.value:#x}",
                                                 f"--stop-address={sym.value + sym.size:#x}"])
    insns = decode(syms.read_linked(sym.value, sym.size), sym.value)
    assert [i.address for i in insns] == [a for a, _, _ in rows]
    for i, (a, _, text) in zip(insns, rows):
        if re.match(r"^(call|jmp|j[a-z]+)\s+[0-9a-f]+ <", text):
            assert i.branch_target == int(text.split()[1], 16), text
