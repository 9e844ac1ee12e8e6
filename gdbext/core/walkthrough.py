"""The teaching walkthrough of Xen's multiboot2+EFI boot: the lessons and the walks.

For someone who knows C but not x86 paging. At each stop of the
``__efi64_mb2_start`` session (``bootstops``) there is a short lesson (what the
CPU is doing, what the tables hold) and the one walk that matters, rendered
like ``xen-va2pa`` with every table named: Xen's boot tables by name, firmware
tables as "firmware L3 table", and a pointer that holds a link-time address as
what it is. At the entry, the RFC's raw copy and the relocated copy are
compared side by side. Never imports ``gdb``: the GDB layer reads registers
and memory and hands them in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

from tabulate import tabulate

from . import bootstops as bs
from . import merge_predict, paging, render, x86
from .xenimage import LoadedXen

CALL_TARGET = merge_predict.CALL_TARGET  # the walk that matters at the entry
# Between stops at a terminal (Enter goes on).
PROMPT = "-- Enter: next stop; q: end the walkthrough here -- "
WRAP = 88  # lesson paragraphs are wrapped to this width

# What the walk at a stop translates, and through which table.
WALK_RIP = "rip"              # RIP through CR3 (the code the CPU runs)
WALK_TARGET_CR3 = "target"    # efi_multiboot2's linked VA through CR3
WALK_CALL = "call"            # the call's target as this build calls it, through CR3
WALK_TARGET_IDLE = "idle"     # efi_multiboot2's linked VA through idle_pg_table in memory


@dataclass(frozen=True)
class Lesson:
    stop: str
    title: str
    text: str           # a few sentences, for a C programmer new to paging
    walk: str           # one of WALK_*
    walk_title: str


LESSONS: Dict[str, Lesson] = {lesson.stop: lesson for lesson in (
    Lesson(bs.ENTRY, "GRUB has jumped into Xen",
           "The CPU is already in 64-bit long mode, because UEFI firmware runs in long mode, "
           "so every address is translated through the firmware's page tables. CR3 holds the "
           "physical address of the top table, the L4: 512 entries of 8 bytes, each covering "
           "512 GiB of virtual addresses. An L4 entry points to an L3 table (1 GiB per entry), "
           "an L3 entry to an L2 table (2 MiB per entry), an L2 entry to an L1 table (4 KiB "
           "pages); an entry with the PS bit set stops early and maps a large page. The "
           "firmware maps memory one to one (an identity map: virtual address == physical "
           "address), so Xen runs where GRUB put it, at its load address B + offset. Xen was "
           "linked to run at 0xffff82d040000000 + offset (its linked address), which nothing "
           "maps yet, and every pointer stored in Xen's data holds such a linked address.",
           WALK_RIP, "The walk of RIP: identity-mapped by the firmware"),
    Lesson(bs.MERGE, "The RFC's merged L4 is in CR3",
           "This build has the RFC's merge: CR3 was just switched to a new L4, M. Its lower "
           "half (slots 0-255) is a copy of the firmware's, so the code running now (at its "
           "load address), the stack and the firmware's data stay mapped. Its upper half "
           "(slots 256-511) is a copy of idle_pg_table's, meant to map Xen at its linked "
           "address. The lower tables are shared with the firmware: only the L4 page is new.",
           WALK_TARGET_CR3, "The walk of efi_multiboot2's linked address through M"),
    Lesson(bs.CALL, "About to call efi_multiboot2",
           "The next instruction calls efi_multiboot2, the C function that talks to the UEFI "
           "firmware (memory map, command line, video mode). A build without the RFC uses a "
           "relative call: the target is computed from RIP, so efi_multiboot2 runs at its load "
           "address through the firmware's identity map. The RFC replaces it with "
           "'call *%rax' on the linked address, which only works if CR3's table maps that "
           "address to Xen's bytes.",
           WALK_CALL, "The walk of the call's target, as this build calls it"),
    Lesson(bs.EFI_MB2, "Inside efi_multiboot2",
           "efi_multiboot2 is compiled C. Most of its data accesses are RIP-relative, which "
           "works at any load address, but a pointer stored in initialised data (a table of "
           "function pointers, a string's address) holds a linked address, and no table maps "
           "linked addresses yet. That mismatch is what the RFC tries to remove by running "
           "this function at its linked address.",
           WALK_RIP, "The walk of RIP"),
    Lesson(bs.EFI_RETURN, "Back from efi_multiboot2",
           "The firmware ran in between and may have changed its own page tables. A merged L4 "
           "made before the call would miss any L4 entry the firmware added later (only the "
           "L4 page is private to the copy; the lower tables are shared), which is why the "
           "lower half is compared again here.",
           WALK_RIP, "The walk of RIP"),
    Lesson(bs.SWITCH, "Leaving 64-bit mode",
           "x86_32_switch computes B with 'lea __image_base__(%rip), %esi' (RIP-relative, so "
           "it gives the load address), loads a 32-bit code segment and turns paging off "
           "(clears CR0.PG). From then on, until Xen turns paging on again with its own "
           "tables, every address is physical.",
           WALK_RIP, "The walk of RIP, the last one through the firmware's tables"),
    Lesson(bs.TRAMPOLINE_SETUP, "32-bit, paging off: Xen fixes up its own tables",
           "Paging is off (CR0.PG = 0): the CPU uses no table, every address is physical. "
           "%esi holds B. Xen's page tables sit in memory exactly as the linker wrote them: "
           "every pointer assumes B = 0, so idle_pg_table's slot 261 says 'l3_xenmap is at "
           "physical address offset(l3_xenmap)', which is firmware memory. This is the state "
           "the RFC's raw copy takes its upper half from, and why that copy cannot work.",
           WALK_TARGET_IDLE, "The walk of efi_multiboot2's linked address through "
                             "idle_pg_table as it is in memory now"),
    Lesson(bs.TABLES_RELOCATED, "Every pointer relocated once",
           "trampoline_setup has added B to every present entry of Xen's page tables "
           "(__page_tables_start to __page_tables_end): the fix-up the review asked the RFC to "
           "make before copying. Slot 261 now points at l3_xenmap where it really is, but the "
           "l2_xenmap entries that map Xen's image are still to be written.",
           WALK_TARGET_IDLE, "The same walk through idle_pg_table, now relocated"),
    Lesson(bs.L2_XENMAP_FILLED, "l2_xenmap maps Xen's image",
           "l2_xenmap's entries now map Xen's image with 2 MiB pages: entry i = (B + i * 2 "
           "MiB) | PSE+RW+P. The walk of efi_multiboot2's linked address through "
           "idle_pg_table reaches its bytes: the table is ready to be used.",
           WALK_TARGET_IDLE, "The same walk, complete"),
    Lesson(bs.TRAMPOLINE_CR3, "The trampoline loads Xen's CR3",
           "The trampoline, a piece of Xen copied below 1 MiB (at trampoline_phys), loaded "
           "CR3 = B + offset(idle_pg_table). Paging is still off; the next instructions enable "
           "PAE and long mode, set CR0.PG and jump to __high_start at its linked address. "
           "Before that, trampoline_setup also filled the identity map (L4 slot 0 -> "
           "l3_bootmap -> l2_bootmap) so that this low code stays mapped at the moment paging "
           "comes on. The walk is made the way the CPU will make it once paging is on.",
           WALK_TARGET_CR3, "The walk of efi_multiboot2's linked address through the new CR3"),
    Lesson(bs.HIGH_START, "Xen runs at its linked address",
           "RIP is a linked address now (0xffff82d0...) and CR3 is idle_pg_table. The walk of "
           "RIP goes L4 slot 261 -> l3_xenmap -> l2_xenmap -> a 2 MiB page inside Xen's image "
           "at B + offset. Xen keeps the identity map (slot 0 -> l3_bootmap) for a while, for "
           "the trampoline and the code that is still low.",
           WALK_RIP, "The walk of RIP through Xen's own tables"),
    Lesson(bs.START_XEN, "Xen's C entry point",
           "__start_xen is ordinary C running at its linked address; ordinary symbolic "
           "breakpoints work from here on. Early in it Xen prints 'Xen image load base "
           "address' with B on its console, then builds its full page tables (the directmap, "
           "and the linear slot 258 that points back at the L4 itself).",
           WALK_RIP, "The walk of RIP"),
)}


# The last stop, on request (xen-walkthrough --crash): the RFC's own crash, made live on a
# build without the patch by xen-l4merge-apply --call-linked (the raw merge) and caught
# at the firmware's #PF handler (gdb_layer/fault_catch.py).
CRASH_STOP = "the RFC's crash"
CRASH_LESSON = Lesson(
    CRASH_STOP, "The RFC's crash, live",
    "The RFC's review begins with 'Tested, it crashes.' Here is that crash. The machine "
    "boots again to the entry, and xen-l4merge-apply --call-linked does what the patch "
    "does: it writes the merged L4 M as a raw copy (the upper half taken from "
    "idle_pg_table as it is in memory, link-time values), switches CR3 to M, runs to the "
    "call of efi_multiboot2 and makes it at the linked address, as 'call *%rax' would. "
    "Then the guest runs: the very first instruction fetch at the linked address walks "
    "through M, and gdbext catches what the CPU does next.",
    WALK_TARGET_CR3, "")
CRASH_AFTER = (
    "The CPU could not fetch efi_multiboot2's first instruction: a #PF with error code "
    "0x10 (an instruction fetch from a page that is not present), CR2 = the linked "
    "address itself. The walk shows why: M's slot for Xen's linked addresses was copied "
    "from idle_pg_table before trampoline_setup had relocated it, so it still points at "
    "the link-time address of l3_xenmap, in the firmware's memory, where no table of Xen "
    "is. The firmware's own handler would print its dump on the serial console and spin; "
    "gdbext stopped at its first instruction instead. The fix the review asked for is to "
    "add B to those pointers first (xen-l4merge-apply --relocate --call-linked reaches "
    "efi_multiboot2's bytes). Everything the command wrote is put back now (--undo).")


def lesson(stop: str) -> Lesson:
    return LESSONS[stop]


def wrap(text: str, width: int = WRAP) -> str:
    import textwrap
    return "\n".join(textwrap.wrap(text, width))


# --- naming the tables of a walk ------------------------------------------------------

def link_time_table(loaded: LoadedXen, pa: int) -> Optional[str]:
    """The Xen boot table whose link-time address (B = 0) is ``pa``: an unrelocated pointer."""
    syms = loaded.syms
    for table, sym in syms.boot_tables():
        if syms.offset(sym.value) == pa:
            return table.name
    return None


def walk_namer(loaded: LoadedXen, w: paging.Walk, names: Optional[Dict[int, str]] = None):
    """A render.Namer for ``w``: the caller's names first (e.g. "M, the predicted merged
    L4"), then Xen's tables and symbols at B, then link-time addresses named as such,
    then the firmware's tables by level."""
    levels = {s.table_pa: s.level for s in w.steps}
    given = dict(names or {})

    def namer(pa: int) -> Optional[str]:
        if pa in given:
            return given[pa]
        xen = loaded.name_pa(pa)
        if xen is not None:
            return xen
        table = link_time_table(loaded, pa)
        if table is not None:
            return f"link-time address of {table}: not Xen's table, firmware memory"
        if pa in levels:
            return f"firmware L{levels[pa]} table"
        return None

    return namer


def walk_text(loaded: LoadedXen, w: paging.Walk, names: Optional[Dict[int, str]] = None,
              entry_note=None) -> str:
    """xen-va2pa's layout with every table named; ``entry_note(step)`` may add how a
    pointer read from a Xen table compares with its link value (the GDB layer passes
    xen-va2pa's own judgement)."""
    return render.walk_text(w, walk_namer(loaded, w, names), entry_note)


def walk_record(loaded: LoadedXen, w: paging.Walk, title: str,
                names: Optional[Dict[int, str]] = None, entry_note=None) -> Dict[str, object]:
    """The JSON form: xen-va2pa's walk_dict plus the name of each table and of the PA,
    and the note on each entry (see walk_text)."""
    namer = walk_namer(loaded, w, names)
    d = render.walk_dict(w)
    for level, step in zip(d["levels"], w.steps):
        level["table_name"] = namer(level["table"])
        level["note"] = entry_note(step) if entry_note is not None else None
    d["pa_name"] = namer(w.pa) if w.mapped else None
    d["title"] = title
    return d


# --- the predicted merge vs the relocated one ----------------------------------------

@dataclass
class MergeWalk:
    label: str
    root: int
    slot: int               # the L4 slot of the linked address
    entry: int              # M[slot]
    walk: paging.Walk
    bytes_match: Optional[bool]   # the bytes at the walk's PA equal the ELF's

    def as_dict(self, loaded: LoadedXen, title: str, entry_note=None) -> Dict[str, object]:
        return {"label": self.label, "root": self.root, "slot": self.slot, "entry": self.entry,
                "bytes_match": self.bytes_match,
                "walk": walk_record(loaded, self.walk, title, {self.root: self.label},
                                    entry_note)}


def merged_entry_verdict(loaded: LoadedXen, merged_root: int, step):
    """An entry of a merged L4 M judged as what it was copied from: the upper half
    against idle_pg_table's link values (the lower half is the firmware's: None)."""
    if step.table_pa != merged_root or step.index < 256 or not step.entry.present:
        return None
    return loaded.judge_entry("idle_pg_table", step.index, step.entry.raw)


def merge_walk(loaded: LoadedXen, ctx: paging.PagingContext, mem, root: int, va: int,
               label: str) -> MergeWalk:
    w = paging.walk(ctx, mem, root, va)
    slot = (va >> 39) & 511
    entry = w.steps[0].entry.raw if w.steps else 0
    match = None
    if w.mapped:
        try:
            size = 16
            match = mem.read_phys(w.pa, size) == loaded.syms.read_linked(va, size)
        except Exception:  # noqa: BLE001 - unreadable memory: no match
            match = False
    return MergeWalk(label, root, slot, entry, w, match)


RAW_LABEL = "M, the RFC's merged L4 (raw copy)"
RELOCATED_LABEL = "M, relocated first (the review)"


def comparison_table(loaded: LoadedXen, raw: MergeWalk, rel: MergeWalk) -> str:
    """Side by side: the slot's entry, where it points, where the walk ends, the bytes."""
    def points(m: MergeWalk) -> str:
        target = m.entry & x86.phys_addr_mask(x86.MAXPHYADDR_ARCH) & ~0xFFF
        name = walk_namer(loaded, m.walk)(target) or "?"
        return f"{target:#x} ({name.split(':')[0]})"

    def ends(m: MergeWalk) -> str:
        if m.walk.mapped:
            name = walk_namer(loaded, m.walk)(m.walk.pa)
            return f"PA {m.walk.pa:#x}" + (f" ({name})" if name else "")
        return f"fault at L{m.walk.fault_level}: {m.walk.fault}"

    def matches(m: MergeWalk) -> str:
        return {True: "yes", False: "NO", None: "nothing to compare"}[m.bytes_match]

    rows = [[f"M[{raw.slot}]", f"{raw.entry:#018x}", f"{rel.entry:#018x}"],
            ["points at", points(raw), points(rel)],
            ["the walk ends", ends(raw), ends(rel)],
            ["bytes == the ELF's", matches(raw), matches(rel)]]
    return tabulate(rows, headers=["", "raw copy (the RFC)", "relocated (the review)"],
                    tablefmt="simple", disable_numparse=True)


COMPARISON_TEXT = (
    "The RFC wants to call efi_multiboot2 at its linked address. It builds a new L4, M, "
    "from the firmware's lower half (the identity map Xen runs on now) and idle_pg_table's "
    "upper half (Xen's own mappings), fills l2_xenmap, switches CR3 to M and calls. But "
    "idle_pg_table's entries in memory are still link-time values, computed as if Xen were "
    "loaded at physical address 0. Copied raw, slot {slot} sends the CPU to the link-time "
    "address of l3_xenmap, in the firmware's memory; with B added to each pointer first "
    "(\"adjust the pointers\", the review), the walk lands on efi_multiboot2's own bytes. "
    "Both tables below are predictions: nothing is written to the guest.")


def load_base_line(loaded: LoadedXen) -> str:
    entry = loaded.syms.offset(bs.ENTRY)
    return (f"   Xen's load base B = {loaded.load_base:#x}: RIP - {entry:#x}, the offset of "
            f"{bs.ENTRY} (where GRUB put Xen)")


def stop_header(index: int, total: int, stop: str, rip: int, cr3: int, cr0: int,
                where: Optional[str]) -> str:
    paging_on = bool(cr0 & x86.CR0_PG)
    state = "paging on" if paging_on else "paging OFF (CR0.PG=0)"
    head = f"== Stop {index}/{total}: {stop} - {lesson(stop).title}"
    return (f"{head}\n   RIP {rip:#x}" + (f" ({where})" if where else "")
            + f", CR3 {cr3:#x}, {state}")
