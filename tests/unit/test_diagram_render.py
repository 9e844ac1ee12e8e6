"""The diagrams render: rsvg-convert and graphviz (installed by scripts/setup) turn
xen-diagram's SVG and DOT into PNGs of a sensible size. A picture that a renderer
rejects, or draws as a sliver, is a defect the XML parse alone cannot see."""

from __future__ import annotations

import struct
import subprocess

import pytest

from gdbext import paths
from gdbext.core import diagram
from gdbext.core.memory import SyntheticMemory
from gdbext.core.xenimage import LoadedXen
from gdbext.core.xensyms import load_xen_syms

from .test_diagram import B, CTX, MERGE, firmware, merged

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(data: bytes):
    assert data[:8] == PNG_MAGIC, "not a PNG"
    width, height = struct.unpack(">II", data[16:24])  # IHDR follows the magic
    return width, height


@pytest.fixture(scope="module")
def models():
    xen = LoadedXen(load_xen_syms(paths.XEN_DEBIAN_SYMS), B)
    mem = SyntheticMemory(1 << 32)
    firmware(mem)
    plain = diagram.build_model(CTX, merged(xen, relocate=False), MERGE, xen, "plain merge")
    relocated = diagram.build_model(CTX, merged(xen, relocate=True), MERGE, xen, "relocated")
    return [plain, relocated]


def test_svg_renders_to_a_png(models, tmp_path):
    svg = tmp_path / "l4.svg"
    svg.write_text(diagram.to_svg(models, "render test"))
    png = subprocess.run(["rsvg-convert", str(svg)], check=True, capture_output=True).stdout
    width, height = png_size(png)
    # Two trees side by side, each a column of slot boxes: wider than tall, and big enough
    # to read (a broken viewBox renders as a few pixels).
    assert width > 600 and height > 200 and width > height


def test_dot_renders_to_a_png(models, tmp_path):
    dot = tmp_path / "l4.dot"
    dot.write_text(diagram.to_dot(models, "render test"))
    proc = subprocess.run(["dot", "-Tpng", str(dot)], capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode()
    assert not proc.stderr.strip(), proc.stderr.decode()  # graphviz warns on bad labels
    width, height = png_size(proc.stdout)
    assert width > 200 and height > 100
