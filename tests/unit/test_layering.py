"""The three worlds stay apart, read from the code's own imports (ast, nothing run):

* ``gdbext.core`` never imports ``gdb``, the GDB layer or the host programs;
* ``gdbext.host`` never imports ``gdb`` or the GDB layer; the GDB layer never imports
  the host package;
* a command module (``gdb_layer/commands/*``) never imports another command module;
* the GDB layer has no import circle, and no import inside a function (the way a
  circle is usually dodged).
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "gdbext"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _imports(path: Path) -> List[Tuple[str, bool]]:
    """(absolute module imported, whether the import is inside a function)."""
    tree = ast.parse(path.read_text(), str(path))
    here = _module_name(path).split(".")
    pkg = here if _is_package(path) else here[:-1]
    out: List[Tuple[str, bool]] = []

    def visit(node, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                       ast.Lambda))
            if isinstance(child, ast.Import):
                out.extend((alias.name, inside) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = pkg[:len(pkg) - child.level + 1]
                    mod = ".".join(base + ([child.module] if child.module else []))
                else:
                    mod = child.module or ""
                out.append((mod, inside))
                # 'from . import x' names modules too
                for alias in child.names:
                    out.append((f"{mod}.{alias.name}", inside))
            visit(child, inside)

    visit(tree, False)
    return out


def _modules() -> Dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


MODULES = _modules()


def _internal(name: str) -> str:
    """The gdbext module an import names (a 'from x import name' of a non-module: x)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def _edges(prefix: str) -> Dict[str, Set[str]]:
    edges: Dict[str, Set[str]] = {}
    for name, path in MODULES.items():
        if not name.startswith(prefix):
            continue
        edges[name] = {m for imp, _ in _imports(path)
                       if (m := _internal(imp)) and m != name and m.startswith("gdbext")}
    return edges


def _where(world: str) -> List[Tuple[str, Path]]:
    return [(n, p) for n, p in MODULES.items() if n == world or n.startswith(world + ".")]


@pytest.mark.parametrize("world,forbidden", [
    ("gdbext.core", ("gdb", "gdbext.gdb_layer", "gdbext.host")),
    ("gdbext.host", ("gdb", "gdbext.gdb_layer")),
    ("gdbext.gdb_layer", ("gdbext.host",)),
])
def test_worlds_do_not_import_each_other(world, forbidden):
    bad = []
    for name, path in _where(world):
        for imp, _inside in _imports(path):
            if any(imp == f or imp.startswith(f + ".") for f in forbidden):
                bad.append(f"{name} imports {imp}")
    assert not bad, "; ".join(bad)


def test_command_modules_are_leaves():
    commands = {n for n in MODULES if n.startswith("gdbext.gdb_layer.commands.")}
    assert len(commands) >= 6
    bad = [f"{a} imports {b}" for a, deps in _edges("gdbext.gdb_layer.commands.").items()
           for b in deps if b in commands]
    assert not bad, "; ".join(bad)


def test_no_import_inside_a_function_in_the_gdb_layer_or_host():
    bad = [f"{name}: {imp}" for world in ("gdbext.gdb_layer", "gdbext.host")
           for name, path in _where(world) for imp, inside in _imports(path)
           if inside and imp.startswith("gdbext")]
    assert not bad, "; ".join(bad)


def test_the_gdb_layer_has_no_import_circle():
    edges = _edges("gdbext.gdb_layer")
    layer = {n: {d for d in deps if d.startswith("gdbext.gdb_layer") and d != "gdbext.gdb_layer"}
             for n, deps in edges.items() if n != "gdbext.gdb_layer"}
    state: Dict[str, int] = {}

    def visit(node: str, path: List[str]) -> None:
        state[node] = 1
        for nxt in layer.get(node, ()):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in layer:
        if node not in state:
            visit(node, [node])


def test_the_reader_sees_what_it_checks():
    """The import reader itself: a known edge and a known absence."""
    edges = _edges("gdbext.gdb_layer.commands.paging")
    assert "gdbext.gdb_layer.context" in edges["gdbext.gdb_layer.commands.paging"]
    assert "gdbext.core.paging" in edges["gdbext.gdb_layer.commands.paging"]
    assert "gdbext.gdb_layer.commands.xen" not in edges["gdbext.gdb_layer.commands.paging"]
