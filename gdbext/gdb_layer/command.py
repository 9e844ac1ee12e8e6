"""The one base class every gdbext command derives from.

Each command declares an argparse parser; ``help xen-pt`` is generated from it.
User mistakes become one-line ``gdb.GdbError``s (GDB prints them without a
traceback); the stub's physical-memory mode is restored by the backend's
context manager whatever happens.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

import gdb

from ..core.errors import GdbextError

PREFIX = "xen"


class _HelpShown(Exception):
    pass


class CommandParser(argparse.ArgumentParser):
    """argparse that reports errors as GdbextError instead of exiting GDB."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("add_help", True)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        raise GdbextError(f"{self.prog}: {message} (see 'help {self.prog}')")

    def exit(self, status: int = 0, message: Optional[str] = None):  # type: ignore[override]
        if message:
            gdb.write(message)
        raise _HelpShown()

    def print_help(self, file=None):  # noqa: D401 - argparse API
        gdb.write(self.format_help())


def add_json_option(p: argparse.ArgumentParser) -> None:
    """--json: one line of JSON on GDB's stdout, integers as numbers (for CI and scripts)."""
    p.add_argument("--json", action="store_true",
                   help="print one line of JSON instead of text")


def parse_int(text: str) -> int:
    """An integer in C syntax (0x.., decimal); for options that must not touch GDB."""
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def parse_count(text: str) -> int:
    """A count (--limit): a non-negative integer in C syntax."""
    value = parse_int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {text!r}")
    return value


def eval_int(expr: str, what: str = "address") -> int:
    """Evaluate a GDB expression to an unsigned 64-bit integer."""
    try:
        value = gdb.parse_and_eval(expr)
        code = value.type.strip_typedefs().code
        if code == gdb.TYPE_CODE_ARRAY or code == gdb.TYPE_CODE_FUNC:
            value = value.address
        return int(value) & ((1 << 64) - 1)
    except gdb.error as err:
        raise GdbextError(f"cannot evaluate {what} '{expr}': {one_line(err)}") from None


def use_color(from_tty: bool) -> bool:
    """Colour only for a person at a terminal, and never if they asked for none."""
    if os.environ.get("NO_COLOR"):
        return False
    try:
        if not gdb.parameter("style enabled"):
            return False
    except (gdb.error, RuntimeError):
        pass
    return bool(from_tty) and sys.stdout.isatty()


class XenCommand(gdb.Command):
    """Base: subclasses set ``name`` (e.g. 'pt'), ``summary`` and build ``parser``."""

    name = ""
    summary = ""

    def __init__(self) -> None:
        self.parser = self.make_parser()
        self.parser.prog = f"{PREFIX}-{self.name}"
        # GDB takes help text from the class docstring when the command is created.
        type(self).__doc__ = f"{self.summary}\n\n{self.parser.format_help()}"
        super().__init__(f"{PREFIX} {self.name}", gdb.COMMAND_USER)
        try:
            gdb.execute(f"alias {PREFIX}-{self.name} = {PREFIX} {self.name}", to_string=True)
        except gdb.error:
            pass  # already defined by an earlier load

    def make_parser(self) -> CommandParser:
        raise NotImplementedError

    def run(self, args: argparse.Namespace, from_tty: bool) -> None:
        raise NotImplementedError

    def invoke(self, arg: str, from_tty: bool) -> None:
        try:
            argv: List[str] = gdb.string_to_argv(arg)
            args = self.parser.parse_args(argv)
            self.run(args, from_tty)
        except _HelpShown:
            return
        except GdbextError as err:
            raise gdb.GdbError(str(err)) from None
        except KeyboardInterrupt:
            raise gdb.GdbError(f"{self.parser.prog}: interrupted") from None
        except gdb.GdbError:
            raise
        except gdb.error as err:
            raise gdb.GdbError(f"{self.parser.prog}: {one_line(err)}") from None


def one_line(err: object) -> str:
    """GDB's own messages can span lines; users (and CI logs) get one."""
    return " ".join(part.strip() for part in str(err).splitlines() if part.strip())


class XenPrefix(gdb.Command):
    """Xen boot paging commands (gdbext): see and check x86-64 page tables while Xen boots.

Each command is available as 'xen NAME' and 'xen-NAME'. Every command takes --help;
most take --json for one-line machine-readable output.

Addresses: a GDB expression, or a Xen symbol from xen-syms: 'efi_multiboot2' (or
'efi_multiboot2+0x10') is its linked virtual address, 'efi_multiboot2@pa' its physical
address at the load address B (xen-locate finds B).
Functions for expressions and breakpoint conditions: $xen_base(), $xen_pa("sym"),
$xen_va("sym"), $xen_offset("sym"), $xen_va2pa(addr), $xen_name(pa)
(see 'help function xen_pa')."""

    def __init__(self) -> None:
        super().__init__(PREFIX, gdb.COMMAND_USER, prefix=True)
