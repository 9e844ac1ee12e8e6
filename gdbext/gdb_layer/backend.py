"""GDB backend: registers and physical memory of the stopped guest over QEMU's gdbstub.

Physical reads switch the stub to physical mode with ``Qqemu.PhyMemMode:1`` for
the duration of one command (``phys_mode()``), and always switch it back, also
on errors and Ctrl-C: the mode is global, so GDB's own reads (``x/``,
breakpoints) would otherwise go to physical addresses. Targets without the
packet fall back to ``monitor xp``.

A ``PageCache`` keeps what was read until the guest runs or GDB writes memory
or registers (the context hooks GDB's events to ``invalidate``), so repeated
commands at one stop are cheap. The one instance is ``context.CONTEXT.target``.
"""

from __future__ import annotations

import contextlib
import re
from typing import Dict, Iterator, Optional

import gdb  # noqa: F401  (this module is only imported inside GDB)

from ..core import rsp
from ..core.errors import GdbextError, MemoryReadError
from ..core.memory import PageCache
from ..core.qemu import MemoryMap, main_ram, parse_mtree_flat, parse_xp_lines, parse_xp_qwords

NOT_CONNECTED = ("GDB is not connected to a running target: start QEMU with -s -S "
                 "(or scripts/xen-lab) and run 'target remote 127.0.0.1:PORT'")

RUNNING = "the guest is running: interrupt it first (Ctrl-C, or 'interrupt' in non-stop mode)"

_REGISTER_ALIASES = {"efer": ("efer", "msr_efer")}


def _packet(text: str) -> Optional[str]:
    """Send a raw packet; return the stub's reply, or None if the target is not remote."""
    try:
        out = gdb.execute(f"maintenance packet {text}", to_string=True)
    except gdb.error:
        return None
    m = re.search(r'received: "(.*)"', out)
    return m.group(1) if m else ""


class GdbTarget:
    """PhysMemory + Registers over the current GDB connection."""

    def __init__(self) -> None:
        self.cache = PageCache(self)
        self._regs: Dict[str, int] = {}
        self._phys_depth = 0
        self._method: Optional[str] = None   # "phymem" or "xp", decided on first use
        # 'set xen-phys-read': None (auto), "phymem" or "xp" (a stub without the packet,
        # or checking one reading against the other).
        self.forced_method: Optional[str] = None
        self._memory_map: Optional[MemoryMap] = None
        self._main_ram: list = []
        self._memory_map_known = False
        # Set when a reply was found out of step (rsp.ReplyOutOfStep): the stream stays
        # shifted until GDB reconnects, so every later read fails with the same line.
        self._out_of_step: Optional[rsp.ReplyOutOfStep] = None

    # -- state ---------------------------------------------------------------------

    def invalidate(self, *_args) -> None:
        self.cache.clear()
        self._regs.clear()

    def forget_connection(self, *_args) -> None:
        self.invalidate()
        self._method = None
        self._memory_map = None
        self._memory_map_known = False
        self._out_of_step = None

    def memory_map(self) -> Optional[MemoryMap]:
        """QEMU's RAM/ROM map, read once per connection; None if the monitor can't say.

        Needed because QEMU's physical-mode gdbstub reads unbacked addresses as
        zeros instead of failing: a table pointer into nothing would look empty."""
        if not self._memory_map_known:
            self._memory_map_known = True
            try:
                regions = parse_mtree_flat(self.monitor("info mtree -f"))
            except (gdb.error, GdbextError):
                regions = []
            self._memory_map = MemoryMap(regions) if regions else None
            self._main_ram = main_ram(regions)
        return self._memory_map

    def main_ram(self) -> list:
        """[(start, end)] of the guest's main RAM, [] if QEMU's monitor can't tell."""
        self.memory_map()
        return self._main_ram

    @staticmethod
    def check_connected() -> None:
        inferior = gdb.selected_inferior()
        if inferior is None or inferior.pid == 0 or not gdb.selected_inferior().threads():
            raise GdbextError(NOT_CONNECTED)
        thread = gdb.selected_thread()
        if thread is not None and thread.is_running():
            raise GdbextError(RUNNING)
        try:
            gdb.selected_frame()
        except gdb.error as err:
            if "running" in str(err):
                raise GdbextError(RUNNING) from None
            raise GdbextError(NOT_CONNECTED) from None

    # -- registers -------------------------------------------------------------------

    def read_register(self, name: str) -> int:
        name = name.lower()
        if name in self._regs:
            return self._regs[name]
        self.check_connected()
        frame = gdb.selected_frame()
        last_err: Optional[Exception] = None
        for candidate in _REGISTER_ALIASES.get(name, (name,)):
            try:
                value = int(frame.read_register(candidate)) & ((1 << 64) - 1)
            except (ValueError, gdb.error) as err:
                last_err = err
                continue
            self._regs[name] = value
            return value
        raise GdbextError(f"register {name} is not offered by this target ({last_err}); "
                          "QEMU's x86-64 gdbstub has cr0, cr3, cr4 and efer")

    def read_registers(self, names) -> Dict[str, int]:
        return {name: self.read_register(name) for name in names}

    # -- physical memory -------------------------------------------------------------

    def force_method(self, method: Optional[str]) -> None:
        """None: decide per connection; "phymem" or "xp": always that one."""
        self.forced_method = method
        self.invalidate()

    def _choose_method(self) -> str:
        if self.forced_method is not None:
            return self.forced_method
        if self._method is None:
            state = self._exchange("qqemu.PhyMemMode")
            if state in ("0", "1"):
                self._method = "phymem"
            elif state:
                # A stub without the packet answers "" (unknown packet); anything else
                # is the reply to another request.
                self._step_lost(rsp.ReplyOutOfStep("the physical-mode query", state))
            else:
                try:
                    out = gdb.execute("monitor xp /1gx 0", to_string=True)
                except gdb.error:
                    out = ""
                if parse_xp_qwords(out.strip().splitlines()[0] if out.strip() else ""):
                    self._method = "xp"
                else:
                    raise GdbextError(
                        "this target cannot read physical memory: it has neither QEMU's "
                        "Qqemu.PhyMemMode packet nor 'monitor xp' (is this QEMU's gdbstub?)")
        return self._method

    @contextlib.contextmanager
    def phys_mode(self) -> Iterator[None]:
        """Physical addressing for the body; nested uses switch once. Always restores."""
        self.check_connected()
        if self._choose_method() != "phymem" or self._phys_depth:
            self._phys_depth += 1
            try:
                yield
            finally:
                self._phys_depth -= 1
            return
        self._raise_if_out_of_step()
        # Every reply is checked: the query answers "0"/"1", each switch "OK". A reply
        # of another shape means the stream is out of step (see core/rsp.py).
        previous = self._checked(rsp.check_mode_query, self._exchange("qqemu.PhyMemMode"))
        switched = self._exchange("Qqemu.PhyMemMode:1")
        self._phys_depth = 1
        try:
            # QEMU has switched whatever reply GDB paired with the request: restore it
            # below even when this check fails.
            self._checked(rsp.check_ok, switched, "switching to physical mode")
            yield
        finally:
            self._phys_depth = 0
            if previous != "1":
                self._restore_virtual_mode()
            elif self._out_of_step is None:
                self._checked(rsp.check_mode_query, self._exchange("qqemu.PhyMemMode"), "1")

    def _restore_virtual_mode(self) -> None:
        """Qqemu.PhyMemMode:0, then the query must answer "0". QEMU handles packets in
        order, so the switch takes effect even when its reply is out of step; the
        check that follows catches a copy left by a stall during the command."""
        reply = None
        # Restore even after Ctrl-C: retry once if the first attempt was interrupted.
        for _ in range(2):
            try:
                reply = self._exchange("Qqemu.PhyMemMode:0")
                break
            except KeyboardInterrupt:
                continue
        if self._out_of_step is not None:
            return
        self._checked(rsp.check_ok, reply or "", "switching back to virtual mode")
        self._checked(rsp.check_mode_query, self._exchange("qqemu.PhyMemMode"), "0")

    # -- reply checking (core/rsp.py) ------------------------------------------------

    @staticmethod
    def _exchange(text: str) -> str:
        """One packet and its reply ("" from a target that is not remote)."""
        reply = _packet(text)
        return "" if reply is None else reply

    def _step_lost(self, err: rsp.ReplyOutOfStep) -> None:
        """Remember (later commands fail the same way until GDB reconnects), drop what
        was cached at this stop, and raise the one line."""
        try:
            timeout: Optional[int] = int(gdb.parameter("remotetimeout"))
        except (gdb.error, RuntimeError, TypeError, ValueError):
            timeout = None
        try:
            address = gdb.selected_inferior().connection.details
        except (AttributeError, gdb.error, RuntimeError):
            address = None
        err = rsp.ReplyOutOfStep(err.what, err.got, remotetimeout=timeout, address=address)
        self._out_of_step = err
        self.invalidate()
        raise err

    def _raise_if_out_of_step(self) -> None:
        if self._out_of_step is not None:
            raise self._out_of_step

    def _checked(self, check, *args):
        try:
            return check(*args)
        except rsp.ReplyOutOfStep as err:
            self._step_lost(err)

    def _sentinel(self) -> None:
        """The query whose answer is known ("1" in physical mode), after each page."""
        self._checked(rsp.check_mode_query, self._exchange("qqemu.PhyMemMode"), "1")

    def read_phys(self, pa: int, size: int) -> bytes:
        """Backend read (uncached); callers go through ``self.cache``."""
        self._raise_if_out_of_step()
        if pa < 0 or pa + size > (1 << 64):
            raise MemoryReadError(pa, size, "outside the 64-bit address space")
        mm = self.memory_map()
        if mm is not None and not mm.contains(pa, size):
            raise MemoryReadError(pa, size, "not RAM or ROM in QEMU's memory map "
                                  "(monitor info mtree -f)")
        if self._choose_method() == "xp":
            return self._read_xp(pa, size)
        if not self._phys_depth:
            with self.phys_mode():
                return self._read_phymem(pa, size)
        return self._read_phymem(pa, size)

    def _read_phymem(self, pa: int, size: int) -> bytes:
        """'m' packets sent as they are, each reply checked for its exact length, then
        the sentinel: GDB's read_memory would take a copy of an earlier reply of the
        same size as this read's bytes. Bypasses GDB's caches (it is a physical read)."""
        parts = []
        refused: Optional[MemoryReadError] = None
        for chunk_pa, n in rsp.read_chunks(pa, size):
            try:
                parts.append(self._checked(rsp.check_m_reply,
                                           self._exchange(rsp.m_packet(chunk_pa, n)),
                                           chunk_pa, n))
            except MemoryReadError as err:
                refused = err
                break
        # Only with the sentinel answered is "E.." known to be this read's reply.
        self._sentinel()
        if refused is not None:
            raise MemoryReadError(pa, size, "not backed by RAM or a device "
                                  "(QEMU refused the physical read)")
        return b"".join(parts)

    def _read_xp(self, pa: int, size: int) -> bytes:
        start = pa & ~7
        count = (pa + size - start + 7) // 8
        try:
            out = gdb.execute(f"monitor xp /{count}gx {start:#x}", to_string=True)
        except gdb.error as err:
            raise MemoryReadError(pa, size, f"not readable via monitor xp ({err})") from None
        for line in out.splitlines():
            if "Cannot access" in line or "error" in line.lower():
                raise MemoryReadError(pa, size, line.strip())
        # Each line names its address: an answer to another request shows there.
        words = self._checked(rsp.check_xp_lines, parse_xp_lines(out), start, count, pa, size)
        data = b"".join(w.to_bytes(8, "little") for w in words[:count])
        return data[pa - start:pa - start + size]

    def write_phys(self, pa: int, data: bytes) -> None:
        """Write guest physical memory. Only commands the user invoked to write call this."""
        if self._choose_method() != "phymem":
            # QEMU's monitor can read physical memory (xp) but not write it.
            raise GdbextError("writing physical memory needs QEMU's Qqemu.PhyMemMode packet, "
                              "and physical reads are set to 'monitor xp' (set xen-phys-read "
                              "auto)")
        with self.phys_mode():
            try:
                gdb.selected_inferior().write_memory(pa, data)
            except gdb.MemoryError:
                self._sentinel()   # an error reply out of step is not "not writable"
                raise MemoryReadError(pa, len(data), "not writable") from None
            finally:
                self.invalidate()
            # GDB has taken the reply to its write packet as it came: the sentinel
            # shows whether that was the write's.
            self._sentinel()

    def monitor(self, command: str) -> str:
        self.check_connected()
        return gdb.execute(f"monitor {command}", to_string=True)

