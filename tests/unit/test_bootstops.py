"""The boot stop plan on the real Debian xen-syms (expectations from nm and objdump, not from
our own decoder), the decoders on synthetic bytes (the RFC's merge assembled with GNU as),
where_in_boot, the selection of stops and checks, and the per-stop change report."""

import re
import subprocess
from pathlib import Path

import pytest

from gdbext import paths
from gdbext.core import bootstops
from gdbext.core.bootstops import (CALL, EFI_MB2, EFI_RETURN, ENTRY, HIGH_START, L2_XENMAP_FILLED,
                                   LINKED, LOAD, LOW, MERGE, START_XEN, SWITCH, TABLES_RELOCATED,
                                   TRAMPOLINE_CR3, TRAMPOLINE_SETUP, TablesSnapshot, build_plan,
                                   diff_snapshots, find_call_rel32, find_cr3_load,
                                   find_loop_after, find_merge, stop_at,
                                   where_in_boot)
from gdbext.core.errors import GdbextError
from gdbext.core.merge_catalog import CHECK_IDS, CHECKS_AT_STOP, select_checks
from gdbext.core.xensyms import load_xen_syms

SYMS = paths.XEN_DEBIAN_SYMS
# Any 2 MiB-aligned base and any page below 1 MiB: nothing may depend on the lab's choice.
B = 0x12600000
TRAMPOLINE_PHYS = 0x8C000


# -- oracles: nm and objdump on the ELF ---------------------------------------------------


@pytest.fixture(scope="module")
def syms():
    return load_xen_syms(SYMS)


@pytest.fixture(scope="module")
def plan(syms):
    return build_plan(syms)


@pytest.fixture(scope="module")
def nm():
    out = subprocess.run(["nm", str(SYMS)], capture_output=True, text=True, check=True).stdout
    table = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3:
            table.setdefault(parts[2], int(parts[0], 16))
    return table


def objdump(start: int, stop: int, i386: bool = False):
    """[(address, text)] of objdump's disassembly of [start, stop)."""
    argv = ["objdump", "-d", "--no-show-raw-insn", f"--start-address={start:#x}",
            f"--stop-address={stop:#x}"]
    if i386:
        argv += ["-m", "i386"]
    out = subprocess.run(argv + [str(SYMS)], capture_output=True, text=True, check=True).stdout
    rows = []
    for line in out.splitlines():
        m = re.match(r"^\s*([0-9a-f]+):\s+(.*)$", line)
        if m:
            rows.append((int(m.group(1), 16), m.group(2).strip()))
    return rows


def after(rows, index):
    """The address of the instruction after rows[index]."""
    return rows[index + 1][0]


def first(rows, pattern, start=0):
    for i in range(start, len(rows)):
        if re.search(pattern, rows[i][1]):
            return i
    raise AssertionError(f"objdump has no {pattern!r}")


# -- the plan of the Debian build -----------------------------------------------------------


def test_stops_in_boot_order_with_their_kinds(plan):
    assert plan.names() == [ENTRY, CALL, EFI_MB2, EFI_RETURN, SWITCH, TRAMPOLINE_SETUP,
                            TABLES_RELOCATED, L2_XENMAP_FILLED, TRAMPOLINE_CR3, HIGH_START,
                            START_XEN]
    kinds = {s.name: s.kind for s in plan.stops}
    assert kinds[EFI_MB2] == LOAD           # no merge: called at its load address
    assert kinds[TRAMPOLINE_CR3] == LOW
    assert kinds[HIGH_START] == kinds[START_XEN] == LINKED
    assert {kinds[n] for n in (ENTRY, CALL, EFI_RETURN, SWITCH, TRAMPOLINE_SETUP)} == {LOAD}


def test_debian_build_has_no_merge_and_says_so(plan):
    assert plan.patched is False and plan.merge_site is None
    assert plan.get(MERGE) is None
    assert any("no RFC merge" in n for n in plan.notes)


def test_symbol_stops_are_nm_values(plan, nm):
    base = nm["__image_base__"]
    for name in (ENTRY, EFI_MB2, SWITCH, TRAMPOLINE_SETUP, HIGH_START, START_XEN):
        stop = plan.get(name)
        assert stop.linked_va == nm[name], name
        assert stop.offset == nm[name] - base, name


def test_call_and_return_are_objdumps_call_of_efi_multiboot2(plan, nm):
    rows = objdump(nm["__efi64_mb2_start"], nm["x86_32_switch"])
    i = first(rows, r"^call\s+[0-9a-f]+ <efi_multiboot2>$")
    assert plan.get(CALL).linked_va == rows[i][0]
    assert plan.get(EFI_RETURN).linked_va == after(rows, i)


def test_relocation_loop_end_is_objdumps(plan, nm):
    """The loop that adds B to __page_tables: lea __page_tables_start(%rsi) .. jb back."""
    off = nm["__page_tables_start"] - nm["__image_base__"]
    rows = objdump(nm["trampoline_setup"], nm["cmdline_parse_early"])
    i = first(rows, rf"^lea\s+{off:#x}\(%rsi\),%eax$")
    j = first(rows, r"^jb\s", i)
    assert plan.get(TABLES_RELOCATED).linked_va == after(rows, j)
    # The loop body (jb's target) adds %esi to each present entry.
    target = int(rows[j][1].split()[1], 16)
    assert plan.relocation_loop == (target, after(rows, j))
    body = [t for a, t in rows if target <= a < rows[j][0]]
    assert any(re.match(r"^add\s+%esi,\(%rax\)$", t) for t in body)


def test_l2_xenmap_fill_end_is_objdumps(plan, nm):
    off = nm["l2_xenmap"] - nm["__image_base__"]
    rows = objdump(nm["trampoline_setup"], nm["cmdline_parse_early"])
    i = first(rows, rf"^mov\s+%eax,{off:#x}\(%rsi,%rcx,8\)$")
    j = first(rows, r"^jbe\s", i)
    assert plan.get(L2_XENMAP_FILLED).linked_va == after(rows, j)
    assert plan.l2_xenmap_fill == (rows[i][0], after(rows, j))


def test_trampoline_cr3_load_is_objdumps(plan, nm):
    """In the trampoline (32-bit code): mov $offset(idle_pg_table),%eax ... mov %eax,%cr3."""
    off = nm["idle_pg_table"] - nm["__image_base__"]
    rows = objdump(nm["trampoline_start"], nm["trampoline_end"], i386=True)
    i = first(rows, rf"^mov\s+\${off:#x},%eax$")
    j = first(rows, r"^mov\s+%eax,%cr3$", i)
    stop = plan.get(TRAMPOLINE_CR3)
    assert stop.linked_va == after(rows, j)            # just after the load: CR3 is Xen's
    assert stop.low_offset == after(rows, j) - nm["trampoline_start"]
    assert stop.address(B, TRAMPOLINE_PHYS) == TRAMPOLINE_PHYS + stop.low_offset
    assert stop.address(B) is None                     # unknown until efi_multiboot2 chose it
    assert plan.trampoline_phys_va == nm["trampoline_phys"]


def test_addresses_are_load_base_plus_offset_or_linked(plan, nm):
    for stop in plan.stops:
        if stop.kind == LOAD:
            assert stop.address(B) == B + stop.linked_va - nm["__image_base__"]
            assert stop.address(None) is None
        elif stop.kind == LINKED:
            assert stop.address(B) == stop.address(None) == stop.linked_va


def test_bytes_at_every_load_stop_are_instructions_objdump_knows(plan, syms, nm):
    """Each stop is an instruction boundary in objdump's disassembly."""
    for stop in plan.stops:
        if stop.kind != LOAD:
            continue
        rows = objdump(stop.linked_va, stop.linked_va + 8)
        assert rows and rows[0][0] == stop.linked_va, stop.name


def test_checks_come_from_l4merge(plan):
    for stop in plan.stops:
        assert stop.checks == CHECKS_AT_STOP.get(stop.name, ()), stop.name
        if stop.name != CALL:
            assert plan.checks_for(stop) == stop.checks, stop.name
    assert plan.checks_for(plan.get(ENTRY), predict=True) == CHECK_IDS
    # Without the merge, CR3 is still the firmware's at the call: predict there too.
    assert plan.checks_for(plan.get(CALL), predict=True) == CHECK_IDS
    assert plan.checks_for(plan.get(HIGH_START), predict=True) == CHECKS_AT_STOP[HIGH_START]
    assert plan.checks_for(plan.get(ENTRY)) == CHECKS_AT_STOP[ENTRY]
    # ... and without --predict, nothing is merged at the call: the entry's checks.
    assert plan.checks_for(plan.get(CALL)) == tuple(
        c for c in CHECKS_AT_STOP[CALL] if c in CHECKS_AT_STOP[ENTRY])


def test_plan_as_dict(plan):
    d = plan.as_dict(B, TRAMPOLINE_PHYS)
    assert d["patched"] is False and d["merge"] is None
    by = {s["stop"]: s for s in d["stops"]}
    assert by[ENTRY]["address"] == B + by[ENTRY]["offset"]
    assert by[TRAMPOLINE_CR3]["address"] == TRAMPOLINE_PHYS + by[TRAMPOLINE_CR3]["low_offset"]


# -- selection ---------------------------------------------------------------------------------


def test_select_stops_and_skip(plan):
    assert [s.name for s in plan.select()] == plan.names()
    got = plan.select([f"{ENTRY},{TRAMPOLINE_CR3}", START_XEN])
    assert [s.name for s in got] == [ENTRY, TRAMPOLINE_CR3, START_XEN]
    got = plan.select(skip=[TABLES_RELOCATED, L2_XENMAP_FILLED])
    assert TABLES_RELOCATED not in [s.name for s in got] and len(got) == len(plan.stops) - 2


def test_select_rejects_unknown_and_absent_stops(plan):
    with pytest.raises(GdbextError, match="unknown stop 'trampolin'.*stops are:"):
        plan.select(["trampolin"])
    with pytest.raises(GdbextError, match="'merge' is not in this build's plan.*no RFC merge"):
        plan.select([MERGE])


def test_select_checks():
    assert select_checks(("I0", "I2")) == ["I0", "I2"]
    assert select_checks(("I0", "I2", "I9"), only=["i9,I0"]) == ["I0", "I9"]
    assert select_checks(("I0", "I2", "I9"), skip=["I2"]) == ["I0", "I9"]
    with pytest.raises(GdbextError, match="unknown check I14"):
        select_checks(("I0",), only=["I14"])


# -- where_in_boot ----------------------------------------------------------------------------


def test_where_each_stop_is(plan, syms):
    want = {ENTRY: ENTRY, CALL: ENTRY, EFI_RETURN: ENTRY, EFI_MB2: EFI_MB2, SWITCH: SWITCH,
            TRAMPOLINE_SETUP: TRAMPOLINE_SETUP, TABLES_RELOCATED: TRAMPOLINE_SETUP,
            L2_XENMAP_FILLED: TRAMPOLINE_SETUP, TRAMPOLINE_CR3: "trampoline",
            HIGH_START: HIGH_START, START_XEN: START_XEN}
    for stop in plan.stops:
        rip = stop.address(B, TRAMPOLINE_PHYS)
        assert where_in_boot(syms, B, rip, TRAMPOLINE_PHYS) == want[stop.name], stop.name
        assert stop_at(plan, B, rip, TRAMPOLINE_PHYS) is stop


def test_where_other_code(syms):
    def load(name, delta=0):
        return B + syms.offset(name) + delta

    assert where_in_boot(syms, B, load("cs32_switch")) == SWITCH
    assert where_in_boot(syms, B, load("reloc", 4)) == TRAMPOLINE_SETUP
    assert where_in_boot(syms, B, load("__start")) == "__start"
    # C code at the load address on this path runs inside efi_multiboot2's call.
    assert where_in_boot(syms, B, load("efi_arch_memory_setup", 8)) == EFI_MB2
    assert where_in_boot(syms, B, syms.linked_va("__start_xen") + 0x40) == START_XEN
    assert where_in_boot(syms, B, syms.linked_va("construct_dom0")) == "after __start_xen"
    assert where_in_boot(syms, B, syms.linked_va("efi_multiboot2")) == EFI_MB2
    assert where_in_boot(syms, B, B - 0x1000) is None                  # below the image
    assert where_in_boot(syms, None, load("__efi64_mb2_start")) is None  # B unknown
    # The trampoline's low copy is known only with trampoline_phys.
    assert where_in_boot(syms, B, TRAMPOLINE_PHYS + 0x10) is None
    assert where_in_boot(syms, B, TRAMPOLINE_PHYS + 0x10, TRAMPOLINE_PHYS) == "trampoline"


# -- decoders on synthetic bytes ----------------------------------------------------------------

# The RFC's head.S hunk (rfc-efi-multiboot2-linked-address.txt) with its constants
# spelled out (L4_PAGETABLE_ENTRIES 512, L2_PAGETABLE_SHIFT 21, _PAGE_PSE +
# PAGE_HYPERVISOR_RWX 0x1e3) and local labels for the symbols it names.
RFC_MERGE_ASM = r"""
        .code64
        .text
entry:
        lea     .Lno_ih(%rip),%r15
        jz      .Lswitch
        push    %rax
        push    %rcx
        push    %rdx
        push    %rsi
        push    %rdi
        mov     %cr3, %rsi
        lea     efi_l4_bootmap(%rip), %rdi
        mov     $256, %ecx
        rep movsq
        lea     (256 * 8) + idle_pg_table(%rip), %rsi
        mov     $256, %ecx
        rep movsq
        lea     efi_l4_bootmap(%rip), %rax
        mov     %rax, %cr3
        lea     image_base(%rip), %esi
        lea     0x1e3 + 0x200000(%esi), %eax
        mov     $0x200000, %ecx
        mov     $0x5a613f, %edx
        shr     $21, %ecx
        shr     $21, %edx
1:      mov     %eax, 0x46a000(%esi, %ecx, 8)
        add     $1, %ecx
        add     $1 << 21, %eax
        cmp     %edx, %ecx
        jbe     1b
        pop     %rdi
        pop     %rsi
        pop     %rdx
        pop     %rcx
        pop     %rax
        push    %rax
        lea     image_base(%rip), %r10
        lea     efi_multiboot2(%rip), %rax
        sub     %r10, %rax
        mov     $0xffff82d040000000, %r10
        addq    %r10, %rax
        call    *%rax
        pop     %rax
.Lswitch:
        nop
.Lno_ih:
        nop
image_base:
efi_multiboot2:
        ret
        .balign 4096
efi_l4_bootmap:
idle_pg_table:
        .quad 0
"""


@pytest.fixture(scope="module")
def rfc_code(tmp_path_factory):
    """(bytes, objdump rows) of the RFC's merge, assembled by GNU as."""
    d = tmp_path_factory.mktemp("rfc")
    src, obj, binary = d / "rfc.s", d / "rfc.o", d / "rfc.bin"
    src.write_text(RFC_MERGE_ASM)
    subprocess.run(["as", "--64", "-o", str(obj), str(src)], check=True)
    subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(obj), str(binary)],
                   check=True)
    out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(obj)], capture_output=True,
                         text=True, check=True).stdout
    rows = [(int(m.group(1), 16), m.group(2).strip()) for m in
            (re.match(r"^\s*([0-9a-f]+):\s+(.*)$", line) for line in out.splitlines()) if m]
    return Path(binary).read_bytes(), rows


def test_find_merge_in_the_assembled_rfc(rfc_code):
    code, rows = rfc_code
    va = 0xFFFF82D0403DD531
    site = find_merge(code, va)
    assert site is not None
    assert site.mov_cr3_rsi == va + rows[first(rows, r"^mov\s+%cr3,%rsi$")][0]
    assert site.mov_rax_cr3 == va + rows[first(rows, r"^mov\s+%rax,%cr3$")][0]
    assert site.call_rax == va + rows[first(rows, r"^call\s+\*%rax$")][0]


def test_find_merge_needs_all_three_in_order():
    assert find_merge(b"\x90" * 8, 0) is None
    assert find_merge(b"\x0f\x20\xde\x90\x0f\x22\xd8\x90", 0) is None       # no call *%rax
    assert find_merge(b"\xff\xd0\x0f\x22\xd8\x0f\x20\xde", 0) is None       # wrong order
    site = find_merge(b"\x0f\x20\xde\x90\x0f\x22\xd8\xff\xd0", 0x1000)
    assert (site.mov_cr3_rsi, site.mov_rax_cr3, site.call_rax) == (0x1000, 0x1004, 0x1007)


def test_find_call_rel32_only_to_the_target():
    # call +0x10 (to 0x1015), then call to 0x2000.
    rel = (0x2000 - (0x1000 + 10)).to_bytes(4, "little", signed=True)
    code = b"\xe8\x10\x00\x00\x00" + b"\xe8" + rel
    assert find_call_rel32(code, 0x1000, 0x1015) == 0x1000
    assert find_call_rel32(code, 0x1000, 0x2000) == 0x1005
    assert find_call_rel32(code, 0x1000, 0x3000) is None


def test_find_loop_after_passes_over_far_error_jumps(rfc_code):
    code, rows = rfc_code
    store = first(rows, r"^mov\s+%eax,0x46a000\(%[er]si,%[er]cx,8\)$")
    jbe = first(rows, r"^jbe\s", store)
    pat = code[rows[store][0]:rows[store + 1][0]]
    assert find_loop_after(code, 0, pat) == (rows[store][0], after(rows, jbe))
    # A far backward jump (to an error path) is not the loop's.
    far = (b"\x90" * 64 + b"\x8d\x86\x00\x60\x46\x00"              # lea (set-up)
           + b"\x0f\x85" + (-200).to_bytes(4, "little", signed=True)  # jne error
           + b"\x01\x30\x72\xfc\x90")                               # add; jb back
    start, end = find_loop_after(far, 0, b"\x8d\x86\x00\x60\x46\x00")
    assert (start, end) == (64 + 12, 64 + 16)
    assert find_loop_after(b"\x90" * 8, 0, b"\x8d\x86") is None


def test_find_cr3_load_follows_the_root_immediate():
    root = 0x46E000
    code = (b"\x90\x0f\x22\xd8"                      # a CR3 load of something else
            + b"\xb8" + root.to_bytes(4, "little")   # mov $offset(idle_pg_table),%eax
            + b"\x03\x05\x34\x02\x00\x00"            # add trampoline-relative B
            + b"\x0f\x22\xd8")                       # mov %eax,%cr3
    assert find_cr3_load(code, 0x100, root) == 0x100 + 15
    assert find_cr3_load(code, 0x100, root + 0x1000) is None


class EditedSyms:
    """The Debian symbols with some code replaced (e.g. the RFC's merge in place of
    __efi64_mb2_start's bytes) and some symbols hidden."""

    def __init__(self, real, code=None, at=ENTRY, until=None, hidden=()):
        self._real = real
        self._hidden = set(hidden)
        self._start = real.linked_va(at)
        # To the next symbol (asm labels have no size), or to the symbol ``until``.
        self._end = (real.linked_va(until) if until else
                     bootstops._next_symbol_va(real, self._start))
        code = code or b""
        assert len(code) <= self._end - self._start
        self._code = code + b"\x90" * (self._end - self._start - len(code))

    def __getattr__(self, name):
        return getattr(self._real, name)

    def __contains__(self, name):
        return name not in self._hidden and name in self._real

    def __iter__(self):
        return iter(self._real)

    def read_linked(self, va, size):
        if self._start <= va < self._end:
            assert va + size <= self._end
            return self._code[va - self._start:va - self._start + size]
        return self._real.read_linked(va, size)


def test_plan_of_a_patched_build(syms, rfc_code):
    code, rows = rfc_code
    text = code[:rows[first(rows, r"^nop$")][0]]   # the merge up to .Lswitch
    patched = build_plan(EditedSyms(syms, text))
    entry = syms.linked_va(ENTRY)
    call_at = entry + rows[first(rows, r"^call\s+\*%rax$")][0]
    cr3_at = entry + rows[first(rows, r"^mov\s+%rax,%cr3$")][0]
    assert patched.patched and patched.merge_site.call_rax == call_at
    assert patched.names()[:5] == [ENTRY, MERGE, CALL, EFI_MB2, EFI_RETURN]
    assert patched.get(MERGE).linked_va == cr3_at + 3        # just after the switch
    assert patched.get(CALL).linked_va == call_at
    assert patched.get(EFI_RETURN).linked_va == call_at + 2  # call *%rax is 2 bytes
    assert patched.get(EFI_MB2).kind == LINKED
    assert patched.get(EFI_MB2).address(B) == syms.linked_va(EFI_MB2)
    assert not any("no RFC merge" in n for n in patched.notes)
    # With the merge, CR3 at the call is M itself: live checks, not a prediction.
    assert patched.checks_for(patched.get(CALL), predict=True) == CHECKS_AT_STOP[CALL]
    assert patched.checks_for(patched.get(CALL)) == CHECKS_AT_STOP[CALL]


# -- what changed between stops ------------------------------------------------------------------


def test_diff_snapshots():
    root = tuple(range(512))
    first_snap = TablesSnapshot(0x1000, root, {"idle_pg_table": (0,) * 512, "l2_xenmap": (1, 2)})
    d = diff_snapshots(None, first_snap)
    assert d["cr3_old"] is None and d["cr3_new"] == 0x1000 and not d["cr3_changed"]
    assert d["l4_changed"] == [] and d["boot_qwords_changed"] == 0
    new_root = list(root)
    new_root[261] += 1
    new_root[5] = 0
    idle = [0] * 512
    idle[261] = 0x46D063
    second = TablesSnapshot(0x2000, tuple(new_root), {"idle_pg_table": tuple(idle),
                                                      "l2_xenmap": (1, 3)})
    d = diff_snapshots(first_snap, second)
    assert d["cr3_old"] == 0x1000 and d["cr3_new"] == 0x2000 and d["cr3_changed"]
    assert d["l4_changed"] == [5, 261]
    assert d["boot_changed"] == {"idle_pg_table": 1, "l2_xenmap": 1}
    assert d["boot_qwords_changed"] == 2
    text = bootstops.changes_text(d)
    assert "CR3 0x1000 -> 0x2000" in text and "L4 entries changed: 2 (5, 261)" in text
    assert "2 qwords changed (idle_pg_table 1, l2_xenmap 1)" in text
    assert "unchanged" in bootstops.changes_text(diff_snapshots(second, second))


def test_record_and_summary_text():
    rec = {"stop": TRAMPOLINE_SETUP, "rip": 0x3D9DD701, "cr3": 0x3F801000,
           "symbol": "head.o#trampoline_setup (load address)",
           "registers": {"rsi": 0x3D600000},
           "changes": diff_snapshots(None, TablesSnapshot(0x3F801000, None, {})),
           "checks": [{"id": "I9", "status": "FAIL", "summary": "l3_xenmap unrelocated"}],
           "counts": {"PASS": 0, "FAIL": 1, "WARN": 0, "SKIP": 0}, "error": None}
    text = bootstops.record_text(rec, 3, 11, 0x3D600000)
    assert text.splitlines()[0].startswith("xen-mb2-break: [3/11] trampoline_setup: RIP 0x3d9dd701")
    assert "%esi 0x3d600000 == B" in text and "I9   FAIL l3_xenmap unrelocated" in text
    summary = bootstops.summary_text({"stops": [rec], "reached": [TRAMPOLINE_SETUP],
                                      "counts": rec["counts"], "complete": False,
                                      "error": "timed out"})
    assert "trampoline_setup" in summary and "I9" in summary
    assert summary.splitlines()[-1] == ("incomplete: 1 stops, 0 PASS, 1 FAIL, 0 WARN, 0 SKIP; "
                                        "error: timed out")


def test_what_decoding_cannot_find_is_left_out_and_noted(syms):
    # The trampoline as NOPs: no CR3 load to stop at; __high_start is the next stop.
    plan = build_plan(EditedSyms(syms, at="trampoline_start", until="trampoline_end"))
    assert TRAMPOLINE_CR3 not in plan.names() and HIGH_START in plan.names()
    assert any("CR3 load was not found" in n for n in plan.notes)
    # trampoline_setup as NOPs: neither loop.
    plan = build_plan(EditedSyms(syms, at=TRAMPOLINE_SETUP))
    assert TABLES_RELOCATED not in plan.names() and L2_XENMAP_FILLED not in plan.names()
    assert sum("was not found in trampoline_setup" in n for n in plan.notes) == 2
    # The entry as NOPs: no call of efi_multiboot2, so no call and no return stop.
    plan = build_plan(EditedSyms(syms, at=ENTRY))
    assert CALL not in plan.names() and EFI_RETURN not in plan.names()
    assert any("no call of efi_multiboot2" in n for n in plan.notes)


def test_a_build_without_the_mb2_efi_entry_is_one_error(syms):
    with pytest.raises(GdbextError, match="no x86_32_switch symbol: not a multiboot2\\+EFI"):
        build_plan(EditedSyms(syms, hidden={SWITCH}))


def test_read_trampoline_phys(syms):
    """The u64 at PA(trampoline_phys): None until chosen (0), or if not a page address."""
    from gdbext.core.memory import SyntheticMemory
    from gdbext.core.xenimage import LoadedXen

    xen = LoadedXen(syms, B)
    mem = SyntheticMemory(1 << 32)
    assert bootstops.read_trampoline_phys(mem, xen) is None
    mem.write_u64(xen.pa("trampoline_phys"), TRAMPOLINE_PHYS)
    assert bootstops.read_trampoline_phys(mem, xen) == TRAMPOLINE_PHYS
    mem.write_u64(xen.pa("trampoline_phys"), TRAMPOLINE_PHYS + 8)
    assert bootstops.read_trampoline_phys(mem, xen) is None


def test_plan_for_builds_once_per_symbols(syms):
    assert bootstops.plan_for(syms) is bootstops.plan_for(syms)
    assert bootstops.plan_for(syms).names() == bootstops.build_plan(syms).names()
