"""Parsers for QEMU's human-monitor output, reached through the gdbstub's ``monitor``.

``info mtree -f`` tells which physical addresses are RAM or ROM: QEMU 7.2's
physical-mode gdbstub reads unbacked addresses as zeros without an error, so
the backend checks table addresses against this map; ``xp`` is its fallback
physical reader; ``info registers`` gives the registers by name.  (``info mem``
and ``gva2gpa``, which only the tests compare walks against, are parsed in
``tests/oracles.py``.)
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

_MTREE_LINE = re.compile(
    r"^\s*([0-9a-fA-F]+)-([0-9a-fA-F]+) \(prio -?\d+, ([a-z/-]+)\): (\S+)")
_AS_LINE = re.compile(r'^\s*AS "([^"]+)"')

READABLE_KINDS = ("ram", "rom", "romd")


@dataclass(frozen=True)
class MemRegion:
    start: int
    end: int          # exclusive
    kind: str         # ram, rom, romd, i/o, ...
    name: str


def parse_mtree_flat(text: str, address_space: str = "memory") -> List[MemRegion]:
    """Regions of the FlatView that serves ``address_space`` (the CPU's physical
    memory is AS "memory"). QEMU numbers its FlatViews in no stable order, so the
    view is found by the address spaces listed under its header."""
    views: List[Tuple[List[str], List[MemRegion]]] = []
    for line in text.splitlines():
        if line.startswith("FlatView"):
            views.append(([], []))
            continue
        if not views:
            continue
        m = _AS_LINE.match(line)
        if m:
            views[-1][0].append(m.group(1))
            continue
        m = _MTREE_LINE.match(line)
        if m:
            views[-1][1].append(MemRegion(int(m.group(1), 16), int(m.group(2), 16) + 1,
                                          m.group(3), m.group(4)))
    for names, regions in views:
        if address_space in names:
            return regions
    return []


class MemoryMap:
    """Which physical addresses can hold page tables (RAM and ROM)."""

    def __init__(self, regions: Sequence[MemRegion]):
        readable = sorted((r.start, r.end) for r in regions if r.kind in READABLE_KINDS)
        merged: List[Tuple[int, int]] = []
        for start, end in readable:
            if merged and start <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], end))
            else:
                merged.append((start, end))
        self.ranges = merged
        self._starts = [s for s, _ in merged]

    def contains(self, pa: int, size: int = 1) -> bool:
        i = bisect.bisect_right(self._starts, pa) - 1
        return i >= 0 and pa + size <= self.ranges[i][1]

    @property
    def ram_top(self) -> int:
        return self.ranges[-1][1] if self.ranges else 0


def main_ram(regions: Sequence[MemRegion]) -> List[Tuple[int, int]]:
    """The guest's main RAM (QEMU's 'pc.ram' on pc/q35), without VRAM, ROM or flash.

    Boot loaders place kernels here; the other readable regions are devices."""
    ram = [r for r in regions if r.kind == "ram"]
    main = [r for r in ram if r.name == "pc.ram"] or ram
    return sorted((r.start, r.end) for r in main)


# ``xp /Ngx PA``: "000000003f801000: 0x000000003f802023 0x..." (two qwords a line).
_XP_LINE = re.compile(r"^([0-9a-fA-F]+):((?:\s+0x[0-9a-fA-F]+)+)\s*$")
# ``info registers``: "RAX=0000000000000000 ... CR0=80010033 ..." (hex, no 0x).
_REGISTER = re.compile(r"\b([A-Z][A-Z0-9]*)\s*=([0-9a-fA-F]{8,16})\b")


def parse_xp_qwords(text: str) -> List[int]:
    """``xp /Ngx PA``: the qwords in order; lines that are not data are skipped (the
    caller checks it got as many as it asked for)."""
    words: List[int] = []
    for line in text.splitlines():
        m = _XP_LINE.match(line.strip())
        if m:
            words.extend(int(w, 16) for w in m.group(2).split())
    return words


def parse_xp_lines(text: str) -> List[Tuple[int, List[int]]]:
    """``xp /Ngx PA``: [(address, [qwords])] per data line, as printed (the backend
    checks the addresses are the ones it asked for)."""
    out: List[Tuple[int, List[int]]] = []
    for line in text.splitlines():
        m = _XP_LINE.match(line.strip())
        if m:
            out.append((int(m.group(1), 16), [int(w, 16) for w in m.group(2).split()]))
    return out


def parse_info_registers(text: str) -> Dict[str, int]:
    """``info registers``: every NAME=hex value, by lower-case name (rip, cr3, efer, ...)."""
    return {name.lower(): int(value, 16) for name, value in _REGISTER.findall(text)}


# ``info registers``: "GDT=     000000003f5db000 00000047" and "IDT=     ..." (base, limit);
# the NAME=hex pattern above does not match them (spaces after the '=').
_DESCRIPTOR_TABLE = re.compile(r"\b([GI]DT)=\s*([0-9a-fA-F]{8,16})\s+([0-9a-fA-F]{1,8})\b")


def parse_descriptor_tables(text: str) -> Dict[str, Tuple[int, int]]:
    """``info registers``: {"idt": (base, limit), "gdt": (base, limit)}, those present."""
    return {name.lower(): (int(base, 16), int(limit, 16))
            for name, base, limit in _DESCRIPTOR_TABLE.findall(text)}
