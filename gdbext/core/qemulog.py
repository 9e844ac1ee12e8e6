"""QEMU's ``-d int,cpu_reset -D FILE`` log (TCG only): every exception and interrupt the
CPU took, with its state, and the triple fault that resets it. The one record of a
triple fault's exception chain: the gdbstub reports only that the machine stopped.

    check_exception old: 0xffffffff new 0xe
       354: v=0e e=0010 i=0 cpl=0 IP=0038:000000003d9dd531 pc=... SP=0030:... CR2=...
    RAX=... (the CPU state, as 'info registers' prints it)
    check_exception old: 0xe new 0xe        <- a #PF while delivering the #PF: #DF
       355: v=08 e=0000 ...
    check_exception old: 0x8 new 0xe        <- a #PF while delivering #DF
    Triple fault
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from .qemu import parse_info_registers

_EVENT = re.compile(r"^\s*(\d+): v=([0-9a-f]+) e=([0-9a-f]+) i=(\d) cpl=(\d) "
                    r"IP=([0-9a-f]+):([0-9a-f]+) pc=([0-9a-f]+) SP=([0-9a-f]+):([0-9a-f]+)"
                    r"(?: CR2=([0-9a-f]+))?")
_CHECK = re.compile(r"^check_exception old: 0x([0-9a-f]+) new 0x([0-9a-f]+)")
NO_EXCEPTION = 0xFFFFFFFF     # check_exception's "old" when no delivery was under way


@dataclass
class IntEvent:
    """One 'v=' record: an exception or interrupt being delivered."""
    number: int                 # QEMU's running count
    vector: int
    error_code: int
    software: bool              # i=1: INT n
    cpl: int
    cs: int
    rip: int
    ss: int
    rsp: int
    cr2: Optional[int]          # printed for #PF only
    registers: Dict[str, int] = field(default_factory=dict)


@dataclass
class CheckException:
    """An exception raised while ``old`` was being delivered (old = NO_EXCEPTION: none)."""
    old: int
    new: int


@dataclass
class TripleFault:
    pass


@dataclass
class CpuReset:
    pass


def parse_int_log(text: str) -> List[object]:
    """The events of a -d int,cpu_reset log in order; the register lines after a 'v='
    record are folded into it."""
    events: List[object] = []
    cur: Optional[IntEvent] = None
    for line in text.splitlines():
        m = _EVENT.match(line)
        if m:
            g = m.groups()
            cur = IntEvent(int(g[0]), int(g[1], 16), int(g[2], 16), g[3] == "1", int(g[4]),
                           int(g[5], 16), int(g[6], 16), int(g[8], 16), int(g[9], 16),
                           int(g[10], 16) if g[10] else None)
            events.append(cur)
            continue
        m = _CHECK.match(line)
        if m:
            events.append(CheckException(int(m.group(1), 16), int(m.group(2), 16)))
            cur = None
            continue
        if line.startswith("Triple fault"):
            events.append(TripleFault())
            cur = None
            continue
        if line.startswith("CPU Reset"):
            events.append(CpuReset())
            cur = None
            continue
        if cur is not None:
            cur.registers.update(parse_info_registers(line))
    return events


@dataclass
class TripleFaultChain:
    """The exceptions that ended in the last triple fault of a log."""
    steps: List[CheckException]     # in order; the first has old = NO_EXCEPTION
    first: Optional[IntEvent]       # the delivery record of the first exception

    @property
    def vectors(self) -> List[int]:
        return [s.new for s in self.steps]


def last_triple_fault(events: List[object]) -> Optional[TripleFaultChain]:
    """The chain of the last triple fault: the check_exception records back to the one
    that started with no delivery under way, and that exception's 'v=' record."""
    for end in range(len(events) - 1, -1, -1):
        if isinstance(events[end], TripleFault):
            break
    else:
        return None
    steps: List[CheckException] = []
    first = None
    for i in range(end - 1, -1, -1):
        e = events[i]
        if isinstance(e, CheckException):
            steps.insert(0, e)
            if e.old == NO_EXCEPTION:
                nxt = events[i + 1] if i + 1 < end else None
                first = nxt if isinstance(nxt, IntEvent) else None
                break
        elif isinstance(e, (TripleFault, CpuReset)):
            break
    return TripleFaultChain(steps, first)
