"""The checked blocks of docs/tutorial.md: parse them, run their commands on a real
boot, compare, and (``--update``) paste a fresh run's output back in.

Markers in the document (HTML comments: invisible once rendered):

    <!-- tutorial: load-base 0x3d600000 -->  B of the run the blocks come from
    <!-- tutorial: run COMMAND -->           the next ```text block is the start of
                                             COMMAND's output (GDB command, run in order)
    <!-- tutorial: more -->                  the next ```text block goes on with the
                                             previous command's output

The blocks of one command, put together, are its whole output. They are compared
line by line after collapsing runs of spaces (table columns widen with longer
numbers), and a hexadecimal number may differ only by the load base: doc - B_doc ==
run - B_run, with B_run read from Xen's own console line. ``SVG_DIR`` in a command
stands for a directory the run chooses.

    .venv/bin/python -m tests.integration.tutorial --update   # after a deliberate change
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "tutorial.md"
SVG_DIR = "/tmp/walkthrough"   # as the document shows it; a run substitutes its own

MARK = re.compile(r"^<!-- tutorial: (run|more|load-base)\s*(.*?)\s*-->\s*$")
FENCE = "```text"
FENCE_END = "```"
HEX = re.compile(r"0x[0-9a-f]+|\b[0-9a-f]{16}\b")
BOOT_TIMEOUT_S = 240
COMMAND_TIMEOUT_S = 600
CONSOLE_TIMEOUT_S = 120   # ends as soon as the line is there; generous for a loaded machine


@dataclass
class Block:
    first: int            # index of the block's first content line in the document
    lines: List[str]


@dataclass
class Run:
    command: str
    blocks: List[Block] = field(default_factory=list)

    def lines(self) -> List[str]:
        return [line for b in self.blocks for line in b.lines]


@dataclass
class Tutorial:
    text_lines: List[str]
    load_base: int
    runs: List[Run]


def parse(text: str) -> Tutorial:
    lines = text.split("\n")
    load_base: Optional[int] = None
    runs: List[Run] = []
    i = 0
    while i < len(lines):
        m = MARK.match(lines[i])
        i += 1
        if not m:
            continue
        kind, arg = m.groups()
        if kind == "load-base":
            load_base = int(arg, 16)
            continue
        if kind == "run":
            runs.append(Run(arg))
        elif not runs:
            raise ValueError(f"line {i}: 'more' before any 'run'")
        if i >= len(lines) or lines[i].strip() != FENCE:
            raise ValueError(f"line {i + 1}: a ```text block must follow the marker")
        start = i + 1
        end = start
        while end < len(lines) and lines[end].strip() != FENCE_END:
            end += 1
        if end == len(lines):
            raise ValueError(f"line {start}: unterminated ```text block")
        runs[-1].blocks.append(Block(start, lines[start:end]))
        i = end + 1
    if load_base is None:
        raise ValueError("no '<!-- tutorial: load-base 0x... -->' marker")
    if not runs:
        raise ValueError("no '<!-- tutorial: run ... -->' marker")
    return Tutorial(lines, load_base, runs)


def _squash(line: str) -> str:
    return " ".join(line.split())


def same_line(doc: str, run: str, b_doc: int, b_run: int) -> bool:
    doc, run = _squash(doc), _squash(run)
    if HEX.split(doc) != HEX.split(run):
        return False
    for d, r in zip(HEX.findall(doc), HEX.findall(run)):
        dv, rv = int(d, 16), int(r, 16)
        if dv != rv and dv - b_doc != rv - b_run:
            return False
    return True


def compare(doc_lines: Sequence[str], run_lines: Sequence[str], b_doc: int,
            b_run: int) -> Optional[str]:
    """None when they match, else where and how they differ (for the assertion)."""
    # Blank lines only separate paragraphs; the blocks are cut at them.
    doc_lines = [line for line in doc_lines if line.strip()]
    run_lines = [line.rstrip() for line in run_lines if line.strip()]
    for n, (d, r) in enumerate(zip(doc_lines, run_lines)):
        if not same_line(d, r, b_doc, b_run):
            return (f"line {n + 1} of the output differs (B_doc {b_doc:#x}, B_run {b_run:#x}):"
                    f"\n  document: {d}\n  this run: {r}")
    if len(doc_lines) != len(run_lines):
        extra = run_lines[len(doc_lines):len(doc_lines) + 3] or doc_lines[len(run_lines):][:3]
        return (f"the document shows {len(doc_lines)} lines, this run printed "
                f"{len(run_lines)}; first extra: {extra}")
    return None


def run_commands(commands: Sequence[str], svg_dir: Path) -> Tuple[Dict[str, str], int]:
    """Boot the lab, load xen-syms, run ``commands`` in order; then let Xen run on and
    read B from its console. Returns ({command: output}, B). QEMU and GDB are stopped."""
    from gdbext import paths
    from gdbext.host.gdbdriver import lab_session
    from gdbext.host.lab import XEN_LOAD_BASE_RE, LabConfig

    outputs: Dict[str, str] = {}
    with lab_session(LabConfig(memory_mb=1024), paths.XEN_DEBIAN_SYMS) as (lab, gdb):
        for command in commands:
            reply = gdb.execute(command.replace(SVG_DIR, str(svg_dir)),
                                timeout=COMMAND_TIMEOUT_S)
            outputs[command] = reply.out.replace(str(svg_dir), SVG_DIR)
        gdb.close()   # detaches: Xen runs on and prints its load base
        m = lab.wait_for_serial(XEN_LOAD_BASE_RE, timeout=CONSOLE_TIMEOUT_S)
        return outputs, int(m.group(1), 16)


def update(tutorial: Tutorial, outputs: Dict[str, str], load_base: int) -> str:
    """The document with each command's blocks replaced by this run's output, split
    where the old blocks began (each block's first line is looked up in the output)."""
    lines = list(tutorial.text_lines)
    replacements = []
    for run in tutorial.runs:
        out = [line.rstrip() for line in outputs[run.command].split("\n")]
        while out and not out[-1]:
            out.pop()
        cuts = [0]
        for block in run.blocks[1:]:
            head = block.lines[0] if block.lines else ""
            at = next((k for k in range(cuts[-1] + 1, len(out))
                       if same_line(head, out[k], tutorial.load_base, load_base)), None)
            if at is None:
                raise ValueError(f"{run.command}: no line like {head!r} in the new output")
            cuts.append(at)
        cuts.append(len(out))
        for block, a, b in zip(run.blocks, cuts, cuts[1:]):
            new = out[a:b]
            while new and not new[0]:
                new = new[1:]
            while new and not new[-1]:
                new = new[:-1]
            replacements.append((block.first, len(block.lines), new))
    for first, count, new in sorted(replacements, reverse=True):
        lines[first:first + count] = new
    text = "\n".join(lines)
    return re.sub(r"<!-- tutorial: load-base 0x[0-9a-f]+ -->",
                  f"<!-- tutorial: load-base {load_base:#x} -->", text)


def main(argv: Sequence[str]) -> int:
    import tempfile

    if argv != ["--update"]:
        print(__doc__)
        return 2
    tutorial = parse(DOC.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        outputs, load_base = run_commands([r.command for r in tutorial.runs], Path(tmp))
    DOC.write_text(update(tutorial, outputs, load_base))
    print(f"updated {DOC} from a run at B = {load_base:#x}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
