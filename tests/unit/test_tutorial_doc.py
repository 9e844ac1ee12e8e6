"""docs/tutorial.md's markers parse, and the comparison tolerates exactly a change of
load base (no boot here: tests/integration/test_walkthrough.py runs the commands)."""

from __future__ import annotations

import pytest

from tests.integration import tutorial


def test_the_document_parses():
    doc = tutorial.parse(tutorial.DOC.read_text())
    commands = [r.command for r in doc.runs]
    assert commands[0].startswith("xen-walkthrough --no-wait")
    assert all(block.lines for run in doc.runs for block in run.blocks)
    walk = doc.runs[0].lines()
    stops = [line for line in walk if line.startswith("== Stop ")]
    assert len(stops) == int(stops[0].split("/")[1].split(":")[0])  # every stop is shown
    assert doc.load_base % (2 << 20) == 0


def test_compare_allows_only_a_load_base_shift():
    b1, b2 = 0x3D600000, 0x7D600000
    doc = [" L4[0x105] = 000000003da6d063  P RW  -> table 0x3da6d000  [idle_pg_table]",
           "root 0x3f801000"]
    run = [" L4[0x105] = 000000007da6d063  P RW  -> table   0x7da6d000  [idle_pg_table]",
           "root 0x3f801000", ""]
    assert tutorial.compare(doc, run, b1, b2) is None
    assert tutorial.compare(doc, run, b1, b1) is not None           # B did not move
    wrong = [run[0].replace("idle_pg_table", "l3_xenmap"), run[1]]
    assert "line 1" in tutorial.compare(doc, wrong, b1, b2)
    assert "shows 2 lines" in tutorial.compare(doc, run[:1], b1, b2)


def test_update_cuts_at_the_old_blocks_first_lines():
    text = "\n".join([
        "<!-- tutorial: load-base 0x200000 -->",
        "<!-- tutorial: run cmd -->", "```text", "old head", "```", "prose",
        "<!-- tutorial: more -->", "```text", "== Stop 2", "old", "```"])
    doc = tutorial.parse(text)
    new = tutorial.update(doc, {"cmd": "head\nmore head\n\n== Stop 2\nbody 0x400000\n"},
                          0x400000)
    again = tutorial.parse(new)
    assert again.load_base == 0x400000
    assert [b.lines for b in again.runs[0].blocks] == [["head", "more head"],
                                                       ["== Stop 2", "body 0x400000"]]
    assert "prose" in new


@pytest.mark.parametrize("bad", ["<!-- tutorial: run x -->\nno fence",
                                 "<!-- tutorial: more -->\n```text\nx\n```",
                                 "<!-- tutorial: run x -->\n```text\nx\n```"])
def test_malformed_documents_are_refused(bad):
    with pytest.raises(ValueError):
        tutorial.parse(bad)
