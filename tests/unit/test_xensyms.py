"""gdbext.core.xensyms against the real Debian xen-syms of every build in paths.BUILDS.

Expected values come from binutils (nm, readelf, objcopy) run here and from
bytes read straight from the file at offsets computed from readelf's output,
never from xensyms' own code path.  The Debian files are required: without
them these tests fail and say to run scripts/setup.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from gdbext import paths
from gdbext.core import x86
from gdbext.core import xensyms as X
from gdbext.core.errors import GdbextError

SETUP_HINT = "run scripts/setup to fetch the Debian Xen builds (gdbext/paths.py BUILDS)"
MB2_MAGIC = 0xE85250D6

# Offsets (from __image_base__) printed in the reference notes for the Debian
# build with this build id; checked in addition to the nm-derived values.
REFERENCE_BUILD_ID = "151b373fd64b321593bf987fd923cd10dabadac4"
REFERENCE_OFFSETS = {
    "__efi64_mb2_start": 0x3DD531,
    "efi_multiboot2": 0x3E6980,
    "x86_32_switch": 0x3DD5F1,
    "trampoline_setup": 0x3DD701,
    "idle_pg_table": 0x46E000,
    "l3_xenmap": 0x46D000,
    "l2_xenmap": 0x46A000,
    "l2_fixmap": 0x46B000,
    "l3_directmap": 0x46C000,
    "l2_directmap": 0x466000,
    "l1_directmap": 0x465000,
    "l1_bootmap": 0x426000,
    "l2_bootmap": 0x427000,
    "l3_bootmap": 0x42B000,
    "__page_tables_start": 0x466000,
    "__page_tables_end": 0x46F000,
    "_start": 0x200000,
    "_end": 0x5A6140,
}

# Names the reference notes use; all must resolve to nm's values.
REFERENCE_NAMES = (
    "__image_base__", "_start", "_end", "__page_tables_start", "__page_tables_end",
    "idle_pg_table", "l3_xenmap", "l2_xenmap", "l2_fixmap", "l3_directmap",
    "l2_directmap", "l1_directmap", "l1_bootmap", "l2_bootmap", "l3_bootmap",
    "l1_fixmap", "l1_fixmap_x", "__efi64_mb2_start", "efi_multiboot2",
    "x86_32_switch", "trampoline_setup", "__high_start", "__start_xen",
    "xen_phys_start", "__2M_rwdata_end",
)


# ---------------------------------------------------------------------------
# helpers and fixtures
# ---------------------------------------------------------------------------


def _need_file(path: Path) -> Path:
    if not path.is_file():
        pytest.fail(f"{path} is missing: {SETUP_HINT}", pytrace=False)
    return path


def _run(*args: str) -> str:
    if shutil.which(args[0]) is None:
        pytest.fail(f"{args[0]} not found: install binutils", pytrace=False)
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module", params=sorted(paths.BUILDS))
def build(request) -> paths.XenBuild:
    """Every test that takes the symbols runs once per build; missing files fail."""
    return paths.BUILDS[request.param]


@pytest.fixture(scope="module")
def syms_path(build) -> Path:
    return _need_file(build.syms)


@pytest.fixture(scope="module")
def syms(syms_path, tmp_path_factory) -> X.XenSymbols:
    X.clear_memo()
    s = X.load_xen_syms(syms_path, cache_dir=tmp_path_factory.mktemp("symcache"))
    assert isinstance(s, X.XenSymbols)
    return s


@pytest.fixture(scope="module")
def nm(syms_path):
    """name -> [(value, type, size or None)] from `nm -S`."""
    out: dict = {}
    pat = re.compile(r"^([0-9a-f]+) (?:([0-9a-f]+) )?(\S) (\S+)$")
    for line in _run("nm", "-S", str(syms_path)).splitlines():
        m = pat.match(line)
        assert m, line
        v, sz, t, name = m.groups()
        out.setdefault(name, []).append((int(v, 16), t, int(sz, 16) if sz else None))
    return out


def nm1(nm, name) -> int:
    (entry,) = nm[name]
    return entry[0]


@pytest.fixture(scope="module")
def loads(syms_path):
    """PT_LOAD rows of `readelf -lW`: (offset, vaddr, paddr, filesz, memsz)."""
    rows = []
    for line in _run("readelf", "-lW", str(syms_path)).splitlines():
        f = line.split()
        if f and f[0] == "LOAD":
            rows.append(tuple(int(x, 16) for x in f[1:6]))
    assert rows
    return rows


@pytest.fixture(scope="module")
def raw_file(syms_path) -> bytes:
    return syms_path.read_bytes()


def file_bytes(raw_file, loads, va, size) -> bytes:
    """Bytes at a linked VA, read from the file via readelf's PT_LOAD rows."""
    for off, vaddr, _paddr, filesz, _memsz in loads:
        if vaddr <= va and va + size <= vaddr + filesz:
            return raw_file[off + va - vaddr: off + va - vaddr + size]
    raise AssertionError(f"{va:#x} not in file-backed PT_LOAD")


# ---------------------------------------------------------------------------
# symbols
# ---------------------------------------------------------------------------


def test_file_present(build):
    for f in (build.syms, build.syms_map, build.efi_map, build.image, build.efi):
        _need_file(f)
    if build.efi_elf is not None:
        _need_file(build.efi_elf)


def test_every_symbol_matches_nm(syms, nm):
    assert len(syms) == sum(len(v) for v in nm.values())
    assert set(syms.by_name) == set(nm)
    for name, entries in nm.items():
        ours = sorted((s.value, s.type) for s in syms.by_name[name])
        assert ours == sorted((v, t) for v, t, _ in entries), name
        sized = sorted(sz for _, _, sz in entries if sz)
        assert sorted(s.size for s in syms.by_name[name] if s.size) == sized, name


def test_reference_names_and_offsets(syms, nm):
    base = nm1(nm, "__image_base__")
    for name in REFERENCE_NAMES:
        assert syms.linked_va(name) == nm1(nm, name), name
        assert syms.offset(name) == nm1(nm, name) - base, name
        assert syms.offset(nm1(nm, name)) == nm1(nm, name) - base, name
    # sym_offs counts from __image_base__, which sits 2 MiB below _start.
    assert syms.virt_start == base
    assert syms.virt_start_source in X.VIRT_START_SYMBOLS
    assert syms.image_offset == nm1(nm, "_start") - base == 0x200000
    assert syms.image_start == nm1(nm, "_start")
    assert syms.image_end == nm1(nm, "_end")
    assert syms.page_tables_start == nm1(nm, "__page_tables_start")
    assert syms.page_tables_end == nm1(nm, "__page_tables_end")


def test_reference_doc_offsets():
    """The reference notes describe the default build (4.17) only."""
    syms_path = _need_file(paths.XEN_DEBIAN_SYMS)
    syms = X.load_xen_syms(syms_path)
    bid = re.search(r"Build ID: ([0-9a-f]+)", _run("readelf", "-n", str(syms_path))).group(1)
    assert bid == REFERENCE_BUILD_ID, "not the build the reference notes describe"
    for name, off in REFERENCE_OFFSETS.items():
        assert syms.offset(name) == off, f"{name}: {syms.offset(name):#x} != {off:#x}"


def test_virt_start_is_l4_slot_261(syms):
    # The reference: XEN_VIRT_START is L4 slot 261, L3 slot 321, L2 slot 0.
    va = syms.virt_start
    assert ((va >> 39) & 511, (va >> 30) & 511, (va >> 21) & 511) == (261, 321, 0)


def test_ambiguous_and_qualified_lookup(syms, nm):
    dup = next(n for n, e in nm.items() if len(e) > 1 and all(t.islower() for _, t, _ in e))
    with pytest.raises(X.AmbiguousSymbolError) as ei:
        syms.lookup(dup)
    assert "\n" not in str(ei.value) and "FILE#NAME" in str(ei.value)
    assert isinstance(ei.value, GdbextError)
    assert len(syms.find(dup)) == len(nm[dup])
    for s in syms.find(dup):
        assert syms.lookup(s.qualname) is s
    with pytest.raises(X.UnknownSymbolError):
        syms.lookup("no_such_symbol_anywhere")
    assert syms.get("no_such_symbol_anywhere") is None
    assert syms.lookup("head.o#multiboot2_header").value == nm1(nm, "multiboot2_header")


def test_symbol_at(syms, nm):
    values = {}
    for name, entries in nm.items():
        for v, t, _ in entries:
            if t not in "aA":
                values.setdefault(v, set()).add(name)
    inside = sorted(v for v in values if syms.image_start <= v < syms.image_end)
    for v in inside[:: max(1, len(inside) // 1500)]:
        name, delta = syms.symbol_at(v)
        assert delta == 0 and name.rpartition("#")[2] in values[v], hex(v)
    # between two symbols: the lower one, with the distance
    a, b = inside[100], inside[101]
    if b - a > 1:
        name, delta = syms.symbol_at(b - 1)
        assert delta == b - 1 - a and name.rpartition("#")[2] in values[a]
    # sized objects name an address before zero-size markers
    assert syms.symbol_at(nm1(nm, "__page_tables_start")) == ("l2_directmap", 0)
    assert syms.describe(nm1(nm, "idle_pg_table") + 8 * 261) == f"idle_pg_table+{8 * 261:#x}"
    assert syms.symbol_at(nm1(nm, "__image_base__")) is None
    assert syms.symbol_at(nm1(nm, "_end")) is None
    assert syms.symbol_at(0) is None


def test_boot_tables_exist_with_their_page_counts(syms, nm):
    found = syms.boot_tables()
    assert [t.name for t, _ in found] == [t.name for t in X.BOOT_TABLES]
    for t, s in found:
        ((v, _, size),) = nm[t.name]
        assert s.value == v and size == t.pages * x86.PAGE_SIZE, t.name
        assert v % x86.PAGE_SIZE == 0 and syms.in_image(v)
    # The relocated set: exactly the tables between the __page_tables markers.
    inside = {t.name for t, s in found if syms.page_tables_start <= s.value < syms.page_tables_end}
    assert inside == {"idle_pg_table", "l3_xenmap", "l2_xenmap", "l2_fixmap",
                      "l3_directmap", "l2_directmap"}


# ---------------------------------------------------------------------------
# ELF layout and bytes
# ---------------------------------------------------------------------------


def test_build_id_matches_readelf(syms, syms_path):
    out = _run("readelf", "-n", str(syms_path))
    assert syms.build_id == bytes.fromhex(re.search(r"Build ID: ([0-9a-f]+)", out).group(1))


def test_segments_match_readelf(syms, loads):
    assert [(s.offset, s.vaddr, s.paddr, s.filesz, s.memsz) for s in syms.segments] == loads


def test_sections_match_readelf(syms, syms_path):
    rows = {}
    pat = re.compile(r"^\s*\[\s*(\d+)\]\s+(\S+)\s+\S+\s+([0-9a-f]+)\s+([0-9a-f]+)\s+([0-9a-f]+)")
    for line in _run("readelf", "-SW", str(syms_path)).splitlines():
        m = pat.match(line)
        if m and m.group(1) != "0":
            rows[m.group(2)] = tuple(int(x, 16) for x in m.group(3, 4, 5))
    ours = {s.name: (s.addr, s.offset, s.size) for s in syms.sections if s.name}
    assert ours == rows


def test_link_qwords_match_file_bytes(syms, nm, loads, raw_file):
    base = nm1(nm, "__image_base__")
    for t in X.BOOT_TABLES:
        va = nm1(nm, t.name)
        n = 512 * t.pages
        ours = syms.link_qwords(t.name, n)
        if any(vaddr <= va < vaddr + filesz for _, vaddr, _, filesz, _ in loads):
            want = list(struct.unpack(f"<{n}Q", file_bytes(raw_file, loads, va, 8 * n)))
        else:  # .bss: beyond filesz, zero at link time
            want = [0] * n
        assert ours == want, t.name
    # Link-time entries assume B = 0: an entry is offset(next table) | flags.
    l4 = syms.link_qwords("idle_pg_table")
    slot = (syms.virt_start >> 39) & 511
    assert l4[slot] == (nm1(nm, "l3_xenmap") - base) | 0x63
    assert l4[0] == (nm1(nm, "l3_bootmap") - base) | 0x63
    assert l4[slot + 1] == (nm1(nm, "l3_directmap") - base) | 0x63
    l3 = syms.link_qwords("l3_xenmap")
    assert l3[(syms.virt_start >> 30) & 511] == (nm1(nm, "l2_xenmap") - base) | 0x63
    assert syms.read_u64(nm1(nm, "idle_pg_table") + 8 * slot) == l4[slot]


def test_read_linked_matches_objcopy(syms, syms_path, tmp_path):
    sec = next(s for s in syms.sections if s.name == ".data")
    out = tmp_path / "data.bin"
    _run("objcopy", "-O", "binary", "--only-section=.data", str(syms_path), str(out))
    assert syms.read_linked(sec.addr, sec.size) == out.read_bytes()


def test_read_linked_bss_and_bounds(syms, nm, loads):
    (_, vaddr, _, filesz, memsz), = loads
    va = nm1(nm, "l1_fixmap")
    assert va >= vaddr + filesz
    assert syms.read_linked(va, 4096) == bytes(4096)
    # straddling the file-backed / zero-fill boundary
    edge = syms.read_linked(vaddr + filesz - 8, 16)
    assert len(edge) == 16 and edge[8:] == bytes(8)
    with pytest.raises(GdbextError):
        syms.read_linked(nm1(nm, "__image_base__"), 8)
    with pytest.raises(GdbextError):
        syms.read_linked(vaddr + memsz - 4, 8)


# ---------------------------------------------------------------------------
# multiboot2
# ---------------------------------------------------------------------------


def test_multiboot2_header(syms, nm, loads, raw_file):
    hdr = syms.multiboot2
    assert hdr is not None
    start = nm1(nm, "_start")
    # Xen labels the header: head.o's local multiboot2_header.
    assert hdr.va == nm1(nm, "multiboot2_header")
    assert hdr.offset_from_start == hdr.va - start == 0x18
    assert hdr.va % 8 == 0 and hdr.offset_from_start + hdr.header_length <= 32768
    # Independent: the raw words at that file offset.
    magic, arch, hlen, csum = struct.unpack("<IIII", file_bytes(raw_file, loads, hdr.va, 16))
    assert magic == MB2_MAGIC and (magic + arch + hlen + csum) % 2**32 == 0
    assert (arch, hlen, csum) == (hdr.architecture, hdr.header_length, hdr.checksum)
    # No earlier valid header in the first 32 KiB from _start.
    window = file_bytes(raw_file, loads, start, 32768)
    for off in range(0, hdr.offset_from_start, 8):
        assert struct.unpack_from("<I", window, off)[0] != MB2_MAGIC
    # Walk the tags independently.
    body = file_bytes(raw_file, loads, hdr.va, hlen)
    tags, p = [], 16
    while True:
        ttype, flags, size = struct.unpack_from("<HHI", body, p)
        tags.append((ttype, flags, size, body[p + 8:p + size]))
        if ttype == 0:
            break
        p += (size + 7) & ~7
    assert [(t.type, t.flags, t.size, t.data) for t in hdr.tags] == tags
    reloc = next(d for t, _, _, d in tags if t == 10)
    mn, mx, al, pref = struct.unpack("<IIII", reloc)
    r = hdr.relocatable
    assert (r.min_addr, r.max_addr, r.align, r.preference) == (mn, mx, al, pref)
    assert (r.min_addr, r.max_addr, r.align, r.preference_name) == (
        0x200000, 0xFFFFFFFF, 0x200000, "high")
    # Min load address is sym_offs(start): the tag constrains PA(_start).
    assert r.min_addr == start - nm1(nm, "__image_base__")
    # EFI amd64 entry = sym_offs(__efi64_mb2_start) (link-time PA).
    efi = next(d for t, _, _, d in tags if t == 9)
    assert hdr.efi64_entry == struct.unpack("<I", efi[:4])[0]
    assert hdr.efi64_entry == nm1(nm, "__efi64_mb2_start") - nm1(nm, "__image_base__")
    assert hdr.entry_addr is None and hdr.efi_bs and hdr.module_align
    assert hdr.info_requests == struct.unpack("<II", next(d for t, _, _, d in tags if t == 1))


def test_multiboot2_header_in_xen_gz(syms, build):
    """What GRUB loads (xen.gz's ELF32) holds the same header in its first 32 KiB."""
    img = gzip.decompress(_need_file(build.image).read_bytes())
    hdr = syms.multiboot2
    want = syms.read_linked(hdr.va, hdr.header_length)
    pos = img.find(want)
    assert 0 <= pos and pos % 8 == 0 and pos + len(want) <= 32768
    # Its PT_LOAD ends at __2M_rwdata_end: that is GRUB's load size.
    assert img[:4] == b"\x7fELF" and img[4] == 1  # ELF32
    phoff, = struct.unpack_from("<I", img, 28)
    _ptype, _off, _va, paddr, filesz, memsz = struct.unpack_from("<IIIIII", img, phoff)
    assert paddr == syms.offset("_start")
    # 4.17's mkelf32 ends the PT_LOAD at __2M_rwdata_end (= load_size); 4.20's rounds its
    # memsz up to the next 2 MiB, a size xen-syms does not record. GRUB's candidate bases
    # under a 2 MiB-aligned RAM top are the same either way (align is 2 MiB).
    assert syms.load_size() <= memsz < syms.load_size() + syms.multiboot2.relocatable.align
    for top in (1 << 30, 3 << 30):
        assert syms.load_base_candidates(top, load_size=memsz) == syms.load_base_candidates(top)
    assert img[_off:_off + filesz] == syms.read_linked(syms.image_start, filesz)


def test_load_base_candidates(syms, nm):
    hdr = syms.multiboot2
    r = hdr.relocatable
    size = syms.load_size()
    off_start = nm1(nm, "_start") - nm1(nm, "__image_base__")
    assert size == nm1(nm, "__2M_rwdata_end") - nm1(nm, "_start")
    for ram_top in (1 << 30, 4 << 30, 3 << 30):
        c = syms.load_base_candidates(ram_top)
        assert c and c == sorted(c, reverse=True) and len(set(c)) == len(c)
        for b in c:
            s = b + off_start  # PA(_start)
            assert b % r.align == 0 and s % r.align == 0
            assert r.min_addr <= s and s + size <= min(ram_top, r.max_addr)
        assert c[0] + off_start + r.align + size > min(ram_top, r.max_addr)
        assert c[-1] + off_start - r.align < r.min_addr
        assert len(c) == (c[0] - c[-1]) // r.align + 1
    assert len(syms.load_base_candidates(1 << 30)) == 510
    assert len(syms.load_base_candidates(4 << 30)) == 2046
    assert syms.load_base_candidates(size) == []


# ---------------------------------------------------------------------------
# .map files
# ---------------------------------------------------------------------------


def test_map_agrees_with_elf(syms, build):
    m = X.load_map(_need_file(build.syms_map))
    assert m.build_id is None
    common = set(m.symbols) & set(syms.symbols)
    assert len(common) > 6000
    for name in common:
        assert m.symbols[name].value == syms.symbols[name].value, name
        assert m.symbols[name].type == syms.symbols[name].type, name
    # The map leaves out only the absolute symbols.
    assert set(syms.symbols) - set(m.symbols) == {s.qualname for s in syms if s.is_absolute}
    assert set(m.symbols) <= set(syms.symbols)
    for attr in ("virt_start", "image_start", "image_end", "page_tables_start", "page_tables_end"):
        assert getattr(m, attr) == getattr(syms, attr), attr
    assert m.offset("__efi64_mb2_start") == syms.offset("__efi64_mb2_start")
    va = syms.linked_va("idle_pg_table") + 0x10
    assert m.symbol_at(va) == syms.symbol_at(va)
    with pytest.raises(X.AmbiguousSymbolError):
        m.lookup("__func__.0")


def test_efi_map_loads(syms, build):
    e = X.load_xen_syms(_need_file(build.efi_map))
    assert isinstance(e, X.XenMapSymbols)
    # xen.efi's map has no __image_base__: virt_start is _start - 2 MiB.
    assert "__image_base__" not in e.symbols
    assert e.virt_start == syms.virt_start and e.image_start == syms.image_start
    # A different layout from xen-syms: use the right file.
    assert e.linked_va("idle_pg_table") != syms.linked_va("idle_pg_table")


# ---------------------------------------------------------------------------
# errors, cache, version
# ---------------------------------------------------------------------------


def _one_line_error(path) -> str:
    with pytest.raises(GdbextError) as ei:
        X.load_xen_syms(path, cache_dir=False)
    msg = str(ei.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def test_error_messages(tmp_path, syms_path):
    assert "no such file" in _one_line_error(tmp_path / "nope")
    assert "directory" in _one_line_error(tmp_path)
    junk = tmp_path / "junk.txt"
    junk.write_text("hello world\nthis is not a map\n")
    assert "neither an ELF" in _one_line_error(junk) or "nm format" in _one_line_error(junk)
    binjunk = tmp_path / "junk.bin"
    binjunk.write_bytes(bytes(range(256)) * 4)
    assert "neither an ELF" in _one_line_error(binjunk)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert "empty" in _one_line_error(empty)
    gz = tmp_path / "xen.gz"
    gz.write_bytes(gzip.compress(b"x"))
    assert "gzip" in _one_line_error(gz)
    pe = tmp_path / "xen.efi"
    pe.write_bytes(b"MZ" + bytes(126))
    assert ".map" in _one_line_error(pe)
    # A map that is not Xen's
    other = tmp_path / "other.map"
    other.write_text("0000000000001000 T main\n")
    assert "not a Xen image" in _one_line_error(other)
    # An ELF with symbols that is not Xen: strip Xen's marker symbols.
    notxen = tmp_path / "notxen"
    _run("objcopy", "--strip-symbol=__image_base__", "--strip-symbol=_start",
         str(syms_path), str(notxen))
    msg = _one_line_error(notxen)
    assert "not a Xen image" in msg and "xen-syms" in msg
    # A stripped ELF.
    stripped = tmp_path / "stripped"
    _run("objcopy", "--strip-all", str(syms_path), str(stripped))
    assert "without symbols" in _one_line_error(stripped)


def test_cache_roundtrip_and_invalidation(syms_path, tmp_path):
    X.clear_memo()
    cold = X.load_xen_syms(syms_path, cache_dir=tmp_path)
    assert not cold.loaded_from_cache and list(tmp_path.glob("*.json"))
    X.clear_memo()
    warm = X.load_xen_syms(syms_path, cache_dir=tmp_path)
    assert warm.loaded_from_cache
    assert X.load_xen_syms(syms_path, cache_dir=tmp_path) is warm  # in-process
    for attr in ("build_id", "version", "version_info", "virt_start", "image_start",
                 "image_end", "segments", "sections", "page_tables_start"):
        assert getattr(warm, attr) == getattr(cold, attr), attr
    assert list(warm) == list(cold)
    assert warm.link_qwords("idle_pg_table") == cold.link_qwords("idle_pg_table")
    assert warm.multiboot2 == cold.multiboot2
    # A changed file (new mtime) is parsed again.
    copy = tmp_path / "xen-syms-copy"
    shutil.copy2(syms_path, copy)
    X.clear_memo()
    assert not X.load_xen_syms(copy, cache_dir=tmp_path).loaded_from_cache
    X.clear_memo()
    assert X.load_xen_syms(copy, cache_dir=tmp_path).loaded_from_cache
    st = copy.stat()
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    X.clear_memo()
    assert not X.load_xen_syms(copy, cache_dir=tmp_path).loaded_from_cache
    # A corrupt cache file is ignored.
    for f in tmp_path.glob("*.json"):
        f.write_text("{not json")
    X.clear_memo()
    assert not X.load_xen_syms(copy, cache_dir=tmp_path).loaded_from_cache


def test_version(syms, syms_path, build):
    assert syms.version is not None
    major, minor = syms.version.split(".")[:2]
    # paths names the package: xen-4.17, xen-4.20
    assert f"{major}.{minor}" == build.name and build.name in build.root.name
    strings = _run("strings", "-a", str(syms_path))
    csv = syms.version_info.get("compile_system_version")
    # Debian's version names the release it was cut from: 4.17.7+13-g... is Xen 4.17.7;
    # 4.20.4+63-g... is stable-4.20 63 commits after 4.20.4, which Xen calls 4.20.5-pre.
    assert csv and csv in strings and csv.startswith(f"{major}.{minor}.")
