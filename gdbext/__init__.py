"""gdbext: see and check x86-64 page tables while Xen boots under QEMU.

Three worlds: ``gdbext.core`` (pure Python, never imports ``gdb``: the models,
checks and every decision), ``gdbext.gdb_layer`` (inside GDB: the one context and
the commands, thin glue over the core) and ``gdbext.host`` (programs outside GDB:
the lab, the GDB driver, xen-boot-check, the demo, the benchmarks).
"""

__version__ = "0.1.0"
