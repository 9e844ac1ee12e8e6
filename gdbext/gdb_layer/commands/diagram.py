"""xen-diagram: draw the page-table tree from an L4 as SVG and/or DOT.

The drawing is ``core.diagram``, gathered from the target by ``drawing.write_diagram``
(which xen-pt --svg and the walkthrough call too); this command parses and prints.
"""

from __future__ import annotations

from ...core import diagram
from ...core.errors import GdbextError
from ..command import CommandParser, XenCommand, add_json_option, add_root_options, emit
from ..drawing import write_diagram


class DiagramCommand(XenCommand):
    name = "diagram"
    summary = "Draw the page-table tree from an L4 as a picture (SVG and/or Graphviz DOT)."
    complete_values = {"--root": "root"}

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
        result = write_diagram(self.ctx, args.svg, args.dot, root=args.root, mode=args.mode,
                               predict=args.predict, assume_relocated=args.assume_relocated,
                               compare=args.compare, title=args.title)
        if args.json:
            self.write_json(result.as_dict())
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
        emit("\n".join(lines), from_tty)


def install(ctx) -> None:
    DiagramCommand(ctx)
