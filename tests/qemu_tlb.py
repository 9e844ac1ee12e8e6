"""QEMU 7.2's ``info tlb`` (x86-64), a test oracle: one line per leaf,
"VA: PA FLAGS", FLAGS being nine columns X G P D A C T U W (XD/NX, global,
PS = a large page, dirty, accessed, PCD, PWT, user, writable) or '-'.

The flags are the leaf entry's own bits (QEMU's monitor.c print_pte), not
AND/OR-ed across levels as ``info mem`` and a walk's effective attributes are.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List

_TLB_LINE = re.compile(r"^([0-9a-fA-F]{16}): ([0-9a-fA-F]{16}) ([-X])([-G])([-P])([-D])([-A])"
                       r"([-C])([-T])([-U])([-W])$")


@dataclass(frozen=True)
class TlbLeaf:
    va: int
    pa: int
    nx: bool
    global_: bool
    large: bool       # PS: a 2 MiB or 1 GiB page (the line does not say which)
    user: bool
    writable: bool


def parse_info_tlb(text: str) -> List[TlbLeaf]:
    out = []
    for line in text.splitlines():
        m = _TLB_LINE.match(line.strip())
        if m:
            g = m.groups()
            out.append(TlbLeaf(int(g[0], 16), int(g[1], 16), g[2] == "X", g[3] == "G",
                               g[4] == "P", g[9] == "U", g[10] == "W"))
    return out
