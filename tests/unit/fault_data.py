"""The captured crashes in tests/data (see tests/data/README.md for how they were made)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, List, Tuple

from gdbext.core import fwdump
from gdbext.core.memory import SyntheticMemory
from gdbext.core.qemu import parse_descriptor_tables, parse_info_registers, parse_xp_qwords

DATA = Path(__file__).resolve().parent.parent / "data"
RFC = DATA / "rfc-crash"
PRINTERR = DATA / "printerr-crash"


def text(path: Path) -> str:
    return path.read_text()


def dump(crash: Path) -> fwdump.FirmwareDump:
    d = fwdump.last_exception_dump(text(crash / "serial.log"))
    assert d is not None, crash
    return d


def registers(crash: Path, which: str = "handler") -> Dict[str, int]:
    return parse_info_registers(text(crash / f"{which}-registers.txt"))


def tables(crash: Path, which: str = "handler") -> Dict[str, Tuple[int, int]]:
    return parse_descriptor_tables(text(crash / f"{which}-registers.txt"))


def stack(crash: Path) -> Tuple[int, int, List[int]]:
    """(RSP, its PA, the qwords at RSP) at the handler's first instruction."""
    raw = text(crash / "handler-stack.txt")
    m = re.match(r"RSP=(0x[0-9a-f]+) PA=(0x[0-9a-f]+)", raw)
    return int(m.group(1), 16), int(m.group(2), 16), parse_xp_qwords(raw)


def load_base(crash: Path) -> int:
    return json.loads(text(crash / ("entry-run.json" if crash == RFC else "run.json")))[
        "load_base"]


def memory_slices(crash: Path) -> SyntheticMemory:
    mem = SyntheticMemory(1 << 32)
    for s in json.loads(text(crash / "find-image-memory.json"))["slices"]:
        mem.write(int(s["pa"], 16), bytes.fromhex(s["hex"]))
    return mem
