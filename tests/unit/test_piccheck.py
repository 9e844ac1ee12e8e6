"""The position-independence check (core/piccheck, host/pic_check).

On Debian's 4.17 xen-syms: PrintErrMesg reading its static table of message pointers
(ErrCodeToStr) on efi_multiboot2's path, with what the test expects derived from the
file (nm for symbols, pyelftools for the table's contents, objdump for the instructions
and the call chain).  On a small ELF assembled and linked by GNU as/ld: movabs and a
sign-extended imm32 of a linked VA, a rip-relative load from a pointer table, jump
tables, an indirect call, and position-independent code that gives no finding.
"""

import json
import re
import subprocess

import pytest

from gdbext import paths
from gdbext.core import piccheck
from gdbext.core.errors import GdbextError
from gdbext.core.piccheck import ABSOLUTE, JUMP_TABLE, READS_POINTER, TAKES_ADDRESS
from gdbext.core.xensyms import load_xen_syms
from gdbext.host import pic_check

from . import fault_data

from ..oracles import elf_qwords, message_table, nm_table, objdump, table_read_sites

SYMS = paths.XEN_DEBIAN_SYMS
EFI = paths.XEN_DEBIAN_EFI


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Each test caches into its own directory (no result from another run is reused)."""
    monkeypatch.setattr(paths, "CACHE_DIR", tmp_path / "cache")


# -- Debian 4.17: PrintErrMesg and ErrCodeToStr ---------------------------------------------


@pytest.fixture(scope="module")
def nm():
    return nm_table(SYMS)


@pytest.fixture(scope="module")
def syms():
    return load_xen_syms(SYMS)


@pytest.fixture(scope="module")
def debian(syms):
    return piccheck.check(syms, cache=False)


@pytest.fixture(scope="module")
def table(nm):
    """ErrCodeToStr.N: (name, VA, [(index, value)] of its linked-VA entries)."""
    return message_table(SYMS, nm)


def test_the_table_holds_linked_vas(table):
    _, _, entries = table
    assert len(entries) >= 2  # a table of message pointers, not one field


def test_printerrmesg_reads_its_message_table(debian, nm, table):
    name, table_va, entries = table
    start = nm["PrintErrMesg"][0]
    # objdump: lea <table>(%rip),%REG, then a load indexed from %REG.
    lea_va, read_va, read_text = table_read_sites(SYMS, nm, "PrintErrMesg", name)
    found = {(f.kind, f.address): f for f in debian.findings}
    lea = found[(TAKES_ADDRESS, lea_va)]
    read = found[(READS_POINTER, read_va)]
    for f in (lea, read):
        assert f.function.endswith("PrintErrMesg") and f.offset == f.address - start
        assert f.object.endswith(name) and f.object_va == table_va
        assert f.slots == len(entries)
        assert [(i, v) for i, v, _ in f.values] == entries
        assert f.faults and "faults" in f.verdict
    # The read goes through the register the lea loaded; the index is a register.
    assert read.index is None and f"PrintErrMesg+{lea_va - start:#x}: lea" in read.via
    assert re.sub(r"[q ]", "", read.instruction) == re.sub(r"[q ]", "", read_text)


def test_the_chain_is_objdumps_call_graph(debian, nm):
    f = next(f for f in debian.findings if f.function.endswith("PrintErrMesg"))
    chain = [c.split("#")[-1] for c in f.chain]
    assert chain[0] == "__efi64_mb2_start" and chain[1] == "efi_multiboot2"
    assert chain[-1] == "PrintErrMesg"
    for caller, callee in zip(chain, chain[1:]):
        start, size, _ = nm[caller]
        end = start + size if size else min(v for v, _, _ in nm.values() if v > start)
        texts = [t for _, t in objdump(SYMS, start, end)]
        assert any(re.match(rf"^(call|jmp|j[a-z]+)\s+[0-9a-f]+ <{re.escape(callee)}>$", t)
                   for t in texts), (caller, callee)


def test_debian_counts_and_summary(debian, nm):
    assert sum(1 for f in debian.findings if f.function.endswith("PrintErrMesg")) >= 2
    by = {f.name.split("#")[-1]: f for f in debian.functions}
    assert {"__efi64_mb2_start", "efi_multiboot2", "PrintErrMesg", "x86_32_switch",
            "trampoline_setup"} <= set(by)
    assert by["trampoline_setup"].mode == 32 and by["efi_multiboot2"].mode == 64
    assert by["PrintErrMesg"].counts == {READS_POINTER: 1, TAKES_ADDRESS: 1}
    assert sum(debian.counts.values()) == len(debian.findings)
    # Retpoline thunk calls are indirect edges, listed with their site.
    assert any("retpoline" in e.note for e in debian.unresolved)
    # The trampoline runs from its low copy, not at the load address: not entered.
    t0, t1 = nm["trampoline_start"][0], nm["trampoline_end"][0]
    assert not [f.name for f in debian.functions if t0 <= f.va < t1]
    assert all("trampoline" in e.note for e in debian.not_followed)
    text = piccheck.render_text(debian)
    assert "PrintErrMesg" in text and "__efi64_mb2_start -> efi_multiboot2" in text
    assert text.splitlines()[-1].startswith(f"{len(debian.findings)} findings")


def test_xen_efi_relocations_as_the_pointer_source(debian, table, nm):
    """xen.efi's base relocations, placed through its map, list the table's entries too."""
    report = piccheck.check(load_xen_syms(SYMS), efi=EFI, cache=False)
    assert report.pointer_source == piccheck.SRC_PE and EFI.name in report.pointer_source_detail
    name, _, entries = table
    read = next(f for f in report.findings
                if f.kind == READS_POINTER and f.function.endswith("PrintErrMesg"))
    assert [(i, v) for i, v, _ in read.values] == entries
    assert debian.pointer_source == piccheck.SRC_ELF


def test_result_is_cached_per_build_id():
    syms = load_xen_syms(SYMS)
    first = piccheck.check(syms)
    again = piccheck.check(syms)
    assert not first.from_cache and again.from_cache
    assert again.as_dict() == first.as_dict()
    cached = list((paths.CACHE_DIR / "syms").glob(f"pic-{syms.build_id_hex}-*.json"))
    assert len(cached) == 1


def test_findings_for_call_of_efi_multiboot2():
    found = piccheck.findings_for_call(load_xen_syms(SYMS))
    assert any(f.function.endswith("PrintErrMesg") for f in found)
    assert all(f.chain[0].endswith("__efi64_mb2_start") and
               f.chain[1:2] in (["efi_multiboot2"], []) for f in found)


# -- which finding predicted a fault (the crash report asks) ------------------------------


def qemu_page_fault(crash):
    """(RIP, CR2) of the #PF in QEMU's own -d int record of a captured crash."""
    first = (crash / "qemu-d-int-pf.txt").read_text().splitlines()[0]
    m = re.search(r"v=0e .*\bpc=([0-9a-f]+) .*\bCR2=([0-9a-f]+)", first)
    return int(m.group(1), 16), int(m.group(2), 16)


def test_the_real_printerr_crash_is_what_the_check_predicted(syms, debian, nm, table):
    """tests/data/printerr-crash: PrintErrMesg called at the load address; the firmware's
    OutputString faulted on the message pointer read from ErrCodeToStr."""
    rip, cr2 = qemu_page_fault(fault_data.PRINTERR)
    base = fault_data.load_base(fault_data.PRINTERR)
    # The error code the capture passed in %rsi (setup.txt), less EFI's error bit, is
    # the table's index; the ELF says that slot holds CR2.
    rsi = int(re.search(r"set \$rsi = (0x[0-9a-f]+)",
                        (fault_data.PRINTERR / "setup.txt").read_text()).group(1), 16)
    index = rsi & ~(1 << 63)
    name, _, entries = table
    assert dict(entries)[index] == cr2
    assert not (syms.in_image(rip) or base <= rip < base + syms.image_end - syms.virt_start)
    lea_va, read_va, _ = table_read_sites(SYMS, nm, "PrintErrMesg", name)
    p = piccheck.fault_prediction(debian.findings, cr2, rip, syms, base)
    assert p.finding.kind == READS_POINTER and p.finding.address == read_va
    assert p.how == piccheck.AT_VALUE and p.value == cr2 and index in p.indices
    assert all(dict(entries)[i] == cr2 for i in p.indices)
    assert p.slot == f"{name}[{p.indices[0]}]"
    lea_at = f"{p.finding.function}+{lea_va - nm['PrintErrMesg'][0]:#x}"
    assert p.others == [f"{TAKES_ADDRESS} at {lea_at}"]
    assert f"{name}[{index}] = {cr2:#x}" in p.text() and "PrintErrMesg" in p.text()
    assert piccheck.finding_for_fault(debian.findings, cr2, rip, syms, base) == p.finding
    # The default check, cached per build-id, gives the same answer.
    assert piccheck.predict_fault(syms, cr2, rip, base).finding.address == read_va


def test_a_fault_at_the_findings_own_instruction(syms, debian, nm, table):
    name, table_va, _ = table
    base = fault_data.load_base(fault_data.PRINTERR)
    _, read_va, _ = table_read_sites(SYMS, nm, "PrintErrMesg", name)
    # The read itself faulting on the table at its linked VA, RIP at the load address
    # (or given as the linked VA): the instruction is the finding's.
    for rip in (base + read_va - syms.virt_start, read_va):
        p = piccheck.fault_prediction(debian.findings, table_va + 8, rip, syms, base)
        assert p.how == piccheck.AT_INSTRUCTION and p.finding.address == read_va
        assert p.finding.kind == READS_POINTER


def test_faults_no_finding_predicted(syms, debian, nm, table):
    _, _, entries = table
    base = fault_data.load_base(fault_data.PRINTERR)
    value = entries[0][1]
    # CR2 at the load address is no linked VA.
    assert piccheck.fault_prediction(debian.findings, base + value - syms.virt_start, None,
                                     syms, base) is None
    # The RFC's crash: a fetch at efi_multiboot2's linked VA through the unrelocated
    # merge, not a static pointer (no finding holds a value on its page).
    rip, cr2 = qemu_page_fault(fault_data.RFC)
    assert rip == cr2 == nm["efi_multiboot2"][0]
    held = {v for f in debian.findings for _, v, _ in f.values} | \
        {f.value for f in debian.findings if f.value is not None}
    assert all(v // 4096 != cr2 // 4096 for v in held)
    assert piccheck.fault_prediction(debian.findings, cr2, rip, syms,
                                     fault_data.load_base(fault_data.RFC)) is None
    # A byte inside a message, on the same page as its pointer's value: the page matches.
    inside = value + 1
    assert inside // 4096 == value // 4096 and inside not in held
    p = piccheck.fault_prediction(debian.findings, inside, None, syms, base)
    assert p.how == piccheck.IN_PAGE and p.finding.kind == READS_POINTER


# -- the command line -------------------------------------------------------------------------


def test_cli_exit_status_and_json(capsys):
    assert pic_check.main(["--xen-syms", str(SYMS), "--json"]) == 1
    d = json.loads(capsys.readouterr().out)
    assert d["findings_total"] == len(d["findings"]) > 0
    assert pic_check.main(["--xen-syms", str(SYMS), "efi_enabled"]) == 0  # a leaf, no finding
    assert "0 findings" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["PrintErrMsg"], r"no function 'PrintErrMsg' in .*; nearest: PrintErrMesg"),
    (["--xen-syms", str(paths.XEN_DEBIAN_SYMS_MAP)], r"symbol map: it has no code bytes"),
])
def test_cli_bad_input_is_one_line(capsys, argv, message):
    if "--xen-syms" not in argv:
        argv = ["--xen-syms", str(SYMS)] + argv
    assert pic_check.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(message, err), err


def test_cli_stripped_image(tmp_path, capsys):
    stripped = tmp_path / "xen-syms-stripped"
    subprocess.run(["strip", "-o", str(stripped), str(SYMS)], check=True)
    assert pic_check.main(["--xen-syms", str(stripped)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "stripped" in err


# -- a synthetic image ---------------------------------------------------------------------------

SYNTH_ASM = r"""
        .text
        .globl entry
        .type entry, @function
entry:
        call    uses_movabs
        call    uses_imm32
        call    reads_table
        call    jumps_table
        call    jumps_abs
        call    indirect
        call    pic
        ret
        .size entry, .-entry
        .type uses_movabs, @function
uses_movabs:
        movabs  $target_fn, %rax
        ret
        .size uses_movabs, .-uses_movabs
        .type uses_imm32, @function
uses_imm32:
        movq    $target_fn2, %rax
        ret
        .size uses_imm32, .-uses_imm32
        .type reads_table, @function
reads_table:
        movq    ptrs+8(%rip), %rax
        ret
        .size reads_table, .-reads_table
        .type jumps_table, @function
jumps_table:
        leaq    jtab(%rip), %rdx
        movq    (%rdx,%rdi,8), %rax
        jmp     *%rax
        .size jumps_table, .-jumps_table
        .type jumps_abs, @function
jumps_abs:
        jmp     *jtab(,%rdi,8)
        .size jumps_abs, .-jumps_abs
        .type indirect, @function
indirect:
        call    *%rdi
        ret
        .size indirect, .-indirect
        .type pic, @function
pic:
        leaq    pic_data(%rip), %rax
        movl    (%rax), %eax
        leaq    target_fn(%rip), %rcx
        addq    pic_data+8(%rip), %rax
        call    target_fn
        ret
        .size pic, .-pic
        .type target_fn, @function
target_fn:
        ret
        .size target_fn, .-target_fn
        .type target_fn2, @function
target_fn2:
        ret
        .size target_fn2, .-target_fn2
        .type case0, @function
case0:  ret
        .size case0, .-case0
        .type case1, @function
case1:  ret
        .size case1, .-case1
        .data
        .balign 8
        .type ptrs, @object
ptrs:   .quad target_fn, target_fn2
        .size ptrs, .-ptrs
        .type jtab, @object
jtab:   .quad case0, case1
        .size jtab, .-jtab
        .type pic_data, @object
pic_data: .quad 0x1234, 5
        .size pic_data, .-pic_data
"""

# Linked in the top 2 GiB (like a -mcmodel=kernel image) so that a sign-extended
# imm32 and an absolute disp32 can hold linked VAs too; Xen's names for the bounds.
SYNTH_LD = """
SECTIONS {
  __image_base__ = 0xffffffff80000000;
  . = 0xffffffff80200000;
  _start = .;
  .text : { *(.text) }
  .note.gnu.build-id : { *(.note.gnu.build-id) }
  .data : { *(.data) }
  _end = .;
}
"""


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    (d / "img.s").write_text(SYNTH_ASM)
    (d / "img.ld").write_text(SYNTH_LD)
    subprocess.run(["as", "--64", "-o", str(d / "img.o"), str(d / "img.s")], check=True)
    subprocess.run(["ld", "-m", "elf_x86_64", "--build-id", "--no-warn-rwx-segments", "-T",
                    str(d / "img.ld"), "-o", str(d / "img"), str(d / "img.o")], check=True)
    path = d / "img"
    syms = load_xen_syms(path, cache_dir=False)
    return path, nm_table(path), piccheck.check(syms, ["entry"], cache=False)


def _rows_of(path, nm, fn):
    start, size, _ = nm[fn]
    return objdump(path, start, start + size)


def _only(report, fn):
    return [f for f in report.findings if f.function.split("#")[-1] == fn]


def test_synth_movabs_and_imm32_of_a_linked_va(synth):
    path, nm, report = synth
    for fn, target, mnem in (("uses_movabs", "target_fn", "movabs"),
                             ("uses_imm32", "target_fn2", "mov")):
        (f,) = _only(report, fn)
        rows = _rows_of(path, nm, fn)
        assert rows[0][1].startswith(mnem + " ")
        assert f.kind == ABSOLUTE and f.address == rows[0][0] and f.value == nm[target][0]
        assert f.value_symbol.endswith(target) and f.chain == ["entry", f.function]


def test_synth_rip_relative_load_from_a_pointer_table(synth):
    path, nm, report = synth
    (f,) = _only(report, "reads_table")
    rows = _rows_of(path, nm, "reads_table")
    assert rows[0][1].endswith("<ptrs+0x8>")
    ptrs_va, ptrs_size, _ = nm["ptrs"]
    values = elf_qwords(path, ptrs_va, ptrs_size)
    assert f.kind == READS_POINTER and f.address == rows[0][0]
    assert f.object.endswith("ptrs") and f.index == 1 and f.value == values[1] == nm["target_fn2"][0]
    assert f.slots == len(values)


def test_synth_jump_tables(synth):
    path, nm, report = synth
    rows = _rows_of(path, nm, "jumps_table")
    kinds = {(f.kind, f.address) for f in _only(report, "jumps_table")}
    assert kinds == {(TAKES_ADDRESS, rows[0][0]), (READS_POINTER, rows[1][0]),
                     (JUMP_TABLE, rows[2][0])}
    jt = next(f for f in _only(report, "jumps_table") if f.kind == JUMP_TABLE)
    jtab_va, jtab_size, _ = nm["jtab"]
    assert [v for _, v, _ in jt.values] == elf_qwords(path, jtab_va, jtab_size)
    assert [s.split("#")[-1] for _, _, s in jt.values] == ["case0", "case1"]
    # jmp *jtab(,%rdi,8): an absolute operand that is a linked VA, and a jump table.
    rows = _rows_of(path, nm, "jumps_abs")
    got = {(f.kind, f.address, f.value) for f in _only(report, "jumps_abs")}
    assert got == {(ABSOLUTE, rows[0][0], jtab_va), (JUMP_TABLE, rows[0][0], None)}


def test_synth_indirect_call_is_an_edge_not_a_finding(synth):
    path, nm, report = synth
    assert _only(report, "indirect") == []
    rows = _rows_of(path, nm, "indirect")
    sites = {(e.site, e.kind) for e in report.unresolved}
    assert (rows[0][0], piccheck.E_INDIRECT_CALL) in sites
    # Not followed: the jump table's targets are not reached.
    reached = {f.name.split("#")[-1] for f in report.functions}
    assert "case0" not in reached and "case1" not in reached


def test_synth_position_independent_code_gives_no_finding(synth):
    _, _, report = synth
    reached = {f.name.split("#")[-1] for f in report.functions}
    assert {"pic", "target_fn"} <= reached
    assert _only(report, "pic") == [] and _only(report, "target_fn") == []
    assert _only(report, "entry") == []


def test_synth_counts(synth):
    _, _, report = synth
    assert report.counts == {ABSOLUTE: 3, READS_POINTER: 2, TAKES_ADDRESS: 1, JUMP_TABLE: 2}


def test_synth_findings_for_call(synth):
    """The entry's own findings and those of the callee's reach; not its other callees'."""
    path, nm, report = synth
    syms = load_xen_syms(path, cache_dir=False)
    got = piccheck.findings_for_call(syms, callee="reads_table", entry="entry")
    assert [(f.kind, f.function.split("#")[-1]) for f in got] == [(READS_POINTER, "reads_table")]
    assert [c.split("#")[-1] for c in got[0].chain] == ["entry", "reads_table"]
    got = piccheck.findings_for_call(syms, callee="target_fn", entry="uses_movabs")
    assert [(f.kind, f.function.split("#")[-1]) for f in got] == [(ABSOLUTE, "uses_movabs")]


def test_synth_fault_predictions(synth):
    path, nm, report = synth
    syms = load_xen_syms(path, cache_dir=False)
    base = 0x0020_0000             # any load address: RIP is given there
    jtab_va = nm["jtab"][0]
    (jmp_abs_va, _), = _rows_of(path, nm, "jumps_abs")
    # jmp *jtab(,%rdi,8) run at the load address reads jtab at its linked VA: the
    # absolute operand at the faulting instruction.
    p = piccheck.fault_prediction(report.findings, jtab_va + 8,
                                  base + jmp_abs_va - syms.virt_start, syms, base)
    assert p.how == piccheck.AT_INSTRUCTION and p.finding.address == jmp_abs_va
    assert p.finding.kind == ABSOLUTE and p.others == [f"{JUMP_TABLE} at {p.finding.where}"]
    # A fetch at case1's linked VA (RIP == CR2): one of the jump tables' jumps.
    case1 = nm["case1"][0]
    p = piccheck.fault_prediction(report.findings, case1, case1, syms, base)
    jumps = {_rows_of(path, nm, "jumps_table")[2][0], jmp_abs_va}
    assert p.how == piccheck.AT_VALUE and p.finding.kind == JUMP_TABLE
    assert p.finding.address in jumps and p.indices == [1] and p.value == case1
    # Inside jtab but no slot's value, RIP unknown: the object jumps_abs uses.
    p = piccheck.fault_prediction(report.findings, jtab_va + 4, None, syms)
    assert p.how == piccheck.IN_OBJECT and p.finding.address == jmp_abs_va


def test_a_map_has_no_bytes():
    with pytest.raises(GdbextError, match="no code bytes to decode"):
        piccheck.check(load_xen_syms(paths.XEN_DEBIAN_SYMS_MAP))


def test_command_args_are_shared_and_errors_are_one_line(capsys):
    """The GDB command and the CLI share piccheck.parse_args/run_command."""
    args = piccheck.parse_args(["efi_enabled", "--json"])
    assert args.functions == ["efi_enabled"] and args.json and not hasattr(args, "xen_syms")
    text, report, status = piccheck.run_command(load_xen_syms(SYMS), args)
    assert status == 0 and json.loads(text)["entries"] == ["efi_enabled"]
    with pytest.raises(GdbextError) as err:
        piccheck.parse_args(["--bogus"])
    assert "unrecognized arguments: --bogus" in str(err.value) and "\n" not in str(err.value)
    assert piccheck.parse_args(["--help"]) is None
    assert pic_check.main(["--bogus"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
