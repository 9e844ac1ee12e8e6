"""One QMP command over QEMU's QMP socket (``-qmp unix:PATH,server=on,wait=off``).

QEMU's human monitor (what ``monitor CMD`` reaches through the gdbstub) has no
``set-action``; QMP does. gdbext needs it for one thing: with ``-action
reboot=shutdown`` in force (the lab's way to keep a triple fault's state), a
``system_reset`` is turned into a shutdown too, so gdbext's own reset switches the
reboot action to ``reset`` around it. The protocol is line-delimited JSON: a greeting,
``qmp_capabilities``, then the command; asynchronous events may come in between.
"""

from __future__ import annotations

import json
import socket
from typing import Optional

from .errors import GdbextError

QMP_TIMEOUT_S = 30.0   # QEMU answers in its main loop: slow only on a loaded machine


class QmpError(GdbextError):
    """The QMP socket could not be used, or QEMU refused the command."""


def qmp_execute(path: str, command: str, arguments: Optional[dict] = None,
                timeout: float = QMP_TIMEOUT_S):
    """Run one QMP command on the socket at ``path``; return its "return" value."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            stream = sock.makefile("rw", encoding="utf-8", newline="\n")

            def reply(what: str) -> dict:
                while True:
                    line = stream.readline()
                    if not line:
                        raise QmpError(f"QMP socket {path} closed while waiting for {what}")
                    msg = json.loads(line)
                    if "event" in msg:
                        continue
                    return msg

            greeting = reply("QEMU's greeting")
            if "QMP" not in greeting:
                raise QmpError(f"{path} is not a QMP socket (it said {line_of(greeting)})")
            for cmd, args in (("qmp_capabilities", None), (command, arguments)):
                req = {"execute": cmd}
                if args:
                    req["arguments"] = args
                stream.write(json.dumps(req) + "\n")
                stream.flush()
                msg = reply(cmd)
                if "error" in msg:
                    err = msg["error"]
                    raise QmpError(f"QEMU refused QMP {cmd}: {err.get('desc', err)}")
            return msg.get("return")
    except (OSError, ValueError) as err:
        raise QmpError(f"QMP socket {path}: {getattr(err, 'strerror', None) or err}") from None


def line_of(msg: dict) -> str:
    return json.dumps(msg)[:120]
