"""Pictures of the page-table tree at this stop, for every command that draws one.

``xen-diagram``, ``xen-pt --svg/--dot`` and the walkthrough's per-stop SVGs all
call ``write_diagram``: it gathers what the drawing needs from the target
(registers, memory, Xen's symbols and load base, the predicted merge) and hands
it to ``core.diagram``, which builds the model and writes SVG and DOT.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from ..core import bootstops, diagram, merge_predict
from ..core.xenimage import LoadedXen
from .context import RootChoice


@dataclass
class DiagramResult:
    models: List[diagram.TreeModel]
    files: List[str] = field(default_factory=list)   # paths written, SVG first
    note: Optional[str] = None                       # why Xen's objects are not named

    def as_dict(self) -> dict:
        return {"files": self.files, "note": self.note,
                "models": [m.as_dict() for m in self.models]}


def loaded_xen(ctx, required: bool) -> Tuple[Optional[LoadedXen], Optional[str]]:
    """Xen's image at its load base, and why not when it is unknown.

    Optional for a plain diagram (without it nothing is named or judged; the note
    says why); ``required`` (one-line GdbextError) for the predicted merges."""
    if required:
        return ctx.require_loaded(), None
    return ctx.loaded_or_note()


def _where(ctx, xen: Optional[LoadedXen]) -> Tuple[Optional[str], str]:
    """Where in Xen's boot the target is stopped (bootstops' name, if known), and what
    a table outside Xen's image is: the firmware's until Xen runs at its linked
    address, Xen's own allocations from then on."""
    if xen is None:
        return None, diagram.OWNER_FIRMWARE
    rip = ctx.target.read_register("rip")
    linked = xen.syms.in_image(rip)
    where = bootstops.where_in_boot(xen.syms, xen.load_base, rip)
    return where, diagram.OWNER_OUTSIDE if linked else diagram.OWNER_FIRMWARE


def _predicted(sit, cache, xen: LoadedXen, relocate: bool) -> diagram.TreeModel:
    pred = merge_predict.predict_merge(xen.syms, cache, xen.load_base, sit.root, relocate=relocate)
    title = ("predicted merge, pointers relocated (+B)" if relocate
             else "predicted merge (the RFC as posted)") + f", M in {pred.table_source}"
    return diagram.build_model(sit.ctx, pred.mem, pred.root, xen, title,
                               judge_as=diagram.IDLE_L4)


def build_models(ctx, root: str = "cr3", mode: Optional[str] = None, predict: bool = False,
                 assume_relocated: bool = False, compare: bool = False
                 ) -> Tuple[List[diagram.TreeModel], Optional[str]]:
    """The trees to draw, read from the stopped target (no file written), and a note
    when Xen's objects cannot be named."""
    t = ctx.target
    with t.phys_mode():
        sit = ctx.situation(RootChoice(root, mode))
        xen, note = loaded_xen(ctx, required=predict or compare)
        where, outside = _where(ctx, xen)
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


def write_diagram(ctx, svg: Optional[str] = None, dot: Optional[str] = None, *,
                  root: str = "cr3",
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
    models, note = build_models(ctx, root, mode, predict, assume_relocated, compare)
    return DiagramResult(models, diagram.write_files(models, svg, dot, title), note)
