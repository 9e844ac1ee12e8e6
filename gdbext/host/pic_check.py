"""xen-pic-check: the position-independence check of Xen's load-address code, offline.

    xen-pic-check [--xen-syms FILE] [--xen-efi FILE] [FUNCTION ...] [--json]

Decodes xen-syms (no target, no GDB) from ``__efi64_mb2_start`` (or the FUNCTIONs
given) through everything it calls, and reports every instruction that needs a
linked VA while Xen runs at its load address (core/piccheck).  Exit status: 0 no
finding, 1 findings, 2 the check could not run (bad input: one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from gdbext import paths
from gdbext.core import piccheck
from gdbext.core.errors import GdbextError

PROG = "xen-pic-check"
EXIT_CLEAN, EXIT_FINDINGS, EXIT_ERROR = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage too)
        sys.stderr.write(f"{PROG}: error: {message}\n")
        sys.exit(EXIT_ERROR)


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Which instructions of the code Xen runs at its load "
                "address (multiboot2+EFI) need linked VAs: absolute addresses, static "
                "pointers, pointer tables, jump tables.")
    p.add_argument("functions", nargs="*", metavar="FUNCTION",
                   help=f"start from these functions (default: {piccheck.ENTRY})")
    p.add_argument("--xen-syms", default=str(paths.XEN_DEBIAN_SYMS), metavar="FILE",
                   help="xen-syms ELF (default: Debian's 4.17)")
    p.add_argument("--xen-efi", metavar="FILE",
                   help="xen.efi of the same build: take the static pointers from its base "
                        "relocation table")
    p.add_argument("--xen-efi-map", metavar="FILE",
                   help="xen.efi's .map (default: FILE.map beside xen.efi or xen-syms)")
    p.add_argument("--json", action="store_true", help="the whole result as JSON")
    p.add_argument("--no-cache", action="store_true", help="recompute (the result is cached "
                   "per build-id under the project cache)")
    return p


def run(argv: Optional[List[str]] = None):
    """(report, exit status) for ``argv``; raises GdbextError for bad input."""
    from gdbext.core.xensyms import load_xen_syms
    args = parser().parse_args(argv)
    syms = load_xen_syms(args.xen_syms)
    report = piccheck.check(syms, args.functions or None, efi=args.xen_efi,
                            efi_map=args.xen_efi_map, cache=not args.no_cache)
    return args, report, EXIT_FINDINGS if report.findings else EXIT_CLEAN


def main(argv: Optional[List[str]] = None) -> int:
    try:
        args, report, status = run(argv)
    except GdbextError as e:
        sys.stderr.write(f"{PROG}: error: {e}\n")
        return EXIT_ERROR
    if args.json:
        sys.stdout.write(json.dumps(report.as_dict(), indent=1) + "\n")
    else:
        sys.stdout.write(piccheck.render_text(report) + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
