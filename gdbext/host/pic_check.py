"""xen-pic-check: the position-independence check of Xen's load-address code, offline.

    xen-pic-check [--xen-syms FILE] [--efi XEN_EFI] [FUNCTION ...] [--json]

Decodes xen-syms (no target, no GDB) from ``__efi64_mb2_start`` (or the FUNCTIONs
given) through everything it calls, and reports every instruction that needs a
linked VA while Xen runs at its load address.  All of the command's logic is in
core/piccheck (parse_args, run_command), which the GDB command shares; this only
loads the file.  Exit status: 0 no finding, 1 findings, 2 the check could not run
(bad input: one line on stderr).
"""

from __future__ import annotations

import sys
from typing import List, Optional

from gdbext import paths
from gdbext.core import piccheck
from gdbext.core.errors import GdbextError
from gdbext.core.xensyms import load_xen_syms


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = piccheck.parse_args(argv, with_syms=True)
        if args is None:
            sys.stdout.write(piccheck.help_text(with_syms=True))
            return piccheck.EXIT_CLEAN
        syms = load_xen_syms(args.xen_syms or paths.XEN_DEBIAN_SYMS)
        text, _, status = piccheck.run_command(syms, args)
    except GdbextError as e:
        msg = str(e)
        if not msg.startswith(piccheck.PROG):
            msg = f"{piccheck.PROG}: error: {msg}"
        sys.stderr.write(msg + "\n")
        return piccheck.EXIT_ERROR
    sys.stdout.write(text + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
