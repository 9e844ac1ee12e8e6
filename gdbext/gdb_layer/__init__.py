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
    from .command import XenPrefix
    from . import paging_cmds, xen_cmds

    XenPrefix()
    paging_cmds.install()
    xen_cmds.install()
    from . import merge_cmds; merge_cmds.install()
    from . import session_cmds; session_cmds.install()
    from . import diagram_cmds; diagram_cmds.install()
    from . import walkthrough_cmds; walkthrough_cmds.install()
    _INSTALLED = True
    return True
