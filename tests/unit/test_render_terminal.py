"""What a person at a terminal gets: colour by meaning, lines fitted to GDB's width,
names suggested for typos, and JSON whose integers survive a reader of doubles."""

import json

from gdbext.core import render, suggest


def test_highlight_colours_statuses_classes_and_faults_only():
    text = "I3 FAIL: L4[261] unrelocated; I0 PASS; relocated; PASSED; foo"
    out = render.highlight(text)
    assert "\x1b[1;31mFAIL\x1b[0m" in out and "\x1b[32mPASS\x1b[0m" in out
    assert "\x1b[1;31munrelocated\x1b[0m" in out and "\x1b[32mrelocated\x1b[0m" in out
    assert "PASSED" in out and "\x1b[32mPASSED" not in out      # whole words only
    assert render.highlight("nothing here") == "nothing here"


def test_fit_width_wraps_long_lines_under_their_start_and_cuts_rules():
    line = "  I6   FAIL  " + " ".join(f"word{i}" for i in range(40))
    out = render.fit_width(line + "\n" + "-" * 120 + "\nshort", 60).split("\n")
    assert all(len(x) <= 60 for x in out)
    assert out[1].startswith("      ")                # continuation under the row
    assert " ".join(" ".join(out[:-2]).split()) == " ".join(line.split())
    assert out[-2] == "-" * 60 and out[-1] == "short"
    assert render.fit_width(line, None) == line


def test_suggest_completes_and_finds_the_nearest_names():
    names = ["efi_multiboot2", "efi_start", "idle_pg_table", "PrintErrMesg"]
    assert suggest.completions(names, "efi_") == ["efi_multiboot2", "efi_start"]
    assert suggest.nearest(names, "efi_mutliboot2")[0] == "efi_multiboot2"
    assert suggest.did_you_mean(names, "zzzz") == ""


def test_json_has_a_hex_string_beside_every_integer():
    va = 0xffff82d0403e6980
    d = json.loads(render.to_json({"va": va, "levels": [{"pa": 5, "ok": True}],
                                   "slots": [0, 261], "name": "x"}))
    assert d["va"] == va and d["va_hex"] == hex(va)
    assert d["levels"][0]["pa_hex"] == "0x5" and "ok_hex" not in d["levels"][0]
    assert d["slots_hex"] == ["0x0", "0x105"] and "name_hex" not in d
    # A reader that keeps numbers as doubles loses the VA's low bits; the string keeps them.
    assert int(float(d["va"])) != va and int(d["va_hex"], 16) == va
