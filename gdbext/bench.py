"""scripts/bench-pt: how close xen-pt gets to the speed of the wire.

In one GDB session stopped at __efi64_mb2_start on a real boot, times
(a) reading every table page of CR3's tree once, the list gathered beforehand,
through the same connection, with no other work, and (b) a full ``xen-pt``;
prints both and b/a (goal: at most 1.3), and a warm single ``xen-va2pa``.
Medians over several repeats, each with the stop's cache dropped first.
"""

from __future__ import annotations

import argparse
import json
import sys

from .gdbdriver import lab_session
from .lab import LabConfig

ENTRY_TIMEOUT_S = 240


def figures_at_entry(memory_mb: int, module: str, function: str, repeats: int) -> dict:
    """Boot the lab to __efi64_mb2_start and call ``module.function(repeats)`` inside
    GDB; it returns its figures as a JSON string, which is returned parsed."""
    with lab_session(LabConfig(memory_mb=memory_mb)) as (_lab, gdb):
        gdb.execute(f"xen-run-to __efi64_mb2_start --timeout {ENTRY_TIMEOUT_S}",
                    timeout=ENTRY_TIMEOUT_S + 60)
        out = gdb.execute(f"python print(__import__({module!r}, fromlist=[{function!r}])"
                          f".{function}({repeats}))", timeout=600).out
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="scripts/bench-pt", description=__doc__)
    p.add_argument("-m", "--memory", type=int, default=1024, metavar="MB")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    r = figures_at_entry(args.memory, "gdbext.gdb_layer.bench", "run", args.repeats)
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


if __name__ == "__main__":
    sys.exit(main())
