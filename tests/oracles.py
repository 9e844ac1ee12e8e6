"""Oracles the tests compare the product against: QEMU monitor output that only
tests read (``info mem``, ``gva2gpa``).  Importable from unit and integration
tests (``from ..oracles import ...``); the product's own monitor parsers are in
``gdbext/core/qemu.py``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List, Optional

_INFO_MEM_LINE = re.compile(r"^([0-9a-fA-F]+)-([0-9a-fA-F]+) ([0-9a-fA-F]+) ([-u])([-r])([-w])$")
_GVA2GPA = re.compile(r"^gpa:\s*(?:0x)?([0-9a-fA-F]+)\s*$")


@dataclass(frozen=True)
class InfoMemRange:
    va: int
    end: int
    user: bool
    writable: bool


def parse_info_mem(text: str) -> List[InfoMemRange]:
    """``info mem``: coalesced ranges with user/write ANDed across levels, no NX."""
    out = []
    for line in text.splitlines():
        m = _INFO_MEM_LINE.match(line.strip())
        if m:
            out.append(InfoMemRange(int(m.group(1), 16), int(m.group(2), 16),
                                    m.group(4) == "u", m.group(6) == "w"))
    return out


def parse_gva2gpa(text: str) -> Optional[int]:
    """``gva2gpa VA``: the PA, or None for 'Unmapped'."""
    for line in text.splitlines():
        m = _GVA2GPA.match(line.strip())
        if m:
            return int(m.group(1), 16)
    return None
