"""gdbext.core.qemulog and faults.explain_triple_fault on the triple fault captured from a
real boot (tests/data/triple-fault: CR3 set to a page of zeros at __efi64_mb2_start)."""

from gdbext.core import faults, qemulog

from . import fault_data as data

TRIPLE = data.DATA / "triple-fault"


def test_triple_fault_chain_from_qemus_log():
    events = qemulog.parse_int_log(data.text(TRIPLE / "qemu-d-int.txt"))
    chain = qemulog.last_triple_fault(events)
    assert chain.vectors == [14, 14, 14]          # #PF, #PF delivering it, #PF delivering #DF
    assert [s.old for s in chain.steps] == [qemulog.NO_EXCEPTION, 14, 8]
    regs = data.registers(TRIPLE, "triple")
    # The machine paused at the fault: the first #PF was the fetch at the RIP it kept.
    assert chain.first.vector == 14 and chain.first.rip == regs["rip"]
    assert chain.first.cr2 == regs["rip"] and chain.first.error_code == 0x10
    assert chain.first.registers["rsp"] == regs["rsp"]
    df = [e for e in events if isinstance(e, qemulog.IntEvent) and e.vector == 8]
    assert len(df) == 1 and df[0].cr2 is None


def test_explain_triple_fault_names_the_idt_gate():
    chain = qemulog.last_triple_fault(qemulog.parse_int_log(
        data.text(TRIPLE / "qemu-d-int.txt")))
    regs = data.registers(TRIPLE, "triple")
    idtr = data.tables(TRIPLE, "triple")["idt"]
    r = faults.explain_triple_fault(chain, regs["cr2"], idtr)
    assert r.idt_gate == faults.DOUBLE_FAULT     # the last #PF: reading the #DF gate
    t = r.text()
    assert t.startswith(f"triple fault: #PF at RIP {regs['rip']:#x} (error code 0x10: "
                        "instruction fetch, not present)")
    assert "#PF while delivering #PF -> #DF" in t and "#PF while delivering #DF -> triple" in t
    assert "IDT gate 8's address" in t


def test_gdb_saw_sigquit_and_the_monitor_a_paused_shutdown():
    notes = data.text(TRIPLE / "triple-notes.txt")
    assert "Program received signal SIGQUIT" in data.text(TRIPLE / "gdb.log")
    assert "VM status: paused (shutdown)" in notes


def test_no_triple_fault_in_a_log_without_one():
    events = qemulog.parse_int_log(data.text(data.RFC / "qemu-d-int-pf.txt"))
    assert qemulog.last_triple_fault(events) is None
    (pf,) = events
    assert (pf.vector, pf.error_code, pf.cr2) == (14, 0x10, data.dump(data.RFC).cr2)
