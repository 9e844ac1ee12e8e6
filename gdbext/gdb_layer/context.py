"""The one context of gdbext inside GDB: the target, Xen's state, the settings, the boot.

Everything gdbext keeps between two commands lives in ``CONTEXT``, and only here:

* ``target``: the backend over QEMU's gdbstub (registers, physical memory, its
  per-stop cache);
* ``xen``: Xen's symbols, the load base B and where it came from, the build-id
  verdict, what gdbext gave GDB's own symbol tables;
* ``settings``: ``set xen-maxphyaddr``, ``set xen-phys-read``, ``set
  xen-ignore-build-id`` (the parameters in settings.py write here);
* ``merge``: the firmware snapshot F and the journal of ``xen-l4merge-apply``
  (``core.merge_here.MergeRecord``), forgotten on a new boot;
* ``boot_session``: the running ``xen-mb2-break`` session, if any.

It also holds the helpers every command needs at a stop: ``require_loaded()``,
``situation()`` (what a paging command walks), ``translate()``, silent
breakpoints and ``continue_until()``.  The decisions themselves are the core's.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple

import gdb

from ..core import (bootstops, hang, locate, merge_catalog, merge_here, paging, piccheck,
                   runto, suggest, x86, xenimage)
from ..core.errors import GdbextError
from ..core.paging import MODES, PagingContext
from ..core.walknames import Situation
from ..core.xenimage import BuildIdCheck, LoadedXen
from ..core.xensyms import load_xen_syms
from .addresses import parse_address
from .backend import GdbTarget
from . import hang_watch
from .command import one_line
from .fault_catch import FaultCatcher
from .interrupt_timer import Timeout as _Timeout

CONTROL_REGISTERS = ("cr0", "cr3", "cr4", "efer")
# GDB's remote timeout while gdbext is loaded (see raise_remote_timeout).
MIN_REMOTE_TIMEOUT_S = 120
_U64 = (1 << 64) - 1
# --root values that walk the RFC's merged L4 as predicted (nothing written).
MERGE_ROOTS = {"merge": False, "merge-relocated": True}


@dataclass
class XenState:
    syms: Optional[object] = None
    load_base: Optional[int] = None
    load_base_source: str = ""
    # The build-id verdict for (syms, load_base); a match is kept, anything else re-read.
    build_id: Optional[BuildIdCheck] = None
    # What gdbext added to GDB's symbol tables: kind ("load", "linked") -> (path, offset).
    gdb_symbols: Dict[str, Tuple[str, int]] = field(default_factory=dict)
    loaded: Optional[LoadedXen] = None


@dataclass
class Settings:
    maxphyaddr: int = x86.MAXPHYADDR_ARCH
    phys_read: str = "auto"            # auto | packet | monitor-xp
    ignore_build_id: bool = False
    hang_wait: int = hang.DEFAULT_HANG_WAIT_S   # set xen-hang-wait (0: off)
    serial_log: str = ""               # set xen-serial-log: COM1's file (hang reports)
    qemu_int_log: str = ""             # set xen-qemu-int-log: QEMU's -d int log (triple faults)
    qmp_socket: str = ""               # set xen-qmp-socket: QEMU's QMP socket (resets)
    catch_faults: bool = True          # set xen-catch-faults (fault_catch.py)


@dataclass(frozen=True)
class RootChoice:
    """Which table a paging command walks: 'cr3', a PA expression, 'merge' or
    'merge-relocated'; and the paging mode to read it in (None: the CPU's)."""
    root: str = "cr3"
    mode: Optional[str] = None


def raise_remote_timeout() -> None:
    """Make GDB wait for a slow stub instead of sending its packets again.

    GDB waits ``remotetimeout`` seconds (default 2) for the stub's ack and then
    resends. QEMU's gdbstub (7.2) runs in QEMU's main loop; on a loaded machine, or
    with QEMU briefly stopped, it answers later than that and then handles every
    copy: GDB takes the first answer and resumes the guest, and the bytes that
    follow (the copies' acks) reach QEMU while the guest runs, which it takes as an
    interrupt and reports as a SIGINT stop wherever the guest is, often still at
    the breakpoint it was resumed from (seen: four copies of a Z0 packet, then
    "Program received signal SIGINT" at the unchanged RIP). With a long timeout
    only a stub silent for that long is retried; a stub that went away still ends
    the wait at once (its connection closes). A larger value the user set is kept."""
    try:
        current = int(gdb.parameter("remotetimeout"))
    except (gdb.error, TypeError, ValueError):
        current = 0
    if current < MIN_REMOTE_TIMEOUT_S:
        gdb.execute(f"set remotetimeout {MIN_REMOTE_TIMEOUT_S}", to_string=True)


def _stop_facts(event, rip: int, planted: Dict[int, "gdb.Breakpoint"],
                timer_fired: bool, catching: Optional[Dict[int, "gdb.Breakpoint"]] = None
                ) -> runto.StopFacts:
    """GDB's stop event as plain facts for the core's classify_stop (``catching``: the
    fault-catching breakpoints, by number)."""
    if event is None:
        return runto.StopFacts(rip, timer_fired=timer_fired, had_event=False)
    catching = catching or {}
    fired = [bp for bp in getattr(event, "breakpoints", None) or [] if bp.is_valid()]

    def at(numbers) -> tuple:
        return tuple(loc.address & _U64 for bp in fired if bp.number in numbers
                     for loc in bp.locations)

    others = tuple(bp.number for bp in fired
                   if bp.number not in planted and bp.number not in catching)
    return runto.StopFacts(rip, at(planted), others, getattr(event, "stop_signal", None),
                           timer_fired, fault_fired=at(catching))


def _user_breakpoint_locations() -> Dict[int, set]:
    """The addresses each of the user's breakpoints is planted at now."""
    out = {}
    for bp in gdb.breakpoints():
        if bp.number > 0 and bp.type == gdb.BP_BREAKPOINT:
            out[bp.number] = {loc.address for loc in bp.locations}
    return out


def _keep_user_breakpoints(before: Dict[int, set], kind: str) -> None:
    """GDB re-resolves every breakpoint when symbols are added: one set on
    ``efi_multiboot2`` would silently gain a second location at the load address.
    Keep each user's breakpoint where it was: disable the new locations and say so."""
    for bp in gdb.breakpoints():
        if bp.number not in before:
            continue
        for i, loc in enumerate(bp.locations, 1):
            if loc.address not in before[bp.number] and loc.enabled:
                loc.enabled = False
                gdb.write(f"gdbext: breakpoint {bp.number} ({bp.location}) also matches "
                          f"{loc.address:#x} in Xen's symbols at its {kind} address; that "
                          f"location is disabled ('enable {bp.number}.{i}' to use it)\n")


class Context:
    def __init__(self) -> None:
        self.target = GdbTarget()
        self.xen = XenState()
        self.settings = Settings()
        self.merge = merge_here.MergeRecord()
        self.boot_session = None    # a boot_session.BootSession while xen-mb2-break runs
        self.faults = FaultCatcher(self)   # the exception-catching breakpoints, last crash
        self._events_connected = False

    # -- GDB's events -----------------------------------------------------------------

    def connect_events(self) -> None:
        """Once per GDB: drop cached reads when the guest runs or is changed, forget a
        boot's merge record on a new boot, pass stops to the running session."""
        if self._events_connected:
            return
        ev = gdb.events
        t = self.target
        for name in ("cont", "memory_changed", "register_changed", "inferior_call", "exited",
                     "new_inferior", "new_thread"):
            registry = getattr(ev, name, None)
            if registry is not None:
                registry.connect(t.invalidate)
        registry = getattr(ev, "connection_removed", None)
        if registry is not None:
            registry.connect(t.forget_connection)
        ev.stop.connect(self._on_stop)
        ev.cont.connect(self._on_cont)
        ev.new_objfile.connect(self._on_new_objfile)
        for name in ("exited", "connection_removed"):
            registry = getattr(ev, name, None)
            if registry is not None:
                registry.connect(self._on_disconnect)
        self._events_connected = True

    def _on_stop(self, event) -> None:
        try:
            pc = int(gdb.selected_frame().pc()) & _U64
        except (gdb.error, RuntimeError):
            return
        self.forget_merge_if_new_boot(pc)
        self.faults.on_stop(event)
        if self.boot_session is not None:
            self.boot_session.on_stop(event)

    def _on_new_objfile(self, event) -> None:
        self.adopt_gdb_file(getattr(getattr(event, "new_objfile", None), "filename", None))

    def adopt_gdb_file(self, path: Optional[str] = None) -> None:
        """``gdb xen-syms`` (or ``file``/``symbol-file`` of a Xen build): take Xen's
        symbols from the file GDB was given, when gdbext has none yet. The same
        build-id checks apply once B is known."""
        if self.xen.syms is not None:
            return
        candidates = [path] if path else [o.filename for o in gdb.objfiles()]
        for filename in candidates:
            if not filename or not os.path.isfile(filename):
                continue
            try:
                syms = load_xen_syms(filename)
            except GdbextError:
                continue   # not a Xen build: GDB's file, not gdbext's business
            self.xen.syms = syms
            gdb.write(f"gdbext: Xen {syms.version or ''} symbols from GDB's file {filename} "
                      "(xen-syms PATH loads others)\n")
            return

    def _on_cont(self, _event) -> None:
        self.merge.ran = True

    def _on_disconnect(self, *_args) -> None:
        self.merge.forget()

    # -- the merge record -------------------------------------------------------------

    def forget_merge(self, reason: str = "") -> None:
        """Drop the firmware snapshot and the apply journal (a new boot made them stale)."""
        held = self.merge.held()
        self.merge.forget()
        if held and reason:
            gdb.write(f"gdbext: {reason}: forgot the firmware snapshot"
                      " and what xen-l4merge-apply had written\n")

    def forget_merge_if_new_boot(self, pc: int) -> None:
        if self.merge.stale_at(self.xen.syms, pc):
            self.forget_merge(f"stopped at {merge_here.ENTRY} again (a new boot)")

    # -- Xen's symbols and load base ---------------------------------------------------

    def load_syms(self, path: str):
        syms = load_xen_syms(path)
        self.forget_load_base()
        self.xen.syms = syms
        return syms

    def require_syms(self):
        if self.xen.syms is None:
            raise GdbextError("no Xen symbols loaded: run 'xen-syms PATH/TO/xen-syms' first")
        return self.xen.syms

    def set_load_base(self, value: int, source: str) -> None:
        """Record B (and where it came from); GDB then gets Xen's symbols at B too."""
        x = self.xen
        if value != x.load_base:
            x.build_id = None
            x.loaded = None
        x.load_base = value
        x.load_base_source = source
        self.sync_gdb_symbols()

    def forget_load_base(self) -> None:
        self.remove_gdb_symbols()
        x = self.xen
        x.load_base = None
        x.load_base_source = ""
        x.build_id = None
        x.loaded = None

    def build_id_check(self) -> Optional[BuildIdCheck]:
        """xen-syms' build-id against guest memory at B (None while syms or B are unknown)."""
        x = self.xen
        if x.syms is None or x.load_base is None:
            return None
        if x.build_id is None or x.build_id.match is not True:
            t = self.target
            with t.phys_mode():
                x.build_id = xenimage.check_build_id(t.cache, x.syms, x.load_base)
        return x.build_id

    def require_loaded(self) -> LoadedXen:
        """The Xen image at B, for commands that print Xen-specific results.

        One-line GdbextError when there are no symbols, B cannot be found from the
        machine's state (the cheap sources of xen-locate are tried), or the image in
        memory has another build-id (unless 'set xen-ignore-build-id on')."""
        syms = self.require_syms()
        x = self.xen
        if x.load_base is None:
            found = self.locate_cheap() if xenimage.has_bytes(syms) else None
            if found is None:
                raise GdbextError(
                    "Xen's load base B is unknown (RIP, %esi and xen_phys_start do not give "
                    "it here): run 'xen-locate' (it scans memory), 'xen-locate --base PA', or "
                    "'xen-run-to __efi64_mb2_start'")
            self.set_load_base(*found)
        check = self.build_id_check()
        if check is not None and check.match is False and not self.settings.ignore_build_id:
            raise GdbextError(check.mismatch_message(syms.path, x.load_base))
        if x.loaded is None or x.loaded.syms is not syms:
            x.loaded = LoadedXen(syms, x.load_base)
        return x.loaded

    def loaded_or_note(self) -> Tuple[Optional[LoadedXen], Optional[str]]:
        """For output that names Xen things when it can: (LoadedXen, None), or (None, why
        not); (None, None) when no Xen symbols are loaded at all."""
        if self.xen.syms is None:
            return None, None
        try:
            return self.require_loaded(), None
        except GdbextError as err:
            return None, f"no Xen names: {err}"

    def locate_cheap(self) -> Optional[Tuple[int, str]]:
        """B from the machine's state without scanning (core.locate's order of trust)."""
        syms = self.require_syms()
        t = self.target
        regs = {name: self.register(name) for name in locate.CHEAP_REGISTERS}
        with t.phys_mode():
            return locate.locate_cheap(syms, t.cache, regs, self.translate)

    def locate_scan(self, stop_at_first: bool = True) -> xenimage.ScanResult:
        """The scan of every candidate base (see xenimage.scan), over QEMU's RAM map."""
        syms = self.require_syms()
        t = self.target
        ram = t.main_ram()
        if not ram:
            raise GdbextError("QEMU's memory map (monitor info mtree -f) gives no RAM: cannot "
                              "scan; give the base with 'xen-locate --base PA'")
        with t.phys_mode():
            return xenimage.scan(t, syms, ram, stop_at_first)   # raw reads: 4 bytes, not pages


    def locate(self, base: Optional[int] = None, scan_only: bool = False) -> dict:
        """xen-locate's work: find B, store it, check the build-id; the JSON result."""
        syms = self.require_syms()
        t = self.target
        started = time.perf_counter()
        result: dict = {"load_base": None, "source": None, "build_id_match": None,
                        "verified": True, "candidates_read": None, "candidates": None}
        found = None
        if base is not None:
            problem = xenimage.user_base_problem(syms, base, self.settings.maxphyaddr,
                                                 t.main_ram())
            if problem:
                raise GdbextError(f"xen-locate --base: {problem}")
            if xenimage.has_bytes(syms):
                with t.phys_mode():
                    result["verified"] = xenimage.verify_base(t.cache, syms, base)
            else:
                result["verified"] = None   # a .map: no bytes to check B against
            found = (base, "user (--base)")
        elif not xenimage.has_bytes(syms):
            raise GdbextError(
                f"{syms.path} is an nm-format map: finding Xen needs the image's bytes from "
                "xen-syms (the ELF); load it, or give the base with 'xen-locate --base PA' (Xen "
                "prints it on its console: 'Xen image load base address')")
        elif not scan_only:
            found = self.locate_cheap()
        if found is None:
            res = self.locate_scan()
            result.update(candidates_read=res.candidates_read, candidates=res.candidates)
            what = f"{res.candidates_read} of {res.candidates} candidate bases read"
            if res.load_base is not None:
                found = (res.load_base, f"scan ({what})")
            elif len(res.header_only) == 1:
                found = (res.header_only[0], f"scan: a multiboot2 image whose bytes differ from "
                         f"xen-syms ({what})")
                result["verified"] = False
            elif res.header_only:
                raise GdbextError(
                    f"several multiboot2 images whose bytes differ from xen-syms, at "
                    f"{', '.join(hex(b) for b in res.header_only)}: load the right xen-syms, or "
                    "give the base with 'xen-locate --base PA'")
            else:
                raise GdbextError(
                    f"Xen's image is not in guest memory ({what}; RIP, %esi, xen_phys_start and "
                    "the MBI give nothing): stop where GRUB has loaded it, e.g. 'xen-run-to "
                    "__efi64_mb2_start', or give the base with 'xen-locate --base PA'")
        self.set_load_base(*found)
        check = self.build_id_check()
        result.update(load_base=found[0], source=found[1],
                      build_id_match=None if check is None else check.match,
                      build_id=syms.build_id_hex if hasattr(syms, "build_id_hex") else None,
                      build_id_memory=(check.found.hex() if check is not None and check.found
                                       else None),
                      gdb_symbols=sorted(self.xen.gdb_symbols),
                      seconds=round(time.perf_counter() - started, 3))
        return result

    def completion_names(self, kind: str, prefix: str) -> Optional[List[str]]:
        """What TAB offers for a value of ``kind`` starting with ``prefix``; None: leave
        it to GDB's own expression completion (no Xen symbols loaded)."""
        if kind == "stop":
            return suggest.completions(map(bootstops.typed_stop_name, bootstops.STOP_ORDER),
                                       prefix)
        if kind == "check":
            return suggest.completions(merge_catalog.CHECK_IDS, prefix.upper())
        syms = self.xen.syms
        if kind == "function":   # xen-pic-check: the image's code, nothing of GDB's
            return [] if syms is None else suggest.completions(piccheck.function_names(syms),
                                                               prefix)
        fixed = list(MERGE_ROOTS) + ["cr3"] if kind == "root" else []
        if syms is None:
            return suggest.completions(fixed, prefix) if fixed else None
        names = suggest.completions(syms.by_name, prefix.split("@")[0])
        if kind in ("pa-address", "root"):
            names = [n + "@pa" for n in names]
        return suggest.completions(fixed, prefix) + names

    # -- GDB's own symbol tables -------------------------------------------------------

    @staticmethod
    def _symbol_at(addr: int) -> Optional[str]:
        try:
            out = gdb.execute(f"info symbol {addr:#x}", to_string=True)
        except gdb.error:
            return None
        return None if out.startswith("No symbol") else out.split()[0]

    def remove_gdb_symbols(self, kinds=("load", "linked")) -> None:
        syms = self.xen.syms
        for kind in kinds:
            entry = self.xen.gdb_symbols.pop(kind, None)
            if entry is None or syms is None:
                continue
            _path, offset = entry
            addr = (syms.image_start + offset) & _U64
            try:
                gdb.execute(f"with confirm off -- remove-symbol-file -a {addr:#x}",
                            to_string=True)
            except gdb.error:
                pass

    def sync_gdb_symbols(self) -> None:
        """Make GDB name Xen's code both at its load address and at its linked address.

        Idempotent and quiet: each (file, offset) is added once; a changed B replaces
        the load-address copy. Skipped for a .map (no ELF to give GDB) and while the
        build-id says these symbols belong to another build."""
        syms, base = self.xen.syms, self.xen.load_base
        if syms is None or base is None or not getattr(syms, "segments", ()):
            return
        try:
            check = self.build_id_check()
        except GdbextError:
            check = None
        if check is not None and check.match is False and not self.settings.ignore_build_id:
            self.remove_gdb_symbols()
            return
        path = str(syms.path)
        for kind in ("linked", "load"):
            # add-symbol-file -o shifts every section: linked VA + offset = PA at B. The
            # offset is negative (B < XEN_VIRT_START); GDB takes it as a signed expression.
            offset = base - syms.virt_start if kind == "load" else 0
            if self.xen.gdb_symbols.get(kind) == (path, offset):
                continue
            self.remove_gdb_symbols((kind,))
            start = (syms.image_start + offset) & _U64
            if self._symbol_at(start) is not None:
                continue  # the user (or an earlier gdbext) already gave GDB these symbols
            opt = f" -o {offset:#x}" if offset else ""
            quoted = f'"{path}"' if any(c.isspace() for c in path) else path
            before = _user_breakpoint_locations()
            try:
                gdb.execute(f"with confirm off -- add-symbol-file {quoted}{opt}",
                            to_string=True)
            except gdb.error as err:
                gdb.write(f"gdbext: could not give GDB Xen's symbols ({one_line(err)})\n",
                          gdb.STDERR)
                return
            self.xen.gdb_symbols[kind] = (path, offset)
            _keep_user_breakpoints(before, kind)

    # -- registers and paging ----------------------------------------------------------

    def register(self, name: str) -> Optional[int]:
        try:
            return self.target.read_register(name)
        except GdbextError:
            return None

    def read_control_registers(self) -> Dict[str, int]:
        return self.target.read_registers(CONTROL_REGISTERS)

    def cpu_context(self, regs: Dict[str, int]) -> PagingContext:
        """The paging the CPU does with these CR0/CR4/EFER, at 'set xen-maxphyaddr'."""
        return PagingContext.from_registers(regs["cr0"], regs["cr4"], regs["efer"],
                                            maxphyaddr=self.settings.maxphyaddr)

    def translate(self, va: int) -> Optional[int]:
        """PA of VA under the CPU's current paging (VA itself with paging off)."""
        regs = self.read_control_registers()
        t = self.target
        with t.phys_mode():
            return paging.translate(self.cpu_context(regs), t.cache, regs["cr3"], va)

    def predicted_merge(self, relocate: bool = False):
        """The RFC's merged L4 predicted from F (or CR3 while it is the firmware's).
        Inside phys_mode; writes nothing."""
        lx = self.require_loaded()
        regs = self.read_control_registers()
        snap = self.merge.snapshot_for(self.xen.load_base)
        return merge_here.predicted_merge(lx, self.target.cache, regs, self.cpu_context(regs),
                                          snap, relocate)

    def situation(self, choice: RootChoice = RootChoice()) -> Situation:
        """What a paging command walks at this stop (inside phys_mode)."""
        regs = self.read_control_registers()
        ctx = self.cpu_context(regs)
        if choice.mode:
            ctx = PagingContext(MODES[choice.mode], nxe=ctx.nxe, pke=ctx.pke, pse=ctx.pse,
                                wp=ctx.wp, maxphyaddr=ctx.maxphyaddr)
        if ctx.mode is paging.MODE_OFF:
            raise GdbextError("paging is off (CR0.PG=0): addresses are physical; pass --mode "
                              "and --root to read a table anyway")
        mem = self.target.cache
        if choice.root == "cr3":
            return Situation(regs, ctx, ctx.root_from_cr3(regs["cr3"]), "cr3", mem)
        if choice.root in MERGE_ROOTS:
            if ctx.mode is not paging.MODE_4LEVEL:
                raise GdbextError(f"--root {choice.root}: the RFC's merge is a 4-level L4; "
                                  f"the CPU is in {ctx.mode.name} paging")
            pred = self.predicted_merge(relocate=MERGE_ROOTS[choice.root])
            return Situation(regs, ctx, pred.root,
                             f"{choice.root}: predicted, M in {pred.table_source}",
                             pred.mem, judge_root_as=xenimage.IDLE_L4)
        root = parse_address(self, choice.root, "root table", space="pa")
        align = 32 if ctx.mode is paging.MODE_PAE else x86.PAGE_SIZE
        if root & (align - 1):
            raise GdbextError(f"root table {root:#x} is not {align}-byte aligned (low bits "
                              f"{root & (align - 1):#x} set): give the table's physical "
                              "address, or 'cr3'")
        if root >= 1 << ctx.maxphyaddr:
            raise GdbextError(f"root table {root:#x} is above the {ctx.maxphyaddr}-bit "
                              "physical address space: give a physical address, not a "
                              "virtual one")
        return Situation(regs, ctx, root, choice.root, mem)

    # -- running the guest ------------------------------------------------------------

    @staticmethod
    def quiet_breakpoint(address: int) -> "gdb.Breakpoint":
        """An internal breakpoint that stops without GDB printing 'Breakpoint -N, ...'
        (the command that planted it reports the stop in its own words)."""
        bp = gdb.Breakpoint(f"*{address:#x}", internal=True)
        bp.silent = True
        return bp

    @staticmethod
    def delete_breakpoints(breakpoints) -> None:
        for bp in breakpoints:
            try:
                bp.delete()
            except RuntimeError:
                pass  # already gone (the user deleted it)

    def continue_until(self, timeout_at: float, what: str,
                       breakpoints: Iterable["gdb.Breakpoint"], hang_check: bool = True) -> int:
        """Resume the guest until one of ``breakpoints`` fires; return RIP.

        The stop is recognised by GDB's stop event (which breakpoint fired, at its
        own address), never by RIP alone: any other stop (a SIGINT the stub made of
        bytes that arrived while the guest ran, the user's Ctrl-C or breakpoint) is
        one GdbextError line naming what was awaited, even when RIP equals a planted
        address. The timeout is the timer's SIGINT, and counts only if that SIGINT is
        what stopped the guest. Before resuming, the fault-catching breakpoints are
        armed for this stop (``self.faults``); a stop at one of them raises GuestCrashed
        with the explanation.

        A stop not come within 'set xen-hang-wait' seconds is looked into (hang_watch:
        GuestCrashed("hang") only for a CPU halted or in one loop; a CPU that moves on
        runs on). QEMU pausing the machine at a triple fault or reset (a SIGQUIT stop)
        is GuestCrashed("triple-fault"/"shutdown")."""
        started = time.monotonic()
        remaining = timeout_at - time.monotonic()
        msg = (f"timed out waiting for Xen to reach {what} (is Xen booting? see the "
               "serial log)")
        if remaining <= 0:
            raise hang_watch.WaitTimedOut(msg)
        planted = {bp.number: bp for bp in breakpoints if bp.is_valid()}
        hang_wait = self.settings.hang_wait if hang_check else 0
        wait = min(remaining, hang_wait) if hang_wait > 0 else remaining
        catcher = self.faults
        try:
            catcher.arm()
        except (GdbextError, gdb.error) as err:
            # Never a reason not to run: the run goes on uncaught, 'xen-fault' says why.
            catcher.note = f"exceptions not caught: {one_line(err)}"
        catching = catcher.breakpoint_map()
        events: list = []
        with _Timeout(wait) as tm:
            def on_stop(event) -> None:
                tm.stopped()
                events.append(event)
            gdb.events.stop.connect(on_stop)
            catcher.driving = True
            try:
                gdb.execute("continue", to_string=True)
            finally:
                catcher.driving = False
                gdb.events.stop.disconnect(on_stop)
        try:
            rip = self.target.read_register("rip")
        except GdbextError:
            raise GdbextError(f"the guest stopped without registers while waiting for {what} "
                              "(did QEMU exit? see its log)") from None
        facts = _stop_facts(events[-1] if events else None, rip, planted, tm.fired, catching)
        kind = runto.classify_stop(facts)
        if kind == runto.STOP_FAULT:
            raise catcher.crash_at(rip)
        if kind == runto.STOP_PLANTED:
            return rip
        if kind == runto.STOP_TIMEOUT:
            if wait < remaining:     # the hang wait ended, not the whole timeout
                return hang_watch.after_wait(self, started, timeout_at, what, breakpoints)
            raise hang_watch.WaitTimedOut(msg)
        if facts.signal == hang.SHUTDOWN_SIGNAL:
            crash = hang_watch.shutdown_crash(self, what)
            if crash is not None:
                raise crash
        raise GdbextError(runto.foreign_stop_text(facts, what))

    @staticmethod
    def bytes_at(va: int, size: int) -> bytes:
        """Bytes at a virtual address as GDB reads them now (b'' if unreadable)."""
        try:
            return gdb.selected_inferior().read_memory(va, size).tobytes()
        except gdb.MemoryError:
            return b""

    def set_register(self, name: str, value: int) -> None:
        """Write a register through GDB (QEMU's gdbstub accepts CR3 too).

        GDB types CR3 as flags, which it will not cast from an integer, so the new
        value is built from bytes in the register's own type.  Always frame 0: after
        RSP or RIP change GDB may select a caller's frame, whose registers are unwound
        values that cannot be assigned."""
        frame = gdb.newest_frame()
        frame.select()
        reg_type = frame.read_register(name).type
        size = reg_type.sizeof
        raw = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        gdb.set_convenience_variable("_gdbext_reg", gdb.Value(raw, reg_type))
        try:
            gdb.execute(f"set ${name} = $_gdbext_reg", to_string=True)
        finally:
            gdb.set_convenience_variable("_gdbext_reg", None)
            gdb.newest_frame().select()
        self.target.invalidate()
        got = self.target.read_register(name)
        if got != value & ((1 << (8 * size)) - 1):
            raise GdbextError(f"the target did not take {name} = {value:#x} "
                              f"(reads back {got:#x})")


CONTEXT = Context()
