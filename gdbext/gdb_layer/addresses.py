"""The one parser for addresses given to gdbext's commands and functions.

* ``SYMBOL`` or ``SYMBOL+OFF`` / ``SYMBOL-OFF`` naming a symbol of the loaded
  xen-syms: its linked virtual address (where it runs after ``__high_start``).
  Locals may be qualified as Xen's .map writes them: ``head.o#trampoline_setup``.
* ``SYMBOL@pa`` (or ``SYMBOL+OFF@pa``): its physical address in the image at
  the load address B (PA = B + offset from ``__image_base__``).
* Anything else: a GDB expression (``$pc``, ``0x3d800000``, ``$rsp + 8``).

Xen's names are tried first, so ``efi_multiboot2`` means the same whether or
not GDB has Xen's symbols (at either address). Where a physical address is
wanted, a bare Xen symbol is refused with a hint: it is a virtual address.
"""

from __future__ import annotations

import re
from typing import Optional, Tuple

from ..core.errors import GdbextError
from ..core.suggest import did_you_mean
from .command import eval_int

SYNTAX_HELP = ("a GDB expression, or a Xen symbol from xen-syms: 'efi_multiboot2' or "
               "'efi_multiboot2+0x10' is its linked virtual address, 'efi_multiboot2@pa' its "
               "physical address at the load address B")
# Where a physical address is wanted (xen-pa2va, xen-locate --base, --root).
PA_SYNTAX_HELP = ("a GDB expression, or SYMBOL@pa for a Xen symbol's physical address at the "
                  "load address")

PA_SUFFIX = "@pa"

_XEN_ADDRESS = re.compile(
    r"^\s*(?P<name>(?:[\w./-]+#)?[A-Za-z_.][\w.]*)"
    r"\s*(?:(?P<sign>[+-])\s*(?P<off>0[xX][0-9a-fA-F]+|\d+))?"
    r"\s*(?P<pa>@pa)?\s*$")
# The offset written after '@pa' (efi_multiboot2@pa+0x10): the accepted form puts it first.
_PA_THEN_OFFSET = re.compile(r"^\s*(?P<name>[^@\s]+)\s*@pa\s*(?P<off>[+-]\s*\S+)\s*$")


def split_xen_address(text: str) -> Optional[Tuple[str, int, bool]]:
    """(symbol, offset, at_pa) if ``text`` has the SYMBOL[+OFF][@pa] shape, else None."""
    m = _XEN_ADDRESS.match(text)
    if m is None:
        return None
    off = int(m.group("off"), 0) if m.group("off") else 0
    if m.group("sign") == "-":
        off = -off
    return m.group("name"), off, bool(m.group("pa"))


def xen_address(ctx, text: str, what: str = "address") -> Optional[Tuple[int, bool]]:
    """(value, is_pa) if ``text`` names a Xen symbol of ``ctx`` (the context); None if not."""
    parts = split_xen_address(text)
    if parts is None:
        m = _PA_THEN_OFFSET.match(text)
        if m is not None:
            off = m.group("off").replace(" ", "")
            raise GdbextError(f"{what} '{text.strip()}': the offset goes before '@pa': write "
                              f"'{m.group('name')}{off}@pa'")
        if text.strip().endswith(PA_SUFFIX):
            raise GdbextError(f"{what} '{text.strip()}': '@pa' follows a Xen symbol only "
                              "(SYMBOL@pa or SYMBOL+0x10@pa)")
        return None
    name, off, at_pa = parts
    syms = ctx.xen.syms
    if syms is None or name not in syms:
        if at_pa:
            where = "no Xen symbols are loaded (xen-syms PATH)" if syms is None else \
                f"no symbol {name!r} in {syms.path}" + did_you_mean(syms.by_name, name)
            raise GdbextError(f"{what} '{text.strip()}': {where}")
        return None
    va = syms.linked_va(name) + off
    if not at_pa:
        return va, False
    loaded = ctx.require_loaded()
    if not loaded.syms.in_image(va):
        raise GdbextError(f"{what} '{text.strip()}': {va:#x} is outside Xen's image, so it "
                          "has no physical address at the load address")
    return loaded.pa(va), True


def parse_address(ctx, text: str, what: str = "address", space: str = "va") -> int:
    """An address typed by the user (see the module doc), Xen's names from ``ctx`` (the
    context). ``space`` is what the command wants: "va" (a virtual address) or "pa"."""
    hit = xen_address(ctx, text, what)
    if hit is None:
        parts = split_xen_address(text)
        syms = ctx.xen.syms
        if parts is None or syms is None:
            return eval_int(text, what)
        try:
            return eval_int(text, what)
        except GdbextError:
            # A name that is neither Xen's nor GDB's: GDB's own message ("No symbol table
            # is loaded") would mislead while xen-syms is loaded; say what is close.
            raise GdbextError(f"{what} '{text.strip()}': no symbol {parts[0]!r} in "
                              f"{syms.path} nor in GDB"
                              + did_you_mean(syms.by_name, parts[0])) from None
    value, is_pa = hit
    if space == "pa" and not is_pa:
        raise GdbextError(f"{what} '{text.strip()}' is a Xen symbol, i.e. a linked virtual "
                          f"address: write '{text.strip()}@pa' for its physical address")
    return value
