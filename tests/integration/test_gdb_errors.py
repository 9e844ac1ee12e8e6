"""The extension in a GDB with no target, and with a wrong xen-syms: one clear line each."""

from __future__ import annotations

from gdbext.host.gdbdriver import GDBINIT, GdbSession


def test_commands_without_a_target_say_so(tmp_path):
    with GdbSession() as gdb:
        help_text = gdb.execute("help xen").out
        for name in ("xen-pt", "xen-va2pa", "xen-pa2va", "xen-regs", "xen-syms", "xen-run-to"):
            assert name in help_text
        for command in ("xen-pt", "xen-va2pa 0x1000", "xen-regs", "xen-pa2va 0"):
            reply = gdb.execute(command, check=False)
            assert reply.error and "not connected" in reply.error, (command, reply.error)
            assert "\n" not in reply.error
        missing = tmp_path / "no-such-xen-syms"
        reply = gdb.execute(f"xen-syms {missing}", check=False)
        assert reply.error and str(missing) in reply.error
        not_elf = tmp_path / "notes.txt"
        not_elf.write_text("hello\n")
        reply = gdb.execute(f"xen-syms {not_elf}", check=False)
        assert reply.error and str(not_elf) in reply.error
        reply = gdb.execute("xen-run-to __efi64_mb2_start", check=False)
        assert reply.error and "xen-syms" in reply.error


def test_every_command_without_a_target_is_one_line(xen_syms_path):
    """With xen-syms loaded but nothing to attach to, each command that needs the guest
    names what is missing, in one line, without a traceback."""
    needs_guest = ("xen-pt", "xen-pt --root merge", "xen-pt --svg /tmp/x.svg", "xen-va2pa 0",
                   "xen-va2pa efi_multiboot2@pa", "xen-pa2va 0", "xen-regs", "xen-locate",
                   "xen-info", "xen-l4merge-check", "xen-l4merge-check --predict",
                   "xen-l4merge-apply", "xen-mb2-break", "xen-mb2-break --batch",
                   "xen-diagram", "xen-diagram --compare", "xen-walkthrough --no-wait")
    with GdbSession() as gdb:
        gdb.execute(f"xen-syms {xen_syms_path}")
        for command in needs_guest:
            reply = gdb.execute(command, check=False)
            assert reply.error, command
            assert "not connected" in reply.error, (command, reply.error)
            assert "\n" not in reply.error and "Traceback" not in reply.out, command


def test_loading_twice_is_harmless():
    with GdbSession() as gdb:
        gdb.execute(f"source {GDBINIT}")
        assert "xen pt, xen-pt" in gdb.execute("help xen").out


def test_missing_dependency_is_one_clear_line(tmp_path):
    # A venv without our dependencies: GDB's own Python has no tabulate.
    import subprocess

    from gdbext.host.gdbdriver import gdb_binary

    env = dict(__import__("os").environ, GDBEXT_VENV=str(tmp_path / "empty-venv"))
    out = subprocess.run([gdb_binary(), "-nx", "-batch", "-ex", f"source {GDBINIT}",
                          "-ex", "help xen"], env=env, capture_output=True, text=True,
                         timeout=60)
    text = out.stdout + out.stderr
    assert "gdbext: missing Python package" in text and "tabulate" in text
    assert "scripts/setup" in text
    assert "Traceback" not in text
