"""Issue 5 on a real boot of Debian's Xen 4.17: xen-l4merge-check and xen-l4merge-apply.

Oracles: xen-syms (link-time entries, offsets, the bytes of efi_multiboot2),
QEMU's monitor (info registers, gva2gpa, xp) and the guest itself (it executes
at the linked address or it does not).  Slots, offsets and addresses are
derived from xen-syms and the boot, never written here.
"""

from __future__ import annotations

import json
import re
import struct

import pytest

from gdbext import paths
from gdbext.core.merge_catalog import CALL_CHECKS
from gdbext.core.xensyms import load_xen_syms

from ..oracles import parse_gva2gpa
from .conftest import booted_to, matrix_params, stop_of_build

ENTRY = "__efi64_mb2_start"
CALL_TARGET = "efi_multiboot2"
PAGE = 4096


@pytest.fixture(scope="module")
def syms(xen_syms_path):
    return load_xen_syms(xen_syms_path)


def capture(stop, command: str):
    """(output, error line) of a GDB command: the driver keeps the report of a command
    that prints it and then fails (xen-l4merge-check with a FAIL)."""
    reply = stop.gdb.execute(command, timeout=180, check=False)
    return reply.out, reply.error


def json_line(text: str) -> dict:
    lines = [ln for ln in text.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, text
    return json.loads(lines[0])


def gdb_bytes(stop, expr: str, size: int) -> bytes:
    """Bytes through GDB's own virtual-memory read (the CPU's current CR3)."""
    out = stop.cmd(f"x/{size}xb {expr}").out
    return bytes(int(b, 16) for line in out.splitlines() for b in line.split(":")[1].split())


def slot_of(syms, va: int) -> int:
    return (va >> 39) & 0x1FF


def xenmap_slot(syms) -> int:
    """The L4 slot of XEN_VIRT_START, and a check that idle_pg_table links it to l3_xenmap."""
    slot = slot_of(syms, syms.virt_start)
    link = syms.read_u64(syms.linked_va("idle_pg_table") + 8 * slot)
    assert link & 1 and link & ~0xFFF == syms.offset("l3_xenmap")
    return slot


def _e8_calls(syms, start: int, size: int):
    """(VA, target) of every e8 rel32 in the code at ``start`` (decoded here)."""
    code = syms.read_linked(start, size)
    return [(start + i, start + i + 5 + struct.unpack_from("<i", code, i + 1)[0])
            for i in range(len(code) - 5) if code[i] == 0xE8]


def call_instruction_pa(syms, load_base: int) -> int:
    """B + offset of the e8 call of efi_multiboot2: in __efi64_mb2_start (4.17), or in the
    function it calls that calls it (4.20's efi_multiboot2_prelude)."""
    target = syms.linked_va(CALL_TARGET)
    entry_calls = _e8_calls(syms, syms.linked_va(ENTRY), 0x200)
    for va, to in entry_calls:
        if to == target:
            return load_base + syms.offset(va)
    for _va, callee in entry_calls:
        hit = syms.symbol_at(callee)
        if hit is None or hit[1] != 0 or not syms.lookup(hit[0]).size:
            continue
        for va, to in _e8_calls(syms, callee, syms.lookup(hit[0]).size):
            if to == target:
                return load_base + syms.offset(va)
    raise AssertionError("no call of efi_multiboot2 in __efi64_mb2_start or a function it calls")


def table_pages(syms, load_base: int):
    """Every page of Xen's boot tables (where the patch and the relocation write)."""
    pages = []
    for table, sym in syms.boot_tables():
        first = load_base + syms.offset(sym.value)
        pages.extend(first + i * PAGE for i in range(table.pages))
    return pages


def read_pages(stop, pages):
    return {pa: stop.xp(pa, PAGE) for pa in pages}


def assert_within(pages, pa: int, length: int):
    assert any(p <= pa and pa + length <= p + PAGE for p in pages), f"{pa:#x}+{length}"


def failed_ids(error: str):
    m = re.fullmatch(r"xen-l4merge-check: (\d+) checks? failed: ([I0-9, ]+)", error or "")
    assert m, error
    ids = m.group(2).split(", ")
    assert int(m.group(1)) == len(ids)
    return ids


# --- predict mode at the entry (read-only session) -------------------------------------

@pytest.mark.parametrize("stop_name,build", matrix_params("at_entry"))
def test_predict_fails_on_slot_of_l3_xenmap_link_address(request, stop_name, build):
    """The predicted merge's verdicts, on every build of the matrix."""
    stop = stop_of_build(request, stop_name, build)
    syms = load_xen_syms(paths.BUILDS[build].syms)
    base = stop.run["load_base"]
    slot = xenmap_slot(syms)
    regs_before = stop.qemu_registers()
    out, error = capture(stop, "xen-l4merge-check --json")
    result = json_line(out)
    assert result["mode"] == "predict" and result["stop"] == ENTRY
    assert result["load_base"] == base and result["ok"] is False
    assert result["firmware_root"] == regs_before["cr3"] & ~0xFFF
    checks = {c["id"]: c for c in result["checks"]}
    assert sorted(failed_ids(error)) == sorted(i for i, c in checks.items()
                                               if c["status"] == "FAIL")
    # The reason named: M[slot of XEN_VIRT_START] holds l3_xenmap's link-time address.
    link_pa = syms.offset("l3_xenmap")
    guest_entry = struct.unpack("<Q", stop.xp(base + syms.offset("idle_pg_table") + 8 * slot,
                                         8))[0]
    for cid in ("I3", "I4"):
        assert checks[cid]["status"] == "FAIL"
        fault = next(f for f in checks[cid]["evidence"]["faults"] if f["where"] == f"M[{slot}]")
        assert fault["kind"] == "unrelocated"
        assert fault["target_pa"] == link_pa
        assert fault["found"] == guest_entry          # what is really in idle_pg_table
        assert fault["expected_pa"] == base + link_pa
        assert fault["target_name"] == "l3_xenmap"
        assert f"M[{slot}]" in checks[cid]["summary"] and "l3_xenmap" in checks[cid]["summary"]
    i6 = checks["I6"]
    assert i6["status"] == "FAIL"
    assert i6["evidence"]["linked_va"] == syms.linked_va(CALL_TARGET)
    assert i6["evidence"]["fault"]["where"] == f"M[{slot}]"
    assert i6["evidence"]["walk"][0]["index"] == slot_of(syms, syms.linked_va(CALL_TARGET))
    # Predicting wrote nothing: CR3 and RIP as before, the table page untouched.
    assert stop.qemu_registers()["cr3"] == regs_before["cr3"]
    assert stop.qemu_registers()["rip"] == regs_before["rip"]
    assert stop.phymem_mode() == "0"


def test_walks_under_the_predicted_merges(at_entry, syms):
    """xen-va2pa --root merge / merge-relocated: efi_multiboot2's linked VA walked under the
    table the RFC would build, the guest untouched. Raw: the L4 entry is l3_xenmap's
    link-time address (unrelocated) and the walk never reaches Xen's code; relocated: it
    reaches B + offset, where the ELF's bytes are (QEMU's xp as the oracle)."""
    stop = at_entry
    base = stop.run["load_base"]
    slot = xenmap_slot(syms)
    linked = syms.linked_va(CALL_TARGET)
    cr3_before = stop.qemu_registers()["cr3"]
    raw = stop.json(f"xen-va2pa {CALL_TARGET} --root merge --json")
    top = raw["levels"][0]
    assert top["index"] == slot and top["pointer"]["kind"] == "unrelocated"
    assert top["pointer"]["target_pa"] == syms.offset("l3_xenmap")
    assert raw["pa"] != base + syms.offset(CALL_TARGET)
    relocated = stop.json(f"xen-va2pa {CALL_TARGET} --root merge-relocated --json")
    assert relocated["levels"][0]["pointer"]["kind"] == "relocated"
    assert relocated["pa"] == base + syms.offset(CALL_TARGET)
    assert relocated["pa_name"] == CALL_TARGET
    assert stop.xp(relocated["pa"], 32) == syms.read_linked(linked, 32)
    text = stop.cmd(f"xen-va2pa {CALL_TARGET} --root merge").out
    assert f"L4[{slot:#05x}]" in text and "unrelocated" in text and "[merged L4 M, in " in text
    assert raw["levels"][0]["table_name"].startswith("merged L4 M")
    # The merges cover the firmware's identity map (lower half) as well: RIP still maps.
    assert stop.json("xen-va2pa $pc --root merge-relocated --json")["pa"] == \
        stop.json("xen-va2pa $pc --json")["pa"]
    levels = stop.cmd("xen-pt --levels --root merge --range efi_multiboot2 efi_multiboot2+1").out
    assert f"L4[{slot:#05x}]" in levels and "(unrelocated: points at" in levels
    assert stop.qemu_registers()["cr3"] == cr3_before and stop.phymem_mode() == "0"


def test_predict_text_report_then_one_error_line(at_entry, syms):
    slot = xenmap_slot(syms)
    out, error = capture(at_entry, "xen-l4merge-check")
    assert "predict at __efi64_mb2_start" in out
    assert re.search(r"^I3\s+FAIL\s", out, re.M) and re.search(r"^I0\s+PASS\s", out, re.M)
    assert f"I3 FAIL: M[{slot}]" in out and "reviewer: Frediano" in out
    assert "\x1b[" not in out           # no colour: not a terminal
    assert "I3" in failed_ids(error) and "\n" not in error


@pytest.mark.parametrize("stop_name,build", matrix_params("at_entry"))
def test_assume_relocated_passes_the_call_checks(request, stop_name, build):
    stop = stop_of_build(request, stop_name, build)
    syms = load_xen_syms(paths.BUILDS[build].syms)
    base = stop.run["load_base"]
    out, error = capture(stop, "xen-l4merge-check --assume-relocated --json")
    result = json_line(out)
    assert result["mode"] == "predict-relocated"
    checks = {c["id"]: c for c in result["checks"]}
    for cid in CALL_CHECKS:
        assert checks[cid]["status"] == "PASS", (cid, checks[cid]["summary"])
    assert checks["I6"]["evidence"]["pa"] == base + syms.offset(CALL_TARGET)
    assert checks["I6"]["evidence"]["bytes_compared"] > 0
    assert error is None and result["ok"] is True


def test_python_api_never_raises_for_fails(at_entry, syms):
    stop = at_entry
    out = stop.cmd("python import json; from gdbext.gdb_layer import merge_live as m; "
                   "from gdbext.gdb_layer.context import CONTEXT as c; "
                   "from gdbext.core.merge_here import CheckRequest as R; "
                   "print(json.dumps({'check': m.check_here(c, R(only=('I3', 'I6'))), "
                   "'firmware': m.remember_firmware(c)}))").out
    got = json_line(out)
    assert [c["id"] for c in got["check"]["checks"]] == ["I3", "I6"]
    assert got["check"]["ok"] is False and got["check"]["counts"]["FAIL"] == 2
    regs = stop.qemu_registers()
    fw = got["firmware"]
    assert fw["cr3"] == regs["cr3"] and fw["root"] == regs["cr3"] & ~0xFFF
    assert fw["rip"] == regs["rip"] and fw["rsp"] == regs["rsp"] and fw["rbx"] == regs["rbx"]
    assert fw["l4_bytes"] == PAGE


# --- bad input: one line, physical mode restored ------------------------------------------

def test_bad_input_is_one_line(at_entry):
    stop = at_entry
    cases = {
        "xen-l4merge-check --only I3,I99": "I99",
        "xen-l4merge-check --skip bogus": "BOGUS",
        "xen-l4merge-apply --undo": "nothing to undo",
        "xen-l4merge-apply --undo --relocate": "--undo takes no other option",
        "xen-l4merge-check --table 0x1001": "not 4 KiB aligned",
    }
    for command, words in cases.items():
        reply = stop.gdb.execute(command, check=False)
        assert reply.error and words in reply.error, (command, reply.error)
        assert "\n" not in reply.error and "Traceback" not in reply.out + reply.error
        assert stop.phymem_mode() == "0", command


def test_elsewhere_runs_what_applies_and_refuses_to_apply(at_start_xen):
    stop = at_start_xen
    result = stop.json("xen-l4merge-check --json")
    assert result["mode"] == "live" and result["stop"] == "__start_xen"
    checks = {c["id"]: c for c in result["checks"]}
    # Xen's own tables, relocated once by trampoline_setup.
    assert checks["I9"]["status"] == "PASS"
    skipped = [c for c in checks.values() if c["status"] == "SKIP"]
    assert skipped and all("does not apply at __start_xen" in c["summary"] for c in skipped)
    assert result["ok"] is True
    before = stop.qemu_registers()
    reply = stop.gdb.execute("xen-l4merge-apply", check=False)
    assert reply.error and "not at __efi64_mb2_start" in reply.error and "\n" not in reply.error
    reply = stop.gdb.execute("xen-l4merge-check --predict", check=False)
    assert reply.error and "--firmware-root" in reply.error
    assert stop.qemu_registers()["cr3"] == before["cr3"]
    assert stop.phymem_mode() == "0"


# --- the what-if on the real machine (each test boots its own guest) ----------------------

def test_relocated_merge_reaches_efi_multiboot2_at_its_linked_va(at_entry_consumable, syms):
    stop = at_entry_consumable
    base = stop.run["load_base"]
    linked = syms.linked_va(CALL_TARGET)
    elf = syms.read_linked(linked, 32)
    entry_regs = stop.qemu_registers()
    before = read_pages(stop, table_pages(syms, base))

    applied = stop.json("xen-l4merge-apply --relocate --json")["steps"][0]
    assert applied["relocated"] is True
    assert stop.qemu_registers()["cr3"] == applied["root"]
    # Let the guest run to the call itself, under M (its lower half is the firmware's),
    # and take QEMU's view there: what the call at the linked VA must leave as it was.
    call_pa = call_instruction_pa(syms, base)
    stop.cmd(f"tbreak *{call_pa:#x}")
    stop.cmd("continue", timeout=60)
    at_call = stop.qemu_registers()
    assert at_call["rip"] == call_pa and at_call["cr3"] == applied["root"]
    stack_pages = sorted({(at_call["rsp"] - 8) & ~0xFFF, at_call["rsp"] & ~0xFFF})
    stack_before = read_pages(stop, stack_pages)

    called = stop.json("xen-l4merge-apply --call-linked --json")["steps"][0]
    assert called["ran_to_call"] is False and called["call"] == call_pa
    assert called["target"] == linked and called["reachable"] is True
    assert called["fetch_pa"] == base + syms.offset(CALL_TARGET)
    regs = stop.qemu_registers()
    assert regs["rip"] == linked and regs["rax"] == linked
    assert regs["rsp"] == at_call["rsp"] - 8
    # The return address the call pushed: the next instruction, at the load address.
    assert struct.unpack("<Q", stop.xp(regs["rsp"], 8))[0] == call_pa + 5
    # The bytes at the linked VA: through GDB (under the new CR3) and through QEMU.
    assert gdb_bytes(stop, "$pc", 32) == elf
    gpa = parse_gva2gpa(stop.monitor(f"gva2gpa {linked:#x}"))
    assert gpa == base + syms.offset(CALL_TARGET)
    assert stop.xp(gpa, 32) == elf
    # The CPU really executes there: one instruction on, still inside efi_multiboot2.
    stop.cmd("stepi")
    rip = stop.qemu_registers()["rip"]
    assert rip != linked and syms.symbol_at(rip)[0] == CALL_TARGET

    # --undo: every range written and every register changed, as they were.
    changes = applied["changes"] + called["changes"]
    undone = stop.json("xen-l4merge-apply --undo --json")
    assert len(undone["restored"]) == len(changes)
    for ch in changes:
        if ch["kind"] != "memory":
            continue
        page = ch["pa"] & ~0xFFF
        source = before if page in before else stack_before
        assert page in source, f"{ch['pa']:#x} outside the pages read before"
        off = ch["pa"] - page
        assert stop.xp(ch["pa"], ch["length"]) == source[page][off:off + ch["length"]], ch
    regs = stop.qemu_registers()
    assert regs["cr3"] == entry_regs["cr3"]
    for name in ("rip", "rsp", "rax"):
        assert regs[name] == at_call[name], name
    assert stop.phymem_mode() == "0"


def test_raw_apply_is_reported_before_stepping_and_undo_is_exact(at_entry_consumable, syms):
    stop = at_entry_consumable
    base = stop.run["load_base"]
    slot = xenmap_slot(syms)
    linked = syms.linked_va(CALL_TARGET)
    regs_before = stop.qemu_registers()
    pages = table_pages(syms, base)
    before = read_pages(stop, pages)

    applied = stop.json("xen-l4merge-apply --json")["steps"][0]
    assert applied["relocated"] is False
    root = applied["root"]
    regs = stop.qemu_registers()
    assert regs["cr3"] == root and regs["rip"] == regs_before["rip"]
    # M really is in memory: the lower half from the firmware, slot 261 raw.
    m = stop.xp(root, PAGE)
    fw = stop.xp(regs_before["cr3"] & ~0xFFF, PAGE)
    assert m[:PAGE // 2] == fw[:PAGE // 2]
    assert struct.unpack_from("<Q", m, 8 * slot)[0] & ~0xFFF == syms.offset("l3_xenmap")
    # QEMU's own walk of the linked VA under M does not reach efi_multiboot2.
    assert parse_gva2gpa(stop.monitor(f"gva2gpa {linked:#x}")) != base + syms.offset(CALL_TARGET)

    # The check, live on the applied table, before anything is stepped.
    out, error = capture(stop, "xen-l4merge-check --json")
    result = json_line(out)
    assert result["mode"] == "live" and result["table"] == root
    checks = {c["id"]: c for c in result["checks"]}
    assert {"I3", "I4", "I6"} <= set(failed_ids(error))
    fault = checks["I6"]["evidence"]["fault"]
    assert fault["where"] == f"M[{slot}]" and fault["kind"] == "unrelocated"
    assert fault["target_pa"] == syms.offset("l3_xenmap")
    assert checks["I1"]["status"] == "PASS"          # the lower half is the firmware's
    assert stop.qemu_registers()["rip"] == regs_before["rip"]   # nothing was stepped
    # The same table named with --table (how a table of one's own is checked).
    out, error = capture(stop, f"xen-l4merge-check --table {root:#x} --only I3,I6 --json")
    given = json_line(out)
    assert given["mode"] == "live" and given["table"] == root
    assert [c["status"] for c in given["checks"]] == ["FAIL", "FAIL"]
    assert failed_ids(error) == ["I3", "I6"]

    # A second apply is refused; --undo restores every byte and register.
    reply = stop.gdb.execute("xen-l4merge-apply --relocate", check=False)
    assert reply.error and "already applied" in reply.error
    undone = stop.json("xen-l4merge-apply --undo --json")
    assert len(undone["restored"]) == len(applied["changes"])
    after = read_pages(stop, pages)
    assert after == before
    assert all(ch["kind"] == "register" or ch["pa"] & ~0xFFF in before
               for ch in applied["changes"])
    assert stop.qemu_registers() == regs_before
    reply = stop.gdb.execute("xen-l4merge-apply --undo", check=False)
    assert reply.error and "nothing to undo" in reply.error
    assert stop.phymem_mode() == "0"

    # From the pristine entry again, one command: apply, run to the call, call high.
    steps = stop.json("xen-l4merge-apply --relocate --call-linked --json")["steps"]
    assert [s["action"] for s in steps] == ["apply", "call-linked"]
    assert steps[1]["ran_to_call"] is True
    assert steps[1]["call"] == call_instruction_pa(syms, base)
    assert stop.qemu_registers()["rip"] == linked
    assert gdb_bytes(stop, "$pc", 16) == syms.read_linked(linked, 16)


def test_a_new_boot_forgets_the_snapshot_and_the_journal(at_entry_consumable, syms):
    stop = at_entry_consumable
    base = stop.run["load_base"]
    applied = stop.json("xen-l4merge-apply --json")["steps"][0]
    assert stop.qemu_registers()["cr3"] == applied["root"]
    # Reboot and stop at the entry again: what was written belongs to the old boot.
    stop.monitor("system_reset")
    run = stop.json(f"xen-run-to {ENTRY} --base {base:#x} --json", timeout=300)
    assert run["rip"] == base + syms.offset(ENTRY)
    forgotten = stop.json("python import json; from gdbext.gdb_layer.context import CONTEXT "
                          "as c; print(json.dumps([c.merge.snapshot_for(c.xen.load_base) "
                          "is None, c.merge.journal is None]))")
    assert forgotten == [True, True]
    reply = stop.gdb.execute("xen-l4merge-apply --undo", check=False)
    assert reply.error and "nothing to undo" in reply.error
    # Applying works again, from the new boot's firmware tables: the RFC's raw table,
    # and the call at the linked VA on it is flagged, and really goes wrong.
    linked = syms.linked_va(CALL_TARGET)
    firmware_cr3 = stop.qemu_registers()["cr3"]
    again, called = stop.json("xen-l4merge-apply --call-linked --json")["steps"]
    assert again["relocated"] is False and stop.qemu_registers()["cr3"] == again["root"]
    assert called["reachable"] is False and called["target_pa"] == base + syms.offset(CALL_TARGET)
    assert stop.qemu_registers()["rip"] == linked
    assert parse_gva2gpa(stop.monitor(f"gva2gpa {linked:#x}")) != called["target_pa"]
    stop.cmd("stepi")
    after = stop.qemu_registers()
    assert after["cr2"] == linked                    # a page fault fetching efi_multiboot2
    hit = syms.symbol_at(after["rip"])
    assert hit is None or hit[0] != CALL_TARGET      # in the firmware's handler instead
    stop.json("xen-l4merge-apply --undo --json")
    assert stop.qemu_registers()["cr3"] == firmware_cr3


def test_gdb_batch_exits_nonzero_when_a_check_fails(xen_syms_path, tmp_path):
    # What CI runs: a GDB script in batch mode; the failing check must set the status.
    import subprocess

    from gdbext.host.gdbdriver import gdb_binary
    from gdbext.host.lab import Lab, LabConfig
    from gdbext.paths import GDBINIT

    from .conftest import image_for

    with Lab(LabConfig(xen_image=image_for(xen_syms_path), xen_syms=xen_syms_path,
                       memory_mb=1024)) as lab:     # started here, stopped by pid at exit
        script = tmp_path / "check.gdb"
        script.write_text(f"source {GDBINIT}\n"
                          f"target remote {lab.gdb_target}\n"
                          f"xen-syms {xen_syms_path}\n"
                          f"xen-run-to {ENTRY}\n"
                          "xen-l4merge-check --assume-relocated --only I3,I4,I6\n"
                          "xen-l4merge-check\n"
                          "echo not-reached\\n\n")
        proc = subprocess.run([gdb_binary(), "-nx", "-batch", "-x", str(script)],
                              capture_output=True, text=True, timeout=300,
                              env=dict(__import__("os").environ, NO_COLOR="1"))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "predict-relocated at __efi64_mb2_start" in out       # passed, went on
    assert re.search(r"^I3\s+FAIL\s", out, re.M)                 # the report came first
    assert re.search(r"xen-l4merge-check: \d+ checks failed: .*I3", out)
    assert "not-reached" not in out and "Traceback" not in out


def test_paging_off_in_trampoline_setup_is_not_an_error(xen_syms_path):
    # 32-bit code with paging off: no table to judge, every check says why it does not apply.
    with booted_to("trampoline_setup", xen_syms_path) as stop:
        cr0 = stop.qemu_registers()["cr0"]
        assert not cr0 & (1 << 31)                       # CR0.PG clear: QEMU's word
        result = stop.json("xen-l4merge-check --json")
        assert result["mode"] == "live" and result["stop"] == "trampoline_setup"
        assert result["ok"] is True and result["table"] is None
        assert all(c["status"] == "SKIP" and "does not apply at trampoline_setup" in c["summary"]
                   for c in result["checks"])
        reply = stop.gdb.execute("xen-l4merge-apply", check=False)
        assert reply.error and "not at __efi64_mb2_start" in reply.error
        assert stop.phymem_mode() == "0"
