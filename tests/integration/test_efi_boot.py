"""xen.efi booted directly by OVMF (the lab's EFI mode: no GRUB), per build.

A build that ships xen.efi's ELF twin (4.20: xen-*.efi.elf, same layout and build-id as
the PE) gets the whole path: xen-run-to efi_start at the firmware's load address, the
registers there against QEMU's, xen-locate's B (RIP, then xen_phys_start) and the PE
headers the firmware left at B against Xen's console line, CR3 = Xen's idle_pg_table at
__start_xen, xen-va2pa against gva2gpa there. A build that ships only xen.efi's .map
(4.17) has no bytes to find Xen by: it boots, and the map with Xen's own B locates the
PE headers. Expected values come from QEMU's monitor, Xen's console and the symbol files.
"""

from __future__ import annotations

import random
import re
import struct
import subprocess

import pytest
from elftools.elf.elffile import ELFFile

from gdbext import paths
from gdbext.core import xenimage
from gdbext.core.xensyms import load_xen_syms
from gdbext.host.gdbdriver import lab_session
from gdbext.host.lab import XEN_LOAD_BASE_RE, LabConfig

from ..oracles import parse_gva2gpa

from .conftest import BOOT_TIMEOUT_S, Stop, console_load_base, matrix_builds, need_build

VA2PA_SAMPLES = 1000   # the figure for the EFI path


def elf_qword(elf_path, va: int) -> int:
    """The link-time qword at ``va`` of an ELF, by pyelftools."""
    with open(elf_path, "rb") as f:
        for sec in ELFFile(f).iter_sections():
            if sec["sh_type"] == "SHT_PROGBITS" and sec["sh_addr"] <= va < sec["sh_addr"] + sec["sh_size"]:
                return struct.unpack_from("<Q", sec.data(), va - sec["sh_addr"])[0]
    raise AssertionError(f"{va:#x} is in no section of {elf_path}")


def first_data_relocation(efi_path, efi_elf, syms):
    """(linked VA, link-time qword) of the first DIR64 base relocation of xen.efi outside
    code and page tables: objdump -p's reading of .reloc, the qword from the ELF twin by
    pyelftools."""
    out = subprocess.run(["objdump", "-p", str(efi_path)], capture_output=True, text=True,
                         check=True).stdout
    rvas = [int(m.group(1), 16) for m in
            re.finditer(r"^\s+reloc\s+\d+ offset\s+[0-9a-f]+ \[([0-9a-f]+)\] DIR64", out, re.M)]
    pt = (syms.offset("__page_tables_start"), syms.offset("__page_tables_end"))
    with open(efi_elf, "rb") as f:
        elf = ELFFile(f)
        for rva in rvas:
            va = syms.virt_start + rva
            if pt[0] <= rva < pt[1]:
                continue
            for sec in elf.iter_sections():
                if (sec["sh_type"] == "SHT_PROGBITS" and not sec["sh_flags"] & 0x4
                        and sec["sh_addr"] <= va < sec["sh_addr"] + sec["sh_size"]):
                    at = va - sec["sh_addr"]
                    return va, struct.unpack_from("<Q", sec.data(), at)[0]
    raise AssertionError("no DIR64 relocation of xen.efi in its data")


# The builds that ship xen.efi's ELF twin (the bytes xen-run-to and xen-locate compare),
# and those that ship only its map.
ELF_TWIN_BUILDS = [n for n in matrix_builds() if paths.BUILDS[n].efi_elf is not None]
MAP_ONLY_BUILDS = [n for n in matrix_builds() if paths.BUILDS[n].efi_elf is None]


@pytest.fixture(scope="module", params=ELF_TWIN_BUILDS, ids=lambda n: f"xen{n}")
def efi_build(request):
    return need_build(request.param)


@pytest.fixture(scope="module")
def efi_boot(efi_build):
    """A lab booting the build's xen.efi, GDB attached with the symbols of its layout,
    halted at the first instruction (nothing run yet)."""
    xen_build = efi_build
    config = LabConfig(xen_image=xen_build.efi, xen_syms=xen_build.efi_syms, memory_mb=1024,
                       efi=True)
    with lab_session(config, xen_build.efi_syms) as (lab, gdb):
        yield Stop(lab, gdb, "", {})


def efi_build_of(stop) -> paths.XenBuild:
    return paths.build_of(stop.lab.xen_syms)


@pytest.fixture(scope="module")
def efi_syms(efi_build):
    return load_xen_syms(efi_build.efi_syms)


def test_efi_start_stop_registers_and_locate(efi_boot, efi_syms):
    run = efi_boot.json(f"xen-run-to efi_start --json --timeout {BOOT_TIMEOUT_S}",
                        timeout=BOOT_TIMEOUT_S + 60)
    base = run["load_base"]
    assert run["at"] == "load address" and run["rip"] == base + efi_syms.offset("efi_start")
    ours, qemu = efi_boot.json("xen-regs --json"), efi_boot.qemu_registers()
    for name in ("rip", "cr0", "cr3", "cr4", "efer"):
        assert ours[name] == qemu[name], name
    loc = efi_boot.json("xen-locate --json")
    assert loc["load_base"] == base and loc["source"].startswith("RIP at")
    assert loc["build_id_match"] is True and loc["build_id_memory"] == efi_syms.build_id.hex()
    # The firmware relocated the PE to B and wrote B into the headers' ImageBase there.
    assert loc["pe"]["headers_pa"] == base and loc["pe"]["image_base"] == base
    assert loc["pe"]["entry_matches"] is True
    # Under the firmware's tables: xen-va2pa against gva2gpa over the loaded image.
    rng = random.Random(7)
    lo, hi = base + efi_syms.image_offset, base + efi_syms.offset(efi_syms.image_end)
    for va in [rip for rip in (run["rip"],)] + [rng.randrange(lo, hi) for _ in range(VA2PA_SAMPLES)]:
        walk = efi_boot.json(f"xen-va2pa {va:#x} --json")
        assert walk["pa"] == parse_gva2gpa(efi_boot.monitor(f"gva2gpa {va:#x}")), hex(va)
    # The firmware applied the base relocations for B: a static pointer holds the load
    # address of its target (QEMU's xp reads it), not the linked VA the ELF has.
    va, link = first_data_relocation(efi_build_of(efi_boot).efi, efi_boot.lab.xen_syms, efi_syms)
    found = efi_boot.qwords(base + (va - efi_syms.virt_start), 1)[0]
    assert xenimage.static_pointer_class(found, link, base, efi_syms.virt_start) == \
        xenimage.expected_static_pointer_class(True, False) == xenimage.STATIC_LOAD_ADDRESS
    # Xen's boot tables as the PE loader left them: every entry link value + B - ImageBase
    # (QEMU's xp of idle_pg_table's slot, the link value from the ELF by pyelftools).
    slot = (efi_syms.linked_va("efi_multiboot2") >> 39) & 0x1FF
    l4_pa = base + efi_syms.offset("idle_pg_table")
    walk = efi_boot.json(f"xen-va2pa efi_multiboot2 --root idle_pg_table@pa --json")
    top = walk["levels"][0]
    assert top["table_name"] == "idle_pg_table" and top["index"] == slot
    found = efi_boot.qwords(l4_pa + 8 * slot, 1)[0]
    link = elf_qword(efi_boot.lab.xen_syms, efi_syms.linked_va("idle_pg_table") + 8 * slot)
    assert found == (link + base - efi_syms.virt_start) % (1 << 64)
    assert top["pointer"]["kind"] == xenimage.PE_RELOCATED
    assert "pe-relocated" in efi_boot.cmd(f"xen-va2pa efi_multiboot2 --root idle_pg_table@pa").out
    efi_boot.run["load_base"] = base


def test_efi_start_xen_cr3_va2pa_and_console_base(efi_boot, efi_syms):
    base = efi_boot.run.get("load_base")
    assert base is not None, "the efi_start test did not run first"
    run = efi_boot.json(f"xen-run-to __start_xen --json --timeout {BOOT_TIMEOUT_S}",
                        timeout=BOOT_TIMEOUT_S + 60)
    assert run["at"] == "linked"
    qemu = efi_boot.qemu_registers()
    assert qemu["cr3"] & ~0xFFF == base + efi_syms.offset("idle_pg_table")
    loc = efi_boot.json("xen-locate --json")
    assert loc["source"].startswith("xen_phys_start") and loc["load_base"] == base
    # xen-va2pa against QEMU's gva2gpa over Xen's image at its linked addresses.
    rng = random.Random(13)
    vas = [efi_syms.linked_va("efi_start"), efi_syms.linked_va("idle_pg_table")] + [
        rng.randrange(efi_syms.image_start, efi_syms.image_end) for _ in range(VA2PA_SAMPLES)]
    for va in vas:
        walk = efi_boot.json(f"xen-va2pa {va:#x} --json")
        assert walk["pa"] == parse_gva2gpa(efi_boot.monitor(f"gva2gpa {va:#x}")), hex(va)
        assert walk["pa"] == base + (va - efi_syms.virt_start), hex(va)
    # Xen relocated itself back before __start_xen: the static pointer is a linked VA.
    va, link = first_data_relocation(efi_build_of(efi_boot).efi, efi_boot.lab.xen_syms, efi_syms)
    found = efi_boot.qwords(base + (va - efi_syms.virt_start), 1)[0]
    assert xenimage.static_pointer_class(found, link, base, efi_syms.virt_start) == \
        xenimage.expected_static_pointer_class(True, True) == xenimage.STATIC_LINKED
    # ... and its tables' entries link value + B, as on the multiboot2 path.
    walk = efi_boot.json("xen-va2pa efi_multiboot2 --json")
    assert walk["levels"][0]["table_name"] == "idle_pg_table"
    assert walk["levels"][0]["pointer"]["kind"] == xenimage.RELOCATED
    assert walk["pa"] == base + efi_syms.offset("efi_multiboot2")
    # Xen's own word on B.
    assert console_load_base(efi_boot.gdb, efi_boot.lab) == base


@pytest.mark.parametrize("build", MAP_ONLY_BUILDS, ids=lambda n: f"xen{n}")
def test_efi_map_build_boots_and_locates_with_the_console_base(build):
    """A build with only xen.efi's .map (4.17): its xen.efi boots from OVMF to __start_xen
    (at its linked address, from the map), where xen_phys_start holds B; Xen's console
    says the same B; the PE headers at B name efi_start as the entry."""
    xen_build = need_build(build)
    emap = load_xen_syms(xen_build.efi_map)
    config = LabConfig(xen_image=xen_build.efi, xen_syms=xen_build.efi_map, memory_mb=1024,
                       efi=True)
    with lab_session(config, xen_build.efi_map) as (lab, gdb):
        gdb.execute(f"tbreak *{emap.linked_va('__start_xen'):#x}")
        gdb.execute("continue", timeout=BOOT_TIMEOUT_S)
        assert int(gdb.execute("p/x $pc").out.split("=")[1], 16) == emap.linked_va("__start_xen")
        stored = int(gdb.execute(f"x/gx {emap.linked_va('xen_phys_start'):#x}").out.split()[-1], 16)
        # In this build __start_xen prints the line just before it calls early_cpu_init
        # (the map has no code to find the printk in).
        gdb.execute(f"tbreak *{emap.linked_va('early_cpu_init'):#x}")
        gdb.execute("continue", timeout=BOOT_TIMEOUT_S)
        base = int(lab.wait_for_serial(XEN_LOAD_BASE_RE, timeout=120).group(1), 16)
        assert stored == base
        loc = gdb.execute(f"xen-locate --base {base:#x} --json").json()
        assert loc["load_base"] == base and loc["verified"] is None
        assert loc["pe"]["image_base"] == base and loc["pe"]["entry_matches"] is True
