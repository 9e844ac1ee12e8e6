"""Issue 11 (CPU exceptions) on real boots of Debian's Xen 4.17: the crash is caught at
the exception's handler, explained, and reported by every command that runs the guest.

Oracles, never gdbext's own numbers: xen-syms (pyelftools, through xensyms: linked VAs,
offsets, the link-time bytes of ErrCodeToStr), the firmware's own exception dump on the
serial console (printed once the guest runs on past the catch), QEMU's monitor
(info registers at the handler) and QEMU's -d int log of the exception.
"""

from __future__ import annotations

import gzip
import io
import json
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import pytest
from elftools.elf.elffile import ELFFile

from gdbext import paths
from gdbext.core import fwdump, qemulog, x86decode
from gdbext.core.qemu import parse_descriptor_tables
from gdbext.core.xensyms import load_xen_syms
from gdbext.host.gdbdriver import lab_session
from gdbext.host.lab import LabConfig

from ..oracles import parse_gva2gpa
from .conftest import BOOT_TIMEOUT_S, qemu_registers, qemu_xp

ENTRY = "__efi64_mb2_start"
CALL_TARGET = "efi_multiboot2"
# The firmware's dump ends with this line (EDK2's CpuExceptionHandlerLib).
FW_DUMP_END = r"!!!! (Find image|Can't find image)[^\n]*\n"
# Seconds the firmware may take to print its dump once the guest runs on.
DUMP_WAIT_S = 120
# A caught crash is reported at once: the handler's breakpoint fires on the fault.
CATCH_WITHIN_S = 30


@pytest.fixture(scope="module")
def syms(xen_syms_path):
    return load_xen_syms(xen_syms_path)


def run_to(gdb, symbol: str) -> dict:
    return gdb.execute(f"xen-run-to {symbol} --json --timeout {BOOT_TIMEOUT_S}",
                       timeout=BOOT_TIMEOUT_S + 30).json()


def last_crash(gdb) -> dict:
    crash = gdb.execute("xen-fault --json").json()["crash"]
    assert crash is not None, "xen-fault has no crash"
    return crash


def firmware_dump(gdb, lab) -> fwdump.FirmwareDump:
    """Let the guest run on past the catch (no breakpoint left, GDB detached) and read
    the dump the firmware's own handler prints."""
    gdb.execute("set xen-catch-faults off")
    gdb.execute("detach")
    lab.wait_for_serial(FW_DUMP_END, timeout=DUMP_WAIT_S)
    d = fwdump.last_exception_dump(lab.serial_log.read_text(errors="replace"))
    assert d is not None, "the firmware printed no exception dump"
    return d


def firmware_handlers(gdb) -> set:
    """The handler offsets of the present gates 0-31 of the IDT in force (the firmware
    identity-maps its IDT: gva2gpa, then xp)."""
    base, limit = parse_descriptor_tables(gdb.execute("monitor info registers").out)["idt"]
    assert limit >= 32 * 16 - 1
    pa = parse_gva2gpa(gdb.execute(f"monitor gva2gpa {base:#x}").out)
    raw = qemu_xp(gdb, pa, 32 * 16)
    out = set()
    for v in range(32):
        g = raw[16 * v:16 * v + 16]
        if g[5] & 0x80:       # present
            out.add(int.from_bytes(g[0:2], "little") | int.from_bytes(g[6:8], "little") << 16
                    | int.from_bytes(g[8:12], "little") << 32)
    return out


def pf_events(log_path) -> list:
    return [e for e in qemulog.parse_int_log(log_path.read_text(errors="replace"))
            if isinstance(e, qemulog.IntEvent) and e.vector == 14]


# --- (a) the RFC's crash --------------------------------------------------------------

def test_rfc_crash_is_caught_and_explained(xen_syms_path, syms, tmp_path):
    """Raw merge + call at the linked VA + continue: #PF caught at the firmware's #PF
    handler, instruction fetch / not present, CR2 = RIP = efi_multiboot2's linked VA,
    the walk naming the merged L4's unrelocated l3_xenmap entry; compared with QEMU's
    registers at the handler, QEMU's -d int record, and the firmware's dump."""
    int_log = tmp_path / "qemu-int.log"
    cfg = LabConfig(memory_mb=1024, extra_qemu_args=["-d", "int", "-D", str(int_log)])
    with lab_session(cfg, xen_syms_path) as (lab, gdb):
        run_to(gdb, ENTRY)
        # Planted at the entry: the handlers of vectors 0-31 of the firmware's IDT, as
        # QEMU's monitor shows IDTR and its bytes (gates decoded here by hand).
        catching = gdb.execute("xen-fault --json").json()["catching"]
        assert catching["kind"] == "firmware"
        handlers = [s for s in catching["sites"] if isinstance(s["what"], list)]
        assert {s["address"] for s in handlers} == firmware_handlers(gdb)
        assert sorted(v for s in handlers for v in s["what"]) == list(range(32))
        # and Xen's fatal paths, at their linked VAs (xen-syms)
        assert {s["what"]: s["address"] for s in catching["sites"]
                if isinstance(s["what"], str)} == {
            n: syms.linked_va(n) for n in ("machine_halt", "machine_restart")}
        gdb.execute("xen-l4merge-apply --call-linked", timeout=180)
        t0 = time.monotonic()
        cont = gdb.execute("continue", timeout=CATCH_WITHIN_S * 4)
        assert time.monotonic() - t0 < CATCH_WITHIN_S
        assert "the guest crashed: #PF at" in cont.out, cont.out
        crash = last_crash(gdb)
        qemu = qemu_registers(gdb)          # at the handler's first instruction

        linked = syms.linked_va(CALL_TARGET)
        assert crash["kind"] == "fault" and crash["vector"] == 14
        assert crash["error"]["fetch"] and not crash["error"]["present"]
        assert crash["error"]["text"] == "instruction fetch, not present"
        assert crash["cr2"] == crash["rip"] == linked
        assert crash["summary"].startswith("the guest crashed: #PF at")
        assert f"CR2 {linked:#x}" in crash["summary"]
        # QEMU's own registers at the handler: CR2, CR3, and RSP at the frame.
        assert qemu["cr2"] == crash["cr2"] and qemu["cr3"] == crash["cr3"]
        assert crash["frame"]["frame_va"] == qemu["rsp"]
        assert crash["rip_name"]["symbol"] == CALL_TARGET
        # The walk: the merged L4's slot of the linked VA holds l3_xenmap unrelocated.
        slot = (linked >> 39) & 0x1FF
        l4 = crash["walk"]["levels"][0]
        assert l4["level"] == 4 and l4["index"] == slot
        assert l4["pointer"]["kind"] == "unrelocated"
        assert l4["pointer"]["link"] == syms.read_u64(
            syms.linked_va("idle_pg_table") + 8 * slot)
        assert "l3_xenmap's link-time address: unrelocated" in l4["note"]
        assert crash["walk"]["mapped"] is False
        # The origin: a linked VA used by code at the load address, held in %rax
        # (the register the RFC's call *%rax jumps through).
        assert crash["provenance"]["kind"] == "linked-va-at-load"
        assert "rax" in crash["provenance"]["registers"]
        assert crash["caller"]["kind"] == "xen-load"

        d = firmware_dump(gdb, lab)
    assert (d.vector, d.exception_data, d.rip, d.cr2, d.cr3) == (
        crash["vector"], crash["error_code"], crash["rip"], crash["cr2"], crash["cr3"])
    events = pf_events(int_log)
    assert events, "QEMU logged no #PF"
    first = events[0]
    assert (first.rip, first.error_code, first.cr2) == (
        crash["rip"], crash["error_code"], crash["cr2"])


# --- (b) a static pointer holding a linked VA ------------------------------------------

def test_static_pointer_crash_names_the_table_and_index(xen_syms_path, syms, tmp_path):
    """PrintErrMesg called at the load address (registers written from GDB, as the user
    would): its ErrCodeToStr[] holds linked VAs; the firmware's OutputString reads the
    string through it and faults. Expected CR2: that table entry's link-time value."""
    int_log = tmp_path / "qemu-int.log"
    cfg = LabConfig(memory_mb=1024, extra_qemu_args=["-d", "int", "-D", str(int_log)])
    table = "ErrCodeToStr.16"
    code = first_message_index(syms, table)
    expected_cr2 = syms.read_u64(syms.linked_va(table) + 8 * code)
    with lab_session(cfg, xen_syms_path) as (lab, gdb):
        # efi_init has set StdOut/StdErr by the time efi_console_set_mode runs.
        run = run_to(gdb, "efi_console_set_mode")
        b = run["load_base"]
        regs = qemu_registers(gdb)
        rsp = ((regs["rsp"] - 0x400) & ~0xF) - 8      # as after a call: RSP+8 16-aligned
        empty = b + syms.offset(syms.linked_va(table))   # ErrCodeToStr[0] is 0: L""
        assert syms.read_u64(syms.linked_va(table)) == 0
        for c in (f"set $rsp = {rsp:#x}", f"set *(unsigned long *){rsp:#x} = {regs['rip']:#x}",
                  f"set $rdi = {empty:#x}", f"set $rsi = {(1 << 63) | code:#x}",
                  f"set $rip = {b + syms.offset(syms.linked_va('PrintErrMesg')):#x}"):
            gdb.execute(c)
        cont = gdb.execute("continue", timeout=CATCH_WITHIN_S * 4)
        assert "the guest crashed: #PF at" in cont.out, cont.out
        crash = last_crash(gdb)
        assert crash["vector"] == 14 and crash["cr2"] == expected_cr2
        assert crash["error"]["text"] == "read, not present"
        assert crash["rip_name"]["kind"] == "firmware"      # OutputString, in OVMF
        prov = crash["provenance"]
        assert prov["kind"] == "linked-va-at-load"
        wheres = [s["where"] for s in prov["stored_at"]]
        assert f"{table}[{code}]" in wheres
        assert "a static pointer holding a linked VA" in prov["message"]
        # ... and the position-independence check's finding that predicted it (issue 12).
        assert crash["predicted_by"]["slot"] == f"{table}[{code}]"
        assert crash["predicted_by"]["value"] == expected_cr2
        # The faulting instruction's operand that used it, decoded at RIP.
        ops = crash["instruction"]["memory_operands"]
        assert [o["address"] for o in ops] == [expected_cr2]
        assert prov["operands"] == [ops[0]["operand"]]
        # QEMU's bytes at RIP and its registers at the handler (the CPU changes none
        # when it delivers the #PF): the operand's address is the table entry's value.
        at_handler = qemu_registers(gdb)
        pa = parse_gva2gpa(gdb.execute(f"monitor gva2gpa {crash['rip']:#x}").out)
        insn = x86decode.decode_one(qemu_xp(gdb, pa, 15), crash["rip"])
        mem = insn.memory_operands()
        assert len(mem) == 1 and mem[0].base and mem[0].index is None
        assert at_handler[mem[0].base] + mem[0].disp == expected_cr2
        d = firmware_dump(gdb, lab)
    assert (d.vector, d.exception_data, d.rip, d.cr2) == (
        14, crash["error_code"], crash["rip"], crash["cr2"])
    assert any(e.rip == crash["rip"] and e.cr2 == expected_cr2 for e in pf_events(int_log))


def first_message_index(syms, table: str) -> int:
    """The first EFI status whose message pointer in the table is not NULL."""
    base = syms.linked_va(table)
    for i in range(1, syms.lookup(table).size // 8):
        if syms.read_u64(base + 8 * i):
            return i
    raise AssertionError(f"{table} holds no message pointer")


# --- (d) catching off -------------------------------------------------------------------

def test_catching_off_leaves_the_crash_unseen(xen_syms_path):
    with lab_session(LabConfig(memory_mb=1024), xen_syms_path) as (lab, gdb):
        run_to(gdb, ENTRY)
        gdb.execute("set xen-catch-faults off")
        assert "off" in gdb.execute("show xen-catch-faults").out
        gdb.execute("xen-l4merge-apply --call-linked", timeout=180)
        # The crash happens (the firmware prints its dump) while gdbext waits for a
        # stop that never comes: a timeout, not a crash.
        reply = gdb.execute("xen-run-to __high_start --no-reset --timeout 5", timeout=120,
                            check=False)
        assert "timed out" in reply.error and "crashed" not in reply.error, reply
        lab.wait_for_serial(FW_DUMP_END, timeout=DUMP_WAIT_S)
        assert "no exception caught (catching is off" in gdb.execute("xen-fault").out


# --- (c) xen-boot-check on a crashing build ---------------------------------------------

def crashing_image(syms, out_dir) -> tuple:
    """Debian's multiboot2 image with one change: inside efi_multiboot2 (past the bytes a
    stop verifies), 'movabs $LINKED_VA,%rax; mov (%rax),%rax', a read of a linked VA
    by code at the load address. Returns (image path, the linked VA, the patch's offset)."""
    data = bytearray(gzip.decompress(paths.XEN_DEBIAN_IMAGE.read_bytes()))
    elf = ELFFile(io.BytesIO(bytes(data)))
    seg = next(s for s in elf.iter_segments() if s["p_type"] == "PT_LOAD")
    start = syms.linked_va(CALL_TARGET)
    at = next(i.address for i in x86decode.iter_decode(syms.read_linked(start, 64), start)
              if i.address - start >= 16)
    target = syms.linked_va("ErrCodeToStr.16")
    patch = b"\x48\xb8" + target.to_bytes(8, "little") + b"\x48\x8b\x00"
    file_off = seg["p_offset"] + syms.offset(at) - seg["p_paddr"]
    assert bytes(data[file_off:file_off + 16]) == syms.read_linked(at, 16)
    data[file_off:file_off + len(patch)] = patch
    path = out_dir / "xen-crashing"
    path.write_bytes(bytes(data))
    return path, target, syms.offset(at)


def test_boot_check_reports_a_crash(xen_syms_path, syms, tmp_path):
    image, target, offset = crashing_image(syms, tmp_path)
    report, junit = tmp_path / "report.json", tmp_path / "junit.xml"
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "gdbext.host.bootcheck", "--xen", str(image), "--xen-syms",
         str(xen_syms_path), "--report", str(report), "--junit", str(junit),
         "--timeout", "240"], capture_output=True, text=True, timeout=900)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert f"the guest crashed: #PF at" in proc.stderr and f"CR2 {target:#x}" in proc.stderr
    r = json.loads(report.read_text())
    crash = r["result"]["crash"]
    b = r["result"]["load_base"]
    assert crash["vector"] == 14 and crash["cr2"] == target
    # The fault is the patch's second instruction, after the 10-byte movabs.
    assert crash["rip"] == b + offset + 10 and crash["error"]["text"] == "read, not present"
    assert crash["rip_name"]["kind"] == "xen-load"
    assert crash["after"] in r["result"]["reached"]
    assert r["result"]["reached"], "the stops before the crash are kept"
    root = ET.parse(junit).getroot()
    failures = [f for f in root.iter("failure") if f.get("type") == "CRASH"]
    assert len(failures) == 1 and "the guest crashed: #PF" in failures[0].get("message")
    assert not [e for e in root.iter("error") if e.get("type") == "RUN"]
    # Well under the --timeout: the crash ends the run, nothing waits it out.
    assert elapsed < 240, elapsed


def test_healthy_boot_reports_no_crash(xen_syms_path):
    with lab_session(LabConfig(memory_mb=1024), xen_syms_path) as (lab, gdb):
        reply = gdb.execute(f"xen-mb2-break --batch --json --timeout {BOOT_TIMEOUT_S}",
                            timeout=BOOT_TIMEOUT_S * 4)
        result = reply.json()
        assert result["crash"] is None and result["error"] is None and result["complete"]
        assert "no exception caught" in gdb.execute("xen-fault").out


# --- (e) Xen's own fatal path, once Xen has its IDT ---------------------------------------

def test_xen_panic_is_caught_at_its_fatal_path(xen_syms_path, syms):
    """The lab boots no dom0: Xen panics ("dom0 kernel not specified" or the like) after
    __start_xen. With Xen's IDT loaded gdbext catches Xen's fatal path, not its handlers:
    the stop is at machine_halt (the lab's 'noreboot'), called from panic, after Xen
    printed the panic on its console (the serial log, read here as the oracle)."""
    with lab_session(LabConfig(memory_mb=1024), xen_syms_path) as (lab, gdb):
        # At __start_xen the firmware's IDT is still loaded (Xen's comes in trap_init);
        # Xen's fatal paths are planted from the first stop on, beside its handlers.
        run_to(gdb, "__start_xen")
        sites = {s["address"]: s["what"] for s in
                 gdb.execute("xen-fault --json").json()["catching"]["sites"]}
        assert {n: syms.linked_va(n) for n in ("machine_halt", "machine_restart")}.items() \
            <= {w: a for a, w in sites.items() if isinstance(w, str)}.items()
        cont = gdb.execute("continue", timeout=BOOT_TIMEOUT_S)
        assert "the guest crashed: Xen's fatal path: machine_halt from panic+" in cont.out, \
            cont.out
        crash = last_crash(gdb)
        assert crash["kind"] == "xen-fatal" and crash["symbol"] == "machine_halt"
        assert crash["rip"] == syms.linked_va("machine_halt")
        panic = syms.linked_va("panic")
        assert panic <= crash["caller"]["address"] < panic + syms.lookup("panic").size
        log = lab.serial_log.read_text(errors="replace")
        assert "Panic on CPU 0" in log       # printed before the stop, as planned
