"""Parsers of QEMU monitor output, on text QEMU 7.2 printed at __efi64_mb2_start."""

from gdbext.core.qemu import parse_info_registers, parse_xp_qwords

INFO_REGISTERS = """\
CPU#0
RAX=0000000036d76289 RBX=0000000000002000 RCX=0000000000000000 RDX=0000000000000000
R8 =000000002c781000 R9 =0000000000000000 R10=0000000000000005 R11=000000003dc49c6c
RIP=000000003d9dd531 RFL=00200202 [-------] CPL=0 II=0 A20=1 SMM=0 HLT=0
ES =0030 0000000000000000 ffffffff 00cf9300 DPL=0 DS   [-WA]
GDT=     000000003f5db000 00000047
CR0=80010033 CR2=0000000000000000 CR3=000000003f801000 CR4=00000668
EFER=0000000000000d00
FCW=037f FSW=0000 [ST=0] FTW=00 MXCSR=00001f80
"""

XP = """\
000000003f801000: 0x000000003f802023 0x000000003fa03003
000000003f801010: 0x0000000000000000
"""


def test_info_registers():
    regs = parse_info_registers(INFO_REGISTERS)
    assert regs["rax"] == 0x36D76289 and regs["r8"] == 0x2C781000
    assert regs["rip"] == 0x3D9DD531 and regs["rfl"] == 0x00200202
    assert (regs["cr0"], regs["cr3"], regs["cr4"]) == (0x80010033, 0x3F801000, 0x668)
    assert regs["efer"] == 0xD00
    # Segment selectors (4 digits) and flag words are not register values here.
    assert "es" not in regs and "fcw" not in regs and "cpl" not in regs


def test_xp_qwords_in_order_and_nothing_else():
    assert parse_xp_qwords(XP) == [0x3F802023, 0x3FA03003, 0]
    assert parse_xp_qwords("Cannot access memory\n") == []
    assert parse_xp_qwords("") == []
