"""gdbext's Python API, for scripts that run inside GDB (``gdb -x script.py``, ``python``).

The commands print; these functions return the same results as Python values: the
dictionaries the commands' ``--json`` prints (without the ``_hex`` strings, which only
JSON readers need). A check that FAILs is a result, never an exception; what the
user must fix (no target, no symbols, a bad address) raises ``gdbext.api.Error`` with
the one line the command would print.

    import gdbext.api as xen
    xen.syms("/path/to/xen-syms")
    xen.run_to("__efi64_mb2_start")
    report = xen.merge_check(predict=True)
    if not report["ok"]:
        print([c["id"] for c in report["checks"] if c["status"] == "FAIL"])
    print(hex(xen.walk("efi_multiboot2")["pa"]))

Inside GDB only (it imports ``gdb``); importing it registers gdbext's commands.
"""

from __future__ import annotations

import os
from typing import Iterable, Optional

from .core.errors import GdbextError as Error
from .core.mb2session import SessionOptions
from .core.merge_here import CheckRequest
from .gdb_layer.registry import install
from .gdb_layer.boot_session import BootSession
from .gdb_layer.commands.xen import info as _info
from .gdb_layer.context import CONTEXT, RootChoice
from .gdb_layer.merge_live import check_here
from .gdb_layer.reports import RangeFilter, pa2va_report, ranges_report, walk_report
from .gdb_layer.run_to import run_to as _run_to

__all__ = ["Error", "syms", "locate", "info", "run_to", "walk", "ranges", "pa2va",
           "merge_check", "mb2_session"]

install()


def _tuple(values: Optional[Iterable[str]]):
    if values is None:
        return None
    return (values,) if isinstance(values, str) else tuple(values)


def syms(path: Optional[str] = None) -> dict:
    """Load Xen's symbols (xen-syms or an nm-format .map); without a path, what is
    loaded. Returns path, version, build_id, virt_start, image range, symbol count."""
    s = CONTEXT.load_syms(os.path.expanduser(path)) if path else CONTEXT.require_syms()
    return {"path": str(s.path), "version": s.version,
            "build_id": getattr(s, "build_id_hex", None), "virt_start": s.virt_start,
            "image_start": s.image_start, "image_end": s.image_end, "symbols": len(s),
            "load_base": CONTEXT.xen.load_base}


def locate(base: Optional[int] = None, scan: bool = False) -> dict:
    """xen-locate: find Xen's load base B (or take ``base``), check the build-id."""
    return CONTEXT.locate(base, scan_only=scan)


def info() -> dict:
    """xen-info: version, build-ids, B and its source, where RIP is in the boot, CR3."""
    return _info(CONTEXT)


def run_to(symbol: str, timeout: float = 120.0, base: Optional[int] = None,
           reset: bool = True) -> dict:
    """xen-run-to: continue until Xen executes ``symbol``."""
    return _run_to(CONTEXT, symbol, timeout, base, allow_reset=reset)


def walk(address: str, root: str = "cr3", mode: Optional[str] = None) -> dict:
    """xen-va2pa: the walk of ``address`` (a number, a GDB expression or a Xen symbol)."""
    return walk_report(CONTEXT, str(address), RootChoice(root, mode)).as_dict()


def ranges(root: str = "cr3", mode: Optional[str] = None, lo: Optional[str] = None,
           hi: Optional[str] = None, writable: bool = False, executable: bool = False,
           wx: bool = False, user: bool = False, limit: int = 0,
           follow_cycles: bool = True) -> dict:
    """xen-pt: the coalesced ranges (with their notes) from ``root``."""
    keep = RangeFilter(writable, executable, wx, user)
    return ranges_report(CONTEXT, RootChoice(root, mode),
                         None if lo is None else str(lo), None if hi is None else str(hi),
                         keep, limit, follow_cycles).as_dict()


def pa2va(pa: str, root: str = "cr3", mode: Optional[str] = None) -> dict:
    """xen-pa2va: every VA that maps ``pa`` (a number, an expression or SYMBOL@pa)."""
    return pa2va_report(CONTEXT, str(pa), RootChoice(root, mode)).as_dict()


def merge_check(predict: bool = False, assume_relocated: bool = False,
                only: Optional[Iterable[str]] = None, skip: Optional[Iterable[str]] = None,
                table: Optional[int] = None, firmware_root: Optional[int] = None) -> dict:
    """xen-l4merge-check: the checks I0-I13 where the guest is stopped. ``["ok"]`` says
    whether any FAILed; FAILs never raise."""
    return check_here(CONTEXT, CheckRequest(predict=predict,
                                            assume_relocated=assume_relocated,
                                            only=_tuple(only), skip=_tuple(skip),
                                            table=table, firmware_root=firmware_root))


def mb2_session(stops: Iterable[str] = (), skip_stops: Iterable[str] = (),
                only: Iterable[str] = (), skip: Iterable[str] = (), predict: bool = False,
                assume_relocated: bool = False, keep_going: bool = False,
                timeout: float = 120.0) -> dict:
    """xen-mb2-break --batch: from the entry through every planned stop; the session's
    result (stops reached, their records and checks, counts, ``ok``, ``error``)."""
    options = SessionOptions(stops=tuple(stops), skip_stops=tuple(skip_stops),
                             only=tuple(only), skip=tuple(skip), predict=predict,
                             assume_relocated=assume_relocated, keep_going=keep_going,
                             timeout=timeout, json=True)
    session = BootSession(CONTEXT, CONTEXT.require_syms(), options, who="gdbext.api")
    if CONTEXT.boot_session is not None:
        CONTEXT.boot_session.finish()
    CONTEXT.boot_session = session
    session.start(timeout, announce=False)
    return session.run_batch()
