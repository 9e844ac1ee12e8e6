"""The core: pure Python, never imports ``gdb``.

Paging model and walker, Xen's symbols and image, the boot stops, the merge
prediction and checks, renderers, and every decision the commands make (which
mode, which source, which stop), as functions over plain interfaces: physical
memory (``memory.PhysMemory``) and registers (a dict). Unit-tested without GDB.
"""
