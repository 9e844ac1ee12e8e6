"""The names of the boot stops around ``__efi64_mb2_start`` (GRUB's multiboot2+EFI path)
and around ``efi_start`` (xen.efi started by the firmware itself), in boot order.

One home for the names that the stop plan (bootstops), the check catalog
(merge_catalog, which says which invariants apply at each stop), the checks, the
commands and the reports share.  Kept apart because bootstops imports
merge_catalog's table of checks per stop.
"""

from __future__ import annotations

from typing import Tuple

ENTRY = "__efi64_mb2_start"
MERGE = "merge"                       # after the RFC's mov %rax,%cr3 (patched builds)
CALL = "call efi_multiboot2"
EFI_MB2 = "efi_multiboot2"
EFI_RETURN = "efi_multiboot2 return"
SWITCH = "x86_32_switch"
TRAMPOLINE_SETUP = "trampoline_setup"
TABLES_RELOCATED = "tables relocated"
L2_XENMAP_FILLED = "l2_xenmap filled"
TRAMPOLINE_CR3 = "trampoline cr3 load"
HIGH_START = "__high_start"
START_XEN = "__start_xen"
AFTER_START_XEN = "after __start_xen"  # a stretch of where_in_boot, not a stop

STOP_ORDER: Tuple[str, ...] = (
    ENTRY, MERGE, CALL, EFI_MB2, EFI_RETURN, SWITCH, TRAMPOLINE_SETUP,
    TABLES_RELOCATED, L2_XENMAP_FILLED, TRAMPOLINE_CR3, HIGH_START, START_XEN,
)

# xen.efi's path: the firmware's PE loader puts it at B and applies its base relocations;
# efi_start runs at the load address, Xen fixes its boot tables up, exits boot services,
# relocates itself back to its linked addresses, switches to its own tables, __start_xen.
EFI_START = "efi_start"
EFI_SELF_RELOCATE = "efi self-relocation"    # the call of efi_arch_relocate_image(delta)
EFI_RELOCATED = "efi relocated"              # back from it: static pointers linked again
EFI_CR3 = "efi cr3 load"                     # just after the switch to idle_pg_table

EFI_STOP_ORDER: Tuple[str, ...] = (
    EFI_START, EFI_SELF_RELOCATE, EFI_RELOCATED, EFI_CR3, START_XEN,
)
