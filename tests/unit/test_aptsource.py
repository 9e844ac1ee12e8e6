"""scripts/setup's reading of the system's apt sources (both formats)."""

import pytest

from gdbext.host import aptsource as A

DEB822 = """\
Types: deb
# a comment
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main
"""


def test_deb822_main_suite_not_security():
    src = A.debian_mirror(A.parse_deb822(DEB822), "bookworm")
    assert src.uri == "http://mirror.example/debian"
    assert A.private_sources_line(src, "trixie") == (
        "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] "
        "http://mirror.example/debian trixie main\n")


def test_one_line_format_with_and_without_options():
    text = ("# deb http://old.example/debian bookworm main\n"
            "deb http://sec.example/debian-security bookworm-security main\n"
            "deb [arch=amd64 signed-by=/k.gpg] http://m.example/debian bookworm main contrib\n")
    src = A.debian_mirror(A.parse_one_line(text), "bookworm")
    assert (src.uri, src.signed_by) == ("http://m.example/debian", "/k.gpg")
    plain = A.debian_mirror(A.parse_one_line("deb http://m.example/debian bookworm main\n"), "bookworm")
    assert A.private_sources_line(plain, "trixie") == "deb http://m.example/debian trixie main\n"


def test_no_main_suite_is_one_clear_error():
    with pytest.raises(LookupError, match="no apt source serves the suite 'bookworm'"):
        A.debian_mirror(A.parse_deb822(DEB822.replace("bookworm bookworm-updates", "sid")), "bookworm")


def test_disabled_stanza_ignored():
    text = DEB822.replace("Types: deb\n# a comment", "Types: deb\nEnabled: no", 1)
    with pytest.raises(LookupError):
        A.debian_mirror(A.parse_deb822(text), "bookworm")
