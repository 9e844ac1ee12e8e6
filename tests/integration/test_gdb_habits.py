"""gdbext as GDB's own habits would have it, on the real boot: guidance for typos,
completion, JSON that jq can read, errors as JSON, the Python API, 'gdb xen-syms',
user breakpoints left alone; and at a terminal (a pty): colour, GDB's width, TAB, and
Ctrl-C in 'scripts/demo --interactive' stopping the guest, not the session.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sys
import time

import pytest

from gdbext import paths
from gdbext.core.xensyms import load_xen_syms
from gdbext.host.gdbdriver import GdbSession

from .conftest import BOOT_TIMEOUT_S

ENTRY = "__efi64_mb2_start"
TARGET = "efi_multiboot2"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r")   # colours, terminal modes, CR


@pytest.fixture(scope="module")
def syms():
    return load_xen_syms(paths.XEN_DEBIAN_SYMS)


def _typo(name: str) -> str:
    """``name`` with two neighbouring letters swapped (a typical typo)."""
    i = len(name) // 2
    return name[:i] + name[i + 1] + name[i] + name[i + 2:]


def test_a_mistyped_symbol_suggests_the_nearest_xen_names(at_entry):
    typo = _typo(TARGET)
    reply = at_entry.gdb.execute(f"xen-va2pa {typo}", check=False)
    assert reply.error and "\n" not in reply.error
    assert "No symbol table is loaded" not in reply.error
    assert f"no symbol {typo!r}" in reply.error and TARGET in reply.error


def test_an_offset_after_at_pa_points_at_the_accepted_form(at_entry):
    reply = at_entry.gdb.execute(f"xen-pa2va {TARGET}@pa+0x10", check=False)
    assert reply.error and f"'{TARGET}+0x10@pa'" in reply.error


def test_json_keeps_every_bit_as_hex_strings(at_entry, syms):
    d = at_entry.json(f"xen-va2pa {TARGET} --json")
    assert d["va"] == syms.linked_va(TARGET) and int(d["va_hex"], 16) == d["va"]
    # jq (a double) would print the VA rounded; the string is exact.
    assert float(d["va"]) != d["va"] or d["va"] < 2 ** 53
    for level in d["levels"]:
        for key, value in level.items():
            if isinstance(value, int) and not isinstance(value, bool):
                assert int(level[key + "_hex"], 16) == value
    pt = at_entry.json("xen-pt --json --limit 3")
    assert all(int(r["va_hex"], 16) == r["va"] and int(r["pa_hex"], 16) == r["pa"]
               for r in pt["ranges"])


def test_a_failing_json_command_prints_a_json_error_object(at_entry):
    reply = at_entry.gdb.execute("xen-va2pa no_such_symbol_here --json", check=False)
    assert reply.error
    obj = json.loads(reply.out.strip().splitlines()[-1])
    assert obj["command"] == "xen-va2pa" and obj["error"] == reply.error


def test_completion_of_options_symbols_stops_and_checks(at_entry):
    def complete(text):
        return at_entry.cmd(f"complete {text}").out.split("\n")
    assert "xen-pt --root" in complete("xen-pt --ro")
    assert "xen pt --limit" in complete("xen pt --lim")
    assert f"xen-va2pa {TARGET}" in complete(f"xen-va2pa {TARGET[:7]}")
    assert f"xen-pa2va {TARGET}@pa" in complete(f"xen-pa2va {TARGET[:7]}")
    assert "xen-mb2-break --stops call-efi_multiboot2" in complete("xen-mb2-break --stops cal")
    assert "xen-l4merge-check --only I13" in complete("xen-l4merge-check --only I1")


def test_python_api_gives_the_commands_results_and_never_raises_on_fail(at_entry, syms):
    script = ("python import json, gdbext.api as x; "
              "r = x.merge_check(predict=True); w = x.walk('efi_multiboot2'); "
              "print(json.dumps({'ok': r['ok'], 'fails': [c['id'] for c in r['checks'] "
              "if c['status'] == 'FAIL'], 'pa': w['pa'], 'va': w['va']}))")
    got = json.loads(at_entry.cmd(script).out.strip().splitlines()[-1])
    cli = at_entry.gdb.execute("xen-l4merge-check --predict --json", check=False).json()
    assert got["ok"] is False and got["ok"] == cli["ok"]
    assert got["fails"] == [c["id"] for c in cli["checks"] if c["status"] == "FAIL"]
    walk = at_entry.json(f"xen-va2pa {TARGET} --json")
    assert (got["va"], got["pa"]) == (walk["va"], walk["pa"])
    bad = at_entry.cmd("python import gdbext.api as x; "
                       "exec(\"try:\\n x.walk('no_such_sym_x')\\nexcept x.Error as e:\\n "
                       "print('ERR', e)\")").out
    assert bad.strip().startswith("ERR ") and "no_such_sym_x" in bad


def test_gdb_started_on_xen_syms_uses_it_and_keeps_user_breakpoints(at_entry_consumable,
                                                                     syms):
    """'gdb xen-syms' (the exec file), a breakpoint set by the user before gdbext learns
    B: adding Xen's symbols at the load address leaves it where the user put it."""
    stop = at_entry_consumable
    gdb = GdbSession(extra_args=[str(paths.XEN_DEBIAN_SYMS)], log=stop.lab.workdir / "gdb2.log")
    try:
        out = gdb.execute("xen-syms").out
        assert str(paths.XEN_DEBIAN_SYMS) in out and "symbols" in out
        stop.gdb.close()                      # one GDB on the stub at a time
        gdb.execute(f"target remote {stop.lab.gdb_target}")
        gdb.execute(f"break {TARGET}")
        before = gdb.execute("info breakpoints").out
        located = gdb.execute("xen-locate")
        assert "load base B" in located.out
        after = gdb.execute("info breakpoints").out
        # One row per breakpoint, or one per location (N.M) when it has several.
        enabled = (re.findall(r"^\d+\s+breakpoint\s+keep\s+y\s+(0x[0-9a-f]+)", after, re.M)
                   + re.findall(r"^\d+\.\d+\s+y\s+(0x[0-9a-f]+)", after, re.M))
        assert [int(a, 16) for a in enabled] == [syms.linked_va(TARGET)], (before, after)
        assert "warning: location number not found" not in after
        assert "is disabled" in located.out or after.count("breakpoint") == 1
    finally:
        gdb.close()


# -- at a terminal ----------------------------------------------------------------------------


class Pty:
    def __init__(self, argv, env=None):
        import pty
        self.pid, self.fd = pty.fork()
        if self.pid == 0:
            os.environ.update(env or {})
            os.execvp(argv[0], argv)
        self.buf = b""

    def read_until(self, pattern: bytes, timeout: float) -> bytes:
        import select
        deadline = time.monotonic() + timeout
        start = len(self.buf)
        while pattern not in self.buf[start:] and time.monotonic() < deadline:
            ready, _, _ = select.select([self.fd], [], [], 0.2)
            if ready:
                try:
                    self.buf += os.read(self.fd, 65536)
                except OSError:
                    break
        assert pattern in self.buf[start:], (pattern, self.buf[-2000:])
        return self.buf[start:]

    def send(self, data: bytes) -> None:
        os.write(self.fd, data)

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)
        os.close(self.fd)


def test_demo_at_a_terminal_colour_width_tab_and_ctrl_c(tmp_path):
    """scripts/demo --interactive on a pty: colour and GDB's width at the prompt, TAB
    completes, Ctrl-C stops the guest (GDB's SIGINT) and the session goes on; quitting
    GDB stops QEMU."""
    env = {"TERM": "xterm", "GDBEXT_LAB_DIR": str(tmp_path)}
    env.pop("NO_COLOR", None)
    os.environ.pop("NO_COLOR", None)
    term = Pty([sys.executable, "-m", "gdbext.host.demo", "--interactive",
                "--timeout", str(BOOT_TIMEOUT_S)], env)
    try:
        head = term.read_until(b"paging mode:", BOOT_TIMEOUT_S + 60)
        qemu_pid = int(re.search(rb"QEMU started \(pid (\d+)\)", head).group(1))
        if b"(gdb) " not in head.split(b"paging mode:", 1)[1]:
            term.read_until(b"(gdb) ", 30)
        term.send(b"set height 0\n")                     # the pager is not under test
        term.read_until(b"(gdb) ", 60)
        term.send(b"set width 80\n")
        term.read_until(b"(gdb) ", 60)
        term.send(b"xen-l4merge-check\n")
        out = term.read_until(b"(gdb) ", 120).decode("utf-8", "replace")
        assert "\x1b[1;31mFAIL\x1b[0m" in out            # coloured at a terminal
        lines = [ANSI.sub("", line).rstrip("\r") for line in out.split("\n")[1:-1]]
        assert lines and max(len(line) for line in lines) <= 80, max(lines, key=len)
        term.send(b"set style enabled off\n")
        term.read_until(b"(gdb) ", 60)
        term.send(b"xen-l4merge-check\n")
        plain = term.read_until(b"(gdb) ", 120).split(b"\n", 1)[1].decode()
        assert "FAIL" in plain and not re.search(r"\x1b\[[0-9;]*m", plain)   # no colour
        term.send(b"xen-pt --ro\t")
        assert b"--root" in term.read_until(b"--root", 60)
        term.send(b"\x15")                                # ^U: drop the line
        # The lab has no dom0: Xen panics soon, and gdbext would catch that (its own
        # test is test_fault_catch). Here the guest must still run when Ctrl-C comes.
        term.send(b"set xen-catch-faults off\n")
        term.read_until(b"(gdb) ", 60)
        term.send(b"continue\n")
        term.read_until(b"Continuing.", 60)
        time.sleep(1)
        term.send(b"\x03")                                # Ctrl-C
        term.read_until(b"SIGINT", 30)
        term.read_until(b"(gdb) ", 60)
        os.kill(qemu_pid, 0)                              # QEMU still there
        term.send(b"xen-regs\n")
        assert b"paging mode" in term.read_until(b"(gdb) ", 30)
        term.send(b"quit\n")
        term.read_until(b"(y or n)", 60)
        term.send(b"y\n")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.kill(qemu_pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        with pytest.raises(ProcessLookupError):
            os.kill(qemu_pid, 0)
    finally:
        term.close()
