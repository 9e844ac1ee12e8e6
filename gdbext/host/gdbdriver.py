"""Drive a real GDB (Debian's, with our extension) from Python, for tests and scripts.

``GdbSession`` keeps one GDB process alive, talking over a pipe: each command
is wrapped by ``gdbext.gdb_layer.harness.run`` inside GDB, which answers with
one framed JSON line, so output and errors are read back reliably. This module
never imports ``gdb``; it runs outside GDB.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

from ..core.errors import GdbextError
from ..core.wire import MARKER
from ..paths import GDBINIT
from .lab import Lab, LabConfig


class GdbCommandError(GdbextError):
    def __init__(self, cmd: str, message: str, output: str = ""):
        self.cmd = cmd
        self.message = message
        self.output = output
        super().__init__(f"{cmd}: {message}")


@dataclass
class Reply:
    cmd: str
    out: str
    error: Optional[str]

    def json(self):
        """The last line of output that parses as JSON (commands print one with --json)."""
        for line in reversed(self.out.splitlines()):
            line = line.strip()
            if line.startswith("{") or line.startswith("["):
                return json.loads(line)
        raise GdbCommandError(self.cmd, "no JSON in output", self.out)


def gdb_binary() -> str:
    path = shutil.which("gdb")
    if not path:
        raise GdbextError("gdb is not installed: run scripts/setup")
    return path


class GdbSession:
    """One GDB process with gdbext loaded. Stopped by pid in ``close()``, always."""

    def __init__(self, extra_args: Optional[List[str]] = None, log: Optional[Path] = None):
        args = [gdb_binary(), "-nx", "-q", "-iex", "set prompt",
                "-iex", "set pagination off", "-iex", "set confirm off",
                "-iex", "set width 0", "-iex", "set height 0",
                "-ex", f"source {GDBINIT}"] + list(extra_args or [])
        self.log_path = log
        self._log = open(log, "a") if log else None
        self.proc = subprocess.Popen(
            args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, bufsize=1, start_new_session=True, env=dict(os.environ, NO_COLOR="1"))
        self.pid = self.proc.pid
        self._lines: "queue.Queue[Optional[str]]" = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.transcript: List[str] = []
        # Wait until the extension has loaded (or failed to) before the first command.
        self.execute("echo")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def execute(self, cmd: str, timeout: float = 60.0, check: bool = True) -> Reply:
        """Run one GDB command; raise GdbCommandError if it failed and ``check``."""
        if self.proc.poll() is not None:
            raise GdbextError(f"GDB has exited (status {self.proc.returncode}); "
                              f"last output: {' | '.join(self.transcript[-5:])}")
        assert self.proc.stdin is not None
        line = f"python __import__('gdbext.gdb_layer.harness', fromlist=['run']).run({cmd!r})\n"
        self.proc.stdin.write(line)
        self.proc.stdin.flush()
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.interrupt()
                raise GdbCommandError(cmd, f"no answer within {timeout:.0f} s")
            try:
                got = self._lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if got is None:
                raise GdbextError(f"GDB exited while running {cmd!r}; last output: "
                                  f"{' | '.join(self.transcript[-5:])}")
            if self._log:
                self._log.write(got)
                self._log.flush()
            at = got.find(MARKER)
            if at >= 0:
                data = json.loads(got[at + len(MARKER):])
                if data["cmd"] != cmd:
                    # The late answer of an earlier command that timed out here: not ours.
                    self.transcript.append(f"(late reply to {data['cmd']!r})")
                    continue
                reply = Reply(data["cmd"], data["out"], data["error"])
                if check and reply.error:
                    raise GdbCommandError(cmd, reply.error, reply.out)
                return reply
            self.transcript.append(got.rstrip("\n"))

    def interrupt(self) -> None:
        """Ctrl-C, as a user would press it: GDB stops the guest."""
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGINT)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write("detach\nquit\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired, ValueError):
                pass
        if self.proc.poll() is None:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=5)
        if self._log:
            self._log.close()
            self._log = None

    def __enter__(self) -> "GdbSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def lab_session(config=None, xen_syms=None) -> Iterator[Tuple[Lab, GdbSession]]:
    """A lab (QEMU + OVMF + GRUB + Xen, halted at its first instruction) with GDB
    attached, gdbext loaded and xen-syms given (the config's, unless ``xen_syms``).
    GDB and QEMU are stopped by pid on exit, pass or fail; closing GDB early (to
    detach and let Xen run on) is allowed."""
    lab = Lab(config if config is not None else LabConfig())
    gdb = None
    try:
        lab.start()
        gdb = GdbSession(log=lab.workdir / "gdb.log")
        gdb.execute(f"target remote {lab.gdb_target}")
        for setting in lab.gdb_settings():
            gdb.execute(setting)
        gdb.execute(f"xen-syms {xen_syms or lab.config.xen_syms}")
        yield lab, gdb
    finally:
        if gdb is not None:
            gdb.close()
        lab.stop()
