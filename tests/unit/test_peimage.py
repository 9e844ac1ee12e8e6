"""gdbext.core.peimage: finding the firmware image around an address, on PE/TE headers
built here from the PE/COFF spec, and on the memory of two real crashes, where the
firmware's own dump says what it found."""

import struct

from gdbext.core import peimage
from gdbext.core.errors import MemoryReadError
from gdbext.core.memory import SyntheticMemory

from . import fault_data as data

IMAGE = 0x3F050000
SIZE = 0x24000
ENTRY_RVA = 0x1240
PDB = "/build/edk2/Build/OvmfX64/RELEASE_GCC5/X64/UefiCpuPkg/CpuDxe/CpuDxe/DEBUG/CpuDxe.pdb"


def pe32plus(debug=True, lfanew=0x80, signature=b"RSDS") -> bytes:
    """A PE32+ header in memory layout: DOS stub, "PE\\0\\0", COFF header, optional header
    with 16 data directories (the 7th, debug, pointing at one CodeView entry)."""
    img = bytearray(0x2000)
    img[0:2] = b"MZ"
    struct.pack_into("<I", img, 0x3C, lfanew)
    img[lfanew:lfanew + 4] = b"PE\0\0"
    opt_size = 112 + 16 * 8
    struct.pack_into("<HHIIIHH", img, lfanew + 4, 0x8664, 3, 0, 0, 0, opt_size, 0x2022)
    opt = lfanew + 24
    struct.pack_into("<HBBIIIII", img, opt, 0x20B, 2, 0x26, 0x1000, 0x1000, 0, ENTRY_RVA, 0x1000)
    struct.pack_into("<Q", img, opt + 24, 0)           # ImageBase as linked
    struct.pack_into("<I", img, opt + 56, SIZE)        # SizeOfImage
    struct.pack_into("<I", img, opt + 108, 16)         # NumberOfRvaAndSizes
    if debug:
        struct.pack_into("<II", img, opt + 112 + 6 * 8, 0x1800, 28)
        # Characteristics, TimeDateStamp, Major, Minor, Type=CODEVIEW, SizeOfData, RVA, ptr
        struct.pack_into("<IIHHIIII", img, 0x1800, 0, 0, 0, 0, 2, 0x100, 0x1840, 0x1840)
        name_at = 0x1840 + {b"RSDS": 24, b"NB10": 16}[signature]
        img[0x1840:0x1844] = signature
        img[name_at:name_at + len(PDB) + 1] = PDB.encode() + b"\0"
    return bytes(img)


def te_image() -> bytes:
    """An EDK2 TE header (40 bytes) standing for a PE whose first 0x1e0 bytes were stripped."""
    img = bytearray(0x1000)
    stripped = 0x1E0
    struct.pack_into("<2sHBBHIIQ", img, 0, b"VZ", 0x8664, 4, 0x0B, stripped, 0x2C0, 0x260,
                     0xFFC84000)
    struct.pack_into("<II", img, 32, 0x300, 28)                  # debug directory RVA
    at = 0x300 - stripped + 40                                   # RVA -> offset in TE
    struct.pack_into("<IIHHIIII", img, at, 0, 0, 0, 0, 2, 0x60, 0x340, 0)
    cv = 0x340 - stripped + 40
    img[cv:cv + 4] = b"RSDS"
    img[cv + 24:cv + 24 + 12] = b"SecMain.pdb\0"
    return bytes(img)


def machine(image: bytes, base: int = IMAGE) -> SyntheticMemory:
    mem = SyntheticMemory(1 << 32)
    mem.write(base, image)
    return mem


def test_find_image_from_an_address_inside_it():
    mem = machine(pe32plus())
    img = peimage.find_image(mem, IMAGE + 0x183C)
    assert (img.image_base, img.kind, img.machine, img.size_of_image, img.entry_point) == (
        IMAGE, "PE32+", "X64", SIZE, IMAGE + ENTRY_RVA)
    assert img.pdb_name == PDB and img.name == "CpuDxe"
    assert peimage.find_image(mem, IMAGE + 0x183C, align=0x1000) == img
    assert img.as_dict()["name"] == "CpuDxe"


def test_nb10_codeview_and_no_debug_directory():
    assert peimage.find_image(machine(pe32plus(signature=b"NB10")), IMAGE + 4).pdb_name == PDB
    img = peimage.find_image(machine(pe32plus(debug=False)), IMAGE + 4)
    assert img.pdb_name is None and img.name == f"image at {IMAGE:#x}"


def test_past_the_image_end_the_firmware_still_names_it_but_find_image_does_not():
    mem = machine(pe32plus())
    far = IMAGE + SIZE + 0x5000
    assert peimage.search_image_base(mem, far).image_base == IMAGE
    assert peimage.find_image(mem, far) is None


def test_an_mz_without_pe_signature_is_passed_over():
    mem = machine(pe32plus())
    mem.write(IMAGE + 0x4000, b"MZ")                    # a stray "MZ" above the image
    assert peimage.find_image(mem, IMAGE + 0x4100).image_base == IMAGE


def test_te_image():
    mem = machine(te_image(), 0xFFC84000)
    img = peimage.find_image(mem, 0xFFC84000 + 0x800)
    assert img.kind == "TE" and img.size_of_image is None
    assert img.entry_point == 0xFFC84000 + 40 - 0x1E0 + 0x2C0
    assert img.name == "SecMain"


class Holey:
    """Memory that cannot be read below ``floor`` (an unbacked hole)."""

    def __init__(self, mem, floor):
        self.mem, self.floor = mem, floor

    def read_phys(self, pa, size):
        if pa < self.floor:
            raise MemoryReadError(pa, size)
        return self.mem.read_phys(pa, size)


def test_search_stops_at_unreadable_memory():
    mem = machine(pe32plus())
    assert peimage.find_image(Holey(mem, IMAGE + 0x1000), IMAGE + 0x1800) is None
    assert peimage.find_image(Holey(mem, IMAGE), IMAGE + 0x1800).image_base == IMAGE
    assert peimage.find_image(mem, IMAGE + 0x1800, search_bytes=0x100) is None


def test_real_rfc_dump_image_line_reproduced():
    """The RFC crash: the firmware searched from the return address (a fetch fault's
    RIP is bad) down to a PE header that is not page aligned; the same search on the
    same bytes finds the ImageBase and EntryPoint it printed."""
    d = data.dump(data.RFC)
    mem = data.memory_slices(data.RFC)
    lowest = min(int(s, 16) for s in [d.image_base and hex(d.image_base & ~0xFFF)])
    img = peimage.search_image_base(mem, d.image_ip, search_bytes=d.image_ip - lowest)
    assert (img.image_base, img.entry_point, img.pdb_name) == (d.image_base, d.image_entry,
                                                               d.pdb)
    assert img.image_base % 0x1000                        # found in 4-byte steps, not pages
    assert peimage.find_image(mem, d.image_ip, search_bytes=d.image_ip - lowest) is None


def test_real_printerr_dump_image_line_reproduced():
    d = data.dump(data.PRINTERR)
    mem = data.memory_slices(data.PRINTERR)
    img = peimage.find_image(mem, d.image_ip, search_bytes=d.image_ip - (d.image_ip & ~0xFFFFF))
    assert (img.image_base, img.entry_point, img.pdb_name) == (d.image_base, d.image_entry,
                                                               d.pdb)
    assert img.contains(d.rip)
