"""core/diagram on synthetic memory and the real Debian xen-syms.

Expected slots and pointer classes are derived from the memory the test builds
and from xen-syms' link values (xenimage.classify_pointer), never typed in.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import pytest

from gdbext import paths
from gdbext.core import diagram, x86
from gdbext.core.errors import GdbextError
from gdbext.core.memory import SyntheticMemory
from gdbext.core.paging import MODE_4LEVEL, MODE_5LEVEL, PagingContext
from gdbext.core.xenimage import (RELOCATED, UNRELOCATED, LoadedXen, classify_pointer)
from gdbext.core.xensyms import load_xen_syms

SVG_NS = "{http://www.w3.org/2000/svg}"
CTX = PagingContext(MODE_4LEVEL)
# Any 2 MiB-aligned base above the firmware tables below: nothing may depend on it.
B = 0x12600000
PTR = x86.PTE_P | x86.PTE_RW | x86.PTE_A            # a pointer as firmware writes it
LEAF_2M = x86.PTE_P | x86.PTE_RW | x86.PTE_PS
MASK = x86.phys_addr_mask(x86.MAXPHYADDR_ARCH)

F = 0x100000             # the firmware's L4
F_L3 = 0x101000
F_L2 = 0x102000          # first of FW_L2S tables, each 512 x 2M identity
FW_L2S = 4
MERGE = 0x200000         # where the tests put a merged L4


@pytest.fixture(scope="module")
def xen():
    return LoadedXen(load_xen_syms(paths.XEN_DEBIAN_SYMS), B)


def load_image_tables(mem: SyntheticMemory, xen: LoadedXen) -> None:
    """Xen's boot tables at B, as GRUB leaves them: link-time values (B = 0)."""
    for table, sym in xen.syms.boot_tables():
        size = table.pages * x86.PAGE_SIZE
        mem.write(xen.pa(table.name), xen.syms.read_linked(sym.value, size))


def firmware(mem: SyntheticMemory) -> None:
    """An OVMF-like identity map: L4[0] -> one L3 whose first entries point to L2 tables
    of 2 MiB leaves, plus one 1 GiB leaf."""
    mem.write_table(F, {0: F_L3 | PTR})
    l3 = {}
    for i in range(FW_L2S):
        l2 = F_L2 + i * x86.PAGE_SIZE
        l3[i] = l2 | PTR
        mem.write_table(l2, {j: ((i << 30) + (j << 21)) | LEAF_2M for j in range(512)})
    l3[FW_L2S] = (FW_L2S << 30) | LEAF_2M  # PS in an L3 entry: a 1 GiB page
    mem.write_table(F_L3, l3)


def merged(xen: LoadedXen, relocate: bool) -> SyntheticMemory:
    """The RFC's merge as the tests understand it: lower half from F, upper half the
    idle_pg_table link values (plus B when ``relocate``)."""
    mem = SyntheticMemory(1 << 32)
    firmware(mem)
    load_image_tables(mem, xen)
    for i in range(512):
        if i < 256:
            value = int.from_bytes(mem.read_phys(F + 8 * i, 8), "little")
        else:
            value = xen.link_entry(diagram.IDLE_L4, i)
            if relocate and value & x86.PTE_P:
                value += B
        mem.write_u64(MERGE + 8 * i, value)
    return mem


def upper_slots(xen: LoadedXen):
    return [i for i in range(256, 512) if xen.link_entry(diagram.IDLE_L4, i) & x86.PTE_P]


def svg_texts(svg: str):
    root = ET.fromstring(svg)
    return root, [t.text or "" for t in root.iter(SVG_NS + "text")]


# --- the model ------------------------------------------------------------------------------

def test_model_lists_exactly_the_present_slots(xen):
    mem = merged(xen, relocate=False)
    present = [i for i in range(512)
               if int.from_bytes(mem.read_phys(MERGE + 8 * i, 8), "little") & x86.PTE_P]
    m = diagram.build_model(CTX, mem, MERGE, xen, "merge", judge_as=diagram.IDLE_L4)
    assert m.present_slots() == present
    assert set(upper_slots(xen)) < set(present)


def test_firmware_tree_folds_alike_l3_entries(xen):
    mem = SyntheticMemory(1 << 32)
    firmware(mem)
    m = diagram.build_model(CTX, mem, F, xen)
    (slot,) = m.slots
    assert slot.owner == diagram.OWNER_FIRMWARE and slot.verdict is None
    rows = slot.table.rows
    # The FW_L2S identity L2 tables look alike: one row; then the 1 GiB leaf.
    assert [(r.first, r.last, r.kind) for r in rows] == [(0, FW_L2S - 1, "table"),
                                                         (FW_L2S, FW_L2S, "leaf")]
    assert rows[0].summary == "512 x 2M leaves, identity"
    assert rows[0].target_end_pa == F_L2 + (FW_L2S - 1) * x86.PAGE_SIZE
    assert "1G leaf identity" in rows[1].summary
    assert slot.table.present == FW_L2S + 1


def test_merge_pointer_classes_come_from_the_link_values(xen):
    for relocate in (False, True):
        mem = merged(xen, relocate)
        m = diagram.build_model(CTX, mem, MERGE, xen, "merge", judge_as=diagram.IDLE_L4)
        by_index = {s.index: s for s in m.slots}
        for i in upper_slots(xen):
            link = xen.link_entry(diagram.IDLE_L4, i)
            found = int.from_bytes(mem.read_phys(MERGE + 8 * i, 8), "little")
            want = classify_pointer(found & MASK, link & MASK, B)
            assert want == (RELOCATED if relocate else UNRELOCATED)
            s = by_index[i]
            assert s.verdict == want
            if relocate:
                assert s.target_name == xen.name_pa((link & MASK) + B)
                assert s.owner == diagram.OWNER_XEN and s.expected_pa is None
            else:
                # Points at firmware memory; the picture names the table Xen meant.
                assert s.owner == diagram.OWNER_FIRMWARE and s.target_name is None
                assert s.expected_pa == (link & MASK) + B
                assert s.expected_name == xen.name_pa((link & MASK) + B)
        # The lower half is the firmware's: never judged.
        assert all(s.verdict is None for s in m.slots if s.index < 256)


def test_xen_tables_entries_are_judged_and_l2_summarised(xen):
    mem = merged(xen, relocate=True)
    m = diagram.build_model(CTX, mem, MERGE, xen, judge_as=diagram.IDLE_L4)
    xenmap_slot = (xen.syms.virt_start >> 39) & 511
    slot = next(s for s in m.slots if s.index == xenmap_slot)
    assert slot.table.name == "l3_xenmap" and slot.table.owner == diagram.OWNER_XEN
    # l3_xenmap's entries in memory are still link values: unrelocated, as the ELF says.
    for r in slot.table.rows:
        link = xen.link_entry("l3_xenmap", r.first)
        assert r.verdict == classify_pointer(r.target_pa, link & MASK, B) == UNRELOCATED
        assert r.expected_name == xen.name_pa((link & MASK) + B)


def test_l2_summary_names_the_l1_and_counts_leaves(xen):
    mem = SyntheticMemory(1 << 32)
    load_image_tables(mem, xen)
    l2 = xen.pa("l2_xenmap")
    # What trampoline_setup does: relocate the pointers, map the image with 2 MiB pages.
    for i in range(512):
        v = xen.link_entry("l2_xenmap", i)
        if v & x86.PTE_P:
            mem.write_u64(l2 + 8 * i, v + B)
    pages = 3
    for i in range(1, 1 + pages):
        mem.write_u64(l2 + 8 * i, (B + (i << 21)) | 0x1E3)
    b = diagram._Builder(CTX, mem, F, xen)
    text, _key = b.l2_summary(l2, xen.syms.virt_start)
    l1 = next(i for i in range(512) if xen.link_entry("l2_xenmap", i) & x86.PTE_P)
    target = (xen.link_entry("l2_xenmap", l1) & MASK) + B
    assert text.startswith(f"{pages} x 2M leaves -> pa {B + (1 << 21):#x}")
    assert f"L1 table at [{l1}] {xen.name_pa(target)}" in text
    assert "1 relocated" in text


def test_cycles_reserved_bits_and_shared_tables():
    mem = SyntheticMemory(1 << 32)
    firmware(mem)
    mem.write_table(F, {1: F_L3 | PTR, 2: F | PTR, 3: F_L3 | PTR | x86.PTE_PS})
    m = diagram.build_model(CTX, mem, F)
    s = {x.index: x for x in m.slots}
    assert s[1].same_as == 0 and s[1].table.pa == F_L3
    assert "linear" in s[2].note and s[2].table is None
    assert s[3].note.startswith("reserved bits 0x80")
    assert all(x.owner == diagram.OWNER_UNKNOWN for x in m.slots)
    assert m.tables() == [F, F_L3]
    dot = diagram.to_dot([m])
    # The self-reference is drawn (an edge back to the L4); the reserved entry is not a pointer.
    assert len(re.findall(r" -> ", dot)) == 3


def test_other_modes_are_refused():
    with pytest.raises(GdbextError, match="4-level"):
        diagram.build_model(PagingContext(MODE_5LEVEL), SyntheticMemory(), F)


# --- SVG ------------------------------------------------------------------------------

def test_svg_is_xml_with_every_slot_and_class(xen):
    models = [diagram.build_model(CTX, merged(xen, r), MERGE, xen, t, diagram.IDLE_L4)
              for r, t in ((False, "plain"), (True, "relocated"))]
    svg = diagram.to_svg(models, "merge vs relocated")
    root, texts = svg_texts(svg)
    trees = [g for g in root.iter(SVG_NS + "g") if g.get("class") == "tree"]
    assert [g.get("data-title") for g in trees] == ["plain", "relocated"]
    for g, m in zip(trees, models):
        slots = [e for e in g.iter(SVG_NS + "g") if e.get("class") == "l4-slot"]
        assert [int(e.get("data-index")) for e in slots] == m.present_slots()
        for e, s in zip(slots, m.slots):
            assert e.get("data-verdict") == diagram.verdict_label(s.verdict)
            inner = [t.text for t in e.iter(SVG_NS + "text")]
            assert f"L4[{s.index}]  (512G of VA)" in inner
            assert f"entry {s.raw:#018x}" in inner
            if s.verdict:
                assert s.verdict in inner
    # Names drawn: the relocated tree reaches l3_xenmap; the plain one says what was meant.
    assert any(t.startswith("L3 l3_xenmap (") for t in texts)
    assert any(t.strip().startswith("l3_xenmap (") for t in texts)   # "expected:" line
    # The legend explains every class and colour.
    for kind, text in diagram.VERDICT_TEXT.items():
        assert text in texts


def test_svg_and_dot_escape_everything():
    mem = SyntheticMemory(1 << 32)
    firmware(mem)
    nasty = 'a<b>&"c\' </text><script>x</script> \\ "q"'
    m = diagram.build_model(CTX, mem, F, title=nasty)
    svg = diagram.to_svg([m], nasty)
    root = ET.fromstring(svg)
    assert root.find(SVG_NS + "title").text == nasty
    assert nasty in [t.text for t in root.iter(SVG_NS + "text")]
    assert not list(root.iter(SVG_NS + "script"))
    dot = diagram.to_dot([m], nasty)
    label = re.search(r'graph \[fontname="[^"]*", label="((?:[^"\\]|\\.)*)"', dot).group(1)
    assert re.sub(r"\\(.)", r"\1", label) == nasty
    # Names go into HTML-like labels: each must stay well-formed XML with the name as text.
    m.root_name = nasty
    m.slots[0].table.name = nasty
    dot = diagram.to_dot([m], nasty)
    labels = re.findall(r"\[label=<(.*)>\];$", dot, re.M)
    assert len(labels) == len(m.tables())
    for label in labels:
        table = ET.fromstring(label)
        assert not list(table.iter("script"))
        assert any(nasty in "".join(td.itertext()) for td in table.iter("td"))


# --- DOT ------------------------------------------------------------------------------

def test_dot_has_one_node_per_table_and_one_edge_per_pointer(xen):
    models = [diagram.build_model(CTX, merged(xen, r), MERGE, xen, str(r), diagram.IDLE_L4)
              for r in (False, True)]
    dot = diagram.to_dot(models)
    nodes = re.findall(r"^\s+(m\d+_t[0-9a-f]+) \[label=", dot, re.M)
    edges = re.findall(r"^\s+(m\d+_t[0-9a-f]+):s(\d+):e -> (m\d+_t[0-9a-f]+) ", dot, re.M)
    want_nodes = [f"m{i}_t{pa:x}" for i, m in enumerate(models) for pa in m.tables()]
    assert sorted(nodes) == sorted(want_nodes) and len(set(nodes)) == len(nodes)
    want_edges = [(f"m{i}_t{m.root:x}", str(s.index), f"m{i}_t{s.target_pa:x}")
                  for i, m in enumerate(models) for s in m.slots]
    assert sorted(edges) == sorted(want_edges)
    # The last tree comes first in the file, so that dot draws the first one at the top.
    assert dot.index("subgraph cluster_0") > dot.index("subgraph cluster_1")
    assert dot.count("{") == dot.count("}")
    # Every edge's colour is its class's.
    for i, m in enumerate(models):
        for s in m.slots:
            line = next(x for x in dot.splitlines() if f"m{i}_t{m.root:x}:s{s.index}:e" in x)
            assert diagram.VERDICT_COLOUR[diagram.verdict_label(s.verdict)] in line


# --- text and files -----------------------------------------------------------------------

def test_write_files_and_text(xen, tmp_path):
    m = diagram.build_model(CTX, merged(xen, False), MERGE, xen, "plain", diagram.IDLE_L4)
    svg, dot = tmp_path / "t.svg", tmp_path / "t.dot"
    assert diagram.write_files([m], str(svg), str(dot)) == [str(svg), str(dot)]
    ET.parse(svg)
    assert dot.read_text().startswith("digraph")
    text = diagram.to_text([m])
    for s in m.slots:
        assert f"L4[{s.index}] " in text
    assert "expected l3_xenmap" in text
    with pytest.raises(GdbextError, match="cannot write"):
        diagram.write_files([m], str(tmp_path / "missing" / "x.svg"))
    with pytest.raises(GdbextError, match="nothing to draw"):
        diagram.to_svg([])


def test_default_judge_as(xen):
    assert diagram.default_judge_as(None, F) is None
    assert diagram.default_judge_as(xen, F) is None                       # firmware memory
    assert diagram.default_judge_as(xen, xen.pa("idle_pg_table")) is None  # judged as itself
    inside = xen.pa("efi_multiboot2") & ~0xFFF                           # an RFC build's M
    assert diagram.default_judge_as(xen, inside) == diagram.IDLE_L4


def test_uniform_l2_fast_path_says_what_the_entry_by_entry_path_says():
    mem = SyntheticMemory(1 << 32)
    target = 0x40000000
    mem.write_table(F_L2, {j: (target + (j << 21)) | LEAF_2M | (x86.PTE_A if j % 3 else 0)
                           for j in range(512)})

    def summary(va):  # a builder per look: it caches the pages it reads
        return diagram._Builder(CTX, mem, F, None).l2_summary(F_L2, va)

    b = diagram._Builder(CTX, mem, F, None)
    assert b._uniform_leaves(diagram.paging.read_table(MODE_4LEVEL, mem, F_L2, 2)[1]) == target
    assert summary(0) == ("512 x 2M leaves -> pa 0x40000000", (512, 0, 0, False, ()))
    assert summary(target)[0] == "512 x 2M leaves, identity"
    mem.write_u64(F_L2 + 8 * 5, 0)                     # one hole: entry by entry
    assert summary(0) == ("511 x 2M leaves -> pa 0x40000000", (511, 0, 0, False, ()))
    assert summary(target)[0] == "511 x 2M leaves, identity"
