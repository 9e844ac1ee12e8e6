"""Names a user may have meant: completions of a prefix and the nearest names to a typo.

Used for Xen's symbols, stop names and check ids (TAB completion, and the one-line
error that suggests what was meant). Pure: lists of names in, lists of names out.
"""

from __future__ import annotations

import difflib
from typing import Iterable, List

# A TAB on a short prefix of 6,885 symbols: GDB shows at most this many (it asks first).
MAX_COMPLETIONS = 500


def completions(names: Iterable[str], prefix: str, limit: int = MAX_COMPLETIONS) -> List[str]:
    """The names that start with ``prefix``, sorted, at most ``limit``."""
    return sorted({n for n in names if n.startswith(prefix)})[:limit]


def nearest(names: Iterable[str], name: str, n: int = 3) -> List[str]:
    """The names closest to a mistyped ``name`` (difflib's ratio), best first."""
    return difflib.get_close_matches(name, list(set(names)), n=n, cutoff=0.7)


def did_you_mean(names: Iterable[str], name: str) -> str:
    """' (did you mean a, b?)' or '' when nothing is close."""
    close = nearest(names, name)
    return f" (did you mean {', '.join(close)}?)" if close else ""
