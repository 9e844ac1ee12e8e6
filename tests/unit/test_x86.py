"""x86.size_name: exact and short, for page sizes and the ranges xen-pt prints."""

import pytest

from gdbext.core.x86 import PAGE_SIZE, SIZE_1G, size_name

M = 1 << 20


@pytest.mark.parametrize("size,text", [
    (PAGE_SIZE, "4K"), (2 * M, "2M"), (SIZE_1G, "1G"), (512 * SIZE_1G, "512G"),
    (1000 * M, "1000M"), (3 << 40, "3T"), (100, "100B"), (1536, "1K+512B"),
    # OVMF's last identity range: 1 TiB less the first 1022 MiB; five digits of M
    # would be hard to read.
    ((1 << 40) - 1022 * M, "1023G+2M"),
])
def test_size_name(size, text):
    assert size_name(size) == text


def test_size_name_is_exact():
    units = {"T": 1 << 40, "G": SIZE_1G, "M": M, "K": 1 << 10, "B": 1}
    for size in (0x59EC0, (1 << 40) - M, 12345678901):
        total = 0
        for part in size_name(size).split("+"):
            total += int(part[:-1]) * units[part[-1]]
        assert total == size
