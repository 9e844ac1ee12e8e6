"""How merge-check results are reported: the ``xen-l4merge-check --json``
object (``results_as_dict``) and its text form (``render_text``: a table, then
the evidence of every FAIL and WARN with the reviewer's point, ANSI colours only
when the caller says the output is a terminal).  Never imports ``gdb``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Optional, Sequence

from tabulate import tabulate

from . import x86
from .merge_catalog import FAIL, PASS, SKIP, STATUSES, WARN, CheckResult, counts, ok

if TYPE_CHECKING:
    from .merge_checks import MergeState

# --- JSON -------------------------------------------------------------------------------

def results_as_dict(mode: str, stop: Optional[str], state: MergeState,
                    results: Sequence[CheckResult]) -> Dict[str, object]:
    """The ``xen-l4merge-check --json`` object (see the brief's contract)."""
    froot = state.firmware_root
    if froot is None and state.firmware_cr3 is not None:
        froot = state.firmware_cr3 & x86.phys_addr_mask(state.maxphyaddr)
    return {"mode": mode, "stop": stop, "load_base": state.load_base,
            "firmware_root": froot, "table": state.merged_root,
            "checks": [r.as_dict() for r in results],
            "counts": counts(results), "ok": ok(results)}


# --- text -------------------------------------------------------------------------------

_ANSI = {PASS: "\x1b[32m", FAIL: "\x1b[1;31m", WARN: "\x1b[33m", SKIP: "\x1b[2m"}
_ANSI_RESET = "\x1b[0m"
SUMMARY_WIDTH = 100


def _value_text(v: object) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, int):
        return f"{v:#x}" if v >= 10 else str(v)
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_value_text(x)}" for k, x in v.items()) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value_text(x) for x in v) + "]"
    return str(v)


def evidence_lines(result: CheckResult) -> List[str]:
    lines = []
    for key, value in result.evidence.items():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            lines.append(f"    {key}:")
            lines.extend(f"      {_value_text(item)}" for item in value)
        else:
            lines.append(f"    {key}: {_value_text(value)}")
    return lines


def render_text(results: Sequence[CheckResult], color: bool = False) -> str:
    """A tabulate table (id, status, title, summary), then the evidence of
    every FAIL and WARN, one line per item, with the reviewer's point."""
    def status(s: str) -> str:
        return f"{_ANSI[s]}{s}{_ANSI_RESET}" if color else s

    rows = [[r.id, status(r.status), r.title, r.summary] for r in results]
    text = tabulate(rows, headers=["id", "status", "check", "summary"], tablefmt="simple",
                    disable_numparse=True, maxcolwidths=[None, None, 32, SUMMARY_WIDTH])
    out = [text]
    for r in results:
        if r.status not in (FAIL, WARN):
            continue
        out.append("")
        out.append(f"{r.id} {status(r.status)}: {r.summary}")
        if r.reviewer:
            out.append(f"    reviewer: {r.reviewer}")
        out.extend(evidence_lines(r))
    c = counts(results)
    out.append("")
    out.append(", ".join(f"{c[s]} {s}" for s in STATUSES) + (" - ok" if ok(results) else
                                                                  " - FAILED"))
    return "\n".join(out)
