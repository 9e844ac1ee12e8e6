"""The RFC's merged L4 ("call efi_multiboot2() at its linked address"): predict it,
check it, explain what is wrong.  Never imports ``gdb``.

The RFC (``rfc-efi-multiboot2-linked-address.txt``) builds a table M at
``__efi64_mb2_start``: the firmware L4's lower half (entries 0-255, copied from
%cr3), ``idle_pg_table``'s upper half (256-511) copied raw, then fills
``l2_xenmap``, ``l2_bootmap`` and ``l2_directmap`` with 2 MiB PSE+RWX entries,
switches CR3 to M and calls ``efi_multiboot2`` at its linked VA.

* ``predict_merge()`` computes M (and every byte the patch writes) on top of
  guest memory, without writing the guest; ``relocate=True`` first adds B to
  the pointers as Frediano's review asks.
* ``run_checks()`` evaluates the invariants I0-I13 of ``xen-boot-paging.md``
  on a ``MergeState`` and returns ``CheckResult`` objects (PASS / FAIL / WARN /
  SKIP with a reason, evidence, and the reviewer's point each one answers).
* ``results_as_dict()`` is the ``xen-l4merge-check --json`` contract and
  ``render_text()`` its text form.

All load-address arithmetic and pointer classes come from ``xenimage``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from . import x86
from .memory import PhysMemory
from .xenimage import LoadedXen

# --- statuses and the registry of checks ------------------------------------------

PASS = "PASS"
FAIL = "FAIL"
WARN = "WARN"
SKIP = "SKIP"
STATUSES = (PASS, FAIL, WARN, SKIP)

# The reviewers' points (the RFC thread), quoted short.
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

# Which checks mean something at each boot stop (bootstops names), for the
# step-by-step session.  Predict mode at "__efi64_mb2_start" runs them all.
CHECKS_AT_STOP: Dict[str, Tuple[str, ...]] = {
    "__efi64_mb2_start": ("I0", "I2"),
    "merge": CHECK_IDS,
    "call efi_multiboot2": ("I0", "I1", "I2", "I3", "I4", "I5", "I6", "I7", "I8", "I10",
                            "I11", "I12", "I13"),
    "efi_multiboot2": ("I6", "I7", "I13"),
    "efi_multiboot2 return": ("I1", "I13"),
    "x86_32_switch": (),
    "trampoline_setup": (),
    "trampoline cr3 load": ("I9",),
    "__high_start": ("I9",),
    "__start_xen": ("I9",),
}


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


# --- inputs -----------------------------------------------------------------------------

@dataclass
class MbiInfo:
    """What the checks need from the multiboot2 information (%rbx at entry)."""
    pa: int
    total_size: int
    efi64_system_table: Optional[int] = None     # tag 12
    efi64_image_handle: Optional[int] = None     # tag 20
    load_base_addr: Optional[int] = None         # tag 21: PA(_start) = B + 2 MiB
    cmdline_pa: Optional[int] = None             # tag 1 (string at tag + 8)
    tags: List[Tuple[int, int, int]] = field(default_factory=list)  # (type, pa, size)


@dataclass
class MergeState:
    """Everything the checks look at.  Unknown things are None / missing keys:
    the checks that need them SKIP with the reason."""
    syms: object                       # XenSymbols (or a map)
    load_base: int                     # B = PA(__image_base__)
    mem: PhysMemory                    # guest memory, or a Prediction's overlay
    regs: Dict[str, int] = field(default_factory=dict)  # cr0 cr3 cr4 efer rip rsp rax rbx ...
    firmware_root: Optional[int] = None  # F: the firmware L4's PA (CR3 at entry, masked)
    firmware_cr3: Optional[int] = None   # CR3 at entry as is (I0 checks its low bits)
    firmware_l4: Optional[bytes] = None  # F's 4096 bytes captured at __efi64_mb2_start
    merged_root: Optional[int] = None    # M's PA
    stop: Optional[str] = None           # bootstops name, or None
    maxphyaddr: int = x86.MAXPHYADDR_ARCH
    mbi: Optional[MbiInfo] = None        # parsed from %rbx when None and rbx is known


@dataclass
class WriteEntry:
    """One qword the patch changes (for reports and for --undo)."""
    pa: int
    old: int
    new: int
    name: Optional[str]                # "l2_xenmap+0x8", "M[261]", ...


@dataclass
class Prediction:
    """The merged table the RFC would build, on top of guest memory.

    ``mem`` is an overlay (SyntheticMemory with base=guest memory) holding every
    write; ``writes`` is exactly what the patch writes (PA -> bytes: M as a full
    page, other tables as runs of changed qwords); ``originals`` the bytes they
    replace (for --undo)."""
    mem: PhysMemory
    root: int                          # M's PA
    writes: Dict[int, bytes]
    originals: Dict[int, bytes]
    relocated: bool
    load_base: int
    firmware_root: int
    table_source: str                  # "efi_l4_bootmap", "l3_bootmap" or "given"
    entries: List[WriteEntry] = field(default_factory=list)


# --- the prediction ---------------------------------------------------------------------

def default_table_pa(xen: LoadedXen) -> Tuple[int, str]:
    """Where M goes: ``efi_l4_bootmap`` in a patched build, else ``l3_bootmap``."""
    raise NotImplementedError


def predict_merge(syms, mem: PhysMemory, load_base: int, firmware_root: int,
                  relocate: bool = False, table_pa: Optional[int] = None) -> Prediction:
    """Compute, without writing the guest, the table the RFC builds."""
    raise NotImplementedError


def parse_mbi(mem: PhysMemory, pa: int) -> MbiInfo:
    """Parse the multiboot2 information structure at ``pa``."""
    raise NotImplementedError


# --- checks -----------------------------------------------------------------------------

def run_checks(state: MergeState, only: Optional[Iterable[str]] = None,
               skip: Optional[Iterable[str]] = None) -> List[CheckResult]:
    """Evaluate I0..I13 (or ``only`` of them, minus ``skip``) in order."""
    raise NotImplementedError


def counts(results: Sequence[CheckResult]) -> Dict[str, int]:
    out = {s: 0 for s in STATUSES}
    for r in results:
        out[r.status] += 1
    return out


def ok(results: Sequence[CheckResult]) -> bool:
    """No FAIL (WARN and SKIP do not make a run fail)."""
    return not any(r.status == FAIL for r in results)


def results_as_dict(mode: str, stop: Optional[str], state: MergeState,
                    results: Sequence[CheckResult]) -> Dict[str, object]:
    """The ``xen-l4merge-check --json`` object (see the brief's contract)."""
    return {"mode": mode, "stop": stop, "load_base": state.load_base,
            "firmware_root": state.firmware_root, "table": state.merged_root,
            "checks": [r.as_dict() for r in results],
            "counts": counts(results), "ok": ok(results)}


def render_text(results: Sequence[CheckResult], color: bool = False) -> str:
    """A tabulate table (id, status, title, summary), then the evidence of
    every FAIL and WARN, one line per item."""
    raise NotImplementedError
