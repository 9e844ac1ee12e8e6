"""xen-mb2-break: the step-by-step session around __efi64_mb2_start.

The session itself (planting the planned stops, continuing, recording each stop
with its table changes and checks) is ``boot_session.BootSession``, shared with
the walkthrough, over ``core.mb2session``'s bookkeeping.  Interactive: the
context passes GDB's stop events to the running session, so each ``continue``
stops at the next stop with its report.  ``--batch`` continues through every
stop itself, with a timeout on each wait.
"""

from __future__ import annotations

import gdb

from ...core import bootstops
from ...core.bootstops import STOP_ORDER
from ...core.errors import GdbextError
from ...core.mb2session import SessionOptions, failed_checks
from ..boot_session import BootSession
from ..command import CommandParser, XenCommand, add_json_option, emit, output_width, use_color


def _names(values) -> tuple:
    return tuple(values or ())


class Mb2BreakCommand(XenCommand):
    name = "mb2-break"
    summary = ("Stop at each step of Xen's multiboot2+EFI boot around __efi64_mb2_start and "
               "report CR3, the tables and the checks there.")
    complete_values = {"--stops": "stop", "--skip-stops": "stop", "--only": "check",
                       "--skip": "check"}

    def make_parser(self) -> CommandParser:
        p = CommandParser(
            description=self.summary + " Runs to __efi64_mb2_start first (no load address "
            "needed; works before GRUB has loaded Xen under QEMU TCG), then plants silent "
            "breakpoints at the stops computed from xen-syms: "
            + ", ".join(STOP_ORDER) + " (those this build has). Without --batch it stops "
            "at the entry with its report and each 'continue' stops at the next stop. If "
            "Xen is already past its entry, the machine is reset (monitor system_reset) and "
            "the session starts on the next boot.",
            epilog="Examples: xen-mb2-break;  xen-mb2-break --batch --predict --json;  "
                   "xen-mb2-break --stops '__efi64_mb2_start,trampoline cr3 load'")
        p.add_argument("--batch", action="store_true",
                       help="continue through every stop to the last one and print a summary")
        p.add_argument("--stops", action="append", default=[], metavar="NAMES",
                       help="only these stops (comma-separated, repeatable)")
        p.add_argument("--skip-stops", action="append", default=[], metavar="NAMES",
                       help="not these stops")
        p.add_argument("--only", action="append", default=[], metavar="IDS",
                       help="only these checks, e.g. I4,I9")
        p.add_argument("--skip", action="append", default=[], metavar="IDS",
                       help="not these checks")
        p.add_argument("--predict", action="store_true",
                       help="at the entry, check the merged L4 the RFC would build")
        p.add_argument("--assume-relocated", action="store_true",
                       help="with --predict: the variant that first adds B to the upper half")
        p.add_argument("--keep-going", action="store_true",
                       help="with --batch: go on after a failed check")
        p.add_argument("--timeout", type=float, default=120.0, metavar="S",
                       help="the longest each wait may take (default 120)")
        add_json_option(p)
        return p

    def run(self, args, from_tty):
        ctx = self.ctx
        if args.assume_relocated and not args.predict:
            raise GdbextError("xen-mb2-break: --assume-relocated qualifies --predict: give both")
        if args.timeout <= 0:
            raise GdbextError(f"xen-mb2-break: --timeout {args.timeout:g}: give seconds > 0")
        syms = ctx.require_syms()
        options = SessionOptions(
            stops=_names(args.stops), skip_stops=_names(args.skip_stops),
            only=_names(args.only), skip=_names(args.skip), predict=args.predict,
            assume_relocated=args.assume_relocated, keep_going=args.keep_going,
            timeout=args.timeout, json=args.json,
            color=use_color(from_tty) and not args.json,
            width=None if args.json else output_width(from_tty))
        session = BootSession(ctx, syms, options)
        if ctx.boot_session is not None:
            ctx.boot_session.finish()   # a new session replaces the old one's breakpoints
        ctx.boot_session = session
        record = session.start(args.timeout, announce=not args.json)
        pending = session.pending
        if args.batch:
            self._batch(session, args, from_tty)
            return
        if record is not None:
            session.print_record(record)
        if not args.json:
            planted = [s.name for s in session.selected if s is not session.plan.entry
                       and s.name not in pending]
            helpers = [f"{h.name} (a helper stop, to learn trampoline_phys)"
                       for h in session.book.helpers]
            gdb.write("xen-mb2-break: planted " + (", ".join(planted + helpers) or "nothing")
                      + (f"; later: {', '.join(pending)}" if pending else "")
                      + ". 'continue' stops at the next one.\n")
            for note in session.plan.notes:
                gdb.write(f"  note: {note}\n")
        if not session.book.more_to_come():
            session.finish()

    def _batch(self, session: BootSession, args, from_tty: bool) -> None:
        result = session.run_batch()
        if args.json:
            self.write_json(result)
        else:
            emit(bootstops.summary_text(result), from_tty)
        fails = failed_checks(result)
        if fails:
            raise GdbextError(f"xen-mb2-break: {len(fails)} check(s) failed: "
                              + ", ".join(fails[:6]) + (" ..." if len(fails) > 6 else ""))
        if result["error"]:
            raise GdbextError(f"xen-mb2-break: {result['error']}")


def install(ctx) -> None:
    Mb2BreakCommand(ctx)
