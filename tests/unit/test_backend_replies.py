"""The backend against a simulated stub whose replies fall out of step.

The simulation is what GDB 13 + QEMU 7.2 do when QEMU stalls longer than
``remotetimeout`` (reproduced on the real boot, see tests/integration/
test_stall.py): GDB re-sends the packet it got no ack for, QEMU answers each
copy, and every later request is paired with the reply to the one before.
GDB's ``read_memory`` takes whatever reply comes as the bytes it asked for.

A tiny stand-in for the ``gdb`` module is installed for these tests only.
"""

from __future__ import annotations

import importlib
import re
import sys
import types

import pytest

from gdbext.core import paging, rsp
from gdbext.core.memory import SyntheticMemory
from gdbext.core.paging import MODE_4LEVEL, PagingContext
from tests.unit.paging_builders import PRW, PTBuilder

SIZE_4K = 0x1000


class FakeStub:
    """QEMU's gdbstub over SyntheticMemory, with GDB's side of the reply stream."""

    def __init__(self, mem: SyntheticMemory):
        self.mem = mem
        self.phys = 0
        self.pending = []            # replies sent by QEMU, not yet read by GDB
        self.stall_at = None         # request number to be sent twice (a stall)
        self.requests = 0

    def _answer(self, packet: str) -> str:
        if packet == "qqemu.PhyMemMode":
            return str(self.phys)
        if packet.startswith("Qqemu.PhyMemMode:"):
            self.phys = int(packet.split(":")[1])
            return "OK"
        m = re.fullmatch(r"m([0-9a-f]+),([0-9a-f]+)", packet)
        if m:
            pa, n = int(m.group(1), 16), int(m.group(2), 16)
            if n > 2048:
                return "E22"
            try:
                return self.mem.read_phys(pa, n).hex()
            except Exception:  # noqa: BLE001 - an unbacked address
                return "E14"
        return ""

    def exchange(self, packet: str) -> str:
        self.requests += 1
        copies = 2 if self.requests == self.stall_at else 1
        for _ in range(copies):
            self.pending.append(self._answer(packet))
        return self.pending.pop(0)


def make_fake_gdb(stub: FakeStub) -> types.ModuleType:
    g = types.ModuleType("gdb")

    class error(RuntimeError):
        pass

    class MemoryError_(error):
        pass

    g.error = error
    g.MemoryError = MemoryError_
    g.GdbError = type("GdbError", (Exception,), {})
    g.events = types.SimpleNamespace()

    def execute(cmd, to_string=False):
        if cmd.startswith("maintenance packet "):
            packet = cmd[len("maintenance packet "):]
            return f'sending: "{packet}"\nreceived: "{stub.exchange(packet)}"\n'
        raise error(f"not simulated: {cmd}")

    class Inferior:
        pid = 1
        connection = types.SimpleNamespace(details="127.0.0.1:1234")

        def threads(self):
            return [object()]

        def read_memory(self, addr, length):
            # GDB 13: 'm' packets of at most 2048 bytes, the reply decoded as it comes.
            out = b""
            while len(out) < length:
                n = min(2048, length - len(out))
                reply = stub.exchange(f"m{addr + len(out):x},{n:x}")
                if reply.startswith("E") or not re.fullmatch(r"[0-9a-f]+", reply):
                    raise MemoryError_(f"Cannot access memory at address {addr:#x}")
                out += bytes.fromhex(reply)[:n]
            return memoryview(out)

    class Thread:
        def is_running(self):
            return False

    g.execute = execute
    g.selected_inferior = lambda: Inferior()
    g.selected_thread = lambda: Thread()
    g.selected_frame = lambda: object()
    g.parameter = lambda name: 2 if name == "remotetimeout" else None
    return g


@pytest.fixture
def tables():
    """A 4-level tree with many distinct 4 KiB leaves, so a shifted read shows."""
    b = PTBuilder("4-level", ram_size=1 << 30)
    for i in range(64):
        # every other page, so that consecutive entries never coalesce
        b.map(0x4000_0000 + i * 0x20_0000, 0x80_0000 + i * 0x2000, SIZE_4K, flags=PRW)
        b.map(0x4000_0000 + i * 0x20_0000 + SIZE_4K, 0x90_0000 + i * 0x3000, SIZE_4K,
              flags=PRW)
    return b


@pytest.fixture
def backend(monkeypatch):
    def load(stub):
        monkeypatch.setitem(sys.modules, "gdb", make_fake_gdb(stub))
        sys.modules.pop("gdbext.gdb_layer.backend", None)
        return importlib.import_module("gdbext.gdb_layer.backend")
    yield load
    sys.modules.pop("gdbext.gdb_layer.backend", None)


def tree(backend_mod, stub, root):
    t = backend_mod.GdbTarget()
    ctx = PagingContext(MODE_4LEVEL)
    with t.phys_mode():
        rows = paging.tree_rows(ctx, t.cache, root)
    return t, rows


def test_a_stall_at_any_request_gives_the_right_tree_or_the_one_line(tables, backend):
    stub = FakeStub(tables.mem)
    mod = backend(stub)
    _, right = tree(mod, stub, tables.root)
    total = stub.requests
    assert stub.phys == 0 and len(right) > 100
    outcomes = {"right": 0, "refused": 0}
    for at in range(1, total + 1):
        stub = FakeStub(tables.mem)
        mod = backend(stub)
        stub.stall_at = at
        try:
            _, rows = tree(mod, stub, tables.root)
        except rsp.ReplyOutOfStep as err:
            assert "\n" not in str(err) and "out of step" in str(err)
            assert "disconnect" in str(err) and "remotetimeout" in str(err)
            outcomes["refused"] += 1
        else:
            assert rows == right, f"stall at request {at} of {total}: a wrong tree"
            outcomes["right"] += 1
        # QEMU is left in virtual mode whatever happened (it handles packets in order).
        assert stub.phys == 0, at
    # A copy of any reply but the last is found (the last has nothing after it).
    assert outcomes["refused"] >= total - 1, outcomes


def test_out_of_step_is_remembered_until_the_connection_is_renewed(tables, backend):
    stub = FakeStub(tables.mem)
    mod = backend(stub)
    stub.stall_at = 5
    t = mod.GdbTarget()
    with pytest.raises(rsp.ReplyOutOfStep):
        with t.phys_mode():
            paging.tree_rows(PagingContext(MODE_4LEVEL), t.cache, tables.root)
    with pytest.raises(rsp.ReplyOutOfStep):
        with t.phys_mode():
            t.cache.read_phys(tables.root, 8)
    # A reconnect (connection_removed) starts a fresh stream.
    stub.pending.clear()
    t.forget_connection()
    with t.phys_mode():
        assert t.cache.read_phys(tables.root, 8) == tables.mem.read_phys(tables.root, 8)


def test_a_non_ok_restore_is_not_ignored(tables, backend):
    stub = FakeStub(tables.mem)
    mod = backend(stub)
    t = mod.GdbTarget()
    with pytest.raises(rsp.ReplyOutOfStep):
        with t.phys_mode():
            t.cache.read_phys(tables.root, 8)
            stub.stall_at = stub.requests + 1    # the next request is the restore
    assert stub.phys == 0


def test_reply_checks():
    assert rsp.check_m_reply("0011", 0x1000, 2) == b"\x00\x11"
    with pytest.raises(rsp.ReplyOutOfStep):
        rsp.check_m_reply("OK", 0x1000, 2)
    with pytest.raises(rsp.ReplyOutOfStep):
        rsp.check_m_reply("001122", 0x1000, 2)
    with pytest.raises(paging.MemoryReadError):
        rsp.check_m_reply("E14", 0x1000, 2)
    with pytest.raises(rsp.ReplyOutOfStep):
        rsp.check_mode_query("mp01.01")
    with pytest.raises(rsp.ReplyOutOfStep):
        rsp.check_mode_query("0", "1")
    with pytest.raises(rsp.ReplyOutOfStep):
        rsp.check_ok("1", "switching")
    assert list(rsp.read_chunks(0x1000, 4096)) == [(0x1000, 2048), (0x1800, 2048)]
