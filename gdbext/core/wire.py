"""The framing between gdbext inside GDB and the programs that drive GDB over a pipe.

The in-GDB harness (``gdb_layer/harness.py``) answers each command with one line
that starts with ``MARKER`` and holds a JSON object; the host-side driver
(``host/gdbdriver.py``) reads up to that line. Both sides take the marker from here.
"""

MARKER = "@@gdbext@@ "
