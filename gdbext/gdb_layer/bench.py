"""The in-GDB halves of the benchmarks (host/bench.py boots the lab and calls these):
``pt_figures`` for scripts/bench-pt, ``locate_figures`` for scripts/bench-locate.
Each returns its figures as one JSON string."""

from __future__ import annotations

import json
import statistics
import time

import gdb

from ..core import paging
from ..core.memory import PageCache
from .context import CONTEXT


def pt_figures(repeats: int = 5, va2pa_calls: int = 200) -> str:
    t = CONTEXT.target
    regs = CONTEXT.read_control_registers()
    ctx = CONTEXT.cpu_context(regs)
    root = ctx.root_from_cr3(regs["cr3"])
    t.memory_map()  # once per connection, not part of either measurement
    with t.phys_mode():
        pages = paging.table_pages(ctx, PageCache(t), root)   # gathered beforehand
    reads, dumps = [], []
    for _ in range(repeats):
        t.invalidate()
        with t.phys_mode():
            start = time.perf_counter()
            for pa, _level in pages:
                t._read_phymem(pa, 4096)
            reads.append(time.perf_counter() - start)
        t.invalidate()
        start = time.perf_counter()
        out = gdb.execute("xen-pt --json", to_string=True)
        dumps.append(time.perf_counter() - start)
    ranges = len(json.loads(out)["ranges"])
    gdb.execute("xen-va2pa $pc --json", to_string=True)  # warm the stop's cache
    singles = []
    for _ in range(va2pa_calls):
        start = time.perf_counter()
        gdb.execute("xen-va2pa $pc --json", to_string=True)
        singles.append(time.perf_counter() - start)
    a = statistics.median(reads)
    b = statistics.median(dumps)
    return json.dumps({
        "table_pages": len(pages), "ranges": ranges, "repeats": repeats,
        "read_all_pages_s": a, "xen_pt_s": b, "ratio": b / a,
        "read_all_pages_min_s": min(reads), "xen_pt_min_s": min(dumps),
        "va2pa_warm_median_ms": statistics.median(singles) * 1000,
        "va2pa_warm_max_ms": max(singles) * 1000,
    })


def locate_figures(repeats: int) -> str:
    """Runs inside GDB (stopped at the entry, B known from RIP): the figures as JSON."""
    rip_base = CONTEXT.locate()["load_base"]
    located, full = [], []
    res = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        found = CONTEXT.locate(scan_only=True)
        located.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        res = CONTEXT.locate_scan(stop_at_first=False)
        full.append(time.perf_counter() - t0)
    full_s = statistics.median(full)
    return json.dumps({
        "rip_base": rip_base, "scan_base": found["load_base"], "full_scan_base": res.load_base,
        "candidates": res.candidates, "candidates_read_to_find": found["candidates_read"],
        "locate_scan_s": statistics.median(located), "locate_scan_max_s": max(located),
        "full_scan_s": full_s, "full_scan_max_s": max(full),
        "per_candidate_us": full_s / max(res.candidates, 1) * 1e6,
        "ram": CONTEXT.target.main_ram(),
    })
