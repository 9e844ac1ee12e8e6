"""The bookkeeping of one ``xen-mb2-break`` session: which stops, where, in what order.

The session plants one breakpoint per stop of ``bootstops``' plan and reports
each stop as it is reached.  Which stops are wanted, which helper stop is
needed to learn ``trampoline_phys``, which address is which stop, what comes
next and what the session amounts to are decided here, on plain values; the
GDB layer (``gdb_layer/boot_session.py``) plants, continues, reads and prints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from . import bootstops, merge_catalog
from .bootstops import LOW, STOP_ORDER, BootStop, where_in_boot

# Registers every stop record carries.
STOP_REGISTERS = ("rip", "rsp", "cr0", "cr3", "cr4", "efer")
# Registers that say more at one stop: where x86_32_switch goes next (%r15),
# the load base trampoline_setup works from (%esi).
EXTRA_REGISTERS = {bootstops.SWITCH: ("r15",), bootstops.TRAMPOLINE_SETUP: ("rsi",)}
# Bytes compared at a stop: the ELF's bytes at the stop's instruction, so that
# a stop at a planted address that is not Xen's code is never reported.
VERIFY_BYTES = 16


@dataclass(frozen=True)
class SessionOptions:
    """What a session is asked to do (xen-mb2-break's options; the walkthrough's own)."""
    stops: Tuple[str, ...] = ()           # only these stops (empty: all)
    skip_stops: Tuple[str, ...] = ()
    only: Tuple[str, ...] = ()            # only these checks (empty: all that apply)
    skip: Tuple[str, ...] = ()
    predict: bool = False                 # at the entry, check the predicted merge
    assume_relocated: bool = False
    keep_going: bool = False              # batch: go on after a failed check
    timeout: float = 120.0                # the longest each wait may take
    json: bool = False
    color: bool = False                   # text reports coloured (a person's terminal)
    width: Optional[int] = None           # text reports fitted to this width


@dataclass
class SessionBook:
    """The plan of one session and what it has met so far."""
    plan: bootstops.StopPlan
    options: SessionOptions
    selected: List[BootStop] = field(init=False)
    helpers: List[BootStop] = field(init=False)
    load_base: Optional[int] = None
    trampoline_phys: Optional[int] = None
    looked_for_trampoline_phys: bool = False
    stop_by_address: Dict[int, BootStop] = field(default_factory=dict)
    records: List[dict] = field(default_factory=list)
    error: Optional[str] = None
    crash: Optional[dict] = None          # the guest crashed: where, and the explanation

    def __post_init__(self) -> None:
        o = self.options
        self.selected = self.plan.select(list(o.stops) or None, list(o.skip_stops) or None)
        # Validate --only/--skip now: a typo is one error line before anything runs.
        merge_catalog.select_checks(merge_catalog.CHECK_IDS, list(o.only) or None,
                                list(o.skip) or None)
        self.helpers = self._helpers()

    def _helpers(self) -> List[BootStop]:
        """A stop planted only to learn trampoline_phys: when the trampoline's stop
        is wanted and no wanted stop lies between efi_multiboot2's return and it."""
        low = [s for s in self.selected if s.kind == LOW]
        if not low or bootstops.EFI_MB2 not in self.plan.order:
            return []
        after = STOP_ORDER.index(bootstops.EFI_MB2)
        before = STOP_ORDER.index(low[0].name)
        if any(after < STOP_ORDER.index(s.name) < before for s in self.selected):
            return []
        for s in self.plan.stops:
            if after < STOP_ORDER.index(s.name) < before:
                return [s]
        return []

    def wanted(self, stop: BootStop) -> bool:
        return any(s.name == stop.name for s in self.selected)

    def wants_trampoline_phys(self) -> bool:
        return (self.trampoline_phys is None and self.plan.trampoline_phys_va is not None
                and any(s.kind == LOW for s in self.selected))

    def to_plant(self) -> Tuple[List[Tuple[int, BootStop]], List[str]]:
        """(address, stop) pairs to plant now (not yet planted), and the names still
        pending (their address is not known yet).  Records them as planted."""
        new, pending = [], []
        for stop in self.selected + self.helpers:
            if stop is self.plan.entry:
                continue
            addr = stop.address(self.load_base, self.trampoline_phys)
            if addr is None:
                pending.append(stop.name)
                continue
            if addr in self.stop_by_address:
                continue
            self.stop_by_address[addr] = stop
            new.append((addr, stop))
        return new, pending

    def stop_for(self, rip: int) -> Optional[BootStop]:
        if self.load_base is not None and rip == self.plan.stops[0].address(self.load_base):
            return self.plan.stops[0]
        return self.stop_by_address.get(rip)

    def after_efi_multiboot2(self, stop: BootStop) -> bool:
        if stop.name not in STOP_ORDER:   # xen.efi's path: no efi_multiboot2
            return False
        return STOP_ORDER.index(stop.name) > STOP_ORDER.index(bootstops.EFI_MB2)

    def registers_for(self, stop: BootStop) -> Tuple[str, ...]:
        return STOP_REGISTERS + EXTRA_REGISTERS.get(stop.name, ())

    def check_ids(self, stop: BootStop) -> Tuple[List[str], bool]:
        """(the checks to run at this stop, whether they judge the predicted merge)."""
        predict = bool(self.options.predict) and self.plan.predicts_at(stop)
        ids = merge_catalog.select_checks(self.plan.checks_for(stop, predict),
                                      list(self.options.only) or None,
                                      list(self.options.skip) or None)
        return ids, predict

    def symbolic(self, syms, stop: BootStop) -> str:
        """``name+0x12`` of the stop's instruction, saying where that copy runs."""
        name = syms.describe(stop.linked_va)
        if stop.kind == LOW:
            return f"{name} (trampoline copy at {self.trampoline_phys:#x})"
        if stop.kind == bootstops.LOAD:
            return f"{name} (load address)"
        return name

    def record(self, syms, stop: BootStop, rip: int, regs: Dict[str, int],
               changes: Dict[str, object], checks: dict,
               firmware_error: Optional[str]) -> dict:
        """The report of one stop, kept in ``records``."""
        rec = {
            "stop": stop.name, "rip": rip, "cr3": regs.get("cr3"),
            "kind": stop.kind, "symbol": self.symbolic(syms, stop),
            "where": where_in_boot(syms, self.load_base, rip, self.trampoline_phys),
            "registers": regs, "changes": changes, "checks": checks["checks"],
            "counts": counts(checks["checks"]), "error": checks["error"] or firmware_error,
        }
        for key in ("mode", "note"):
            if key in checks:
                rec[key] = checks[key]
        self.records.append(rec)
        return rec

    def more_to_come(self) -> bool:
        """Whether a wanted stop lies ahead (after the last one reported)."""
        if not self.selected:
            return False
        if not self.records:
            return any(s is not self.plan.entry for s in self.selected)
        return self.records[-1]["stop"] != self.selected[-1].name

    def next_name(self) -> str:
        done = {r["stop"] for r in self.records}
        for s in self.selected:
            if s.name not in done:
                return s.name
        return "the next stop"

    def last_reached(self) -> bool:
        return bool(self.records) and self.records[-1]["stop"] == self.selected[-1].name

    def record_crash(self, crash: dict, rip: Optional[int]) -> dict:
        """The guest crashed (``crash``: GuestCrashed.as_dict()) after the stops reached:
        the session ends there; the crash says between which stops it happened, and
        where the guest is stopped now (``stopped_at``: the handler, or the fatal path)."""
        rec = dict(crash, stopped_at=rip,
                   after=self.records[-1]["stop"] if self.records else None,
                   waiting_for=self.next_name() if self.more_to_come() else None)
        self.crash = rec
        self.error = crash.get("summary") or "the guest crashed"
        return rec

    def result(self) -> dict:
        all_checks = [c for r in self.records for c in r["checks"]]
        reached = [r["stop"] for r in self.records]
        errors = [r["error"] for r in self.records if r.get("error")]
        error = self.error or (errors[0] if errors else None)
        tally = counts(all_checks)
        notes = list(self.plan.notes)
        never = [s.name for s in self.selected
                 if s.address(self.load_base, self.trampoline_phys) is None]
        if never and self.looked_for_trampoline_phys:
            notes.append(f"never planted (trampoline_phys unknown): {', '.join(never)}")
        return {"load_base": self.load_base,
                "complete": reached == [s.name for s in self.selected],
                "reached": reached, "stops": self.records, "counts": tally,
                "ok": tally[merge_catalog.FAIL] == 0 and error is None, "error": error,
                "crash": self.crash, "notes": notes}


def counts(checks: Sequence[dict]) -> Dict[str, int]:
    return merge_catalog.tally(c["status"] for c in checks)


def failed(record: dict) -> bool:
    return any(c["status"] == merge_catalog.FAIL for c in record["checks"])


def failed_checks(result: dict) -> List[str]:
    return [f"{c['id']} at {r['stop']}" for r in result["stops"] for c in r["checks"]
            if c["status"] == merge_catalog.FAIL]
