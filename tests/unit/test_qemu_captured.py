"""QEMU-output parsers on real QEMU 7.2 output captured from the lab (tests/data/qemu72,
at __efi64_mb2_start and __start_xen; -m 1024; CRLF line ends as the monitor sends
them through GDB). Expected values are read from the captured text here with plain
string splitting, independently of the parsers' regular expressions."""

from __future__ import annotations

from pathlib import Path

import pytest

from gdbext.core.qemu import (MemoryMap, main_ram, parse_info_registers, parse_mtree_flat,
                              parse_xp_qwords)
from tests.oracles import parse_gva2gpa, parse_info_mem
from tests.qemu_tlb import parse_info_tlb

DATA = Path(__file__).resolve().parent.parent / "data" / "qemu72"
STOPS = ["entry", "start_xen"]


def text(name: str) -> str:
    return (DATA / name).read_text()


def lines(name: str):
    return [ln.strip() for ln in text(name).splitlines() if ln.strip()]


@pytest.mark.parametrize("stop", STOPS)
def test_info_mem(stop):
    expected = []
    for ln in lines(f"{stop}-info-mem.txt"):
        span, size, perms = ln.split()
        start, end = (int(x, 16) for x in span.split("-"))
        assert end - start == int(size, 16) and len(perms) == 3
        expected.append((start, end, perms[0] == "u", perms[2] == "w"))
    got = [(r.va, r.end, r.user, r.writable) for r in parse_info_mem(text(f"{stop}-info-mem.txt"))]
    assert got == expected
    # the capture has both read-only and writable ranges, so user/write are told apart
    assert {w for *_, w in expected} == {True, False} or stop == "start_xen"


def test_info_mem_user_and_writable_are_distinct_columns():
    assert [(r.user, r.writable) for r in parse_info_mem(
        "0000000000001000-0000000000002000 0000000000001000 ur-\r\n"
        "0000000000002000-0000000000003000 0000000000001000 -rw\r\n")] == [(True, False),
                                                                           (False, True)]


@pytest.mark.parametrize("stop", STOPS)
def test_gva2gpa(stop):
    blocks = text(f"{stop}-gva2gpa.txt").split("(qemu) gva2gpa ")[1:]
    assert len(blocks) >= 4
    answers = set()
    for block in blocks:
        va_text, answer = block.split("\n", 1)
        answer = answer.strip()
        if answer == "Unmapped":
            expected = None
        else:
            assert answer.startswith("gpa: 0x")
            expected = int(answer[len("gpa: 0x"):], 16)
        answers.add(expected is None)
        assert parse_gva2gpa(answer) == expected, va_text
    assert answers == {True, False}        # both kinds of answer were captured


def test_gva2gpa_on_the_entry_rip_is_the_identity():
    # OVMF identity-maps RAM: RIP's gpa (first block) equals the VA asked for.
    va_text, answer = text("entry-gva2gpa.txt").split("(qemu) gva2gpa ")[1].split("\n", 1)
    assert parse_gva2gpa(answer) == int(va_text.strip(), 16)


def _mtree_memory_view():
    """Regions of the FlatView listing AS "memory", by splitting lines by hand."""
    view, in_memory = [], False
    for ln in text("entry-info-mtree-f.txt").splitlines():
        if ln.startswith("FlatView"):
            if in_memory:
                break
            view = []
            continue
        if ln.strip().startswith('AS "memory"'):
            in_memory = True
        elif "(prio" in ln:
            span, rest = ln.strip().split(" (prio ", 1)
            kind = rest.split(", ", 1)[1].split(")", 1)[0]
            name = rest.split("): ", 1)[1].split()[0]
            lo, hi = (int(x, 16) for x in span.split("-"))
            view.append((lo, hi + 1, kind, name))
    assert in_memory
    return view


def test_mtree_flat_memory_view():
    expected = _mtree_memory_view()
    regions = parse_mtree_flat(text("entry-info-mtree-f.txt"))
    assert [(r.start, r.end, r.kind, r.name) for r in regions] == expected
    assert any(name == "pc.ram" for *_, name in expected)
    assert parse_mtree_flat(text("entry-info-mtree-f.txt"), "no such AS") == []


def test_main_ram_and_memory_map():
    view = _mtree_memory_view()
    regions = parse_mtree_flat(text("entry-info-mtree-f.txt"))
    pc_ram = sorted((lo, hi) for lo, hi, kind, name in view if kind == "ram" and name == "pc.ram")
    assert main_ram(regions) == pc_ram and len(pc_ram) >= 2
    ram_top = max(hi for _, hi in pc_ram)
    assert ram_top == 1024 << 20                     # the lab's -m 1024, below 4 GiB
    mm = MemoryMap(regions)
    readable = [(lo, hi) for lo, hi, kind, _ in view if kind in ("ram", "rom", "romd")]
    for lo, hi in readable:
        assert mm.contains(lo) and mm.contains(hi - 8, 8)
    assert mm.contains(ram_top - 4096, 4096) and not mm.contains(ram_top - 4, 8)
    # readable regions that abut (pc.ram's ROM part, then pc.rom) are one span
    abut = [(a_hi, b) for (_, a_hi), b in zip(readable, readable[1:]) if b[0] == a_hi]
    assert abut and all(mm.contains(edge - 8, 16) for edge, _ in abut)
    io = [(lo, hi) for lo, hi, kind, _ in view if kind == "i/o"]
    assert io and not any(mm.contains(lo) for lo, _ in io
                          if not any(a <= lo < b for a, b in readable))
    assert mm.ram_top == max(hi for _, hi in readable)


@pytest.mark.parametrize("stop", STOPS)
def test_info_registers(stop):
    expected = {}
    for ln in lines(f"{stop}-info-registers.txt"):
        for word in ln.replace(" =", "=").split():
            name, sep, value = word.partition("=")
            if sep and name.isupper() and len(value) in (8, 16) and all(
                    c in "0123456789abcdef" for c in value):
                expected[name.lower()] = int(value, 16)
    regs = parse_info_registers(text(f"{stop}-info-registers.txt"))
    for name in ("rip", "rsp", "rax", "rbx", "r8", "cr0", "cr3", "cr4", "efer"):
        assert regs[name] == expected[name], name
    assert regs == expected
    run = __import__("json").loads(text(f"{stop}-run.json"))
    assert regs["rip"] == run["rip"]          # what xen-run-to saw at the same stop


@pytest.mark.parametrize("stop", STOPS)
def test_xp_qwords(stop):
    expected = []
    for ln in lines(f"{stop}-xp-cr3.txt"):
        addr, words = ln.split(":")
        assert int(addr, 16) % 16 == 0
        expected.extend(int(w, 16) for w in words.split())
    assert len(expected) == 64
    assert parse_xp_qwords(text(f"{stop}-xp-cr3.txt")) == expected
    # the L4 read is the one CR3 names
    cr3 = parse_info_registers(text(f"{stop}-info-registers.txt"))["cr3"]
    assert int(lines(f"{stop}-xp-cr3.txt")[0].split(":")[0], 16) == cr3 & ~0xFFF


@pytest.mark.parametrize("name", ["entry-info-tlb-sample.txt", "start_xen-info-tlb.txt"])
def test_info_tlb(name):
    expected = []
    for ln in lines(name):
        va, pa, flags = ln.replace(":", "").split()
        assert len(flags) == 9
        expected.append((int(va, 16), int(pa, 16), flags[0] == "X", flags[1] == "G",
                         flags[2] == "P", flags[7] == "U", flags[8] == "W"))
    got = [(t.va, t.pa, t.nx, t.global_, t.large, t.user, t.writable)
           for t in parse_info_tlb(text(name))]
    assert got == expected
    # the sample covers NX and non-NX, large and 4 KiB leaves
    assert {e[2] for e in expected} == {True, False} or name.startswith("start_xen")
    assert {e[4] for e in expected} == {True, False}
