"""JUnit XML and the verdict of a batch boot check (``scripts/xen-boot-check``).

Input is the one-line result of ``xen-mb2-break --batch --json`` (see the shared
contract): ``{"load_base", "complete", "reached", "stops": [{"stop", "rip", "cr3",
"changes", "checks": [CheckResult...]}], "counts", "ok", "error"}``.  Never imports
``gdb``.

The JUnit layout CI systems display (Jenkins, GitLab, GitHub test reporters):

* one ``<testsuite>`` per boot stop of the plan, named after the stop;
* in it, a ``reached`` test case (fails when the stop was due and not reached
  because the run broke off, is skipped when the boot ended normally without
  passing there, e.g. the ``merge`` stop on an unpatched build, or when the
  session stopped after a failed check without --keep-going);
* one test case per check made at that stop: FAIL -> ``<failure>`` (message = the
  summary, text = the evidence and the reviewer's point), SKIP -> ``<skipped>``
  with the reason, WARN -> a pass whose ``<system-out>`` says why it warned.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from typing import Dict, Iterable, List, Optional, Sequence

from .merge_catalog import FAIL, SKIP, STATUSES, WARN

# Exit statuses of scripts/xen-boot-check.
EXIT_OK = 0         # every check passed (WARN and SKIP included)
EXIT_FAILED = 1     # at least one check failed
EXIT_NOT_RUN = 2    # the run itself could not be done

SUITES_NAME = "xen-boot-check"
REACHED_CASE = "reached"
CRASH_SUITE = "crash"
CRASH_CASE = "the guest ran without crashing"
CHECKS_CASE = "checks could be made"
RUN_SUITE = "run"

# Evidence integers at least this large are shown in hex (addresses, entries),
# except under keys that name counts and positions (L4 slot 261, not 0x105).
_HEX_FROM = 10
_DECIMAL_KEYS = ("slot", "index", "count", "level", "number", "pages")


def _decimal_key(key: object) -> bool:
    return any(word in str(key).lower() for word in _DECIMAL_KEYS)


def _value_text(value: object, decimal: bool = False) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int):
        return str(value) if decimal or abs(value) < _HEX_FROM else f"{value:#x}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value_text(v, decimal) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_value_text(v, _decimal_key(k))}"
                               for k, v in value.items()) + "}"
    return str(value)


def evidence_text(check: Dict[str, object]) -> str:
    """A check's evidence, one ``key: value`` per line, addresses in hex, then the
    reviewer's point it answers (if any)."""
    lines = [f"{check.get('id', '?')} {check.get('status', '?')}: {check.get('summary', '')}"]
    evidence = check.get("evidence") or {}
    if isinstance(evidence, dict):
        for key, value in evidence.items():
            lines.append(f"  {key}: {_value_text(value, _decimal_key(key))}")
    elif evidence:
        lines.append(f"  {_value_text(evidence)}")
    if check.get("reviewer"):
        lines.append(f"reviewer: {check['reviewer']}")
    return "\n".join(lines)


def case_name(check: Dict[str, object]) -> str:
    """``I4 upper-half pointers point into the image``: id, then the title."""
    title = check.get("title") or ""
    return f"{check.get('id', '?')} {title}".strip()


def all_checks(result: Dict[str, object]) -> List[Dict[str, object]]:
    """Every check of every stop, in order, each with its ``stop`` added."""
    out = []
    for stop in result.get("stops") or []:
        for check in stop.get("checks") or []:
            out.append(dict(check, stop=stop.get("stop")))
    return out


def failed_checks(result: Dict[str, object]) -> List[Dict[str, object]]:
    return [c for c in all_checks(result) if c.get("status") == FAIL]


def exit_status(result: Optional[Dict[str, object]], run_error: Optional[str] = None) -> int:
    """0 all passed, 1 a check failed, 2 the run could not be done.

    A failed check wins over a run that ended early: without --keep-going the
    session stops after the stop where a check failed, and that is a verdict,
    not a broken run.
    """
    if result is None:
        return EXIT_NOT_RUN
    if failed_checks(result) or result.get("crash"):
        return EXIT_FAILED     # a check failed, or the guest crashed: both are verdicts
    if run_error or result.get("error"):
        return EXIT_NOT_RUN
    if not all_checks(result):
        return EXIT_NOT_RUN   # nothing was judged: a CI job must not pass on that
    return EXIT_OK


def not_run_reason(result: Optional[Dict[str, object]], run_error: Optional[str]) -> str:
    """The one line that says why the verdict is 2."""
    if run_error:
        return run_error
    if result and result.get("error"):
        return str(result["error"])
    if result is not None and not all_checks(result):
        return ("no check was made at any stop (nothing to judge): look at --only, --skip "
                "and --stops")
    return "the run could not be done"


def count_statuses(checks: Iterable[Dict[str, object]]) -> Dict[str, int]:
    counts = {s: 0 for s in STATUSES}
    for c in checks:
        status = c.get("status")
        if status in counts:
            counts[status] += 1
    return counts


def _suite_stop_names(result: Dict[str, object], planned: Sequence[str]) -> List[str]:
    names = list(planned)
    for stop in result.get("stops") or []:
        if stop.get("stop") not in names:
            names.append(stop.get("stop"))
    return names


def junit_xml(result: Optional[Dict[str, object]], planned_stops: Sequence[str] = (),
              run_error: Optional[str] = None, suites_name: str = SUITES_NAME) -> str:
    """The JUnit XML document (a string, UTF-8 declaration included).

    ``planned_stops``: the stops the session was asked for, in boot order; a
    stop in the plan that is absent from the result gets a ``reached`` case that
    fails (run ended early) or is skipped (boot passed it by). ``run_error``:
    why the run could not be done, if it could not; it becomes an ``<error>``.
    """
    result = result or {}
    error = run_error or result.get("error")
    complete = bool(result.get("complete")) and not run_error
    by_name = {s.get("stop"): s for s in result.get("stops") or []}
    # Without --keep-going the session ends at the stop where a check failed: the
    # stops after it were not run, which is not a failure of their own.
    stopped_on_failure = bool(failed_checks(result)) and not error
    root = ET.Element("testsuites", name=suites_name)
    totals = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}

    for name in _suite_stop_names(result, planned_stops):
        stop = by_name.get(name)
        suite = ET.SubElement(root, "testsuite", name=str(name))
        counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
        classname = f"{suites_name}.{name}"

        reached = ET.SubElement(suite, "testcase", classname=classname, name=REACHED_CASE)
        counts["tests"] += 1
        if stop is not None:
            out = ET.SubElement(reached, "system-out")
            parts = [f"reached {name}"]
            for key in ("rip", "cr3"):
                if isinstance(stop.get(key), int):
                    parts.append(f"{key} {stop[key]:#x}")
            out.text = ", ".join(parts)
        elif complete:
            ET.SubElement(reached, "skipped",
                          message=f"the boot did not pass through {name} (not on this build's path)")
            counts["skipped"] += 1
        elif stopped_on_failure:
            ET.SubElement(reached, "skipped",
                          message="not run: the session stopped after a failed check "
                                  "(--keep-going goes on)")
            counts["skipped"] += 1
        else:
            why = f"not reached: {error}" if error else "not reached: the session ended before it"
            failure = ET.SubElement(reached, "failure", message=why, type="NOT_REACHED")
            failure.text = why
            counts["failures"] += 1

        if stop is not None and stop.get("error"):
            # The checks of this stop could not be made (e.g. a build-id mismatch).
            case = ET.SubElement(suite, "testcase", classname=classname, name=CHECKS_CASE)
            ET.SubElement(case, "error", message=str(stop["error"]), type="CHECKS").text = \
                str(stop["error"])
            counts["tests"] += 1
            counts["errors"] += 1
        for check in (stop or {}).get("checks") or []:
            case = ET.SubElement(suite, "testcase", classname=classname, name=case_name(check))
            counts["tests"] += 1
            status = check.get("status")
            summary = str(check.get("summary") or "")
            if status == FAIL:
                failure = ET.SubElement(case, "failure", message=summary, type=FAIL)
                failure.text = evidence_text(check)
                counts["failures"] += 1
            elif status == SKIP:
                ET.SubElement(case, "skipped", message=summary)
                counts["skipped"] += 1
            elif status == WARN:
                ET.SubElement(case, "system-out").text = "WARN: " + evidence_text(check)
            else:
                ET.SubElement(case, "system-out").text = evidence_text(check)
        for key, value in counts.items():
            suite.set(key, str(value))
            totals[key] += value

    crash = result.get("crash")
    if crash:
        # The guest crashed during the session: a failure of the build, with gdbext's
        # explanation (where, between which stops, the exception and its cause).
        suite = ET.SubElement(root, "testsuite", name=CRASH_SUITE, tests="1", failures="1",
                              errors="0", skipped="0")
        case = ET.SubElement(suite, "testcase", classname=f"{suites_name}.{CRASH_SUITE}",
                             name=CRASH_CASE)
        summary = str(crash.get("summary") or "the guest crashed")
        failure = ET.SubElement(case, "failure", message=summary, type="CRASH")
        where = (f"after {crash['after']}" if crash.get("after") else "before the first stop") \
            + (f", waiting for {crash['waiting_for']}" if crash.get("waiting_for") else "")
        failure.text = "\n".join([summary, where] + [str(t) for t in crash.get("text") or []])
        totals["tests"] += 1
        totals["failures"] += 1
        if error == crash.get("summary"):
            error = run_error      # the crash is the session's error: not a broken run
    if error:
        # The run itself broke: one suite CI shows as an error, with the reason.
        suite = ET.SubElement(root, "testsuite", name=RUN_SUITE, tests="1", failures="0",
                              errors="1", skipped="0")
        case = ET.SubElement(suite, "testcase", classname=f"{suites_name}.{RUN_SUITE}",
                             name="boot check run")
        ET.SubElement(case, "error", message=str(error), type="RUN").text = str(error)
        totals["tests"] += 1
        totals["errors"] += 1
    for key, value in totals.items():
        root.set(key, str(value))
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
