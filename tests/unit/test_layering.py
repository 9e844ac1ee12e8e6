"""The layers, read from the source with ``ast``: the core never imports ``gdb``,
the GDB layer or the host-side package.

Every import statement counts, at module level or inside a function (an import
inside a function is still a dependency).  ``imports_of`` resolves relative
imports to absolute module names so that rules can be written on names.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator, List, Set, Tuple

import gdbext

PACKAGE_ROOT = Path(gdbext.__file__).resolve().parent   # .../gdbext

# Modules the core must not import (each name and everything below it).
CORE_FORBIDDEN = ("gdb", "gdbext.gdb_layer", "gdbext.host")


def modules_under(package: str) -> List[Tuple[str, Path]]:
    """(dotted name, path) of every module of ``package`` (a gdbext subpackage)."""
    parts = package.split(".")
    assert parts[0] == "gdbext", package
    base = PACKAGE_ROOT.joinpath(*parts[1:])
    out = []
    for path in sorted(base.rglob("*.py")):
        rel = path.relative_to(PACKAGE_ROOT).with_suffix("").parts
        name = ".".join(("gdbext",) + rel)
        if name.endswith(".__init__"):
            name = name[: -len(".__init__")]
        out.append((name, path))
    return out


def imports_of(source: str, module: str, is_package: bool = False) -> Set[str]:
    """Absolute names of every module ``source`` (the text of ``module``) imports.

    ``from A import b`` yields both ``A`` and ``A.b`` (b may be a submodule)."""
    package = module if is_package else module.rpartition(".")[0]
    found: Set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                keep = len(parts) - (node.level - 1)
                assert keep > 0, f"{module}: relative import beyond the top package"
                base = ".".join(parts[:keep] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    return found


def forbidden(names: Set[str], rules: Tuple[str, ...]) -> List[str]:
    return sorted(n for n in names if any(n == r or n.startswith(r + ".") for r in rules))


def violations(package: str, rules: Tuple[str, ...]) -> Iterator[Tuple[str, List[str]]]:
    for name, path in modules_under(package):
        names = imports_of(path.read_text(), name, is_package=path.name == "__init__.py")
        bad = forbidden(names, rules)
        if bad:
            yield name, bad


def test_core_imports_neither_gdb_nor_the_gdb_layer_nor_the_host_package():
    core = modules_under("gdbext.core")
    assert len(core) > 10 and ("gdbext.core.merge_checks", PACKAGE_ROOT / "core" /
                               "merge_checks.py") in core
    assert dict(violations("gdbext.core", CORE_FORBIDDEN)) == {}


def test_the_import_reader_sees_every_kind_of_import():
    """The rule above can fail: each way of importing a forbidden module is seen."""
    source = '''
import os
import gdb.types
from gdb import Breakpoint
from .. import gdb_layer
from ..gdb_layer.backend import target
from gdbext.host import lab
from . import x86

def late():
    import gdb
'''
    names = imports_of(source, "gdbext.core.example")
    assert "gdbext.core.x86" in names and "os" in names
    assert forbidden(names, CORE_FORBIDDEN) == [
        "gdb", "gdb.Breakpoint", "gdb.types", "gdbext.gdb_layer",
        "gdbext.gdb_layer.backend", "gdbext.gdb_layer.backend.target", "gdbext.host",
        "gdbext.host.lab"]
    # A package's own relative imports start from the package itself.
    assert imports_of("from . import errors", "gdbext.core", is_package=True) == {
        "gdbext.core", "gdbext.core.errors"}
    # Names that only start like a forbidden module are not it.
    assert forbidden({"gdbext.gdbinit", "gdbext.gdbdriver", "gdbext.hosted"},
                     CORE_FORBIDDEN) == []
