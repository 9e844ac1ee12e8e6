"""Issue 2 and 3 on a real boot: registers, xen-pt and xen-va2pa against QEMU's own monitor.

Expected values come from QEMU (info registers, info mem, gva2gpa), from Xen's
console and from xen-syms, never from constants in this file.
"""

from __future__ import annotations

import bisect
import json
import random
import re
from pathlib import Path

import pytest

from gdbext import paths
from gdbext.core.xensyms import load_xen_syms
from tests.qemu_tlb import parse_info_tlb

from ..oracles import parse_gva2gpa, parse_info_mem
from .conftest import matrix_params, stop_of_build

INGDB = Path(__file__).with_name("ingdb.py")
STOPS = ["at_entry", "at_start_xen", "at_construct_dom0"]
# The matrix: the entry and __start_xen on every build; construct_dom0 on the default one.
MATRIX_STOPS = matrix_params("at_entry", "at_start_xen") + [
    pytest.param("at_construct_dom0", paths.DEFAULT_BUILD, id="at_construct_dom0")]


def coalesce_like_info_mem(ranges):
    """Our ranges keyed only by what 'info mem' shows: contiguous VA, same user/write."""
    out = []
    for r in ranges:
        key = (r["user"], r["writable"])
        if out and out[-1][1] == r["va"] and out[-1][2] == key:
            out[-1][1] = r["end"]
        else:
            out.append([r["va"], r["end"], key])
    return [(va, end, u, w) for va, end, (u, w) in out]


@pytest.mark.parametrize("stop_name,build", MATRIX_STOPS)
def test_control_registers_match_qemu(request, stop_name, build):
    stop = stop_of_build(request, stop_name, build)
    ours = stop.json("xen-regs --json")
    qemu = stop.qemu_registers()
    for name in ("cr0", "cr3", "cr4", "efer", "rip"):
        assert ours[name] == qemu[name], name
    assert ours["mode"] == "4-level"
    assert ours["root"] == qemu["cr3"] & ~0xFFF


def test_entry_is_at_load_address(at_entry, xen_syms_path):
    syms = load_xen_syms(xen_syms_path)
    run = at_entry.run
    assert run["at"] == "load address"
    # RIP == B + offset with B from Xen's console (not from this RIP) is checked in
    # test_load_base.py, on a boot of its own that runs on to the console line.
    assert run["rip"] == at_entry.qemu_registers()["rip"]
    # The multiboot2 boot loader's magic is in EAX at the EFI entry (multiboot2 spec).
    eax = int(at_entry.cmd("p/x $eax").out.split("=")[1], 16)
    assert eax == 0x36D76289
    # The bytes at RIP are Xen's, straight from the ELF.
    out = at_entry.cmd("x/16xb $pc").out
    seen = bytes(int(b, 16) for line in out.splitlines() for b in line.split(":")[1].split())
    assert seen == syms.read_linked(syms.linked_va("__efi64_mb2_start"), 16)


@pytest.mark.parametrize("stop_name,build", MATRIX_STOPS)
def test_xen_pt_equals_info_mem(request, stop_name, build):
    stop = stop_of_build(request, stop_name, build)
    ours = stop.json("xen-pt --json")
    qemu = [(r.va, r.end, r.user, r.writable) for r in parse_info_mem(stop.monitor("info mem"))]
    assert qemu, "QEMU's info mem printed no ranges"
    assert coalesce_like_info_mem(ours["ranges"]) == qemu
    assert ours["root"] == stop.qemu_registers()["cr3"] & ~0xFFF


TLB_STRIDE = 997     # every Nth leaf of 'info tlb' (prime: no alignment with table sizes)


def _tlb_sample(leaves):
    """Every TLB_STRIDE-th leaf, plus both leaves at each place where the leaves stop
    being one run (flags change, PA not contiguous, a VA gap): the range edges."""
    stride = TLB_STRIDE if len(leaves) > 20 * TLB_STRIDE else 1     # short lists: all
    picked = set(range(0, len(leaves), stride)) | {len(leaves) - 1}
    for i in range(1, len(leaves)):
        a, b = leaves[i - 1], leaves[i]
        size = (b.va - a.va) if a.large else 0x1000
        if (a.nx, a.user, a.writable, a.global_, a.large) != (
                b.nx, b.user, b.writable, b.global_, b.large) or b.va - a.va != b.pa - a.pa \
                or (not a.large and b.va - a.va != size):
            picked |= {i - 1, i}
    return [leaves[i] for i in sorted(picked)]


@pytest.mark.parametrize("stop_name", STOPS)
def test_xen_pt_equals_info_tlb(request, stop_name):
    """PA, NX, global bit and page size (4 KiB or large) of sampled leaves, against
    QEMU's 'info tlb', which prints every leaf with the leaf entry's own flags.
    G is compared as equal; NX, user and write one way, since ours are effective
    (NX ORed, user/write ANDed over the levels: Xen sets NX in upper-level entries)
    and QEMU's are the leaf entry's own."""
    stop = request.getfixturevalue(stop_name)
    ranges = stop.json("xen-pt --json")["ranges"]
    leaves = parse_info_tlb(stop.monitor("info tlb"))
    assert len(leaves) > 100, "QEMU's info tlb printed almost nothing"
    starts = [r["va"] for r in ranges]
    sample = _tlb_sample(leaves)
    assert len(sample) >= 50
    nx_leaves = 0
    for leaf in sample:
        i = bisect.bisect_right(starts, leaf.va) - 1
        assert i >= 0 and ranges[i]["va"] <= leaf.va < ranges[i]["end"], hex(leaf.va)
        r = ranges[i]
        where = (hex(leaf.va), r)
        assert r["pa"] + (leaf.va - r["va"]) == leaf.pa, where
        assert (r["page_size"] > 0x1000) == leaf.large, where
        assert r["global"] == leaf.global_, where
        # ours are effective (NX ORed, user/write ANDed over the levels), QEMU's the leaf's
        assert not leaf.nx or r["nx"], where
        assert (not r["user"] or leaf.user) and (not r["writable"] or leaf.writable), where
        nx_leaves += leaf.nx
    if stop_name == "at_entry":
        assert nx_leaves, "no NX leaf sampled where OVMF maps NX pages"
    # The other way: every range of ours starts at a leaf QEMU prints (or inside a
    # large one), so neither side maps what the other does not.
    tlb_vas = [t.va for t in leaves]
    for r in ranges[::max(1, len(ranges) // 64)] + ranges[-1:]:
        j = bisect.bisect_right(tlb_vas, r["va"]) - 1
        assert j >= 0, hex(r["va"])
        t = leaves[j]
        assert t.va == r["va"] or (t.large and t.va < r["va"] < t.va + r["page_size"]), hex(r["va"])
        assert t.pa + (r["va"] - t.va) == r["pa"], hex(r["va"])

def _probe_addresses(ranges, count, rng):
    """Edges of every range and of the holes around it, plus random picks inside."""
    vas = set()
    for r in ranges:
        va, end = r["va"], r["end"]
        for a in (va, va + 1, end - 1, end - 0x1000, va - 1, end, (va + end) // 2):
            if 0 <= a < 1 << 64:
                vas.add(a)
    spans = [(r["va"], r["end"]) for r in ranges]
    while len(vas) < count:
        va, end = rng.choice(spans)
        vas.add(rng.randrange(va, end))
        # and some unmapped neighbours, canonical lower half
        vas.add(rng.randrange(0, 1 << 47) & ~0xFFF)
    return sorted(vas)


def test_linear_slot_is_a_reported_cycle(at_construct_dom0, xen_syms_path):
    """Xen's linear slot points the L4 at itself: the walk terminates, reports it,
    and (checked above) still matches QEMU's info mem, which follows it too."""
    pt = at_construct_dom0.json("xen-pt --json")
    root = pt["root"]
    cycles = [n for n in pt["notes"] if n["kind"] == "cycle"]
    top = [n for n in cycles if n["level"] == 4]
    assert len(top) == 1 and top[0]["target"] == root and top[0]["entry_pa"] - root == (
        ((top[0]["va"] >> 39) & 511) * 8)
    syms = load_xen_syms(xen_syms_path)
    load_base = at_construct_dom0.run["load_base"]
    assert root == load_base + syms.offset("idle_pg_table")
    walk = at_construct_dom0.json(f"xen-va2pa {top[0]['va']:#x} --json")
    # Through the linear slot the L4 is read again as the L3 of that slot.
    assert [lv["table"] for lv in walk["levels"][:2]] == [root, root]


@pytest.mark.parametrize("stop_name,build", MATRIX_STOPS)
def test_va2pa_equals_gva2gpa(request, stop_name, build):
    stop = stop_of_build(request, stop_name, build)
    ranges = stop.json("xen-pt --json")["ranges"]
    rng = random.Random(1234)
    vas = [va for va in _probe_addresses(ranges, 1000, rng)
           if va < (1 << 47) or va >= (1 << 64) - (1 << 47)]  # canonical only
    assert len(vas) >= 1000
    stop.cmd(f"python import sys; sys.path.insert(0, {str(INGDB.parent)!r}); import ingdb")
    rows = json.loads(stop.cmd(f"python print(ingdb.compare_va2pa({vas!r}))",
                               timeout=600).out)
    mapped = 0
    for row in rows:
        expected = parse_gva2gpa(row["qemu"])
        assert row["ours"] == expected, (hex(row["va"]), row)
        if expected is not None:
            mapped += 1
        else:
            assert row["fault"], hex(row["va"])
    assert 0 < mapped < len(rows)


def test_bad_input_gives_one_line_and_restores_phys_mode(at_entry):
    ram_end = max(int(m.group(2), 16) + 1 for m in re.finditer(
        r"([0-9a-f]+)-([0-9a-f]+) \(prio \d+, ram\): pc\.ram", at_entry.monitor("info mtree -f")))
    cases = {
        f"xen-pt --root {ram_end + 0x100000:#x}": "not RAM",
        "xen-pt --root 0x1001": "not 4096-byte aligned",
        "xen-va2pa 0x0000800000000000": "non-canonical",
        "xen-pt --range 0x2000 0x1000": "end must be above the start",
        "xen-va2pa": "required",
        "xen-va2pa nosuchsymbol_xyz": "no symbol 'nosuchsymbol_xyz'",   # not GDB's misleading words
        "xen-pt --bogus": "unrecognized arguments",
        "xen-pt --root 0x10000000000000": "physical address",
    }
    for command, fragment in cases.items():
        reply = at_entry.gdb.execute(command, check=False)
        assert reply.error, command
        assert fragment in reply.error, (command, reply.error)
        assert "\n" not in reply.error and "Traceback" not in reply.error + reply.out
        assert at_entry.phymem_mode() == "0", command
    # GDB still works, with virtual addresses.
    assert "cld" in at_entry.cmd("x/i $pc").out


def test_monitor_xp_reads_the_same_tables_as_the_packet(at_entry):
    """The fallback for stubs without Qqemu.PhyMemMode ('set xen-phys-read monitor-xp')
    reads physical memory through QEMU's monitor: the same ranges and walks as the
    packet, PhyMemMode never switched on, and writes refused (the monitor cannot write)."""
    by_packet = at_entry.json("xen-pt --json")
    walk_packet = at_entry.json("xen-va2pa $pc --json")
    try:
        at_entry.cmd("set xen-phys-read monitor-xp")
        assert "monitor-xp" in at_entry.cmd("show xen-phys-read").out
        by_xp = at_entry.json("xen-pt --json", timeout=300)
        assert at_entry.phymem_mode() == "0"
        assert by_xp["ranges"] == by_packet["ranges"] and by_xp["root"] == by_packet["root"]
        assert at_entry.json("xen-va2pa $pc --json") == walk_packet
        refused = at_entry.gdb.execute("xen-l4merge-apply", check=False)
        assert refused.error and "Qqemu.PhyMemMode" in refused.error
        assert "\n" not in refused.error
    finally:
        at_entry.cmd("set xen-phys-read auto")
    assert at_entry.json("xen-pt --json")["ranges"] == by_packet["ranges"]


def test_ctrl_c_in_the_middle_of_a_walk_restores_phys_mode(at_entry):
    """Ctrl-C while xen-pt reads OVMF's 1,028 table pages (about 0.3 s cold): one line,
    no traceback, PhyMemMode back to 0, and the next command works. The interrupt is
    sent at a few delays until one lands mid-walk (the walk's length varies by machine)."""
    import threading

    full = at_entry.json("xen-pt --json")
    drop_cache = ("python __import__('gdbext.gdb_layer.context', "
                  "fromlist=['CONTEXT']).CONTEXT.target.invalidate()")
    interrupted = 0
    for delay in (0.05, 0.1, 0.15, 0.2, 0.03, 0.08):
        at_entry.cmd(drop_cache)
        timer = threading.Timer(delay, at_entry.gdb.interrupt)
        timer.start()
        reply = at_entry.gdb.execute("xen-pt --json", check=False)
        timer.join()
        assert at_entry.phymem_mode() == "0", delay
        assert "Traceback" not in reply.out + (reply.error or "")
        if reply.error:
            assert reply.error == "xen-pt: interrupted", reply.error
            interrupted += 1
        else:
            assert reply.json()["ranges"] == full["ranges"]
    assert interrupted, "no interrupt landed during a walk"
    assert at_entry.json("xen-pt --json")["ranges"] == full["ranges"]


def test_5level_reading_of_a_4level_root_with_limit_prints_a_handful_quickly(at_entry):
    """CR3's 4-level root read as a PML5 maps a huge number of ranges (523,272 lines
    before the limit stopped the enumeration): --limit 5 stops it early."""
    import time
    start = time.monotonic()
    reply = at_entry.cmd("xen-pt --mode 5-level --limit 5")
    seconds = time.monotonic() - start
    lines = reply.out.splitlines()
    assert lines[0].startswith("5-level paging") and "the first 5 ranges" in lines[0]
    assert len(lines) <= 5 + 5 + 8, lines          # head, table header, ranges, notes, tail
    assert any("stopped the enumeration" in line for line in lines)
    full = at_entry.json("xen-pt --mode 5-level --json", timeout=300)
    limited = at_entry.json("xen-pt --mode 5-level --limit 5 --json")
    assert limited["ranges"] == full["ranges"][:5]
    print(f"\nxen-pt --mode 5-level --limit 5: {len(lines)} lines in {seconds:.2f} s; "
          f"without --limit: {len(full['ranges'])} ranges, {len(full['notes'])} notes, "
          f"stopped={full['stopped']!r}")


@pytest.mark.parametrize("command,words", [
    ("xen-pt --limit -1", "must be 0 or more"),
    ("xen-locate --base -1", "not a plausible load base"),
    ("xen-locate --base 0x100000000000", "not a plausible load base"),
])
def test_impossible_values_are_refused_in_one_line(at_entry, command, words):
    before = at_entry.gdb.execute("xen-info --json", check=False)
    reply = at_entry.gdb.execute(command, check=False)
    assert reply.error is not None and words in reply.error and "\n" not in reply.error
    assert reply.out == ""
    # Nothing was stored: B is what it was.
    after = at_entry.gdb.execute("xen-info --json", check=False)
    assert after.out == before.out
