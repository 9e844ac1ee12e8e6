"""LoadedXen on the real Debian xen-syms: load-address arithmetic, names, pointer classes;
finding the image in (synthetic) guest memory and checking its build-id."""

import re
import subprocess

import pytest

from gdbext import paths
from gdbext.core import x86
from gdbext.core.xenimage import (ABSOLUTE, FOREIGN, NOT_PRESENT, RELOCATED, RELOCATED_TWICE,
                                  UNRELOCATED, LoadedXen, classify_pointer)
from gdbext.core.xensyms import load_xen_syms
from gdbext.core import xenimage
from gdbext.core.memory import SyntheticMemory
from gdbext.core.multiboot2 import MB2_BOOTLOADER_MAGIC, MBI_TAG_LOAD_BASE_ADDR
from gdbext.core.xenimage import (BuildIdCheck, base_from_esi, base_from_mbi, base_from_rip,
                                  build_id_in_memory, check_build_id, esi_stretch,
                                  phys_start_holds, scan, scan_candidates, verify_base)

# Any 2 MiB-aligned base works: the arithmetic must not depend on the lab's choice.
B = 0x12600000


@pytest.fixture(scope="module")
def xen():
    return LoadedXen(load_xen_syms(paths.XEN_DEBIAN_SYMS), B)


def test_pa_is_base_plus_offset_from_image_base(xen):
    syms = xen.syms
    assert xen.pa("_start") == B + syms.image_offset
    assert xen.pa("idle_pg_table") == B + syms.linked_va("idle_pg_table") - syms.virt_start
    assert xen.image_pa_end - xen.image_pa_start == syms.image_end - syms.image_start


def test_names_tables_and_symbols(xen):
    assert xen.name_pa(xen.pa("l3_xenmap")) == "l3_xenmap"
    assert xen.name_pa(xen.pa("l2_directmap") + 0x1008) == "l2_directmap+0x1008"
    assert xen.table_at(xen.pa("l2_directmap") + 0x3000)[:2] == ("l2_directmap", 2)
    assert xen.name_pa(xen.pa("efi_multiboot2")) == "efi_multiboot2"
    assert xen.name_pa(xen.image_pa_start - 1) is None
    assert xen.linked_va_of_pa(xen.pa("efi_multiboot2")) == xen.syms.linked_va("efi_multiboot2")


def test_classify_pointer_every_class():
    assert classify_pointer(0x46d000 + B, 0x46d000, B) == RELOCATED
    assert classify_pointer(0x46d000, 0x46d000, B) == UNRELOCATED
    assert classify_pointer(0x46d000 + 2 * B, 0x46d000, B) == RELOCATED_TWICE
    assert classify_pointer(0x1234000, 0x46d000, B) == FOREIGN
    assert classify_pointer(0x5000, 0, B) == FOREIGN
    assert classify_pointer(0x5000, 0x5000, B, absolute=True) == ABSOLUTE
    assert classify_pointer(0x5000 + B, 0x5000, B, absolute=True) == FOREIGN


def test_judge_entry_uses_the_elf_link_value(xen):
    syms = xen.syms
    # Slot 261 of idle_pg_table is l3_xenmap's in the ELF: derive, don't hard-code.
    slot = ((syms.virt_start >> 39) & 0x1ff)
    link = xen.link_entry("idle_pg_table", slot)
    assert link & x86.PTE_P and (link & ~0xfff) == syms.offset("l3_xenmap")
    assert xen.judge_entry("idle_pg_table", slot, link).kind == UNRELOCATED
    assert xen.judge_entry("idle_pg_table", slot, link + B).kind == RELOCATED
    assert xen.judge_entry("idle_pg_table", slot, link + 2 * B).kind == RELOCATED_TWICE
    assert xen.judge_entry("idle_pg_table", slot, 0).kind == NOT_PRESENT
    assert xen.expected_entry("idle_pg_table", slot) == link + B
    l1 = xen.link_entry("l1_directmap", 1)
    assert xen.judge_entry("l1_directmap", 1, l1).kind == ABSOLUTE
    assert xen.expected_entry("l1_directmap", 1) == l1


def test_same_entry_ignores_accessed_and_dirty():
    assert LoadedXen.same_entry(0x1063, 0x1003)
    assert not LoadedXen.same_entry(0x1063, 0x1061)


# --- finding the image in memory and checking its build-id -------------------------------

RAM = [(0, 0xC0000000)]   # 3 GiB of RAM below 4 GiB, like a 4 GiB PC guest


def _guest_with_image(syms, base, ram_size=RAM[0][1]):
    """Synthetic RAM holding the real xen-syms image bytes at load base ``base``."""
    mem = SyntheticMemory(ram_size=ram_size)
    size = syms.image_end - syms.image_start
    mem.write(base + syms.image_offset, syms.read_linked(syms.image_start, size))
    return mem


@pytest.fixture(scope="module")
def guest(xen):
    return _guest_with_image(xen.syms, B)


def test_build_id_in_memory_is_the_note_of_the_loaded_image(xen, guest):
    syms = xen.syms
    assert build_id_in_memory(guest, syms, B) == syms.build_id
    check = check_build_id(guest, syms, B)
    assert check.match is True and check.found == syms.build_id
    # Nothing at another base: no note there, so no match.
    other = B + xenimage.base_align(syms)
    assert build_id_in_memory(guest, syms, other) is None
    assert check_build_id(guest, syms, other).match is False


def test_build_id_note_agrees_with_readelf(xen):
    syms = xen.syms
    out = subprocess.run(["readelf", "-n", str(syms.path)], capture_output=True, text=True,
                         check=True).stdout
    m = re.search(r"Build ID:\s*([0-9a-f]+)", out)
    assert m and bytes.fromhex(m.group(1)) == syms.build_id
    out = subprocess.run(["readelf", "-SW", str(syms.path)], capture_output=True, text=True,
                         check=True).stdout
    m = re.search(r"\.note\.gnu\.build-id\s+NOTE\s+([0-9a-f]+)\s+[0-9a-f]+\s+([0-9a-f]+)", out)
    assert xenimage.build_id_note_span(syms) == (int(m.group(1), 16), int(m.group(2), 16))


def test_build_id_mismatch_is_one_line_naming_both_ids(xen, guest):
    syms = xen.syms
    va, _size = xenimage.build_id_note_span(syms)
    altered = SyntheticMemory(ram_size=RAM[0][1], base=guest)
    desc_pa = B + syms.offset(va) + 16        # 12-byte note header + "GNU\0"
    altered.write(desc_pa, bytes(b ^ 0xFF for b in guest.read_phys(desc_pa, 4)))
    check = check_build_id(altered, syms, B)
    assert check.match is False
    msg = check.mismatch_message(syms.path, B)
    assert "\n" not in msg
    assert syms.build_id.hex() in msg and check.found.hex() in msg
    assert "xen-ignore-build-id" in msg and "xen-syms PATH" in msg


def test_build_id_unreadable_or_absent_is_unknown(xen, guest):
    syms = xen.syms
    small = SyntheticMemory(ram_size=B)       # the note's place is not RAM
    assert check_build_id(small, syms, B).match is None
    assert BuildIdCheck(None, b"\1", True).match is None


def test_verify_base_only_at_the_real_base(xen, guest):
    syms = xen.syms
    align = xenimage.base_align(syms)
    assert align == syms.multiboot2.relocatable.align
    assert verify_base(guest, syms, B)
    assert not verify_base(guest, syms, B + align)
    assert not verify_base(guest, syms, B - align)


def test_base_from_rip_at_entry_and_anywhere_in_the_image(xen, guest):
    syms = xen.syms
    for sym in ("__efi64_mb2_start", "efi_multiboot2", "trampoline_setup", "_start"):
        assert base_from_rip(guest, syms, B + syms.offset(sym)) == B, sym
    assert base_from_rip(guest, syms, B + syms.image_offset - 1) is None
    assert base_from_rip(guest, syms, 0x1000) is None


def test_esi_stretch_starts_after_the_lea_of_image_base(xen):
    """Derived from the ELF bytes; objdump must show 'lea ...,%esi # <__image_base__>'
    as the instruction just before the stretch."""
    syms = xen.syms
    first, last = esi_stretch(syms)
    assert last == syms.offset("trampoline_setup")
    start = syms.linked_va("x86_32_switch")
    out = subprocess.run(["objdump", "-d", f"--start-address={start:#x}",
                          f"--stop-address={syms.virt_start + first:#x}", str(syms.path)],
                         capture_output=True, text=True, check=True).stdout
    insns = [ln for ln in out.splitlines() if re.match(r"\s*[0-9a-f]+:\s", ln)]
    assert "lea" in insns[-1] and "%esi" in insns[-1] and "<__image_base__>" in insns[-1]


def test_base_from_esi_only_inside_the_stretch(xen, guest):
    syms = xen.syms
    first, last = esi_stretch(syms)
    assert base_from_esi(guest, syms, B + first, B) == B
    assert base_from_esi(guest, syms, B + last, B) == B
    assert base_from_esi(guest, syms, B + first - 1, B) is None          # before the lea
    assert base_from_esi(guest, syms, B + syms.offset("__efi64_mb2_start"), B) is None
    align = xenimage.base_align(syms)
    assert base_from_esi(guest, syms, B + first, B + align) is None      # esi is not B


def test_xen_phys_start_at_its_pa(xen, guest):
    syms = xen.syms
    stored = SyntheticMemory(ram_size=RAM[0][1], base=guest)
    assert not phys_start_holds(stored, syms, B)            # 0 until trampoline_setup
    stored.write_u64(syms.pa("xen_phys_start", B), B)
    assert phys_start_holds(stored, syms, B)


def _mbi(tags):
    body = b""
    for ttype, payload in tags + [(0, b"")]:
        tag = ttype.to_bytes(4, "little") + (8 + len(payload)).to_bytes(4, "little") + payload
        body += tag + bytes(-len(tag) % 8)
    return (8 + len(body)).to_bytes(4, "little") + bytes(4) + body


def test_base_from_mbi_load_base_tag(xen, guest):
    syms = xen.syms
    assert MB2_BOOTLOADER_MAGIC == 0x36D76289      # multiboot2 spec
    mbi_pa = 0x10000
    mem = SyntheticMemory(ram_size=RAM[0][1], base=guest)
    start_pa = xen.pa("_start")
    mem.write(mbi_pa, _mbi([(1, b"xen.gz console=com1\0"),
                            (MBI_TAG_LOAD_BASE_ADDR, start_pa.to_bytes(4, "little"))]))
    assert base_from_mbi(mem, syms, mbi_pa) == B
    mem.write(mbi_pa, _mbi([(1, b"no load base tag\0")]))
    assert base_from_mbi(mem, syms, mbi_pa) is None
    align = xenimage.base_align(syms)
    mem.write(mbi_pa, _mbi([(MBI_TAG_LOAD_BASE_ADDR, (start_pa + align).to_bytes(4, "little"))]))
    assert base_from_mbi(mem, syms, mbi_pa) is None           # verified, not believed


def test_scan_finds_the_image_top_down(xen):
    syms = xen.syms
    cands = scan_candidates(syms, RAM)
    # The RELOCATABLE tag prefers high: the highest base whose image fits comes first.
    assert cands[0] > cands[-1]
    assert all(b % xenimage.base_align(syms) == 0 for b in cands)
    assert all(b + syms.image_offset + syms.load_size() <= RAM[0][1] for b in cands)
    base = cands[5]
    mem = _guest_with_image(syms, base)
    res = scan(mem, syms, RAM)
    assert res.load_base == base and res.candidates_read == 6
    full = scan(mem, syms, RAM, stop_at_first=False)
    assert full.load_base == base and full.candidates_read == len(cands) == full.candidates


def test_scan_tells_another_xen_from_none(xen):
    syms = xen.syms
    base = scan_candidates(syms, RAM)[3]
    mem = _guest_with_image(syms, base)
    # Same header, other code: another build of Xen.
    mem.write(base + syms.offset("_start") + 0x800, b"\xcc" * 16)
    res = scan(mem, syms, RAM)
    assert res.load_base is None and res.header_only == [base]
    assert res.candidates_read == res.candidates
    assert scan(SyntheticMemory(ram_size=RAM[0][1]), syms, RAM).header_only == []
    assert scan(mem, syms, []).candidates == 0


def test_scan_skips_candidates_outside_ram(xen):
    syms = xen.syms
    ram = [(0, 0x40000000), (0x80000000, 0xA0000000)]
    cands = scan_candidates(syms, ram)
    size = syms.load_size()
    for b in cands:
        s = b + syms.image_offset
        assert any(lo <= s and s + size <= hi for lo, hi in ram)
    assert any(b + syms.image_offset >= 0x80000000 for b in cands)
    assert not any(0x40000000 <= b + syms.image_offset < 0x80000000 for b in cands)


def test_a_map_file_finds_nothing_and_says_unknown(xen, guest):
    """A .map has names but no bytes: nothing is verified, no build-id to compare."""
    from gdbext.core.xensyms import load_map
    syms = load_map(paths.XEN_DEBIAN_SYMS_MAP)
    assert not xenimage.has_bytes(syms)
    assert not verify_base(guest, syms, B)
    assert base_from_rip(guest, syms, B + syms.offset("__efi64_mb2_start")) is None
    assert scan(guest, syms, RAM).candidates == 0
    assert check_build_id(guest, syms, B).match is None
    # Names still work at B.
    assert LoadedXen(syms, B).name_pa(B + syms.offset("l3_xenmap")) == "l3_xenmap"


def test_plausible_base(xen):
    syms = xen.syms
    align = xenimage.base_align(syms)
    assert xenimage.plausible_base(syms, B)
    assert not xenimage.plausible_base(syms, 0)            # xen_phys_start not yet set
    assert not xenimage.plausible_base(syms, B + 0x1000)   # not aligned as the tag says
    assert not xenimage.plausible_base(syms, -align)
    assert not xenimage.plausible_base(syms, 1 << x86.MAXPHYADDR_ARCH)


def test_user_base_must_be_a_plausible_pa_below_maxphyaddr_and_in_ram(xen):
    syms = xen.syms
    align = xenimage.base_align(syms)
    size = syms.offset(syms.image_end)
    ram = [(0, 1 << 30)]
    assert xenimage.user_base_problem(syms, B, 40, ram) is None
    for bad in (-1, 0, B + 1, 1 << 64, (1 << 64) - align):
        assert "not a plausible load base" in xenimage.user_base_problem(syms, bad)
    # Aligned and below 2^52, but the image would end above a 40-bit MAXPHYADDR ...
    high = 0x1000_0000_0000
    assert "MAXPHYADDR" in xenimage.user_base_problem(syms, (1 << 40) - align, 40)
    # ... or outside the guest's RAM (QEMU's memory map).
    assert "RAM" in xenimage.user_base_problem(syms, high, 52, ram)
    # An image that starts in RAM but runs past its end.
    last = ((1 << 30) - size) // align * align + align
    assert "RAM" in xenimage.user_base_problem(syms, last, 52, ram)


def test_pe_relocated_entries_are_recognised_only_for_xen_efi():
    """xen.efi before its self-relocation: an entry holds link + B - ImageBase (the PE
    loader's delta, mod 2**64, address bits only); without pe_delta that is foreign."""
    from gdbext.core import x86
    from gdbext.core import xenimage as XI
    virt, base, link = 0xFFFF82D040000000, 0x39600000, 0x80A000
    mask = x86.phys_addr_mask(x86.MAXPHYADDR_ARCH)
    delta = (base - virt) % (1 << 64)
    found = (link + delta) % (1 << 64) & mask
    assert XI.classify_pointer(found, link, base, pe_delta=delta) == XI.PE_RELOCATED
    assert XI.classify_pointer(found, link, base) == XI.FOREIGN
    assert XI.classify_pointer(link + base, link, base, pe_delta=delta) == XI.RELOCATED
    assert XI.PE_RELOCATED in XI.POINTER_CLASSES


def test_static_pointer_classes_on_both_paths():
    """A static pointer at its linked VA, at its load address (xen.efi after the firmware
    applied the base relocations for B), or neither; and which one each path expects."""
    from gdbext.core import xenimage as XI
    virt, base = 0xFFFF82D040000000, 0x39600000
    link = virt + 0x22E200
    assert XI.static_pointer_class(link, link, base, virt) == XI.STATIC_LINKED
    assert XI.static_pointer_class(base + 0x22E200, link, base, virt) == XI.STATIC_LOAD_ADDRESS
    assert XI.static_pointer_class(base + 0x22E208, link, base, virt) == XI.STATIC_FOREIGN
    assert XI.expected_static_pointer_class(True, False) == XI.STATIC_LOAD_ADDRESS
    assert XI.expected_static_pointer_class(True, True) == XI.STATIC_LINKED
    assert XI.expected_static_pointer_class(False, False) == XI.STATIC_LINKED
