"""The timer that ends a wait on the running guest: a SIGINT to GDB, as Ctrl-C would.

Used by every 'continue' and single step gdbext drives (context.continue_until,
hang_watch's samples)."""

from __future__ import annotations

import os
import signal
import threading


class Timeout:
    """Interrupt GDB's blocking 'continue' after a while, as Ctrl-C would.

    The SIGINT is sent only while the guest still runs: once GDB has reported a
    stop (``stopped()``, called from the stop event) a late timer does nothing, so a
    stop that came just in time is never turned into a timeout, and no stray SIGINT
    reaches GDB while it is stopped (it would abort the next command)."""

    def __init__(self, seconds: float):
        self.fired = False
        self._stopped = False
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True

    def _fire(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self.fired = True
            os.kill(os.getpid(), signal.SIGINT)

    def stopped(self) -> None:
        with self._lock:
            self._stopped = True

    def __enter__(self):
        if self._timer.interval > 0:
            self._timer.start()
        return self

    def __exit__(self, *exc):
        self.stopped()
        self._timer.cancel()
