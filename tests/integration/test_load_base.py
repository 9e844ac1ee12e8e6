"""The load base B found by xen-run-to agrees with what Xen prints on its console.

Covers both ways xen-run-to learns B: from RIP at the entry (the likeliest
candidates), and from xen_phys_start at __high_start after a forced miss,
followed by the reset-and-boot-again fallback.
"""

from __future__ import annotations

import re

from gdbext.core.xensyms import load_xen_syms
from gdbext.host.lab import XEN_LOAD_BASE_RE

from .conftest import booted_to


def test_entry_base_matches_xen_console(at_entry_consumable, xen_syms_path):
    stop = at_entry_consumable
    assert stop.run["at"] == "load address" and stop.run["resets"] == 0
    rip = stop.qemu_registers()["rip"]          # QEMU's, before Xen runs on
    console_base = stop.console_load_base()
    assert console_base == stop.run["load_base"]
    # The entry is at B + offset, B being Xen's own word (not derived from RIP).
    assert rip == console_base + load_xen_syms(xen_syms_path).offset("__efi64_mb2_start")


def test_missed_guess_resets_and_stops_on_next_boot(xen_syms_path):
    # A base GRUB never picks (0: below the firmware's own use of low memory)
    # makes the first boot miss; xen-run-to must learn B at __high_start, reset,
    # and stop at the entry on the second boot.
    with booted_to("__efi64_mb2_start --base 0", xen_syms_path) as stop:
        run = stop.run
        assert run["resets"] == 1
        assert run["at"] == "load address"
        regs = stop.json("xen-regs --json")
        assert regs["rip"] == run["rip"]
        # The first boot was reset before Xen printed anything of its own.
        assert not re.search(XEN_LOAD_BASE_RE, stop.lab.serial_text())
        assert stop.console_load_base() == run["load_base"]
