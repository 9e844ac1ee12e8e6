"""The catalog of the merge checks I0-I13: their ids and titles, the reviewer's
point each one answers, which apply at each boot stop, and the result record
with its statuses.  Never imports ``gdb``.

What each check computes is in ``merge_checks``; how results are shown (the
``--json`` contract and the text table) in ``merge_report``.  This module is
kept small so that the stop plan (``bootstops``) and the JUnit report can name
the checks without loading the checker.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from . import stopnames
from .errors import GdbextError

# --- statuses -----------------------------------------------------------------------

PASS = "PASS"
FAIL = "FAIL"
WARN = "WARN"
SKIP = "SKIP"
STATUSES = (PASS, FAIL, WARN, SKIP)

# --- the reviewers' points (the RFC thread), quoted short ----------------------------

ANDREW_CR3 = "Andrew: the merge copies the firmware L4 from %cr3 as is (mov %cr3,%rsi)"
ANDREW_FILL = "Andrew: map Xen into the higher mappings using 2M superpages"
ANDREW_CALL = ("Andrew: call efi_multiboot2 via the high mappings "
               "(efi_multiboot2 - __image_base__ + __XEN_VIRT_START)")
FREDIANO_ADJUST = ("Frediano: adjust the pointers already present in the half table "
                   "you are copying")
FREDIANO_BACK = ("Frediano: relocating could leave pointers that are not relocated back "
                 "(each pointer must get B exactly once)")
JAN_FIRMWARE_L4 = ("Jan: assumes firmware adds no L4 entries later "
                   "(Frediano: or restores %cr3)")
JAN_UPPER_HALF = "Jan: assumes firmware puts nothing in the upper half of the L4"
JAN_EBS = ("Jan: page tables are replaced before ExitBootServices(): the firmware's "
           "mappings must stay as they were")
JAN_RWX = "Jan: new RWX mappings, when the goal is to get rid of any such"
JAN_POINTERS = ("Jan: static pointers vs %rip-relative addresses: pointers made at the "
                "load address and at the linked address must not be mixed")


# --- the checks ----------------------------------------------------------------------

@dataclass(frozen=True)
class CheckInfo:
    """One invariant of the reference doc."""
    id: str
    title: str
    reviewer: Optional[str]


CHECKS: Dict[str, CheckInfo] = {c.id: c for c in (
    CheckInfo("I0", "long mode, CR3 low bits clear", ANDREW_CR3),
    CheckInfo("I1", "M lower half == firmware L4 lower half", JAN_FIRMWARE_L4),
    CheckInfo("I2", "firmware upper half empty", JAN_UPPER_HALF),
    CheckInfo("I3", "M upper half == idle_pg_table link value + B", FREDIANO_ADJUST),
    CheckInfo("I4", "upper-half pointers stay inside the loaded image", FREDIANO_ADJUST),
    CheckInfo("I5", "l2_xenmap maps the image at B", ANDREW_FILL),
    CheckInfo("I6", "efi_multiboot2's linked VA reaches its bytes", ANDREW_CALL),
    CheckInfo("I7", "identity kept for code, stack, MBI, EFI", JAN_EBS),
    CheckInfo("I8", "firmware maps the image present, writable, executable", None),
    CheckInfo("I9", "relocated exactly once at the trampoline", FREDIANO_BACK),
    CheckInfo("I10", "W+X leaves (which the merge added)", JAN_RWX),
    CheckInfo("I11", "l2_xenmap overreach past the image end", None),
    CheckInfo("I12", "M aligned, inside the image, outside __page_tables", None),
    CheckInfo("I13", "pointer provenance (load address vs linked VA)", JAN_POINTERS),
)}
CHECK_IDS: Tuple[str, ...] = tuple(CHECKS)

# The checks that decide whether the call of efi_multiboot2 at its linked VA
# can work (the relocated prediction must PASS all of them).
CALL_CHECKS: Tuple[str, ...] = ("I0", "I1", "I2", "I3", "I4", "I5", "I6", "I7", "I8", "I12")

# Which checks mean something at each boot stop of a live guest.  Predict mode
# (at the entry, or at the call of an unpatched build) runs them all.
CHECKS_AT_STOP: Dict[str, Tuple[str, ...]] = {
    # Firmware state; I2: the firmware's upper half, lost by a merge.
    stopnames.ENTRY: ("I0", "I2"),
    # CR3 is the merged L4 now; the l2 fills have not run yet.
    stopnames.MERGE: ("I0", "I1", "I2", "I3", "I4", "I12", "I13"),
    # Everything the call through the high mapping needs.
    stopnames.CALL: ("I0", "I1", "I2", "I3", "I4", "I5", "I6", "I7", "I8", "I10", "I11",
                     "I12", "I13"),
    stopnames.EFI_MB2: ("I0", "I6", "I7", "I13"),
    # The firmware may have added L4 entries during the call.
    stopnames.EFI_RETURN: ("I0", "I1", "I13"),
    stopnames.SWITCH: ("I0",),
    # 32-bit, paging off: no table is in use; the fix-ups are checked after.
    stopnames.TRAMPOLINE_SETUP: (),
    stopnames.TABLES_RELOCATED: ("I9",),
    stopnames.L2_XENMAP_FILLED: ("I5", "I11"),
    # Paging is still off at the trampoline's CR3 load (it is turned on after): no I0.
    stopnames.TRAMPOLINE_CR3: ("I5", "I9", "I11"),
    stopnames.HIGH_START: ("I0", "I9"),
    stopnames.START_XEN: ("I0", "I9"),
}


def select_checks(applicable: Sequence[str] = CHECK_IDS,
                  only: Optional[Iterable[str]] = None,
                  skip: Optional[Iterable[str]] = None) -> List[str]:
    """The check ids to run, in the order of ``applicable``: those of ``only``
    (every one when None), minus those of ``skip``.

    ``only`` and ``skip`` are ids in any case, as one string or a list, each
    item comma- or space-separated ("I3,I4", "i6 i0").  An id that is no check
    at all is a one-line error, even when it does not apply here."""
    def norm(ids: Iterable[str]) -> List[str]:
        out = []
        for i in ([ids] if isinstance(ids, str) else ids):
            for part in str(i).replace(",", " ").split():
                out.append(part.upper())
        return out
    want = norm(only) if only is not None else None
    drop = set(norm(skip)) if skip is not None else set()
    bad = [b for b in sorted(set(want or ()) | drop) if b not in CHECKS]
    if bad:
        raise GdbextError(f"unknown check {', '.join(bad)}; checks are I0..I13")
    return [c for c in applicable if (want is None or c in want) and c not in drop]


def select(only: Optional[Iterable[str]] = None, skip: Optional[Iterable[str]] = None
           ) -> List[str]:
    """``select_checks`` over every check, I0..I13 in order."""
    return select_checks(CHECK_IDS, only, skip)


# --- results -------------------------------------------------------------------------

@dataclass
class CheckResult:
    id: str
    title: str
    status: str                      # PASS / FAIL / WARN / SKIP
    summary: str                     # one line (the reason, for FAIL / WARN / SKIP)
    evidence: Dict[str, object] = field(default_factory=dict)  # ints stay ints
    reviewer: Optional[str] = None

    def as_dict(self) -> Dict[str, object]:
        return {"id": self.id, "title": self.title, "status": self.status,
                "summary": self.summary, "evidence": self.evidence,
                "reviewer": self.reviewer}


def result(cid: str, status: str, summary: str,
           evidence: Optional[Dict[str, object]] = None) -> CheckResult:
    """A result of check ``cid`` with its catalogued title and reviewer."""
    info = CHECKS[cid]
    return CheckResult(cid, info.title, status, summary, evidence or {}, info.reviewer)


def tally(statuses: Iterable[str]) -> Dict[str, int]:
    """PASS/FAIL/WARN/SKIP -> how many (the contract's "counts")."""
    out = {s: 0 for s in STATUSES}
    for status in statuses:
        out[status] += 1
    return out


def counts(results: Sequence[CheckResult]) -> Dict[str, int]:
    return tally(r.status for r in results)


def ok(results: Sequence[CheckResult]) -> bool:
    """No FAIL (WARN and SKIP do not make a run fail)."""
    return not any(r.status == FAIL for r in results)
