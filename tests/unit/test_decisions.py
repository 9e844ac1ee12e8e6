"""The GDB layer's decisions, as the core makes them, on synthetic memory and the real
xen-syms: which merge check mode and which firmware L4, the trust order of the cheap
load-base sources, where xen-run-to plants its breakpoints, the xen-mb2-break session's
bookkeeping, and the predicted merge. No GDB, no QEMU.
"""

from __future__ import annotations

import pytest

from gdbext import paths
from gdbext.core import bootstops, locate, mb2session, merge_catalog, merge_here, paging, runto
from gdbext.core.errors import GdbextError
from gdbext.core.merge_here import CheckRequest, Journal, MergeRecord
from gdbext.core.paging import PagingContext
from gdbext.core.xenimage import LoadedXen
from gdbext.core.xensyms import load_xen_syms

from .merge_builders import (MB2_BOOTLOADER_MAGIC, P, RW, entry_guest,
                             trampoline_relocate)


@pytest.fixture(scope="module")
def syms():
    return load_xen_syms(paths.XEN_DEBIAN_SYMS)


@pytest.fixture()
def guest(syms):
    return entry_guest(syms)


def _ctx(regs) -> PagingContext:
    return PagingContext.from_registers(regs["cr0"], regs["cr4"], regs["efer"])


def _lx(g) -> LoadedXen:
    return LoadedXen(g.syms, g.load_base)


# -- the merge check: mode, F, M, what applies -------------------------------------------


def test_at_the_entry_the_check_predicts_and_captures_the_firmware(guest):
    record = MergeRecord()
    regs = dict(guest.regs)
    ev = merge_here.evaluate(_lx(guest), guest.mem, regs, _ctx(regs), record, CheckRequest())
    assert ev.header["mode"] == merge_here.PREDICT
    assert ev.header["stop"] == bootstops.ENTRY
    assert record.firmware is not None and record.firmware.root == guest.firmware_root
    assert ev.header["firmware_source"] == f"captured at {bootstops.ENTRY}"
    # The raw merge fails (the RFC's crash), and the report covers every check.
    assert [c["id"] for c in ev.result["checks"]] == list(merge_catalog.CHECK_IDS)
    assert ev.result["ok"] is False
    assert merge_here.failed_line(ev.result).startswith("xen-l4merge-check: ")


def test_assume_relocated_predicts_the_relocated_variant(guest):
    regs = dict(guest.regs)
    ev = merge_here.evaluate(_lx(guest), guest.mem, regs, _ctx(regs), MergeRecord(),
                             CheckRequest(assume_relocated=True,
                                          only=tuple(merge_catalog.CALL_CHECKS)))
    assert ev.header["mode"] == merge_here.PREDICT_RELOCATED
    statuses = {c["id"]: c["status"] for c in ev.result["checks"]}
    assert merge_catalog.FAIL not in statuses.values()


def test_the_table_in_cr3_written_by_apply_is_checked_live(guest):
    lx = _lx(guest)
    pred = merge_here.predict_from(lx, guest.mem, guest.firmware_root, None, relocate=True)
    for pa, data in pred.writes.items():
        guest.mem.write(pa, data)
    record = MergeRecord()
    record.firmware = merge_here.take_snapshot(lx, guest.mem, guest.regs, _ctx(guest.regs))
    record.journal = Journal(guest.load_base, root=pred.root, relocated=True)
    regs = dict(guest.regs, cr3=pred.root)
    ev = merge_here.evaluate(lx, guest.mem, regs, _ctx(regs), record, CheckRequest())
    assert ev.header["mode"] == merge_here.LIVE
    assert ev.header["table"] == pred.root
    assert ev.header["table_source"] == "written by xen-l4merge-apply"


def test_mode_choice():
    req = CheckRequest()
    assert merge_here.choose_mode(req, None, before_merge=True) == merge_here.PREDICT
    assert merge_here.choose_mode(req, 0x1000, before_merge=True) == merge_here.LIVE
    assert merge_here.choose_mode(req, None, before_merge=False) == merge_here.LIVE
    assert merge_here.choose_mode(CheckRequest(predict=True), 0x1000, False) == \
        merge_here.PREDICT
    assert merge_here.choose_mode(CheckRequest(assume_relocated=True), None, False) == \
        merge_here.PREDICT_RELOCATED


def test_live_without_a_merged_table_runs_only_the_stops_checks():
    here = bootstops.TRAMPOLINE_CR3
    assert tuple(merge_here.applicable_checks(merge_here.LIVE, None, here)) == \
        tuple(merge_catalog.CHECKS_AT_STOP.get(here, ()))
    assert tuple(merge_here.applicable_checks(merge_here.LIVE, None,
                                              bootstops.AFTER_START_XEN)) == ("I9",)
    assert tuple(merge_here.applicable_checks(merge_here.PREDICT, None, here)) == \
        tuple(merge_catalog.CHECK_IDS)


def test_firmware_choice_order(guest):
    lx = _lx(guest)
    snap = merge_here.take_snapshot(lx, guest.mem, guest.regs, _ctx(guest.regs))
    given = CheckRequest(firmware_root=guest.firmware_root)
    assert merge_here.choose_firmware(given, snap, True, None, 0, None, guest.mem).source == \
        "given"
    assert merge_here.choose_firmware(CheckRequest(), snap, True, None, 0, None,
                                      guest.mem).source.startswith("captured")
    now = merge_here.choose_firmware(CheckRequest(), None, True, None, guest.regs["cr3"],
                                     guest.firmware_root, guest.mem)
    assert now.source == "CR3 now" and now.l4 == guest.mem.read_phys(guest.firmware_root,
                                                                      4096)
    # Once apply wrote a table, CR3 is no longer the firmware's word.
    none = merge_here.choose_firmware(CheckRequest(), None, True, Journal(guest.load_base),
                                      guest.regs["cr3"], guest.firmware_root, guest.mem)
    assert none.root is None


def test_snapshot_is_refused_on_xen_tables(guest, syms):
    lx = _lx(guest)
    regs = dict(guest.regs, cr3=lx.pa("idle_pg_table"))
    with pytest.raises(GdbextError, match="points into Xen's image"):
        merge_here.take_snapshot(lx, guest.mem, regs, _ctx(regs))


def test_a_new_boot_makes_the_record_stale(guest, syms):
    lx = _lx(guest)
    record = MergeRecord()
    record.firmware = merge_here.take_snapshot(lx, guest.mem, guest.regs, _ctx(guest.regs))
    entry = guest.regs["rip"]
    assert not record.stale_at(syms, entry)      # the guest has not run since
    record.ran = True
    assert record.stale_at(syms, entry)
    assert not record.stale_at(syms, entry + 1)
    assert record.snapshot_for(guest.load_base + 0x200000) is None


def test_prediction_uses_the_captured_l4_not_a_later_one(guest):
    """F as captured at the entry: a firmware L4 changed since does not change M's
    lower half (the RFC copies it once)."""
    lx = _lx(guest)
    regs = dict(guest.regs)
    snap = merge_here.take_snapshot(lx, guest.mem, regs, _ctx(regs))
    guest.mem.write_u64(guest.firmware_root + 8 * 7, 0x5000 | P | RW)
    from_snap = merge_here.predicted_merge(lx, guest.mem, regs, _ctx(regs), snap)
    from_cr3 = merge_here.predicted_merge(lx, guest.mem, regs, _ctx(regs), None)
    m_snap = from_snap.mem.read_phys(from_snap.root + 8 * 7, 8)
    m_now = from_cr3.mem.read_phys(from_cr3.root + 8 * 7, 8)
    assert int.from_bytes(m_snap, "little") == 0
    assert int.from_bytes(m_now, "little") == 0x5000 | P | RW


def test_prediction_needs_the_firmware_in_cr3(guest):
    lx = _lx(guest)
    regs = dict(guest.regs, cr3=lx.pa("idle_pg_table"))
    with pytest.raises(GdbextError, match="stop there first"):
        merge_here.predicted_merge(lx, guest.mem, regs, _ctx(regs), None)


# -- the cheap load-base sources, in order of trust ------------------------------------------


def _translate(g, regs):
    ctx = _ctx(regs)
    return lambda va: paging.translate(ctx, g.mem, regs["cr3"], va)


def test_rip_at_the_load_address_comes_first(guest):
    regs = dict(guest.regs, rsi=0)
    found = locate.locate_cheap(guest.syms, guest.mem, regs, _translate(guest, regs))
    assert found == (guest.load_base,
                     f"RIP at {guest.syms.describe(guest.syms.linked_va(bootstops.ENTRY))}")


def test_the_mbi_when_rip_says_nothing(guest):
    firmware_rip = 0x100000          # below the image: firmware code, identity-mapped
    regs = dict(guest.regs, rip=firmware_rip, rsi=None)
    found = locate.locate_cheap(guest.syms, guest.mem, regs, _translate(guest, regs))
    assert found is not None and found[0] == guest.load_base
    assert "LOAD_BASE_ADDR" in found[1]
    # Without the multiboot2 magic in %eax, %rbx is not an MBI: nothing.
    regs["rax"] = MB2_BOOTLOADER_MAGIC ^ 1
    assert locate.locate_cheap(guest.syms, guest.mem, regs, _translate(guest, regs)) is None


def test_xen_phys_start_once_stored_beats_the_mbi(guest, syms):
    trampoline_relocate(guest.mem, syms, guest.load_base)
    lx = _lx(guest)
    regs = dict(guest.regs, rip=0x100000, rsi=None, cr3=lx.pa("idle_pg_table"))
    # Paging through the firmware's identity map: xen_phys_start's linked VA is unmapped,
    # so B comes from the u64 at its PA, for the base CR3 names.
    regs_fw = dict(regs, cr3=guest.regs["cr3"])
    found = locate.locate_cheap(syms, guest.mem, regs, _translate(guest, regs_fw))
    assert found == (guest.load_base, "xen_phys_start at its PA")


def test_a_wrong_candidate_is_never_believed(guest, syms):
    regs = dict(guest.regs, rip=guest.regs["rip"] + 0x200000, rax=0, rsi=None)
    found = locate.locate_cheap(syms, guest.mem, regs, _translate(guest, regs))
    assert found is None


# -- xen-run-to: where the breakpoints go ----------------------------------------------------


def test_run_to_with_a_known_base_plants_one_load_address(syms):
    base = syms.load_base_candidates(1 << 30)[0]
    p = runto.first_plan(syms, bootstops.ENTRY, base, main_ram=())
    assert p.base_by_address == {base + syms.offset(bootstops.ENTRY): base}
    assert p.addresses[0] == syms.linked_va(bootstops.ENTRY)
    assert p.sentinel == syms.linked_va(runto.SENTINEL_SYMBOL) and p.sentinel in p.addresses


def test_run_to_guesses_the_top_bases_below_ram_under_4g(syms):
    ram = [(0, 0x8000_0000), (0x1_0000_0000, 0x2_0000_0000)]
    assert runto.ram_top_below_4g(ram) == 0x8000_0000
    assert runto.ram_top_below_4g([]) == runto.LOW_4G
    p = runto.first_plan(syms, bootstops.ENTRY, None, ram)
    want = syms.load_base_candidates(0x8000_0000)[:runto.TOP_CANDIDATES]
    assert sorted(p.base_by_address.values()) == sorted(want)
    assert len(p.addresses) == len(want) + 2     # + the linked VA and the sentinel


def test_what_a_stop_means(syms):
    base = syms.load_base_candidates(1 << 30)[0]
    p = runto.first_plan(syms, bootstops.ENTRY, base, main_ram=())
    load = base + syms.offset(bootstops.ENTRY)
    assert runto.classify_hit(p, load, p.expected) == runto.HIT_TARGET
    assert runto.classify_hit(p, load, b"\0" * len(p.expected)) == runto.HIT_FALSE
    assert runto.classify_hit(p, p.sentinel, b"") == runto.HIT_SENTINEL
    assert runto.classify_hit(p, load + 1, p.expected) == runto.HIT_ELSEWHERE
    assert runto.runs_only_at_load_address(syms, bootstops.ENTRY)
    assert runto.runs_only_at_load_address(syms, "efi_multiboot2")
    assert not runto.runs_only_at_load_address(syms, "__start_xen")
    assert runto.missed_base_from(base.to_bytes(8, "little")) == base
    assert runto.missed_base_from(b"") == 0


# -- the xen-mb2-break session's bookkeeping --------------------------------------------------


def _book(syms, **options):
    return mb2session.SessionBook(bootstops.plan_for(syms), mb2session.SessionOptions(**options))


def test_every_stop_by_default_and_the_trampoline_waits_for_trampoline_phys(syms):
    book = _book(syms)
    plan = bootstops.plan_for(syms)
    assert [s.name for s in book.selected] == [s.name for s in plan.stops]
    assert book.helpers == []          # stops between efi_multiboot2's return and it exist
    book.load_base = syms.load_base_candidates(1 << 30)[0]
    new, pending = book.to_plant()
    assert pending == [bootstops.TRAMPOLINE_CR3]
    planted = {stop.name for _addr, stop in new}
    assert bootstops.ENTRY not in planted and bootstops.START_XEN in planted
    for addr, stop in new:
        assert book.stop_for(addr) is stop
    assert book.stop_for(plan.stops[0].address(book.load_base)).name == bootstops.ENTRY
    # Planting again plants nothing twice; trampoline_phys known: the low stop is planted.
    assert book.to_plant()[0] == []
    book.trampoline_phys = 0x8c000
    again, pending = book.to_plant()
    assert [s.name for _a, s in again] == [bootstops.TRAMPOLINE_CR3] and pending == []


def test_only_the_trampoline_stop_gets_a_helper(syms):
    book = _book(syms, stops=(bootstops.TRAMPOLINE_CR3,))
    assert [s.name for s in book.selected] == [bootstops.TRAMPOLINE_CR3]
    assert len(book.helpers) == 1
    order = bootstops.STOP_ORDER
    assert order.index(bootstops.EFI_MB2) < order.index(book.helpers[0].name) < \
        order.index(bootstops.TRAMPOLINE_CR3)
    assert book.wants_trampoline_phys()


def test_a_typo_in_a_check_or_stop_name_is_one_line(syms):
    with pytest.raises(GdbextError, match="I99"):
        _book(syms, only=("I99",))
    with pytest.raises(GdbextError):
        _book(syms, stops=("no such stop",))


def test_what_comes_next_and_the_result(syms):
    book = _book(syms, stops=(bootstops.ENTRY, bootstops.START_XEN))
    assert book.more_to_come() and book.next_name() == bootstops.ENTRY
    ok = {"checks": [{"id": "I0", "status": merge_catalog.PASS}], "error": None}
    for stop in book.selected:
        book.record(syms, stop, stop.linked_va, {"cr3": 0x1000}, {}, ok, None)
    assert not book.more_to_come() and book.last_reached()
    res = book.result()
    assert res["complete"] and res["reached"] == [bootstops.ENTRY, bootstops.START_XEN]
    assert res["ok"] and res["counts"][merge_catalog.PASS] == 2
    bad = {"checks": [{"id": "I3", "status": merge_catalog.FAIL}], "error": None}
    book.record(syms, book.selected[-1], 0, {}, {}, bad, None)
    assert mb2session.failed(book.records[-1])
    assert mb2session.failed_checks(book.result()) == [f"I3 at {bootstops.START_XEN}"]
    assert book.result()["ok"] is False
