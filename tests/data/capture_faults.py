"""Capture real outputs of early-boot crashes on Debian's Xen 4.17 for the unit tests.

Run under the QEMU lock, from the worktree, with GDBEXT_CACHE set:

    flock /tmp/gdbext-qemu.lock .venv/bin/python tests/data/capture_faults.py rfc OUTDIR
    flock /tmp/gdbext-qemu.lock .venv/bin/python tests/data/capture_faults.py triple OUTDIR
    (also: printerr, rfc-image (needs rfc's serial.log in OUTDIR), triple-qmp)

``rfc``: at __efi64_mb2_start, breakpoints on the firmware's handlers of vectors 0-31
(IDT from 'monitor info registers', gates decoded by gdbext.core.faults), then
'xen-l4merge-apply --call-linked' (the raw merge) and 'continue'; saves the monitor's
registers at the handler, the stack qwords, the firmware's serial dump (after
detaching, the handler prints it) and QEMU's -d int,cpu_reset log.

``triple``: QEMU with -action reboot=shutdown,shutdown=pause; at the entry CR3 is set
to a page of zeros; records what GDB sees, the monitor's status, and whether
'monitor system_reset' and xen-run-to still work afterwards.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from gdbext import paths
from gdbext.core import faults, paging
from gdbext.core.errors import MemoryReadError
from gdbext.core.qemu import parse_descriptor_tables, parse_info_registers, parse_xp_qwords
from gdbext.host.gdbdriver import lab_session
from gdbext.host.lab import LabConfig

TIMEOUT = 240


class XpMemory:
    """Guest physical memory through 'monitor xp' (QEMU's own reader)."""

    def __init__(self, gdb):
        self.gdb = gdb

    def read_phys(self, pa: int, size: int) -> bytes:
        start = pa & ~7
        count = (pa + size - start + 7) // 8
        words = parse_xp_qwords(self.gdb.execute(f"monitor xp /{count}gx {start:#x}").out)
        if len(words) != count:
            raise MemoryReadError(pa, size, "not answered by xp")
        data = b"".join(w.to_bytes(8, "little") for w in words)
        return data[pa - start:pa - start + size]


def save(out: Path, name: str, text: str) -> None:
    (out / name).write_text(text)
    print(f"saved {out / name} ({len(text)} chars)", flush=True)


def regs_ctx(text: str):
    regs = parse_info_registers(text)
    return regs, paging.PagingContext.from_registers(regs["cr0"], regs["cr4"], regs["efer"])


def rfc(out: Path) -> None:
    int_log = out / "qemu-int.log"
    cfg = LabConfig(memory_mb=1024, extra_qemu_args=["-d", "int,cpu_reset", "-D", str(int_log)])
    with lab_session(cfg, paths.XEN_DEBIAN_SYMS) as (lab, gdb):
        run = gdb.execute(f"xen-run-to __efi64_mb2_start --json --timeout {TIMEOUT}",
                          timeout=TIMEOUT + 30).json()
        save(out, "entry-run.json", json.dumps(run, indent=1))
        text = gdb.execute("monitor info registers").out
        save(out, "entry-registers.txt", text)
        regs, ctx = regs_ctx(text)
        idt_base, idt_limit = parse_descriptor_tables(text)["idt"]
        mem = XpMemory(gdb)
        plan = faults.plan_handler_breakpoints(idt_base, idt_limit, regs["cr3"], ctx, mem)
        save(out, "entry-handler-plan.json", json.dumps(plan.as_dict(), indent=1))
        idt_raw = faults.read_virtual(ctx, mem, ctx.root_from_cr3(regs["cr3"]), idt_base,
                                      32 * 16)
        save(out, "entry-idt-0-31.hex", idt_raw.hex() + "\n")
        by_va = {}
        for site in plan.sites:
            gdb.execute(f"break *{site.handler_va:#x}")
            by_va.setdefault(site.handler_va, []).append(site.vector)
        called = gdb.execute("xen-l4merge-apply --call-linked --json").out
        save(out, "call-linked.txt", called)
        t0 = time.monotonic()
        cont = gdb.execute("continue", timeout=120)
        save(out, "continue.txt", f"{cont.out}\n(after {time.monotonic() - t0:.2f} s)\n")
        text = gdb.execute("monitor info registers").out
        save(out, "handler-registers.txt", text)
        hregs, hctx = regs_ctx(text)
        print("handler RIP", hex(hregs["rip"]), "vectors", by_va.get(hregs["rip"]), flush=True)
        rsp_pa = paging.translate(hctx, mem, hregs["cr3"], hregs["rsp"])
        stack = gdb.execute(f"monitor xp /8gx {rsp_pa:#x}").out
        save(out, "handler-stack.txt", f"RSP={hregs['rsp']:#x} PA={rsp_pa:#x}\n{stack}")
        save(out, "handler-gdb-stack.txt", gdb.execute("x/8gx $rsp").out)
        gdb.execute("delete")
        gdb.execute("detach")
        m = lab.wait_for_serial(r"!!!! Find image[^\n]*\n", timeout=120)
        print("dump seen:", m.group(0).strip(), flush=True)
        time.sleep(1)
        shutil.copy(lab.serial_log, out / "serial.log")


def triple(out: Path) -> None:
    int_log = out / "qemu-int-triple.log"
    cfg = LabConfig(memory_mb=1024, extra_qemu_args=[
        "-action", "reboot=shutdown,shutdown=pause", "-d", "int,cpu_reset", "-D", str(int_log)])
    notes_file = out / "triple-notes.txt"
    notes_file.write_text("")

    def note(line: str) -> None:
        with open(notes_file, "a") as f:
            f.write(line.rstrip() + "\n")
        print(line, flush=True)

    def resets() -> int:
        return int_log.read_text(errors="replace").count("CPU Reset")

    with lab_session(cfg, paths.XEN_DEBIAN_SYMS) as (lab, gdb):
        run = gdb.execute(f"xen-run-to __efi64_mb2_start --json --timeout {TIMEOUT}",
                          timeout=TIMEOUT + 30).json()
        b = run["load_base"]
        from gdbext.core.xensyms import load_xen_syms
        syms = load_xen_syms(paths.XEN_DEBIAN_SYMS)
        # A page of zeros in RAM, checked through QEMU's xp: Xen's l2_bootmap is all
        # zeros in the ELF and nothing has run yet.
        cand = syms.pa("l2_bootmap", b)
        words = parse_xp_qwords(gdb.execute(f"monitor xp /512gx {cand:#x}").out)
        assert len(words) == 512 and not any(words), "candidate page is not zeros"
        note(f"zero page {cand:#x} (l2_bootmap at B={b:#x}); resets logged so far: {resets()}")
        # GDB types CR3 as flags and will not 'set $cr3 = N': the merge's writer builds
        # the value in the register's own type.
        gdb.execute("python __import__('gdbext.gdb_layer.context', fromlist=['CONTEXT']).CONTEXT"
                    f".set_register('cr3', {cand:#x})")
        t0 = time.monotonic()
        cont = gdb.execute("continue", timeout=120, check=False)
        note(f"continue -> after {time.monotonic() - t0:.2f} s: out={cont.out!r} "
             f"error={cont.error!r}")
        note("gdb: " + gdb.execute("info registers rip rsp cr3 cr2", check=False).out)
        note("monitor info status: " + gdb.execute("monitor info status").out)
        save(out, "triple-registers.txt", gdb.execute("monitor info registers").out)
        note(f"resets logged: {resets()}")
        r = gdb.execute("monitor system_reset", check=False)
        note(f"monitor system_reset: out={r.out!r} error={r.error!r}")
        time.sleep(3)
        note("monitor info status after system_reset: " + gdb.execute("monitor info status").out)
        note(f"resets logged after system_reset: {resets()}")
        note("RIP after system_reset (QEMU): "
             + parse_info_registers_rip(gdb.execute("monitor info registers").out))
        shutil.copy(lab.serial_log, out / "triple-serial.log")


def qmp(sock_path: Path, command: str, **arguments) -> dict:
    """One QMP command on the lab's QMP socket (a fresh connection each time)."""
    import socket
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(sock_path))
        f = s.makefile("rw")
        json.loads(f.readline())                              # greeting
        for cmd, args in (("qmp_capabilities", {}), (command, arguments)):
            f.write(json.dumps({"execute": cmd, "arguments": args}) + "\n")
            f.flush()
            while True:
                reply = json.loads(f.readline())
                if "return" in reply or "error" in reply:
                    break
        return reply


def triple_qmp(out: Path) -> None:
    """As ``triple``, with a QMP socket: after the pause, QMP set-action reboot=reset
    lets 'monitor system_reset' (xen-run-to's reset) boot again; then back to
    reboot=shutdown, a second triple fault is caught as the first."""
    int_log = out / "qemu-int-triple-qmp.log"
    sock = Path("/tmp/i11-cap/qmp.sock")
    cfg = LabConfig(memory_mb=1024, extra_qemu_args=[
        "-action", "reboot=shutdown,shutdown=pause", "-d", "int,cpu_reset", "-D", str(int_log),
        "-qmp", f"unix:{sock},server=on,wait=off"])
    notes_file = out / "triple-qmp-notes.txt"
    notes_file.write_text("")

    def note(line: str) -> None:
        with open(notes_file, "a") as f:
            f.write(line.rstrip() + "\n")
        print(line, flush=True)

    from gdbext.core.xensyms import load_xen_syms
    syms = load_xen_syms(paths.XEN_DEBIAN_SYMS)
    with lab_session(cfg, paths.XEN_DEBIAN_SYMS) as (lab, gdb):
        for attempt in (1, 2):
            run = gdb.execute(f"xen-run-to __efi64_mb2_start --json --timeout {TIMEOUT}",
                              timeout=TIMEOUT + 30, check=False)
            note(f"[{attempt}] xen-run-to: error={run.error!r} out={run.out[-300:]!r}")
            b = run.json()["load_base"]
            cand = syms.pa("l2_bootmap", b)
            words = parse_xp_qwords(gdb.execute(f"monitor xp /512gx {cand:#x}").out)
            assert len(words) == 512 and not any(words), "candidate page is not zeros"
            gdb.execute("python __import__('gdbext.gdb_layer.context', fromlist=['CONTEXT']).CONTEXT"
                        f".set_register('cr3', {cand:#x})")
            t0 = time.monotonic()
            cont = gdb.execute("continue", timeout=120, check=False)
            note(f"[{attempt}] continue returned after {time.monotonic() - t0:.2f} s")
            note(f"[{attempt}] status: " + gdb.execute("monitor info status").out.strip())
            note(f"[{attempt}] set-action reboot=reset: {qmp(sock, 'set-action', reboot='reset')}")
            r = gdb.execute("monitor system_reset", check=False)
            note(f"[{attempt}] monitor system_reset: error={r.error!r}")
            time.sleep(1)
            note(f"[{attempt}] status after reset: " + gdb.execute("monitor info status").out.strip())
            note(f"[{attempt}] set-action reboot=shutdown: "
                 f"{qmp(sock, 'set-action', reboot='shutdown', shutdown='pause')}")
        gdb_log = (lab.workdir / "gdb.log").read_text()
        note(f"SIGQUIT stops seen by GDB: {gdb_log.count('Program received signal SIGQUIT')}")
        note(f"triple faults in -d int log: {int_log.read_text(errors='replace').count('Triple fault')}")


def parse_info_registers_rip(text: str) -> str:
    regs = parse_info_registers(text)
    return hex(regs.get("rip", regs.get("eip", -1)))


def dump_phys(gdb, path: Path, start: int, end: int) -> None:
    """[start, end) of guest physical memory into a file, through GDB in the stub's
    physical mode (restored at once)."""
    gdb.execute("maintenance packet Qqemu.PhyMemMode:1")
    try:
        gdb.execute(f"dump binary memory {path} {start:#x} {end:#x}", timeout=300)
    finally:
        gdb.execute("maintenance packet Qqemu.PhyMemMode:0")


def printerr(out: Path) -> None:
    """Xen's PrintErrMesg called from GDB at its load address once efi_init has set
    StdOut/StdErr: its ErrCodeToStr[] holds linked VAs, which the firmware's
    OutputString dereferences."""
    from gdbext.core.xensyms import load_xen_syms
    syms = load_xen_syms(paths.XEN_DEBIAN_SYMS)
    int_log = out / "qemu-int-printerr.log"
    cfg = LabConfig(memory_mb=1024, extra_qemu_args=["-d", "int,cpu_reset", "-D", str(int_log)])
    with lab_session(cfg, paths.XEN_DEBIAN_SYMS) as (lab, gdb):
        run = gdb.execute(f"xen-run-to efi_console_set_mode --json --timeout {TIMEOUT}",
                          timeout=TIMEOUT + 30).json()
        save(out, "printerr-run.json", json.dumps(run, indent=1))
        b = run["load_base"]
        text = gdb.execute("monitor info registers").out
        save(out, "printerr-entry-registers.txt", text)
        regs, ctx = regs_ctx(text)
        idt_base, idt_limit = parse_descriptor_tables(text)["idt"]
        mem = XpMemory(gdb)
        plan = faults.plan_handler_breakpoints(idt_base, idt_limit, regs["cr3"], ctx, mem)
        for site in plan.sites:
            gdb.execute(f"break *{site.handler_va:#x}")
        # EFI_BUFFER_TOO_SMALL (5) with the error bit: ErrCodeToStr[5] is non-NULL.
        err = (1 << 63) | 5
        empty = syms.pa("ErrCodeToStr.16", b)      # ErrCodeToStr[0] is 0: an empty CHAR16 string
        ret = regs["rip"]
        rsp = ((regs["rsp"] - 0x400) & ~0xF) - 8      # as after a call: RSP+8 16-aligned
        target = syms.pa("PrintErrMesg", b)
        setup = [f"set $rsp = {rsp:#x}", f"set *(unsigned long *){rsp:#x} = {ret:#x}",
                 f"set $rdi = {empty:#x}", f"set $rsi = {err:#x}", f"set $rip = {target:#x}"]
        for c in setup:
            gdb.execute(c)
        save(out, "printerr-setup.txt", "\n".join(setup) + "\n")
        t0 = time.monotonic()
        cont = gdb.execute("continue", timeout=120)
        save(out, "printerr-continue.txt", f"{cont.out}\n(after {time.monotonic() - t0:.2f} s)\n")
        text = gdb.execute("monitor info registers").out
        save(out, "printerr-handler-registers.txt", text)
        hregs, hctx = regs_ctx(text)
        rsp_pa = paging.translate(hctx, mem, hregs["cr3"], hregs["rsp"])
        stack = gdb.execute(f"monitor xp /8gx {rsp_pa:#x}").out
        save(out, "printerr-handler-stack.txt", f"RSP={hregs['rsp']:#x} PA={rsp_pa:#x}\n{stack}")
        frame = faults.read_exception_frame(14, hregs["rsp"], hregs["cr3"], hctx, mem)
        save(out, "printerr-frame.json", json.dumps(frame.as_dict(), indent=1))
        save(out, "printerr-insn.txt", gdb.execute(f"x/3i {frame.rip:#x}").out)
        lo = (frame.rip & ~0xFFFFF) - (8 << 20)
        dump_phys(gdb, Path("/tmp/i11-cap/printerr-window.bin"), lo, (frame.rip & ~0xFFF) + 0x100000)
        save(out, "printerr-window.txt", f"{lo:#x}\n")
        gdb.execute("delete")
        gdb.execute("detach")
        m = lab.wait_for_serial(r"!!!! Find image[^\n]*\n", timeout=120)
        print("dump seen:", m.group(0).strip(), flush=True)
        time.sleep(1)
        shutil.copy(lab.serial_log, out / "printerr-serial.log")


def rfc_image(out: Path) -> None:
    """The memory the firmware searched for the RFC crash's "Find image" line: from the
    IP it printed down to the ImageBase it printed (both read from the saved dump)."""
    import re
    dump = (out / "serial.log").read_text()
    m = re.search(r"Find image based on IP\(0x([0-9A-Fa-f]+)\).*ImageBase=([0-9A-Fa-f]+)", dump)
    ip, base = int(m.group(1), 16), int(m.group(2), 16)
    with lab_session(LabConfig(memory_mb=1024), paths.XEN_DEBIAN_SYMS) as (lab, gdb):
        gdb.execute(f"xen-run-to __efi64_mb2_start --json --timeout {TIMEOUT}", timeout=TIMEOUT + 30)
        lo = base & ~0xFFF
        dump_phys(gdb, Path("/tmp/i11-cap/rfc-window.bin"), lo, (ip & ~0xFFF) + 0x1000)
        save(out, "rfc-window.txt", f"{lo:#x}\n")


if __name__ == "__main__":
    which, outdir = sys.argv[1], Path(sys.argv[2])
    outdir.mkdir(parents=True, exist_ok=True)
    {"rfc": rfc, "triple": triple, "printerr": printerr, "rfc-image": rfc_image, "triple-qmp": triple_qmp}[which](outdir)
