"""gdbext: see and check x86-64 page tables while Xen boots under QEMU.

Three worlds: ``gdbext.core`` (pure Python, never imports ``gdb``: the models,
checks and every decision), ``gdbext.gdb_layer`` (inside GDB: the one context and
the commands, thin glue over the core) and ``gdbext.host`` (programs outside GDB:
the lab, the GDB driver, xen-boot-check, the demo, the benchmarks).
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
    from .gdb_layer import registry

    if registry.install():
        gdb.write("gdbext loaded: 'help xen' lists the commands\n")
    return True
