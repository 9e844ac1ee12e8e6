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


class GuestCrashed(GdbextError):
    """The guest died while gdbext drove it: a CPU exception caught at its handler
    (kind "fault"), a triple fault or reset ("triple-fault"), no stop within the
    hang wait ("hang"), or one of Xen's own fatal paths ("xen-fatal").

    The message is the one-line summary ("the guest crashed: #PF at ... CR2 ...");
    ``report`` has ``text()`` (lines, or a string) and ``as_dict()`` for JSON. Every
    place that runs the guest lets it through to the command, which ends with it (a
    session keeps the stops before it and records the crash at the stop where it
    happened)."""

    def __init__(self, kind: str, summary: str, report=None):
        super().__init__(summary)
        self.kind = kind
        self.summary = summary
        self.report = report

    def as_dict(self) -> dict:
        detail = self.report.as_dict() if self.report is not None else {}
        # The crash's own line wins over the report's (which lacks "the guest crashed").
        return {**detail, "kind": self.kind, "summary": self.summary}
