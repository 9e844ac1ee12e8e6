"""gdbext.core.hang: when a hang is declared (and when not), the serial tail, QEMU's
status words, and the triple fault found in QEMU's -d int log captured from a real
boot (tests/data/triple-fault)."""

from gdbext.core import faults, hang, qemulog

from . import fault_data as data

TRIPLE = data.DATA / "triple-fault"
IF = hang.RFLAGS_IF
A = 0x3F05A000          # synthetic code addresses


def spin(rip, body, steps=hang.TRACE_STEPS, rflags=0x2):
    """A sample of a CPU that runs ``body`` (addresses) over and over from ``rip``."""
    start = body.index(rip)
    trace = [body[(start + i) % len(body)] for i in range(steps + 1)]
    return hang.CpuSample(trace[-1], rflags, False, tuple(trace))


def test_find_loop_jmp_self_and_a_small_loop():
    assert hang.find_loop([A] * 25) == (A,)
    body = [A, A + 2, A + 7, A + 9]
    assert hang.find_loop(spin(A + 7, body).trace) == (A + 7, A + 9, A, A + 2)


def test_find_loop_refuses_straight_code_and_big_loops():
    assert hang.find_loop([A + 3 * i for i in range(25)]) is None
    big = [A + 4 * i for i in range(hang.MAX_LOOP_INSTRUCTIONS + 1)]
    assert hang.find_loop(spin(A, big).trace) is None
    # A loop that leaves (a stall that ends) is not one loop over the whole trace.
    left = list(spin(A, [A, A + 2]).trace[:12]) + [A + 0x40 + i for i in range(13)]
    assert hang.find_loop(left) is None


def test_same_loop_in_every_sample_is_a_spin():
    body = [A, A + 2, A + 5]
    samples = [spin(b, body) for b in body]
    v = hang.judge(samples)
    assert v.hung and v.kind == hang.HANG_SPIN and set(v.loop) == set(body)
    assert "3 instruction(s)" in v.why


def test_one_loop_then_another_is_not_a_hang():
    """A healthy boot's stall loop: gone at the next sample."""
    v = hang.judge([spin(A, [A, A + 2]), spin(A, [A, A + 2]), spin(A + 0x100, [A + 0x100])])
    assert not v.hung and v.kind == hang.NOT_HUNG


def test_a_spin_needs_every_sample():
    v = hang.judge([spin(A, [A]), spin(A, [A])])
    assert not v.hung and "2 sample" in v.why


def test_hlt_with_interrupts_off_is_final_at_once():
    s = hang.CpuSample(A + 1, 0x2, True, (A + 1,))
    v = hang.judge([s])
    assert v.hung and v.kind == hang.HANG_HALT and "interrupts off" in v.why
    at = hang.CpuSample(A, 0x46, False, (A,), at_hlt=True)
    assert hang.judge([at]).kind == hang.HANG_HALT


def test_halted_with_interrupts_on_hangs_only_at_one_rip():
    same = [hang.CpuSample(A + 1, 0x2 | IF, True, (A + 1,)) for _ in range(hang.SAMPLES)]
    assert hang.judge(same).kind == hang.HANG_HALT
    idle = [hang.CpuSample(A + 1 + i, 0x2 | IF, True, (A + 1 + i,))
            for i in range(hang.SAMPLES)]
    assert not hang.judge(idle).hung


def test_hlt_and_mwait_block_stepping():
    assert hang.blocks_stepping(b"\xf4\x90\x90")
    assert hang.blocks_stepping(b"\x0f\x01\xc9")
    assert not hang.blocks_stepping(b"\xeb\xfe\x90")       # jmp .: steps fine
    assert not hang.blocks_stepping(b"")


def test_serial_tail_strips_escapes_and_keeps_the_last_lines():
    raw = (b"\x1b[2J\x1b[01;01HBdsDxe: starting\r\n\r\n"
           + b"".join(f"line {i}\r\n".encode() for i in range(20))
           + b"!!!! X64 Exception Type - 0E(#PF - Page-Fault) !!!!\r\n")
    tail = hang.serial_tail(raw)
    assert len(tail) == hang.SERIAL_TAIL_LINES
    assert tail[-1] == "!!!! X64 Exception Type - 0E(#PF - Page-Fault) !!!!"
    assert tail[0] == "line 13" and not any("\x1b" in t for t in tail)


def test_status_words_as_qemu_prints_them():
    notes = data.text(TRIPLE / "triple-notes.txt")
    status = next(ln.split(": ", 1)[1] for ln in notes.splitlines()
                  if ln.startswith("monitor info status:"))
    assert hang.status_word(status) == "shutdown"
    assert hang.is_shutdown("SIGQUIT", status)
    assert not hang.is_shutdown("SIGINT", status)
    assert not hang.reset_took_effect(status)
    assert hang.reset_took_effect("VM status: paused (prelaunch)")
    assert not hang.reset_took_effect("VM status: paused (debug)")
    assert hang.status_word("VM status: running") == "running"


def test_the_triple_fault_that_ends_the_log():
    log = data.text(TRIPLE / "qemu-d-int.txt")
    chain = hang.current_triple_fault(log)
    assert chain is not None and chain.vectors == [14, 14, 14]
    # After a reset the machine booted again: that triple fault is history.
    assert hang.current_triple_fault(log + "CPU Reset (CPU 0)\n") is None
    assert hang.current_triple_fault("") is None


def test_log_tail_starts_at_a_whole_record():
    log = data.text(TRIPLE / "qemu-d-int.txt").encode()
    padded = b"x" * 5000 + b"\n" + log
    tail = hang.log_tail_text(padded, len(log) + 10)
    assert tail.startswith("check_exception") or tail == log.decode()
    assert hang.current_triple_fault(tail).vectors == [14, 14, 14]


def _names(va):
    return faults.AddressName(va, faults.UNKNOWN, f"{va:#x} (in no known image)")


def test_explain_shutdown_with_the_log_is_a_triple_fault():
    log = data.text(TRIPLE / "qemu-d-int.txt")
    regs = data.registers(TRIPLE, "triple")
    idtr = data.tables(TRIPLE, "triple")["idt"]
    r = hang.explain_shutdown(log, "", regs, idtr, _names)
    assert r.kind == "triple-fault"
    first = qemulog.last_triple_fault(qemulog.parse_int_log(log)).first
    assert r.summary().startswith(f"the guest triple-faulted: #PF at {first.rip:#x}")
    assert ("; #PF delivering it -> #DF; #PF delivering the #DF -> triple fault; QEMU paused "
            "it instead of resetting") in r.summary()
    d = r.as_dict()
    assert d["triple_fault"]["vectors"] == [14, 14, 14] and d["cr2"] == regs["cr2"]
    assert any("IDT gate" in ln for ln in r.text())


def test_explain_shutdown_without_the_log_says_what_is_known():
    regs = data.registers(TRIPLE, "triple")
    r = hang.explain_shutdown(None, "QEMU's -d int log is not known", regs, None, _names)
    assert r.kind == "shutdown" and r.triple is None
    assert "-d int log is not known" in r.summary()
    assert f"{regs['rip']:#x}" in r.summary()
    other = hang.explain_shutdown("check_exception old: 0xffffffff new 0xe\n", "", regs,
                                  None, _names)
    assert other.kind == "shutdown" and "does not end with a triple fault" in other.log_note


def test_hang_report_summary_and_dict():
    samples = [spin(A, [A]) for _ in range(hang.SAMPLES)]
    v = hang.judge(samples)
    r = hang.HangReport(v, 13.2, "__start_xen", _names(A), samples, ["Xen 4.17"], "")
    assert r.summary() == (f"the guest hung: no stop at __start_xen within 13 s; the CPU is "
                           f"spinning at {A:#x} ({A:#x} (in no known image))")
    d = r.as_dict()
    assert d["state"] == "spin" and d["loop"] == [A] and d["console"] == ["Xen 4.17"]
    assert any("| Xen 4.17" in ln for ln in r.text())


def test_sampling_stops_as_soon_as_the_cpu_moves_on():
    moving = hang.CpuSample(A + 0x30, 0x2, False, tuple(A + 3 * i for i in range(17)))
    assert hang.refuted([moving])
    assert not hang.refuted([spin(A, [A, A + 2])])
    assert hang.refuted([spin(A, [A, A + 2]), spin(A + 0x80, [A + 0x80])])
    halted = hang.CpuSample(A + 1, 0x2 | IF, True, (A + 1,))
    assert not hang.refuted([halted, halted])
    assert hang.refuted([halted, hang.CpuSample(A + 9, 0x2 | IF, True, (A + 9,))])
    assert hang.refuted([halted, spin(A, [A])])
