"""The walkthrough's lessons and named walks, on Xen's real tables (from xen-syms) laid
out in synthetic memory: relocated (what trampoline_setup makes) and raw (the RFC's
copy), with the expected PAs computed from the symbols."""

from __future__ import annotations

import pytest

from gdbext import paths
from gdbext.core import bootstops, paging, x86
from gdbext.core import walkthrough as wt
from gdbext.core.memory import SyntheticMemory
from gdbext.core.xenimage import LoadedXen
from gdbext.core.xensyms import load_xen_syms

CTX = paging.PagingContext(paging.MODES["4-level"])
RAM = 1 << 30


@pytest.fixture(scope="module")
def syms():
    return load_xen_syms(paths.XEN_DEBIAN_SYMS)


@pytest.fixture(scope="module")
def base(syms):
    return syms.load_base_candidates(RAM)[0]   # where GRUB would put it in 1 GiB


def xen_tables(syms, base, relocate: bool) -> SyntheticMemory:
    """Xen's boot tables at B + offset with their link-time qwords (+B if ``relocate``),
    l2_xenmap filled as trampoline_setup fills it, and the image's bytes of the call
    target, so that a walk that lands right finds efi_multiboot2's bytes."""
    mem = SyntheticMemory(RAM)
    addr_mask = x86.phys_addr_mask(x86.MAXPHYADDR_ARCH)
    for table, sym in syms.boot_tables():
        for i, q in enumerate(syms.link_qwords(sym.value, 512 * table.pages)):
            if relocate and q & x86.PTE_P and q & addr_mask and table.name != "l1_directmap":
                q += base
            mem.write_u64(base + syms.offset(sym.value) + 8 * i, q)
    l2 = base + syms.offset("l2_xenmap")
    first = syms.offset(syms.image_start) >> 21
    last = (syms.offset(syms.image_end) - 1) >> 21
    for i in range(first, last + 1):
        mem.write_u64(l2 + 8 * i, (base + (i << 21)) | 0x1E3)
    va = syms.linked_va(wt.CALL_TARGET)
    mem.write(base + syms.offset(va), syms.read_linked(va, 64))
    return mem


def test_every_stop_of_the_session_has_a_lesson():
    assert set(wt.LESSONS) == set(bootstops.STOP_ORDER)
    for lesson in wt.LESSONS.values():
        assert lesson.walk in (wt.WALK_RIP, wt.WALK_TARGET_CR3, wt.WALK_CALL,
                               wt.WALK_TARGET_IDLE)
        assert 200 < len(lesson.text) < 1200, lesson.stop   # a few sentences, not a page
        assert all(len(line) <= wt.WRAP for line in wt.wrap(lesson.text).splitlines())


def test_relocated_walk_names_each_xen_table(syms, base):
    xen = LoadedXen(syms, base)
    mem = xen_tables(syms, base, relocate=True)
    va = syms.linked_va(wt.CALL_TARGET)
    w = paging.walk(CTX, mem, xen.pa("idle_pg_table"), va)
    assert w.mapped and w.pa == base + syms.offset(va)
    text = wt.walk_text(xen, w)
    lines = text.splitlines()
    assert lines[1].startswith(" L4[0x105]") and lines[1].endswith("[idle_pg_table]")
    assert lines[2].endswith("[l3_xenmap]") and lines[3].endswith("[l2_xenmap]")
    assert lines[4].endswith(f"[{wt.CALL_TARGET}]")
    record = wt.walk_record(xen, w, "t")
    assert [lv["table_name"] for lv in record["levels"]] == ["idle_pg_table", "l3_xenmap",
                                                             "l2_xenmap"]
    assert record["pa_name"] == wt.CALL_TARGET and record["pa"] == w.pa


def test_raw_copy_is_named_as_a_link_time_address(syms, base):
    xen = LoadedXen(syms, base)
    mem = xen_tables(syms, base, relocate=False)
    va = syms.linked_va(wt.CALL_TARGET)
    root = xen.pa("idle_pg_table")
    raw = wt.merge_walk(xen, CTX, mem, root, va, wt.RAW_LABEL)
    # L4[261] holds l3_xenmap's link-time address: the walk leaves Xen's image.
    assert raw.slot == 261 and raw.entry & ~0xFFF == syms.offset("l3_xenmap")
    assert raw.walk.steps[1].table_pa == syms.offset("l3_xenmap")
    assert "link-time address of l3_xenmap" in wt.walk_text(xen, raw.walk, {root: "M"})
    assert raw.bytes_match is not True
    rel = wt.merge_walk(xen, CTX, xen_tables(syms, base, relocate=True), root, va,
                        wt.RELOCATED_LABEL)
    assert rel.bytes_match is True and rel.entry == raw.entry + base
    table = wt.comparison_table(xen, raw, rel)
    assert "raw copy (the RFC)" in table and "relocated (the review)" in table
    assert f"{syms.offset('l3_xenmap'):#x} (link-time address of l3_xenmap)" in table
    assert f"{base + syms.offset('l3_xenmap'):#x} (l3_xenmap)" in table
    assert f"PA {base + syms.offset(va):#x} ({wt.CALL_TARGET})" in table


def test_firmware_tables_are_named_by_level(syms, base):
    xen = LoadedXen(syms, base)
    mem = SyntheticMemory(RAM)
    # A firmware-like identity map of the first GiB with 2 MiB pages, outside Xen.
    l4, l3, l2 = 0x10000, 0x11000, 0x12000
    mem.write_u64(l4, l3 | 3)
    mem.write_u64(l3, l2 | 3)
    for i in range(512):
        mem.write_u64(l2 + 8 * i, (i << 21) | 0x83)
    rip = xen.pa("__efi64_mb2_start")
    w = paging.walk(CTX, mem, l4, rip)
    assert w.pa == rip
    lines = wt.walk_text(xen, w).splitlines()
    assert lines[1].endswith("[firmware L4 table]")
    assert lines[2].endswith("[firmware L3 table]")
    assert lines[3].endswith("[firmware L2 table]")
    assert lines[4].endswith("__efi64_mb2_start]")   # head.o#__efi64_mb2_start: a local


def test_stop_header_says_when_paging_is_off():
    head = wt.stop_header(7, 11, bootstops.TRAMPOLINE_SETUP, 0x1234, 0x5000, 0x11, "here")
    assert head.startswith("== Stop 7/11: trampoline_setup - ")
    assert "paging OFF (CR0.PG=0)" in head and "RIP 0x1234 (here)" in head


def test_merged_l4_entries_are_judged_as_copies_of_idle_pg_table(syms, base):
    from gdbext.core import xenimage

    xen = LoadedXen(syms, base)
    va = syms.linked_va(wt.CALL_TARGET)
    root = xen.pa("idle_pg_table")   # stands for M: its upper half is the same qwords
    kinds = []
    for relocate in (False, True):
        w = paging.walk(CTX, xen_tables(syms, base, relocate), root, va)
        kinds.append(wt.merged_entry_verdict(xen, root, w.steps[0]).kind)
        assert wt.merged_entry_verdict(xen, root + 0x1000, w.steps[0]) is None  # not M
    assert kinds == [xenimage.UNRELOCATED, xenimage.RELOCATED]
    low = paging.walk(CTX, xen_tables(syms, base, True), root, xen.pa("__efi64_mb2_start"))
    assert wt.merged_entry_verdict(xen, root, low.steps[0]) is None   # the firmware's half
