"""scripts/xen-boot-check against real boots of Debian's Xen (OVMF + GRUB + QEMU).

Three boots: the plain RFC prediction (exit 1, the failing checks named), the
relocated prediction on the call's checks (exit 0), and a wrong xen-syms given to
a QEMU we started (exit 2, caught on the running image's build-id note). The
unreachable --connect needs no boot. Expected values come from xen-syms, from
Xen's own console line (the report carries it) and from readelf, never from
constants here.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from gdbext import paths
from gdbext.core import bootstops, merge_catalog
from gdbext.core.xensyms import load_xen_syms
from gdbext.host.lab import Lab, LabConfig

from .conftest import matrix_builds, need_build

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "xen-boot-check"
RUN_TIMEOUT_S = 600


def boot_check(tmp_path: Path, *argv: str):
    """Run the script; return (process, report dict, JUnit root element or None)."""
    report, junit = tmp_path / "report.json", tmp_path / "junit.xml"
    proc = subprocess.run([str(SCRIPT), "--report", str(report), "--junit", str(junit), *argv],
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    data = json.loads(report.read_text())
    root = ET.parse(junit).getroot() if junit.exists() else None
    return proc, data, root


def readelf_build_id(path: Path) -> str:
    out = subprocess.run(["readelf", "-n", str(path)], check=True, capture_output=True,
                         text=True).stdout
    return re.search(r"Build ID: ([0-9a-f]+)", out).group(1)


def junit_cases(root):
    """{(stop, case name): testcase element}."""
    return {(suite.get("name"), case.get("name")): case
            for suite in root.findall("testsuite") for case in suite.findall("testcase")}


@pytest.fixture(scope="module")
def syms():
    return load_xen_syms(paths.XEN_DEBIAN_SYMS)


@pytest.fixture(scope="module")
def xen_slot(syms):
    """The L4 slot of XEN_VIRT_START (where xen-syms' __image_base__ is linked)."""
    return (syms.linked_va("__image_base__") >> 39) & 511


@pytest.fixture(scope="module")
def plain_prediction(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plain")
    return boot_check(tmp, "--predict", "--keep-going")


def test_plain_prediction_fails_naming_xen_slot(plain_prediction, syms, xen_slot):
    proc, report, _ = plain_prediction
    assert proc.returncode == 1, proc.stderr
    result = report["result"]
    # B is Xen's own, as it printed it on its console.
    assert report["console_load_base"] == result["load_base"]
    base = result["load_base"]
    entry = result["stops"][0]
    assert entry["stop"] == bootstops.ENTRY
    assert entry["rip"] == base + syms.offset("__efi64_mb2_start")
    failed = {c["id"]: c for c in entry["checks"] if c["status"] == "FAIL"}
    assert {"I3", "I4", "I6"} <= set(failed)
    # The reason: M[Xen's slot] holds l3_xenmap's link-time address, not B + that.
    link = syms.offset("l3_xenmap")
    for cid in ("I3", "I4", "I6"):
        summary = failed[cid]["summary"]
        assert f"[{xen_slot}]" in summary and "l3_xenmap" in summary and f"{link:#x}" in summary
        assert f"{base + link:#x}" in summary
    # The verdict line on stderr names every failed check with its stop.
    verdict = proc.stderr.strip().splitlines()[-1]
    for cid in failed:
        assert f"{cid}@{bootstops.ENTRY}" in verdict


def test_keep_going_reaches_every_stop_of_the_plan(plain_prediction, syms):
    _, report, _ = plain_prediction
    plan = bootstops.build_plan(syms)
    assert report["result"]["reached"] == plan.names()
    assert report["planned_stops"] == plan.names()
    assert report["result"]["stops"][-1]["rip"] == syms.linked_va("__start_xen")


def test_junit_parses_and_lists_every_check(plain_prediction):
    _, report, root = plain_prediction
    assert root is not None and root.tag == "testsuites"
    cases = junit_cases(root)
    result = report["result"]
    expected = 0
    for stop in result["stops"]:
        assert cases[(stop["stop"], "reached")].find("failure") is None
        expected += 1
        if stop.get("error"):   # checks that could not be made there: a JUnit error
            err = cases[(stop["stop"], "checks could be made")].find("error")
            assert err.get("message") == stop["error"]
            expected += 1
        for check in stop["checks"]:
            case = cases[(stop["stop"], f"{check['id']} {check['title']}")]
            expected += 1
            if check["status"] == "FAIL":
                failure = case.find("failure")
                assert failure.get("message") == check["summary"]
                assert check["reviewer"] is None or check["reviewer"] in failure.text
            elif check["status"] == "SKIP":
                assert case.find("skipped").get("message") == check["summary"]
            else:
                assert case.find("failure") is None and case.find("skipped") is None
    if result.get("error"):
        assert cases[("run", "boot check run")].find("error") is not None
        expected += 1
    assert len(cases) == expected == int(root.get("tests"))
    n_failed = sum(1 for s in result["stops"] for c in s["checks"] if c["status"] == "FAIL")
    assert int(root.get("failures")) == n_failed


def test_relocated_prediction_passes_the_call_checks(tmp_path, syms):
    """The checks that concern the call, through the whole session."""
    only = ",".join(merge_catalog.CALL_CHECKS)
    proc, report, root = boot_check(tmp_path, "--predict", "--assume-relocated", "--only", only)
    assert proc.returncode == 0, proc.stderr
    result = report["result"]
    assert result["reached"] == bootstops.build_plan(syms).names()
    entry = result["stops"][0]
    statuses = {c["id"]: c["status"] for c in entry["checks"]}
    assert set(statuses) == set(merge_catalog.CALL_CHECKS)
    assert statuses["I6"] == "PASS" and statuses["I3"] == "PASS" and statuses["I4"] == "PASS"
    ran = {c["id"] for s in result["stops"] for c in s["checks"]}
    assert ran <= set(merge_catalog.CALL_CHECKS)
    assert all(c["status"] != "FAIL" for s in result["stops"] for c in s["checks"])
    assert root.get("failures") == "0" and root.get("errors") == "0"
    assert proc.stdout.strip().splitlines()[-1].startswith("xen-boot-check: ok:")


def test_build_exits_0_and_reaches_every_planned_stop(tmp_path, xen_build):
    """`xen-boot-check --build NAME` on the unmodified build: every stop its plan has
    (decoded from its xen-syms), no failed check, exit 0."""
    proc, report, root = boot_check(tmp_path, "--build", xen_build.name)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = report["result"]
    assert result["reached"] == bootstops.build_plan(load_xen_syms(xen_build.syms)).names()
    assert all(c["status"] != "FAIL" for s in result["stops"] for c in s["checks"])
    assert root.get("failures") == "0" and root.get("errors") == "0"
    assert proc.stdout.strip().splitlines()[-1].startswith("xen-boot-check: ok:")
    assert report["console_load_base"] == result["load_base"]   # Xen's own word on B


EFI_BUILDS = [b for b in matrix_builds() if paths.BUILDS[b].efi_elf is not None]


@pytest.mark.parametrize("build", EFI_BUILDS, ids=lambda n: f"xen{n}")
def test_efi_exits_0_and_reaches_every_planned_stop(tmp_path, build):
    """`xen-boot-check --build NAME --efi`: OVMF starts xen.efi itself; every stop of that
    path's plan (decoded from xen.efi's ELF twin) reached at the address the plan gives
    for Xen's own B (its console line), exit 0."""
    xen_build = need_build(build)
    proc, report, root = boot_check(tmp_path, "--build", build, "--efi")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = report["result"]
    plan = bootstops.build_plan(load_xen_syms(xen_build.efi_elf))
    assert result["reached"] == plan.names() == list(bootstops.EFI_STOP_ORDER)
    base = report["console_load_base"]
    assert base is not None and result["load_base"] == base
    for rec in result["stops"]:
        assert rec["rip"] == plan.get(rec["stop"]).address(base), rec["stop"]
    by = {r["stop"]: r for r in result["stops"]}
    syms = load_xen_syms(xen_build.efi_elf)
    # Xen's own tables from the CR3 load on; the firmware's before.
    idle = base + syms.offset("idle_pg_table")
    assert by[bootstops.EFI_CR3]["cr3"] & ~0xFFF == idle
    assert by[bootstops.START_XEN]["cr3"] & ~0xFFF == idle
    assert by[bootstops.EFI_START]["cr3"] & ~0xFFF != idle
    assert report["build_id"]["match"] is True
    assert root.get("failures") == "0" and root.get("errors") == "0"


def test_wrong_xen_syms_on_a_running_qemu_exits_2(tmp_path):
    """--connect with no image to compare before booting: the build-id note of the image
    in guest memory gives the mismatch away."""
    from elftools.elf.elffile import ELFFile

    wrong = tmp_path / "xen-syms-wrong"
    shutil.copyfile(paths.XEN_DEBIAN_SYMS, wrong)
    with open(wrong, "rb") as f:
        sec = ELFFile(f).get_section_by_name(".note.gnu.build-id")
        note = next(sec.iter_notes())
        at = sec["sh_offset"] + 12 + ((note["n_namesz"] + 3) & ~3)
        size = note["n_descsz"]
    data = bytearray(wrong.read_bytes())
    data[at:at + size] = bytes(b ^ 0x5A for b in data[at:at + size])
    wrong.write_bytes(bytes(data))
    wrong_id, right_id = readelf_build_id(wrong), readelf_build_id(paths.XEN_DEBIAN_SYMS)
    assert wrong_id != right_id
    with Lab(LabConfig(memory_mb=1024)) as lab:
        proc, report, root = boot_check(tmp_path, "--connect", lab.gdb_target,
                                        "--xen-syms", str(wrong))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "build-id mismatch" in lines[0]
    assert wrong_id in lines[0] and right_id in lines[0]
    assert report["lab"] is None and report["target"] == lab.gdb_target
    run_error = root.find("testsuite[@name='run']/testcase/error")
    assert "build-id mismatch" in run_error.get("message")


def test_unreachable_connect_exits_2(tmp_path):
    with socket.socket() as s:   # a port nobody listens on: bound, then closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc, report, root = boot_check(tmp_path, "--connect", f"127.0.0.1:{port}")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0] and "attach" in lines[0]
    assert report["result"] is None and root.get("errors") == "1"


def test_timeout_bounds_the_attach_to_a_silent_stub(tmp_path):
    """A port that accepts and never answers (QEMU stopped, or not a gdbstub): the attach
    waits --timeout, not GDB's own retries on top of it."""
    import socket as _socket
    import threading
    import time
    with _socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        accepted = []
        threading.Thread(target=lambda: accepted.append(listener.accept()), daemon=True).start()
        start = time.monotonic()
        proc, report, root = boot_check(tmp_path, "--connect", f"127.0.0.1:{port}",
                                        "--timeout", "3")
        elapsed = time.monotonic() - start
        for conn, _ in accepted:
            conn.close()
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "attach" in lines[0], proc.stderr
    assert "within 3 s" in lines[0], lines[0]
    assert report["result"] is None
    print(f"\nattach to a silent stub with --timeout 3: {elapsed:.1f} s in all: {lines[0]}")
