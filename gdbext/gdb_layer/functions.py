"""Convenience functions for GDB expressions and breakpoint conditions.

    $xen_base()              the load base B (PA of __image_base__)
    $xen_pa(SYM)             PA of a Xen symbol (a string, or a linked VA) at B
    $xen_va(SYM)             the linked VA of a Xen symbol
    $xen_offset(SYM)         its offset from __image_base__ (PA = B + offset)
    $xen_va2pa(ADDR)         PA of a virtual address under the current CR3 (error if unmapped)
    $xen_name(PA)            the Xen object at PA in the loaded image, as a string ("" if none)

SYM and ADDR take the address syntax of the commands (gdb_layer/addresses.py)
when given as strings: $xen_va2pa("efi_multiboot2"), $xen_pa("idle_pg_table+0x828").
Examples:
    break *$xen_pa("efi_multiboot2")
    condition 2 $cr3 == $xen_pa("idle_pg_table")
    printf "%s\\n", $xen_name($cr3 & ~0xfff)
"""

from __future__ import annotations

from typing import Union

import gdb

from ..core.errors import GdbextError
from .addresses import parse_address
from .command import one_line

_U64 = (1 << 64) - 1


def _arg(value: "gdb.Value") -> Union[str, int]:
    """A string argument as text, anything else as an unsigned 64-bit integer."""
    t = value.type.strip_typedefs()
    if t.code == gdb.TYPE_CODE_ARRAY and t.target().strip_typedefs().code in (
            gdb.TYPE_CODE_INT, gdb.TYPE_CODE_CHAR):
        return value.string()
    if t.code == gdb.TYPE_CODE_PTR and t.target().strip_typedefs().sizeof == 1:
        try:
            return value.string()
        except gdb.error:
            pass
    if t.code in (gdb.TYPE_CODE_FUNC, gdb.TYPE_CODE_ARRAY):
        value = value.address
    return int(value) & _U64


def _u64(value: int) -> "gdb.Value":
    return gdb.Value(value & _U64).cast(gdb.lookup_type("unsigned long long"))


class _XenFunction(gdb.Function):
    name = ""

    def __init__(self, ctx) -> None:
        self.ctx = ctx   # the context (context.CONTEXT)
        super().__init__(self.name)

    def invoke(self, *args):
        try:
            return self.compute(*args)
        except GdbextError as err:
            raise gdb.GdbError(f"${self.name}: {err}") from None
        except gdb.error as err:
            raise gdb.GdbError(f"${self.name}: {one_line(err)}") from None
        except TypeError:
            raise gdb.GdbError(f"${self.name}: wrong number of arguments "
                               f"(see 'help function {self.name}')") from None

    def compute(self, *args):
        raise NotImplementedError


def _linked_va(ctx, arg: Union[str, int]) -> int:
    if isinstance(arg, int):
        return arg
    return parse_address(ctx, arg, "symbol", space="va")


class XenBase(_XenFunction):
    """$xen_base(): Xen's load base B (the physical address of __image_base__).

Found as xen-locate does without scanning if not known yet.
Example: condition 1 $rip - $xen_base() == $xen_offset("__efi64_mb2_start")"""
    name = "xen_base"

    def compute(self):
        return _u64(self.ctx.require_loaded().load_base)


class XenPa(_XenFunction):
    """$xen_pa(SYM): physical address of a Xen symbol (string, SYM+OFF) or linked VA at B.

PA = B + (linked VA - __image_base__), B being Xen's load base (xen-locate). Refused
when the build-id of xen-syms differs from guest memory's (set xen-ignore-build-id).
Examples: break *$xen_pa("efi_multiboot2"); p/x $xen_pa("idle_pg_table+0x828")"""
    name = "xen_pa"

    def compute(self, sym):
        arg = _arg(sym)
        if isinstance(arg, str) and arg.strip().endswith("@pa"):
            return _u64(parse_address(self.ctx, arg, "symbol", space="pa"))
        return _u64(self.ctx.require_loaded().pa(_linked_va(self.ctx, arg)))


class XenVa(_XenFunction):
    """$xen_va(SYM): the linked virtual address of a Xen symbol ("name" or "name+0x10").

Example: xen-va2pa $xen_va("efi_multiboot2")"""
    name = "xen_va"

    def compute(self, sym):
        self.ctx.require_syms()
        return _u64(_linked_va(self.ctx, _arg(sym)))


class XenOffset(_XenFunction):
    """$xen_offset(SYM): offset of a Xen symbol from __image_base__ (PA = B + offset).

Needs only xen-syms, not B. Example: p/x $xen_offset("idle_pg_table")"""
    name = "xen_offset"

    def compute(self, sym):
        syms = self.ctx.require_syms()
        return _u64(syms.offset(_linked_va(self.ctx, _arg(sym))))


class XenVa2pa(_XenFunction):
    """$xen_va2pa(ADDR): physical address of virtual ADDR under the current CR3.

ADDR is a number, or a string in the commands' address syntax ("efi_multiboot2").
An error if ADDR is not mapped. Walks the tables in guest memory as xen-va2pa does.
Example: condition 2 $xen_va2pa("efi_multiboot2") == $xen_pa("efi_multiboot2")"""
    name = "xen_va2pa"

    def compute(self, addr):
        arg = _arg(addr)
        va = (parse_address(self.ctx, arg, "address", space="va") if isinstance(arg, str)
              else arg)
        pa = self.ctx.translate(va)
        if pa is None:
            raise GdbextError(f"{va:#x} is not mapped under the current CR3 "
                              "(xen-va2pa shows where the walk stops)")
        return _u64(pa)


class XenName(_XenFunction):
    """$xen_name(PA): the Xen object at physical address PA ("l2_directmap+0x1000"), or "".

Example: printf "%s\\n", $xen_name($cr3 & ~0xfff)"""
    name = "xen_name"

    def compute(self, pa):
        arg = _arg(pa)
        if isinstance(arg, str):
            arg = parse_address(self.ctx, arg, "physical address", space="pa")
        return gdb.Value(self.ctx.require_loaded().name_pa(arg) or "")


def install(ctx) -> None:
    for cls in (XenBase, XenPa, XenVa, XenOffset, XenVa2pa, XenName):
        cls(ctx)
