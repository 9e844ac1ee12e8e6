"""Programs that run outside GDB: the lab (QEMU + OVMF + GRUB + Xen), the GDB driver,
``xen-boot-check``, the demo and the benchmarks. They drive a real GDB over a pipe
and never import ``gdb`` or ``gdbext.gdb_layer``; the GDB layer never imports them."""
