"""QEMU stalled (SIGSTOP/SIGCONT by its pid) during a walk, longer than GDB's remotetimeout.

GDB 13 re-sends the packet it got no ack for, QEMU 7.2 answers each copy, and the
replies are out of step from then on. Whatever the timing, xen-pt prints either the
tree it prints without a stall, or the one line saying the replies are out of step
(and nothing else); after reconnecting as that line says, the next command is right.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

OUT_OF_STEP = "QEMU's gdbstub replies are out of step"
# (seconds after the command is sent, seconds stopped): all past remotetimeout (2 s).
STALLS = [(0.15, 3.0), (0.15, 5.0), (0.6, 4.5)]


def _stall(pid: int, after: float, seconds: float) -> threading.Thread:
    def run():
        time.sleep(after)
        os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(seconds)
        finally:
            os.kill(pid, signal.SIGCONT)
    th = threading.Thread(target=run)
    th.start()
    return th


def _reconnect(stop) -> None:
    stop.cmd("disconnect")
    stop.cmd(f"target remote {stop.lab.gdb_target}")


def _right_or_one_line(reply, right: str) -> str:
    if reply.error is None:
        assert reply.out == right, "a tree other than the one printed without a stall"
        return "right"
    assert reply.error.startswith(OUT_OF_STEP), reply.error
    assert "\n" not in reply.error and "disconnect" in reply.error
    assert reply.out == "", "something was printed before the one line"
    return "one line"


@pytest.mark.parametrize("after,seconds", STALLS)
def test_stall_during_walk_gives_the_right_tree_or_one_line(at_entry_stall, after, seconds):
    stop, right = at_entry_stall
    stop.cmd("set remotetimeout 2")
    # Drop the pages cached at this stop (setting the read method does), so that the
    # walk reads every table over the wire while QEMU is stopped.
    stop.cmd("set xen-phys-read auto")
    th = _stall(stop.lab.pid, after, seconds)
    try:
        reply = stop.gdb.execute("xen-pt --levels", timeout=300, check=False)
    finally:
        th.join()
    outcome = _right_or_one_line(reply, right)
    print(f"\nstall {seconds} s at {after} s: {outcome}"
          + (f": {reply.error}" if reply.error else f" ({len(right.splitlines())} lines)"))
    # The next command: right, or (a copy of the last reply still queued) the one line;
    # after the reconnect that line asks for, right.
    nxt = stop.gdb.execute("xen-pt --levels", timeout=120, check=False)
    if _right_or_one_line(nxt, right) == "one line" or outcome == "one line":
        _reconnect(stop)
        nxt = stop.gdb.execute("xen-pt --levels", timeout=120, check=False)
        assert nxt.error is None and nxt.out == right
    # QEMU was left in virtual mode, as GDB expects.
    assert stop.phymem_mode() == "0"
    assert stop.json("xen-regs --json")["cr3"] == stop.qemu_registers()["cr3"]


@pytest.fixture(scope="module")
def at_entry_stall(xen_syms_path):
    """A boot of its own (the stalls disturb the connection), and the tree without a stall."""
    from .conftest import booted_to
    with booted_to("__efi64_mb2_start", xen_syms_path) as stop:
        right = stop.cmd("xen-pt --levels").out
        assert len(right.splitlines()) > 100
        yield stop, right
