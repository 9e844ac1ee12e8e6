"""The lab: Debian's Xen booted by GRUB on OVMF under QEMU, halted for GDB.

Pure Python, never imports ``gdb``: tests and scripts drive it directly, and
``scripts/xen-lab`` is its command line (:func:`main`).

    with Lab(LabConfig(memory_mb=1024)) as lab:
        # QEMU is halted at the first instruction (-S) until a debugger continues it.
        print(lab.attach_command)          # "target remote 127.0.0.1:PORT"
        ...
        m = lab.wait_for_serial(XEN_LOAD_BASE_RE, timeout=60)

What the lab does (see /work/shared/reference/qemu-gdb-lab.md for the boot that is
known to work):

- builds an ESP folder in a per-run workdir: ``EFI/BOOT/BOOTX64.EFI`` (one standalone
  GRUB image with its grub.cfg inside, cached under the project cache) and ``xen.gz``
  (a copy of the image: QEMU's ``fat:rw:`` drive may write back into the folder, so the
  cache and the user's image are never exposed to it);
- copies OVMF's variable store for the run;
- starts ``qemu-system-x86_64`` with the gdbstub on loopback and ``-S``, its own session,
  stdout/stderr in ``qemu.log`` and COM1 in ``serial.log``;
- waits until the gdbstub socket is in LISTEN state (read from /proc/net/tcp, owned by
  the QEMU pid). It never connects to it: QEMU's gdbstub takes one client, and a
  connection, even one closed at once, stops a running guest (vm_stop on open).

Every QEMU a Lab starts is stopped by :meth:`Lab.stop`, by the ``atexit`` handler of
this module, and (when started from the main thread on Linux) by the kernel if the
Python process dies (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import errno
import gzip
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Set, Union

from .. import paths
from ..core.errors import GdbextError
from ..core.multiboot2 import MB2_SEARCH_BYTES, find_header
from ..core.xenefi import is_pe

# --------------------------------------------------------------------------- facts

# Host side.
LOOPBACK = "127.0.0.1"  # the gdbstub listens on loopback only
QEMU_BINARY = "qemu-system-x86_64"
GRUB_MKSTANDALONE = "grub-mkstandalone"
GDB_BINARY = "gdb"
SETUP_HINT = "run scripts/setup"

# Machine defaults (a LabConfig overrides them).
DEFAULT_MEMORY_MB = 1024
DEFAULT_CPU = "qemu64"
DEFAULT_SMP = 1
DEFAULT_XEN_CMDLINE = "console=com1 com1=115200 loglvl=all noreboot"
QEMU_MACHINE = "q35"
# The flags of the boot known to work: no display, no NIC (no iPXE ROM, no network
# boot attempt), no monitor (``monitor CMD`` through the gdbstub still reaches it),
# halted at the first instruction until a debugger continues it. Not -no-reboot:
# it turns ``monitor system_reset`` into QEMU exiting, and xen-run-to resets the
# machine when it must boot again to stop at a load address it missed. Xen's own
# "noreboot" (in DEFAULT_XEN_CMDLINE) keeps a panicking Xen from rebooting; pass
# --qemu-arg=-no-reboot to the lab to make a triple fault end QEMU instead.
QEMU_FIXED_FLAGS = ("-nographic", "-net", "none", "-monitor", "none", "-S")
# A triple fault made visible (LabConfig.catch_resets): QEMU pauses the machine instead
# of resetting it, so the CPU state at the fault stays for GDB (its gdbstub reports the
# stop as SIGQUIT), and logs every exception and reset with the CPU state (TCG only):
# the exception chain of a triple fault, which nothing else records. A guest's reset
# is a pause too, and so would be gdbext's own 'monitor system_reset': gdbext switches
# the reboot action to 'reset' around it through the QMP socket (gdb_layer/hang_watch).
QEMU_CRASH_ACTION = ("-action", "reboot=shutdown,shutdown=pause")
QEMU_INT_LOG_ITEMS = "int,cpu_reset"

# GRUB: one standalone EFI image with grub.cfg inside.
GRUB_FORMAT = "x86_64-efi"
# `normal` runs the embedded grub.cfg (without it GRUB stops at "grub rescue>");
# part_msdos because QEMU's fat: drive is an MBR disk (without it `search` finds
# nothing); fat, search, multiboot2; gzio for xen.gz; serial+terminal put GRUB's own
# messages on COM1; echo prints the lab's marker line. part_gpt for real GPT ESPs.
GRUB_MODULES = (
    "normal", "part_gpt", "part_msdos", "fat", "search",
    "multiboot2", "gzio", "serial", "terminal", "echo",
)
GRUB_CFG_IN_IMAGE = "boot/grub/grub.cfg"  # where grub-mkstandalone puts the embedded cfg
GRUB_SERIAL_UNIT = 0  # COM1
GRUB_SERIAL_SPEED = 115200
GRUB_CACHE_DIR = paths.CACHE_DIR / "grub-efi"

# The ESP folder QEMU presents as a FAT disk.
ESP_DIRNAME = "esp"
ESP_BOOT_EFI = Path("EFI", "BOOT", "BOOTX64.EFI")  # the removable-media path OVMF boots
# Multiboot2 + gzio load compressed and uncompressed images alike: the name stays.
ESP_XEN_NAME = "xen.gz"

# Per-run files inside the workdir.
WORKDIR_PREFIX = "run-"
# Run directories kept under the lab directory (each ~2.4 MB: logs, ESP, OVMF vars);
# older ones are removed when a new one is made, never one whose QEMU still runs.
KEEP_RUNS = 5
SERIAL_LOG_NAME = "serial.log"
QEMU_LOG_NAME = "qemu.log"
VARS_COPY_NAME = "OVMF_VARS.fd"
GRUB_CFG_NAME = "grub.cfg"
LAB_INFO_NAME = "lab.json"
INT_LOG_NAME = "qemu-int.log"     # QEMU's -d int,cpu_reset log
QMP_SOCKET_NAME = "qmp.sock"

# Repository files the lab points users at.

# Timing.
# QEMU start to gdbstub LISTEN (measured: < 0.1 s). Generous: the wait ends as soon as the
# stub listens, and a loaded machine may start QEMU slowly.
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 3.0  # SIGTERM to exit, then SIGKILL
KILL_TIMEOUT_S = 2.0
POLL_INTERVAL_S = 0.02
SERIAL_POLL_INTERVAL_S = 0.05
DEFAULT_SERIAL_TIMEOUT_S = 120.0
PORT_PICK_ATTEMPTS = 3  # a picked free port can be taken before QEMU binds it

# Error messages show the last lines of a log, on one line.
LOG_TAIL_LINES = 6
LOG_TAIL_CHARS = 600

# Xen's placement, and how its images are told apart (multiboot2: core/multiboot2.py).
# The bootable x86-64 `xen` is an ELF32 wrapper made by mkelf32; xen-syms is ELF64.
ELF_MAGIC = b"\x7fELF"
ELF_CLASS64 = b"\x02"
XEN_LOAD_ALIGN = 2 << 20  # GRUB places Xen at a 2 MiB-aligned base (RELOCATABLE tag)
XEN_LOAD_BASE_RE = r"Xen image load base address: (0x[0-9a-f]+)"  # Xen's own line

# /proc/net/tcp
PROC_NET_TCP = Path("/proc/net/tcp")
TCP_LISTEN_STATE = 0x0A

_ANSI_RE = re.compile(r"\x1b\[[0-9;=?]*[A-Za-z]")


class LabError(GdbextError):
    """The lab could not start, died, or did not show what was awaited."""


class _PortInUse(LabError):
    """QEMU could not bind the gdbstub port (internal: triggers a retry)."""


# --------------------------------------------------------------------------- config


@dataclass
class LabConfig:
    """What to boot and how. Paths may be str or Path; defaults boot Debian's Xen 4.17."""

    xen_image: Path = paths.XEN_DEBIAN_IMAGE
    # Only validated and recorded (lab.json, Lab.xen_syms) for the tools that use it;
    # None when the image has no symbol file at hand.
    xen_syms: Optional[Path] = paths.XEN_DEBIAN_SYMS
    xen_cmdline: str = DEFAULT_XEN_CMDLINE
    memory_mb: int = DEFAULT_MEMORY_MB
    cpu: str = DEFAULT_CPU
    smp: int = DEFAULT_SMP
    extra_qemu_args: List[str] = field(default_factory=list)
    gdb_port: Optional[int] = None  # None: pick a free port on 127.0.0.1
    workdir: Optional[Path] = None  # None: a fresh paths.LAB_DIR/run-YYYYmmdd-HHMMSS-PID
    # True: xen_image is xen.efi, booted by OVMF itself as EFI/BOOT/BOOTX64.EFI (no GRUB),
    # its options and a placeholder dom0 in the config file beside it.
    efi: bool = False
    # Pause at a triple fault or reset instead of resetting, log exceptions (-d int) and
    # give gdbext a QMP socket (QEMU_CRASH_ACTION); False: QEMU resets as a PC does.
    catch_resets: bool = True

    def __post_init__(self) -> None:
        self.xen_image = Path(self.xen_image)
        if self.xen_syms is not None:
            self.xen_syms = Path(self.xen_syms)
        if self.workdir is not None:
            self.workdir = Path(self.workdir)
        self.extra_qemu_args = [str(a) for a in self.extra_qemu_args]


# --------------------------------------------------------------------------- pure parts


def _grub_word(word: str) -> str:
    """Quote one word for GRUB's shell-like parser (single quotes are literal)."""
    if word and re.fullmatch(r"[A-Za-z0-9_.,:=+/@%^~-]+", word):
        return word
    return "'" + word.replace("'", "'\\''") + "'"


DOM0_PLACEHOLDER_ARG = "gdbext-placeholder-dom0"


def grub_cfg(xen_cmdline: str = DEFAULT_XEN_CMDLINE, image_name: str = ESP_XEN_NAME) -> str:
    """The grub.cfg embedded in BOOTX64.EFI: find the ESP by the image, boot it via multiboot2."""
    if "\n" in xen_cmdline or "\r" in xen_cmdline:
        raise LabError("the Xen command line must be one line")
    image = "/" + image_name
    args = " ".join(_grub_word(w) for w in xen_cmdline.split())
    return (
        "set timeout=0\n"
        f"serial --unit={GRUB_SERIAL_UNIT} --speed={GRUB_SERIAL_SPEED}\n"
        "terminal_input serial\n"
        "terminal_output serial\n"
        f"search --no-floppy --file --set=root {image}\n"
        f"echo 'gdbext lab: multiboot2 {image}'\n"
        f"multiboot2 {image}{(' ' + args) if args else ''}\n"
        # A placeholder dom0 "kernel" (the Xen image itself): without any module Xen
        # panics ("dom0 kernel not specified") before paging_init, so its linear
        # page-table slot and the rest of its own tables would never be seen. With it,
        # Xen runs on to construct_dom0, which then rejects the placeholder.
        f"module2 {image} {DOM0_PLACEHOLDER_ARG}\n"
        "boot\n"
    )


# Xen's EFI loader reads the config file named after its own binary, extension .cfg
# (xen.efi -> xen.cfg; here BOOTX64.EFI -> BOOTX64.cfg), in the binary's directory.
ESP_EFI_CFG = ESP_BOOT_EFI.with_suffix(".cfg")
# A placeholder dom0 "kernel" beside it, as the multiboot2 lab has one (see grub_cfg):
# Xen loads it, runs on to construct_dom0, and rejects it there.
ESP_EFI_DOM0 = ESP_BOOT_EFI.with_name("dom0.placeholder")
EFI_CFG_SECTION = "gdbext"


def xen_efi_cfg(xen_cmdline: str = DEFAULT_XEN_CMDLINE, dom0_name: str = ESP_EFI_DOM0.name) -> str:
    """The config file xen.efi reads (docs/misc/efi.pandoc's format): one section with the
    options and the placeholder dom0 kernel, made the default."""
    if "\n" in xen_cmdline or "\r" in xen_cmdline:
        raise LabError("the Xen command line must be one line")
    return (
        "[global]\n"
        f"default={EFI_CFG_SECTION}\n"
        "\n"
        f"[{EFI_CFG_SECTION}]\n"
        f"options={xen_cmdline}\n"
        f"kernel={dom0_name} {DOM0_PLACEHOLDER_ARG}\n"
    )


def grub_mkstandalone_command(
    output: Path, cfg_file: Path, modules: Sequence[str] = GRUB_MODULES
) -> List[str]:
    """grub-mkstandalone argv: the modules both preloaded and the only ones in the memdisk
    (so that a missing module shows up here, not hidden by autoloading), no locales,
    fonts or themes (1.2 MB instead of 10 MB)."""
    mods = " ".join(modules)
    return [
        GRUB_MKSTANDALONE,
        "-O", GRUB_FORMAT,
        f"--modules={mods}",
        f"--install-modules={mods}",
        "--locales=",
        "--fonts=",
        "--themes=",
        "-o", str(output),
        f"{GRUB_CFG_IN_IMAGE}={cfg_file}",
    ]


def _grub_fingerprint(grub_dir: Path = paths.GRUB_EFI_MODULES) -> str:
    """Changes when the installed GRUB changes (so that a cached image is rebuilt)."""
    parts = []
    for name in ("kernel.img", "moddep.lst"):
        try:
            st = (grub_dir / name).stat()
            parts.append(f"{name}:{st.st_size}:{st.st_mtime_ns}")
        except OSError:
            parts.append(f"{name}:missing")
    return ";".join(parts)


def grub_cache_key(cfg_text: str, modules: Sequence[str] = GRUB_MODULES) -> str:
    """Hash of grub.cfg, the module list and the installed GRUB: names a cached BOOTX64.EFI."""
    h = hashlib.sha256()
    for part in (cfg_text, " ".join(modules), GRUB_FORMAT, _grub_fingerprint()):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


def _drive_path(path: Path) -> str:
    """A path inside a QEMU -drive option: commas must be doubled."""
    return str(path).replace(",", ",,")


def qemu_command(
    config: LabConfig,
    *,
    port: int,
    esp_dir: Path,
    vars_path: Path,
    serial_log: Path,
    ovmf_code: Path = paths.OVMF_CODE,
    int_log: Optional[Path] = None,
    qmp_socket: Optional[Path] = None,
) -> List[str]:
    """The qemu-system-x86_64 argv of the boot in the reference, with ``config`` applied
    (and, with ``config.catch_resets``, the pause at a reset, the -d int log at
    ``int_log`` and the QMP socket at ``qmp_socket``)."""
    crash = []
    if config.catch_resets:
        # By default next to the serial log: the run's workdir.
        int_log = int_log if int_log is not None else serial_log.parent / INT_LOG_NAME
        qmp_socket = qmp_socket if qmp_socket is not None else serial_log.parent / QMP_SOCKET_NAME
        crash = [*QEMU_CRASH_ACTION, "-d", QEMU_INT_LOG_ITEMS, "-D", str(int_log),
                 "-qmp", f"unix:{_drive_path(qmp_socket)},server=on,wait=off"]
    return [
        QEMU_BINARY,
        "-machine", QEMU_MACHINE,
        "-m", str(config.memory_mb),
        "-cpu", config.cpu,
        "-smp", str(config.smp),
        *QEMU_FIXED_FLAGS,
        "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={_drive_path(ovmf_code)}",
        "-drive", f"if=pflash,format=raw,unit=1,file={_drive_path(vars_path)}",
        "-drive", f"file=fat:rw:{_drive_path(esp_dir)},format=raw,if=virtio",
        "-serial", f"file:{serial_log}",
        "-gdb", f"tcp:{LOOPBACK}:{port}",
        *crash,
        *config.extra_qemu_args,
    ]


def parse_proc_net_tcp(text: str) -> List[tuple]:
    """(ip, port, state, inode) for every row of a /proc/net/tcp text (IPv4 only)."""
    rows = []
    for line in text.splitlines()[1:]:
        f = line.split()
        if len(f) < 10 or ":" not in f[1]:
            continue
        hex_ip, hex_port = f[1].split(":")
        try:
            # The kernel prints the raw (network order) u32 as a host-order number.
            ip = socket.inet_ntoa(struct.pack("=I", int(hex_ip, 16)))
            rows.append((ip, int(hex_port, 16), int(f[3], 16), int(f[9])))
        except (ValueError, struct.error, OSError):
            continue
    return rows


def listening_inodes(port: int, host: str = LOOPBACK, text: Optional[str] = None) -> Set[int]:
    """Socket inodes in LISTEN state on host:port (or on 0.0.0.0:port)."""
    if text is None:
        text = PROC_NET_TCP.read_text()
    return {
        inode
        for ip, p, state, inode in parse_proc_net_tcp(text)
        if p == port and state == TCP_LISTEN_STATE and ip in (host, "0.0.0.0")
    }


def _socket_inodes_of(pid: int) -> Optional[Set[int]]:
    """Inodes of the sockets process ``pid`` holds; None when /proc cannot tell."""
    fd_dir = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return None
    inodes = set()
    for name in names:
        try:
            link = os.readlink(f"{fd_dir}/{name}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(int(link[8:-1]))
    return inodes


def port_is_free(port: int, host: str = LOOPBACK) -> bool:
    """True when QEMU could bind host:port (it sets SO_REUSEADDR, so do we)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def check_port_free(port: int, host: str = LOOPBACK) -> None:
    """Raise LabError when a user-given gdbstub port is invalid or already taken."""
    if not isinstance(port, int) or not 0 < port < 65536:
        raise LabError(f"gdb port {port!r} is not a TCP port number (1-65535)")
    if not port_is_free(port, host):
        raise LabError(
            f"port {port} on {host} is already in use: pick another --port, or omit it to get a free one"
        )


def pick_free_port(host: str = LOOPBACK) -> int:
    """A port the kernel says is free now (it may be taken before QEMU binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _image_head(path: Path) -> bytes:
    """The first 32 KiB of an image, decompressed when it is gzip."""
    with open(path, "rb") as f:
        head = f.read(MB2_SEARCH_BYTES)
    if head[:2] == b"\x1f\x8b":
        try:
            with gzip.open(path, "rb") as g:
                return g.read(MB2_SEARCH_BYTES)
        except (OSError, EOFError, zlib.error) as e:
            raise LabError(f"Xen image {path} is a broken gzip file: {e}") from None
    return head


def _missing(path: Path, what: str, default: Path, package: str) -> LabError:
    build = paths.build_of(path)
    if build is not None:  # one of the builds scripts/setup fetches
        package = build.packages[1] if "debug" in Path(path).parts else build.packages[0]
        return LabError(f"{what} {path} is missing: {SETUP_HINT} (Debian package {package})")
    return LabError(f"{what} {path} does not exist")


def validate_config(config: LabConfig) -> None:
    """Raise LabError (one line, saying what to do) for anything that would stop the boot."""
    for tool, package in ((QEMU_BINARY, "qemu-system-x86"), (GRUB_MKSTANDALONE, "grub-common")):
        if shutil.which(tool) is None:
            raise LabError(f"{tool} not found on PATH: {SETUP_HINT} (Debian package {package})")
    image = config.xen_image
    if not image.is_file():
        raise _missing(image, "Xen image", paths.XEN_DEBIAN_IMAGE, paths.XEN_DEBIAN_PACKAGES[0])
    head = _image_head(image)
    if config.efi:
        if not is_pe(head):
            raise LabError(f"Xen image {image} is not a PE/EFI image: the EFI lab boots "
                           "xen.efi (e.g. the build's boot/xen-*.efi); xen.gz needs GRUB")
    elif head[:2] == b"MZ":
        raise LabError(
            f"Xen image {image} is a PE/EFI image (xen.efi): boot xen.gz (multiboot2) instead"
        )
    if head[:4] == ELF_MAGIC and head[4:5] == ELF_CLASS64:
        raise LabError(
            f"Xen image {image} is a 64-bit ELF (xen-syms?): boot xen.gz or the 32-bit xen ELF"
        )
    if not config.efi and find_header(head) is None:
        raise LabError(
            f"Xen image {image} has no multiboot2 header in its first 32 KiB: "
            "boot xen.gz or the xen ELF (not xen.efi or xen-syms)"
        )
    if config.xen_syms is not None and not config.xen_syms.is_file():
        raise _missing(config.xen_syms, "Xen symbols", paths.XEN_DEBIAN_SYMS, paths.XEN_DEBIAN_PACKAGES[1])
    for fw in (paths.OVMF_CODE, paths.OVMF_VARS):
        if not fw.is_file():
            raise LabError(f"OVMF firmware {fw} is missing: {SETUP_HINT} (Debian package ovmf)")
    missing = [m for m in GRUB_MODULES if not (paths.GRUB_EFI_MODULES / f"{m}.mod").is_file()]
    if missing and not config.efi:
        raise LabError(
            f"GRUB EFI modules missing in {paths.GRUB_EFI_MODULES}: {' '.join(missing)}: "
            f"{SETUP_HINT} (Debian package grub-efi-amd64-bin)"
        )
    if not isinstance(config.memory_mb, int) or config.memory_mb <= 0:
        raise LabError(f"memory {config.memory_mb!r} MiB is not a positive integer")
    if not isinstance(config.smp, int) or config.smp <= 0:
        raise LabError(f"smp {config.smp!r} is not a positive integer")
    if not config.cpu:
        raise LabError("the QEMU CPU model is empty")
    grub_cfg(config.xen_cmdline)  # rejects multi-line command lines
    if config.gdb_port is not None:
        check_port_free(config.gdb_port)


def log_tail(path: Path, lines: int = LOG_TAIL_LINES, chars: int = LOG_TAIL_CHARS) -> str:
    """The last non-empty lines of a log, ANSI escapes removed, joined on one line."""
    try:
        raw = Path(path).read_bytes()[-64 * 1024:]
    except OSError:
        return "(no log)"
    text = _ANSI_RE.sub("", raw.decode("utf-8", "replace")).replace("\r", "\n")
    kept = [ln.strip() for ln in text.split("\n") if ln.strip()][-lines:]
    out = " | ".join(kept) or "(empty log)"
    return out if len(out) <= chars else "..." + out[-chars:]


def build_grub_efi(cfg_text: str, cfg_file: Path, modules: Sequence[str] = GRUB_MODULES) -> Path:
    """Return the cached BOOTX64.EFI for this grub.cfg and module list, building it if needed.

    ``cfg_file`` must already hold ``cfg_text`` (grub-mkstandalone reads a file).
    """
    cached = GRUB_CACHE_DIR / f"BOOTX64-{grub_cache_key(cfg_text, modules)}.efi"
    if cached.is_file() and cached.stat().st_size > 0:
        return cached
    GRUB_CACHE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(f"{cached.name}.tmp.{os.getpid()}.{threading.get_ident()}")
    try:
        r = subprocess.run(
            grub_mkstandalone_command(tmp, cfg_file, modules),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        if r.returncode != 0 or not tmp.is_file():
            tail = " | ".join(r.stdout.strip().splitlines()[-LOG_TAIL_LINES:])
            raise LabError(f"grub-mkstandalone failed with status {r.returncode}: {tail}")
        os.replace(tmp, cached)  # atomic: concurrent labs never see half an image
    finally:
        tmp.unlink(missing_ok=True)
    return cached


def _new_workdir(base: Optional[Path] = None) -> Path:
    """A fresh base/run-YYYYmmdd-HHMMSS-PID[-N] directory (base: paths.LAB_DIR)."""
    base = Path(base) if base is not None else paths.LAB_DIR
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = f"{WORKDIR_PREFIX}{stamp}-{os.getpid()}"
    for n in range(1, 1000):
        candidate = base / (name if n == 1 else f"{name}-{n}")
        try:
            candidate.mkdir(parents=True)
        except FileExistsError:
            continue
        prune_runs(base, KEEP_RUNS)
        return candidate
    raise LabError(f"could not create a fresh run directory under {base}")


def _run_in_use(run_dir: Path) -> bool:
    """Whether the QEMU recorded in the run's lab.json (or the run's maker) still runs."""
    pids = []
    try:
        pids.append(int(json.loads((run_dir / LAB_INFO_NAME).read_text())["pid"]))
    except (OSError, ValueError, KeyError, TypeError):
        # No QEMU recorded yet: run-STAMP-PID[-N] names the process that made it, which
        # may be about to start one.
        parts = run_dir.name[len(WORKDIR_PREFIX):].split("-")
        if len(parts) >= 3 and parts[2].isdigit():
            pids.append(int(parts[2]))
    for pid in pids:
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            continue
        except PermissionError:
            return True
    return False


def prune_runs(base: Path, keep: int = KEEP_RUNS) -> List[Path]:
    """Remove all but the ``keep`` newest run directories under ``base`` (by mtime), never
    one in use; returns what was removed."""
    try:
        runs = [p for p in Path(base).iterdir()
                if p.is_dir() and p.name.startswith(WORKDIR_PREFIX)]
    except OSError:
        return []
    runs.sort(key=lambda p: (p.stat().st_mtime, p.name), reverse=True)
    removed = []
    for old in runs[keep:]:
        if _run_in_use(old):
            continue
        shutil.rmtree(old, ignore_errors=True)
        removed.append(old)
    return removed


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _pdeathsig_preexec():
    """A preexec_fn that makes the kernel SIGTERM QEMU when this process dies, or None.

    Only for the main thread: the signal fires when the *thread* that forked exits.
    """
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:  # runs in the child between fork and exec
        prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


# --------------------------------------------------------------------------- the lab

_LIVE_LABS: "Set[Lab]" = set()


def _stop_all_labs() -> None:
    for lab in list(_LIVE_LABS):
        try:
            lab.stop()
        except Exception:
            pass


atexit.register(_stop_all_labs)


class Lab:
    """One QEMU running OVMF -> GRUB -> Xen, halted at the first instruction for GDB.

    Before :meth:`start`, ``port``, ``pid`` and ``workdir`` are None.
    """

    def __init__(self, config: Optional[LabConfig] = None) -> None:
        self.config = config if config is not None else LabConfig()
        self.port: Optional[int] = None
        self.workdir: Optional[Path] = None
        self.qemu_argv: List[str] = []
        self._proc: Optional[subprocess.Popen] = None
        self._vars_copy: Optional[Path] = None

    # ---- derived facts

    @property
    def pid(self) -> Optional[int]:
        return self._proc.pid if self._proc is not None else None

    @property
    def returncode(self) -> Optional[int]:
        """QEMU's exit status once it has ended (negative: killed by that signal)."""
        return self._proc.poll() if self._proc is not None else None

    def _in_workdir(self, name: str) -> Path:
        if self.workdir is None:
            raise LabError("the lab has not been started")
        return self.workdir / name

    @property
    def serial_log(self) -> Path:
        return self._in_workdir(SERIAL_LOG_NAME)

    @property
    def qemu_log(self) -> Path:
        return self._in_workdir(QEMU_LOG_NAME)

    @property
    def int_log(self) -> Optional[Path]:
        """QEMU's -d int,cpu_reset log (None without catch_resets)."""
        return self._in_workdir(INT_LOG_NAME) if self.config.catch_resets else None

    @property
    def qmp_socket(self) -> Optional[Path]:
        return self._in_workdir(QMP_SOCKET_NAME) if self.config.catch_resets else None

    def gdb_settings(self) -> List[str]:
        """The gdbext settings that tell GDB this lab's files: the serial console (hang
        reports), and with catch_resets the -d int log (triple faults) and the QMP
        socket (gdbext's own reset). None before the lab has its workdir."""
        if self.workdir is None:
            return []
        out = [f"set xen-serial-log {self.serial_log}"]
        if self.config.catch_resets:
            out += [f"set xen-qemu-int-log {self.int_log}",
                    f"set xen-qmp-socket {self.qmp_socket}"]
        return out

    @property
    def esp_dir(self) -> Path:
        return self._in_workdir(ESP_DIRNAME)

    @property
    def info_file(self) -> Path:
        return self._in_workdir(LAB_INFO_NAME)

    @property
    def xen_image(self) -> Path:
        return self.config.xen_image

    @property
    def xen_syms(self) -> Optional[Path]:
        return self.config.xen_syms

    @property
    def gdb_target(self) -> str:
        if self.port is None:
            raise LabError("the lab has not been started")
        return f"{LOOPBACK}:{self.port}"

    @property
    def attach_command(self) -> str:
        return f"target remote {self.gdb_target}"

    def gdb_command_line(self) -> str:
        """A shell line that starts GDB with gdbext loaded and attaches to this lab."""
        return " ".join(
            [
                GDB_BINARY,
                "-nx",
                "-ex", shlex.quote(f"source {paths.GDBINIT}"),
                "-ex", shlex.quote(self.attach_command),
                *[w for s in self.gdb_settings() for w in ("-ex", shlex.quote(s))],
            ]
        )

    # ---- lifecycle

    def __enter__(self) -> "Lab":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "Lab":
        """Validate, build the ESP, start QEMU halted, wait for the gdbstub. Returns self."""
        if self._proc is not None:
            raise LabError("this lab was already started; make a new Lab")
        cfg = self.config
        validate_config(cfg)
        try:
            if cfg.workdir is not None:
                cfg.workdir.mkdir(parents=True, exist_ok=True)
                self.workdir = cfg.workdir.resolve()
            else:
                self.workdir = _new_workdir()
            self._build_esp()
            self._vars_copy = self._in_workdir(VARS_COPY_NAME)
            attempts = 1 if cfg.gdb_port is not None else PORT_PICK_ATTEMPTS
            for attempt in range(1, attempts + 1):
                port = cfg.gdb_port if cfg.gdb_port is not None else pick_free_port()
                try:
                    self._launch(port)
                    break
                except _PortInUse:
                    if cfg.gdb_port is not None:
                        raise LabError(
                            f"port {port} on {LOOPBACK} is already in use: pick another --port, "
                            "or omit it to get a free one"
                        ) from None
                    if attempt == attempts:
                        raise LabError(
                            f"QEMU could not bind a gdbstub port after {attempts} tries: {log_tail(self.qemu_log)}"
                        ) from None
            self._write_info()
        except BaseException:
            self.stop()
            raise
        return self

    def _build_esp(self) -> None:
        if self.config.efi:
            return self._build_efi_esp()
        cfg_text = grub_cfg(self.config.xen_cmdline)
        cfg_file = self._in_workdir(GRUB_CFG_NAME)
        cfg_file.write_text(cfg_text)
        efi = build_grub_efi(cfg_text, cfg_file)
        esp = self.esp_dir
        if esp.exists():
            shutil.rmtree(esp)  # a reused workdir: the ESP is ours to rebuild
        (esp / ESP_BOOT_EFI).parent.mkdir(parents=True)
        # Copies, not links: QEMU's fat:rw: may write back into these files.
        shutil.copyfile(efi, esp / ESP_BOOT_EFI)
        shutil.copyfile(self.config.xen_image, esp / ESP_XEN_NAME)

    def _build_efi_esp(self) -> None:
        """xen.efi as the firmware's boot program, its config and placeholder dom0 beside it."""
        esp = self.esp_dir
        if esp.exists():
            shutil.rmtree(esp)
        (esp / ESP_BOOT_EFI).parent.mkdir(parents=True)
        shutil.copyfile(self.config.xen_image, esp / ESP_BOOT_EFI)  # a copy: fat:rw: writes
        (esp / ESP_EFI_CFG).write_text(xen_efi_cfg(self.config.xen_cmdline))
        (esp / ESP_EFI_DOM0).write_bytes(b"gdbext placeholder dom0: not a kernel\n")

    def _launch(self, port: int) -> None:
        """Start QEMU on ``port`` and wait for its gdbstub; _PortInUse if the bind failed."""
        self.port = port
        self.qemu_argv = qemu_command(
            self.config,
            port=port,
            esp_dir=self.esp_dir,
            vars_path=self._vars_copy,
            serial_log=self.serial_log,
            int_log=self.int_log,
            qmp_socket=self.qmp_socket,
        )
        shutil.copyfile(paths.OVMF_VARS, self._vars_copy)  # fresh firmware variables per QEMU
        self.serial_log.unlink(missing_ok=True)
        for stale in (self.int_log, self.qmp_socket):
            if stale is not None:
                stale.unlink(missing_ok=True)
        with open(self.qemu_log, "wb") as log:
            try:
                self._proc = subprocess.Popen(
                    self.qemu_argv,
                    cwd=self.workdir,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=_pdeathsig_preexec(),
                )
            except OSError as e:
                raise LabError(f"could not start {QEMU_BINARY}: {e.strerror or e}") from None
        _LIVE_LABS.add(self)
        self._wait_for_gdbstub()

    def _wait_for_gdbstub(self) -> None:
        proc = self._proc
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            rc = proc.poll()
            if rc is not None:
                _LIVE_LABS.discard(self)
                tail = log_tail(self.qemu_log)
                if "Address already in use" in tail:
                    raise _PortInUse(tail)
                raise LabError(f"QEMU exited with status {rc}: {tail}")
            if self._gdbstub_listening():
                return
            if time.monotonic() > deadline:
                self.stop()
                raise LabError(
                    f"QEMU did not open its gdbstub on {self.gdb_target} within "
                    f"{START_TIMEOUT_S:g} s: {log_tail(self.qemu_log)}"
                )
            time.sleep(POLL_INTERVAL_S)

    def _gdbstub_listening(self) -> bool:
        """LISTEN on our port by a socket QEMU holds. Never connects (see module doc)."""
        try:
            inodes = listening_inodes(self.port)
        except OSError:
            # No /proc/net/tcp: someone is listening when we cannot bind.
            return not port_is_free(self.port)
        if not inodes:
            return False
        mine = _socket_inodes_of(self._proc.pid)
        return mine is None or bool(inodes & mine)

    def _write_info(self) -> None:
        cfg = asdict(self.config)
        info = {
            "pid": self.pid,
            "port": self.port,
            "gdb_target": self.gdb_target,
            "attach_command": self.attach_command,
            "workdir": str(self.workdir),
            "serial_log": str(self.serial_log),
            "qemu_log": str(self.qemu_log),
            "int_log": str(self.int_log) if self.int_log else None,
            "qmp_socket": str(self.qmp_socket) if self.qmp_socket else None,
            "esp_dir": str(self.esp_dir),
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in cfg.items()},
            "qemu_argv": self.qemu_argv,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        self.info_file.write_text(json.dumps(info, indent=2) + "\n")

    def alive(self) -> bool:
        """True while QEMU runs."""
        return self._proc is not None and self._proc.poll() is None

    def stop(self) -> Optional[int]:
        """Stop QEMU (SIGTERM, then SIGKILL) and return its exit status; idempotent.

        Safe from finally blocks, atexit and signal handlers: it only polls (never blocks
        on a lock) and ignores a process that is already gone. Keeps the logs and the
        ESP; deletes the OVMF vars copy.
        """
        proc = self._proc
        if proc is not None:
            if proc.poll() is None:
                try:
                    proc.send_signal(signal.SIGTERM)
                except OSError:
                    pass
                if not self._poll_exit(STOP_TIMEOUT_S):
                    try:
                        proc.kill()
                    except OSError:
                        pass
                    self._poll_exit(KILL_TIMEOUT_S)
            if proc.poll() is not None:
                _LIVE_LABS.discard(self)
        if self._vars_copy is not None:
            try:
                self._vars_copy.unlink(missing_ok=True)
            except OSError:
                pass
        return proc.poll() if proc is not None else None

    def wait_exit(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for QEMU to end (killed elsewhere); True once it has.

        A QEMU killed by SIGKILL closes its sockets (GDB sees it go) a moment before
        its parent can reap it, so alive() just after that is a race."""
        return self._proc is None or self._poll_exit(timeout)

    def _poll_exit(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self._proc.poll() is None:
            if time.monotonic() > deadline:
                return False
            time.sleep(POLL_INTERVAL_S)
        return True

    # ---- the serial console

    def serial_text(self) -> str:
        """Everything QEMU wrote to COM1 so far ("\\r\\n" made "\\n"; OVMF's ANSI codes kept)."""
        try:
            data = self.serial_log.read_bytes()
        except FileNotFoundError:
            return ""
        return data.decode("utf-8", "replace").replace("\r\n", "\n")

    def wait_for_serial(
        self, pattern: Union[str, "re.Pattern[str]"], timeout: float = DEFAULT_SERIAL_TIMEOUT_S
    ) -> "re.Match[str]":
        """Wait until ``pattern`` (re.search) matches the serial console; return the match.

        Raises LabError with the console's last lines on timeout or when QEMU ends first.
        Remember that QEMU is halted (-S) until a debugger continues it.
        """
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            running = self.alive()
            m = rx.search(self.serial_text())
            if m:
                return m
            if not running:
                raise LabError(
                    f"QEMU exited (status {self.returncode}) before the serial console showed "
                    f"{rx.pattern!r}: {log_tail(self.serial_log)}"
                )
            if time.monotonic() > deadline:
                raise LabError(
                    f"the serial console did not show {rx.pattern!r} within {timeout:g} s: "
                    f"{log_tail(self.serial_log)}"
                )
            time.sleep(SERIAL_POLL_INTERVAL_S)

    def __repr__(self) -> str:
        state = "running" if self.alive() else "stopped" if self._proc else "new"
        return f"<Lab {state} pid={self.pid} port={self.port} workdir={self.workdir}>"


# --------------------------------------------------------------------------- command line


class _Terminate(Exception):
    pass


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="xen-lab",
        description="Boot Xen under QEMU (OVMF + GRUB), halted at the first instruction, "
        "with a gdbstub on 127.0.0.1; Ctrl-C stops it.",
    )
    p.add_argument("--build", choices=sorted(paths.BUILDS),
                   help=f"boot this Debian build's image and symbols "
                        f"(default {paths.DEFAULT_BUILD}; scripts/setup fetches them)")
    p.add_argument("--xen", metavar="IMAGE", type=Path,
                   help=f"multiboot2 Xen image (instead of --build; default {paths.XEN_DEBIAN_IMAGE})")
    p.add_argument("--xen-syms", metavar="FILE", type=Path,
                   help="xen-syms matching the image (default: the build's, when --xen is not given)")
    p.add_argument("--efi", action="store_true",
                   help="boot xen.efi directly from OVMF (EFI/BOOT/BOOTX64.EFI with its .cfg), "
                        "no GRUB; with --build, its xen.efi and the symbols of that layout")
    p.add_argument("--cmdline", metavar="STR", default=DEFAULT_XEN_CMDLINE,
                   help=f"Xen command line (default {DEFAULT_XEN_CMDLINE!r})")
    p.add_argument("-m", "--memory", metavar="MB", type=int, default=DEFAULT_MEMORY_MB,
                   help=f"guest RAM in MiB (default {DEFAULT_MEMORY_MB})")
    p.add_argument("--cpu", metavar="MODEL", default=DEFAULT_CPU,
                   help=f"QEMU CPU model (default {DEFAULT_CPU})")
    p.add_argument("--smp", metavar="N", type=int, default=DEFAULT_SMP,
                   help=f"number of CPUs (default {DEFAULT_SMP})")
    p.add_argument("--port", metavar="N", type=int,
                   help="gdbstub port on 127.0.0.1 (default: a free one)")
    p.add_argument("--qemu-arg", metavar="ARG", action="append", default=[],
                   help="extra QEMU argument, repeatable; write --qemu-arg=-d for dashed values")
    p.add_argument("--no-catch-resets", action="store_true",
                   help="let a triple fault reset the machine as on a PC (default: QEMU "
                   "pauses it, logs exceptions with -d int, and opens a QMP socket)")
    p.add_argument("--workdir", metavar="DIR", type=Path,
                   help=f"run directory (default: a new one under {paths.LAB_DIR})")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        # A build's symbols would not match another image: --xen alone has none.
        xen_image, xen_syms = paths.image_and_syms(args.build, args.xen, args.xen_syms,
                                                   efi=args.efi)
    except ValueError as e:
        parser.error(str(e))
    config = LabConfig(
        xen_image=xen_image,
        xen_syms=xen_syms,
        xen_cmdline=args.cmdline,
        memory_mb=args.memory,
        cpu=args.cpu,
        smp=args.smp,
        extra_qemu_args=args.qemu_arg,
        gdb_port=args.port,
        workdir=args.workdir,
        efi=args.efi,
        catch_resets=not args.no_catch_resets,
    )
    lab = Lab(config)

    def on_signal(signum, frame):
        raise _Terminate(signum)

    stop_signals = [signal.SIGTERM, signal.SIGHUP]
    saved = {sig: signal.getsignal(sig) for sig in [signal.SIGINT, *stop_signals]}
    for sig in stop_signals:
        signal.signal(sig, on_signal)
    status = 0
    try:
        lab.start()
        out = sys.stdout
        print(f"xen-lab: QEMU pid {lab.pid} is halted at the first instruction; "
              f"gdbstub on {lab.gdb_target}", file=out)
        print(f"  workdir     {lab.workdir}", file=out)
        print(f"  serial log  {lab.serial_log}   (tail -f it to watch the boot)", file=out)
        print(f"  qemu log    {lab.qemu_log}", file=out)
        if lab.int_log is not None:
            print(f"  -d int log  {lab.int_log}   (a triple fault pauses QEMU)", file=out)
        print(f"  xen image   {lab.xen_image}", file=out)
        print(f"  xen syms    {lab.xen_syms if lab.xen_syms is not None else '(none)'}", file=out)
        print(f"attach:  {lab.attach_command}", file=out)
        print(f"gdb:     {lab.gdb_command_line()}", file=out)
        print("xen-lab: waiting; Ctrl-C stops QEMU", file=out, flush=True)
        while lab.alive():
            time.sleep(0.2)
        rc = lab.returncode
        print(f"xen-lab: QEMU exited with status {rc}: {log_tail(lab.qemu_log, lines=2)}", flush=True)
        status = 0 if rc == 0 else 1
    except LabError as e:
        print(f"xen-lab: error: {e}", file=sys.stderr)
        status = 2
    except OSError as e:  # e.g. an unwritable --workdir
        where = f" ({e.filename})" if e.filename else ""
        print(f"xen-lab: error: {e.strerror or e}{where}", file=sys.stderr)
        status = 2
    except (KeyboardInterrupt, _Terminate):
        pass
    finally:
        for sig in saved:
            signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not cut stop() short
        try:
            was_running = lab.alive()
            lab.stop()
            if was_running:
                print(f"xen-lab: stopped QEMU (pid {lab.pid}); logs kept in {lab.workdir} "
                      f"(the last {KEEP_RUNS} runs are kept under {lab.workdir.parent})",
                      flush=True)
        finally:
            for sig, handler in saved.items():
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
    return status


if __name__ == "__main__":
    sys.exit(main())
