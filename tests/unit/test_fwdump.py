"""gdbext.core.fwdump: the firmware's exception dump on the serial console, parsed from
two real crashes and checked against QEMU's own registers at the handler."""

from gdbext.core import fwdump
from gdbext.core.qemu import parse_descriptor_tables, parse_info_registers

from . import fault_data as data


def test_rfc_dump_matches_qemus_registers():
    d = data.dump(data.RFC)
    regs = data.registers(data.RFC)
    assert (d.vector, d.type_text, d.apic_id) == (14, "#PF - Page-Fault", 0)
    assert d.exception_data == 0x10 and d.error_flags["I"] and not d.error_flags["P"]
    # CR2, CR3 and the general registers are unchanged by the delivery: the firmware
    # printed what QEMU showed at the handler's first instruction.
    for name in ("cr2", "cr3", "rax", "rbx", "rbp", "r15"):
        assert d.registers[name] == regs[name], name
    assert d.rip == d.cr2                     # an instruction fetch at the bad address
    assert d.idtr == data.tables(data.RFC)["idt"]
    assert d.tables["gdtr"] == data.tables(data.RFC)["gdt"]
    rsp, _pa, words = data.stack(data.RFC)
    # A fetch fault's "Find image" IP is the return address at the faulting RSP (the
    # frame's 5th qword after the error code; the captured qwords reach that far).
    faulting_rsp = words[4]
    assert faulting_rsp == d.registers["rsp"]
    assert d.image_ip == words[(faulting_rsp - rsp) // 8] and d.image_ip != d.rip
    assert d.pdb is None and d.image_found


def test_printerr_dump_with_text_before_the_marker():
    raw = data.text(data.PRINTERR / "serial.log")
    assert ": !!!! X64 Exception Type" in raw   # PrintErrMesg's ": " had no newline
    d = data.dump(data.PRINTERR)
    regs = data.registers(data.PRINTERR)
    assert d.exception_data == 0 and d.cr2 == regs["cr2"] and d.registers["r12"] == regs["r12"]
    assert d.image_ip == d.rip                 # a data fault: the IP is RIP itself


def test_several_dumps_and_no_image():
    one = data.text(data.RFC / "serial.log")
    head = one[one.index("!!!! X64"):one.index("!!!! Find image")]
    text = "boot\n" + head + "!!!! Can't find image information. !!!!\n" + one
    dumps = fwdump.parse_exception_dumps(text)
    assert len(dumps) == 2 and dumps[0].image_found is False and dumps[0].image_base is None
    assert dumps[1].image_found and fwdump.last_exception_dump(text) == dumps[1]
    assert fwdump.last_exception_dump("no dump here\n") is None


def test_qemu_descriptor_tables_parsed():
    t = parse_descriptor_tables(data.text(data.RFC / "handler-registers.txt"))
    assert set(t) == {"idt", "gdt"} and t["idt"][1] == 0xFFF
    # the NAME=hex parser does not take them for registers
    assert "idt" not in parse_info_registers(data.text(data.RFC / "handler-registers.txt"))
