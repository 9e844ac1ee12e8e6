"""The RFC's merged L4: prediction and the checks I0-I13, on the real Debian
xen-syms loaded at a synthetic load base over firmware-like identity tables.

Every Xen number (slots, table names, offsets) is derived from xen-syms here;
the page-table entries of the synthetic firmware are encoded by hand
(merge_builders), independently of the core's decoder.
"""

from __future__ import annotations

import dataclasses
import json
import random
import struct

import pytest

from gdbext import paths
from gdbext.core import bootstops, merge_catalog
from gdbext.core.errors import GdbextError
from gdbext.core.memory import SyntheticMemory
from gdbext.core.merge_catalog import (CALL_CHECKS, CHECK_IDS, CHECKS, CHECKS_AT_STOP, FAIL, PASS,
                                       SKIP, WARN)
from gdbext.core.merge_checks import CHECK_TABLE, MergeState, run_checks
from gdbext.core.merge_predict import predict_merge
from gdbext.core.merge_report import render_text, results_as_dict
from gdbext.core.multiboot2 import parse_mbi
from gdbext.core.xensyms import load_xen_syms

from ..oracles import message_table, nm_table, table_read_sites
from .merge_builders import (A, CR0_PE, CR0_PG, CR4_LA57, CR4_PAE, EFER_LME, MBI_PA, NX, P,
                             PAGE, PS, RAM, RW, SIZE_1G, SIZE_2M, STACK_TOP, SymsWith, build_mbi,
                             entry_guest, trampoline_relocate, u64)

SCRATCH = 0x0500_0000      # a page of firmware RAM for odd test bytes
FOREIGN_TABLE = 0x0700_0000


@pytest.fixture(scope="module")
def syms():
    return load_xen_syms(paths.XEN_DEBIAN_SYMS)


# --- facts derived from xen-syms (never written as numbers) ------------------------------

def offset_of_table_at(syms, link_addr: int):
    """The boot table whose offset from __image_base__ is ``link_addr``."""
    for table, sym in syms.boot_tables():
        if syms.offset(sym.value) == link_addr:
            return table.name
    return None


def xen_slot(syms) -> int:
    """The L4 slot of XEN_VIRT_START (efi_multiboot2's linked VA is in it)."""
    return (syms.linked_va("efi_multiboot2") >> 39) & 511


def idle_link(syms, i: int) -> int:
    return syms.link_qwords("idle_pg_table")[i]


def pa(syms, b: int, name: str) -> int:
    return b + syms.offset(name)


def xenmap_slots(syms):
    return (syms.offset(syms.image_start) >> 21, syms.offset(syms.image_end - 1) >> 21)


def by_id(results):
    return {r.id: r for r in results}


# --- scenario helpers ---------------------------------------------------------------------

def predicted(syms, relocate, guest=None, **kw):
    g = guest or entry_guest(syms)
    pred = predict_merge(syms, g.mem, g.load_base, g.firmware_root, relocate=relocate, **kw)
    return g, pred


def state_for(g, pred, **kw):
    args = dict(regs=dict(g.regs), firmware_root=g.firmware_root, firmware_cr3=g.regs["cr3"],
                merged_root=pred.root if pred is not None else None,
                stop="__efi64_mb2_start")
    args.update(kw)
    mem = args.pop("mem", pred.mem if pred is not None else g.mem)
    return MergeState(g.syms, g.load_base, mem, **args)


def check(state, cid):
    (r,) = run_checks(state, only=[cid])
    assert r.id == cid and r.title == CHECKS[cid].title
    return r


@pytest.fixture(scope="module")
def plain(syms):
    return predicted(syms, relocate=False)


@pytest.fixture(scope="module")
def relocated(syms):
    return predicted(syms, relocate=True)


# --- the headline: why the RFC's call cannot work, and the fix ---------------------------

def test_plain_prediction_fails_naming_slot_261_and_l3_xenmap(syms, plain):
    g, pred = plain
    slot = xen_slot(syms)
    link = idle_link(syms, slot)
    target = offset_of_table_at(syms, link & ~0xFFF)
    assert target == "l3_xenmap"
    results = by_id(run_checks(state_for(g, pred)))
    for cid in ("I3", "I4", "I6"):
        r = results[cid]
        assert r.status == FAIL, r
        assert f"M[{slot}]" in r.summary and target in r.summary and "unrelocated" in r.summary
    fault = results["I6"].evidence["fault"]
    assert fault["where"] == f"M[{slot}]" and fault["kind"] == "unrelocated"
    assert fault["target_pa"] == link & ~0xFFF
    assert fault["expected_pa"] == pa(syms, g.load_base, "l3_xenmap")
    assert fault["target_name"] == target
    # The walk of efi_multiboot2's linked VA goes through M[slot] into firmware memory.
    steps = results["I6"].evidence["walk"]
    assert steps[0]["index"] == slot and steps[1]["table"] == link & ~0xFFF
    assert not merge_catalog.ok(results.values())


GUESTS = {
    "2M pages, GRUB's first base": {},
    "1G pages": {"page_size": SIZE_1G},
    "low base": {"load_base": 0x0800_0000},
    "3 GiB of RAM": {"ram_top": 3 << 30},
}


@pytest.mark.parametrize("guest", list(GUESTS))
def test_plain_fails_and_relocated_passes_on_other_guests(syms, guest):
    g = entry_guest(syms, **GUESTS[guest])
    plain_results = by_id(run_checks(state_for(g, predict_merge(
        syms, g.mem, g.load_base, g.firmware_root))))
    assert [c for c in CALL_CHECKS if plain_results[c].status == FAIL] == ["I3", "I4", "I6"]
    g = entry_guest(syms, **GUESTS[guest])
    pred = predict_merge(syms, g.mem, g.load_base, g.firmware_root, relocate=True)
    results = by_id(run_checks(state_for(g, pred)))
    assert {c: results[c].status for c in CALL_CHECKS} == {c: PASS for c in CALL_CHECKS}


def test_skips_name_what_is_missing(syms):
    g = entry_guest(syms)
    st = MergeState(syms, g.load_base, g.mem, dict(g.regs))
    results = by_id(run_checks(st))
    for cid in ("I1", "I3", "I4", "I6", "I7", "I10", "I12"):
        assert results[cid].status == SKIP and "no merged table" in results[cid].summary
    for cid in ("I2", "I8"):
        assert results[cid].status == SKIP and "firmware" in results[cid].summary, cid
    assert results["I9"].status == SKIP


def test_relocated_prediction_passes_every_call_check(syms, relocated):
    g, pred = relocated
    results = by_id(run_checks(state_for(g, pred)))
    for cid in CALL_CHECKS:
        assert results[cid].status == PASS, results[cid]
    assert merge_catalog.ok(results.values())
    i6 = results["I6"].evidence
    assert i6["pa"] == pa(syms, g.load_base, "efi_multiboot2")
    assert i6["bytes_compared"] == syms.lookup("efi_multiboot2").size


def test_call_checks_and_stop_table_are_consistent():
    assert set(CALL_CHECKS) <= set(CHECK_IDS)
    assert set(CHECKS_AT_STOP) == set(bootstops.STOP_ORDER)
    for ids in CHECKS_AT_STOP.values():
        assert set(ids) <= set(CHECK_IDS)
    assert CHECK_IDS == tuple(f"I{i}" for i in range(14))


# --- the prediction itself ----------------------------------------------------------------

def test_prediction_is_the_patch_and_does_not_write_the_guest(syms):
    g = entry_guest(syms)
    b = g.load_base
    scratch = pa(syms, b, "l3_bootmap")
    before = {p: g.mem.read_phys(p, PAGE) for p in (scratch, pa(syms, b, "l2_xenmap"),
                                                    pa(syms, b, "l2_bootmap"))}
    pred = predict_merge(syms, g.mem, b, g.firmware_root)
    assert pred.table_source == "l3_bootmap" and pred.root == scratch and not pred.relocated
    for p, data in before.items():
        assert g.mem.read_phys(p, PAGE) == data          # the guest is untouched
    m = struct.unpack("<512Q", pred.mem.read_phys(pred.root, PAGE))
    f = struct.unpack("<512Q", g.mem.read_phys(g.firmware_root, PAGE))
    assert m[:256] == f[:256]
    assert list(m[256:]) == syms.link_qwords("idle_pg_table")[256:]
    # The fills, as the patch's loops compute them.
    first, last = xenmap_slots(syms)
    for slot in range(first, last + 1):
        want = (b + slot * SIZE_2M) | PS | 0x163
        assert u64(pred.mem, pa(syms, b, "l2_xenmap") + 8 * slot) == want
    lo = (b + syms.offset("_start")) >> 21
    hi = (b + syms.offset(syms.image_end - 1)) >> 21
    for slot in range(lo, hi + 1):
        want = (slot * SIZE_2M) | PS | 0x163
        assert u64(pred.mem, pa(syms, b, "l2_bootmap") + 8 * slot) == want
        assert u64(pred.mem, pa(syms, b, "l2_directmap") + 8 * slot) == want
    # writes + originals: exactly the bytes that differ, and undoable.
    copy = SyntheticMemory(ram_size=g.mem.ram_size, base=g.mem)
    for addr, data in pred.writes.items():
        assert pred.originals[addr] == g.mem.read_phys(addr, len(data))
        copy.write(addr, data)
    for page in pred.mem.pages:
        assert copy.read_phys(page, PAGE) == pred.mem.read_phys(page, PAGE)
    assert len(pred.writes[pred.root]) == PAGE
    names = {e.name for e in pred.entries}
    assert f"M[{xen_slot(syms)}]" in names and f"l2_xenmap[{first}]" in names
    n_fill = (last - first + 1) + 2 * (hi - lo + 1)
    n_m = sum(1 for e in m if e)
    assert len(pred.entries) == n_fill + n_m


def test_relocated_prediction_adds_b_once_where_trampoline_setup_would(syms, relocated):
    g, pred = relocated
    b = g.load_base
    m = struct.unpack("<512Q", pred.mem.read_phys(pred.root, PAGE))
    link = syms.link_qwords("idle_pg_table")
    for i in range(256, 512):
        assert m[i] == (link[i] + b if link[i] & P else link[i])
    assert pred.mem.read_phys(pa(syms, b, "idle_pg_table"), PAGE) == \
        g.mem.read_phys(pa(syms, b, "idle_pg_table"), PAGE)   # M is a copy
    lo, hi = pa(syms, b, "__page_tables_start"), pa(syms, b, "__page_tables_end")
    for table, sym in syms.boot_tables():
        if table.name in ("idle_pg_table",):
            continue
        start = b + syms.offset(sym.value)
        links = syms.link_qwords(sym.value, 512 * table.pages)
        now = struct.unpack(f"<{512 * table.pages}Q",
                            pred.mem.read_phys(start, PAGE * table.pages))
        inside = lo <= start < hi
        for i, (l_, n) in enumerate(zip(links, now)):
            if not l_ & P:
                continue
            assert n == (l_ + b if inside else l_), (table.name, i)
    # l1_directmap (absolute entries, below __page_tables) is left alone.
    assert not lo <= pa(syms, b, "l1_directmap") < hi


def test_fills_are_32_bit_stores(syms):
    g = entry_guest(syms)
    first, _ = xenmap_slots(syms)
    entry_pa = pa(syms, g.load_base, "l2_xenmap") + 8 * first
    g.mem.write_u64(entry_pa, NX)
    pred = predict_merge(syms, g.mem, g.load_base, g.firmware_root)
    assert u64(pred.mem, entry_pa) == NX | (g.load_base + first * SIZE_2M) | PS | 0x163


def test_table_choice(syms):
    g = entry_guest(syms)
    fake = dataclasses.replace(syms.lookup("l1_bootmap"), name="efi_l4_bootmap")
    patched = SymsWith(syms, extra={"efi_l4_bootmap": fake})
    pred = predict_merge(patched, g.mem, g.load_base, g.firmware_root)
    assert pred.table_source == "efi_l4_bootmap"
    assert pred.root == g.load_base + syms.offset(fake.value)
    pred = predict_merge(syms, g.mem, g.load_base, g.firmware_root, table_pa=SCRATCH)
    assert pred.table_source == "given" and pred.root == SCRATCH
    with pytest.raises(GdbextError, match="not 4 KiB aligned"):
        predict_merge(syms, g.mem, g.load_base, g.firmware_root, table_pa=SCRATCH + 8)


# --- I0 -----------------------------------------------------------------------------------

def test_i0(syms, relocated):
    g, pred = relocated
    assert check(state_for(g, pred), "I0").status == PASS
    regs = dict(g.regs, cr3=g.regs["cr3"] | 0x18)
    r = check(state_for(g, pred, regs=regs), "I0")
    assert r.status == FAIL and "CR3 low bits 0x18" in r.summary
    r = check(state_for(g, pred, firmware_cr3=g.firmware_root | 0x8), "I0")
    assert r.status == FAIL and "mov %cr3,%rsi" in r.summary
    r = check(state_for(g, pred, regs=dict(g.regs, cr4=CR4_PAE | CR4_LA57)), "I0")
    assert r.status == FAIL and "LA57" in r.summary
    r = check(state_for(g, pred, regs=dict(g.regs, efer=EFER_LME)), "I0")
    assert r.status == FAIL and "EFER.LMA=0" in r.summary
    r = check(state_for(g, pred, regs=dict(g.regs, cr0=CR0_PE)), "I0")
    assert r.status == FAIL and "CR0.PG=0" in r.summary
    regs = dict(g.regs)
    del regs["efer"]
    r = check(state_for(g, pred, regs=regs), "I0")
    assert r.status == SKIP and "efer" in r.summary


# --- I1 -----------------------------------------------------------------------------------

def test_i1(syms):
    g, pred = predicted(syms, True)
    captured = g.mem.read_phys(g.firmware_root, PAGE)
    assert check(state_for(g, pred, firmware_l4=captured), "I1").status == PASS
    # A and D differ (the CPU sets them while walking): still the same entry.
    m0 = u64(pred.mem, pred.root)
    pred.mem.write_u64(pred.root, m0 & ~A)
    assert check(state_for(g, pred), "I1").status == PASS
    pred.mem.write_u64(pred.root + 8 * 5, FOREIGN_TABLE | P | RW)
    r = check(state_for(g, pred), "I1")
    assert r.status == FAIL and "M[5]" in r.summary
    assert r.evidence["differ"][0] == {"slot": 5, "merged": FOREIGN_TABLE | P | RW, "firmware": 0}
    # The firmware adds an L4 entry after the copy (Jan): M no longer has it.
    g2, pred2 = predicted(syms, True)
    captured = g2.mem.read_phys(g2.firmware_root, PAGE)
    g2.mem.write_u64(g2.firmware_root + 8 * 7, FOREIGN_TABLE | P | RW)
    r = check(state_for(g2, pred2, firmware_l4=captured, mem=pred2.mem), "I1")
    assert r.status == FAIL and "changed its L4" in r.summary
    assert r.evidence["firmware_changed"][0]["slot"] == 7
    r = check(state_for(g, pred, firmware_root=None, firmware_cr3=None), "I1")
    assert r.status == SKIP and "firmware" in r.summary



def test_i1_sees_firmware_changes_in_the_upper_half_too(syms):
    """The firmware writing its L4's slots 256..511 after the copy is a change M
    does not have either (the re-read compares all 512 slots, not only 0..255)."""
    g, pred = predicted(syms, True)
    captured = g.mem.read_phys(g.firmware_root, PAGE)
    slot = 256 + 44                  # upper half: VA bit 47 set (SDM 4-level paging)
    assert u64(g.mem, g.firmware_root + 8 * slot) == 0
    g.mem.write_u64(g.firmware_root + 8 * slot, FOREIGN_TABLE | P | RW)
    r = check(state_for(g, pred, firmware_l4=captured, mem=pred.mem), "I1")
    assert r.status == FAIL and "changed its L4" in r.summary and f"slot {slot}" in r.summary
    assert r.evidence["firmware_changed"] == [
        {"slot": slot, "captured": 0, "now": FOREIGN_TABLE | P | RW}]

# --- I2 -----------------------------------------------------------------------------------

def test_i2(syms):
    g = entry_guest(syms)
    assert check(state_for(g, None), "I2").status == PASS
    g.mem.write_u64(g.firmware_root + 8 * 300, FOREIGN_TABLE | P | RW)
    r = check(state_for(g, None), "I2")
    assert r.status == FAIL and "slot 300" in r.summary
    # The captured copy is what counts when there is one.
    clean = bytes(PAGE)
    assert check(state_for(g, None, firmware_l4=clean), "I2").status == PASS
    r = check(state_for(g, None, firmware_root=None, firmware_cr3=None), "I2")
    assert r.status == SKIP


# --- I3 / I4: pointer classes -------------------------------------------------------------

def test_i3_classes(syms):
    slot = xen_slot(syms)
    link = idle_link(syms, slot)
    cases = {
        "relocated-twice": lambda b: link + 2 * b,
        "foreign": lambda b: FOREIGN_TABLE | (link & 0xFFF),
        "unrelocated": lambda b: link,
    }
    for kind, value in cases.items():
        g, pred = predicted(syms, True)
        pred.mem.write_u64(pred.root + 8 * slot, value(g.load_base))
        r = check(state_for(g, pred), "I3")
        assert r.status == FAIL and kind in r.summary and f"M[{slot}]" in r.summary
        assert r.evidence["faults"][0]["kind"] == kind
        assert r.evidence["kinds"] == {kind: 1}
    # An entry the idle table does not have: foreign.
    g, pred = predicted(syms, True)
    spare = next(i for i in range(256, 512) if not idle_link(syms, i) & P)
    pred.mem.write_u64(pred.root + 8 * spare, FOREIGN_TABLE | P | RW)
    r = check(state_for(g, pred), "I3")
    assert r.status == FAIL and r.evidence["faults"][0]["where"] == f"M[{spare}]"
    assert r.evidence["faults"][0]["kind"] == "foreign"
    # An entry missing: not present.
    g, pred = predicted(syms, True)
    pred.mem.write_u64(pred.root + 8 * slot, 0)
    r = check(state_for(g, pred), "I3")
    assert r.status == FAIL and r.evidence["faults"][0]["kind"] == "not-present"
    assert check(state_for(g, pred, merged_root=None), "I3").status == SKIP


def test_i4_follows_the_tables_and_classifies(syms):
    g, pred = predicted(syms, True)
    b = g.load_base
    r = check(state_for(g, pred), "I4")
    assert r.status == PASS and r.evidence["pointers"] > 2
    # l3_xenmap's pointer to l2_xenmap relocated twice.
    l3 = syms.link_qwords("l3_xenmap")
    idx = next(i for i, e in enumerate(l3)
               if e & P and offset_of_table_at(syms, e & ~0xFFF) == "l2_xenmap")
    pred.mem.write_u64(pa(syms, b, "l3_xenmap") + 8 * idx, l3[idx] + 2 * b)
    r = check(state_for(g, pred), "I4")
    f = r.evidence["faults"][0]
    assert r.status == FAIL and f["where"] == f"l3_xenmap[{idx}]"
    assert f["kind"] == "relocated-twice" and f["target_name"] == "l2_xenmap"
    assert "relocated-twice" in r.summary
    # A foreign pointer where the ELF has one; a run-time pointer out of the image.
    g, pred = predicted(syms, True)
    l3d = syms.link_qwords("l3_directmap")
    j = next(i for i, e in enumerate(l3d) if e & P)
    pred.mem.write_u64(pa(syms, b, "l3_directmap") + 8 * j, FOREIGN_TABLE | P | RW)
    spare = next(i for i, e in enumerate(l3) if not e & P)
    pred.mem.write_u64(pa(syms, b, "l3_xenmap") + 8 * spare, FOREIGN_TABLE | P | RW)
    r = check(state_for(g, pred), "I4")
    kinds = {f["where"]: f["kind"] for f in r.evidence["faults"]}
    assert kinds == {f"l3_directmap[{j}]": "foreign", f"l3_xenmap[{spare}]": "outside-image"}
    assert r.evidence["kinds"] == {"foreign": 1, "outside-image": 1}


# --- I5 -----------------------------------------------------------------------------------

def test_i5(syms):
    g, pred = predicted(syms, True)
    assert check(state_for(g, pred), "I5").status == PASS
    # Nothing filled yet (the guest at entry): every slot wrong.
    r = check(state_for(g, None), "I5")
    first, last = xenmap_slots(syms)
    assert r.status == FAIL and len(r.evidence["bad"]) == last - first + 1
    # One slot off by 2 MiB.
    entry_pa = pa(syms, g.load_base, "l2_xenmap") + 8 * first
    good = u64(pred.mem, entry_pa)
    pred.mem.write_u64(entry_pa, good + SIZE_2M)
    r = check(state_for(g, pred), "I5")
    assert r.status == FAIL and f"l2_xenmap[{first}]" in r.summary
    assert r.evidence["bad"] == [{"slot": first, "entry_pa": entry_pa, "found": good + SIZE_2M,
                                  "expected": good, "reserved": 0}]
    # Above MAXPHYADDR: reserved.
    pred.mem.write_u64(entry_pa, good | (1 << 45))
    r = check(state_for(g, pred, maxphyaddr=40), "I5")
    assert r.status == FAIL and "reserved" in r.summary
    # A load base that is not 2 MiB aligned.
    g, pred = predicted(syms, True)
    r = run_checks(MergeState(syms, g.load_base + PAGE, pred.mem), only=["I5"])[0]
    assert r.status == FAIL and "not 2 MiB aligned" in r.summary


# --- I6 -----------------------------------------------------------------------------------

def test_i6_bytes_must_equal_the_elf(syms):
    g, pred = predicted(syms, True)
    target = pa(syms, g.load_base, "efi_multiboot2")
    pred.mem.write(target + 0x10, b"\xcc\xcc")
    r = check(state_for(g, pred), "I6")
    assert r.status == FAIL and "differ from the ELF's at +0x10" in r.summary
    assert r.evidence["first_difference"] == 0x10


def test_i6_a_walk_through_firmware_memory_never_passes(syms):
    b_slot = xen_slot(syms)
    link = idle_link(syms, b_slot)
    # Random bytes where the unrelocated pointer leads.
    g = entry_guest(syms)
    rnd = random.Random(5)
    g.mem.write(link & ~0xFFF, bytes(rnd.getrandbits(8) for _ in range(PAGE)))
    pred = predict_merge(syms, g.mem, g.load_base, g.firmware_root)
    r = check(state_for(g, pred), "I6")
    assert r.status == FAIL and r.evidence["fault"]["kind"] == "unrelocated"
    # Worse: firmware memory there happens to hold a table leading to the right
    # page, with the right bytes.  Still not Xen's tables: FAIL.
    g = entry_guest(syms)
    b = g.load_base
    l3 = syms.link_qwords("l3_xenmap")
    g.mem.write((link & ~0xFFF), struct.pack("<512Q", *[e + b if e & P else 0 for e in l3]))
    pred = predict_merge(syms, g.mem, b, g.firmware_root)
    r = check(state_for(g, pred), "I6")
    assert r.evidence["walk"][-1]["entry"] & P        # the walk itself succeeds
    assert r.status == FAIL and f"M[{b_slot}]" in r.summary


def test_i6_translation_elsewhere_in_the_image(syms):
    g, pred = predicted(syms, True)
    first, _ = xenmap_slots(syms)
    entry_pa = pa(syms, g.load_base, "l2_xenmap") + 8 * (syms.offset("efi_multiboot2") >> 21)
    pred.mem.write_u64(entry_pa, u64(pred.mem, entry_pa) + SIZE_2M)
    r = check(state_for(g, pred), "I6")
    assert r.status == FAIL and "not B + offset" in r.summary



def test_i6_call_target_mapped_nx_fails(syms):
    """efi_multiboot2's linked VA reaching the right bytes through a no-execute leaf
    is a fault at the call: I6 FAILs saying so (EFER.NXE is set at the entry)."""
    g, pred = predicted(syms, True)
    assert check(state_for(g, pred), "I6").status == PASS
    leaf_pa = pa(syms, g.load_base, "l2_xenmap") + 8 * (syms.offset("efi_multiboot2") >> 21)
    leaf = u64(pred.mem, leaf_pa)
    assert leaf & P and leaf & PS and not leaf & NX      # a 2 MiB leaf of l2_xenmap
    pred.mem.write_u64(leaf_pa, leaf | NX)
    r = check(state_for(g, pred), "I6")
    assert r.status == FAIL and "is mapped NX" in r.summary
    assert r.evidence["pa"] == pa(syms, g.load_base, "efi_multiboot2")

def test_i6_at_the_call_and_in_efi_multiboot2(syms, relocated):
    g, pred = relocated
    va = syms.linked_va("efi_multiboot2")
    pred.mem.write(SCRATCH, b"\xff\xd0")               # call *%rax at RIP
    regs = dict(g.regs, rip=SCRATCH, rax=va)
    r = check(state_for(g, pred, regs=regs, stop="call efi_multiboot2"), "I6")
    assert r.status == PASS and r.evidence["rax"] == va
    load_address = pa(syms, g.load_base, "efi_multiboot2")
    regs = dict(g.regs, rip=SCRATCH, rax=load_address)
    r = check(state_for(g, pred, regs=regs, stop="call efi_multiboot2"), "I6")
    assert r.status == FAIL and "%rax" in r.summary
    pred.mem.write(SCRATCH + 0x10, b"\xe8\x00\x00\x00\x00")   # an unpatched build's call
    regs = dict(g.regs, rip=SCRATCH + 0x10)
    r = check(state_for(g, pred, regs=regs, stop="call efi_multiboot2"), "I6")
    assert r.status == PASS and "not call *%rax" in r.evidence["call"]
    for rip, where in ((va, "linked VA"), (load_address, "load address")):
        r = check(state_for(g, pred, regs=dict(g.regs, rip=rip), stop="efi_multiboot2"), "I6")
        assert r.status == PASS and r.evidence["running_at"] == where
    r = check(state_for(g, pred, regs=dict(g.regs, rip=SCRATCH), stop="efi_multiboot2"), "I6")
    assert r.status == FAIL and "neither" in r.summary
    assert check(state_for(g, pred, merged_root=None), "I6").status == SKIP


# --- I7 -----------------------------------------------------------------------------------

def test_i7(syms):
    g, pred = predicted(syms, True)
    regs = dict(g.regs, gdtr_base=SCRATCH, idtr_base=SCRATCH + 0x100)
    r = check(state_for(g, pred, regs=regs), "I7")
    assert r.status == PASS
    assert {c["what"] for c in r.evidence["checked"]} == {
        "rip", "stack", "mbi", "system_table", "image_handle", "gdtr", "idtr"}
    # M loses the firmware's slot 0: code, stack, MBI are gone.
    pred.mem.write_u64(pred.root, 0)
    r = check(state_for(g, pred), "I7")
    assert r.status == FAIL and "not by M" in r.summary
    # M's slot 0 maps VA 0-1 GiB to PA 1-2 GiB: mapped, but not where the firmware maps it.
    g, pred = predicted(syms, True)
    l3_copy = SCRATCH + PAGE
    pred.mem.write(l3_copy, struct.pack("<Q", SIZE_1G | P | RW | PS) + bytes(PAGE - 8))
    pred.mem.write_u64(pred.root, l3_copy | P | RW)
    r = check(state_for(g, pred), "I7")
    assert r.status == FAIL and "under the firmware" in r.summary
    # The stack read-only (WP=1): identity kept but not writable.
    stack_2m = (STACK_TOP - SIZE_2M, STACK_TOP)
    g, pred = predicted(syms, True, guest=entry_guest(syms, read_only=[stack_2m]))
    r = check(state_for(g, pred), "I7")
    assert r.status == FAIL and "stack" in r.summary and "not writable" in r.summary
    # Nothing known: SKIP.
    r = check(state_for(g, pred, regs={}), "I7")
    assert r.status == SKIP and "%rsp unknown" in r.summary


# --- I8 -----------------------------------------------------------------------------------

def image_range(syms, b):
    return (b + syms.offset("_start"), b + syms.offset(syms.image_end))


def test_i8(syms):
    for kw in ({}, {"page_size": SIZE_1G}):
        g, pred = predicted(syms, True, guest=entry_guest(syms, **kw))
        assert check(state_for(g, pred), "I8").status == PASS
    b = syms.load_base_candidates(1 << 30)[0]
    lo, hi = image_range(syms, b)
    window = (lo & ~(SIZE_2M - 1), hi)
    g, pred = predicted(syms, True, guest=entry_guest(syms, small=[window]))
    assert check(state_for(g, pred), "I8").status == PASS         # 4 KiB pages
    g, pred = predicted(syms, True, guest=entry_guest(syms, read_only=[window]))
    r = check(state_for(g, pred), "I8")
    assert r.status == FAIL and "read-only" in r.summary
    regs = dict(g.regs, cr0=CR0_PG | CR0_PE)                        # WP=0
    r = check(state_for(g, pred, regs=regs), "I8")
    assert r.status == PASS and "WP=0" in r.summary
    g, pred = predicted(syms, True, guest=entry_guest(syms, no_exec=[window]))
    r = check(state_for(g, pred), "I8")
    assert r.status == FAIL and "NX" in r.summary
    g, pred = predicted(syms, True, guest=entry_guest(syms, fw_top=window[0]))
    r = check(state_for(g, pred), "I8")
    assert r.status == FAIL and "not mapped" in r.summary


# --- I9 -----------------------------------------------------------------------------------

def at_trampoline(syms, times=1):
    g = entry_guest(syms)
    trampoline_relocate(g.mem, syms, g.load_base, times)
    regs = dict(g.regs, cr3=pa(syms, g.load_base, "idle_pg_table"))
    return g, MergeState(syms, g.load_base, g.mem, regs, stop="__high_start")


def relocatable_entries(syms):
    lo = syms.linked_va("__page_tables_start")
    hi = syms.linked_va("__page_tables_end")
    return sum(1 for e in syms.link_qwords(lo, (hi - lo) // 8) if e & P)


def test_i9(syms):
    g, state = at_trampoline(syms)
    r = check(state, "I9")
    assert r.status == PASS and r.evidence["kinds"] == {"relocated": relocatable_entries(syms)}
    assert r.evidence["xen_phys_start"] == g.load_base
    g, state = at_trampoline(syms, times=2)
    r = check(state, "I9")
    assert r.status == FAIL and "relocated-twice" in r.summary
    assert r.evidence["kinds"] == {"relocated-twice": relocatable_entries(syms)}
    g, state = at_trampoline(syms, times=0)
    g.mem.write_u64(pa(syms, g.load_base, "xen_phys_start"), 0)
    r = check(state, "I9")
    assert r.status == FAIL and "unrelocated" in r.summary and "xen_phys_start = 0x0" in r.summary
    # Paging off just after the relocation loop: the tables are judged anyway.
    g, state = at_trampoline(syms)
    state.regs = dict(state.regs, cr3=g.firmware_root)
    state.stop = "tables relocated"
    assert check(state, "I9").status == PASS
    state.stop = "trampoline cr3 load"
    r = check(state, "I9")
    assert r.status == FAIL and "CR3" in r.summary
    state.stop = "__efi64_mb2_start"
    r = check(state, "I9")
    assert r.status == SKIP and "not idle_pg_table" in r.summary


def test_i9_flags_and_removed_entries(syms):
    g, state = at_trampoline(syms)
    slot = xen_slot(syms)
    entry_pa = pa(syms, g.load_base, "idle_pg_table") + 8 * slot
    g.mem.write_u64(entry_pa, u64(g.mem, entry_pa) | NX)
    r = check(state, "I9")
    assert r.status == FAIL and r.evidence["kinds"]["flags-differ"] == 1
    # A missing entry: a fault at the trampoline's stops, not at an unnamed stop
    # (Xen drops entries of its own once it runs).
    g, state = at_trampoline(syms)
    ident = next(i for i in range(256) if idle_link(syms, i) & P)
    g.mem.write_u64(pa(syms, g.load_base, "idle_pg_table") + 8 * ident, 0)
    r = check(state, "I9")
    assert r.status == FAIL and "not-present" in r.summary
    state.stop = None
    r = check(state, "I9")
    assert r.status == PASS and r.evidence["kinds"]["not-present"] == 1
    # After __start_xen Xen rewrites the tables: I9 no longer applies.
    state.stop = "after __start_xen"
    r = check(state, "I9")
    assert r.status == SKIP and "__start_xen" in r.summary


def test_i9_catches_the_relocated_merge_left_in_place(syms):
    """xen-l4merge-apply --relocate without --undo: trampoline_setup adds B again."""
    g, pred = predicted(syms, True)
    for addr, data in pred.writes.items():
        g.mem.write(addr, data)
    trampoline_relocate(g.mem, syms, g.load_base)
    regs = dict(g.regs, cr3=pa(syms, g.load_base, "idle_pg_table"))
    r = check(MergeState(syms, g.load_base, g.mem, regs, stop="__high_start"), "I9")
    assert r.status == FAIL and r.evidence["kinds"]["relocated-twice"] > 0
    assert any(f["table"] == "l3_xenmap" for f in r.evidence["faults"])


# --- I10 / I11 ----------------------------------------------------------------------------

def test_i10(syms, plain, relocated):
    g, pred = relocated
    r = check(state_for(g, pred), "I10")
    first, last = xenmap_slots(syms)
    assert r.status == WARN and r.evidence["upper_rwx_leaves"] > 0
    assert r.evidence["fills"][0] == {"table": "l2_xenmap", "first_slot": first,
                                      "last_slot": last, "rwx": last - first + 1}
    g, pred = plain
    r = check(state_for(g, pred), "I10")
    assert r.status == WARN and "not counted" in r.evidence["upper_half"]
    # A merge that adds nothing executable and writable: the firmware's half only.
    g = entry_guest(syms)
    r = check(state_for(g, None, merged_root=g.firmware_root, mem=g.mem), "I10")
    assert r.status == PASS and r.evidence["fill_rwx"] == 0


def test_i11(syms, relocated):
    g, pred = relocated
    first, last = xenmap_slots(syms)
    r = check(state_for(g, pred), "I11")
    over = (last + 1) * SIZE_2M - syms.offset(syms.image_end)
    assert r.status == WARN and r.evidence["overreach"] == over
    assert r.evidence["mapped_end_pa"] == g.load_base + (last + 1) * SIZE_2M
    assert check(state_for(g, None), "I11").status == SKIP          # nothing filled
    # The MBI just past the image is inside the overreach.
    b = syms.load_base_candidates(1 << 30)[0]
    mbi = (b + syms.offset(syms.image_end) + 0xFFF) & ~0xFFF
    g2, pred2 = predicted(syms, True, guest=entry_guest(syms, mbi_pa=mbi))
    r = check(state_for(g2, pred2), "I11")
    assert r.status == WARN and "the MBI" in r.summary
    # An image that ends on a 2 MiB boundary: no overreach.
    even = SymsWith(syms, image_end=syms.virt_start + (last + 1) * SIZE_2M)
    pred3 = predict_merge(even, g.mem, g.load_base, g.firmware_root, relocate=True)
    r = run_checks(MergeState(even, g.load_base, pred3.mem), only=["I11"])[0]
    assert r.status == PASS and r.evidence["overreach"] == 0


# --- I12 ----------------------------------------------------------------------------------

def test_i12(syms, relocated):
    g, pred = relocated
    r = check(state_for(g, pred), "I12")
    assert r.status == PASS and r.evidence["name"] == "l3_bootmap"
    inside = pa(syms, g.load_base, "__page_tables_start")
    _, p2 = predicted(syms, True, guest=g, table_pa=inside)
    r = check(state_for(g, p2), "I12")
    assert r.status == FAIL and "inside __page_tables" in r.summary
    _, p3 = predicted(syms, True, guest=g, table_pa=SCRATCH)
    r = check(state_for(g, p3), "I12")
    assert r.status == FAIL and "outside Xen's image" in r.summary
    r = check(state_for(g, pred, merged_root=pred.root + 8), "I12")
    assert r.status == FAIL and "not 4 KiB aligned" in r.summary
    assert check(state_for(g, pred, merged_root=None), "I12").status == SKIP


# --- I13 ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def printerr(syms):
    """PrintErrMesg's table and its read of it, as nm, objdump and pyelftools say."""
    nm = nm_table(paths.XEN_DEBIAN_SYMS)
    name, table_va, entries = message_table(paths.XEN_DEBIAN_SYMS, nm)
    lea_va, read_va, _ = table_read_sites(paths.XEN_DEBIAN_SYMS, nm, "PrintErrMesg", name)
    start = nm["PrintErrMesg"][0]
    return name, [v for _, v in entries], f"PrintErrMesg+{lea_va - start:#x}", \
        f"PrintErrMesg+{read_va - start:#x}"


def _i13_read(r, printerr):
    name, values, _, read_at = printerr
    (f,) = [f for f in r.evidence["findings"] if f["where"].endswith(read_at)]
    assert f["kind"] == "reads pointer" and f["object"].endswith(name)
    assert f["linked_vas"] == sorted(set(values))
    assert [c.split("#")[-1] for c in f["chain"][:2]] == ["__efi64_mb2_start", "efi_multiboot2"]
    assert f"{read_at} reads {name}[reg]" in r.summary
    return f


def test_i13_registers(syms, relocated):
    g, pred = relocated
    r = check(state_for(g, pred), "I13")
    assert r.status == PASS and "rip" in r.evidence["load_address"]
    regs = dict(g.regs, rax=syms.linked_va("efi_multiboot2"))
    r = check(state_for(g, pred, regs=regs, stop="call efi_multiboot2"), "I13")
    assert r.status == WARN and "%rax" in r.summary and "%rip" in r.summary
    assert check(state_for(g, pred, regs={}), "I13").status == SKIP


def test_i13_cites_printerrmesg_mapped_by_the_relocated_merge(relocated, printerr):
    """The relocated merge maps the upper half at B + offset: PrintErrMesg's read of
    ErrCodeToStr works, while the merge lasts; I13 passes, citing it."""
    g, pred = relocated
    r = check(state_for(g, pred), "I13")
    assert r.status == PASS and r.evidence["upper_half_at_load"] is True
    assert r.evidence["tables"] == pred.root
    f = _i13_read(r, printerr)
    assert f["mapped_at_load"] and f["unmapped_count"] == 0 and f["first_unmapped"] is None
    assert printerr[2] in r.summary                     # the lea handing the table on
    assert "work only while it maps the upper half" in r.summary


def test_i13_warns_where_the_upper_half_is_not_at_the_load_address(syms, plain, printerr):
    """The raw merge (L4's upper half unrelocated) and the firmware's own tables (no
    upper half at all) do not map ErrCodeToStr's linked VAs at B + offset: WARN,
    naming the finding and the first VA."""
    g, pred = plain
    for state in (state_for(g, pred), state_for(g, None, merged_root=None, mem=g.mem)):
        r = check(state, "I13")
        assert r.status == WARN and r.evidence["upper_half_at_load"] is False
        f = _i13_read(r, printerr)
        assert not f["mapped_at_load"] and f["first_unmapped"]["va"] in printerr[1]
        assert f["unmapped_count"] == len(set(printerr[1]))
        assert f"{f['first_unmapped']['va']:#x} not mapped" in r.summary
    assert r.evidence["tables"] == g.regs["cr3"] and "the firmware's L4" in r.summary


def test_i13_upper_half_into_no_ram_is_not_at_the_load_address(syms, relocated, printerr):
    """M's slot for Xen pointing at a table where there is no RAM: the walk cannot read
    it, so the findings' VAs are not at the load address (a WARN, not a FAIL of I13)."""
    g, pred = relocated
    mem = SyntheticMemory(ram_size=RAM, base=pred.mem)
    mem.write_u64(pred.root + 8 * xen_slot(syms), RAM | P | RW)
    r = check(state_for(g, pred, mem=mem), "I13")
    assert r.status == WARN
    f = _i13_read(r, printerr)
    assert f["first_unmapped"]["pa"] is None and "unreadable" in f["first_unmapped"]["fault"]


def test_i13_with_a_symbol_map_keeps_the_register_check(syms, relocated):
    g, pred = relocated
    mapped = load_xen_syms(paths.XEN_DEBIAN_SYMS_MAP)
    state = dataclasses.replace(state_for(g, pred), syms=mapped)
    r = check(state, "I13")
    assert r.status == PASS and "no code bytes" in r.evidence["static_note"]
    assert "no static check" in r.summary


# --- MBI, selection, output ---------------------------------------------------------------

def test_parse_mbi(syms):
    mem = SyntheticMemory()
    total = build_mbi(mem, MBI_PA, 0x1234_5000, system_table=0xAB000, image_handle=0xCD000)
    info = parse_mbi(mem, MBI_PA)
    assert info.total_size == total and info.load_base_addr == 0x1234_5000
    assert info.efi64_system_table == 0xAB000 and info.efi64_image_handle == 0xCD000
    assert mem.read_phys(info.cmdline_pa, 3) == b"xen"
    assert [t[0] for t in info.tags] == [1, 12, 20, 21, 0]
    with pytest.raises(GdbextError, match="no multiboot2 information"):
        parse_mbi(mem, SCRATCH)


def test_selection(syms, relocated):
    g, pred = relocated
    st = state_for(g, pred)
    assert [r.id for r in run_checks(st, only=["i3,I4"])] == ["I3", "I4"]
    assert merge_catalog.select("I6 i0") == ["I0", "I6"]
    assert merge_catalog.select(skip=CHECK_IDS[1:]) == ["I0"]
    assert "I10" not in [r.id for r in run_checks(st, skip=["I10"])]
    with pytest.raises(GdbextError, match="unknown check I14"):
        run_checks(st, only=["I14"])


def test_unreadable_memory_is_a_fail_naming_it(syms):
    g, pred = predicted(syms, True)
    st = state_for(g, pred, merged_root=g.mem.ram_size + PAGE)
    for cid in ("I3", "I4"):
        r = check(st, cid)
        assert r.status == FAIL and "unreadable" in r.summary
        assert r.evidence["pa"] == g.mem.ram_size + PAGE


def test_json_contract_and_text(syms, plain):
    g, pred = plain
    st = state_for(g, pred)
    results = run_checks(st)
    d = results_as_dict("predict", "__efi64_mb2_start", st, results)
    assert set(d) == {"mode", "stop", "load_base", "firmware_root", "table", "checks",
                      "counts", "ok"}
    assert d["load_base"] == g.load_base and d["table"] == pred.root
    assert d["firmware_root"] == g.firmware_root and d["ok"] is False
    assert sum(d["counts"].values()) == len(CHECK_IDS)
    for c in d["checks"]:
        assert set(c) == {"id", "title", "status", "summary", "evidence", "reviewer"}
    i3 = next(c for c in d["checks"] if c["id"] == "I3")
    assert i3["reviewer"].startswith("Frediano") and isinstance(
        i3["evidence"]["faults"][0]["found"], int)
    assert json.loads(json.dumps(d)) == d
    text = render_text(results)
    assert text.splitlines()[0].split()[:4] == ["id", "status", "check", "summary"]
    assert "faults:" in text and "reviewer: Frediano" in text and "\x1b[" not in text
    assert "FAILED" in text.splitlines()[-1]
    assert "\x1b[1;31mFAIL" in render_text(results, color=True)


def test_every_catalogued_check_has_one_named_function():
    assert tuple(CHECK_TABLE) == CHECK_IDS
    functions = [fn for fn, _info in CHECK_TABLE.values()]
    assert len(set(functions)) == len(functions)
    for cid, (fn, info) in CHECK_TABLE.items():
        assert info is CHECKS[cid] and fn.__name__.startswith("check_")
        assert fn.__doc__.startswith(f"{cid}: "), fn.__name__
