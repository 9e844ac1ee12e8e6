"""gdbext.loading: the venv it picks and the line it writes (GDB's side: integration/test_loading.py)."""

from __future__ import annotations

import configparser
import re
from pathlib import Path

from gdbext import loading, paths


def test_dependencies_are_setup_cfg_install_requires():
    cfg = configparser.ConfigParser()
    cfg.read(paths.REPO_ROOT / "setup.cfg")
    required = [re.split(r"[<>=!~ ;\[]", line.strip(), maxsplit=1)[0].lower()
                for line in cfg["options"]["install_requires"].splitlines() if line.strip()]
    assert sorted(package for _, package in loading.DEPENDENCIES) == sorted(required)


def test_gdbext_venv_wins_then_the_holding_venv_then_the_checkout(tmp_path):
    venv = tmp_path / "v"
    site = venv / "lib" / "python3.11" / "site-packages"
    site.mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text("version = 3.11.2\n")
    assert loading.choose_venv(site, {}) == (venv, "the venv gdbext is installed in")
    assert loading.choose_venv(site, {"GDBEXT_VENV": "/x"}) == (Path("/x"), "GDBEXT_VENV")
    checkout = tmp_path / "repo"
    (checkout / "scripts").mkdir(parents=True)
    (checkout / "scripts" / "setup").write_text("")
    assert loading.choose_venv(checkout, {}) == (checkout / ".venv", "the checkout's venv")
    assert loading.choose_venv(tmp_path / "elsewhere", {}) == (None, "")


def test_wrong_python_venv_is_refused_with_the_versions(tmp_path):
    venv = tmp_path / "v"
    venv.mkdir()
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\nversion = 2.7.18\n")
    line = loading.prepare(tmp_path, {"GDBEXT_VENV": str(venv)}, dependencies=())
    assert line.startswith(f"gdbext: {venv} (GDBEXT_VENV) was built with Python 2.7.18 but GDB "
                           f"embeds Python {loading.python_version()}")


def test_missing_message_names_the_paths(tmp_path):
    venv = tmp_path / "v"
    site = loading.venv_site_packages(venv, "3.11")
    site.mkdir(parents=True)
    line = loading.missing_message(["tabulate"], "3.11", tmp_path, venv, "GDBEXT_VENV")
    assert line == (f"gdbext: missing Python package tabulate for GDB's Python 3.11: not in {site} "
                    f"(GDBEXT_VENV) nor on GDB's own sys.path: run: {venv}/bin/python -m pip "
                    "install tabulate")
    line = loading.missing_message(["a", "b"], "3.11", tmp_path, tmp_path / "none", "GDBEXT_VENV")
    assert "packages a, b" in line and "which does not exist" in line and "\n" not in line
    line = loading.missing_message(["a"], "3.11", tmp_path, None, "")
    assert f"imported from {tmp_path}, outside any venv" in line and "GDBEXT_VENV" in line
