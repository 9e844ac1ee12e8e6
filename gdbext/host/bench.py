"""The benchmarks, run from the host: each boots the lab, stops at __efi64_mb2_start and
times gdbext inside GDB (the in-GDB halves are ``gdb_layer/bench.py``); figures printed.

``scripts/bench-pt``: how close xen-pt gets to the speed of the wire. In one GDB
session, (a) reading every table page of CR3's tree once, the list gathered
beforehand, through the same connection, with no other work, and (b) a full
``xen-pt``; prints both and b/a (goal: at most 1.3), and a warm single ``xen-va2pa``.
Medians over several repeats, each with the stop's cache dropped first.

``scripts/bench-locate``: how long xen-locate's memory scan takes (default 4096 MiB,
the size the goal is set for): (a) ``xen-locate --scan`` as a user runs it (top-down,
stops at the image); (b) the full scan of every candidate base (what a miss costs),
and its cost per candidate; and checks that the scan's B equals the one from RIP
(goal: the full scan under 2 s on a 4 GiB guest).
"""

from __future__ import annotations

import argparse
import json
import sys

from .gdbdriver import lab_session
from .lab import LabConfig

ENTRY_TIMEOUT_S = 240
IN_GDB = "gdbext.gdb_layer.bench"


def figures_at_entry(memory_mb: int, module: str, function: str, repeats: int) -> dict:
    """Boot the lab to __efi64_mb2_start and call ``module.function(repeats)`` inside
    GDB; it returns its figures as a JSON string, which is returned parsed."""
    with lab_session(LabConfig(memory_mb=memory_mb)) as (_lab, gdb):
        gdb.execute(f"xen-run-to __efi64_mb2_start --timeout {ENTRY_TIMEOUT_S}",
                    timeout=ENTRY_TIMEOUT_S + 60)
        out = gdb.execute(f"python print(__import__({module!r}, fromlist=[{function!r}])"
                          f".{function}({repeats}))", timeout=600).out
    return json.loads(out.strip().splitlines()[-1])


def main_pt(argv=None) -> int:
    p = argparse.ArgumentParser(prog="scripts/bench-pt",
                                description="How close xen-pt gets to the speed of the wire.")
    p.add_argument("-m", "--memory", type=int, default=1024, metavar="MB")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    r = figures_at_entry(args.memory, IN_GDB, "pt_figures", args.repeats)
    if args.json:
        print(json.dumps(r))
        return 0
    print(f"table pages in CR3's tree:        {r['table_pages']}")
    print(f"(a) read every table page once:   {r['read_all_pages_s']:.3f} s "
          f"(min {r['read_all_pages_min_s']:.3f})")
    print(f"(b) xen-pt of the whole tree:     {r['xen_pt_s']:.3f} s (min {r['xen_pt_min_s']:.3f}),"
          f" {r['ranges']} ranges")
    print(f"b/a:                              {r['ratio']:.2f}  (goal <= 1.3)")
    print(f"xen-va2pa, warm cache:            {r['va2pa_warm_median_ms']:.2f} ms median, "
          f"{r['va2pa_warm_max_ms']:.2f} ms max (goal < 5 ms)")
    return 0


def main_locate(argv=None) -> int:
    p = argparse.ArgumentParser(prog="scripts/bench-locate",
                                description="How long xen-locate's memory scan takes.")
    p.add_argument("-m", "--memory", type=int, default=4096, metavar="MB")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    r = figures_at_entry(args.memory, IN_GDB, "locate_figures", args.repeats)
    r["memory_mb"] = args.memory
    if args.json:
        print(json.dumps(r))
        return 0
    ram = ", ".join(f"{lo:#x}-{hi:#x}" for lo, hi in r["ram"])
    print(f"guest RAM:                          {args.memory} MiB ({ram})")
    print(f"candidate bases (RELOCATABLE tag):  {r['candidates']}")
    print(f"load base: RIP {r['rip_base']:#x}, scan {r['scan_base']:#x}, "
          f"full scan {r['full_scan_base']:#x}")
    print(f"(a) xen-locate --scan:              {r['locate_scan_s'] * 1000:.1f} ms median "
          f"(max {r['locate_scan_max_s'] * 1000:.1f}), {r['candidates_read_to_find']} "
          "candidates read")
    print(f"(b) full scan of every candidate:   {r['full_scan_s'] * 1000:.1f} ms median "
          f"(max {r['full_scan_max_s'] * 1000:.1f}), {r['per_candidate_us']:.0f} us per "
          "candidate (goal: under 2 s)")
    return 0


MAINS = {"pt": main_pt, "locate": main_locate}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in MAINS:
        print(f"usage: python -m gdbext.host.bench {{{'|'.join(MAINS)}}} [options]",
              file=sys.stderr)
        return 2
    return MAINS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
