"""The static check against the real boot: a finding's pointer dereferenced at the load
address is the fault the check predicted; and I13 at efi_multiboot2 names linked VAs
that QEMU says the firmware's tables do not map.

On the real boot (OVMF, GRUB, Debian's 4.17 under QEMU), stopped at
efi_console_set_mode (load address, efi_init has set StdErr), GDB calls boot.c's
PrintErrMesg with an error code whose ErrCodeToStr slot holds a linked VA (the slot
chosen from xen-pic-check's finding, its value checked in the ELF).  The firmware's
OutputString reads that linked VA under its own tables and takes a #PF; the firmware's
#PF handler (decoded from the IDT) is where GDB stops.  QEMU's registers give CR2,
the frame the CPU pushed gives the faulting RIP; ``piccheck.fault_prediction`` must
name PrintErrMesg's read of ErrCodeToStr, and the slot.
"""

from __future__ import annotations

from gdbext.core import faults, paging, piccheck
from gdbext.core.qemu import parse_descriptor_tables, parse_info_registers
from gdbext.core.xensyms import load_xen_syms

from ..oracles import elf_qwords, message_table, nm_table, parse_gva2gpa, table_read_sites
from .conftest import BOOT_TIMEOUT_S, booted_to

STOP = "efi_console_set_mode"
PF = 14
EFI_ERROR_BIT = 1 << 63


class _QemuMemory:
    """Guest physical memory through 'monitor xp' (QEMU's own reader)."""

    def __init__(self, stop):
        self.stop = stop

    def read_phys(self, pa: int, size: int) -> bytes:
        return self.stop.xp(pa, size)


def test_a_static_pointer_dereferenced_at_the_load_address_is_the_predicted_fault(
        xen_syms_path):
    syms = load_xen_syms(xen_syms_path)
    nm = nm_table(xen_syms_path)
    name, table_va, entries = message_table(xen_syms_path, nm)
    _, read_va, _ = table_read_sites(xen_syms_path, nm, "PrintErrMesg", name)
    report = piccheck.check(syms)
    (read,) = [f for f in report.findings if f.address == read_va]
    assert read.kind == piccheck.READS_POINTER
    index, value = read.values[0][0], read.values[0][1]
    assert (index, value) in entries                       # the ELF agrees
    # Slot 0 is NULL (pyelftools): the table's start doubles as an empty CHAR16 string.
    assert elf_qwords(xen_syms_path, table_va, 8) == [0]

    with booted_to(STOP, xen_syms_path) as stop:
        base = stop.run["load_base"]
        text = stop.monitor("info registers")
        regs = parse_info_registers(text)
        ctx = paging.PagingContext.from_registers(regs["cr0"], regs["cr4"], regs["efer"])
        # Under the firmware's tables the linked VA is not mapped (QEMU says so).
        assert parse_gva2gpa(stop.monitor(f"gva2gpa {value:#x}")) is None
        idt_base, idt_limit = parse_descriptor_tables(text)["idt"]
        mem = _QemuMemory(stop)
        plan = faults.plan_handler_breakpoints(idt_base, idt_limit, regs["cr3"], ctx, mem)
        pf_sites = [s for s in plan.sites if s.vector == PF]
        assert pf_sites, plan.as_dict()
        for site in plan.sites:
            stop.cmd(f"break *{site.handler_va:#x}")
        # PrintErrMesg(L"", index | EFI error bit), returning to where GDB stopped, on a
        # stack below the firmware's (as after a call: RSP + 8 16-byte aligned).
        rsp = ((regs["rsp"] - 0x400) & ~0xF) - 8
        for command in (f"set $rsp = {rsp:#x}",
                        f"set *(unsigned long *){rsp:#x} = {regs['rip']:#x}",
                        f"set $rdi = {syms.pa(table_va, base):#x}",
                        f"set $rsi = {EFI_ERROR_BIT | index:#x}",
                        f"set $rip = {syms.pa('PrintErrMesg', base):#x}"):
            stop.cmd(command)
        stop.cmd("continue", timeout=BOOT_TIMEOUT_S)
        hregs = parse_info_registers(stop.monitor("info registers"))
        assert PF in plan.vectors_at(hregs["rip"]), hex(hregs["rip"])
        hctx = paging.PagingContext.from_registers(hregs["cr0"], hregs["cr4"], hregs["efer"])
        frame = faults.read_exception_frame(PF, hregs["rsp"], hregs["cr3"], hctx, mem)
        stop.cmd("delete")
        cr2 = hregs["cr2"]
        assert cr2 == value and frame.error_code & 1 == 0     # bit 0 (P) clear: not present

        predicted = piccheck.fault_prediction(report.findings, cr2, frame.rip, syms, base)
        assert predicted is not None, (hex(cr2), hex(frame.rip))
        assert predicted.finding.address == read_va and predicted.how == piccheck.AT_VALUE
        assert index in predicted.indices and predicted.value == cr2
        assert predicted.slot == f"{name}[{predicted.indices[0]}]"


def test_i13_at_efi_multiboot2_cites_what_qemu_says_is_unmapped(xen_syms_path):
    """Stopped in efi_multiboot2 at its load address under the firmware's tables (no
    merge on Debian's build): I13 WARNs citing PrintErrMesg's read of ErrCodeToStr, and
    every linked VA it says is not at the load address, QEMU's gva2gpa finds unmapped."""
    nm = nm_table(xen_syms_path)
    name, _, entries = message_table(xen_syms_path, nm)
    _, read_va, _ = table_read_sites(xen_syms_path, nm, "PrintErrMesg", name)
    read_at = f"PrintErrMesg+{read_va - nm['PrintErrMesg'][0]:#x}"
    with booted_to("efi_multiboot2", xen_syms_path) as stop:
        cr3 = parse_info_registers(stop.monitor("info registers"))["cr3"]
        d = stop.json("xen-l4merge-check --only I13 --json")
        (i13,) = d["checks"]
        assert i13["id"] == "I13" and i13["status"] == "WARN", i13
        ev = i13["evidence"]
        assert ev["tables"] == cr3 & ~0xFFF and ev["upper_half_at_load"] is False
        (f,) = [f for f in ev["findings"] if f["where"].endswith("#" + read_at)]
        assert f["linked_vas"] == sorted({v for _, v in entries})
        assert f["unmapped_count"] == len(f["linked_vas"])
        for va in f["linked_vas"]:
            assert parse_gva2gpa(stop.monitor(f"gva2gpa {va:#x}")) is None, hex(va)
        assert f"{read_at} reads {name}[reg]" in i13["summary"]
