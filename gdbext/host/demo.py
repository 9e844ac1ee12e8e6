"""scripts/demo: the main job. Boot Debian's Xen 4.17 under OVMF + GRUB, stop at
__efi64_mb2_start with GDB and gdbext, print what the extension shows, then make the
RFC's crash live (the raw merge, the call at the linked VA, the #PF caught and
explained, --undo), stop cleanly.

``--interactive`` leaves you at the GDB prompt in that state instead; QEMU is
stopped when you quit GDB.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from pathlib import Path

from .. import paths
from ..core.errors import GdbextError
from ..core.merge_predict import CALL_TARGET  # the function the RFC calls at its linked VA
from ..core.stopnames import ENTRY
from ..core.xensyms import load_xen_syms
from .gdbdriver import GDBINIT, GdbSession, gdb_binary
from .lab import Lab, LabConfig


def report_commands(xen_syms: Path):
    """(title, command) pairs: what the demo shows at the entry stop."""
    syms = load_xen_syms(xen_syms)
    linked = syms.linked_va(CALL_TARGET)
    return [
        ("Where we are", "x/3i $pc"),
        ("Xen: version, build-id (file and memory), load base and where in its boot",
         "xen-info"),
        ("Control registers and paging mode", "xen-regs"),
        ("The firmware's page tables (OVMF), coalesced", "xen-pt"),
        ("The walk of RIP: Xen runs at its load address, identity-mapped by the firmware",
         "xen-va2pa $pc"),
        (f"The walk of {CALL_TARGET}'s linked address {linked:#x} under the firmware's "
         "tables: nothing maps Xen's upper half yet, which is why the RFC merges an L4",
         f"xen-va2pa {CALL_TARGET}"),
        (f"The same walk under the RFC's merged L4, predicted (nothing is written): slot "
         f"{(linked >> 39) & 0x1ff} still holds l3_xenmap's link-time address",
         f"xen-va2pa {CALL_TARGET} --root merge"),
        ("The merge checked against the invariants: it fails, and says why",
         "xen-l4merge-check --predict"),
        ("The variant the review asked for: B added to Xen's pointers first",
         f"xen-va2pa {CALL_TARGET} --root merge-relocated"),
        ("... and its checks", "xen-l4merge-check --assume-relocated"),
    ]


# The RFC's crash, live, after the report: the raw merge written, the call made at the
# linked VA as the patch's 'call *%rax' makes it, the guest let run into the #PF that
# gdbext catches at the firmware's handler, then every write undone.
CRASH_WAIT_S = 120


def crash_commands():
    """(title, command) pairs: the RFC's crash made, caught, explained and undone."""
    return [
        (f"The RFC's crash, live: the raw merge written, CR3 switched to it, and the call "
         f"of {CALL_TARGET} made at its linked VA (as the patch's 'call *%rax')",
         "xen-l4merge-apply --call-linked"),
        ("The guest runs: the fetch at the linked VA faults; gdbext stops at the firmware's "
         "#PF handler and explains the fault", "continue"),
        ("Everything xen-l4merge-apply wrote, put back", "xen-l4merge-apply --undo"),
    ]


def parse_args(argv):
    p = argparse.ArgumentParser(prog="scripts/demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--interactive", action="store_true",
                   help="leave me at the GDB prompt at __efi64_mb2_start")
    p.add_argument("--build", choices=sorted(paths.BUILDS),
                   help=f"the Debian build to boot (default {paths.DEFAULT_BUILD})")
    p.add_argument("--xen", type=Path, metavar="IMAGE",
                   help="the multiboot2 Xen image to boot (instead of --build)")
    p.add_argument("--xen-syms", type=Path, metavar="FILE",
                   help="xen-syms matching IMAGE (default: the build's)")
    p.add_argument("-m", "--memory", type=int, default=1024, metavar="MB")
    p.add_argument("--timeout", type=float, default=240.0, metavar="S",
                   help="give up if Xen has not reached its entry after S seconds")
    args = p.parse_args(argv)
    try:
        args.xen, args.xen_syms = paths.image_and_syms(args.build, args.xen, args.xen_syms)
    except ValueError as e:
        p.error(str(e))
    if args.xen_syms is None:
        p.error("--xen needs the matching --xen-syms (the demo reads Xen's symbols)")
    return args


def run_gdb_at_terminal(cmd) -> int:
    """GDB in the foreground of this terminal. Ctrl-C is GDB's (it stops the guest):
    the terminal sends SIGINT to the whole foreground group, so this wrapper ignores it
    while GDB runs, and GDB gets the default disposition back to install its own."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return subprocess.call(cmd, preexec_fn=lambda: signal.signal(signal.SIGINT,
                                                                     signal.SIG_DFL))
    finally:
        signal.signal(signal.SIGINT, previous)


def run(args) -> int:
    lab = Lab(LabConfig(xen_image=args.xen, xen_syms=args.xen_syms, memory_mb=args.memory))
    t0 = time.monotonic()
    try:
        lab.start()
        print(f"demo: QEMU started (pid {lab.pid}), gdbstub on {lab.gdb_target}, "
              f"serial log {lab.serial_log}", flush=True)
        if args.interactive:
            cmd = [gdb_binary(), "-nx", "-q", "-ex", f"source {GDBINIT}",
                   "-ex", f"target remote {lab.gdb_target}",
                   "-ex", f"xen-syms {args.xen_syms}",
                   "-ex", f"xen-run-to {ENTRY} --timeout {args.timeout:.0f}",
                   "-ex", "xen-regs"]
            return run_gdb_at_terminal(cmd)
        with GdbSession(log=lab.workdir / "gdb.log") as gdb:
            gdb.execute(f"target remote {lab.gdb_target}")
            gdb.execute(f"xen-syms {args.xen_syms}")
            reached = gdb.execute(f"xen-run-to {ENTRY} --timeout {args.timeout:.0f}",
                                  timeout=args.timeout + 30)
            print(f"demo: {reached.out.strip().splitlines()[-1]}\n")
            for title, command in report_commands(args.xen_syms) + crash_commands():
                reply = gdb.execute(command, check=False, timeout=CRASH_WAIT_S)
                print(f"== {title}\n(gdb) {command}")
                # A failing check prints its report, then its one-line error.
                if reply.out.strip():
                    print(reply.out.rstrip())
                if reply.error:
                    print(reply.error)
                print()
        print(f"demo: done in {time.monotonic() - t0:.1f} s; QEMU stopped")
        return 0
    finally:
        lab.stop()


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return run(args)
    except GdbextError as err:
        print(f"demo: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("demo: interrupted; QEMU stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
