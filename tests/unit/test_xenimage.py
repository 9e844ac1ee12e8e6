"""LoadedXen on the real Debian xen-syms: load-address arithmetic, names, pointer classes."""

import pytest

from gdbext import paths
from gdbext.core import x86
from gdbext.core.xenimage import (ABSOLUTE, FOREIGN, NOT_PRESENT, RELOCATED, RELOCATED_TWICE,
                                  UNRELOCATED, LoadedXen, classify_pointer)
from gdbext.core.xensyms import load_xen_syms

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
