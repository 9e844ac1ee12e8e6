"""Checking the replies of QEMU's gdbstub, one by one, for shape and step.

QEMU 7.2's gdbstub does not offer ``QStartNoAckMode``, so GDB waits for an ack
after each packet and, when none comes within ``remotetimeout`` (QEMU stalled:
SIGSTOP, a loaded host), sends the packet again. QEMU then answers every copy,
and from there on each request is paired with the reply to an earlier one: a
memory read answered with the previous read's bytes, a ``qqemu.PhyMemMode``
query answered with hex. GDB does not notice (the shapes often fit), so every
reply is checked here against what its request must produce, and a sentinel
whose answer is known is sent after each page: a copy of any reply lands on a
request of another shape within two requests, before the page is used.

Never imports gdb: the backend passes the replies in.
"""

from __future__ import annotations

import re
from typing import Iterator, Optional, Tuple

from .errors import GdbextError, MemoryReadError

# QEMU 7.2 refuses an 'm' packet of more than MAX_PACKET_LENGTH / 2 bytes ("E22").
MAX_READ_CHUNK = 2048

_HEX = re.compile(r"[0-9a-fA-F]*")
_ERROR = re.compile(r"E[0-9a-fA-F]{2}")


class ReplyOutOfStep(GdbextError):
    """The stub's replies no longer pair with GDB's requests; nothing read is usable."""

    def __init__(self, what: str, got: str, *, remotetimeout: Optional[int] = None,
                 address: Optional[str] = None):
        self.what = what
        self.got = got
        super().__init__(out_of_step_message(what, got, remotetimeout=remotetimeout,
                                             address=address))


def out_of_step_message(what: str, got: str, *, remotetimeout: Optional[int] = None,
                        address: Optional[str] = None) -> str:
    """One line: what happened, that nothing was used, and what to do."""
    shown = got if len(got) <= 24 else f"{got[:20]}... ({len(got)} chars)"
    wait = f"{remotetimeout} s" if remotetimeout is not None else "its timeout"
    target = f"target remote {address}" if address else "target remote HOST:PORT"
    return (f"QEMU's gdbstub replies are out of step with GDB's requests ({what} was "
            f"answered {shown!r}: QEMU stalled longer than 'remotetimeout' ({wait}) and GDB "
            f"re-sent a packet); nothing from these reads was printed: once QEMU answers "
            f"again, reconnect with 'disconnect' then '{target}' (the guest stays "
            f"stopped), and 'set remotetimeout 10' on a loaded host")


def read_chunks(pa: int, size: int, chunk: int = MAX_READ_CHUNK) -> Iterator[Tuple[int, int]]:
    """(pa, length) of the 'm' packets that read ``size`` bytes from ``pa``."""
    end = pa + size
    while pa < end:
        n = min(chunk, end - pa)
        yield pa, n
        pa += n


def m_packet(pa: int, size: int) -> str:
    return f"m{pa:x},{size:x}"


def check_m_reply(reply: str, pa: int, size: int) -> bytes:
    """The bytes of a reply to ``m PA,SIZE``: exactly ``2 * size`` hex digits.

    ``Exx`` is the stub refusing the read (MemoryReadError, once the caller has
    confirmed by its sentinel that the stream is in step); any other shape is a
    reply to another request (ReplyOutOfStep)."""
    if _ERROR.fullmatch(reply):
        raise MemoryReadError(pa, size, f"not backed by RAM or a device (QEMU replied {reply})")
    if len(reply) != 2 * size or not _HEX.fullmatch(reply):
        raise ReplyOutOfStep(f"a read of {size} bytes at {pa:#x}", reply)
    return bytes.fromhex(reply)


def check_mode_query(reply: str, expected: Optional[str] = None) -> str:
    """A reply to ``qqemu.PhyMemMode``: "0" or "1" (and ``expected`` if given)."""
    if reply not in ("0", "1") or (expected is not None and reply != expected):
        want = f"'{expected}'" if expected is not None else "'0' or '1'"
        raise ReplyOutOfStep(f"the physical-mode query (which answers {want})", reply)
    return reply


def check_ok(reply: str, what: str) -> None:
    """A reply that must be ``OK`` (Qqemu.PhyMemMode:N)."""
    if reply != "OK":
        raise ReplyOutOfStep(f"{what} (which answers 'OK')", reply)


def check_xp_lines(words_by_address, start: int, count: int, pa: int, size: int) -> list:
    """``monitor xp /COUNTgx START``: [(address, [qwords])] as printed must cover exactly
    START, START + 8, ... (each line names its address, so an answer to another
    request shows)."""
    words = []
    expected = start
    for address, line_words in words_by_address:
        if address != expected:
            raise ReplyOutOfStep(f"'monitor xp' of {count} qwords at {start:#x}",
                                 f"{address:x}: ...")
        words.extend(line_words)
        expected += 8 * len(line_words)
    if len(words) != count:
        raise MemoryReadError(pa, size, f"short answer from monitor xp ({len(words)} of "
                                        f"{count} qwords)")
    return words
