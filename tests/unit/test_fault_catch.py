"""What the fault catching decides in the core: which catching applies for an IDTR,
Xen's fatal paths in xen-syms, the faulting instruction's operands, Xen's console words."""

import pytest

from gdbext import paths
from gdbext.core import faults, x86decode, xenimage
from gdbext.core.xensyms import load_xen_syms

from . import fault_data as data


@pytest.fixture(scope="module")
def syms():
    if not paths.XEN_DEBIAN_SYMS.is_file():
        pytest.fail(f"{paths.XEN_DEBIAN_SYMS} is missing: run scripts/setup")
    return load_xen_syms(paths.XEN_DEBIAN_SYMS)


def test_catch_kind_follows_the_idt_in_force(syms):
    fw_idt = data.tables(data.RFC, "entry")["idt"][0]     # the firmware's, as QEMU showed it
    assert faults.catch_kind(fw_idt, True, syms) == faults.CATCH_FIRMWARE
    assert faults.catch_kind(syms.linked_va("idt_table"), True, syms) == faults.CATCH_XEN
    assert faults.catch_kind(0, False, syms) == faults.CATCH_NONE      # real mode's IDT
    assert faults.catch_kind(fw_idt, True, None) == faults.CATCH_FIRMWARE


def test_xen_fatal_sites_are_this_builds_symbols(syms):
    sites = dict(faults.xen_fatal_sites(syms))
    assert set(sites) == set(faults.XEN_FATAL_SYMBOLS)
    assert all(sites[n] == syms.linked_va(n) and syms.in_image(sites[n]) for n in sites)


class _NoSuchSymbols:
    def __contains__(self, name):
        return False


def test_xen_fatal_sites_of_a_build_without_them():
    assert faults.xen_fatal_sites(_NoSuchSymbols()) == []


def test_instruction_hint_computes_each_memory_operand():
    # movw (%r12),%dx: the instruction the PrintErrMesg crash faulted on (insn.txt).
    i = x86decode.decode_one(bytes.fromhex("66418b1424"), 0x3E7C8D37)
    h = faults.instruction_hint(i, {"r12": 0xFFFF82D040417000})
    assert h.memory_operands == (("(%r12)", 0xFFFF82D040417000),)
    assert "movw" in h.text and "0x3e7c8d37" in h.text
    i = x86decode.decode_one(bytes.fromhex("488b44d810"), 0x1000)   # mov 0x10(%rax,%rbx,8)
    assert faults.instruction_hint(i, {"rax": 0x100, "rbx": 2}).memory_operands == (
        ("0x10(%rax,%rbx,8)", 0x100 + 2 * 8 + 0x10),)
    # A register the stop did not give: that operand is left out, not guessed.
    assert faults.instruction_hint(i, {"rax": 0x100}).memory_operands == ()
    i = x86decode.decode_one(bytes.fromhex("488b0580000000"), 0x1000)  # rip-relative
    assert faults.instruction_hint(i, {}).memory_operands == (("0x80(%rip)", 0x1007 + 0x80),)
    assert faults.instruction_hint(None, {}) is None


def test_instruction_hint_32_bit_register_is_the_low_half():
    i = x86decode.decode_one(bytes.fromhex("8b00"), 0x1000)          # mov (%rax),%eax
    assert faults.instruction_hint(i, {"rax": 0x1_0000_2000}).memory_operands[0][1] \
        == 0x1_0000_2000
    i = x86decode.decode_one(bytes.fromhex("678b00"), 0x1000)        # mov (%eax),%eax
    assert faults.instruction_hint(i, {"rax": 0x1_0000_2000}).memory_operands[0][1] == 0x2000


PANIC_LOG = """\
(XEN) Xen image load base address: 0x3d600000
(XEN) Freed 664kB init memory
(XEN) ****************************************
(XEN) Panic on CPU 0:
(XEN) Could not set up DOM0 guest OS
(XEN) ****************************************
(XEN)
(XEN) Manual reset required ('noreboot' specified)
"""


def test_xen_console_report_takes_panics_message_and_the_tail():
    message, tail = faults.xen_console_report(PANIC_LOG, tail=3)
    assert message == ["Could not set up DOM0 guest OS"]
    assert tail == ["****************************************", "",
                    "Manual reset required ('noreboot' specified)"]
    assert faults.xen_console_report("firmware only\r\n") == ([], [])


def test_explain_xen_fatal_names_the_caller_and_says_when_the_console_is_unknown(syms):
    xen = xenimage.LoadedXen(syms, 0x3D600000)
    halt = syms.linked_va("machine_halt")
    ret = syms.linked_va("panic") + 0x40
    r = faults.explain_xen_fatal("machine_halt", halt, ret, xen, PANIC_LOG, "serial.log")
    assert r.caller.symbol.startswith("panic+") and r.caller.kind == faults.XEN_LINKED
    assert r.summary() == ("Xen's fatal path: machine_halt from panic+0x40: "
                           "Could not set up DOM0 guest OS")
    assert any("Could not set up DOM0" in ln for ln in r.text())
    assert r.as_dict()["console_source"] == "serial.log"
    bare = faults.explain_xen_fatal("machine_halt", halt, None, xen)
    assert bare.console_source is None and "console unknown" in "\n".join(bare.text())
    assert faults.crash_summary(bare) == "the guest crashed: Xen's fatal path: machine_halt"
