"""User-facing errors.

Every mistake a user can make (bad address, wrong file, target not connected)
is raised as a ``GdbextError`` whose message is one line naming what was wrong
and what to do. The GDB layer turns it into ``gdb.GdbError`` so that GDB shows
the line and no Python traceback.
"""


class GdbextError(Exception):
    """A problem the user can fix; the message is shown as one line."""


class MemoryReadError(GdbextError):
    """Physical memory could not be read (unbacked, out of RAM, target error)."""

    def __init__(self, pa: int, size: int, why: str = "not readable"):
        self.pa = pa
        self.size = size
        super().__init__(f"physical memory {pa:#x}..{pa + size:#x} is {why}")
