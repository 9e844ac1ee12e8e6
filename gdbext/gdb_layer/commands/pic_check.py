"""xen-pic-check: which instructions of the code Xen runs at its load address need
linked VAs (absolute addresses, static pointers, pointer tables, jump tables).

Offline: the check decodes the loaded xen-syms' own bytes (``core.piccheck``, shared
with scripts/xen-pic-check and cached per build-id), so it needs no target.  This
command parses, takes the context's xen-syms and prints.
"""

from __future__ import annotations

from ...core import piccheck
from ..command import CommandParser, XenCommand


class PicCheckCommand(XenCommand):
    name = "pic-check"
    summary = piccheck.SUMMARY
    complete_positional = "function"
    complete_values = {"--efi": "file", "--xen-efi": "file", "--efi-map": "file",
                       "--xen-efi-map": "file"}

    def make_parser(self) -> CommandParser:
        p = CommandParser(description=piccheck.DESCRIPTION + " Uses the xen-syms loaded "
                          "with 'xen-syms'.", epilog=piccheck.EPILOG)
        piccheck.add_options(p)
        return p

    def run(self, args, from_tty):
        report = piccheck.check_for_args(self.ctx.require_syms(), args)
        self.print_report(report, args.json, from_tty)


def install(ctx) -> None:
    PicCheckCommand(ctx)
