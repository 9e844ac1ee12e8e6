"""Work on any table is bounded: a table whose entries all point back at itself.

Without bounds, n such entries in a 4-level root map n^4 ranges (n=32: 1,048,576
ranges, 2.2 s and 408 MiB); the enumeration must stop at its cap, say so, and keep
memory bounded, and --limit must stop it early.
"""

from __future__ import annotations

import time
import tracemalloc

from gdbext.core import paging
from gdbext.core.memory import SyntheticMemory
from gdbext.core.paging import MODE_4LEVEL, PagingContext
from tests.unit.paging_builders import PRW

N = 32
ROOT = 0x10_0000


def self_pointing(n: int = N) -> SyntheticMemory:
    mem = SyntheticMemory(1 << 30)
    mem.write(ROOT, b"".join((ROOT | PRW).to_bytes(8, "little") for _ in range(n)))
    return mem


def _measured(fn):
    tracemalloc.start()
    start = time.perf_counter()
    try:
        result = fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, time.perf_counter() - start, peak


def test_self_pointing_table_stops_at_the_cap_with_a_note_and_bounded_memory():
    ctx = PagingContext(MODE_4LEVEL)
    en, seconds, peak = _measured(lambda: paging.enumerate_ranges(ctx, self_pointing(), ROOT))
    # n^4 ranges exist; the cap stops well before.
    assert len(en.ranges) <= paging.MAX_WORK < N ** 4
    assert en.stopped is not None and f"stopped after {paging.MAX_WORK} ranges" in en.stopped
    assert "\n" not in en.stopped
    # Each range maps the root page itself (what every level-1 entry points to).
    assert en.ranges and all(r[2] == ROOT for r in en.ranges)
    assert len(en.notes) <= paging.MAX_NOTES
    assert peak < 48 << 20, f"peak {peak / 2**20:.1f} MiB"
    print(f"\ncap: {len(en.ranges)} ranges, {len(en.notes)} notes (+{en.notes_dropped} "
          f"counted), {seconds:.2f} s, peak {peak / 2**20:.1f} MiB")


def test_limit_stops_the_enumeration_early():
    ctx = PagingContext(MODE_4LEVEL)
    mem = self_pointing()
    en, seconds, peak = _measured(lambda: paging.enumerate_ranges(ctx, mem, ROOT, limit=5))
    assert len(en.ranges) == 5 and en.limited and en.stopped is None
    full = paging.enumerate_ranges(ctx, mem, ROOT)
    assert en.ranges == full.ranges[:5]
    # The enumeration stopped after the first top-level entry's subtree (N^3 ranges
    # carried up), not after the cap's worth of work.
    assert peak < 24 << 20
    print(f"\n--limit 5: {len(en.ranges)} ranges, {seconds:.3f} s, peak {peak / 2**20:.1f} MiB")


def test_a_small_cap_is_exact_and_notes_are_capped():
    ctx = PagingContext(MODE_4LEVEL)
    en = paging.enumerate_ranges(ctx, self_pointing(), ROOT, max_work=1000, max_notes=10)
    assert en.stopped.startswith("stopped after 1000 ranges")
    assert len(en.ranges) <= 1000
    assert len(en.notes) == 10 and en.notes_dropped > 0


def test_tree_rows_are_capped_with_a_last_line():
    ctx = PagingContext(MODE_4LEVEL)
    rows = paging.tree_rows(ctx, self_pointing(), ROOT, max_rows=7)
    assert len(rows) == 8 and rows[-1].startswith("... stopped after 7 lines")
