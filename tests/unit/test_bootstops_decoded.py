"""The stop plan found by decoding (core/x86decode) is the plan objdump gives: every
stop of Debian's 4.17 build derived here from nm and objdump alone, in boot order, and
the decoder's instruction boundaries over the code the plan is read from."""

import re
import subprocess

import pytest

from gdbext import paths
from gdbext.core import x86decode
from gdbext.core.bootstops import build_plan
from gdbext.core.xensyms import load_xen_syms

SYMS = paths.XEN_DEBIAN_SYMS


@pytest.fixture(scope="module")
def nm():
    out = subprocess.run(["nm", str(SYMS)], capture_output=True, text=True, check=True).stdout
    table = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3:
            table.setdefault(parts[2], int(parts[0], 16))
    return table


def objdump(start, stop, i386=False):
    argv = ["objdump", "-d", "--no-show-raw-insn", f"--start-address={start:#x}",
            f"--stop-address={stop:#x}"] + (["-m", "i386"] if i386 else []) + [str(SYMS)]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    return [(int(m.group(1), 16), m.group(2).strip()) for m in
            (re.match(r"^\s*([0-9a-f]+):\s+(.*)$", line) for line in out.splitlines()) if m]


def _index(rows, pattern, start=0):
    return next(i for i in range(start, len(rows)) if re.search(pattern, rows[i][1]))


def expected_stops(nm):
    """(name, linked VA) of every stop, from nm and objdump only."""
    base = nm["__image_base__"]
    entry = objdump(nm["__efi64_mb2_start"], nm["x86_32_switch"])
    c = _index(entry, r"^call\s+[0-9a-f]+ <efi_multiboot2>$")
    setup = objdump(nm["trampoline_setup"], nm["cmdline_parse_early"], i386=True)
    r = _index(setup, rf"^lea\s+{nm['__page_tables_start'] - base:#x}\(%esi\),%eax$")
    r = _index(setup, r"^jb\s", r)
    f = _index(setup, rf"^mov\s+%eax,{nm['l2_xenmap'] - base:#x}\(%esi,%ecx,8\)$")
    f = _index(setup, r"^jbe\s", f)
    tramp = objdump(nm["trampoline_start"], nm["trampoline_end"], i386=True)
    t = _index(tramp, rf"^mov\s+\${nm['idle_pg_table'] - base:#x},%eax$")
    t = _index(tramp, r"^mov\s+%eax,%cr3$", t)
    return [("__efi64_mb2_start", nm["__efi64_mb2_start"]),
            ("call efi_multiboot2", entry[c][0]),
            ("efi_multiboot2", nm["efi_multiboot2"]),
            ("efi_multiboot2 return", entry[c + 1][0]),
            ("x86_32_switch", nm["x86_32_switch"]),
            ("trampoline_setup", nm["trampoline_setup"]),
            ("tables relocated", setup[r + 1][0]),
            ("l2_xenmap filled", setup[f + 1][0]),
            ("trampoline cr3 load", tramp[t + 1][0]),
            ("__high_start", nm["__high_start"]),
            ("__start_xen", nm["__start_xen"])]


def test_the_whole_plan_is_objdumps(nm):
    plan = build_plan(load_xen_syms(SYMS))
    assert [(s.name, s.linked_va) for s in plan.stops] == expected_stops(nm)


@pytest.mark.parametrize("start, stop, mode", [
    ("__efi64_mb2_start", "x86_32_switch", 64),
    ("trampoline_setup", "cmdline_parse_early", 32),
    ("trampoline_protmode_entry", "start64", 32),
])
def test_decoder_boundaries_are_objdumps(nm, start, stop, mode):
    syms = load_xen_syms(SYMS)
    lo, hi = nm[start], nm[stop]
    insns = x86decode.decode(syms.read_linked(lo, hi - lo), lo, mode)
    assert [i.address for i in insns] == [a for a, _ in objdump(lo, hi, i386=mode == 32)]
