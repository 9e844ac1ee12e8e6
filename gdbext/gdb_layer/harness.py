"""Framing for programs that drive GDB over a pipe (tests, scripts/demo, CI runners).

``run(cmd)`` executes one GDB command and prints a single line
``@@gdbext@@ {"cmd": ..., "out": ..., "error": ...}`` so the driver never has
to guess where one command's output ends or whether it failed.

A command that prints a report and then fails (xen-l4merge-check with a FAIL,
xen-mb2-break --batch) must still deliver the report: GDB discards what a
``to_string`` command printed when it raises, so what gdbext itself writes is
also kept aside and becomes ``out`` on failure.
"""

from __future__ import annotations

import json

import gdb

from ..core.wire import MARKER
from .command import one_line


def run(cmd: str) -> None:
    out = ""
    error = None
    printed = []
    real_write = gdb.write

    def keep(text, *args, **kwargs):
        printed.append(text)
        return real_write(text, *args, **kwargs)

    gdb.write = keep
    try:
        out = gdb.execute(cmd, to_string=True)
    except KeyboardInterrupt:
        error = "interrupted"
        out = "".join(printed)
    except gdb.error as err:
        error = one_line(err) or "error"
        out = "".join(printed)
    finally:
        gdb.write = real_write
    # GDB may have printed its prompt on this line already: start a fresh one.
    gdb.write("\n" + MARKER + json.dumps({"cmd": cmd, "out": out, "error": error}) + "\n")
    gdb.flush()
