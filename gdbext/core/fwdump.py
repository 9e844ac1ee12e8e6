"""The firmware's own exception dump on the serial console: EDK2's (OVMF's) CPU
exception handler prints it and then spins, so it is the oracle for a crash in
early boot (and, for a user, what the serial log already says).

    !!!! X64 Exception Type - 0E(#PF - Page-Fault)  CPU Apic ID - 00000000 !!!!
    ExceptionData - 0000000000000010  I:1 R:0 U:0 W:0 P:0 PK:0 SS:0 SGX:0
    RIP  - FFFF82D0403E6980, CS  - 0000000000000038, RFLAGS - 0000000000200246
    ...
    GDTR - 000000003F5DB000 0000000000000047, LDTR - 0000000000000000
    IDTR - 000000003F07B018 0000000000000FFF,   TR - 0000000000000000
    !!!! Find image based on IP(0x3D9DD5E8) (No PDB)  (ImageBase=..., EntryPoint=...) !!!!

For an instruction-fetch #PF the "Find image" IP is not RIP but the qword at RSP
(the return address of the call that jumped to the bad RIP).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

_HEADER = re.compile(r"!!!! (X64|IA32) Exception Type - ([0-9A-Fa-f]+)\(([^)]*)\)\s+"
                     r"CPU Apic ID - ([0-9A-Fa-f]+) !!!!")
_FIELD = re.compile(r"\b([A-Za-z][A-Za-z0-9_]*)\s+-\s+([0-9A-Fa-f]{8,16})\b"
                    r"(?:\s+([0-9A-Fa-f]{8,16})\b)?")
_FLAG = re.compile(r"\b([A-Z]+):([01])\b")
_IMAGE = re.compile(r"!!!! Find image based on IP\(0x([0-9A-Fa-f]+)\)\s*(.*?)\s*"
                    r"\(ImageBase=([0-9A-Fa-f]+), EntryPoint=([0-9A-Fa-f]+)\) !!!!")
_NO_IMAGE = "!!!! Can't find image information. !!!!"
NO_PDB = "(No PDB)"
# Fields printed as "NAME - base limit".
DESCRIPTOR_TABLES = ("GDTR", "IDTR")


@dataclass
class FirmwareDump:
    vector: int
    type_text: str                  # "#PF - Page-Fault"
    apic_id: int
    exception_data: Optional[int] = None
    error_flags: Dict[str, bool] = field(default_factory=dict)   # I, R, U, W, P, PK, SS, SGX
    registers: Dict[str, int] = field(default_factory=dict)      # "rip", "cr2", "rax", ...
    tables: Dict[str, Tuple[int, int]] = field(default_factory=dict)  # "idtr": (base, limit)
    image_ip: Optional[int] = None
    image_base: Optional[int] = None
    image_entry: Optional[int] = None
    pdb: Optional[str] = None       # None: "(No PDB)" or no image line
    image_found: Optional[bool] = None   # False: "Can't find image information"

    @property
    def rip(self) -> Optional[int]:
        return self.registers.get("rip")

    @property
    def cr2(self) -> Optional[int]:
        return self.registers.get("cr2")

    @property
    def cr3(self) -> Optional[int]:
        return self.registers.get("cr3")

    @property
    def idtr(self) -> Optional[Tuple[int, int]]:
        return self.tables.get("idtr")

    def as_dict(self) -> Dict[str, object]:
        return {"vector": self.vector, "type": self.type_text, "apic_id": self.apic_id,
                "exception_data": self.exception_data, "error_flags": dict(self.error_flags),
                "registers": dict(self.registers),
                "tables": {k: list(v) for k, v in self.tables.items()},
                "image_ip": self.image_ip, "image_base": self.image_base,
                "image_entry": self.image_entry, "pdb": self.pdb,
                "image_found": self.image_found}


def parse_exception_dumps(text: str) -> List[FirmwareDump]:
    """Every exception dump in a serial log, in order (a line may carry other output
    before the '!!!!', e.g. what the crashing code printed without a newline)."""
    dumps: List[FirmwareDump] = []
    cur: Optional[FirmwareDump] = None
    for line in text.splitlines():
        m = _HEADER.search(line)
        if m:
            cur = FirmwareDump(int(m.group(2), 16), m.group(3), int(m.group(4), 16))
            dumps.append(cur)
            continue
        if cur is None:
            continue
        m = _IMAGE.search(line)
        if m:
            cur.image_ip = int(m.group(1), 16)
            pdb = m.group(2).strip()
            cur.pdb = None if pdb == NO_PDB or not pdb else pdb
            cur.image_base = int(m.group(3), 16)
            cur.image_entry = int(m.group(4), 16)
            cur.image_found = True
            cur = None          # the image line ends the dump
            continue
        if _NO_IMAGE in line:
            cur.image_found = False
            cur = None
            continue
        for name, value, second in _FIELD.findall(line):
            if name == "ExceptionData":
                cur.exception_data = int(value, 16)
            elif name in DESCRIPTOR_TABLES and second:
                cur.tables[name.lower()] = (int(value, 16), int(second, 16))
            else:
                cur.registers[name.lower()] = int(value, 16)
        if "ExceptionData" in line:
            cur.error_flags = {k: v == "1" for k, v in _FLAG.findall(line)}
    return dumps


def last_exception_dump(text: str) -> Optional[FirmwareDump]:
    dumps = parse_exception_dumps(text)
    return dumps[-1] if dumps else None
