"""Every build of paths.BUILDS through the core: xen-syms loads, the symbols and boot
tables the boot path needs are where nm says, the stop plan's instructions are objdump's,
and the image GRUB loads carries the same build-id and multiboot2 header.

Expectations come from binutils (nm, objdump, readelf) on the Debian files, never from the
core's own decoding. A build whose files are missing fails, naming scripts/setup.
"""

from __future__ import annotations

import gzip
import re
import struct
import subprocess
from pathlib import Path

import pytest

from gdbext import paths
from gdbext.core import bootstops, xenefi
from gdbext.core.bootstops import (CALL, EFI_MB2, EFI_RETURN, ENTRY, HIGH_START, L2_XENMAP_FILLED,
                                   LINKED, LOAD, LOW, START_XEN, SWITCH, TABLES_RELOCATED,
                                   TRAMPOLINE_CR3, TRAMPOLINE_SETUP)
from gdbext.core.errors import GdbextError, MemoryReadError
from gdbext.core.xensyms import BOOT_TABLES, load_xen_syms

# The names the multiboot2+EFI boot path is built from (bootstops, l4merge, xen-locate).
BOOT_PATH_SYMBOLS = ("__image_base__", "_start", "_end", "__efi64_mb2_start", "efi_multiboot2",
                     "x86_32_switch", "trampoline_setup", "__high_start", "__start_xen",
                     "xen_phys_start", "trampoline_phys", "trampoline_start", "trampoline_end",
                     "__page_tables_start", "__page_tables_end", "efi_start")


def _need(path: Path) -> Path:
    if not path.is_file():
        pytest.fail(f"{path} is missing: run scripts/setup (it fetches every build of "
                    "gdbext/paths.py BUILDS)", pytrace=False)
    return path


@pytest.fixture(scope="module", params=sorted(paths.BUILDS))
def build(request):
    return paths.BUILDS[request.param]


@pytest.fixture(scope="module")
def syms(build):
    return load_xen_syms(_need(build.syms))


@pytest.fixture(scope="module")
def plan(syms):
    return bootstops.build_plan(syms)


@pytest.fixture(scope="module")
def nm(build):
    out = subprocess.run(["nm", "-S", str(_need(build.syms))], capture_output=True, text=True,
                         check=True).stdout
    table = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) in (3, 4):
            table.setdefault(parts[-1], (int(parts[0], 16),
                                         int(parts[1], 16) if len(parts) == 4 else 0))
    return table


def objdump(path: Path, start: int, stop: int, i386: bool = False):
    argv = ["objdump", "-d", "--no-show-raw-insn", f"--start-address={start:#x}",
            f"--stop-address={stop:#x}"] + (["-m", "i386"] if i386 else []) + [str(path)]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    return [(int(m.group(1), 16), m.group(2).strip()) for m in
            (re.match(r"^\s*([0-9a-f]+):\s+(.*)$", line) for line in out.splitlines()) if m]


def first(rows, pattern, start=0):
    for i in range(start, len(rows)):
        if re.search(pattern, rows[i][1]):
            return i
    raise AssertionError(f"objdump has no {pattern!r}")


def readelf_build_id(path: Path) -> str:
    out = subprocess.run(["readelf", "-n", str(path)], capture_output=True, text=True,
                         check=True).stdout
    return re.search(r"Build ID: ([0-9a-f]+)", out).group(1)


def test_build_files_present(build):
    assert build.missing() == ()
    for f in (build.image, build.syms, build.syms_map, build.efi, build.efi_map):
        _need(f)


def test_boot_path_symbols_are_nms(syms, nm):
    base = nm["__image_base__"][0]
    assert syms.virt_start == base
    for name in BOOT_PATH_SYMBOLS:
        assert syms.linked_va(name) == nm[name][0], name
        assert syms.offset(name) == nm[name][0] - base, name
    assert syms.image_start - syms.virt_start == 0x200000


def test_boot_tables_at_nm_with_link_time_pointers(syms, nm):
    base = nm["__image_base__"][0]
    found = {t.name: s for t, s in syms.boot_tables()}
    assert set(found) == {t.name for t in BOOT_TABLES}
    for name, s in found.items():
        assert s.value == nm[name][0], name
    # idle_pg_table's XEN_VIRT_START slot points at l3_xenmap, l3_xenmap's at l2_xenmap,
    # as link-time PAs (offsets from __image_base__) with __PAGE_HYPERVISOR.
    l4_slot = (base >> 39) & 511
    l3_slot = (base >> 30) & 511
    assert syms.link_qwords("idle_pg_table")[l4_slot] == (nm["l3_xenmap"][0] - base) | 0x63
    assert syms.link_qwords("l3_xenmap")[l3_slot] == (nm["l2_xenmap"][0] - base) | 0x63


def test_image_carries_the_syms_build_id_and_header(build, syms):
    """What GRUB loads is this xen-syms' image: same build-id note, same multiboot2 header
    (with the RELOCATABLE tag) within its first 32 KiB."""
    assert syms.build_id_hex == readelf_build_id(build.syms)
    plain = gzip.decompress(_need(build.image).read_bytes())
    assert syms.build_id in plain
    hdr = syms.multiboot2
    assert hdr is not None and hdr.relocatable is not None
    pos = plain.find(syms.read_linked(hdr.va, hdr.header_length))
    assert 0 <= pos < 32768
    assert hdr.efi64_entry == syms.offset("__efi64_mb2_start")


def test_plan_has_every_stop(plan):
    assert plan.names() == [ENTRY, CALL, EFI_MB2, EFI_RETURN, SWITCH, TRAMPOLINE_SETUP,
                            TABLES_RELOCATED, L2_XENMAP_FILLED, TRAMPOLINE_CR3, HIGH_START,
                            START_XEN]
    kinds = {s.name: s.kind for s in plan.stops}
    assert kinds[TRAMPOLINE_CR3] == LOW and kinds[START_XEN] == LINKED
    assert kinds[EFI_MB2] == kinds[CALL] == LOAD


def test_call_of_efi_multiboot2_is_objdumps(build, plan, nm):
    """The call and return stops are objdump's `call <efi_multiboot2>`: in the entry
    (4.17), or in the function the entry calls that calls it (4.20's prelude)."""
    rows = objdump(build.syms, nm[ENTRY][0], nm[SWITCH][0])
    direct = [i for i, (_a, t) in enumerate(rows) if re.match(r"^call\s+[0-9a-f]+ <efi_multiboot2>$", t)]
    if direct:
        site = rows[direct[0]][0], rows[direct[0] + 1][0]
    else:
        callees = [re.match(r"^call\s+([0-9a-f]+) <(\w+)>$", t) for _a, t in rows]
        site = None
        for m in filter(None, callees):
            start, size = nm[m.group(2)]
            inner = objdump(build.syms, start, start + size)
            hits = [i for i, (_a, t) in enumerate(inner)
                    if re.match(r"^call\s+[0-9a-f]+ <efi_multiboot2>$", t)]
            if hits:
                site = inner[hits[0]][0], inner[hits[0] + 1][0]
                assert any(m.group(2) in n for n in plan.notes)
                break
        assert site is not None, "objdump finds no call of efi_multiboot2"
    assert (plan.get(CALL).linked_va, plan.get(EFI_RETURN).linked_va) == site


def test_trampoline_setup_loops_are_objdumps(build, plan, nm):
    base = nm["__image_base__"][0]
    end = min(v for v, _s in nm.values() if v > nm[TRAMPOLINE_SETUP][0] and v < nm["_end"][0])
    rows = objdump(build.syms, nm[TRAMPOLINE_SETUP][0], end)
    i = first(rows, rf"^lea\s+{nm['__page_tables_start'][0] - base:#x}\(%rsi\),%eax$")
    j = first(rows, r"^jb\s", i)
    assert plan.get(TABLES_RELOCATED).linked_va == rows[j + 1][0]
    i = first(rows, rf"^mov\s+%eax,{nm['l2_xenmap'][0] - base:#x}\(%rsi,%rcx,8\)$")
    j = first(rows, r"^jbe\s", i)
    assert plan.get(L2_XENMAP_FILLED).linked_va == rows[j + 1][0]
    # trampoline_setup's first store is B into xen_phys_start.
    assert re.match(rf"^mov\s+%esi,{nm['xen_phys_start'][0] - base:#x}\(%rsi\)$", rows[0][1])


def test_trampoline_cr3_load_is_objdumps(build, plan, nm):
    base = nm["__image_base__"][0]
    rows = objdump(build.syms, nm["trampoline_start"][0], nm["trampoline_end"][0], i386=True)
    i = first(rows, rf"^mov\s+\${nm['idle_pg_table'][0] - base:#x},%eax$")
    j = first(rows, r"^mov\s+%eax,%cr3$", i)
    stop = plan.get(TRAMPOLINE_CR3)
    assert stop.low_offset == rows[j + 1][0] - nm["trampoline_start"][0]


# -- xen.efi and the symbols of its layout -------------------------------------------------

def objdump_section_bytes(path: Path, section: str) -> bytes:
    out = subprocess.run(["objdump", "-s", "-j", section, str(path)], capture_output=True,
                         text=True, check=True).stdout
    data = b""
    for line in out.splitlines():
        m = re.match(r"^ [0-9a-f]+ ((?:[0-9a-f]{2,8} ?){1,4})", line)
        if m:
            data += bytes.fromhex(m.group(1).replace(" ", ""))
    return data


def rsds_signature(buildid_section: bytes) -> bytes:
    at = buildid_section.index(b"RSDS")
    return buildid_section[at + 4:at + 20]


def objdump_pe_field(path: Path, name: str) -> int:
    out = subprocess.run(["objdump", "-p", str(path)], capture_output=True, text=True,
                         check=True).stdout
    return int(re.search(rf"^{name}\s+([0-9a-f]+)$", out, re.M).group(1), 16)


def objdump_section_vma(path: Path, section: str) -> int:
    out = subprocess.run(["objdump", "-h", str(path)], capture_output=True, text=True,
                         check=True).stdout
    return int(re.search(rf"^\s*\d+ {re.escape(section)}\s+[0-9a-f]+\s+([0-9a-f]+)", out,
                         re.M).group(1), 16)


def test_efi_symbols_fit_xen_efi(build):
    """Which file fits xen.efi: the ELF twin (4.20) or the .map (4.17), never xen-syms; the
    offsets are RVAs of the PE (ImageBase = XEN_VIRT_START), the entry is efi_start."""
    efi = _need(build.efi)
    image_base = objdump_pe_field(efi, "ImageBase")
    syms = load_xen_syms(_need(build.efi_syms))
    assert syms.virt_start == image_base
    assert syms.offset("efi_start") == objdump_pe_field(efi, "AddressOfEntryPoint")
    xen_syms = load_xen_syms(build.syms)
    assert syms.efi_layout is True and xen_syms.efi_layout is False
    # A different link: xen-syms' data does not sit where xen.efi's does.
    assert xen_syms.offset("idle_pg_table") != syms.offset("idle_pg_table")
    assert objdump_section_vma(efi, ".buildid") == syms.linked_va("__note_gnu_build_id_start")
    want = rsds_signature(objdump_section_bytes(efi, ".buildid"))
    assert xenefi.file_build_id(efi.read_bytes()) == want
    assert xen_syms.build_id != want              # xen-syms is the other link
    if build.efi_elf is None:
        assert syms.build_id is None                 # a map carries no build-id
    else:
        assert syms.build_id == want
        assert rsds_signature(objdump_section_bytes(build.efi_elf, ".buildid")) == want


def test_xen_efi_build_id_is_its_codeview_signature(build):
    efi = _need(build.efi)
    raw = objdump_section_bytes(efi, ".buildid")
    assert xenefi.codeview_build_id(raw) == rsds_signature(raw)
    assert xenefi.codeview_build_id(raw[:20]) is None
    assert xenefi.codeview_build_id(b"\0" * 64) is None


class _PageMemory:
    """Synthetic guest memory: bytes at one PA, unreadable elsewhere."""

    def __init__(self, pa: int, data: bytes):
        self.pa, self.data = pa, data

    def read_phys(self, pa: int, size: int) -> bytes:
        off = pa - self.pa
        if off < 0 or off + size > len(self.data):
            raise MemoryReadError(pa, size)
        return self.data[off:off + size]


def test_loaded_pe_headers_as_the_firmware_leaves_them(build):
    """At the load address L the firmware leaves xen.efi's headers with ImageBase = L
    (EDK2 writes the relocated base there); the entry RVA is efi_start's offset."""
    head = bytearray(_need(build.efi).read_bytes()[:0x1000])
    load = 0x39600000   # any 2 MiB-aligned address: nothing depends on the lab's choice
    e_lfanew = struct.unpack_from("<I", head, 0x3C)[0]
    image_base_at = e_lfanew + 4 + 20 + 24   # PE sig, COFF header, PE32+ ImageBase offset
    assert struct.unpack_from("<Q", head, image_base_at)[0] == objdump_pe_field(
        build.efi, "ImageBase")
    struct.pack_into("<Q", head, image_base_at, load)
    syms = load_xen_syms(build.efi_syms)
    info = xenefi.loaded_image(_PageMemory(load, bytes(head)), load, syms)
    assert info["image_base"] == info["relocated_to"] == load
    assert info["entry_matches"] is True
    assert info["entry_rva"] == objdump_pe_field(build.efi, "AddressOfEntryPoint")
    assert info["size_of_image"] == objdump_pe_field(build.efi, "SizeOfImage")
    assert xenefi.loaded_image(_PageMemory(load, b"\0" * 0x1000), load, syms) is None


# -- the stop plan of xen.efi's own path (firmware -> efi_start) ---------------------------

EFI_TWIN_BUILDS = [n for n in sorted(paths.BUILDS) if paths.BUILDS[n].efi_elf is not None]


@pytest.mark.parametrize("name", EFI_TWIN_BUILDS)
def test_efi_plan_is_objdumps(name):
    """efi_start's stops from objdump of the ELF twin: its last call of
    efi_arch_relocate_image (the self-relocation) and the instruction after it, the mov
    to %cr3 after that, __start_xen at its linked address."""
    build = paths.BUILDS[name]
    elf = _need(build.efi_elf)
    out = subprocess.run(["nm", "-n", str(elf)], capture_output=True, text=True,
                         check=True).stdout
    rows_nm = [(int(f[0], 16), f[2]) for f in (ln.split() for ln in out.splitlines()) if len(f) == 3]
    start = next(a for a, n in rows_nm if n == "efi_start")
    end = min(a for a, _n in rows_nm if a > start)
    rows = objdump(elf, start, end)
    calls = [i for i, (_a, t) in enumerate(rows) if re.match(r"^call\s+[0-9a-f]+ <efi_arch_relocate_image>$", t)]
    assert calls
    cr3 = next(i for i in range(calls[-1], len(rows)) if re.match(r"^mov\s+%r\w+,%cr3$", rows[i][1]))
    plan = bootstops.build_plan(load_xen_syms(elf))
    assert plan.order == bootstops.EFI_STOP_ORDER and plan.entry.name == bootstops.EFI_START
    got = {s.name: (s.kind, s.linked_va) for s in plan.stops}
    assert got == {
        bootstops.EFI_START: (LOAD, start),
        bootstops.EFI_SELF_RELOCATE: (LOAD, rows[calls[-1]][0]),
        bootstops.EFI_RELOCATED: (LOAD, rows[calls[-1] + 1][0]),
        bootstops.EFI_CR3: (LOAD, rows[cr3 + 1][0]),
        START_XEN: (LINKED, next(a for a, n in rows_nm if n == "__start_xen")),
    }
    assert plan.names() == list(bootstops.EFI_STOP_ORDER) and not plan.notes
    # xen-mb2-break's stop names of this path are accepted, the other path's refused.
    assert [s.name for s in plan.select(["efi-cr3-load"])] == [bootstops.EFI_CR3]
    with pytest.raises(GdbextError, match="unknown stop 'trampoline_setup'"):
        plan.select(["trampoline_setup"])


def test_efi_plan_of_a_map_is_one_clear_error():
    for build in paths.BUILDS.values():
        if build.efi_elf is None:
            syms = load_xen_syms(_need(build.efi_map))
            with pytest.raises(GdbextError, match="nm-format map.*xen-\\*\\.efi\\.elf"):
                bootstops.build_plan(syms)
