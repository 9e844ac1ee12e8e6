"""gdbext: see and check x86-64 page tables while Xen boots under QEMU.

The package splits into ``gdbext.core`` (pure Python, never imports ``gdb``)
and ``gdbext.gdb_layer`` (thin GDB front end, imported only inside GDB).
"""

__version__ = "0.1.0"
