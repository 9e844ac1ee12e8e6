"""The one base class every gdbext command derives from, and its parsing helpers.

Each command declares an argparse parser; ``help xen-pt`` is generated from it.
User mistakes become one-line ``gdb.GdbError``s (GDB prints them without a
traceback); the stub's physical-memory mode is restored by the backend's
context manager whatever happens.
"""

from __future__ import annotations

import argparse
import os
from typing import Dict, List, Optional

import gdb

from ..core.errors import GdbextError, GuestCrashed
from ..core.paging import MODES
from ..core.render import fit_width, highlight, to_json

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


def add_root_options(p: CommandParser) -> None:
    p.add_argument("--root", default="cr3", metavar="ROOT",
                   help="top-level table: 'cr3' (default), or its physical address: a GDB "
                        "expression, or SYMBOL@pa (e.g. idle_pg_table@pa); or 'merge' / "
                        "'merge-relocated': the RFC's merged L4 as predicted from the "
                        "firmware's (at __efi64_mb2_start; the guest is not written), its "
                        "upper half copied raw / with B added to Xen's pointers")
    p.add_argument("--mode", choices=sorted(m for m in MODES if m != "off"),
                   help="paging mode to interpret ROOT in (default: the CPU's, from CR0, CR4 "
                        "and EFER.LMA)")


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


def terminal_output(from_tty: bool) -> bool:
    """A person reads this at a terminal: typed at the prompt, GDB's stdout is a tty.
    (Inside GDB ``sys.stdout`` is GDB's own stream and never a tty; fd 1 is the truth.
    Programs that drive GDB over a pipe get plain, unwrapped text.)"""
    if not from_tty or os.environ.get("TERM") == "dumb":
        return False
    try:
        return os.isatty(1)
    except OSError:
        return False


def use_color(from_tty: bool) -> bool:
    """Colour for a person at a terminal, as GDB's own styling: never with NO_COLOR set
    or 'set style enabled off'."""
    if os.environ.get("NO_COLOR"):
        return False
    try:
        if not gdb.parameter("style enabled"):
            return False
    except (gdb.error, RuntimeError):
        pass
    return terminal_output(from_tty)


def output_width(from_tty: bool) -> Optional[int]:
    """GDB's current width ('show width', read now, not at load time) when a person reads
    the output at a terminal; None: do not wrap."""
    if not terminal_output(from_tty):
        return None
    try:
        width = gdb.parameter("width")
    except (gdb.error, RuntimeError):
        return None
    return int(width) if width else None


def emit(text: str, from_tty: bool) -> None:
    """Print a command's text report: fitted to GDB's width and coloured for a person at
    a terminal, as is otherwise (JSON never goes through here)."""
    text = fit_width(text, output_width(from_tty))
    if use_color(from_tty):
        text = highlight(text)
    gdb.write(text + "\n")


class XenCommand(gdb.Command):
    """Base: subclasses set ``name`` (e.g. 'pt'), ``summary``, build ``parser`` and
    implement ``run``; ``self.ctx`` is the context (context.CONTEXT) they work in."""

    name = ""
    summary = ""
    # What TAB completes for the positional arguments ("address": Xen's symbols, then
    # GDB's; "function": Xen's code symbols; "file": file names; None: nothing) and for
    # option values (option -> "file", or a kind the context names: "address",
    # "pa-address", "function", "stop", "check", "root").
    complete_positional: Optional[str] = None
    complete_values: Dict[str, str] = {}

    def __init__(self, ctx) -> None:
        self.ctx = ctx
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

    def print_report(self, report, as_json: bool, from_tty: bool) -> None:
        """A report object (``as_dict()`` and ``text()``): as JSON, or as text fitted
        to the terminal."""
        if as_json:
            self.write_json(report.as_dict())
        else:
            emit(report.text(), from_tty)

    def write_json(self, obj) -> None:
        """One line of JSON on GDB's stdout (a dict, or text a renderer made)."""
        self._wrote_json = True
        gdb.write((obj if isinstance(obj, str) else to_json(obj)) + "\n")

    def run(self, args: argparse.Namespace, from_tty: bool) -> None:
        raise NotImplementedError

    def complete(self, text: str, word: str):
        """TAB: option names, option values (choices, stop names, check ids, Xen
        symbols) and the positional arguments' kind (``complete_positional``)."""
        try:
            return self._complete(text, word or "")
        except Exception:     # a completer must never raise into GDB's prompt
            return []

    def _complete(self, text: str, word: str):
        tokens = text.split()
        current = "" if not tokens or text[-1:].isspace() else tokens[-1]
        previous = tokens[-1] if current == "" and tokens else (
            tokens[-2] if len(tokens) >= 2 else "")
        # GDB replaces only ``word`` (its word-break characters include '-' and '.'):
        # return each candidate without the part of the token before ``word``.
        head = current[:len(current) - len(word)] if current.endswith(word) else ""
        options = {opt: action for opt, action in self.parser._option_string_actions.items()}
        kind = None
        if current.startswith("-"):
            candidates = sorted(o for o in options if o.startswith("--"))
        elif previous in options and options[previous].nargs != 0:
            action = options[previous]
            if action.choices:
                candidates = sorted(str(c) for c in action.choices)
            else:
                kind = self.complete_values.get(previous)
                if kind is None:
                    return []
                candidates = None
        else:
            kind = self.complete_positional
            if kind is None:
                return []
            candidates = None
        if kind == "file":
            return gdb.COMPLETE_FILENAME
        if candidates is None:
            candidates = self.ctx.completion_names(kind, current)
            if candidates is None:
                return gdb.COMPLETE_EXPRESSION
        return [c[len(head):] for c in candidates if c.startswith(current)]

    def invoke(self, arg: str, from_tty: bool) -> None:
        self._wrote_json = False
        wants_json = False
        try:
            argv: List[str] = gdb.string_to_argv(arg)
            wants_json = "--json" in argv
            args = self.parser.parse_args(argv)
            self.run(args, from_tty)
        except _HelpShown:
            return
        except GuestCrashed as err:
            self._crashed(err, wants_json)
        except GdbextError as err:
            self._fail(str(err), wants_json)
        except KeyboardInterrupt:
            self._fail(f"{self.parser.prog}: interrupted", wants_json)
        except gdb.GdbError as err:
            self._fail(str(err), wants_json)
        except gdb.error as err:
            self._fail(f"{self.parser.prog}: {one_line(err)}", wants_json)

    def _crashed(self, err: GuestCrashed, wants_json: bool) -> None:
        """The guest died while the command drove it: the explanation (as text, or the
        JSON object with the crash), then the one-line summary as the error."""
        if wants_json:
            if not self._wrote_json:
                gdb.write(to_json({"error": err.summary, "command": self.parser.prog,
                                   "crash": err.as_dict()}) + "\n")
        elif err.report is not None:
            lines = err.report.text()
            gdb.write((lines if isinstance(lines, str) else "\n".join(lines)) + "\n")
        raise gdb.GdbError(err.summary) from None

    def _fail(self, message: str, wants_json: bool) -> None:
        """The one-line error; under --json, first a JSON error object for the tool
        reading stdout (unless the command already printed its report as JSON)."""
        if wants_json and not self._wrote_json:
            gdb.write(to_json({"error": message, "command": self.parser.prog}) + "\n")
        raise gdb.GdbError(message) from None


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
