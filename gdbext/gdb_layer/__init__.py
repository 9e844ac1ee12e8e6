"""The thin GDB layer: backend over the remote target and one command class per command.

Imported only inside GDB (it imports ``gdb``). ``install()`` registers every
command; it is idempotent, so sourcing gdbinit.py twice does no harm.
"""

from __future__ import annotations

_INSTALLED = False


def install() -> bool:
    """Register the commands; returns False if they were already registered."""
    global _INSTALLED
    if _INSTALLED:
        return False
    from . import (diagram_cmds, merge_cmds, paging_cmds, session_cmds, walkthrough_cmds,
                   xen_cmds)
    from .command import XenPrefix

    XenPrefix()
    for module in (paging_cmds, xen_cmds, merge_cmds, session_cmds, diagram_cmds,
                   walkthrough_cmds):
        module.install()
    _INSTALLED = True
    return True
