"""The JUnit writer and the verdict of scripts/xen-boot-check, on session results
shaped like the xen-mb2-break --batch --json contract."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from gdbext.core import junit

STOPS = ["__efi64_mb2_start", "merge", "call efi_multiboot2", "__start_xen"]


def check(cid, status, summary="s", evidence=None, reviewer=None, title=None):
    return {"id": cid, "title": title or f"title of {cid}", "status": status,
            "summary": summary, "evidence": evidence or {}, "reviewer": reviewer}


def result(stops, complete=True, error=None):
    checks = [c for s in stops for c in s["checks"]]
    counts = junit.count_statuses(checks)
    return {"load_base": 0x3D600000, "complete": complete, "reached": [s["stop"] for s in stops],
            "stops": stops, "counts": counts, "ok": counts["FAIL"] == 0, "error": error}


def stop(name, *checks, rip=0x3D9DD531, cr3=0x3F801000):
    return {"stop": name, "rip": rip, "cr3": cr3, "changes": {}, "checks": list(checks)}


def parse(xml_text):
    root = ET.fromstring(xml_text.encode())
    suites = {s.get("name"): s for s in root.findall("testsuite")}
    return root, suites


def test_every_check_is_a_testcase_in_its_stop_suite():
    r = result([stop("__efi64_mb2_start", check("I0", "PASS"), check("I2", "PASS")),
                stop("call efi_multiboot2", check("I6", "PASS")),
                stop("__start_xen")])
    root, suites = parse(junit.junit_xml(r, STOPS))
    assert list(suites) == STOPS
    names = [c.get("name") for c in suites["__efi64_mb2_start"].findall("testcase")]
    assert names == ["reached", "I0 title of I0", "I2 title of I2"]
    assert suites["call efi_multiboot2"].get("tests") == "2"
    # The merge stop was planned, the boot completed without it: skipped, not failed.
    merge_case = suites["merge"].find("testcase")
    assert merge_case.find("skipped") is not None and merge_case.find("failure") is None
    assert root.get("failures") == "0" and root.get("errors") == "0"
    assert root.get("tests") == str(sum(int(s.get("tests")) for s in suites.values()))
    assert junit.exit_status(r) == junit.EXIT_OK


def test_failure_carries_summary_as_message_and_evidence_as_text():
    failing = check("I4", "FAIL", summary="L4[261] points at the link-time address of l3_xenmap",
                    evidence={"slot": 261, "found": 0x46D063, "expected": 0x3DA6D063,
                              "kind": "unrelocated", "ok": False},
                    reviewer="Frediano: adjust the pointers")
    r = result([stop("__efi64_mb2_start", failing, check("I10", "WARN", summary="3 RWX leaves"),
                     check("I9", "SKIP", summary="not at the trampoline"))], complete=False)
    root, suites = parse(junit.junit_xml(r, STOPS))
    cases = {c.get("name"): c for c in suites["__efi64_mb2_start"].findall("testcase")}
    failure = cases["I4 title of I4"].find("failure")
    assert failure.get("message") == failing["summary"]
    assert "found: 0x46d063" in failure.text and "expected: 0x3da6d063" in failure.text
    assert "slot: 261" in failure.text and "ok: false" in failure.text
    assert "reviewer: Frediano: adjust the pointers" in failure.text
    skipped = cases["I9 title of I9"].find("skipped")
    assert skipped.get("message") == "not at the trampoline"
    warn = cases["I10 title of I10"]
    assert warn.find("failure") is None and warn.find("skipped") is None
    assert warn.find("system-out").text.startswith("WARN: I10 WARN: 3 RWX leaves")
    suite = suites["__efi64_mb2_start"]
    assert (suite.get("failures"), suite.get("skipped")) == ("1", "1")
    # The session stopped after the failure (no --keep-going): later stops were not run.
    later = suites["__start_xen"].find("testcase")
    assert later.find("failure") is None
    assert "stopped after a failed check" in later.find("skipped").get("message")
    assert junit.exit_status(r) == junit.EXIT_FAILED
    assert [c["id"] for c in junit.failed_checks(r)] == ["I4"]
    assert junit.failed_checks(r)[0]["stop"] == "__efi64_mb2_start"


def test_run_error_is_an_error_case_and_exit_2():
    r = result([stop("__efi64_mb2_start", check("I0", "PASS"))], complete=False,
               error="timed out waiting for x86_32_switch")
    assert junit.exit_status(r) == junit.EXIT_NOT_RUN
    root, suites = parse(junit.junit_xml(r, STOPS, run_error="QEMU died"))
    assert root.get("errors") == "1"
    err = suites["run"].find("testcase/error")
    assert err.get("message") == "QEMU died"
    reached = suites["__start_xen"].find("testcase/failure")
    assert "QEMU died" in reached.get("message")


def test_no_result_at_all():
    assert junit.exit_status(None, "cannot attach") == junit.EXIT_NOT_RUN
    root, suites = parse(junit.junit_xml(None, STOPS[:1], run_error="cannot attach"))
    assert list(suites) == ["__efi64_mb2_start", "run"]
    assert root.get("failures") == "1" and root.get("errors") == "1"


def test_a_failed_check_wins_over_an_early_end():
    r = result([stop("__efi64_mb2_start", check("I4", "FAIL"))], complete=False,
               error="stopped after a failed check")
    assert junit.exit_status(r) == junit.EXIT_FAILED


def test_stop_reached_outside_the_plan_still_gets_a_suite():
    r = result([stop("x86_32_switch", check("I0", "PASS"))])
    _, suites = parse(junit.junit_xml(r, ["__efi64_mb2_start"]))
    assert list(suites) == ["__efi64_mb2_start", "x86_32_switch"]


def test_text_that_needs_escaping_survives():
    nasty = 'a <b> & "c" \u2192 d'
    r = result([stop("__efi64_mb2_start", check("I1", "FAIL", summary=nasty,
                                                evidence={"note": nasty}))])
    _, suites = parse(junit.junit_xml(r, []))
    failure = suites["__efi64_mb2_start"].find("testcase/failure")
    assert failure.get("message") == nasty
    assert nasty in failure.text


def test_evidence_text_formats():
    text = junit.evidence_text(check("I5", "FAIL", summary="x",
                                     evidence={"entries": [0x1E3, 3], "walk": {"pa": 0x3DA00000},
                                               "none": None, "name": "l2_xenmap"}))
    assert "entries: [0x1e3, 3]" in text
    assert "walk: {pa: 0x3da00000}" in text
    assert "none: null" in text and "name: l2_xenmap" in text


def test_a_run_that_judged_nothing_is_not_a_pass():
    r = result([stop("__efi64_mb2_start"), stop("__start_xen")])
    assert junit.exit_status(r) == junit.EXIT_NOT_RUN
    assert "no check was made" in junit.not_run_reason(r, None)
    assert junit.not_run_reason(r, "QEMU died") == "QEMU died"


def test_errors_of_the_session_and_of_a_stop_are_errors():
    bad = stop("__efi64_mb2_start", check("I0", "PASS"))
    bad["error"] = "checks at __efi64_mb2_start: build-id mismatch"
    r = result([bad], complete=True, error=bad["error"])
    root, suites = parse(junit.junit_xml(r, ["__efi64_mb2_start"]))
    err = suites["__efi64_mb2_start"].find("testcase[@name='checks could be made']/error")
    assert err.get("message") == bad["error"]
    assert suites["run"].find("testcase/error").get("message") == bad["error"]
    assert root.get("errors") == "2"
    assert junit.exit_status(r) == junit.EXIT_NOT_RUN
