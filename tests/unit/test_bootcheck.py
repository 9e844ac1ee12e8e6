"""scripts/xen-boot-check without booting: arguments, the command passed to GDB, the
static build-id check (against readelf on the real files) and the exits that need
no QEMU."""

from __future__ import annotations

import gzip
import json
import re
import shlex
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from gdbext import paths
from gdbext.host import bootcheck
from gdbext.core import junit

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "xen-boot-check"


def readelf_build_id(path: Path) -> str:
    out = subprocess.run(["readelf", "-n", str(path)], check=True, capture_output=True,
                         text=True).stdout
    return re.search(r"Build ID: ([0-9a-f]+)", out).group(1)


def altered_syms(tmp_path: Path, monkeypatch) -> Path:
    """A copy of xen-syms whose build-id note says something else (offset from pyelftools).
    Its parsed symbols are cached under tmp_path, not in the shared cache (where each run
    would leave one more xen-syms-wrong-*.json, the copy's path being new each time)."""
    from elftools.elf.elffile import ELFFile

    from gdbext.core import xensyms
    monkeypatch.setattr(xensyms, "default_cache_dir", lambda: tmp_path / "syms")

    copy = tmp_path / "xen-syms-wrong"
    shutil.copyfile(paths.XEN_DEBIAN_SYMS, copy)
    with open(copy, "rb") as f:
        elf = ELFFile(f)
        sec = elf.get_section_by_name(".note.gnu.build-id")
        note = next(sec.iter_notes())
        desc_size = note["n_descsz"]
        # Note header (12 bytes) + name ("GNU\0", 4-aligned), then the descriptor.
        desc_offset = sec["sh_offset"] + 12 + ((note["n_namesz"] + 3) & ~3)
    data = bytearray(copy.read_bytes())
    data[desc_offset:desc_offset + desc_size] = bytes(b ^ 0xFF for b in
                                                      data[desc_offset:desc_offset + desc_size])
    copy.write_bytes(bytes(data))
    return copy


# ---------------------------------------------------------------- arguments


def test_defaults_boot_the_debian_build():
    args = bootcheck.parse_args([])
    assert args.xen == paths.XEN_DEBIAN_IMAGE and args.xen_syms == paths.XEN_DEBIAN_SYMS
    assert args.connect is None and args.timeout == bootcheck.DEFAULT_TIMEOUT_S
    assert bootcheck.mb2_break_command(args) == (
        f"xen-mb2-break --batch --json --timeout {args.timeout:g}")


def test_connect_has_no_default_image():
    args = bootcheck.parse_args(["--connect", "1234"])
    assert args.connect == ("127.0.0.1", 1234) and args.xen is None
    assert bootcheck.parse_connect("10.0.0.2:99") == ("10.0.0.2", 99)
    assert bootcheck.parse_connect(":5") == ("127.0.0.1", 5)
    assert bootcheck.parse_connect("[::1]:7") == ("::1", 7)


@pytest.mark.parametrize("argv, message", [
    (["--connect", "host:"], "HOST:PORT"),
    (["--connect", "127.0.0.1:70000"], "between 1 and 65535"),
    (["--assume-relocated"], "give both"),
    (["--xen", "/tmp/xen.gz"], "matching --xen-syms"),
    (["--timeout", "0"], "positive"),
    (["-m", "16"], "at least 64"),
])
def test_bad_arguments_are_one_line_and_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        bootcheck.parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in err


def test_selections_pass_through_quoted_for_gdb():
    args = bootcheck.parse_args(
        ["--predict", "--assume-relocated", "--keep-going", "--only", "I4,I6", "--only", "I1",
         "--skip", "I10", "--stops", "__efi64_mb2_start,call efi_multiboot2",
         "--skip-stops", "merge", "--timeout", "30"])
    cmd = bootcheck.mb2_break_command(args)
    # GDB's string_to_argv splits like a POSIX shell for double-quoted words.
    words = shlex.split(cmd)
    assert words[:5] == ["xen-mb2-break", "--batch", "--json", "--timeout", "30"]
    opts = dict(zip(words[5:13:2], words[6:13:2]))
    assert opts == {"--only": "I4,I6,I1", "--skip": "I10",
                    "--stops": "__efi64_mb2_start,call efi_multiboot2", "--skip-stops": "merge"}
    assert words[13:] == ["--predict", "--assume-relocated", "--keep-going"]


def test_planned_stops_follow_the_selection():
    every = bootcheck.planned_stops(bootcheck.parse_args([]))
    assert every[0] == "__efi64_mb2_start" and every[-1] == "__start_xen"
    args = bootcheck.parse_args(["--stops", "__start_xen,__efi64_mb2_start",
                                 "--skip-stops", "__start_xen"])
    assert bootcheck.planned_stops(args) == ["__efi64_mb2_start"]


# ---------------------------------------------------------------- build-id


def test_image_build_id_is_the_one_readelf_sees_in_xen_syms(tmp_path):
    want = readelf_build_id(paths.XEN_DEBIAN_SYMS)
    assert bootcheck.image_build_id(paths.XEN_DEBIAN_IMAGE).hex() == want
    # The uncompressed ELF32 works as well (GRUB's gzio loads both).
    plain = tmp_path / "xen"
    plain.write_bytes(gzip.decompress(paths.XEN_DEBIAN_IMAGE.read_bytes()))
    assert readelf_build_id(plain) == want
    assert bootcheck.image_build_id(plain).hex() == want
    seen = bootcheck.static_build_id_check(paths.XEN_DEBIAN_IMAGE, paths.XEN_DEBIAN_SYMS)
    assert seen == {"xen_syms": want, "image": want, "match": True}


def test_static_check_names_both_ids(tmp_path, monkeypatch):
    wrong = altered_syms(tmp_path, monkeypatch)
    wrong_id = readelf_build_id(wrong)
    right_id = readelf_build_id(paths.XEN_DEBIAN_SYMS)
    assert wrong_id != right_id
    with pytest.raises(bootcheck.RunError) as exc:
        bootcheck.static_build_id_check(paths.XEN_DEBIAN_IMAGE, wrong)
    assert wrong_id in str(exc.value) and right_id in str(exc.value)


def test_not_an_image(tmp_path):
    junk = tmp_path / "junk.gz"
    junk.write_bytes(gzip.compress(b"not an elf"))
    with pytest.raises(bootcheck.RunError, match="not a Xen multiboot image"):
        bootcheck.image_build_id(junk)


# ---------------------------------------------------------------- runs that never boot


def run_script(*argv, timeout=60):
    return subprocess.run([str(SCRIPT), *argv], capture_output=True, text=True, timeout=timeout)


def test_wrong_xen_syms_exits_2_before_booting(tmp_path, monkeypatch):
    wrong = altered_syms(tmp_path, monkeypatch)
    report, xml = tmp_path / "r.json", tmp_path / "j.xml"
    # The script (another process) caches the copy's symbols in the shared cache:
    # remove that file afterwards, pass or fail (the copy's path is new each run).
    from gdbext.core import xensyms
    left = xensyms._cache_file(paths.CACHE_DIR / "syms", wrong.resolve())
    try:
        proc = run_script("--xen", str(paths.XEN_DEBIAN_IMAGE), "--xen-syms", str(wrong),
                          "--report", str(report), "--junit", str(xml))
    finally:
        left.unlink(missing_ok=True)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "build-id mismatch" in lines[0]
    assert readelf_build_id(wrong) in lines[0]
    data = json.loads(report.read_text())
    assert data["exit_status"] == 2 and data["lab"] is None  # no QEMU was started
    root = ET.parse(xml).getroot()
    assert root.get("errors") == "1"


def test_missing_file_exits_2(tmp_path):
    proc = run_script("--xen-syms", str(tmp_path / "nope"))
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_verdict_lines():
    r = {"stops": [{"stop": "__efi64_mb2_start",
                    "checks": [{"id": "I4", "status": "FAIL", "summary": "unrelocated"},
                               {"id": "I0", "status": "PASS", "summary": "ok"}]}],
         "reached": ["__efi64_mb2_start"], "error": None}
    report = {"result": r, "error": None}
    status = junit.exit_status(r)
    assert status == 1
    assert bootcheck.verdict_line(report, status) == (
        "FAILED: 1 check(s) failed: I4@__efi64_mb2_start")
    assert "  FAIL I4 at __efi64_mb2_start: unrelocated" in bootcheck.summary_lines(report)




# ---------------------------------------------------------------- builds


@pytest.mark.parametrize("name", sorted(paths.BUILDS))
def test_build_names_its_image_and_syms(name):
    build = paths.BUILDS[name]
    args = bootcheck.parse_args(["--build", name])
    assert (args.xen, args.xen_syms) == (build.image, build.syms)
    assert bootcheck.static_build_id_check(build.image, build.syms)["match"] is True


def test_build_and_xen_together_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        bootcheck.parse_args(["--build", "4.20", "--xen", str(paths.XEN_DEBIAN_IMAGE)])
    assert exc.value.code == 2 and "both name the image" in capsys.readouterr().err


@pytest.mark.parametrize("image_build,syms_build",
                         [(a, b) for a in sorted(paths.BUILDS) for b in sorted(paths.BUILDS) if a != b])
def test_another_builds_syms_exit_2_before_booting(tmp_path, image_build, syms_build):
    """4.20's xen-syms with 4.17's image (and the other way round): refused on the build-id
    notes of the two files, before any QEMU is started."""
    image, syms = paths.BUILDS[image_build].image, paths.BUILDS[syms_build].syms
    for f in (image, syms):
        if not f.is_file():
            pytest.fail(f"{f} is missing: run scripts/setup", pytrace=False)
    report = tmp_path / "r.json"
    proc = run_script("--xen", str(image), "--xen-syms", str(syms), "--report", str(report))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "build-id mismatch" in lines[0]
    assert readelf_build_id(syms) in lines[0]
    assert readelf_build_id(paths.BUILDS[syms_build].syms) != readelf_build_id(
        paths.BUILDS[image_build].syms)
    assert readelf_build_id(paths.BUILDS[image_build].syms) in lines[0]
    data = json.loads(report.read_text())
    assert data["exit_status"] == 2 and data["lab"] is None  # no QEMU was started


# ---------------------------------------------------------------- --efi


def objdump_rsds(path: Path) -> str:
    """xen.efi's build-id as objdump shows its .buildid section: the RSDS signature."""
    out = subprocess.run(["objdump", "-s", "-j", ".buildid", str(path)], capture_output=True,
                         text=True, check=True).stdout
    raw = b"".join(bytes.fromhex(m.group(1).replace(" ", "")) for m in
                   (re.match(r"^ [0-9a-f]+ ((?:[0-9a-f]{2,8} ?){1,4})", ln)
                    for ln in out.splitlines()) if m)
    at = raw.index(b"RSDS")
    return raw[at + 4:at + 20].hex()


@pytest.mark.parametrize("name", sorted(paths.BUILDS))
def test_efi_build_names_xen_efi_and_the_symbols_of_its_layout(name):
    build = paths.BUILDS[name]
    args = bootcheck.parse_args(["--build", name, "--efi"])
    assert (args.xen, args.xen_syms, args.efi) == (build.efi, build.efi_syms, True)
    assert bootcheck.image_build_id(build.efi).hex() == objdump_rsds(build.efi)


def test_efi_with_predict_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        bootcheck.parse_args(["--build", "4.20", "--efi", "--predict"])
    assert exc.value.code == 2 and "not with --efi" in capsys.readouterr().err


def _one_line_exit_2(tmp_path, *argv):
    report = tmp_path / "r.json"
    proc = run_script(*argv, "--report", str(report))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    data = json.loads(report.read_text())
    assert data["exit_status"] == 2 and data["lab"] is None  # no QEMU was started
    return lines[0]


def test_efi_refuses_before_booting_what_cannot_run_that_path(tmp_path):
    """xen-syms (another layout), a map (no bytes to decode efi_start from), and another
    build's xen.efi with these symbols (build-id): each one line, exit 2, nothing booted."""
    twin = next(b for b in paths.BUILDS.values() if b.efi_elf is not None)
    line = _one_line_exit_2(tmp_path, "--efi", "--xen", str(twin.efi), "--xen-syms",
                            str(twin.syms))
    assert "not laid out as xen.efi" in line and "efi.elf" in line
    for b in paths.BUILDS.values():
        if b.efi_elf is None:
            line = _one_line_exit_2(tmp_path, "--efi", "--build", b.name)
            assert "nm-format map" in line and str(b.efi_map) in line
        else:
            continue
    other = next(b for b in paths.BUILDS.values() if b.name != twin.name)
    line = _one_line_exit_2(tmp_path, "--efi", "--xen", str(other.efi), "--xen-syms",
                            str(twin.efi_elf))
    assert "build-id mismatch" in line
    assert objdump_rsds(twin.efi) in line and objdump_rsds(other.efi) in line
