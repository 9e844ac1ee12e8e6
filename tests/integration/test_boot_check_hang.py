"""xen-boot-check on a guest that hangs: exit 1, the hang named on stderr, in the JSON
report and as a JUnit failure, soon after the hang wait.

The lab is booted to __efi64_mb2_start by GDB (gdbext), 'nop; nop; jmp .' is written
at the entry (by the test), and GDB detaches: the guest spins two bytes past the entry
(not on it: GDB resuming from a breakpoint on a 'jmp .' would step over it forever).
xen-boot-check then attaches (--connect) with --hang-wait 5: no stop comes. The expected RIP and name come from
QEMU's registers and xen-syms.
"""

from __future__ import annotations

import time

from gdbext import paths
from gdbext.core.xensyms import load_xen_syms
from gdbext.host.gdbdriver import lab_session
from gdbext.host.lab import LabConfig

from .test_boot_check import boot_check

HANG_WAIT_S = 5


def test_boot_check_reports_a_hang(tmp_path):
    syms = load_xen_syms(paths.XEN_DEBIAN_SYMS)
    with lab_session(LabConfig(memory_mb=1024), paths.XEN_DEBIAN_SYMS) as (lab, gdb):
        entry = gdb.execute("xen-run-to __efi64_mb2_start --json --timeout 240",
                            timeout=300).json()["rip"]
        gdb.execute(f"set {{unsigned char[4]}} {entry:#x} = {{144, 144, 235, 254}}")
        gdb.close()                       # detach: the guest spins at entry + 2
        t = time.monotonic()
        proc, report, root = boot_check(tmp_path, "--connect", lab.gdb_target,
                                        "--hang-wait", str(HANG_WAIT_S), "--timeout", "120")
        took = time.monotonic() - t
    assert proc.returncode == 1, proc.stdout + proc.stderr
    spin = entry + 2
    named = (f"{syms.describe(syms.linked_va('__efi64_mb2_start') + 2)} (Xen, at its load "
             "address)")
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "the guest hung" in lines[0], proc.stderr
    assert f"spinning at {spin:#x} ({named})" in lines[0], lines[0]
    crash = report["result"]["crash"]
    assert crash["kind"] == "hang" and crash["state"] == "spin" and crash["rip"] == spin
    assert crash["loop"] == [spin]
    failures = [f for suite in root.findall("testsuite") for case in suite.findall("testcase")
                for f in case.findall("failure")]
    assert any("the guest hung" in (f.get("message") or "") for f in failures), \
        [f.get("message") for f in failures]
    # Attach, the entry stop, the hang wait and the samples: well under 30 s of waiting.
    assert took < 60, took
