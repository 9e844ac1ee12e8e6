"""Load gdbext into GDB:  (gdb) source /path/to/repo/gdbext/gdbinit.py

Also usable from ~/.gdbinit with an absolute path. Finds the project's
virtualenv (built by scripts/setup with the Python that GDB embeds) and adds its
site-packages, then registers the commands. Loading twice does no harm. If a
dependency is missing, one line says which and how to install it.
"""

import os
import sys


def _gdbext_load():
    import gdb

    here = os.path.dirname(os.path.abspath(__file__))
    repo = os.path.dirname(here)
    venv = os.environ.get("GDBEXT_VENV", os.path.join(repo, ".venv"))
    want = "%d.%d" % sys.version_info[:2]
    site_dir = os.path.join(venv, "lib", "python" + want, "site-packages")
    cfg = os.path.join(venv, "pyvenv.cfg")
    if os.path.isfile(cfg):
        with open(cfg) as f:
            built = dict(line.split("=", 1) for line in f if "=" in line)
        version = built.get("version", built.get("version_info", "")).strip()
        if version and not version.startswith(want + ".") and version != want:
            gdb.write("gdbext: %s was built with Python %s but GDB embeds Python %s: "
                      "run %s/scripts/setup to rebuild it\n" % (venv, version, want, repo),
                      gdb.STDERR)
            return
    if os.path.isdir(site_dir):
        import site
        if site_dir not in sys.path:
            site.addsitedir(site_dir)
    if repo not in sys.path:
        sys.path.insert(0, repo)
    missing = []
    for module, package in (("pygments", "pygments"), ("tabulate", "tabulate"),
                            ("elftools", "pyelftools"), ("capstone", "capstone"),
                            ("pefile", "pefile")):
        try:
            __import__(module)
        except ImportError:
            missing.append(package)
    if missing:
        gdb.write("gdbext: missing Python package%s %s for GDB's Python %s: run %s/scripts/setup "
                  "(or: %s/bin/pip install %s)\n"
                  % ("s" if len(missing) > 1 else "", ", ".join(missing), want, repo, venv,
                     " ".join(missing)), gdb.STDERR)
        return
    from gdbext import gdb_layer
    if gdb_layer.install():
        gdb.write("gdbext loaded: 'help xen' lists the commands\n")


_gdbext_load()
del _gdbext_load
