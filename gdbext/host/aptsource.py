"""Which Debian mirror the machine's own apt sources use (scripts/setup reads it at run time).

scripts/setup downloads builds from other Debian suites (Xen 4.20 from trixie) through a
private apt configuration in the cache; it takes the mirror, and the keyring that signs it,
from the system's sources so that no host name is written into the repository.
Both formats are read: one-line ``deb [opts] URI SUITE COMPONENT...`` (sources.list, *.list)
and deb822 stanzas (*.sources).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional, Tuple


@dataclass(frozen=True)
class AptSource:
    uri: str
    suites: Tuple[str, ...]
    signed_by: Optional[str]


def parse_one_line(text: str) -> List[AptSource]:
    out = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        m = re.match(r"deb\s+(?:\[([^\]]*)\]\s+)?(\S+)\s+(\S+)", line)
        if not m:
            continue
        opts = dict(o.split("=", 1) for o in (m.group(1) or "").split() if "=" in o)
        out.append(AptSource(m.group(2), (m.group(3),), opts.get("signed-by")))
    return out


def parse_deb822(text: str) -> List[AptSource]:
    out = []
    for stanza in re.split(r"\n\s*\n", text):
        fields = {}
        for line in stanza.splitlines():
            if line.lstrip().startswith("#") or ":" not in line or line[:1].isspace():
                continue
            key, value = line.split(":", 1)
            fields[key.strip().lower()] = value.strip()
        if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes") == "no":
            continue
        for uri in fields.get("uris", "").split():
            out.append(AptSource(uri, tuple(fields.get("suites", "").split()),
                                 fields.get("signed-by")))
    return out


def system_sources(etc: Path = Path("/etc/apt")) -> List[AptSource]:
    out: List[AptSource] = []
    main = etc / "sources.list"
    if main.is_file():
        out += parse_one_line(main.read_text(errors="replace"))
    parts = etc / "sources.list.d"
    if parts.is_dir():
        for f in sorted(parts.iterdir()):
            if f.suffix == ".list":
                out += parse_one_line(f.read_text(errors="replace"))
            elif f.suffix == ".sources":
                out += parse_deb822(f.read_text(errors="replace"))
    return out


def debian_mirror(sources: Iterable[AptSource], codename: str) -> AptSource:
    """The source serving the release's main suite (``codename`` itself, not -security or
    -updates): that is the Debian mirror, which also serves the other suites."""
    for s in sources:
        if codename in s.suites:
            return s
    raise LookupError(f"no apt source serves the suite {codename!r} "
                      f"(looked in /etc/apt/sources.list and sources.list.d)")


def os_codename(os_release: Path = Path("/etc/os-release")) -> str:
    for line in os_release.read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            return line.split("=", 1)[1].strip().strip('"')
    raise LookupError(f"{os_release} has no VERSION_CODENAME")


def private_sources_line(mirror: AptSource, suite: str, component: str = "main") -> str:
    """One sources.list line for ``suite`` on the system's mirror, signed as the system's is."""
    opts = f"[signed-by={mirror.signed_by}] " if mirror.signed_by else ""
    return f"deb {opts}{mirror.uri} {suite} {component}\n"


if __name__ == "__main__":  # scripts/setup: print the line for argv[1]'s suite
    import sys
    src = debian_mirror(system_sources(), os_codename())
    sys.stdout.write(private_sources_line(src, sys.argv[1]))
