"""xen-fault: the last CPU exception (or Xen fatal path) gdbext caught, shown again.

The catching itself is ``fault_catch.FaultCatcher`` (``CONTEXT.faults``); this
command only prints what it kept."""

from __future__ import annotations

from ..command import CommandParser, XenCommand, add_json_option, emit
from ..fault_catch import report_lines


class FaultCommand(XenCommand):
    name = "fault"
    summary = "Show the last CPU exception gdbext caught (the guest's crash), explained."

    def make_parser(self) -> CommandParser:
        p = CommandParser(
            description=self.summary + " While gdbext drives the boot ('set xen-catch-faults "
            "on', the default) a crash stops the guest at the exception's handler (or at "
            "Xen's fatal path) and is explained: the vector, the error code decoded, RIP "
            "and CR2 named, the CR3 in force, the walk of the faulting address and where "
            "a bad pointer came from. This shows that report again.",
            epilog="Examples: xen-fault;  xen-fault --json")
        add_json_option(p)
        return p

    def run(self, args, from_tty):
        catcher = self.ctx.faults
        err = catcher.last
        if err is None:
            if args.json:
                self.write_json({"crash": None, "catching": catcher.as_dict(),
                                 "note": catcher.describe()})
            else:
                emit(f"xen-fault: no exception caught ({catcher.describe()})", from_tty)
            return
        if args.json:
            self.write_json({"crash": err.as_dict(), "catching": catcher.as_dict()})
        else:
            emit("\n".join([err.summary] + report_lines(err)), from_tty)


def install(ctx) -> None:
    FaultCommand(ctx)
