"""gdbext: see and check x86-64 page tables while Xen boots under QEMU.

The package splits into ``gdbext.core`` (pure Python, never imports ``gdb``)
and ``gdbext.gdb_layer`` (thin GDB front end, imported only inside GDB).
Importing ``gdbext`` itself imports neither, so host programs and tests can too.

Inside GDB, once gdbext is on GDB's ``sys.path``::

    (gdb) python import gdbext; gdbext.load()

``source .../gdbext/gdbinit.py`` does the same after finding the package itself.
"""

__version__ = "0.1.0"


def load() -> bool:
    """Register gdbext's commands in the running GDB ('help xen' lists them).

    Takes the dependencies from the venv loading.choose_venv picks when GDB's own
    sys.path lacks them. Returns True when the commands are registered (now or by an
    earlier load), False after writing the one line that says what is missing.
    """
    try:
        import gdb
    except ImportError:
        raise RuntimeError("gdbext.load() registers GDB commands: call it inside GDB "
                           "(gdb -ex 'python import gdbext; gdbext.load()')") from None
    from . import loading

    problem = loading.prepare()
    if problem:
        gdb.write(problem + "\n", gdb.STDERR)
        return False
    from . import gdb_layer

    if gdb_layer.install():
        gdb.write("gdbext loaded: 'help xen' lists the commands\n")
    return True
