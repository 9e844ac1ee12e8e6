"""Loading gdbext into a real GDB (no QEMU): from a nested Python 'source' in another
directory, from ~/.gdbinit, from an installed wheel in a fresh venv, and the one line
a venv without the dependencies gets."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gdbext import paths
from gdbext.host.gdbdriver import gdb_binary

VERSION = "%d.%d" % sys.version_info[:2]
# Commands 'help xen' lists once gdbext is loaded.
SOME_COMMANDS = ("xen-pt", "xen-va2pa", "xen-syms", "xen-mb2-break")


def clean_env(**extra):
    """The environment without anything that would lead GDB's Python to gdbext or to
    the lab's venv other than what the test sets."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("GDBEXT_VENV", "PYTHONPATH", "PYTHONHOME", "XDG_CONFIG_HOME",
                        "VIRTUAL_ENV")}
    env.update(extra)
    return env


def run_gdb(args, cwd, env, nx=True):
    argv = [gdb_binary()] + (["-nx"] if nx else []) + ["-batch"] + list(args)
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    return done.stdout, done.stderr


def assert_loaded(out, err, from_dir: Path):
    """'help xen' listed the commands, gdbext came from FROM_DIR, and nothing else was said."""
    for name in SOME_COMMANDS:
        assert name in out, (name, out, err)
    assert "Undefined command" not in out + err and "Traceback" not in out + err, err
    assert [l for l in (out + err).splitlines() if l.startswith("gdbext:")] == [], out + err
    assert err.strip() == "", err
    assert f"FROM {from_dir.resolve()}/gdbext/__init__.py" in out, out


def where_from():
    return ["-ex", "python import gdbext, os; print('FROM', os.path.realpath(gdbext.__file__))"]


@pytest.fixture(scope="session")
def installed_venv(tmp_path_factory):
    """A venv made with GDB's Python holding only a wheel of this tree and its dependencies
    (pip resolves them as for any user). Built once per test session."""
    base = tmp_path_factory.mktemp("installed")
    src = base / "src"
    # Build from a copy so the wheel holds what the package declares, not stray files, and
    # the build leaves nothing in the checkout.
    shutil.copytree(paths.REPO_ROOT / "gdbext", src / "gdbext",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(paths.REPO_ROOT / name, src / name)
    wheels = base / "wheels"
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run(pip + ["wheel", "--no-deps", "-w", str(wheels), str(src)], check=True,
                   capture_output=True, text=True, timeout=300)
    (wheel,) = wheels.glob("gdbext-*.whl")
    venv = base / "venv"
    gdb_python = gdb_embedded_python()
    subprocess.run([gdb_python, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    subprocess.run(pip + ["--python", str(venv / "bin" / "python"), "install", str(wheel)],
                   check=True, capture_output=True, text=True, timeout=300)
    shutil.rmtree(src)
    return venv


def gdb_embedded_python() -> str:
    out = subprocess.run([gdb_binary(), "-nx", "-batch", "-ex",
                          "python import sys; print(sys.base_prefix, '%d.%d' % sys.version_info[:2])"],
                         capture_output=True, text=True, timeout=60, check=True).stdout.split()
    return f"{out[0]}/bin/python{out[1]}"


def site_packages(venv: Path) -> Path:
    return venv / "lib" / f"python{VERSION}" / "site-packages"


def test_nested_python_source_from_another_directory(tmp_path):
    """The issue's reproduction: outer.py, sourced by a relative name in another directory,
    sources gdbinit.py; GDB's __file__ then names outer.py."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "outer.py").write_text(
        f"import gdb\ngdb.execute('source {paths.GDBINIT}')\n")
    out, err = run_gdb(["-ex", "source outer.py", "-ex", "help xen"] + where_from(),
                       cwd=elsewhere, env=clean_env())
    assert_loaded(out, err, paths.REPO_ROOT)


def test_home_gdbinit_with_a_relative_working_directory(tmp_path):
    """~/.gdbinit's line names the checkout through ~ (a symlink in HOME); GDB starts in a
    directory below HOME and sources a relative script that uses the commands."""
    home = tmp_path / "home"
    (home / "src").mkdir(parents=True)
    (home / "src" / "gdbext").symlink_to(paths.REPO_ROOT)
    (home / ".gdbinit").write_text("source ~/src/gdbext/gdbext/gdbinit.py\n")
    work = home / "work" / "sub"
    work.mkdir(parents=True)
    (work / "check.gdb").write_text("help xen\n")
    out, err = run_gdb(["-x", "check.gdb"] + where_from(), cwd=work,
                       env=clean_env(HOME=str(home)), nx=False)
    assert_loaded(out, err, paths.REPO_ROOT)


def test_installed_wheel_by_sourcing_its_gdbinit(installed_venv, tmp_path):
    out, err = run_gdb(["-ex", f"source {site_packages(installed_venv)}/gdbext/gdbinit.py",
                        "-ex", "help xen"] + where_from(), cwd=tmp_path, env=clean_env())
    assert_loaded(out, err, site_packages(installed_venv))


def test_installed_wheel_from_python(installed_venv, tmp_path):
    """A CI author's Python script: the venv's site-packages on sys.path, then load()."""
    script = tmp_path / "ci.py"
    script.write_text("import sys\n"
                      f"sys.path.insert(0, {str(site_packages(installed_venv))!r})\n"
                      "import gdbext\n"
                      "assert gdbext.load()\n")
    out, err = run_gdb(["-ex", f"source {script}", "-ex", "help xen"] + where_from(),
                       cwd=tmp_path, env=clean_env())
    assert_loaded(out, err, site_packages(installed_venv))


def test_installed_wheel_through_gdbext_venv(installed_venv, tmp_path):
    """gdbinit.py run where its own location is unknown (exec'd as '<string>'): GDBEXT_VENV
    leads to the installed package, not to the checkout it was read from."""
    out, err = run_gdb(["-ex", f"python exec(open({str(paths.GDBINIT)!r}).read())",
                        "-ex", "help xen"] + where_from(),
                       cwd=tmp_path, env=clean_env(GDBEXT_VENV=str(installed_venv)))
    assert_loaded(out, err, site_packages(installed_venv))


def test_venv_without_the_dependencies_is_one_line_naming_it(tmp_path):
    venv = tmp_path / "bare-venv"
    subprocess.run([gdb_embedded_python(), "-m", "venv", "--without-pip", str(venv)],
                   check=True, timeout=120)
    out, err = run_gdb(["-ex", f"source {paths.GDBINIT}", "-ex", "help xen"], cwd=tmp_path,
                       env=clean_env(GDBEXT_VENV=str(venv)))
    lines = [l for l in err.splitlines() if l.startswith("gdbext:")]
    assert len(lines) == 1, err
    line = lines[0]
    assert "missing Python package" in line and "tabulate" in line and "pyelftools" in line
    assert f"not in {site_packages(venv)} (GDBEXT_VENV)" in line, line
    assert f"run {paths.REPO_ROOT / 'scripts' / 'setup'}" in line, line
    assert f"{venv}/bin/python -m pip install" in line, line
    assert "Traceback" not in out + err
    assert "gdbext loaded" not in out


def test_no_venv_at_all_says_where_it_looked(tmp_path):
    venv = tmp_path / "no-such-venv"
    out, err = run_gdb(["-ex", f"source {paths.GDBINIT}"], cwd=tmp_path,
                       env=clean_env(GDBEXT_VENV=str(venv)))
    lines = [l for l in err.splitlines() if l.startswith("gdbext:")]
    assert len(lines) == 1, err
    assert f"looked for {site_packages(venv)} (GDBEXT_VENV), which does not exist" in lines[0]
    assert "Traceback" not in out + err


def test_unknown_location_and_nothing_importable_says_so(tmp_path):
    out, err = run_gdb(["-ex", f"python exec(open({str(paths.GDBINIT)!r}).read())"],
                       cwd=tmp_path, env=clean_env())
    lines = [l for l in err.splitlines() if l.startswith("gdbext:")]
    assert len(lines) == 1, err
    assert "cannot find the gdbext package" in lines[0] and "'<string>'" in lines[0]
    assert "GDBEXT_VENV is unset" in lines[0]
    assert "Traceback" not in out + err
