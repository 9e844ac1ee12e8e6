"""Helpers the integration tests run *inside* GDB (imported there by path).

They batch many commands into one round trip; the oracle is still QEMU's own
monitor text, the subject is still our command's JSON.
"""

import json

import gdb


def compare_va2pa(vas):
    """For each VA: our xen-va2pa --json and QEMU's 'monitor gva2gpa'."""
    out = []
    for va in vas:
        ours = json.loads(gdb.execute(f"xen-va2pa {va:#x} --json", to_string=True).strip())
        qemu = gdb.execute(f"monitor gva2gpa {va:#x}", to_string=True)
        out.append({"va": va, "ours": ours["pa"], "fault": ours["fault"], "qemu": qemu})
    return json.dumps(out)
