"""Registers every gdbext command, setting and function in GDB, once."""

from __future__ import annotations

from . import functions, settings
from .command import XenPrefix
from .commands import diagram, fault, mb2_break, merge, paging, pic_check, walkthrough, xen
from .context import CONTEXT, raise_remote_timeout

COMMAND_MODULES = (paging, xen, merge, mb2_break, diagram, walkthrough, pic_check, fault)

_INSTALLED = False


def install() -> bool:
    """Register the commands; returns False if they were already registered."""
    global _INSTALLED
    if _INSTALLED:
        return False
    XenPrefix()
    raise_remote_timeout()
    settings.install(CONTEXT)
    for module in COMMAND_MODULES:
        module.install(CONTEXT)
    functions.install(CONTEXT)
    CONTEXT.connect_events()
    CONTEXT.adopt_gdb_file()      # 'gdb xen-syms': the exec file is a Xen build
    _INSTALLED = True
    return True
