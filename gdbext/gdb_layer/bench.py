"""Benchmark run inside GDB by scripts/bench-pt (see gdbext/bench.py)."""

from __future__ import annotations

import json
import statistics
import time

import gdb

from ..core import paging
from ..core.memory import PageCache
from .backend import target
from .paging_cmds import cpu_context, read_control_registers


def run(repeats: int = 5, va2pa_calls: int = 200) -> str:
    t = target()
    regs = read_control_registers()
    ctx = cpu_context(regs)
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
