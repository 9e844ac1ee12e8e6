"""The plain interfaces the core works on: physical memory and registers.

The walker only needs ``read_phys(pa, size) -> bytes``; GDB supplies one over
QEMU's gdbstub, tests supply ``SyntheticMemory``. ``PageCache`` sits between
them so that one walk (or one stop of the guest) reads each 4 KiB page once.
"""

from __future__ import annotations

import struct
from typing import Dict, Mapping, Optional, Protocol, Tuple

from .errors import MemoryReadError
from .x86 import PAGE_SIZE, align_down


class PhysMemory(Protocol):
    def read_phys(self, pa: int, size: int) -> bytes:
        """Return ``size`` bytes at physical address ``pa`` or raise MemoryReadError."""


class Registers(Protocol):
    def read_register(self, name: str) -> int:
        """Return the value of ``name`` (``cr0``, ``cr3``, ``cr4``, ``efer``, ``rip``, ...)."""


ZERO_PAGE = bytes(PAGE_SIZE)


def qwords(raw: bytes) -> Tuple[int, ...]:
    """The little-endian u64s of ``raw`` (a trailing partial qword is dropped)."""
    return struct.unpack(f"<{len(raw) // 8}Q", raw[:len(raw) // 8 * 8])


class PageCache:
    """Reads whole 4 KiB pages from a backend and keeps them until ``clear()``.

    The GDB layer keeps one per stop of the guest and clears it when the guest
    runs or GDB writes memory or registers. ``pages_read`` counts backend reads
    (the benchmark and the tests use it to check each page is read once).
    """

    def __init__(self, backend: PhysMemory, max_pages: int = 1 << 16):
        self.backend = backend
        self.max_pages = max_pages
        self._pages: Dict[int, bytes] = {}
        self._bad: Dict[int, MemoryReadError] = {}
        self.pages_read = 0

    def clear(self) -> None:
        self._pages.clear()
        self._bad.clear()

    def page(self, pa: int) -> bytes:
        """The 4 KiB page containing ``pa`` (which should be page aligned)."""
        base = align_down(pa, PAGE_SIZE)
        data = self._pages.get(base)
        if data is not None:
            return data
        if base in self._bad:
            raise self._bad[base]
        try:
            data = self.backend.read_phys(base, PAGE_SIZE)
        except MemoryReadError as err:
            self._bad[base] = err
            raise
        if len(data) != PAGE_SIZE:
            raise MemoryReadError(base, PAGE_SIZE, f"short read ({len(data)} bytes)")
        self.pages_read += 1
        if len(self._pages) >= self.max_pages:
            self._pages.clear()
        self._pages[base] = data
        return data

    def read_phys(self, pa: int, size: int) -> bytes:
        """Arbitrary reads, served from cached pages (so repeated small reads are free)."""
        if size == PAGE_SIZE and pa & (PAGE_SIZE - 1) == 0:
            return self.page(pa)  # a whole table: no copy
        out = bytearray()
        while size > 0:
            base = align_down(pa, PAGE_SIZE)
            chunk = min(size, base + PAGE_SIZE - pa)
            page = self.page(base)
            out += page[pa - base:pa - base + chunk]
            pa += chunk
            size -= chunk
        return bytes(out)


class SyntheticMemory:
    """Sparse physical memory made of pages, for tests and for predictions.

    Unwritten pages inside ``ram_size`` read as zeros; reads at or above
    ``ram_size`` raise MemoryReadError, like an unbacked address on a real
    target. ``overlay`` lets a prediction (a table that was never written to the
    guest) sit on top of a real backend.
    """

    def __init__(self, ram_size: int = 1 << 32, base: Optional[PhysMemory] = None):
        self.ram_size = ram_size
        self.base = base
        self.pages: Dict[int, bytearray] = {}
        self.reads = 0

    def _page(self, base: int) -> bytearray:
        page = self.pages.get(base)
        if page is None:
            if self.base is not None:
                page = bytearray(self.base.read_phys(base, PAGE_SIZE))
            else:
                page = bytearray(PAGE_SIZE)
            self.pages[base] = page
        return page

    def write(self, pa: int, data: bytes) -> None:
        while data:
            base = align_down(pa, PAGE_SIZE)
            off = pa - base
            chunk = min(len(data), PAGE_SIZE - off)
            self._page(base)[off:off + chunk] = data[:chunk]
            data = data[chunk:]
            pa += chunk

    def write_u64(self, pa: int, value: int) -> None:
        self.write(pa, value.to_bytes(8, "little"))

    def write_u32(self, pa: int, value: int) -> None:
        self.write(pa, value.to_bytes(4, "little"))

    def write_table(self, table_pa: int, entries: Mapping[int, int], entry_size: int = 8) -> None:
        for index, value in entries.items():
            self.write(table_pa + index * entry_size, value.to_bytes(entry_size, "little"))

    def read_phys(self, pa: int, size: int) -> bytes:
        if pa < 0 or pa + size > self.ram_size:
            raise MemoryReadError(pa, size, "outside RAM")
        self.reads += 1
        out = bytearray()
        while size > 0:
            base = align_down(pa, PAGE_SIZE)
            off = pa - base
            chunk = min(size, PAGE_SIZE - off)
            page = self.pages.get(base)
            if page is None:
                if self.base is not None:
                    out += self.base.read_phys(pa, chunk)
                else:
                    out += bytes(chunk)
            else:
                out += page[off:off + chunk]
            pa += chunk
            size -= chunk
        return bytes(out)
