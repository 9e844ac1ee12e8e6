"""x86 architectural facts: register bits, page-table entry bits, sizes, address arithmetic.

This module is the single home of every such number in the project; everything
else imports names from here. Bit positions follow the Intel SDM vol. 3A,
chapter 4 ("Paging") and AMD APM vol. 2, chapter 5.
"""

from __future__ import annotations

# --- control registers -------------------------------------------------------

CR0_PE = 1 << 0
CR0_WP = 1 << 16
CR0_PG = 1 << 31

CR4_PSE = 1 << 4
CR4_PAE = 1 << 5
CR4_PGE = 1 << 7
CR4_LA57 = 1 << 12
CR4_SMEP = 1 << 20
CR4_SMAP = 1 << 21
CR4_PKE = 1 << 22

EFER_SCE = 1 << 0
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
EFER_NXE = 1 << 11

# The flag names reports decode each register into, lowest bit first.
CR0_FLAG_NAMES = ((CR0_PE, "PE"), (CR0_WP, "WP"), (CR0_PG, "PG"))
CR4_FLAG_NAMES = ((CR4_PSE, "PSE"), (CR4_PAE, "PAE"), (CR4_PGE, "PGE"), (CR4_LA57, "LA57"),
                  (CR4_SMEP, "SMEP"), (CR4_SMAP, "SMAP"), (CR4_PKE, "PKE"))
EFER_FLAG_NAMES = ((EFER_SCE, "SCE"), (EFER_LME, "LME"), (EFER_LMA, "LMA"), (EFER_NXE, "NXE"))
CONTROL_REGISTER_FLAG_NAMES = {"cr0": CR0_FLAG_NAMES, "cr4": CR4_FLAG_NAMES,
                               "efer": EFER_FLAG_NAMES}

# CR3 in long mode and 32-bit mode: bits 3 (PWT) and 4 (PCD) are cache
# controls for the root; bits 0-2 and 5-11 are ignored (or PCID with
# CR4.PCIDE). The root table is at CR3 & ~0xfff.
CR3_PWT = 1 << 3
CR3_PCD = 1 << 4
CR3_FLAGS_MASK = 0xFFF
# In PAE mode the 4-entry PDPT is 32-byte aligned: CR3 bits 31:5.
CR3_PAE_ROOT_MASK = 0xFFFF_FFE0

# --- page-table entry bits ---------------------------------------------------

PTE_P = 1 << 0
PTE_RW = 1 << 1
PTE_US = 1 << 2
PTE_PWT = 1 << 3
PTE_PCD = 1 << 4
PTE_A = 1 << 5
PTE_D = 1 << 6
PTE_PS = 1 << 7      # page size in a directory entry ...
PTE_PAT_4K = 1 << 7  # ... and the PAT bit in a 4 KiB leaf
PTE_G = 1 << 8
PTE_PAT_LARGE = 1 << 12  # the PAT bit of a 2 MiB / 1 GiB / 4 MiB leaf
PTE_NX = 1 << 63
# Bits the CPU ignores and software may use (Xen keeps its own flags there).
PTE_AVAIL_LOW = 0x7 << 9        # bits 9-11
PTE_AVAIL_HIGH = 0x7F << 52     # bits 52-58
PTE_PKEY_SHIFT = 59             # bits 59-62: protection key of a leaf with CR4.PKE
PTE_PKEY_MASK = 0xF << PTE_PKEY_SHIFT

FLAG_NAMES = (
    (PTE_P, "P"), (PTE_RW, "RW"), (PTE_US, "US"), (PTE_PWT, "PWT"), (PTE_PCD, "PCD"),
    (PTE_A, "A"), (PTE_D, "D"), (PTE_PS, "PS"), (PTE_G, "G"),
)

# PAE page-directory-pointer-table entries have no RW/US/A/D/PS/G/NX: those
# bits are reserved (SDM 4.4.1).
PAE_PDPTE_RESERVED = (0x3 << 1) | (0xF << 5) | PTE_NX
# A 32-bit 4 MiB PDE (PSE-36): bits 20:13 hold PA bits 39:32; bit 21 reserved.
PSE36_HIGH_SHIFT = 13
PSE36_HIGH_BITS = 8
PSE36_RESERVED = 1 << 21

# --- sizes -------------------------------------------------------------------

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
SIZE_4K = 1 << 12
SIZE_2M = 1 << 21
SIZE_4M = 1 << 22
SIZE_1G = 1 << 30

# The architectural maximum physical-address width with 64-bit entries.
MAXPHYADDR_ARCH = 52


def mask(bits: int) -> int:
    """All ones in the low ``bits`` bits."""
    return (1 << bits) - 1


def phys_addr_mask(maxphyaddr: int, low_bit: int = PAGE_SHIFT) -> int:
    """Address bits ``low_bit`` .. ``maxphyaddr - 1`` of a 64-bit entry."""
    return mask(maxphyaddr) & ~mask(low_bit)


def canonical(va: int, va_bits: int) -> int:
    """Sign-extend the low ``va_bits`` bits of ``va`` to 64 bits."""
    va &= mask(va_bits)
    if va & (1 << (va_bits - 1)):
        va |= mask(64) & ~mask(va_bits)
    return va


def is_canonical(va: int, va_bits: int) -> bool:
    return 0 <= va <= mask(64) and canonical(va, va_bits) == va


def align_down(value: int, alignment: int) -> int:
    return value & ~(alignment - 1)


def size_name(size: int) -> str:
    """'4K', '2M', '1G', '1023G+998M' ... for a page or range size: exact, and short.

    The largest unit that divides the size wins, unless that leaves more than four
    digits: then the size is split at the largest unit that fits
    ("1047554M" reads better as "1023G+2M")."""
    units = ((1 << 40, "T"), (SIZE_1G, "G"), (1 << 20, "M"), (1 << 10, "K"))
    for unit, name in units:
        if size >= unit and size % unit == 0 and size // unit < 10_000:
            return f"{size // unit}{name}"
    for unit, name in units:
        if size >= unit:
            rest = size % unit
            return f"{size // unit}{name}" + (f"+{size_name(rest)}" if rest else "")
    return f"{size}B"


# --- exceptions ----------------------------------------------------------------
#
# SDM vol. 3A, 6.14.1 and 6.15; AMD APM vol. 2, 8.2 and 8.4.2.

# A long-mode IDT gate is 16 bytes: offset 15..0 (bytes 0-1), selector (2-3),
# IST (bits 2..0 of byte 4), type/attributes (byte 5: type 3..0, DPL 6..5,
# present 7), offset 31..16 (6-7), offset 63..32 (8-11), reserved (12-15).
IDT_GATE_SIZE_LONG = 16
GATE_TYPE_INTERRUPT = 0xE    # IF cleared on entry
GATE_TYPE_TRAP = 0xF
GATE_PRESENT = 1 << 7        # in the type/attribute byte
GATE_IST_MASK = 0x7

# Vectors for which the CPU pushes an error code (the others push none).
ERROR_CODE_VECTORS = frozenset((8, 10, 11, 12, 13, 14, 17, 21, 29))
EXCEPTION_VECTORS = 32       # 0..31 are reserved for exceptions

# #PF error code (pushed for vector 14; CR2 holds the faulting address).
PFEC_P = 1 << 0       # 0: not present; 1: protection violation
PFEC_W = 1 << 1       # write access
PFEC_U = 1 << 2       # user-mode access (CPL 3)
PFEC_RSVD = 1 << 3    # a reserved bit set in a paging-structure entry
PFEC_I = 1 << 4       # instruction fetch
PFEC_PK = 1 << 5      # protection-key violation
PFEC_SS = 1 << 6      # shadow-stack access
PFEC_HLAT = 1 << 7    # HLAT paging (Intel)
PFEC_SGX = 1 << 15    # SGX access-control violation

# Selector error code (#TS, #NP, #SS, #GP, and #DF/#AC's always-zero one).
SELEC_EXT = 1 << 0    # raised by an event external to the program
SELEC_IDT = 1 << 1    # the index names an IDT gate
SELEC_TI = 1 << 2     # with IDT clear: 1 = LDT, 0 = GDT
SELEC_INDEX_SHIFT = 3

RFLAGS_IF = 1 << 9
