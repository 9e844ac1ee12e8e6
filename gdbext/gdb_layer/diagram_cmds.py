"""xen-diagram: draw the page-table tree from an L4 as SVG and/or DOT.

The drawing is ``gdbext.core.diagram``; this module only gathers what it
needs from the target (registers, memory, Xen's symbols and load base) and
the predicted merge from ``gdbext.core.merge_predict``.  Other commands (xen-pt
--svg, the walkthrough) call ``write_diagram``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import gdb

from ..core import bootstops, diagram, merge_predict, render
from ..core.errors import GdbextError
from ..core.xenimage import LoadedXen
from . import xen_cmds
from .backend import target
from .command import CommandParser, XenCommand, add_json_option, use_color
from .paging_cmds import add_root_options, situation


@dataclass
class DiagramResult:
    models: List[diagram.TreeModel]
    files: List[str] = field(default_factory=list)   # paths written, SVG first
    note: Optional[str] = None                       # why Xen's objects are not named

    def as_dict(self) -> dict:
        return {"files": self.files, "note": self.note,
                "models": [m.as_dict() for m in self.models]}


class _RootArgs:
    """The two options ``situation()`` reads, for callers that are not a command."""

    def __init__(self, root: str, mode: Optional[str]):
        self.root = root
        self.mode = mode


def loaded_xen(required: bool) -> Tuple[Optional[LoadedXen], Optional[str]]:
    """Xen's image at its load base (xen_cmds), and why not when it is unknown.

    Optional for a plain diagram (without it nothing is named or judged; the note
    says why); ``required`` (one-line GdbextError) for the predicted merges."""
    if required:
        return xen_cmds.require_loaded(), None
    return xen_cmds.loaded_or_note()


def _where(xen: Optional[LoadedXen]) -> Tuple[Optional[str], str]:
    """Where in Xen's boot the target is stopped (bootstops' name, if known), and what
    a table outside Xen's image is: the firmware's until Xen runs at its linked
    address, Xen's own allocations from then on."""
    if xen is None:
        return None, diagram.OWNER_FIRMWARE
    rip = target().read_register("rip")
    linked = xen.syms.in_image(rip)
    where = bootstops.where_in_boot(xen.syms, xen.load_base, rip)
    return where, diagram.OWNER_OUTSIDE if linked else diagram.OWNER_FIRMWARE


def _predicted(sit, cache, xen: LoadedXen, relocate: bool) -> diagram.TreeModel:
    pred = merge_predict.predict_merge(xen.syms, cache, xen.load_base, sit.root,
                                       relocate=relocate)
    title = ("predicted merge, pointers relocated (+B)" if relocate
             else "predicted merge (the RFC as posted)") + f", M in {pred.table_source}"
    return diagram.build_model(sit.ctx, pred.mem, pred.root, xen, title,
                               judge_as=diagram.IDLE_L4)


def build_models(root: str = "cr3", mode: Optional[str] = None, predict: bool = False,
                 assume_relocated: bool = False, compare: bool = False
                 ) -> Tuple[List[diagram.TreeModel], Optional[str]]:
    """The trees to draw, read from the stopped target (no file written), and a note
    when Xen's objects cannot be named."""
    t = target()
    with t.phys_mode():
        sit = situation(_RootArgs(root, mode))
        xen, note = loaded_xen(required=predict or compare)
        where, outside = _where(xen)
        at = "" if not where else f" {where}" if where.startswith("after ") else f" at {where}"
        src = "CR3" if sit.root_source == "cr3" else f"root {sit.root_source}"
        models: List[diagram.TreeModel] = []
        if compare or not predict:
            title = (f"firmware L4 ({src}{at})" if compare else f"L4 from {src}{at}")
            models.append(diagram.build_model(sit.ctx, t.cache, sit.root, xen, title,
                                              diagram.default_judge_as(xen, sit.root),
                                              outside))
        if compare:
            models.append(_predicted(sit, t.cache, xen, relocate=False))
            models.append(_predicted(sit, t.cache, xen, relocate=True))
        elif predict:
            models.append(_predicted(sit, t.cache, xen, relocate=assume_relocated))
    return models, note


def write_diagram(svg: Optional[str] = None, dot: Optional[str] = None, *, root: str = "cr3",
                  mode: Optional[str] = None, predict: bool = False,
                  assume_relocated: bool = False, compare: bool = False,
                  title: str = "") -> DiagramResult:
    """Draw the tree(s) at this stop and write ``svg`` and/or ``dot``.

    ``root``: 'cr3' or a GDB expression for an L4's PA (as xen-pt --root);
    ``mode``: a paging mode name to read it in (default: the CPU's);
    ``predict``: the RFC's merged L4 predicted from this stop's CR3 (at
    __efi64_mb2_start) instead, its upper-half pointers relocated when
    ``assume_relocated``; ``compare``: the firmware's tree, the plain merge and
    the relocated merge side by side.  ``title`` heads the picture.
    Returns the models and the paths written; raises GdbextError (one line).
    """
    models, note = build_models(root, mode, predict, assume_relocated, compare)
    return DiagramResult(models, diagram.write_files(models, svg, dot, title), note)


class DiagramCommand(XenCommand):
    name = "diagram"
    summary = "Draw the page-table tree from an L4 as a picture (SVG and/or Graphviz DOT)."

    def make_parser(self) -> CommandParser:
        p = CommandParser(
            description=self.summary + " It shows each present L4 slot (the 512 GiB of "
            "virtual addresses it covers, its entry and flags), the L3 table it points to "
            "(named when it is a Xen object, in Xen's image or outside it), the L3 entries "
            "with the L2 tables they point to summarised, and for Xen's tables whether each "
            "pointer is relocated, unrelocated, relocated twice or foreign. Without --svg "
            "or --dot the same content is printed as text.",
            epilog="Examples: xen-diagram --svg /tmp/l4.svg; xen-diagram --compare --svg "
                   "/tmp/merge.svg --dot /tmp/merge.dot (at __efi64_mb2_start); "
                   "rsvg-convert -o l4.png l4.svg makes a PNG, dot -Tpng the same from DOT")
        add_root_options(p)
        p.add_argument("--svg", metavar="FILE", help="write the picture as SVG to FILE")
        p.add_argument("--dot", metavar="FILE", help="write it as Graphviz DOT to FILE")
        p.add_argument("--predict", action="store_true",
                       help="draw the RFC's merged L4 predicted from this stop's CR3 (the "
                            "firmware's, at __efi64_mb2_start) instead of ROOT")
        p.add_argument("--assume-relocated", action="store_true",
                       help="with --predict: the merge with its upper-half pointers relocated "
                            "(+B), as the review asked")
        p.add_argument("--compare", action="store_true",
                       help="side by side: the firmware's tree (ROOT), the plain predicted "
                            "merge and the relocated one")
        p.add_argument("--title", default="", help="a heading for the picture")
        add_json_option(p)
        return p

    def run(self, args, from_tty):
        if args.assume_relocated and not args.predict:
            raise GdbextError("xen-diagram: --assume-relocated goes with --predict "
                              "(--compare draws both merges)")
        result = write_diagram(args.svg, args.dot, root=args.root, mode=args.mode,
                               predict=args.predict, assume_relocated=args.assume_relocated,
                               compare=args.compare, title=args.title)
        if args.json:
            gdb.write(render.to_json(result.as_dict()) + "\n")
            return
        if result.files:
            lines = [f"wrote {path}" for path in result.files]
            lines.append(", ".join(f"{m.title}: {len(m.slots)} present L4 slots"
                                   for m in result.models))
        else:
            lines = [diagram.to_text(result.models),
                     "(give --svg FILE and/or --dot FILE for a picture)"]
        if result.note:
            lines.append(f"({result.note})")
        text = "\n".join(lines)
        if use_color(from_tty):
            text = render.colorize(text)
        gdb.write(text + "\n")


def install() -> None:
    DiagramCommand()
