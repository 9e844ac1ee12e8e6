"""xen-walkthrough end to end on real boots of Debian's Xen 4.17, and the tutorial.

Two boots from reset: ``xen-walkthrough --no-wait --json --svg-dir`` checked stop by
stop against xen-syms arithmetic, Xen's console and QEMU's own translation; and the
commands of docs/tutorial.md, whose output must still match what the document shows
(tests/integration/tutorial.py says how blocks are marked and compared).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import xml.etree.ElementTree as ET

import pytest

from gdbext import paths
from gdbext.core import bootstops
from gdbext.core import walkthrough as wt
from gdbext.core.xensyms import load_xen_syms
from gdbext.host.gdbdriver import lab_session
from gdbext.host.lab import XEN_LOAD_BASE_RE, Lab, LabConfig

from ..oracles import parse_gva2gpa
from . import tutorial

SVG_NS = "{http://www.w3.org/2000/svg}"
CONSOLE_TIMEOUT_S = 120   # ends as soon as the line is there; generous for a loaded machine


@pytest.fixture(scope="module")
def syms():
    return load_xen_syms(paths.XEN_DEBIAN_SYMS)


@pytest.fixture(scope="module")
def xen_slot(syms):
    """The L4 slot of XEN_VIRT_START (where xen-syms' __image_base__ is linked)."""
    return (syms.linked_va("__image_base__") >> 39) & 511


@pytest.fixture(scope="module")
def walked(tmp_path_factory):
    """A boot from reset through the whole walkthrough (JSON, with SVGs); QEMU's own
    translation of RIP at the last stop; then B from Xen's console."""
    svg_dir = tmp_path_factory.mktemp("svg")
    with lab_session(LabConfig(memory_mb=1024), paths.XEN_DEBIAN_SYMS) as (lab, gdb):
        out = gdb.execute(f"xen-walkthrough --no-wait --json --svg-dir {svg_dir}",
                          timeout=tutorial.COMMAND_TIMEOUT_S).json()
        rip = out["stops"][-1]["rip"]
        qemu_pa = parse_gva2gpa(gdb.execute(f"monitor gva2gpa {rip:#x}").out)
        gdb.close()   # detach: Xen runs on and prints its load base
        console = lab.wait_for_serial(XEN_LOAD_BASE_RE, timeout=CONSOLE_TIMEOUT_S)
        yield out, svg_dir, qemu_pa, int(console.group(1), 16)


def by_stop(out):
    return {s["stop"]: s for s in out["stops"]}


def test_runs_every_stop_of_the_plan(walked, syms):
    out, _, _, console_base = walked
    assert out["error"] is None and out["complete"] is True
    assert [s["stop"] for s in out["stops"]] == bootstops.build_plan(syms).names()
    assert out["load_base"] == console_base           # Xen's own word for B
    for s in out["stops"]:
        assert s["lesson"] == wt.lesson(s["stop"]).text and s["title"]


def test_walks_land_where_xen_syms_says(walked, syms, xen_slot):
    out, _, qemu_pa, _ = walked
    base = out["load_base"]
    stops = by_stop(out)
    target = syms.linked_va(wt.CALL_TARGET)
    # At the load address, firmware's identity map: RIP's PA is RIP itself, B + offset.
    entry = stops[bootstops.ENTRY]
    assert entry["walk"]["va"] == entry["rip"] == base + syms.offset(bootstops.ENTRY)
    assert entry["walk"]["pa"] == entry["rip"] and entry["paging"] is True
    # Paging off at trampoline_setup: idle_pg_table still holds link-time values.
    setup = stops[bootstops.TRAMPOLINE_SETUP]
    assert setup["paging"] is False
    l4 = setup["walk"]["levels"][0]
    assert l4["table"] == base + syms.offset("idle_pg_table") and l4["index"] == xen_slot
    assert l4["entry"] == syms.link_qwords("idle_pg_table", 512)[xen_slot]
    assert setup["walk"]["pa"] is None and "unrelocated" in l4["note"]
    # Relocated, but l2_xenmap not yet filled: the walk stops at L2.
    relocated = stops[bootstops.TABLES_RELOCATED]["walk"]
    assert relocated["levels"][0]["entry"] == l4["entry"] + base
    assert relocated["fault_level"] == 2
    # Filled: efi_multiboot2's linked VA reaches B + offset, as at the trampoline's CR3.
    for name in (bootstops.L2_XENMAP_FILLED, bootstops.TRAMPOLINE_CR3):
        w = stops[name]["walk"]
        assert w["va"] == target and w["pa"] == base + syms.offset(target)
        assert [lv["table_name"] for lv in w["levels"]] == ["idle_pg_table", "l3_xenmap",
                                                             "l2_xenmap"]
    assert stops[bootstops.TRAMPOLINE_CR3]["cr3"] == base + syms.offset("idle_pg_table")
    # At the linked address: QEMU translates RIP to the PA the walk shows.
    last = stops[bootstops.START_XEN]
    assert last["rip"] == syms.linked_va("__start_xen")
    assert last["walk"]["pa"] == qemu_pa == base + syms.offset("__start_xen")


def test_entry_compares_raw_and_relocated_merge(walked, syms, xen_slot):
    out, _, _, _ = walked
    base = out["load_base"]
    comp = by_stop(out)[bootstops.ENTRY]["comparison"]
    link = syms.link_qwords("idle_pg_table", 512)[xen_slot]
    raw, rel = comp["raw"], comp["relocated"]
    assert raw["slot"] == rel["slot"] == xen_slot
    assert raw["entry"] == link and rel["entry"] == link + base
    assert raw["walk"]["levels"][1]["table"] == syms.offset("l3_xenmap")
    assert raw["walk"]["pa"] is None and raw["bytes_match"] is not True
    assert rel["walk"]["pa"] == base + syms.offset(wt.CALL_TARGET) and rel["bytes_match"]
    failed_raw = {c["id"] for c in comp["verdicts"]["raw"] if c["status"] == "FAIL"}
    assert {"I3", "I4", "I6"} <= failed_raw
    assert all(c["status"] != "FAIL" for c in comp["verdicts"]["relocated"])


def test_one_valid_svg_per_stop(walked, xen_slot):
    out, svg_dir, _, _ = walked
    files = sorted(p.name for p in svg_dir.glob("*.svg"))
    assert files == sorted(os.path.basename(s["svg"]) for s in out["stops"])
    assert len(files) == len(out["stops"])
    entry = ET.parse(svg_dir / files[0]).getroot()
    assert entry.tag == SVG_NS + "svg"
    text = " ".join(t.text or "" for t in entry.iter(SVG_NS + "text"))
    # The firmware tree and the two predicted merges, Xen's slot in both.
    assert text.count(f"L4[{xen_slot}]") >= 2 and "unrelocated" in text and "relocated" in text
    for name in files[1:]:
        assert ET.parse(svg_dir / name).getroot().tag == SVG_NS + "svg"


def test_tutorial_output_still_matches(tmp_path):
    doc = tutorial.parse(tutorial.DOC.read_text())
    outputs, console_base = tutorial.run_commands([r.command for r in doc.runs], tmp_path)
    for run in doc.runs:
        got = outputs[run.command]
        # The B the walkthrough prints is the one Xen prints on its console.
        if run.command.startswith("xen-walkthrough"):
            m = re.search(r"Xen's load base B = (0x[0-9a-f]+)", got)
            assert m and int(m.group(1), 16) == console_base
        problem = tutorial.compare(run.lines(), got.split("\n"), doc.load_base, console_base)
        assert problem is None, f"docs/tutorial.md, '{run.command}': {problem}"
    assert sorted(p.name for p in tmp_path.glob("*.svg"))   # the tutorial's --svg-dir


def test_waits_for_enter_and_q_ends_it_with_the_guest_stopped():
    """At a terminal (a pty here): a prompt after each stop; Enter goes on, q ends the
    walkthrough, its breakpoints are gone and GDB is at its prompt."""
    import pty
    import select
    import time

    def read_until(fd, buf, pattern, timeout, count=1):
        deadline = time.monotonic() + timeout
        while buf.count(pattern) < count and time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                try:
                    buf += os.read(fd, 65536)
                except OSError:
                    break
        return buf

    with Lab(LabConfig(memory_mb=1024)) as lab:
        pid, fd = pty.fork()
        if pid == 0:   # the child: GDB on the pty, as a user would start it
            # A small terminal with GDB's pager on (its default): only the
            # walkthrough's own prompt may pause the output.
            os.execvp("gdb", ["gdb", "-nx", "-q", "-ex", "set height 24",
                              "-ex", f"source {paths.GDBINIT}",
                              "-ex", f"target remote {lab.gdb_target}",
                              "-ex", f"xen-syms {paths.XEN_DEBIAN_SYMS}",
                              "-ex", "xen-walkthrough"])
        try:
            prompt = wt.PROMPT.encode()
            buf = read_until(fd, b"", prompt, tutorial.BOOT_TIMEOUT_S)
            assert prompt in buf and buf.count(b"== Stop ") == 1
            os.write(fd, b"\n")
            buf = read_until(fd, buf, b"== Stop 2/", 120)
            buf = read_until(fd, buf, prompt, 60, count=2)
            assert buf.count(prompt) == 2 and b"== Stop 3/" not in buf
            os.write(fd, b"q\n")
            buf = read_until(fd, buf, b"ended here", 30)
            os.write(fd, b"info breakpoints\n")
            buf = read_until(fd, buf, b"No breakpoints", 30)
            assert b"No breakpoints or watchpoints" in buf
            os.write(fd, b"p/x $pc\n")
            buf = read_until(fd, buf, b"$1 = ", 30)
            buf = read_until(fd, buf, b"\n", 5, count=buf.count(b"\n") + 1)
            os.write(fd, b"show pagination\n")
            buf = read_until(fd, buf, b"State of pagination is", 30)
            buf = read_until(fd, buf, b"\n", 5, count=buf.count(b"\n") + 1)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(fd)
    syms = load_xen_syms(paths.XEN_DEBIAN_SYMS)
    text = buf.decode("utf-8", "replace")
    assert "--Type <RET> for more" not in text          # GDB's pager never cut in
    assert "State of pagination is on" in text          # and is back on afterwards
    base = int(re.search(r"Xen's load base B = (0x[0-9a-f]+)", text).group(1), 16)
    pc = int(re.search(r"\$1 = (0x[0-9a-f]+)", text).group(1), 16)
    # Still stopped at stop 2, the call of efi_multiboot2.
    assert pc == bootstops.build_plan(syms).get(bootstops.CALL).address(base)
