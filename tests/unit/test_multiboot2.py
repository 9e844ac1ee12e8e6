"""core/multiboot2: the MBI's one tag walk (parse_mbi and mbi_tags share it) and
the header test, on bytes laid out here by hand from the Multiboot2 spec."""

from __future__ import annotations

import struct

import pytest

from gdbext.core import multiboot2 as MB
from gdbext.core.errors import GdbextError
from gdbext.core.memory import SyntheticMemory

from .merge_builders import build_mbi

MBI = 0x0010_0000


def test_parse_mbi_and_mbi_tags_agree():
    mem = SyntheticMemory()
    total = build_mbi(mem, MBI, 0x0040_0000, system_table=0xAB000, image_handle=0xCD000)
    info = MB.parse_mbi(mem, MBI)
    assert info.total_size == total
    assert [t[0] for t in info.tags] == [1, 12, 20, 21, 0]
    tags = MB.mbi_tags(mem, MBI)
    # The same tags, without the end tag, each with its payload.
    assert [t for t, _ in tags] == [t[0] for t in info.tags[:-1]]
    assert dict(tags)[21] == struct.pack("<I", 0x0040_0000)
    assert info.load_base_addr == 0x0040_0000
    assert (info.efi64_system_table, info.efi64_image_handle) == (0xAB000, 0xCD000)


def test_a_tag_running_past_total_size_ends_the_walk():
    mem = SyntheticMemory()
    good = struct.pack("<IIQ", 12, 16, 0xAB000)
    overrun = struct.pack("<IIQ", 20, 64, 0xCD000)     # claims 64 bytes, 16 are there
    body = good + overrun
    mem.write(MBI, struct.pack("<II", 8 + len(body), 0) + body)
    info = MB.parse_mbi(mem, MBI)
    assert [t[0] for t in info.tags] == [12]
    assert info.efi64_image_handle is None
    assert [t for t, _ in MB.mbi_tags(mem, MBI)] == [12]


def test_no_mbi_is_one_line_for_parse_and_empty_for_probing():
    mem = SyntheticMemory()
    mem.write(MBI, struct.pack("<II", 4, 0))            # total_size below the header
    with pytest.raises(GdbextError, match=f"no multiboot2 information at {MBI:#x}"):
        MB.parse_mbi(mem, MBI)
    assert MB.mbi_tags(mem, MBI) == []
    assert MB.mbi_tags(SyntheticMemory(ram_size=MBI), MBI) == []   # unreadable


def test_is_header_needs_magic_and_checksum():
    magic, arch, length = 0xE85250D6, 0, 24          # the spec's header magic
    good = struct.pack("<IIII", magic, arch, length, -(magic + arch + length) & 0xFFFFFFFF)
    assert MB.is_header(good)
    assert not MB.is_header(good[:12])
    assert not MB.is_header(good[:12] + struct.pack("<I", 0))
    assert MB.find_header(bytes(8) + good) == 8
    assert MB.find_header(bytes(4) + good) is None    # not 8-byte aligned
