"""Framing for programs that drive GDB over a pipe (tests, scripts/demo, CI runners).

``run(cmd)`` executes one GDB command and prints a single line
``@@gdbext@@ {"cmd": ..., "out": ..., "error": ...}`` so the driver never has
to guess where one command's output ends or whether it failed.
"""

from __future__ import annotations

import json

import gdb

from ..gdbdriver import MARKER
from .command import one_line


def run(cmd: str) -> None:
    out = ""
    error = None
    try:
        out = gdb.execute(cmd, to_string=True)
    except KeyboardInterrupt:
        error = "interrupted"
    except gdb.error as err:
        error = one_line(err) or "error"
    # GDB may have printed its prompt on this line already: start a fresh one.
    gdb.write("\n" + MARKER + json.dumps({"cmd": cmd, "out": out, "error": error}) + "\n")
    gdb.flush()
