"""Benchmark of xen-pic-check's default check: cold, symbols cached, result cached.

Each case runs in a fresh Python process (imports included, as a user's run pays
them) against a temporary cache directory, so "cold" really parses xen-syms with
pyelftools and decodes everything.  Prints one line per case and the verdict on the
2 s goal for the cold check.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from typing import List, Optional

from gdbext import paths

GOAL_S = 2.0

_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
from gdbext.core import piccheck
from gdbext.core.xensyms import load_xen_syms
syms = load_xen_syms(sys.argv[1])
t1 = time.perf_counter()
report = piccheck.check(syms, efi=sys.argv[2] or None)
t2 = time.perf_counter()
print(json.dumps({"load_s": t1 - t0, "check_s": t2 - t1, "total_s": t2 - t0,
                  "syms_cached": syms.loaded_from_cache, "result_cached": report.from_cache,
                  "functions": len(report.functions), "findings": len(report.findings),
                  "instructions": sum(f.instructions for f in report.functions)}))
"""


def _one(cache: str, xen_syms: str, efi: str) -> dict:
    env = dict(os.environ, GDBEXT_CACHE=cache)
    out = subprocess.run([sys.executable, "-c", _CHILD, xen_syms, efi], env=env,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.splitlines()[-1])


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="bench-pic", description=__doc__.splitlines()[0])
    p.add_argument("--xen-syms", default=str(paths.XEN_DEBIAN_SYMS))
    p.add_argument("--xen-efi", default="")
    p.add_argument("--runs", type=int, default=3, help="runs per case (the best is kept)")
    args = p.parse_args(argv)
    cases = []
    for label, keep_syms, keep_result in (("cold (nothing cached)", False, False),
                                          ("symbols cached, check cold", True, False),
                                          ("result cached", True, True)):
        best = None
        for _ in range(args.runs):
            with tempfile.TemporaryDirectory(prefix="bench-pic-") as cache:
                if keep_syms:
                    _one(cache, args.xen_syms, args.xen_efi)           # fills both caches
                    if not keep_result:
                        for f in os.listdir(os.path.join(cache, "syms")):
                            if f.startswith("pic-"):
                                os.unlink(os.path.join(cache, "syms", f))
                r = _one(cache, args.xen_syms, args.xen_efi)
            if best is None or r["total_s"] < best["total_s"]:
                best = r
        cases.append((label, best))
        print(f"{label:<28} total {best['total_s']:.3f} s (load {best['load_s']:.3f} s, check "
              f"{best['check_s']:.3f} s; syms cached {best['syms_cached']}, result cached "
              f"{best['result_cached']})")
    r = cases[0][1]
    print(f"default check: {r['functions']} functions, {r['instructions']} instructions, "
          f"{r['findings']} findings")
    ok = r["total_s"] < GOAL_S
    print(f"cold check {r['total_s']:.3f} s: {'under' if ok else 'OVER'} the {GOAL_S:.0f} s goal")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
