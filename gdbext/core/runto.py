"""Where ``xen-run-to`` plants its breakpoints, and what a stop there means.

Before ``__high_start`` Xen runs at its load address B + offset(symbol), and B
is chosen by the boot loader at run time. Under QEMU TCG breakpoints live in
QEMU, so they can be planted before GRUB has loaded Xen, but each one slows
the whole guest (measured: 48 breakpoints cost 1.6 s of a 5 s boot, 510 cost
62 s), and GRUB copies the image to its final place only as it jumps, so
polling memory for it does not work either. The plan is therefore:

* the likeliest load bases: GRUB honours the multiboot2 RELOCATABLE tag's
  "prefer high" and allocates top-down, so the top candidates below the
  highest RAM under 4 GiB;
* the symbol's linked address (code after ``__high_start`` runs there);
* a sentinel at ``__high_start``: if Xen gets there first, the guess missed;
  B is then read from ``xen_phys_start`` and the machine may be reset and
  stopped on the next boot with a single breakpoint at B + offset(symbol).

Every stop is believed only if the bytes at RIP equal the ELF's bytes there.
The GDB layer drives the guest; the decisions are these pure functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from . import bootstops, xenimage

# Bytes compared at a candidate stop: enough to make a chance match impossible.
VERIFY_BYTES = xenimage.CODE_VERIFY_BYTES
# How many of the likeliest load bases get a breakpoint (see the module doc).
TOP_CANDIDATES = 32
SENTINEL_SYMBOL = "__high_start"
# xen.efi (started by the firmware at efi_start) has no __high_start on its path: from
# efi_start's code it switches to its own tables and jumps to __start_xen.
EFI_SENTINEL_SYMBOL = "__start_xen"
# Below 4 GiB: GRUB's multiboot2 loader places the image under the tag's max_addr.
LOW_4G = 1 << 32

# What a stop at one of the plan's addresses is.
HIT_TARGET = "target"          # the symbol, bytes verified
HIT_SENTINEL = "sentinel"      # __high_start first: the load base was missed
HIT_FALSE = "false"            # a planted address whose bytes are not the symbol's (yet)
HIT_ELSEWHERE = "elsewhere"    # not a planted address: the user's breakpoint, a signal


@dataclass
class RunToPlan:
    symbol: str
    linked_va: int
    offset: int
    expected: bytes                  # the ELF's bytes at the symbol
    sentinel: Optional[int]          # __high_start's linked VA, if planted
    base_by_address: Dict[int, int]  # load-address breakpoint -> the load base it assumes

    @property
    def addresses(self) -> List[int]:
        """Every address to plant: the linked VA, the load-address guesses, the sentinel."""
        spots = [self.linked_va] + [a for a in self.base_by_address if a != self.linked_va]
        if self.sentinel is not None and self.sentinel not in spots:
            spots.append(self.sentinel)
        return spots

    @property
    def candidates(self) -> int:
        return len(self.base_by_address)


def ram_top_below_4g(main_ram: Sequence[Tuple[int, int]]) -> int:
    """The highest RAM address under 4 GiB (4 GiB if QEMU cannot tell)."""
    tops = [min(end, LOW_4G) for start, end in main_ram if start < LOW_4G]
    return max(tops) if tops else LOW_4G


def sentinel_symbol(syms) -> str:
    """The first code at the linked address, where a missed load-address stop is noticed:
    __high_start on the multiboot2 path, __start_xen for xen.efi's layout."""
    return EFI_SENTINEL_SYMBOL if getattr(syms, "efi_layout", False) else SENTINEL_SYMBOL


def plan(syms, symbol: str, bases: Sequence[int], with_sentinel: bool = True) -> RunToPlan:
    """Breakpoints for ``symbol`` assuming one of ``bases`` (and at its linked VA)."""
    linked = syms.linked_va(symbol)
    offset = syms.offset(symbol)
    sentinel_name = sentinel_symbol(syms)
    sentinel = (syms.linked_va(sentinel_name)
                if with_sentinel and sentinel_name in syms else None)
    return RunToPlan(symbol, linked, offset, syms.read_linked(linked, VERIFY_BYTES), sentinel,
                     {b + offset: b for b in bases})


def first_plan(syms, symbol: str, load_base: Optional[int], main_ram) -> RunToPlan:
    """The known load base alone, or the likeliest ones below the top of RAM."""
    if load_base is not None:
        return plan(syms, symbol, [load_base])
    top = ram_top_below_4g(main_ram)
    # The firmware's PE loader (xen.efi) allocates top-down too, but below what it uses
    # itself: a miss costs one more boot (the sentinel learns B), and planting every one
    # of the hundreds of 2 MiB bases would slow the whole boot far more (module doc).
    return plan(syms, symbol, syms.load_base_candidates(top)[:TOP_CANDIDATES])


def classify_hit(p: RunToPlan, rip: int, code_at_rip: bytes) -> str:
    """What a stop at ``rip`` means for the plan (``code_at_rip``: the bytes there)."""
    if rip not in p.addresses:
        return HIT_ELSEWHERE
    if rip == p.sentinel and rip != p.linked_va:
        return HIT_SENTINEL
    if code_at_rip == p.expected:
        return HIT_TARGET
    return HIT_FALSE


def runs_only_at_load_address(syms, symbol: str) -> bool:
    """Code that runs before ``__high_start`` and never again: head.S (its local
    symbols come from head.o) and the EFI boot-services functions ``efi_*``.
    Missing such a stop means booting again; anything else can still be met at
    its linked address later in the same boot."""
    sym = syms.lookup(symbol)
    return bool(sym.file and sym.file.endswith("head.o")) or symbol.startswith("efi_")


def missed_base_from(raw: bytes) -> int:
    """B from the 8 bytes of xen_phys_start read at __high_start (0: unreadable)."""
    return int.from_bytes(raw, "little") if len(raw) == 8 else 0


ENTRY_SYMBOL = "__efi64_mb2_start"   # Xen's first instruction on the multiboot2+EFI path

# Where the symbol lies from the CPU's current place in this boot.
BEHIND = "behind"      # it ran already and never runs again in this boot: boot again
UNKNOWN = "unknown"    # cannot tell (continue; the sentinel tells later)


def where_from_here(syms, symbol: str, rip: Optional[int], load_base: Optional[int]) -> str:
    """Whether continuing can reach ``symbol`` from RIP, for code that runs only at its
    load address: behind once Xen runs at its linked addresses from __high_start on,
    and behind anywhere in the image at the load address past Xen's first instruction
    when the symbol is that first instruction (the multiboot2+EFI entry)."""
    if rip is None or not runs_only_at_load_address(syms, symbol):
        return UNKNOWN
    if syms.in_image(rip):
        # At a linked address: from __high_start on (not the RFC's call at the linked VA).
        return BEHIND if bootstops.past_high_start(syms, rip) else UNKNOWN
    if load_base is None:
        return UNKNOWN
    here = rip - load_base
    image = (syms.offset(syms.image_start), syms.offset(syms.image_end))
    if not image[0] <= here < image[1]:
        return UNKNOWN
    if symbol == ENTRY_SYMBOL and here != syms.offset(symbol):
        return BEHIND         # anywhere else in the image, the entry has run
    return UNKNOWN


# Why a 'continue' that gdbext drove ended. A stop is recognised by what GDB's stop
# event says fired, never by RIP alone or by how long it took: under load a slow stub
# can report a stray SIGINT stop at the very breakpoint the guest was resumed from
# (see gdb_layer/context.py, raise_remote_timeout), and RIP then equals a planted
# address although nothing fired.
STOP_PLANTED = "planted"    # one of the planted breakpoints fired, at RIP
STOP_TIMEOUT = "timeout"    # the wait's own interrupt stopped the guest
STOP_FOREIGN = "foreign"    # anything else: the user's breakpoint or Ctrl-C, a signal
STOP_FAULT = "fault"        # a fault-catching breakpoint fired (an exception handler, or
                            # one of Xen's fatal paths): the guest crashed


@dataclass(frozen=True)
class StopFacts:
    """What GDB said about a stop, in plain values."""
    rip: int
    planted_fired: Tuple[int, ...] = ()   # addresses of planted breakpoints the event names
    other_fired: Tuple[int, ...] = ()     # numbers of other breakpoints the event names
    signal: Optional[str] = None          # the stop's signal ("SIGINT"), if it was one
    timer_fired: bool = False             # the wait's own timer sent its interrupt
    had_event: bool = True                # GDB reported a stop event at all
    fault_fired: Tuple[int, ...] = ()     # addresses of fault-catching breakpoints it names


def classify_stop(facts: StopFacts) -> str:
    """Which of STOP_FAULT, STOP_PLANTED, STOP_TIMEOUT, STOP_FOREIGN the stop is.

    A fault-catching breakpoint that fired at RIP wins over everything: the guest is
    in an exception handler (or Xen's fatal path) whatever else was awaited."""
    if facts.rip in facts.fault_fired:
        return STOP_FAULT
    if facts.rip in facts.planted_fired:
        return STOP_PLANTED
    if facts.timer_fired and facts.signal == "SIGINT" and not facts.other_fired:
        return STOP_TIMEOUT
    return STOP_FOREIGN


def foreign_stop_text(facts: StopFacts, what: str) -> str:
    """One line for a stop that none of the planted breakpoints made."""
    if not facts.had_event:
        why = "no stop event"
    elif facts.other_fired:
        why = "breakpoint " + ", ".join(str(n) for n in facts.other_fired)
    elif facts.signal:
        why = f"signal {facts.signal}"
    else:
        why = "a stop gdbext did not plant"
    return (f"stopped at {facts.rip:#x} ({why}) while waiting for {what}: none of the "
            "planted breakpoints fired; the guest stays stopped there")
