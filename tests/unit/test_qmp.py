"""gdbext.core.qmp against a QMP-speaking UNIX socket in this process: the greeting,
qmp_capabilities, events skipped, the command's return, QEMU's refusal as one line."""

import json
import socket
import threading

import pytest

from gdbext.core import qmp


def fake_qemu(path, answer):
    """Serve one QMP client: greet, accept capabilities, send an event, then ``answer``."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)
    seen = []

    def serve():
        conn, _ = srv.accept()
        f = conn.makefile("rw")
        f.write(json.dumps({"QMP": {"version": {"qemu": {"major": 7}}, "capabilities": []}})
                + "\n")
        f.flush()
        for reply in ({"return": {}}, answer):
            seen.append(json.loads(f.readline()))
            f.write(json.dumps({"event": "RESUME", "timestamp": {}}) + "\n")
            f.write(json.dumps(reply) + "\n")
            f.flush()
        conn.close()
        srv.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t, seen


def test_one_command_and_its_return(tmp_path):
    t, seen = fake_qemu(tmp_path / "q.sock", {"return": {"status": "paused"}})
    got = qmp.qmp_execute(str(tmp_path / "q.sock"), "set-action", {"reboot": "reset"})
    t.join(5)
    assert got == {"status": "paused"}
    assert seen == [{"execute": "qmp_capabilities"},
                    {"execute": "set-action", "arguments": {"reboot": "reset"}}]


def test_refusal_is_one_line(tmp_path):
    t, _ = fake_qemu(tmp_path / "q.sock", {"error": {"class": "GenericError",
                                                      "desc": "no such action"}})
    with pytest.raises(qmp.QmpError) as e:
        qmp.qmp_execute(str(tmp_path / "q.sock"), "set-action", {"reboot": "nope"})
    t.join(5)
    assert str(e.value) == "QEMU refused QMP set-action: no such action"


def test_missing_socket_is_one_line(tmp_path):
    with pytest.raises(qmp.QmpError) as e:
        qmp.qmp_execute(str(tmp_path / "none.sock"), "query-status")
    assert "none.sock" in str(e.value) and "\n" not in str(e.value)
