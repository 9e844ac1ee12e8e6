"""gdbext's commands, one module per family; each module is a leaf with ``install(ctx)``."""
