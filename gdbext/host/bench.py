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

``scripts/bench-catch``: what the fault-catching breakpoints cost on a healthy boot
(``xen-mb2-break --batch`` from the entry to __start_xen, catching on and off, in
alternating boots; goal: under 3 % slower).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

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


def catch_run(memory_mb: int, catching: bool) -> dict:
    """One boot from QEMU's first instruction: xen-run-to __efi64_mb2_start (catching
    plants nothing before the entry: no 64-bit IDT yet), then ``xen-mb2-break --batch``
    to its last stop (__start_xen) with fault catching on or off; both timed from the
    host."""
    with lab_session(LabConfig(memory_mb=memory_mb)) as (_lab, gdb):
        if not catching:
            gdb.execute("set xen-catch-faults off")
        started = time.monotonic()
        gdb.execute(f"xen-run-to __efi64_mb2_start --timeout {ENTRY_TIMEOUT_S}",
                    timeout=ENTRY_TIMEOUT_S + 60)
        to_entry = time.monotonic() - started
        note = gdb.execute("xen-fault --json").json().get("note")
        session_start = time.monotonic()
        result = gdb.execute(f"xen-mb2-break --batch --json --timeout {ENTRY_TIMEOUT_S}",
                             timeout=ENTRY_TIMEOUT_S * 4, check=False).json()
        session = time.monotonic() - session_start
    if result.get("crash") or not result.get("complete"):
        raise SystemExit(f"bench-catch: the session did not complete (catching {catching}): "
                         f"{result.get('error')}; reached {result.get('reached')}")
    return {"session_s": session, "boot_s": to_entry + session,
            "reached": result["reached"][-1], "at_entry": note}


def _row(name: str, on: list, off: list) -> str:
    ratios = [a / b for a, b in zip(on, off)]
    med = statistics.median(ratios)
    return (f"  {name:<32} on {statistics.median(on):6.3f} s, off {statistics.median(off):6.3f} s"
            f" (medians); on/off {med:.3f} median of pairs ({(med - 1) * 100:+.1f} %), "
            f"added {statistics.median([a - b for a, b in zip(on, off)]) * 1000:+.0f} ms")


def main_catch(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="scripts/bench-catch",
        description="What the fault-catching breakpoints cost on a healthy boot, in "
        "alternating boots (pairs), catching on and off: the boot to __start_xen (QEMU's "
        "first instruction to the session's last stop) and the part of it where the "
        "breakpoints are planted (xen-mb2-break --batch from __efi64_mb2_start); goal: "
        "the boot under 3 %% slower.")
    p.add_argument("-m", "--memory", type=int, default=1024, metavar="MB")
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    runs = {True: [], False: []}
    for _ in range(args.pairs):
        for catching in (True, False):
            runs[catching].append(catch_run(args.memory, catching))
    r = {"pairs": args.pairs, "planted_at_entry": runs[True][-1]["at_entry"],
         "last_stop": runs[True][-1]["reached"]}
    for key in ("boot_s", "session_s"):
        r[key] = {"on": [x[key] for x in runs[True]], "off": [x[key] for x in runs[False]]}
    if args.json:
        print(json.dumps(r))
        return 0
    print(f"at the entry: {r['planted_at_entry']}")
    print(f"{args.pairs} pairs of boots, catching on / off:")
    print(_row(f"boot to {r['last_stop']}:", r["boot_s"]["on"], r["boot_s"]["off"]))
    print(_row("entry to it (breakpoints in):", r["session_s"]["on"], r["session_s"]["off"]))
    print("  goal: the boot under +3 %")
    return 0


MAINS = {"pt": main_pt, "locate": main_locate, "catch": main_catch}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in MAINS:
        print(f"usage: python -m gdbext.host.bench {{{'|'.join(MAINS)}}} [options]",
              file=sys.stderr)
        return 2
    return MAINS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
