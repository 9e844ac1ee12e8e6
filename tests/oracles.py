"""Oracles the tests compare the product against: QEMU monitor output that only
tests read (``info mem``, ``gva2gpa``), and xen-syms as binutils (``nm``, ``objdump``)
and pyelftools read it.  Importable from unit and integration tests
(``from ..oracles import ...``); the product's own monitor parsers are in
``gdbext/core/qemu.py``.
"""

from __future__ import annotations

import re
import struct
import subprocess
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

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


# -- xen-syms as binutils and pyelftools read it -------------------------------------------


def nm_table(path) -> Dict[str, Tuple[int, int, str]]:
    """name -> (value, size, type) from nm -S (plain names; first wins)."""
    out = subprocess.run(["nm", "-S", str(path)], capture_output=True, text=True,
                         check=True).stdout
    table: Dict[str, Tuple[int, int, str]] = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 4:
            table.setdefault(parts[3], (int(parts[0], 16), int(parts[1], 16), parts[2]))
        elif len(parts) == 3:
            table.setdefault(parts[2], (int(parts[0], 16), 0, parts[1]))
    return table


def objdump(path, start: int, stop: int) -> List[Tuple[int, str]]:
    """(address, AT&T text) of each instruction objdump -d decodes in [start, stop)."""
    out = subprocess.run(["objdump", "-d", "-w", "--no-show-raw-insn",
                          f"--start-address={start:#x}", f"--stop-address={stop:#x}", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return [(int(m.group(1), 16), m.group(2).strip()) for m in
            (re.match(r"^\s*([0-9a-f]+):\s+(.*)$", line) for line in out.splitlines()) if m]


def elf_qwords(path, va: int, size: int) -> List[int]:
    """The link-time qwords at [va, va+size) read from the ELF's section with pyelftools."""
    from elftools.elf.elffile import ELFFile
    with open(path, "rb") as f:
        elf = ELFFile(f)
        for sec in elf.iter_sections():
            if sec["sh_addr"] <= va < sec["sh_addr"] + sec["sh_size"] and sec["sh_type"] == \
                    "SHT_PROGBITS":
                data = sec.data()[va - sec["sh_addr"]:va - sec["sh_addr"] + size]
                return list(struct.unpack(f"<{size // 8}Q", data))
    raise AssertionError(f"{va:#x} in no section of {path}")


def message_table(path, nm=None) -> Tuple[str, int, List[Tuple[int, int]]]:
    """boot.c's ErrCodeToStr (PrintErrMesg's table of message pointers): its nm name,
    VA, and the (index, value) of its entries that hold a linked VA of the image."""
    nm = nm if nm is not None else nm_table(path)
    names = [n for n in nm if re.fullmatch(r"ErrCodeToStr(\.\d+)?", n)]
    assert len(names) == 1, names
    va, size, typ = nm[names[0]]
    assert typ in "dDrR" and size
    lo, hi = nm["__image_base__"][0], nm["_end"][0]
    vals = elf_qwords(path, va, size)
    return names[0], va, [(i, v) for i, v in enumerate(vals) if lo <= v < hi]


def table_read_sites(path, nm, function: str, table: str) -> Tuple[int, int, str]:
    """In ``function`` as objdump decodes it: (the ``lea <table>(%rip),%REG``'s address,
    the address and text of the first load indexed from %REG after it)."""
    start, size, _ = nm[function]
    rows = objdump(path, start, start + size)
    k, (lea_va, lea_text) = next((k, r) for k, r in enumerate(rows)
                                 if r[1].startswith("lea") and f"<{table}>" in r[1])
    reg = re.search(r",%(\w+)", lea_text.split("#")[0]).group(1)
    read_va, read_text = next(r for r in rows[k + 1:] if f"(%{reg}," in r[1])
    return lea_va, read_va, read_text
