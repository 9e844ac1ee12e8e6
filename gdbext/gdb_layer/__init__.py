"""gdbext inside GDB: the one context, the commands, and what they share.

Imported only inside GDB (it imports ``gdb``). The layers, bottom up:

* ``backend.py``: registers and physical memory over QEMU's gdbstub (``GdbTarget``);
* ``context.py``: ``CONTEXT``, the one owner of the target, Xen's state, the
  settings, the merge record and the running boot session, with the helpers
  every command needs at a stop (``require_loaded``, ``situation``, breakpoints);
* ``command.py`` (the command base and parser helpers), ``addresses.py`` (the
  address syntax), ``settings.py`` (the ``set xen-...`` parameters),
  ``functions.py`` (``$xen_pa()`` and friends);
* what several commands share: ``run_to.py``, ``merge_live.py``,
  ``boot_session.py``, ``drawing.py``;
* ``commands/``: one module per family of commands, each a leaf (it imports the
  context, the command base, the shared modules above and the core, never another
  command module);
* ``harness.py`` and ``bench.py``: for programs that drive GDB over a pipe.

To add a command: a ``XenCommand`` subclass in a module of ``commands/`` (parse,
call the core, print), created in that module's ``install(ctx)``, and the module
listed in ``registry.COMMAND_MODULES``; ``registry.install()`` registers them all
(idempotent, so sourcing gdbinit.py twice does no harm). This package's own import
loads nothing, so a module of it can be imported alone (the backend's tests do).
"""
