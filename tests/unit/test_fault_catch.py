"""What the fault catching decides in the core: which catching applies for an IDTR,
Xen's fatal paths in xen-syms, the faulting instruction's operands, Xen's console words."""

import xml.etree.ElementTree as ET

import pytest

from gdbext import paths
from gdbext.core import bootstops, faults, junit, mb2session, x86decode, xenimage
from gdbext.host import bootcheck
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


# --- how a crash ends a session and a boot check ------------------------------------------

CRASH = {"kind": "fault", "summary": "the guest crashed: #PF at 0x3d9e6990 (efi_multiboot2+0x10 "
         "(Xen, at its load address)): read, not present, CR2 0xffff82d040417740",
         "vector": 14, "text": ["CPU exception 14: #PF (Page-Fault)", "  why     L4[261]: not present"]}


def test_a_crash_ends_the_session_after_the_stops_reached(syms):
    book = mb2session.SessionBook(bootstops.plan_for(syms), mb2session.SessionOptions())
    entry = bootstops.plan_for(syms).stops[0]
    book.load_base = 0x3D600000
    book.record(syms, entry, entry.address(book.load_base), {"cr3": 0x3F801000}, {},
                {"checks": [], "error": None}, None)
    rec = book.record_crash(CRASH, 0x3F05983C)
    assert rec["after"] == entry.name and rec["waiting_for"] == book.selected[1].name
    r = book.result()
    assert r["crash"] is rec and r["error"] == CRASH["summary"] and r["ok"] is False
    assert r["reached"] == [entry.name]        # the stops before it are kept
    assert CRASH["summary"] in bootstops.summary_text(r)
    # Before any stop: nothing reached, the crash says so.
    fresh = mb2session.SessionBook(bootstops.plan_for(syms), mb2session.SessionOptions())
    assert fresh.record_crash(CRASH, None)["after"] is None


def _crashed_result():
    checks = [{"id": "I0", "title": "t", "status": "PASS", "summary": "ok", "evidence": {}}]
    stops = [{"stop": "__efi64_mb2_start", "rip": 0x3D9DD531, "cr3": 0x3F801000,
              "changes": {}, "checks": checks}]
    crash = dict(CRASH, after="__efi64_mb2_start", waiting_for="call efi_multiboot2")
    return {"load_base": 0x3D600000, "complete": False, "reached": ["__efi64_mb2_start"],
            "stops": stops, "counts": junit.count_statuses(checks), "ok": False,
            "error": CRASH["summary"], "crash": crash}


def test_a_crash_is_exit_1_and_a_junit_failure_not_a_broken_run():
    r = _crashed_result()
    assert junit.exit_status(r) == junit.EXIT_FAILED
    root = ET.fromstring(junit.junit_xml(r, ["__efi64_mb2_start", "call efi_multiboot2"]))
    fails = [f for f in root.iter("failure") if f.get("type") == "CRASH"]
    assert len(fails) == 1 and fails[0].get("message") == CRASH["summary"]
    assert "after __efi64_mb2_start, waiting for call efi_multiboot2" in fails[0].text
    assert "L4[261]: not present" in fails[0].text
    assert not [e for e in root.iter("error") if e.get("type") == "RUN"]
    # A run error besides the crash stays an error.
    root = ET.fromstring(junit.junit_xml(r, [], run_error="GDB died"))
    assert [e.get("message") for e in root.iter("error")] == ["GDB died"]


def test_boot_check_verdict_names_the_crash():
    report = {"result": _crashed_result(), "error": None}
    line = bootcheck.verdict_line(report, junit.exit_status(report["result"]))
    assert line == f"FAILED: {CRASH['summary']} (after __efi64_mb2_start)"
    assert "  CPU exception 14: #PF (Page-Fault)" in bootcheck.summary_lines(report)
