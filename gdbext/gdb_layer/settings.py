"""gdbext's GDB settings: ``set xen-maxphyaddr``, ``set xen-phys-read``,
``set xen-ignore-build-id``, ``set xen-catch-faults``, ``set xen-hang-wait``,
``set xen-serial-log``, ``set xen-qemu-int-log``, ``set xen-qmp-socket``. Each parameter
writes its value into the context's
``settings`` (and the phys-read method into its target), where the rest reads it."""

from __future__ import annotations

import gdb


class MaxPhyAddr(gdb.Parameter):
    """Physical-address width (MAXPHYADDR) used to find reserved bits in entries.

GDB cannot read CPUID through QEMU's gdbstub. The default 52 is the architectural
maximum and never reports a false fault; set it to the guest CPU's width (QEMU's
TCG CPUs have 40 unless -cpu ...,phys-bits=N) to catch entries above it."""

    set_doc = "Set the physical-address width used by gdbext's page walks."
    show_doc = "Show the physical-address width used by gdbext's page walks."

    def __init__(self, ctx) -> None:
        super().__init__("xen-maxphyaddr", gdb.COMMAND_DATA, gdb.PARAM_ZUINTEGER)
        self.ctx = ctx
        self.value = ctx.settings.maxphyaddr

    def get_set_string(self) -> str:
        if not 32 <= int(self.value) <= 52:
            bad = self.value
            self.value = self.ctx.settings.maxphyaddr
            raise gdb.GdbError(f"xen-maxphyaddr must be between 32 and 52, not {bad}")
        self.ctx.settings.maxphyaddr = int(self.value)
        return ""


class PhysRead(gdb.Parameter):
    """How gdbext reads guest physical memory.

auto: QEMU's Qqemu.PhyMemMode packet when the stub has it, else 'monitor xp'.
packet: always the packet (fast; also needed by xen-l4merge-apply to write).
monitor-xp: always 'monitor xp' (slower; for stubs without the packet, or to check
one reading against the other)."""

    set_doc = "Set how gdbext reads guest physical memory."
    show_doc = "Show how gdbext reads guest physical memory."
    METHODS = {"auto": None, "packet": "phymem", "monitor-xp": "xp"}

    def __init__(self, ctx) -> None:
        super().__init__("xen-phys-read", gdb.COMMAND_DATA, gdb.PARAM_ENUM,
                         list(self.METHODS))
        self.ctx = ctx
        self.value = ctx.settings.phys_read

    def get_set_string(self) -> str:
        self.ctx.settings.phys_read = self.value
        self.ctx.target.force_method(self.METHODS[self.value])
        return ""


class IgnoreBuildId(gdb.Parameter):
    """Use xen-syms even when its build-id differs from the Xen image in guest memory.

Off by default: with symbols of another build, every name, table and pointer class
gdbext prints would be wrong, so Xen-specific results are refused with a one-line
error naming both build-ids. Turn it on only if you know the two builds lay out
the same (e.g. you rebuilt with a changed build-id only)."""

    set_doc = "Set whether gdbext uses xen-syms whose build-id does not match guest memory."
    show_doc = "Show whether gdbext uses xen-syms whose build-id does not match guest memory."

    def __init__(self, ctx) -> None:
        super().__init__("xen-ignore-build-id", gdb.COMMAND_DATA, gdb.PARAM_BOOLEAN)
        self.ctx = ctx
        self.value = ctx.settings.ignore_build_id

    def get_set_string(self) -> str:
        self.ctx.settings.ignore_build_id = bool(self.value)
        return ""


class CatchFaults(gdb.Parameter):
    """Whether gdbext catches the guest's CPU exceptions while it drives the boot.

On (the default): from the first stop gdbext makes (xen-run-to, xen-mb2-break,
xen-l4merge-apply --call-linked), silent breakpoints sit on the handlers of
vectors 0-31 of the IDT in force (the firmware's), and on Xen's fatal paths once
Xen has loaded its own IDT; a crash stops the guest there and is explained
(xen-fault shows it again). Off: those breakpoints are removed now and none is
planted; a crash then goes unseen by GDB, as without gdbext."""

    set_doc = "Set whether gdbext catches the guest's CPU exceptions during boot."
    show_doc = "Show whether gdbext catches the guest's CPU exceptions during boot."

    def __init__(self, ctx) -> None:
        super().__init__("xen-catch-faults", gdb.COMMAND_RUNNING, gdb.PARAM_BOOLEAN)
        self.ctx = ctx
        self.value = ctx.settings.catch_faults

    def get_set_string(self) -> str:
        self.ctx.settings.catch_faults = bool(self.value)
        self.ctx.faults.set_enabled(bool(self.value))
        return ""


class HangWait(gdb.Parameter):
    """Seconds gdbext waits for a stop it drives the guest to before it looks for a hang.

When xen-run-to, xen-mb2-break or xen-boot-check wait this long without the stop,
gdbext interrupts the guest and samples the CPU (single steps, three times, a second
of running apart). Only a CPU halted with interrupts off, or running the same small
loop every time, is reported as a hang (with where it is and the serial console's
last lines); a CPU that moves on is left to run until the command's --timeout.
0 turns hang detection off (the --timeout alone then ends the wait)."""

    set_doc = "Set the seconds without a stop after which gdbext checks for a hang."
    show_doc = "Show the seconds without a stop after which gdbext checks for a hang."

    def __init__(self, ctx) -> None:
        super().__init__("xen-hang-wait", gdb.COMMAND_RUNNING, gdb.PARAM_ZUINTEGER)
        self.ctx = ctx
        self.value = ctx.settings.hang_wait

    def get_set_string(self) -> str:
        self.ctx.settings.hang_wait = int(self.value)
        return ""


class _PathSetting(gdb.Parameter):
    """A file gdbext reads when the guest dies (empty: not known)."""
    NAME = ""
    FIELD = ""

    def __init__(self, ctx) -> None:
        super().__init__(self.NAME, gdb.COMMAND_RUNNING, gdb.PARAM_OPTIONAL_FILENAME)
        self.ctx = ctx
        self.value = getattr(ctx.settings, self.FIELD)

    def get_set_string(self) -> str:
        setattr(self.ctx.settings, self.FIELD, str(self.value or ""))
        return ""


class SerialLog(_PathSetting):
    """The file QEMU writes the guest's serial console (COM1) to (-serial file:PATH).

A hang report ends with its last lines (the firmware's exception dump, Xen's last
words). The lab sets it when it boots the guest; empty: not known."""

    set_doc = "Set the guest's serial console log that hang reports quote."
    show_doc = "Show the guest's serial console log that hang reports quote."
    NAME = "xen-serial-log"
    FIELD = "serial_log"


class QemuIntLog(_PathSetting):
    """QEMU's -d int,cpu_reset log (-D PATH): the exception chain of a triple fault.

The gdbstub reports only that QEMU paused the machine; with this log gdbext names
the exceptions that led to the triple fault. The lab sets it; empty: not known."""

    set_doc = "Set QEMU's -d int log file that triple-fault reports read."
    show_doc = "Show QEMU's -d int log file that triple-fault reports read."
    NAME = "xen-qemu-int-log"
    FIELD = "qemu_int_log"


class QmpSocket(_PathSetting):
    """QEMU's QMP socket (-qmp unix:PATH,server=on,wait=off).

With -action reboot=shutdown (which keeps a triple fault's state for GDB) QEMU
turns every reset into a pause, gdbext's own 'monitor system_reset' too; through
this socket gdbext switches the reboot action to reset around its own reset.
The lab sets it; empty: not known."""

    set_doc = "Set QEMU's QMP socket gdbext uses around its own resets."
    show_doc = "Show QEMU's QMP socket gdbext uses around its own resets."
    NAME = "xen-qmp-socket"
    FIELD = "qmp_socket"


def install(ctx) -> None:
    for cls in (MaxPhyAddr, PhysRead, IgnoreBuildId, CatchFaults, HangWait, SerialLog,
                QemuIntLog, QmpSocket):
        cls(ctx)

