"""Fast tests of gdbext.lab's pure parts: no QEMU, no GRUB, no network beyond 127.0.0.1."""

import os
import re
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from gdbext.host import lab as L
from gdbext.core import multiboot2
from gdbext.core.errors import GdbextError


# ----------------------------------------------------------------- helpers


def mb2_image(path: Path, offset: int = 0x98, checksum_ok: bool = True) -> Path:
    """A tiny file with a multiboot2 header at ``offset`` (enough for validation)."""
    data = bytearray(multiboot2.MB2_SEARCH_BYTES + 4096)
    magic, arch, length = multiboot2.MB2_HEADER_MAGIC, 0, 24
    checksum = (-(magic + arch + length)) & 0xFFFFFFFF
    if not checksum_ok:
        checksum ^= 1
    struct.pack_into("<IIII", data, offset, magic, arch, length, checksum)
    data[:5] = b"\x7fELF\x01"
    path.write_bytes(bytes(data))
    return path


@pytest.fixture
def listener():
    """A socket this test binds and listens on 127.0.0.1 (a port that is taken)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((L.LOOPBACK, 0))
    s.listen(1)
    try:
        yield s
    finally:
        s.close()


def config(tmp_path: Path, **kw) -> L.LabConfig:
    kw.setdefault("xen_image", mb2_image(tmp_path / "xen"))
    kw.setdefault("xen_syms", None)
    return L.LabConfig(**kw)


# ----------------------------------------------------------------- grub.cfg


def test_grub_cfg_default_boots_xen_gz_over_serial():
    cfg = L.grub_cfg()
    lines = cfg.splitlines()
    assert lines[0] == "set timeout=0"
    assert "serial --unit=0 --speed=115200" in lines
    assert "terminal_output serial" in lines
    assert "search --no-floppy --file --set=root /xen.gz" in lines
    assert f"multiboot2 /xen.gz {L.DEFAULT_XEN_CMDLINE}" in lines
    assert lines[-1] == "boot"
    assert cfg.endswith("\n")
    # search must come before the image is loaded from $root
    assert lines.index("search --no-floppy --file --set=root /xen.gz") < lines.index(
        f"multiboot2 /xen.gz {L.DEFAULT_XEN_CMDLINE}"
    )


def test_grub_cfg_quotes_words_grub_would_interpret():
    cfg = L.grub_cfg("console=com1 dom0_mem=1G,max:1G x=$y 'q' a;b")
    line = next(ln for ln in cfg.splitlines() if ln.startswith("multiboot2"))
    assert line == "multiboot2 /xen.gz console=com1 dom0_mem=1G,max:1G 'x=$y' ''\\''q'\\''' 'a;b'"


def test_grub_cfg_empty_cmdline_and_multiline_rejected():
    assert "multiboot2 /xen.gz\n" in L.grub_cfg("")
    with pytest.raises(L.LabError, match="one line"):
        L.grub_cfg("console=com1\nboot")


def test_grub_mkstandalone_command_embeds_cfg_and_restricts_modules(tmp_path):
    argv = L.grub_mkstandalone_command(tmp_path / "BOOTX64.EFI", tmp_path / "grub.cfg")
    assert argv[0] == "grub-mkstandalone"
    assert argv[argv.index("-O") + 1] == "x86_64-efi"
    assert argv[argv.index("-o") + 1] == str(tmp_path / "BOOTX64.EFI")
    assert argv[-1] == f"boot/grub/grub.cfg={tmp_path / 'grub.cfg'}"
    mods = next(a for a in argv if a.startswith("--modules=")).split("=", 1)[1].split()
    installed = next(a for a in argv if a.startswith("--install-modules=")).split("=", 1)[1].split()
    assert mods == installed == list(L.GRUB_MODULES)
    for needed in ("normal", "part_msdos", "fat", "search", "multiboot2", "gzio"):
        assert needed in mods


def test_grub_cache_key_depends_on_cfg_and_modules():
    a = L.grub_cache_key(L.grub_cfg())
    assert a == L.grub_cache_key(L.grub_cfg())
    assert a != L.grub_cache_key(L.grub_cfg("console=com1"))
    assert a != L.grub_cache_key(L.grub_cfg(), L.GRUB_MODULES[:-1])


# ----------------------------------------------------------------- QEMU argv


def test_qemu_command_is_the_reference_boot(tmp_path):
    cfg = L.LabConfig(memory_mb=4096, cpu="max", smp=2, extra_qemu_args=["-d", "int"])
    argv = L.qemu_command(
        cfg, port=12345, esp_dir=tmp_path / "esp", vars_path=tmp_path / "vars.fd",
        serial_log=tmp_path / "serial.log",
    )
    assert argv[0] == "qemu-system-x86_64"

    def after(flag):
        return [argv[i + 1] for i, a in enumerate(argv) if a == flag]

    assert after("-machine") == ["q35"]
    assert after("-m") == ["4096"]
    assert after("-cpu") == ["max"]
    assert after("-smp") == ["2"]
    assert after("-gdb") == ["tcp:127.0.0.1:12345"]
    assert after("-serial") == [f"file:{tmp_path / 'serial.log'}"]
    assert after("-monitor") == ["none"]
    assert after("-net") == ["none"]
    assert "-no-reboot" not in argv  # xen-run-to's reset fallback needs reboots
    for flag in ("-S", "-nographic"):
        assert flag in argv
    drives = after("-drive")
    assert drives == [
        f"if=pflash,format=raw,unit=0,readonly=on,file={L.paths.OVMF_CODE}",
        f"if=pflash,format=raw,unit=1,file={tmp_path / 'vars.fd'}",
        f"file=fat:rw:{tmp_path / 'esp'},format=raw,if=virtio",
    ]
    assert argv[-2:] == ["-d", "int"]  # extra arguments come last


def test_qemu_command_doubles_commas_in_drive_paths(tmp_path):
    argv = L.qemu_command(
        L.LabConfig(), port=1, esp_dir=Path("/x,y/esp"), vars_path=Path("/v,w"),
        serial_log=tmp_path / "s",
    )
    assert "file=fat:rw:/x,,y/esp,format=raw,if=virtio" in argv
    assert "if=pflash,format=raw,unit=1,file=/v,,w" in argv


def test_lab_config_defaults_are_the_debian_xen():
    cfg = L.LabConfig()
    assert cfg.xen_image == L.paths.XEN_DEBIAN_IMAGE
    assert cfg.xen_syms == L.paths.XEN_DEBIAN_SYMS
    assert (cfg.memory_mb, cfg.cpu, cfg.smp, cfg.gdb_port) == (1024, "qemu64", 1, None)
    assert cfg.xen_cmdline == "console=com1 com1=115200 loglvl=all noreboot"
    assert L.LabConfig(xen_image="x", workdir="w").xen_image == Path("x")


# ----------------------------------------------------------------- validation


def test_missing_user_image_is_one_clear_line(tmp_path):
    cfg = L.LabConfig(xen_image=tmp_path / "nope.gz", xen_syms=None)
    with pytest.raises(L.LabError) as e:
        L.validate_config(cfg)
    msg = str(e.value)
    assert isinstance(e.value, GdbextError)
    assert "\n" not in msg
    assert str(tmp_path / "nope.gz") in msg and "does not exist" in msg


@pytest.mark.parametrize("name", sorted(L.paths.BUILDS))
def test_missing_debian_image_says_run_setup(tmp_path, monkeypatch, name):
    build = L.paths.BUILDS[name]
    gone = build._replace(image=tmp_path / "cache" / build.image.name)
    monkeypatch.setitem(L.paths.BUILDS, name, gone)
    with pytest.raises(L.LabError, match=rf"is missing: run scripts/setup .*{build.packages[0]}\)"):
        L.validate_config(L.LabConfig(xen_image=gone.image, xen_syms=None))


@pytest.mark.parametrize("name", sorted(L.paths.BUILDS))
def test_build_names_image_and_syms(name):
    build = L.paths.BUILDS[name]
    assert L.paths.image_and_syms(name, None, None) == (build.image, build.syms)
    assert L.paths.image_and_syms(None, None, None) == (
        L.paths.BUILDS[L.paths.DEFAULT_BUILD].image, L.paths.BUILDS[L.paths.DEFAULT_BUILD].syms)
    assert L.paths.image_and_syms(None, Path("/x.gz"), None) == (Path("/x.gz"), None)
    with pytest.raises(ValueError, match="both name the image"):
        L.paths.image_and_syms(name, Path("/x.gz"), None)


def test_missing_syms_and_missing_image_do_not_start_anything(tmp_path, monkeypatch):
    monkeypatch.setattr(L.paths, "LAB_DIR", tmp_path / "labdir")
    with pytest.raises(L.LabError, match="Xen symbols .* does not exist"):
        L.validate_config(config(tmp_path, xen_syms=tmp_path / "syms"))
    lab = L.Lab(L.LabConfig(xen_image=tmp_path / "nope", xen_syms=None))
    with pytest.raises(L.LabError, match="does not exist"):
        lab.start()
    assert lab.pid is None and lab.workdir is None and not lab.alive()
    assert not (tmp_path / "labdir").exists()
    assert lab.stop() is None  # idempotent, also before a start


def test_images_that_are_not_multiboot2_are_refused(tmp_path):
    pe = tmp_path / "xen.efi"
    pe.write_bytes(b"MZ" + bytes(4096))
    with pytest.raises(L.LabError, match="PE/EFI"):
        L.validate_config(config(tmp_path, xen_image=pe))
    elf64 = tmp_path / "xen-syms"
    elf64.write_bytes(b"\x7fELF\x02\x01" + bytes(4096))
    with pytest.raises(L.LabError, match="64-bit ELF"):
        L.validate_config(config(tmp_path, xen_image=elf64))
    junk = mb2_image(tmp_path / "junk", checksum_ok=False)
    with pytest.raises(L.LabError, match="no multiboot2 header"):
        L.validate_config(config(tmp_path, xen_image=junk))


def test_find_multiboot2_header():
    data = bytearray(multiboot2.MB2_SEARCH_BYTES + 64)
    magic = multiboot2.MB2_HEADER_MAGIC
    struct.pack_into("<IIII", data, 0x98, magic, 0, 16, (-(magic + 16)) & 0xFFFFFFFF)
    assert multiboot2.find_header(bytes(data)) == 0x98
    late = bytearray(multiboot2.MB2_SEARCH_BYTES + 64)
    struct.pack_into("<IIII", late, multiboot2.MB2_SEARCH_BYTES, magic, 0, 16, (-(magic + 16)) & 0xFFFFFFFF)
    assert multiboot2.find_header(bytes(late)) is None
    assert multiboot2.find_header(b"") is None


def test_gzip_image_is_looked_into(tmp_path):
    import gzip

    raw = mb2_image(tmp_path / "xen").read_bytes()
    gz = tmp_path / "xen.gz"
    gz.write_bytes(gzip.compress(raw))
    L.validate_config(config(tmp_path, xen_image=gz))  # no error
    broken = tmp_path / "broken.gz"
    broken.write_bytes(b"\x1f\x8b" + b"\0" * 64)
    with pytest.raises(L.LabError, match="broken gzip"):
        L.validate_config(config(tmp_path, xen_image=broken))


def test_bad_numbers_are_refused(tmp_path):
    for kw, what in (({"memory_mb": 0}, "memory"), ({"smp": -1}, "smp"), ({"gdb_port": 70000}, "TCP port")):
        with pytest.raises(L.LabError, match=what):
            L.validate_config(config(tmp_path, **kw))


# ----------------------------------------------------------------- ports


def test_port_taken_by_a_listener_is_detected(listener):
    port = listener.getsockname()[1]
    assert not L.port_is_free(port)
    with pytest.raises(L.LabError) as e:
        L.check_port_free(port)
    assert f"port {port} on 127.0.0.1 is already in use" in str(e.value)


def test_port_taken_by_a_bound_socket_is_detected():
    with socket.socket() as s:
        s.bind((L.LOOPBACK, 0))  # bound, not listening, no SO_REUSEADDR
        assert not L.port_is_free(s.getsockname()[1])


def test_lab_start_refuses_a_taken_user_port(tmp_path, listener, monkeypatch):
    monkeypatch.setattr(L.paths, "LAB_DIR", tmp_path / "labdir")
    port = listener.getsockname()[1]
    lab = L.Lab(config(tmp_path, gdb_port=port))
    with pytest.raises(L.LabError, match=f"port {port} .* already in use"):
        lab.start()
    assert lab.pid is None and not (tmp_path / "labdir").exists()


def test_picked_port_is_free_then():
    port = L.pick_free_port()
    assert 0 < port < 65536 and L.port_is_free(port)


SAMPLE_PROC_NET_TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:5BA0 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 8244 1 0000000000000000 100 0 0 10 0
   1: 0100007F:DFA0 0100007F:5BA0 06 00000000:00000000 03:0000173D 00000000     0        0 0 3 0000000000000000
   2: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 99 1 0000000000000000 100 0 0 10 0
"""


@pytest.mark.skipif(sys.byteorder != "little", reason="sample text is from a little-endian host")
def test_parse_proc_net_tcp_sample():
    rows = L.parse_proc_net_tcp(SAMPLE_PROC_NET_TCP)
    assert rows[0] == ("127.0.0.1", 0x5BA0, 0x0A, 8244)
    assert rows[1][2] == 0x06  # TIME_WAIT, not a listener
    assert L.listening_inodes(0x5BA0, text=SAMPLE_PROC_NET_TCP) == {8244}
    assert L.listening_inodes(0xDFA0, text=SAMPLE_PROC_NET_TCP) == set()
    assert L.listening_inodes(22, text=SAMPLE_PROC_NET_TCP) == {99}  # 0.0.0.0 covers loopback


@pytest.mark.skipif(not L.PROC_NET_TCP.exists(), reason="needs Linux /proc/net/tcp")
def test_listen_detection_sees_our_own_socket(listener):
    """The readiness check the lab uses on QEMU, tried on a socket this process owns."""
    port = listener.getsockname()[1]
    inodes = L.listening_inodes(port)
    assert len(inodes) == 1
    assert inodes <= L._socket_inodes_of(os.getpid())


# ----------------------------------------------------------------- logs, workdirs


def test_log_tail_is_one_line_without_ansi(tmp_path):
    log = tmp_path / "serial.log"
    log.write_bytes(b"\x1b[2J\x1b[01;01Hfirst\r\n\r\nsecond\r\n" + b"".join(b"l%d\r\n" % i for i in range(20)))
    tail = L.log_tail(log, lines=3)
    assert tail == "l17 | l18 | l19"
    assert L.log_tail(tmp_path / "missing") == "(no log)"
    assert len(L.log_tail(log, lines=100, chars=20)) <= 23


def test_new_workdirs_are_fresh(tmp_path):
    a = L._new_workdir(tmp_path)
    b = L._new_workdir(tmp_path)
    assert a != b and a.is_dir() and b.is_dir()
    assert re.fullmatch(rf"run-\d{{8}}-\d{{6}}-{os.getpid()}(-\d+)?", a.name)


def test_unstarted_lab_has_no_target():
    lab = L.Lab()
    with pytest.raises(L.LabError, match="not been started"):
        lab.gdb_target
    assert not lab.alive()


def test_attach_strings():
    lab = L.Lab()
    lab.port = 4321
    assert lab.gdb_target == "127.0.0.1:4321"
    assert lab.attach_command == "target remote 127.0.0.1:4321"
    assert lab.gdb_command_line() == (
        f"gdb -nx -ex 'source {L.paths.GDBINIT}' -ex 'target remote 127.0.0.1:4321'"
    )


# ----------------------------------------------------------------- serial waits and stop


@pytest.fixture
def fake_lab(tmp_path):
    """A Lab whose 'QEMU' is a sleep process this test owns; stopped by pid at the end."""
    lab = L.Lab(L.LabConfig(xen_syms=None))
    lab.workdir = tmp_path
    lab._proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        yield lab
    finally:
        if lab._proc.poll() is None:
            lab._proc.kill()
        lab._proc.wait(timeout=5)


def test_wait_for_serial_matches(fake_lab):
    fake_lab.serial_log.write_bytes(b"\x1b[0m(XEN) Xen image load base address: 0x3d600000\r\n")
    m = fake_lab.wait_for_serial(L.XEN_LOAD_BASE_RE, timeout=2)
    assert m.group(1) == "0x3d600000"
    assert fake_lab.serial_text().endswith("0x3d600000\n")


def test_wait_for_serial_timeout_shows_the_tail(fake_lab):
    fake_lab.serial_log.write_bytes(b"GRUB\r\nerror: file `/xen.gz' not found.\r\n")
    with pytest.raises(L.LabError) as e:
        fake_lab.wait_for_serial("never", timeout=0.2)
    assert "within 0.2 s" in str(e.value) and "not found" in str(e.value)
    assert "\n" not in str(e.value)


def test_stop_is_idempotent_and_wait_after_death_fails_fast(fake_lab):
    pid = fake_lab.pid
    assert fake_lab.alive()
    rc = fake_lab.stop()
    assert rc == -15 and not fake_lab.alive()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert fake_lab.stop() == -15
    with pytest.raises(L.LabError, match="exited .* before the serial console"):
        fake_lab.wait_for_serial("anything", timeout=5)


# ----------------------------------------------------------------- command line


def test_cli_error_is_one_line_and_status_2(tmp_path, capsys):
    assert L.main(["--xen", str(tmp_path / "missing.gz")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("xen-lab: error: Xen image")


def test_cli_port_taken(tmp_path, capsys, listener):
    port = listener.getsockname()[1]
    assert L.main(["--xen", str(mb2_image(tmp_path / "xen")), "--port", str(port)]) == 2
    assert f"port {port} on 127.0.0.1 is already in use" in capsys.readouterr().err


def test_new_runs_keep_only_the_last_few_and_never_a_live_one(tmp_path):
    import json as _json
    import os as _os
    import subprocess as _subprocess
    from gdbext.host import lab as _lab
    dead = _subprocess.Popen(["true"])
    dead.wait()
    live = _subprocess.Popen(["sleep", "60"])
    try:
        old = []
        for i in range(8):
            d = tmp_path / f"{_lab.WORKDIR_PREFIX}20200101-0000{i:02d}-{dead.pid}"
            d.mkdir()
            (d / _lab.LAB_INFO_NAME).write_text(_json.dumps({"pid": dead.pid}))
            _os.utime(d, (1_000_000 + i, 1_000_000 + i))
            old.append(d)
        # The oldest run's QEMU still runs: it stays whatever its age.
        (old[0] / _lab.LAB_INFO_NAME).write_text(_json.dumps({"pid": live.pid}))
        runs = [_lab._new_workdir(tmp_path) for _ in range(3)]
        left = sorted(p for p in tmp_path.iterdir() if p.name.startswith(_lab.WORKDIR_PREFIX))
        assert set(runs) <= set(left)
        assert old[0] in left
        assert len(left) == _lab.KEEP_RUNS + 1
        assert set(left) == set(runs) | {old[0], old[7], old[6]}
    finally:
        live.kill()
        live.wait()


# ---------------------------------------------------------------- the EFI lab (xen.efi, no GRUB)


def test_xen_efi_cfg_is_one_default_section_with_options_and_placeholder_dom0():
    text = L.xen_efi_cfg("console=com1 loglvl=all")
    lines = text.splitlines()
    assert lines[0] == "[global]" and lines[1] == f"default={L.EFI_CFG_SECTION}"
    section = lines.index(f"[{L.EFI_CFG_SECTION}]")
    assert lines[section + 1] == "options=console=com1 loglvl=all"
    assert lines[section + 2] == f"kernel={L.ESP_EFI_DOM0.name} {L.DOM0_PLACEHOLDER_ARG}"
    # Xen's EFI loader reads the .cfg named after its own binary, in its directory.
    assert L.ESP_EFI_CFG == L.ESP_BOOT_EFI.with_suffix(".cfg")
    assert L.ESP_EFI_DOM0.parent == L.ESP_BOOT_EFI.parent
    with pytest.raises(L.LabError, match="one line"):
        L.xen_efi_cfg("a\nb")


@pytest.mark.parametrize("name", sorted(L.paths.BUILDS))
def test_efi_lab_takes_xen_efi_and_refuses_xen_gz(tmp_path, name):
    build = L.paths.BUILDS[name]
    L.validate_config(config(tmp_path, xen_image=build.efi, efi=True))
    with pytest.raises(L.LabError, match="not a PE/EFI image"):
        L.validate_config(config(tmp_path, xen_image=build.image, efi=True))
    with pytest.raises(L.LabError, match="PE/EFI image"):
        L.validate_config(config(tmp_path, xen_image=build.efi))   # GRUB's lab: xen.gz


def test_efi_esp_holds_xen_efi_its_cfg_and_the_placeholder(tmp_path, monkeypatch):
    monkeypatch.setattr(L.paths, "LAB_DIR", tmp_path / "labdir")
    build = L.paths.BUILDS[L.paths.DEFAULT_BUILD]
    lab = L.Lab(config(tmp_path, xen_image=build.efi, efi=True))
    lab.workdir = tmp_path / "run"
    lab.workdir.mkdir()
    lab._build_esp()
    esp = lab.esp_dir
    assert (esp / L.ESP_BOOT_EFI).read_bytes() == build.efi.read_bytes()
    assert (esp / L.ESP_EFI_CFG).read_text() == L.xen_efi_cfg(lab.config.xen_cmdline)
    assert (esp / L.ESP_EFI_DOM0).is_file()
    assert not (esp / L.ESP_XEN_NAME).exists()        # no GRUB, no xen.gz


def test_qemu_command_pauses_at_a_reset_and_logs_exceptions(tmp_path):
    """catch_resets (the default): a triple fault pauses QEMU (its state kept for GDB),
    the -d int log and the QMP socket are in the run's directory."""
    argv = L.qemu_command(L.LabConfig(), port=1, esp_dir=tmp_path / "esp",
                          vars_path=tmp_path / "v", serial_log=tmp_path / "serial.log")

    def after(flag):
        return [argv[i + 1] for i, a in enumerate(argv) if a == flag]

    assert after("-action") == ["reboot=shutdown,shutdown=pause"]
    assert after("-d") == ["int,cpu_reset"]
    assert after("-D") == [str(tmp_path / L.INT_LOG_NAME)]
    assert after("-qmp") == [f"unix:{tmp_path / L.QMP_SOCKET_NAME},server=on,wait=off"]
    plain = L.qemu_command(L.LabConfig(catch_resets=False), port=1, esp_dir=tmp_path / "esp",
                           vars_path=tmp_path / "v", serial_log=tmp_path / "serial.log")
    assert not {"-action", "-d", "-D", "-qmp"} & set(plain)


def test_lab_tells_gdb_its_files(tmp_path):
    lab = L.Lab(L.LabConfig(workdir=tmp_path))
    lab.workdir = tmp_path
    assert lab.gdb_settings() == [f"set xen-serial-log {tmp_path / 'serial.log'}",
                                  f"set xen-qemu-int-log {tmp_path / L.INT_LOG_NAME}",
                                  f"set xen-qmp-socket {tmp_path / L.QMP_SOCKET_NAME}"]
    lab = L.Lab(L.LabConfig(workdir=tmp_path, catch_resets=False))
    lab.workdir = tmp_path
    assert lab.gdb_settings() == [f"set xen-serial-log {tmp_path / 'serial.log'}"]
