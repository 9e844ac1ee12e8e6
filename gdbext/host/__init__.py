"""Host-side programs of gdbext: command-line tools that run outside GDB."""
