"""xen.efi, the PE32+ image the firmware starts directly: its build-id and its headers.

Never imports ``gdb``. Xen's EFI link keeps its build-id not in a GNU note but in the
section ``.buildid``, between ``__note_gnu_build_id_start`` and ``__note_gnu_build_id_end``:
one IMAGE_DEBUG_DIRECTORY entry of type CODEVIEW followed by its "RSDS" record, whose
16-byte signature is what Xen itself takes as its build-id (common/version.c prints it as
``build-id: ...``). The ELF twin Debian ships for 4.20 (``xen-*.efi.elf``) has the same
section with the same bytes; 4.17 ships only ``xen-*.efi.map`` (no bytes, no build-id).

The file is read with ``pefile`` (section table, file offsets); the image the firmware
loaded is read in its loaded layout with ``peimage.parse_image`` (RVAs from the base).
EDK2 writes the address it loaded and relocated the image to into the in-memory
ImageBase: that is how the headers at B say where the firmware put Xen.
"""

from __future__ import annotations

import struct
from typing import Optional

from . import peimage
from .errors import GdbextError

# The section of xen.efi (and of its ELF twin) holding the debug directory + CodeView record.
EFI_BUILD_ID_SECTION = ".buildid"
# xen.efi's PE entry point (common/efi/boot.c), where the firmware starts it.
EFI_ENTRY = "efi_start"

# PE/COFF spec: IMAGE_DEBUG_DIRECTORY (28 bytes) then the PDB 7.0 record "RSDS" + GUID.
_DEBUG_DIR = struct.Struct("<IIHHIIII")
CV_PDB70_SIGNATURE = b"RSDS"
CV_PDB70_GUID_SIZE = 16


def codeview_build_id(raw: bytes) -> Optional[bytes]:
    """The 16-byte CodeView signature of the debug directory at the start of ``raw``
    (the bytes of xen.efi's .buildid), or None if ``raw`` is not such a record."""
    if len(raw) < _DEBUG_DIR.size + 4 + CV_PDB70_GUID_SIZE:
        return None
    dtype, size = _DEBUG_DIR.unpack_from(raw, 0)[4:6]
    rec = raw[_DEBUG_DIR.size:]
    if dtype != peimage.DEBUG_TYPE_CODEVIEW or size < 4 + CV_PDB70_GUID_SIZE:
        return None
    if rec[:4] != CV_PDB70_SIGNATURE:
        return None
    return bytes(rec[4:4 + CV_PDB70_GUID_SIZE])


def is_pe(head: bytes) -> bool:
    """An MZ stub whose e_lfanew points at a PE signature (xen.efi, not xen.gz)."""
    if head[:2] != peimage.DOS_MAGIC or len(head) < 0x40:
        return False
    at = struct.unpack_from("<I", head, peimage.E_LFANEW_OFFSET)[0]
    return head[at:at + 4] == peimage.PE_SIGNATURE


def file_headers(data: bytes):
    """pefile's view of the xen.efi whose bytes are ``data`` (headers only); GdbextError
    when it is no PE."""
    try:
        import pefile
    except ImportError:
        raise GdbextError("pefile is not installed: run scripts/setup") from None
    try:
        return pefile.PE(data=bytes(data), fast_load=True)
    except pefile.PEFormatError as e:
        raise GdbextError(f"not a PE image ({e})") from None


def file_build_id(data: bytes) -> Optional[bytes]:
    """The build-id of the xen.efi file whose bytes are ``data`` (its .buildid section
    read at the section's file offset), or None without such a section."""
    pe = file_headers(data)
    for sec in pe.sections:
        if sec.Name.rstrip(b"\0").decode("ascii", "replace") == EFI_BUILD_ID_SECTION:
            # At the section's own file offset: pefile's get_data rounds PointerToRawData
            # down to FileAlignment, and Xen's .buildid is not aligned so.
            at = sec.PointerToRawData
            return codeview_build_id(bytes(data[at:at + sec.Misc_VirtualSize]))
    return None


def loaded_image(mem, load_base: int, syms) -> Optional[dict]:
    """What the PE headers the firmware left at ``load_base`` say about xen.efi loaded
    there (None: no PE there): ImageBase (EDK2 writes the relocated base into it), the
    entry RVA (must be the symbols' offset of efi_start), SizeOfImage."""
    image = peimage.parse_image(mem, load_base)
    if image is None or image.kind != "PE32+":
        return None
    entry_rva = image.entry_point - load_base
    entry = syms.offset(EFI_ENTRY) if EFI_ENTRY in syms else None
    return {"headers_pa": load_base, "image_base": image.linked_image_base,
            "relocated_to": (image.linked_image_base
                             if image.linked_image_base != syms.virt_start else None),
            "entry_rva": entry_rva, "entry_matches": entry == entry_rva,
            "size_of_image": image.size_of_image}
