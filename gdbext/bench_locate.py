"""scripts/bench-locate: how long xen-locate's memory scan takes on a real boot.

Boots the lab (default 4096 MiB, the size the goal is set for) to
__efi64_mb2_start, then in one GDB session times, medians over several repeats:
(a) ``xen-locate --scan`` as a user runs it (top-down, stops at the image);
(b) the full scan of every candidate base (what a miss costs: every 2 MiB-aligned
base the RELOCATABLE tag allows inside RAM), and its cost per candidate;
and checks that the scan's B equals the one from RIP. Prints the figures
(goal: the full scan under 2 s on a 4 GiB guest).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from .bench import figures_at_entry


def in_gdb(repeats: int) -> str:
    """Runs inside GDB (stopped at the entry, B known from RIP): the figures as JSON."""
    from .gdb_layer import xen_cmds

    rip_base = xen_cmds.locate()["load_base"]
    located, full = [], []
    res = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        found = xen_cmds.locate(scan_only=True)
        located.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        res = xen_cmds.locate_scan(stop_at_first=False)
        full.append(time.perf_counter() - t0)
    full_s = statistics.median(full)
    return json.dumps({
        "rip_base": rip_base, "scan_base": found["load_base"], "full_scan_base": res.load_base,
        "candidates": res.candidates, "candidates_read_to_find": found["candidates_read"],
        "locate_scan_s": statistics.median(located), "locate_scan_max_s": max(located),
        "full_scan_s": full_s, "full_scan_max_s": max(full),
        "per_candidate_us": full_s / max(res.candidates, 1) * 1e6,
        "ram": xen_cmds.target().main_ram(),
    })


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="scripts/bench-locate", description=__doc__)
    p.add_argument("-m", "--memory", type=int, default=4096, metavar="MB")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    r = figures_at_entry(args.memory, "gdbext.bench_locate", "in_gdb", args.repeats)
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


if __name__ == "__main__":
    sys.exit(main())
