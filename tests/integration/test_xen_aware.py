"""Issue 4 on real boots at two memory sizes: the load base from every source agrees
with Xen's console, GDB names Xen's code, the build-id check catches another ELF,
and addresses and output speak Xen.

One boot per memory size (module scope), stopped at __efi64_mb2_start. The tests
that need the entry state come first; the last one lets that boot run on to
__start_xen and then to Xen's console line. Expected values come from xen-syms
(arithmetic, pyelftools), QEMU's monitor and Xen's serial console, never from
constants here.
"""

from __future__ import annotations

import re
import shutil

import pytest
from elftools.elf.elffile import ELFFile

from gdbext import paths
from gdbext.core import x86, xenimage
from gdbext.core.xensyms import load_xen_syms

from ..oracles import parse_gva2gpa
from .conftest import booted_to, matrix_builds, need_build

MEMORY_SIZES_MB = (1024, 4096)
# The default build at both sizes; every other build of the matrix at the first.
BOOTS = [(paths.DEFAULT_BUILD, mb) for mb in MEMORY_SIZES_MB] + [
    (b, MEMORY_SIZES_MB[0]) for b in matrix_builds() if b != paths.DEFAULT_BUILD]


@pytest.fixture(scope="module", params=BOOTS, ids=lambda p: f"xen{p[0]}-{p[1]}M")
def boot(request):
    build, memory_mb = request.param
    with booted_to("__efi64_mb2_start", need_build(build).syms, memory_mb=memory_mb) as stop:
        yield stop


@pytest.fixture(scope="module")
def syms(boot):
    return load_xen_syms(boot.lab.xen_syms)


def _int(stop, expr: str) -> int:
    out = stop.cmd(f"p/x {expr}").out
    return int(out.split("=", 1)[1], 16)


# --- at __efi64_mb2_start --------------------------------------------------------------------

def test_base_from_rip_at_entry_and_gdb_names_the_entry(boot, syms):
    loc = boot.json("xen-locate --json")
    rip = boot.json("xen-regs --json")["rip"]
    assert loc["source"].startswith("RIP at") and "__efi64_mb2_start" in loc["source"]
    assert loc["load_base"] == rip - syms.offset("__efi64_mb2_start") == boot.run["load_base"]
    assert loc["build_id_match"] is True and loc["build_id_memory"] == syms.build_id.hex()
    # GDB got xen-syms at the load address and at the linked address.
    assert "<__efi64_mb2_start>" in boot.cmd("x/i $pc").out
    assert boot.cmd(f"info symbol {syms.linked_va('__start_xen'):#x}").out.startswith(
        "__start_xen in section")
    # Idempotent: locating again adds nothing more to GDB.
    objfiles = boot.cmd("python print(len(gdb.objfiles()))").out
    boot.json("xen-locate --json")
    assert boot.cmd("python print(len(gdb.objfiles()))").out == objfiles


def test_base_from_the_scan_before_xen_runs(boot, syms):
    loc = boot.json("xen-locate --scan --json")
    assert loc["source"].startswith("scan")
    assert loc["load_base"] == boot.run["load_base"]
    assert 0 < loc["candidates_read"] <= loc["candidates"]
    # The candidates are the RELOCATABLE tag's bases in QEMU's RAM below 4 GiB.
    ram = [(int(m.group(1), 16), int(m.group(2), 16) + 1) for m in re.finditer(
        r"([0-9a-f]+)-([0-9a-f]+) \(prio \d+, ram\): (?:pc\.ram|ram-below-4g|ram-above-4g)",
        boot.monitor("info mtree -f"))]
    assert ram
    assert loc["candidates"] == len(xenimage.scan_candidates(syms, ram))


def test_symbol_syntax_and_functions_equal_xen_syms_arithmetic(boot, syms):
    base = boot.run["load_base"]
    assert _int(boot, "$xen_base()") == base
    assert _int(boot, '$xen_pa("efi_multiboot2")') == base + syms.offset("efi_multiboot2")
    assert _int(boot, '$xen_pa("idle_pg_table+0x828")') == (
        base + syms.offset("idle_pg_table") + 0x828)
    assert _int(boot, '$xen_va("efi_multiboot2+0x10")') == syms.linked_va("efi_multiboot2") + 16
    assert _int(boot, '$xen_offset("l3_xenmap")') == (
        syms.linked_va("l3_xenmap") - syms.virt_start)
    assert _int(boot, "$xen_va2pa($pc)") == base + syms.offset("__efi64_mb2_start")
    named = boot.cmd('p $xen_name($xen_pa("l2_directmap") + 0x1008)').out
    assert named.split("=", 1)[1].strip() == '"l2_directmap+0x1008"'
    # As a breakpoint condition evaluates it.
    cond = '$xen_va2pa($pc) == $xen_pa("__efi64_mb2_start") && $xen_base() == ' + hex(base)
    assert boot.cmd(f"python print(int(gdb.parse_and_eval({cond!r})))").out.strip() == "1"
    # Commands: SYMBOL@pa is the PA at B; QEMU agrees on the translation (firmware identity map).
    pa = base + syms.offset("efi_multiboot2")
    walk = boot.json("xen-va2pa efi_multiboot2@pa --json")
    assert walk["va"] == pa and walk["pa"] == parse_gva2gpa(boot.monitor(f"gva2gpa {pa:#x}"))
    assert walk["pa_name"] == "efi_multiboot2" and walk["load_base"] == base
    back = boot.json("xen-pa2va efi_multiboot2@pa --json")
    assert pa in [v["va"] for v in back["vas"]] and back["pa_name"] == "efi_multiboot2"
    pt = boot.json("xen-pt --range efi_multiboot2@pa efi_multiboot2+0x1000@pa --json")
    assert pt["ranges"] and pt["ranges"][0]["va"] <= pa < pt["ranges"][-1]["end"]
    # A bare symbol where a PA is wanted is refused with the fix.
    reply = boot.gdb.execute("xen-pa2va efi_multiboot2", check=False)
    assert reply.error and "efi_multiboot2@pa" in reply.error and "\n" not in reply.error


def test_unrelocated_idle_pg_table_is_named_and_classified_at_entry(boot, syms):
    """At the entry nothing is relocated yet: walking the linked VA of efi_multiboot2
    through idle_pg_table at B shows slot 261's pointer still at its link-time PA."""
    base = boot.run["load_base"]
    walk = boot.json("xen-va2pa efi_multiboot2 --root idle_pg_table@pa --json")
    top = walk["levels"][0]
    assert top["table"] == base + syms.offset("idle_pg_table")
    assert top["table_name"] == "idle_pg_table"
    assert top["pointer"]["kind"] == xenimage.UNRELOCATED
    assert top["pointer"]["target_pa"] == syms.offset("l3_xenmap")
    assert top["pointer"]["expected_pa"] == base + syms.offset("l3_xenmap")
    text = boot.cmd("xen-va2pa efi_multiboot2 --root idle_pg_table@pa").out
    assert "[idle_pg_table]" in text and "unrelocated" in text


def test_another_elf_is_caught_by_the_build_id_check(boot, syms, tmp_path_factory):
    other = tmp_path_factory.mktemp("elf") / "xen-syms-other"
    shutil.copyfile(syms.path, other)
    with open(other, "rb") as f:
        note = ELFFile(f).get_section_by_name(".note.gnu.build-id")
        desc_off = note["sh_offset"] + 16          # 12-byte note header + "GNU\0"
    with open(other, "r+b") as f:
        f.seek(desc_off)
        first = f.read(4)
        f.seek(desc_off)
        f.write(bytes(b ^ 0xFF for b in first))
    try:
        boot.cmd(f"xen-syms {other}")
        loc = boot.json("xen-locate --json")
        assert loc["build_id_match"] is False
        assert loc["build_id_memory"] == syms.build_id.hex() != loc["build_id"]
        for command in ("xen-va2pa efi_multiboot2@pa", "p $xen_base()", "xen-locate"):
            reply = boot.gdb.execute(command, check=False)
            msg = reply.error or reply.out.strip().splitlines()[-1]
            assert "build-id mismatch" in msg, command
            assert syms.build_id.hex() in msg and loc["build_id"] in msg, command
            assert "xen-ignore-build-id" in msg and "\n" not in msg.strip(), command
        # Symbols of another build are not given to GDB.
        assert "<__efi64_mb2_start>" not in boot.cmd("x/i $pc").out
        boot.cmd("set xen-ignore-build-id on")
        assert _int(boot, "$xen_base()") == boot.run["load_base"]
    finally:
        boot.cmd("set xen-ignore-build-id off")
        boot.cmd(f"xen-syms {syms.path}")
    assert boot.json("xen-locate --json")["build_id_match"] is True
    assert "<__efi64_mb2_start>" in boot.cmd("x/i $pc").out


def test_a_map_file_needs_the_base_by_hand(boot, syms):
    base = boot.run["load_base"]
    try:
        boot.cmd(f"xen-syms {paths.build_of(boot.lab.xen_syms).syms_map}")
        reply = boot.gdb.execute("xen-locate", check=False)
        assert reply.error and "xen-locate --base PA" in reply.error and "\n" not in reply.error
        loc = boot.json(f"xen-locate --base {base:#x} --json")
        assert loc["verified"] is None and loc["build_id_match"] is None
        assert _int(boot, '$xen_pa("efi_multiboot2")') == base + syms.offset("efi_multiboot2")
        assert boot.json("xen-va2pa efi_multiboot2@pa --json")["pa_name"] == "efi_multiboot2"
    finally:
        boot.cmd(f"xen-syms {syms.path}")
    assert boot.json("xen-locate --json")["build_id_match"] is True


def test_xen_info_at_entry(boot, syms):
    info = boot.json("xen-info --json")
    assert info["version"] == syms.version and info["build_id"] == syms.build_id.hex()
    assert info["build_id_match"] is True and info["load_base"] == boot.run["load_base"]
    assert info["where"] == "__efi64_mb2_start"
    assert info["paging_mode"] == "4-level" and info["root_owner"] == "firmware"
    text = boot.cmd("xen-info").out
    assert syms.build_id.hex() in text and "firmware" in text


# --- the same boot, run on to __start_xen and to Xen's console line (keep these last) -------

def _py(stop, expr: str) -> str:
    """Evaluate a Python expression inside GDB, with the core and the GDB layer at hand."""
    return stop.cmd("python from gdbext.gdb_layer.context import CONTEXT as X; "
                    "from gdbext.core import xenimage as I; t = X.target; "
                    f"print({expr})").out.strip()


def test_mbi_esi_and_stored_xen_phys_start_give_b(boot, syms):
    base = boot.run["load_base"]
    # At the entry, GRUB's boot information (%rbx) has LOAD_BASE_ADDR = PA(_start).
    assert _py(boot, "I.base_from_mbi(t.cache, X.xen.syms, t.read_register('rbx'))") == str(base)
    # In trampoline_setup, %esi still holds B (put there by x86_32_switch).
    run = boot.json("xen-run-to trampoline_setup --json --timeout 60", timeout=90)
    assert run["at"] == "load address" and run["load_base"] == base
    assert boot.json("xen-info --json")["where"] == "trampoline_setup"
    esi_base = _py(boot, "I.base_from_esi(t.cache, X.xen.syms, t.read_register('rip'), "
                         "t.read_register('rsi') & 0xffffffff)")
    assert esi_base == str(base)
    # Its first instruction stores B in xen_phys_start: then it is there at its PA.
    assert _py(boot, "I.phys_start_holds(t.cache, X.xen.syms, X.xen.load_base)") == "False"
    boot.cmd("stepi")
    assert _py(boot, "I.phys_start_holds(t.cache, X.xen.syms, X.xen.load_base)") == "True"


def test_start_xen_phys_start_and_console_agree(boot, syms):
    base = boot.run["load_base"]
    run = boot.json("xen-run-to __start_xen --json --timeout 120", timeout=150)
    assert run["at"] == "linked"
    assert "<__start_xen>" in boot.cmd("x/i $pc").out
    loc = boot.json("xen-locate --json")
    assert loc["source"].startswith("xen_phys_start") and loc["load_base"] == base
    info = boot.json("xen-info --json")
    assert info["root_name"] == "idle_pg_table" and info["root_owner"] == "xen"
    assert info["where"] == "__start_xen"

    # A directmap address: its L4 slot is the one idle_pg_table links to l3_directmap.
    links = syms.link_qwords("idle_pg_table")
    slot = next(i for i, e in enumerate(links)
                if e & x86.PTE_P and e & ~0xFFF == syms.offset("l3_directmap"))
    pa = base + syms.offset("efi_multiboot2")
    va = x86.canonical((slot << 39) + pa, 48)
    walk = boot.json(f"xen-va2pa {va:#x} --json")
    assert walk["pa"] == pa == parse_gva2gpa(boot.monitor(f"gva2gpa {va:#x}"))
    names = [lv["table_name"] for lv in walk["levels"]]
    assert names[:2] == ["idle_pg_table", "l3_directmap"]
    assert names[2].startswith("l2_directmap")
    assert [lv["pointer"]["kind"] for lv in walk["levels"][:2]] == [xenimage.RELOCATED] * 2
    assert walk["pa_name"] == "efi_multiboot2"
    text = boot.cmd(f"xen-va2pa {va:#x}").out
    assert "[idle_pg_table]" in text and "[l3_directmap]" in text and "relocated" in text
    ranges = boot.json("xen-pt --range _start _end --json")["ranges"]
    assert ranges[0]["pa"] == base + syms.image_offset and ranges[0]["maps"]
    levels = boot.cmd("xen-pt --levels --range _start _end").out
    assert "[idle_pg_table]" in levels
    # Each pointer of Xen's tables is judged: at __start_xen they are relocated once.
    slot_line = next(ln for ln in levels.splitlines()
                     if ln.strip().startswith(f"L4[{(syms.virt_start >> 39) & 0x1FF:#05x}]"))
    assert slot_line.endswith("(relocated)"), slot_line

    # Xen's own word on B, printed early in __start_xen.
    assert boot.console_load_base() == base
