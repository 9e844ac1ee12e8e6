"""x86.size_name: exact and short, for page sizes and the ranges xen-pt prints."""

import pytest

from gdbext.core.x86 import CONTROL_REGISTER_FLAG_NAMES, PAGE_SIZE, SIZE_1G, size_name

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


# Bit positions from the Intel SDM vol. 3A, 2.5 (CR0, CR4) and 2.2.1 (IA32_EFER),
# written here independently of x86.py.
SDM_BITS = {
    "cr0": {"PE": 0, "WP": 16, "PG": 31},
    "cr4": {"PSE": 4, "PAE": 5, "PGE": 7, "LA57": 12, "SMEP": 20, "SMAP": 21, "PKE": 22},
    "efer": {"SCE": 0, "LME": 8, "LMA": 10, "NXE": 11},
}


def test_control_register_flag_names_match_the_sdm():
    assert list(CONTROL_REGISTER_FLAG_NAMES) == ["cr0", "cr4", "efer"]
    for reg, pairs in CONTROL_REGISTER_FLAG_NAMES.items():
        assert {name: bit.bit_length() - 1 for bit, name in pairs} == SDM_BITS[reg], reg
        assert [bit for bit, _ in pairs] == sorted(bit for bit, _ in pairs), reg
