"""gdbext.core.faults: vectors, IDT gates, the exception frame, error codes, provenance and
the explanation, on synthetic memory and on the crashes captured from real boots."""

import re

import pytest

from gdbext import paths
from gdbext.core import faults, x86, xenimage
from gdbext.core.faults import (InstructionHint, decode_gate, decode_pf_error,
                                decode_selector_error, explain_fault, plan_handler_breakpoints,
                                read_exception_frame)
from gdbext.core.memory import SyntheticMemory
from gdbext.core.paging import MODE_OFF, PagingContext
from gdbext.core.xensyms import load_xen_syms

from . import fault_data as data
from .paging_builders import PRW, PTBuilder

# --- vectors ---------------------------------------------------------------------------


def test_vectors_named_as_the_sdm_names_them():
    names = {v.number: v.mnemonic for v in faults.VECTORS}
    assert len(faults.VECTORS) == 32
    assert (names[0], names[6], names[8], names[13], names[14], names[21]) == (
        "#DE", "#UD", "#DF", "#GP", "#PF", "#CP")
    assert faults.vector_info(14).label == "#PF (Page-Fault)"
    with pytest.raises(Exception):
        faults.vector_info(32)


def test_error_code_vectors():
    # SDM table 6-1: #DF, #TS, #NP, #SS, #GP, #PF, #AC, #CP; AMD's #VC (29).
    assert [v.number for v in faults.VECTORS if v.has_error_code] == [
        8, 10, 11, 12, 13, 14, 17, 21, 29]


# --- gates -----------------------------------------------------------------------------


def gate_bytes(offset: int, selector: int = 0x38, ist: int = 0, type_attr: int = 0x8E) -> bytes:
    """A 64-bit gate encoded from the SDM's figure 6-8, by hand."""
    return (offset & 0xFFFF).to_bytes(2, "little") + selector.to_bytes(2, "little") + \
        bytes([ist, type_attr]) + ((offset >> 16) & 0xFFFF).to_bytes(2, "little") + \
        (offset >> 32).to_bytes(4, "little") + bytes(4)


def test_decode_gate_fields():
    g = decode_gate(14, gate_bytes(0xFFFF82D0_403E5DC0, selector=0xE008, ist=3, type_attr=0xEF))
    assert (g.offset, g.selector, g.ist, g.gate_type, g.dpl, g.present, g.kind) == (
        0xFFFF82D0_403E5DC0, 0xE008, 3, 0xF, 3, True, "trap")
    g = decode_gate(2, gate_bytes(0x1234, type_attr=0x0E))
    assert not g.present and g.kind == "interrupt"


IDT_VA = 0xFFFF_8000_0010_0000
IDT_PA = 0x0080_0000
HANDLERS_VA = 0xFFFF_8000_0020_0000
HANDLERS_PA = 0x0090_0000


def idt_machine(limit=32 * 16 - 1):
    """An IDT mapped at a VA that is not its PA, with gates of every kind."""
    b = PTBuilder("4-level")
    b.map(IDT_VA, IDT_PA, flags=PRW)
    b.map(HANDLERS_VA, HANDLERS_PA, flags=PRW)
    for v in range(32):
        b.mem.write(IDT_PA + 16 * v, gate_bytes(HANDLERS_VA + 0x20 * v))
    b.mem.write(IDT_PA + 16 * 1, gate_bytes(HANDLERS_VA + 0x20, type_attr=0x0E))   # absent
    b.mem.write(IDT_PA + 16 * 2, gate_bytes(0xFFFF_8000_0400_0000))             # unmapped
    b.mem.write(IDT_PA + 16 * 3, gate_bytes(HANDLERS_VA + 0x60, type_attr=0x8F))  # trap
    b.mem.write(IDT_PA + 16 * 5, gate_bytes(HANDLERS_VA + 0xA0, type_attr=0x85))  # task gate
    return b, limit


def test_plan_handler_breakpoints_skips_what_cannot_be_caught_and_says_why():
    b, _ = idt_machine()
    limit = 30 * 16 - 1                      # vectors 30 and 31 are past the limit
    cr3 = b.root | x86.CR3_PWT               # flag bits in CR3 are not the root
    plan = plan_handler_breakpoints(IDT_VA, limit, cr3, b.ctx(), b.mem)
    sites = {s.vector: s for s in plan.sites}
    skipped = {s.vector: s.reason for s in plan.skipped}
    assert sorted(sites) == [v for v in range(30) if v not in (1, 2, 5)]
    assert sites[3].handler_va == HANDLERS_VA + 0x60
    assert sites[14].handler_pa == HANDLERS_PA + 0x20 * 14
    assert "not present" in skipped[1]
    assert "not mapped" in skipped[2] and "handler" in skipped[2]
    assert "not an interrupt or trap gate" in skipped[5]
    assert "past the IDT limit" in skipped[30] and 31 in skipped
    assert plan.key == (IDT_VA, limit, cr3)
    assert plan.vectors_at(HANDLERS_VA + 0x20 * 14) == [14] and plan.vectors_at(0) == []


def test_plan_when_the_idt_itself_is_unmapped_or_paging_is_not_long():
    b, limit = idt_machine()
    plan = plan_handler_breakpoints(IDT_VA + 0x1000_0000, limit, b.root, b.ctx(), b.mem)
    assert not plan.sites and all("gate unreadable" in s.reason for s in plan.skipped)
    plan = plan_handler_breakpoints(0, 0x7FF, 0, PagingContext(MODE_OFF), SyntheticMemory())
    assert not plan.sites and "not in long mode" in plan.skipped[0].reason


def test_real_idt_gate_14_is_where_the_cpu_went_for_the_rfc_pf():
    """The firmware's IDT bytes at the entry, decoded: gate 14's handler is the RIP QEMU
    showed at the first instruction after the #PF (its -d int log says v=0e)."""
    raw = bytes.fromhex(data.text(data.RFC / "entry-idt-0-31.hex").strip())
    entry_idt = data.tables(data.RFC, "entry")["idt"]
    assert entry_idt == data.dump(data.RFC).idtr      # the firmware printed the same IDTR
    gate = decode_gate(14, raw[14 * 16:15 * 16])
    assert gate.present and gate.kind == "interrupt"
    assert gate.offset == data.registers(data.RFC)["rip"]
    assert " v=0e " in data.text(data.RFC / "qemu-d-int-pf.txt")


# --- the frame -------------------------------------------------------------------------

STACK_VA = 0xFFFF_8300_0000_0000
STACK_PA = 0x00A0_0000


@pytest.mark.parametrize("vector", [14, 6])
def test_read_exception_frame_with_and_without_error_code(vector):
    b = PTBuilder("4-level")
    b.map(STACK_VA, STACK_PA, flags=PRW)
    b.map(STACK_VA + 0x1000, STACK_PA + 0x5000, flags=PRW)   # the frame crosses a page
    rsp = STACK_VA + 0x1000 - 16
    words = ([0x10] if vector == 14 else []) + [0xFFFF82D0403E6980, 0xE038, 0x10246,
                                                 0x3FEA0508, 0xFFFF_0000_0000_E010]
    for i, w in enumerate(words):
        va = rsp + 8 * i
        pa = (STACK_PA if va < STACK_VA + 0x1000 else STACK_PA + 0x5000 - 0x1000) + (
            va - STACK_VA)
        b.mem.write_u64(pa, w)
    f = read_exception_frame(vector, rsp, b.root, b.ctx(), b.mem)
    assert f.error_code == (0x10 if vector == 14 else None)
    assert (f.rip, f.cs, f.rflags, f.rsp, f.ss) == (0xFFFF82D0403E6980, 0xE038, 0x10246,
                                                    0x3FEA0508, 0xE010)


def test_read_exception_frame_on_an_unmapped_stack_raises():
    b = PTBuilder("4-level")
    with pytest.raises(faults.VirtualReadError, match="not mapped"):
        read_exception_frame(14, STACK_VA, b.root, b.ctx(), b.mem)


@pytest.mark.parametrize("crash", [data.RFC, data.PRINTERR])
def test_real_frame_agrees_with_the_firmware_dump(crash):
    """The stack qwords QEMU showed at the handler, read as a frame, are what the
    firmware itself printed: ExceptionData, RIP, CS, RFLAGS, RSP."""
    rsp, rsp_pa, words = data.stack(crash)
    mem = SyntheticMemory(1 << 32)
    for i, w in enumerate(words):
        mem.write_u64(rsp_pa + 8 * i, w)
    regs = data.registers(crash)
    ctx = PagingContext(MODE_OFF)     # the stack's VA is its PA (QEMU's gva2gpa said so)
    assert rsp == regs["rsp"] and rsp == rsp_pa
    f = read_exception_frame(14, rsp, regs["cr3"], ctx, mem)
    d = data.dump(crash)
    assert f.error_code == d.exception_data
    assert (f.rip, f.cs, f.rflags, f.rsp, f.ss) == (d.rip, d.registers["cs"],
                                                    d.registers["rflags"], d.registers["rsp"],
                                                    d.registers["ss"])


# --- error codes -----------------------------------------------------------------------


def test_pf_error_code_texts():
    assert decode_pf_error(0x10).text() == "instruction fetch, not present"
    assert decode_pf_error(0).text() == "read, not present"
    assert decode_pf_error(0x7).text() == "write, protection violation, user mode"
    assert decode_pf_error(0x9).text() == "read, reserved bit set in a paging entry"
    assert decode_pf_error(0x21).text() == "read, protection violation, protection key"
    assert decode_pf_error(0x43).text() == "shadow-stack write, protection violation"
    assert decode_pf_error(0x8001).sgx


@pytest.mark.parametrize("crash", [data.RFC, data.PRINTERR])
def test_pf_decode_agrees_with_the_firmware_flags(crash):
    d = data.dump(crash)
    pf = decode_pf_error(d.exception_data)
    f = d.error_flags
    assert (pf.fetch, pf.reserved, pf.user, pf.write, pf.present, pf.pkey, pf.shadow_stack,
            pf.sgx) == (f["I"], f["R"], f["U"], f["W"], f["P"], f["PK"], f["SS"], f["SGX"])


def test_selector_error_codes():
    gdt = decode_selector_error(0x38)
    assert (gdt.table, gdt.index, gdt.external) == ("GDT", 7, False)
    assert decode_selector_error(0x1A).text() == "IDT vector 3"
    assert decode_selector_error(0x0D).table == "LDT" and decode_selector_error(0x0D).external
    assert "no selector" in decode_selector_error(0).text()
    assert faults.error_code_text(13, 0x38) == "GDT selector 0x38 (index 7)"
    assert faults.error_code_text(3, None) is None


# --- the RFC crash, explained on synthetic memory with the real xen-syms ------------------

B = 0x3D600000 - 0x1000000   # any 2 MiB-aligned base: nothing may depend on the lab's


@pytest.fixture(scope="module")
def syms():
    return load_xen_syms(paths.XEN_DEBIAN_SYMS)


def rfc_machine(syms):
    """The RFC's merged L4 as the raw patch leaves it: the upper half copied from
    idle_pg_table's link-time values, so L4[261] holds l3_xenmap's link-time address
    (a PA in the firmware's memory, zeros there)."""
    xen = xenimage.LoadedXen(syms, B)
    b = PTBuilder("4-level", table_base=0x200000)
    slot = (syms.virt_start >> 39) & 0x1FF
    link = xen.link_entry("idle_pg_table", slot)
    b.set_entry(b.root, slot, link)
    stack_va = 0x3FEA0000
    b.map(stack_va, stack_va, flags=PRW)
    return xen, b, slot, link, stack_va


def test_explain_the_rfc_crash(syms):
    xen, b, slot, link, stack_va = rfc_machine(syms)
    linked = syms.linked_va("efi_multiboot2")
    ret = xen.pa("efi_multiboot2") - 0x10       # a return address at the load address
    rsp = stack_va + 0x508
    b.mem.write_u64(rsp, ret)
    frame = faults.ExceptionFrame(14, rsp - 48, 0x10, linked, 0x38, 0x200246, rsp, 0x30)
    regs = {"rax": linked, "rbx": 0x2000, "rip": 0x3F05983C}
    r = explain_fault(14, None, frame, linked, b.root, regs, b.ctx(), b.mem, xen,
                      judge_root_as="idle_pg_table", root_label="merged L4 M")
    assert r.error_text == "instruction fetch, not present"
    assert r.rip_name.kind == faults.XEN_LINKED and r.rip_name.symbol == "efi_multiboot2"
    assert r.caller.kind == faults.XEN_LOAD
    assert r.walk is not None and not r.walk.mapped
    l4 = r.walk.lines[0]
    assert (l4.level, l4.index, l4.verdict.kind) == (4, slot, xenimage.UNRELOCATED)
    assert "holds l3_xenmap's link-time address: unrelocated" in l4.note
    assert r.walk.lines[1].level == 3 and not r.walk.lines[1].present
    assert r.walk.reason.startswith("L3[") and f"L4[{slot}]" in r.walk.reason
    assert r.provenance.kind == faults.LINKED_AT_LOAD and r.provenance.registers == ["rax"]
    assert "code running at the load address" in r.provenance.message
    text = "\n".join(r.text())
    assert "#PF (Page-Fault)" in text and "merged L4 M" in text and "unrelocated" in text
    assert r.summary().startswith(f"#PF at {linked:#x} (efi_multiboot2")
    d = r.as_dict()
    assert d["walk"]["levels"][0]["pointer"]["kind"] == "unrelocated" and d["cr2"] == linked


def test_explain_a_walk_that_maps_but_forbids_the_access(syms):
    b = PTBuilder("4-level")
    va = 0xFFFF_8000_0000_0000
    b.map(va, 0x300000, flags=x86.PTE_P | x86.PTE_NX)
    r = faults.explain_walk(b.ctx(), b.mem, b.root, va, None, decode_pf_error(0x13))
    assert r.mapped and "no-execute" in r.reason and "read-only" in r.reason
    r = faults.explain_walk(b.ctx(), b.mem, b.root, va, None, decode_pf_error(0x0))
    assert "maps to 0x300000 now" in r.reason


def test_gp_without_cr2_walks_the_decoded_operand(syms):
    xen, b, slot, _link, _ = rfc_machine(syms)
    bad = syms.linked_va("ErrCodeToStr.16")
    hint = InstructionHint("mov (%rax),%rdx", (("(%rax)", bad),))
    r = explain_fault(13, 0, None, 0x1234, b.root, {"rip": xen.pa("PrintErrMesg"), "rax": bad},
                      b.ctx(), b.mem, xen, decoded_instruction=hint, search_firmware=False)
    assert r.cr2 is None and r.fault_address == bad
    assert r.walk.lines[0].index == slot
    assert r.provenance.operands == ["(%rax)"] and r.provenance.registers == ["rax"]
    assert r.error_text.startswith("error code 0")


# --- provenance ---------------------------------------------------------------------------


def first_string_pointer(syms):
    """The first non-NULL entry of boot.c's ErrCodeToStr[] in the ELF: (index, value)."""
    base = syms.linked_va("ErrCodeToStr.16")
    size = syms.lookup("ErrCodeToStr.16").size
    for i in range(size // 8):
        v = syms.read_u64(base + 8 * i)
        if v:
            return i, v
    raise AssertionError("ErrCodeToStr is all NULL")


def test_static_pointer_index_finds_the_table_slot(syms):
    index, value = first_string_pointer(syms)
    idx = faults.static_pointer_index(syms)
    assert idx is faults.static_pointer_index(syms)            # one per build
    wheres = [s.where for s in idx.locations(value)]
    assert f"ErrCodeToStr.16[{index}]" in wheres
    assert all(va % 8 == 0 for va in idx.find(value))
    assert idx.find(0xDEAD_BEEF_0BAD_F00D) == ()


def test_name_location_inside_and_past_an_object(syms):
    base = syms.linked_va("ErrCodeToStr.16")
    size = syms.lookup("ErrCodeToStr.16").size
    assert faults.name_location(syms, base + 16).where == "ErrCodeToStr.16[2]"
    assert faults.name_location(syms, base + 3).where == "ErrCodeToStr.16+0x3"
    assert faults.name_location(syms, base + 16).section == ".init.data"
    past = faults.name_location(syms, base + size)
    assert "ErrCodeToStr.16" not in past.where or "past its end" in past.where


def test_search_loaded_image_finds_a_value_written_at_run_time(syms):
    xen = xenimage.LoadedXen(syms, B)
    mem = SyntheticMemory(1 << 32)
    slot = xen.pa("StdErr")
    mem.write_u64(slot, 0x1122_3344_5566_7788)
    found = faults.search_loaded_image(mem, xen, 0x1122_3344_5566_7788)
    assert [s.where for s in found] == ["StdErr[0]"] and found[0].source == "memory"


def test_real_printerr_crash_provenance(syms):
    """PrintErrMesg called at the load address (tests/data/printerr-crash): the firmware's
    OutputString faulted reading ErrCodeToStr[5]'s linked VA. The oracles: CR2 and the
    registers as the firmware and QEMU printed them, the instruction as GDB disassembled it."""
    d = data.dump(data.PRINTERR)
    regs = data.registers(data.PRINTERR)
    assert regs["cr2"] == d.cr2
    xen = xenimage.LoadedXen(syms, data.load_base(data.PRINTERR))
    insn = data.text(data.PRINTERR / "insn.txt").splitlines()[0]
    m = re.match(r"\s*0x([0-9a-f]+):\s+(.*?)\s*$", insn)
    assert int(m.group(1), 16) == d.rip
    operand = re.search(r"\([^)]*\)", m.group(2)).group(0)      # "(%r12)"
    reg = operand.strip("()%")
    hint = InstructionHint(m.group(2), ((operand, regs[reg]),))
    p = faults.provenance(d.cr2, d.rip, xen, regs, instruction=hint)
    assert p.kind == faults.LINKED_AT_LOAD
    assert reg in p.registers and set(p.registers) == {
        r for r in faults.GENERAL_REGISTERS if d.registers.get(r) == d.cr2}
    setup = data.text(data.PRINTERR / "setup.txt")
    code = int(re.search(r"\$rsi = (0x[0-9a-f]+)", setup).group(1), 16) & ~(1 << 63)
    assert f"ErrCodeToStr.16[{code}]" in [s.where for s in p.stored_at]
    assert p.operands == [operand]
    assert "a static pointer holding a linked VA (ErrCodeToStr.16" in p.message
    assert "outside Xen's image" in p.message


def test_no_provenance_for_addresses_of_the_right_kind(syms):
    xen = xenimage.LoadedXen(syms, B)
    at_load = xen.pa("efi_multiboot2")
    assert faults.provenance(at_load, at_load, xen, {}) is None
    assert faults.provenance(0x1000, at_load, xen, {}) is None
    assert faults.provenance(syms.linked_va("efi_multiboot2"), syms.linked_va("__start_xen"),
                             xen, {}) is None
    p = faults.provenance(at_load, syms.linked_va("__start_xen"), xen, {"rdi": at_load})
    assert p.kind == faults.LOAD_AT_LINKED and p.registers == ["rdi"]


def test_explain_the_real_printerr_crash_end_to_end(syms):
    """The PrintErrMesg crash with the firmware's image bytes as captured and an identity
    map like OVMF's (nothing mapped in the upper half): RIP named by the PE image the
    firmware's dump names, CR2's walk failing at L4, the pointer traced to its table."""
    d = data.dump(data.PRINTERR)
    regs = data.registers(data.PRINTERR)
    mem = data.memory_slices(data.PRINTERR)
    b = PTBuilder("4-level", mem=mem)
    for page in range(d.image_base & ~0xFFF, (d.rip & ~0xFFF) + 0x1000, 0x1000):
        b.map(page, page, flags=PRW)
    xen = xenimage.LoadedXen(syms, data.load_base(data.PRINTERR))
    frame = faults.ExceptionFrame(14, regs["rsp"], d.exception_data, d.rip, d.registers["cs"],
                                  d.registers["rflags"], d.registers["rsp"], d.registers["ss"])
    r = explain_fault(14, None, frame, regs["cr2"], b.root, regs, b.ctx(), mem, xen,
                      firmware_search_bytes=d.rip - (d.rip & ~0xFFFFF))
    assert r.rip_name.kind == faults.FIRMWARE and r.rip_name.image.image_base == d.image_base
    assert r.rip_name.image.entry_point == d.image_entry
    assert r.error_text == "read, not present" and r.caller is None
    assert r.walk.lines[0].level == 4 and not r.walk.lines[0].present
    assert r.cr2_name.kind == faults.XEN_LINKED
    code = int(re.search(r"\$rsi = (0x[0-9a-f]+)",
                         data.text(data.PRINTERR / "setup.txt")).group(1), 16) & ~(1 << 63)
    assert f"ErrCodeToStr.16[{code}]" in r.provenance.message
    assert r.summary().startswith(f"#PF at {d.rip:#x} (image at {d.image_base:#x}+")


def test_unnamed_data_is_named_by_its_section(syms):
    index, value = first_string_pointer(syms)      # a string literal: no symbol of its own
    sec = syms.section_for(value)
    assert faults.describe_linked(syms, value) == f"{sec.name}+{value - sec.addr:#x} (no symbol)"
    assert faults.describe_linked(syms, syms.linked_va("efi_multiboot2") + 4) == \
        "efi_multiboot2+0x4"
