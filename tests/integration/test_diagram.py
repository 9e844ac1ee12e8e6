"""xen-diagram on the real boot: at __efi64_mb2_start (OVMF's tables, Xen at its load
address) and at construct_dom0 (Xen's own tables, its linear slot).

Oracles: QEMU's monitor (xp of the L4 page, info mem, info registers), xen-syms'
link values; never constants of this file.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

from gdbext.core import x86
from ..oracles import parse_info_mem
from gdbext.core.xenimage import RELOCATED, UNRELOCATED, LoadedXen
from gdbext.core.xensyms import load_xen_syms
from gdbext.host.lab import XEN_LOAD_BASE_RE

SVG_NS = "{http://www.w3.org/2000/svg}"
MASK = x86.phys_addr_mask(x86.MAXPHYADDR_ARCH)


def slots_of_info_mem(stop):
    """L4 slots that hold at least one mapping, by QEMU's info mem."""
    out = set()
    for r in parse_info_mem(stop.monitor("info mem")):
        first, last = (r.va >> 39) & 511, ((r.end - 1) >> 39) & 511
        out.update(range(first, last + 1))
    return out


def test_diagram_of_cr3_lists_the_present_slots(at_entry):
    root = at_entry.qemu_registers()["cr3"] & ~0xFFF
    l4 = at_entry.qwords(root, 512)
    present = [i for i, e in enumerate(l4) if e & x86.PTE_P]
    (model,) = at_entry.json("xen-diagram --json")["models"]
    assert model["root"] == root
    assert [s["index"] for s in model["slots"]] == present
    assert [s["raw"] for s in model["slots"]] == [l4[i] for i in present]
    # Every slot that maps something (QEMU's info mem, our xen-pt) is drawn.
    assert slots_of_info_mem(at_entry) == set(present)
    ranges = at_entry.json("xen-pt --json")["ranges"]
    pt_slots = {i for r in ranges
                for i in range((r["va"] >> 39) & 511, (((r["end"] - 1) >> 39) & 511) + 1)}
    assert pt_slots == set(present)
    # At the entry nothing is Xen's: the firmware's tables, outside Xen's image.
    for s in model["slots"]:
        assert s["owner"] == "firmware" and s["verdict"] is None
        assert s["table"]["pa"] == l4[s["index"]] & MASK
        assert s["table"]["present"] == sum(
            1 for e in at_entry.qwords(s["table"]["pa"], 512) if e & x86.PTE_P)


def test_svg_and_dot_files(at_entry, tmp_path):
    svg, dot = tmp_path / "cr3.svg", tmp_path / "cr3.dot"
    out = at_entry.cmd(f"xen-diagram --svg {svg} --dot {dot}").out
    assert f"wrote {svg}" in out and f"wrote {dot}" in out
    (model,) = at_entry.json("xen-diagram --json")["models"]
    root = ET.parse(svg).getroot()
    slots = [int(g.get("data-index")) for g in root.iter(SVG_NS + "g")
             if g.get("class") == "l4-slot"]
    assert slots == [s["index"] for s in model["slots"]]
    text = dot.read_text()
    tables = {model["root"]} | {s["table"]["pa"] for s in model["slots"] if s["table"]}
    assert len(re.findall(r"^\s+m0_t[0-9a-f]+ \[label=", text, re.M)) == len(tables)
    assert len(re.findall(r"^\s+m0_t[0-9a-f]+:s\d+:e -> ", text, re.M)) == len(model["slots"])


def test_compare_shows_l3_xenmap_unrelocated_then_relocated(at_entry, xen_syms_path, tmp_path):
    syms = load_xen_syms(xen_syms_path)
    # B from QEMU's RIP at the entry, not from our own commands.
    load_base = at_entry.qemu_registers()["rip"] - syms.offset("__efi64_mb2_start")
    xen = LoadedXen(syms, load_base)
    slot = (syms.virt_start >> 39) & 511
    link = xen.link_entry("idle_pg_table", slot) & MASK
    assert link == syms.offset("l3_xenmap")

    svg = tmp_path / "compare.svg"
    result = at_entry.json(f"xen-diagram --compare --svg {svg} --json")
    assert result["files"] == [str(svg)]
    firmware, plain, relocated = result["models"]
    assert firmware["root"] == at_entry.qemu_registers()["cr3"] & ~0xFFF
    fw_slots = [s["index"] for s in firmware["slots"]]
    for merge in (plain, relocated):
        # The merge keeps the firmware's lower half and adds Xen's upper half.
        lower = [s for s in merge["slots"] if s["index"] < 256]
        assert [s["index"] for s in lower] == fw_slots
        assert [s["raw"] for s in lower] == [s["raw"] for s in firmware["slots"]]
    p = next(s for s in plain["slots"] if s["index"] == slot)
    assert p["verdict"] == UNRELOCATED and p["target_pa"] == link
    assert p["owner"] == "firmware" and p["expected_name"] == "l3_xenmap"
    assert p["expected_pa"] == xen.pa("l3_xenmap")
    r = next(s for s in relocated["slots"] if s["index"] == slot)
    assert r["verdict"] == RELOCATED and r["target_pa"] == xen.pa("l3_xenmap")
    assert r["target_name"] == "l3_xenmap" and r["table"]["name"] == "l3_xenmap"

    root = ET.parse(svg).getroot()
    trees = [g for g in root.iter(SVG_NS + "g") if g.get("class") == "tree"]
    assert [g.get("data-title") for g in trees] == [m["title"] for m in result["models"]]
    verdicts = []
    for tree in trees[1:]:
        (g,) = [g for g in tree.iter(SVG_NS + "g")
                if g.get("class") == "l4-slot" and g.get("data-index") == str(slot)]
        verdicts.append(g.get("data-verdict"))
        texts = [t.text for t in g.iter(SVG_NS + "text")]
        if g.get("data-verdict") == RELOCATED:
            assert f"L3 l3_xenmap ({xen.pa('l3_xenmap'):#x})" in texts
        else:
            assert f"L3 {link:#x}" in texts
            assert f" l3_xenmap ({xen.pa('l3_xenmap'):#x})" in texts   # what was expected
    assert verdicts == [UNRELOCATED, RELOCATED]


def test_user_mistakes_are_one_line(at_entry, tmp_path):
    for command, words in (
            ("xen-diagram --assume-relocated", "--predict"),
            ("xen-diagram --root 0x1001", "aligned"),
            (f"xen-diagram --svg {tmp_path}/no/such/dir/x.svg", "cannot write"),
            ("xen-diagram --bogus", "unrecognized")):
        reply = at_entry.gdb.execute(command, check=False)
        assert reply.error and words in reply.error, (command, reply.error)
        assert "\n" not in reply.error and "Traceback" not in reply.out


def test_xen_tables_at_construct_dom0(at_construct_dom0, xen_syms_path, tmp_path):
    stop = at_construct_dom0
    syms = load_xen_syms(xen_syms_path)
    # B as Xen itself printed it on its console.
    load_base = int(re.search(XEN_LOAD_BASE_RE, stop.lab.serial_text()).group(1), 16)
    xen = LoadedXen(syms, load_base)
    root = stop.qemu_registers()["cr3"] & ~0xFFF
    l4 = stop.qwords(root, 512)
    dot = tmp_path / "dom0.dot"
    result = stop.json(f"xen-diagram --dot {dot} --json")
    (model,) = result["models"]
    assert model["root"] == root == xen.pa("idle_pg_table")
    assert model["root_name"] == "idle_pg_table" and model["root_owner"] == "xen"
    assert [s["index"] for s in model["slots"]] == [i for i, e in enumerate(l4) if e & x86.PTE_P]
    slots = {s["index"]: s for s in model["slots"]}
    # Xen's linear slot points back at the L4: named, drawn as an edge to itself, not expanded.
    (linear,) = [i for i, e in enumerate(l4) if e & x86.PTE_P and e & MASK == root]
    assert "linear" in slots[linear]["note"] and slots[linear]["table"] is None
    node = f"m0_t{root:x}"
    assert re.search(rf"^\s+{node}:s{linear}:e -> {node} ", dot.read_text(), re.M)
    # Once Xen runs at its linked address, tables outside its image are its own, not firmware.
    assert {s["owner"] for s in model["slots"]} <= {"xen", "outside"}
    # l3_xenmap: relocated once by trampoline_setup; each entry judged against its link value.
    xenmap = slots[(syms.virt_start >> 39) & 511]
    assert xenmap["verdict"] == RELOCATED and xenmap["target_name"] == "l3_xenmap"
    entries = stop.qwords(xen.pa("l3_xenmap"), 512)
    rows = xenmap["table"]["rows"]
    assert sum(r["last"] - r["first"] + 1 for r in rows) == sum(
        1 for e in entries if e & x86.PTE_P)
    relocated_rows = 0
    for r in rows:
        found = entries[r["first"]]
        link = xen.link_entry("l3_xenmap", r["first"])
        assert r["raw"] == found
        # Expected verdict from QEMU's bytes and xen-syms' link value directly:
        # trampoline_setup adds B once to every link-time pointer.
        if link & x86.PTE_P and found & MASK == (link & MASK) + load_base:
            assert r["verdict"] == RELOCATED, r
            relocated_rows += 1
        elif link & x86.PTE_P and found & MASK == link & MASK:
            assert r["verdict"] == UNRELOCATED, r
        else:
            assert r["verdict"] not in (RELOCATED, UNRELOCATED), r
    assert relocated_rows          # l3_xenmap's own link-time pointers, relocated once


def test_xen_pt_svg_and_dot_draw_the_same_tree_as_xen_diagram(at_entry, tmp_path):
    svg, dot = tmp_path / "pt.svg", tmp_path / "pt.dot"
    written = at_entry.json(f"xen-pt --svg {svg} --dot {dot} --json")["files"]
    assert written == [str(svg), str(dot)]
    root = at_entry.qemu_registers()["cr3"] & ~0xFFF
    present = [i for i, e in enumerate(at_entry.qwords(root, 512)) if e & x86.PTE_P]
    drawn = [int(g.get("data-index"))
             for g in ET.parse(svg).getroot().iter(f"{SVG_NS}g")
             if g.get("class") == "l4-slot"]
    assert drawn == present
    assert dot.read_text().lstrip().startswith("digraph")
