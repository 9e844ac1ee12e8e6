"""Load gdbext into GDB:  (gdb) source /path/to/repo/gdbext/gdbinit.py

Works from GDB's command line, from ~/.gdbinit, and from Python code GDB runs
(gdb.execute("source .../gdbinit.py")), whatever the working directory; the same
file inside an installed package (VENV/lib/python3.11/site-packages/gdbext/gdbinit.py)
loads that package. It puts the gdbext package that holds this file first on
sys.path and calls gdbext.load(), which adds the venv's site-packages (GDBEXT_VENV,
or the checkout's .venv from scripts/setup) and registers the commands. If this
file is not inside a gdbext package, an importable gdbext is used (an installed one,
or the one in GDBEXT_VENV). Loading twice does no harm. Anything missing: one line
saying what was looked for and where.
"""


def _gdbext_load():
    import os
    import site
    import sys

    import gdb

    version = "%d.%d" % sys.version_info[:2]

    def package_dir(name):
        """The real path of the gdbext package whose gdbinit.py NAME is, or None.

        NAME is only trusted once checked: the directory is called gdbext, holds
        __init__.py, and its gdbinit.py is NAME."""
        if not name or name.startswith("<"):
            return None
        names = [name]
        if not os.path.isabs(name):
            # 'source gdbinit.py' may have been found on GDB's source path, and GDB then
            # passes the bare name: try cwd first (as GDB does), then those directories.
            for directory in gdb.parameter("directories").split(os.pathsep):
                if directory == "$cwd":
                    directory = os.getcwd()
                if directory and not directory.startswith("$"):
                    names.append(os.path.join(os.path.expanduser(directory), name))
        for candidate in names:
            path = os.path.realpath(candidate)
            here = os.path.dirname(path)
            ours = os.path.join(here, "gdbinit.py")
            if (os.path.basename(here) == "gdbext"
                    and os.path.isfile(os.path.join(here, "__init__.py"))
                    and os.path.isfile(path) and os.path.isfile(ours)
                    and os.path.samefile(path, ours)):
                return here
        return None

    # When a Python file GDB sources runs 'source' on this one, GDB runs it in the same
    # __main__ namespace and leaves __file__ naming the outer file. The code object
    # records the name GDB compiled this file under; __file__ is only a second guess
    # (exec(open(p).read(), {"__file__": p}) compiles it as "<string>").
    compiled_as = _gdbext_load.__code__.co_filename
    here = package_dir(compiled_as) or package_dir(globals().get("__file__"))
    looked = "this file ran as %r, which is not a gdbext/gdbinit.py" % compiled_as
    if here is not None:
        parent = os.path.dirname(here)
        if parent not in sys.path:
            sys.path.insert(0, parent)
        if os.path.basename(parent) == "site-packages":
            site.addsitedir(parent)  # an installed copy: its .pth files, like any site dir
    elif os.environ.get("GDBEXT_VENV"):
        # The layout loading.venv_site_packages names; gdbext is not importable yet.
        venv_site = os.path.join(os.environ["GDBEXT_VENV"], "lib", "python" + version,
                                 "site-packages")
        looked += ", nor in %s (GDBEXT_VENV)" % venv_site
        if os.path.isdir(venv_site):
            site.addsitedir(venv_site)
    else:
        looked += ", and GDBEXT_VENV is unset"
    try:
        import gdbext
    except ImportError:
        gdb.write("gdbext: cannot find the gdbext package: %s, and GDB's Python %s cannot "
                  "import gdbext: source gdbinit.py by its path in the checkout or the "
                  "installed package, or set GDBEXT_VENV to a venv gdbext is installed in\n"
                  % (looked, version), gdb.STDERR)
        return
    imported = os.path.dirname(os.path.realpath(gdbext.__file__))
    if here is not None and imported != here:
        gdb.write("gdbext: this GDB already imported gdbext from %s, not %s (this file's): "
                  "start a new GDB to load this one\n" % (imported, here), gdb.STDERR)
        return
    gdbext.load()


_gdbext_load()
del _gdbext_load
