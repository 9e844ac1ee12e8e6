"""A real boot: OVMF -> GRUB -> Debian's Xen 4.17 under QEMU, continued by GDB.

QEMU starts halted (-S); GDB attaches in batch mode and continues it; Xen's own serial
line "Xen image load base address: 0x..." proves the boot and gives the load base B.
Every process started here is stopped by its pid when the test ends, pass or fail.
"""

import os
import shutil
import signal
import subprocess
import time

import pytest

from gdbext.host import lab as L
from gdbext import paths

pytestmark = pytest.mark.integration

BOOT_TIMEOUT_S = 120.0  # measured: about 4.5 s from QEMU start on a 2-core TCG host
GDB_EXIT_TIMEOUT_S = 10.0


def _prerequisites_missing():
    for tool in (L.QEMU_BINARY, L.GRUB_MKSTANDALONE, L.GDB_BINARY):
        if shutil.which(tool) is None:
            return f"{tool} not installed: run scripts/setup"
    for f in (paths.XEN_DEBIAN_IMAGE, paths.OVMF_CODE, paths.OVMF_VARS):
        if not f.is_file():
            return f"{f} missing: run scripts/setup"
    return None


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _stop_by_pid(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=GDB_EXIT_TIMEOUT_S)


@pytest.mark.parametrize("memory_mb", [1024, 4096])
def test_xen_boots_under_gdb_and_prints_a_sane_load_base(tmp_path, memory_mb):
    # A missing tool or file is a failure here, as in conftest.py, never a skip.
    missing = _prerequisites_missing()
    if missing is not None:
        pytest.fail(missing)
    lab = L.Lab(L.LabConfig(memory_mb=memory_mb, workdir=tmp_path / "lab"))
    gdb = None
    qemu_pid = None
    try:
        t0 = time.monotonic()
        lab.start()
        qemu_pid = lab.pid
        assert lab.alive()
        assert lab.gdb_target == f"127.0.0.1:{lab.port}"
        # Halted at the first instruction: nothing on the console until GDB continues.
        time.sleep(0.5)
        assert "Xen" not in lab.serial_text()

        with open(tmp_path / "gdb.log", "wb") as gdb_log:
            gdb = subprocess.Popen(
                [L.GDB_BINARY, "-nx", "-batch", "-ex", lab.attach_command, "-ex", "continue"],
                stdin=subprocess.DEVNULL,
                stdout=gdb_log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        m = lab.wait_for_serial(L.XEN_LOAD_BASE_RE, timeout=BOOT_TIMEOUT_S)
        boot_s = time.monotonic() - t0
        base = int(m.group(1), 16)
        print(f"-m {memory_mb}: Xen image load base address {base:#x}, {boot_s:.1f} s after start")

        assert base % L.XEN_LOAD_ALIGN == 0, f"load base {base:#x} not 2 MiB aligned"
        assert 0 < base < memory_mb << 20, f"load base {base:#x} outside {memory_mb} MiB of RAM"
        assert base < 1 << 32  # multiboot2 RELOCATABLE tag: max 0xffffffff

        status = lab.stop()
        assert status is not None
        assert not lab.alive()
        assert _pid_gone(qemu_pid)
        assert lab.serial_log.is_file() and lab.qemu_log.is_file()  # logs are kept
        assert not (lab.workdir / L.VARS_COPY_NAME).exists()
    finally:
        if gdb is not None:
            _stop_by_pid(gdb)
        lab.stop()
    # Outside ``finally``: an assertion there would hide the test's own failure.
    assert qemu_pid is not None and _pid_gone(qemu_pid)
