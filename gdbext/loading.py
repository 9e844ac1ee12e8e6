"""Make gdbext's dependencies importable in GDB's Python, or say in one line why not.

Never imports ``gdb``: ``gdbext.load()`` calls ``prepare()`` and writes its line.
GDB embeds one Python (3.11 on Debian 12) and knows nothing of virtualenvs, so the
dependencies come from one of:

- the virtualenv named by ``GDBEXT_VENV``, or the checkout's ``.venv`` (``scripts/setup``
  builds it with GDB's Python and installs the checkout into it in editable mode);
- the site-packages gdbext itself was imported from (a ``pip install`` of gdbext into a
  venv made with GDB's Python, or into GDB's user site), where pip put them too;
- GDB's own ``sys.path`` (Debian's python3-* packages, say).
"""

from __future__ import annotations

import os
import site
import sys
from pathlib import Path
from typing import Mapping, Optional, Sequence, Tuple

from . import paths

# Import name -> distribution name of each run-time dependency. setup.cfg's
# install_requires lists the same distributions (a unit test keeps them equal).
DEPENDENCIES = (("tabulate", "tabulate"), ("elftools", "pyelftools"), ("capstone", "capstone"),
                ("pefile", "pefile"))


def python_version() -> str:
    return "%d.%d" % sys.version_info[:2]


def gdb_python() -> Path:
    """The interpreter GDB embeds, as a program (sys.executable inside GDB names python,
    not the libpython GDB links, so it is derived the way scripts/setup does)."""
    return Path(sys.base_prefix) / "bin" / ("python" + python_version())


def venv_site_packages(venv: Path, version: str) -> Path:
    return venv / "lib" / ("python" + version) / "site-packages"


def venv_python_version(venv: Path) -> Optional[str]:
    """The Python version recorded in VENV/pyvenv.cfg, or None if there is none."""
    try:
        with open(venv / "pyvenv.cfg") as f:
            built = dict(line.split("=", 1) for line in f if "=" in line)
    except OSError:
        return None
    built = {key.strip(): value.strip() for key, value in built.items()}
    return built.get("version") or built.get("version_info") or None


def enclosing_venv(package_parent: Path) -> Optional[Path]:
    """The venv whose site-packages is PACKAGE_PARENT (VENV/lib/pythonX.Y/site-packages)."""
    if package_parent.name != "site-packages":
        return None
    venv = package_parent.parent.parent.parent
    return venv if (venv / "pyvenv.cfg").is_file() else None


def choose_venv(package_parent: Path = paths.REPO_ROOT,
                environ: Mapping[str, str] = os.environ) -> Tuple[Optional[Path], str]:
    """The venv to take dependencies from, and where that choice came from (for messages)."""
    if environ.get("GDBEXT_VENV"):
        return Path(environ["GDBEXT_VENV"]), "GDBEXT_VENV"
    holder = enclosing_venv(package_parent)
    if holder is not None:
        return holder, "the venv gdbext is installed in"
    if is_checkout(package_parent) or (package_parent / ".venv").exists():
        return package_parent / ".venv", "the checkout's venv"
    return None, ""


def is_checkout(package_parent: Path) -> bool:
    return (package_parent / "scripts" / "setup").is_file()


def missing_packages(dependencies: Sequence[Tuple[str, str]] = DEPENDENCIES) -> list:
    missing = []
    for module, package in dependencies:
        try:
            __import__(module)
        except ImportError:
            missing.append(package)
    return missing


def prepare(package_parent: Path = paths.REPO_ROOT,
            environ: Mapping[str, str] = os.environ,
            dependencies: Sequence[Tuple[str, str]] = DEPENDENCIES) -> Optional[str]:
    """Add the chosen venv's site-packages to sys.path; None when every dependency imports,
    else the one line that says what is missing, where it looked and what to run."""
    version = python_version()
    venv, source = choose_venv(package_parent, environ)
    site_dir = venv_site_packages(venv, version) if venv is not None else None
    if venv is not None and venv.is_dir():
        built = venv_python_version(venv)
        if built and built != version and not built.startswith(version + "."):
            return ("gdbext: %s (%s) was built with Python %s but GDB embeds Python %s: %s"
                    % (venv, source, built, version, rebuild_hint(package_parent, venv)))
        if site_dir.is_dir() and str(site_dir) not in sys.path:
            site.addsitedir(str(site_dir))
    missing = missing_packages(dependencies)
    if not missing:
        return None
    return missing_message(missing, version, package_parent, venv, source)


def rebuild_hint(package_parent: Path, venv: Path) -> str:
    if is_checkout(package_parent) and venv == package_parent / ".venv":
        return "run %s to rebuild it" % (package_parent / "scripts" / "setup")
    return "rebuild it with %s -m venv %s" % (gdb_python(), venv)


def missing_message(missing: Sequence[str], version: str, package_parent: Path,
                    venv: Optional[Path], source: str) -> str:
    """One line: which packages, which Python, where they were looked for, what to run."""
    names = " ".join(missing)
    head = "gdbext: missing Python package%s %s for GDB's Python %s" % (
        "s" if len(missing) > 1 else "", ", ".join(missing), version)
    setup = package_parent / "scripts" / "setup"
    run_setup = "run %s" % setup if is_checkout(package_parent) else None
    if venv is None:
        where = ("gdbext was imported from %s, outside any venv, and GDBEXT_VENV is unset"
                 % package_parent)
        todo = ("install them for that Python (%s -m pip install --user %s), or set GDBEXT_VENV "
                "to a venv made with it that has them" % (gdb_python(), names))
        return "%s: %s: %s" % (head, where, todo)
    site_dir = venv_site_packages(venv, version)
    if not site_dir.is_dir():
        where = "looked for %s (%s), which does not exist" % (site_dir, source)
        todo = run_setup or ("create it: %s -m venv %s && %s/bin/python -m pip install %s"
                             % (gdb_python(), venv, venv, names))
        return "%s: %s: %s" % (head, where, todo)
    where = "not in %s (%s) nor on GDB's own sys.path" % (site_dir, source)
    pip = "%s/bin/python -m pip install %s" % (venv, names)
    todo = "%s (or: %s)" % (run_setup, pip) if run_setup else "run: %s" % pip
    return "%s: %s: %s" % (head, where, todo)
