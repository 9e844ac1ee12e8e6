"""xen-pic-check in a real GDB, offline: no QEMU, only xen-syms loaded with 'xen-syms'.

What the command must find is derived from the file (nm for the symbols and
ErrCodeToStr's contents through pyelftools, objdump for PrintErrMesg's instructions);
bad input is one line without a traceback; TAB completes code symbols; the result is
cached per build-id (the first run in a fresh cache is computed, the next one read).
"""

from __future__ import annotations

import json
import subprocess

import pytest

from gdbext import paths
from gdbext.host.gdbdriver import GdbSession

from ..oracles import message_table, nm_table, objdump

ENTRY = "__efi64_mb2_start"


@pytest.fixture(scope="module")
def nm(xen_syms_path):
    return nm_table(xen_syms_path)


@pytest.fixture
def gdb(xen_syms_path, tmp_path, monkeypatch):
    """GDB with gdbext and Debian's xen-syms, caching into an empty directory (the xen-syms
    itself stays where setup put it)."""
    monkeypatch.setenv("GDBEXT_CACHE", str(tmp_path / "cache"))
    with GdbSession() as session:
        yield session


def one_line_error(reply, *words):
    assert reply.error, reply.out
    assert "\n" not in reply.error and "Traceback" not in reply.out + reply.error
    for w in words:
        assert w in reply.error, (w, reply.error)
    return reply.error


def test_finds_printerrmesg_reading_its_table_without_a_target(gdb, xen_syms_path, nm):
    one_line_error(gdb.execute("xen-pic-check", check=False), "xen-syms")
    gdb.execute(f"xen-syms {xen_syms_path}")
    name, table_va, entries = message_table(xen_syms_path, nm)
    start, size, _ = nm["PrintErrMesg"]
    rows = objdump(xen_syms_path, start, start + size)
    lea_va = next(va for va, text in rows if text.startswith("lea") and f"<{name}>" in text)

    first = gdb.execute("xen-pic-check --json")
    d = json.loads(first.out.strip())           # one line of JSON
    assert len(first.out.strip().splitlines()) == 1
    assert d["entries"] == [ENTRY] and d["findings_total"] == len(d["findings"])
    mine = [f for f in d["findings"] if f["function"].endswith("#PrintErrMesg")]
    assert {f["kind"] for f in mine} == {"takes address", "reads pointer"}
    lea = next(f for f in mine if f["kind"] == "takes address")
    assert lea["address"] == lea_va and lea["where"] == f"{lea['function']}+{lea_va - start:#x}"
    assert lea["object_va"] == table_va and lea["object"].endswith(name)
    assert [(i, v) for i, v, _ in lea["values"]] == entries
    assert [c.split("#")[-1] for c in lea["chain"][:2]] == [ENTRY, "efi_multiboot2"]
    assert all(f["faults"] for f in mine)

    text = gdb.execute("xen-pic-check").out
    assert "(cached)" in text.splitlines()[-1]   # the JSON run above computed and cached it
    assert f"PrintErrMesg+{lea_va - start:#x}" in text and f"{name}[0]" in text
    assert f"{ENTRY} -> efi_multiboot2 ->" in text
    assert text.splitlines()[-1].startswith(f"{d['findings_total']} findings")


def test_the_gdb_command_and_the_command_line_agree(gdb, xen_syms_path, tmp_path):
    gdb.execute(f"xen-syms {xen_syms_path}")
    ours = json.loads(gdb.execute("xen-pic-check PrintErrMesg --json --no-cache").out)
    cli = subprocess.run([str(paths.REPO_ROOT / ".venv" / "bin" / "python"), "-m",
                          "gdbext.host.pic_check", "--xen-syms", str(xen_syms_path),
                          "PrintErrMesg", "--json", "--no-cache"],
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 1, cli.stderr       # findings
    theirs = json.loads(cli.stdout)
    assert [(f["kind"], f["address"]) for f in ours["findings"]] == \
        [(f["kind"], f["address"]) for f in theirs["findings"]]
    assert [f["name"] for f in ours["functions"]] == [f["name"] for f in theirs["functions"]]


def test_bad_input_is_one_line(gdb, xen_syms_path, tmp_path):
    gdb.execute(f"xen-syms {xen_syms_path}")
    one_line_error(gdb.execute("xen-pic-check PrintErrMsg", check=False),
                   "no function 'PrintErrMsg'", "PrintErrMesg")
    one_line_error(gdb.execute("xen-pic-check --bogus", check=False),
                   "unrecognized arguments: --bogus", "help xen-pic-check")
    missing = tmp_path / "no-xen.efi"
    one_line_error(gdb.execute(f"xen-pic-check --efi {missing}", check=False), str(missing))
    data = gdb.execute("xen-pic-check ErrCodeToStr.16 --json", check=False)
    err = one_line_error(data)
    assert json.loads(data.out.strip().splitlines()[-1])["error"] == err
    # A symbol map has names but no bytes to decode.
    gdb.execute(f"xen-syms {paths.XEN_DEBIAN_SYMS_MAP}")
    one_line_error(gdb.execute("xen-pic-check", check=False), "no code bytes")


def test_a_stripped_image_is_refused_in_one_line(gdb, xen_syms_path, tmp_path):
    stripped = tmp_path / "xen-syms-stripped"
    subprocess.run(["strip", "-o", str(stripped), str(xen_syms_path)], check=True)
    one_line_error(gdb.execute(f"xen-syms {stripped}", check=False), str(stripped),
                   "without symbols (stripped")
    one_line_error(gdb.execute("xen-pic-check", check=False), "no Xen symbols loaded")


def test_help_and_completion(gdb, xen_syms_path):
    help_text = gdb.execute("help xen-pic-check").out
    for word in ("usage: xen-pic-check", "FUNCTION", "--efi", "--json", ENTRY):
        assert word in help_text, word
    assert "xen pic-check, xen-pic-check" in gdb.execute("help xen").out
    gdb.execute(f"xen-syms {xen_syms_path}")

    def complete(text):
        return gdb.execute(f"complete {text}").out.split("\n")
    assert "xen-pic-check PrintErrMesg" in complete("xen-pic-check PrintErr")
    assert "xen-pic-check --json efi_multiboot2" in complete("xen-pic-check --json efi_multib")
    assert {"xen-pic-check --efi", "xen-pic-check --efi-map"} <= set(complete("xen-pic-check --ef"))
    # Only code: ErrCodeToStr is data, not a function to start from.
    assert not [c for c in complete("xen-pic-check ErrCode") if c.strip()]
