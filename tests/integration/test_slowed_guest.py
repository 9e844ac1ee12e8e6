"""The boot session reports the same stops on a quiet and on a slowed guest.

``xen-mb2-break --batch --json`` runs twice on fresh boots: once undisturbed,
once with QEMU stopped (SIGSTOP) each time GDB resumes the guest and let go
on (SIGCONT) 3 s later, longer than GDB's default remote timeout (2 s), as a
loaded machine delays it. Both runs must reach every stop of the plan
(build_plan from xen-syms), in the same order, each stop once, at the same
addresses relative to Xen's load base.
"""

from __future__ import annotations

import os
import signal
import time

from gdbext.core.bootstops import build_plan
from gdbext.core.xensyms import load_xen_syms
from gdbext.host.gdbdriver import lab_session
from gdbext.host.lab import LabConfig

WAIT_S = 240


# Installed in GDB for the slowed run: each time GDB resumes the guest, QEMU is
# stopped at that moment and let go on SLOW_RESUME_S later, so the stub answers the
# resume's packets (breakpoint inserts, vCont) late, as on a loaded machine.
SLOW_RESUME_S = 3.0
SLOW_HOOK = ("import gdb, os, signal, threading\n"
             "def _gdbext_test_slow(_event):\n"
             "    os.kill({pid}, signal.SIGSTOP)\n"
             "    threading.Timer({s}, os.kill, ({pid}, signal.SIGCONT)).start()\n"
             "    _gdbext_test_slow.count += 1\n"
             "_gdbext_test_slow.count = 0\n"
             "gdb.events.cont.connect(_gdbext_test_slow)\n")
SLOW_UNHOOK = "gdb.events.cont.disconnect(_gdbext_test_slow)\nprint(_gdbext_test_slow.count)\n"


def batch_run(xen_syms, slowed=False):
    """(the session's JSON, resumes slowed) on a fresh boot."""
    with lab_session(LabConfig(memory_mb=1024), xen_syms) as (lab, gdb):
        command = f"xen-mb2-break --batch --json --timeout {WAIT_S}"
        if not slowed:
            return gdb.execute(command, timeout=WAIT_S * 4).json(), 0
        gdb.execute(f"python exec({SLOW_HOOK.format(pid=lab.pid, s=SLOW_RESUME_S)!r})")
        try:
            reply = gdb.execute(command, timeout=WAIT_S * 4, check=False)
        finally:
            count = int(gdb.execute(f"python exec({SLOW_UNHOOK!r})").out.split()[-1])
            time.sleep(SLOW_RESUME_S + 0.5)      # the last timer has let QEMU go on
            os.kill(lab.pid, signal.SIGCONT)     # never leave QEMU stopped
        assert reply.error is None, f"slowed run ({count} resumes slowed): {reply.error}"
        return reply.json(), count


def stops_of(result):
    base = result["load_base"]
    return [(r["stop"], r["kind"], r["rip"] - base if r["kind"] == "load" else None)
            for r in result["stops"]]


def test_same_stops_in_the_same_order_on_a_slowed_guest(xen_syms_path):
    plan = build_plan(load_xen_syms(xen_syms_path))
    quiet, _ = batch_run(xen_syms_path)
    assert quiet["error"] is None and quiet["ok"] and quiet["complete"], quiet["error"]
    assert quiet["reached"] == plan.names()

    slowed, pauses = batch_run(xen_syms_path, slowed=True)
    # The disturbance really happened: at least one slowed resume per stop after the entry.
    assert pauses >= len(plan.names()) - 1, f"only {pauses} resumes slowed"
    assert slowed["error"] is None, f"{pauses} resumes slowed: {slowed['error']}"
    assert slowed["reached"] == quiet["reached"], f"{pauses} resumes slowed"
    assert stops_of(slowed) == stops_of(quiet), f"{pauses} resumes slowed"
    assert slowed["ok"] and slowed["complete"]
