"""scripts/xen-boot-check: boot a Xen build (or attach to a QEMU you started), run the
``__efi64_mb2_start`` session in batch, and give CI a verdict.

    scripts/xen-boot-check --junit junit.xml --report report.json
    scripts/xen-boot-check --xen xen.gz --xen-syms xen-syms --predict --keep-going
    scripts/xen-boot-check --connect 127.0.0.1:1234 --xen-syms xen-syms

Exit status: 0 every check passed (WARN and SKIP count as passed), 1 a check
failed (the failing checks are named), 2 the run itself could not be done (boot
timeout, missing or wrong symbols, build-id mismatch, unreachable --connect, GDB
or QEMU died), with a one-line reason on stderr.

What it drives: a real GDB (``gdbext.host.gdbdriver.GdbSession``) with gdbext loaded,
attached to the lab's QEMU (``gdbext.host.lab.Lab``) or to ``--connect``; it runs
``xen-syms`` and then ``xen-mb2-break --batch --json`` with the check and stop
selections passed through. QEMU and GDB are always stopped, by pid. Never
imports ``gdb``.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import re
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from .. import paths
from ..core import junit
from ..core import bootstops, xenefi
from ..core.bootstops import START_XEN
from ..core.errors import GdbextError
from ..core.xensyms import load_xen_syms
from ..core.xenimage import parse_build_id_note
from .gdbdriver import GdbCommandError, GdbSession
from .lab import Lab, LabConfig

PROG = "xen-boot-check"
DEFAULT_TIMEOUT_S = 120.0
DEFAULT_MEMORY_MB = 1024
LOOPBACK = "127.0.0.1"
# GDB's own connect wait: never longer than our timeout, and no retrying a refused port.
GDB_CONNECT_SETTINGS = ("set tcp auto-retry off",)
GZIP_MAGIC = b"\x1f\x8b"
ELF_MAGIC = b"\x7fELF"
# Xen prints its load base early in __start_xen: an oracle for the report.
XEN_LOAD_BASE_RE = re.compile(r"Xen image load base address: (0x[0-9a-f]+)")
# Generous: the wait ends as soon as the line is there; a loaded machine prints it later.
CONSOLE_WAIT_S = 60.0


class RunError(GdbextError):
    """The run could not be done (exit status 2)."""


# --------------------------------------------------------------------------- arguments


def _names(text: str) -> List[str]:
    """``I4,I6`` -> ["I4", "I6"] (options may also be repeated)."""
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_connect(text: str) -> Tuple[str, int]:
    """``HOST:PORT``, ``:PORT`` or ``PORT`` (loopback) -> (host, port)."""
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = "", text
    host = host.strip("[]") or LOOPBACK
    try:
        port = int(port_text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--connect wants HOST:PORT (e.g. 127.0.0.1:1234), not {text!r}") from None
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"--connect port {port} is not between 1 and 65535")
    return host, port


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"the timeout must be positive, not {text}")
    return value


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description="Boot a Xen build in the lab (or attach to a QEMU you "
        "started), run the __efi64_mb2_start session of xen-mb2-break in batch (with --efi: "
        "xen.efi started by the firmware, from efi_start), and write a JSON report and "
        "JUnit XML for CI.",
        epilog="Exit status: 0 all checks passed, 1 a check failed, 2 the run could not be done.")
    target = p.add_argument_group("what to boot or attach to")
    target.add_argument("--build", choices=sorted(paths.BUILDS),
                        help=f"boot this Debian build and check it with its xen-syms "
                             f"(default {paths.DEFAULT_BUILD})")
    target.add_argument("--xen", type=Path, metavar="IMAGE",
                        help="the multiboot2 Xen image GRUB boots (xen.gz or the ELF32 xen), "
                             "or with --efi xen.efi; default Debian's 4.17 when booting the lab")
    target.add_argument("--efi", action="store_true",
                        help="boot xen.efi directly from OVMF (no GRUB) and run the stops of "
                             "that path (efi_start .. __start_xen); with --build, the build's "
                             "xen.efi and the symbols of its layout (its xen-*.efi.elf)")
    target.add_argument("--xen-syms", type=Path, metavar="FILE",
                        help="xen-syms of that image (default: the build's)")
    target.add_argument("--connect", type=parse_connect, metavar="HOST:PORT",
                        help="attach to a QEMU you started with -gdb tcp:HOST:PORT -S instead "
                             "of booting the lab (HOST defaults to 127.0.0.1)")
    target.add_argument("-m", "--memory", type=int, default=DEFAULT_MEMORY_MB, metavar="MB",
                        help=f"lab guest RAM in MiB (default {DEFAULT_MEMORY_MB})")
    target.add_argument("--timeout", type=_positive, default=DEFAULT_TIMEOUT_S, metavar="S",
                        help=f"the longest any one wait may take: connecting, each stop "
                             f"(default {DEFAULT_TIMEOUT_S:g})")
    target.add_argument("--hang-wait", type=int, metavar="S",
                        help="seconds without a stop before gdbext looks for a hang (set "
                             "xen-hang-wait; 0: off; default gdbext's)")
    sel = p.add_argument_group("what to check (passed to xen-mb2-break)")
    sel.add_argument("--only", action="append", type=_names, default=[], metavar="IDS",
                     help="only these checks, e.g. I4,I6 (repeatable)")
    sel.add_argument("--skip", action="append", type=_names, default=[], metavar="IDS",
                     help="not these checks (repeatable)")
    sel.add_argument("--stops", action="append", type=_names, default=[], metavar="NAMES",
                     help="only these stops, comma-separated (repeatable)")
    sel.add_argument("--skip-stops", action="append", type=_names, default=[], metavar="NAMES",
                     help="not these stops")
    sel.add_argument("--predict", action="store_true",
                     help="at the entry, check the merged L4 the RFC would build (without "
                          "writing the guest)")
    sel.add_argument("--assume-relocated", action="store_true",
                     help="predict the variant that adds B to the upper-half pointers first")
    sel.add_argument("--keep-going", action="store_true",
                     help="go on through every stop after a failed check")
    out = p.add_argument_group("output")
    out.add_argument("--report", type=Path, metavar="FILE", help="write the JSON report here")
    out.add_argument("--junit", type=Path, metavar="FILE", help="write JUnit XML here")
    out.add_argument("--quiet", action="store_true", help="print only the verdict line")
    return p


def flatten(groups: Sequence[Sequence[str]]) -> List[str]:
    return [name for group in groups for name in group]


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = make_parser()
    args = p.parse_args(list(argv))
    for name in ("only", "skip", "stops", "skip_stops"):
        setattr(args, name, flatten(getattr(args, name)))
    if args.assume_relocated and not args.predict:
        p.error("--assume-relocated qualifies --predict: give both")
    if args.memory < 64:
        p.error(f"-m {args.memory}: Xen needs at least 64 MiB")
    if args.efi and args.predict:
        p.error("--predict judges the RFC's merge on the multiboot2 path: not with --efi")
    try:
        image, args.xen_syms = paths.image_and_syms(args.build, args.xen, args.xen_syms,
                                                    efi=args.efi)
    except ValueError as e:
        p.error(str(e))
    if args.hang_wait is not None and args.hang_wait < 0:
        p.error(f"--hang-wait {args.hang_wait}: give seconds >= 0 (0: no hang detection)")
    if args.xen_syms is None:
        p.error("--xen needs the matching --xen-syms (Debian's would not match your image)")
    if args.xen is None and args.connect is None:
        args.xen = image
    return args


def gdb_word(word: str) -> str:
    """Quote one word for GDB's string_to_argv (stop names contain spaces)."""
    if word and re.fullmatch(r"[A-Za-z0-9_.,:=+/@%^~-]+", word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def mb2_break_command(args: argparse.Namespace) -> str:
    """The ``xen-mb2-break --batch --json`` line with the selections passed through."""
    words = ["xen-mb2-break", "--batch", "--json", "--timeout", f"{args.timeout:g}"]
    for option, values in (("--only", args.only), ("--skip", args.skip),
                           ("--stops", args.stops), ("--skip-stops", args.skip_stops)):
        if values:
            words += [option, gdb_word(",".join(values))]
    for flag in ("predict", "assume_relocated", "keep_going"):
        if getattr(args, flag):
            words.append("--" + flag.replace("_", "-"))
    return " ".join(words)


def planned_stops(args: argparse.Namespace) -> List[str]:
    """The stops the session will be asked for, in boot order (for the JUnit file):
    this build's plan (bootstops, decoded from xen-syms) narrowed by --stops and
    --skip-stops; the contract's names if the plan cannot be made."""
    try:
        plan = bootstops.build_plan(load_xen_syms(args.xen_syms))
        return [s.name for s in plan.select(args.stops or None, args.skip_stops or None)]
    except (GdbextError, OSError):
        names = list(bootstops.STOP_ORDER)
    if args.stops:
        names = [n for n in names if n in args.stops] + [n for n in args.stops if n not in names]
    return [n for n in names if n not in args.skip_stops]


# --------------------------------------------------------------------------- build-id


def image_build_id(path: Path) -> Optional[bytes]:
    """The GNU build-id note of the Xen image GRUB loads (xen.gz: gzip of an ELF32
    made by mkelf32 that carries xen-syms' note), or xen.efi's (the CodeView signature
    in its .buildid), or None if it has none."""
    try:
        data = Path(path).read_bytes()
        if data[:2] == GZIP_MAGIC:
            data = gzip.decompress(data)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise RunError(f"cannot read the Xen image {path}: {getattr(e, 'strerror', None) or e}") from None
    if xenefi.is_pe(data[:4096]):
        try:
            return xenefi.file_build_id(data)
        except GdbextError as e:
            raise RunError(f"{path}: {e}") from None
    if data[:4] != ELF_MAGIC:
        raise RunError(f"{path} is not a Xen multiboot image (neither gzip nor ELF): "
                       "pass the xen.gz GRUB boots with --xen")
    try:
        elf = ELFFile(io.BytesIO(data))
        notes = [seg.data() for seg in elf.iter_segments() if seg["p_type"] == "PT_NOTE"]
        notes += [sec.data() for sec in elf.iter_sections() if sec["sh_type"] == "SHT_NOTE"]
        for raw in notes:
            found = parse_build_id_note(raw)
            if found is not None:
                return found
    except ELFError as e:
        raise RunError(f"{path}: corrupt ELF inside the Xen image ({e})") from None
    return None


def efi_plan_check(xen_syms: Path) -> None:
    """--efi: the symbols must be of xen.efi's layout and carry its bytes (the plan of
    that path decodes efi_start), else RunError (exit 2) before anything boots."""
    syms = load_xen_syms(xen_syms)
    if not getattr(syms, "efi_layout", False):
        raise RunError(f"--efi: {xen_syms} is not laid out as xen.efi (xen-syms' sections "
                       "sit elsewhere): pass xen.efi's ELF twin, xen-*.efi.elf")
    try:
        bootstops.build_plan(syms)
    except GdbextError as e:
        raise RunError(f"--efi: {e}") from None


def static_build_id_check(image: Path, xen_syms: Path) -> dict:
    """Compare the build-ids of xen-syms and the image before anything boots.

    Raises RunError (exit 2) on a mismatch, with both ids; returns what it saw.
    """
    syms = load_xen_syms(xen_syms)
    syms_id = getattr(syms, "build_id", None)
    image_id = image_build_id(image)
    seen = {"xen_syms": syms_id.hex() if syms_id else None,
            "image": image_id.hex() if image_id else None}
    if syms_id and image_id and syms_id != image_id:
        raise RunError(f"build-id mismatch: {xen_syms} has {syms_id.hex()} but the image "
                       f"{image} has {image_id.hex()}; pass the xen-syms built with that image")
    seen["match"] = bool(syms_id and image_id)
    return seen


# --------------------------------------------------------------------------- the run


def _check_file(path: Optional[Path], what: str) -> None:
    if path is not None and not Path(path).is_file():
        hint = " (scripts/setup fetches the Debian files)" if str(path).startswith(
            str(paths.CACHE_DIR)) else ""
        raise RunError(f"{what} {path} does not exist{hint}")


class BootCheck:
    """One run: set up, drive GDB, collect the session's result. Always cleans up."""

    def __init__(self, args: argparse.Namespace, out=sys.stdout):
        self.args = args
        self.out = out
        self.lab = None
        self.gdb = None
        self.report = {
            "tool": PROG, "xen_image": str(args.xen) if args.xen else None,
            "xen_syms": str(args.xen_syms), "target": None, "lab": None,
            "build_id": None, "command": None, "result": None, "error": None,
            "planned_stops": planned_stops(args), "console_load_base": None,
        }

    def say(self, text: str) -> None:
        if not self.args.quiet:
            print(f"{PROG}: {text}", file=self.out, flush=True)

    def run(self) -> dict:
        args = self.args
        _check_file(args.xen_syms, "xen-syms")
        _check_file(args.xen, "the Xen image")
        if args.efi:
            efi_plan_check(args.xen_syms)
        if args.xen is not None:
            self.report["build_id"] = static_build_id_check(args.xen, args.xen_syms)
        try:
            if args.connect is None:
                self.lab = Lab(LabConfig(xen_image=args.xen, xen_syms=args.xen_syms,
                                         memory_mb=args.memory, efi=args.efi))
                self.lab.start()
                target = self.lab.gdb_target
                self.report["lab"] = {"pid": self.lab.pid, "workdir": str(self.lab.workdir),
                                      "serial_log": str(self.lab.serial_log)}
                self.say(f"QEMU started (pid {self.lab.pid}), gdbstub on {target}")
                log = self.lab.workdir / "gdb.log"
            else:
                host, port = args.connect
                target = f"{host}:{port}"
                log = None
            self.report["target"] = target
            self.gdb = GdbSession(log=log)
            for setting in GDB_CONNECT_SETTINGS:
                self.gdb.execute(setting)
            if self.lab is not None:
                for setting in self.lab.gdb_settings():
                    self.gdb.execute(setting)
            if args.hang_wait is not None:
                self.gdb.execute(f"set xen-hang-wait {args.hang_wait}")
            self.gdb.execute(f"set tcp connect-timeout {max(1, int(args.timeout))}")
            # --timeout bounds the whole attach: TCP connect (above) and the stub's first
            # replies (a stub that accepts and stays silent would otherwise keep GDB
            # retrying past it).
            self._step(f"target remote {target}", args.timeout,
                       f"cannot attach to the gdbstub at {target}")
            self._step(f"xen-syms {gdb_word(str(args.xen_syms))}", args.timeout,
                       "cannot load xen-syms")
            command = mb2_break_command(args)
            self.report["command"] = command
            self.say(f"running: {command}")
            # Each stop waits at most --timeout; the whole session gets one wait per stop.
            outer = args.timeout * (len(self.report["planned_stops"]) + 2) + 30
            try:
                # A failed check makes the command fail after printing its JSON line;
                # the driver's reply keeps that output (gdb_layer.harness).
                reply = self.gdb.execute(command, timeout=outer, check=False)
            except GdbCommandError as e:
                raise RunError(f"the session did not finish: {e.message}") from None
            out, error = reply.out, reply.error
            result = None
            for line in reversed(out.splitlines()):
                if line.strip().startswith("{"):
                    try:
                        result = json.loads(line)
                    except ValueError:
                        continue
                    break
            if result is None:
                raise RunError(f"xen-mb2-break gave no result: {error or 'no JSON line'}")
            self.report["result"] = result
            self.report["session_error"] = error
        finally:
            self.close()
        return self.report

    def _step(self, command: str, timeout: float, what: str):
        try:
            return self.gdb.execute(command, timeout=timeout)
        except GdbCommandError as e:
            raise RunError(f"{what}: {e.message}") from None

    def close(self) -> None:
        gdb, self.gdb = self.gdb, None
        lab, self.lab = self.lab, None
        try:
            if gdb is not None:
                gdb.close()   # detaches: the guest runs on
        finally:
            if lab is not None:
                try:
                    self.report["console_load_base"] = self._console_load_base(lab)
                finally:
                    lab.stop()

    def _console_load_base(self, lab) -> Optional[int]:
        """B as Xen prints it early in __start_xen: the oracle the report carries next to
        the session's own B. Waited for only when the session got to __start_xen."""
        result = self.report.get("result") or {}
        wait = CONSOLE_WAIT_S if START_XEN in (result.get("reached") or []) else 0
        try:
            m = lab.wait_for_serial(XEN_LOAD_BASE_RE, timeout=wait)
        except GdbextError:
            return None
        return int(m.group(1), 16)


def summary_lines(report: dict) -> List[str]:
    """The human verdict: one line per stop, then each failing check named."""
    result = report.get("result") or {}
    lines = []
    for stop in result.get("stops") or []:
        counts = junit.count_statuses(stop.get("checks") or [])
        shown = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
        lines.append(f"  {stop.get('stop')}: {shown or 'no checks'}")
    for check in junit.failed_checks(result):
        lines.append(f"  FAIL {check.get('id')} at {check.get('stop')}: {check.get('summary')}")
    crash = result.get("crash")
    if crash:
        lines.extend("  " + str(t) for t in crash.get("text") or [crash.get("summary")])
    return lines


def verdict_line(report: dict, status: int) -> str:
    result = report.get("result") or {}
    counts = junit.count_statuses(junit.all_checks(result))
    tally = ", ".join(f"{n} {s}" for s, n in counts.items())
    if status == junit.EXIT_OK:
        return f"ok: every check passed ({tally}); reached {len(result.get('reached') or [])} stops"
    if status == junit.EXIT_FAILED and result.get("crash"):
        crash = result["crash"]
        where = f" (after {crash['after']})" if crash.get("after") else ""
        return f"FAILED: {crash.get('summary') or 'the guest crashed'}{where}"
    if status == junit.EXIT_FAILED:
        failed = junit.failed_checks(result)
        names = ", ".join(f"{c.get('id')}@{c.get('stop')}" for c in failed)
        return f"FAILED: {len(failed)} check(s) failed: {names}"
    return f"error: {junit.not_run_reason(report.get('result'), report.get('error'))}"


def write_outputs(args: argparse.Namespace, report: dict) -> None:
    if args.report:
        args.report.write_text(json.dumps(report, indent=2) + "\n")
    if args.junit:
        args.junit.write_text(junit.junit_xml(report.get("result"), report["planned_stops"],
                                              run_error=report.get("error")))


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    started = time.monotonic()
    check = BootCheck(args)
    report = check.report
    try:
        check.run()
    except GdbextError as e:
        report["error"] = " ".join(str(e).split())
    except KeyboardInterrupt:
        report["error"] = "interrupted"
    except OSError as e:
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        report["error"] = f"{e.strerror or e}{where}"
    status = junit.exit_status(report.get("result"), report.get("error"))
    report["exit_status"] = status
    report["seconds"] = round(time.monotonic() - started, 1)
    try:
        write_outputs(args, report)
    except OSError as e:
        print(f"{PROG}: error: cannot write {e.filename}: {e.strerror}", file=sys.stderr)
        return junit.EXIT_NOT_RUN
    if not args.quiet:
        for line in summary_lines(report):
            print(line)
    line = f"{PROG}: {verdict_line(report, status)} ({report['seconds']:.1f} s)"
    # The verdict of a run that did not pass goes to stderr: one line CI logs show.
    print(line, file=sys.stdout if status == junit.EXIT_OK else sys.stderr, flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
