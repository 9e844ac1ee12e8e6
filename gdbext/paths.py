"""Where things live: the repository, its caches, and the Debian Xen builds.

One home for every path so that scripts, the lab, GDB and the tests agree.
``scripts/setup`` fills the cache; nothing here downloads anything.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, NamedTuple, Optional, Tuple

REPO_ROOT = Path(__file__).resolve().parent.parent

# Overridable so that CI or a user can keep the cache elsewhere.
CACHE_DIR = Path(os.environ.get("GDBEXT_CACHE", REPO_ROOT / ".cache"))
VENV_DIR = Path(os.environ.get("GDBEXT_VENV", REPO_ROOT / ".venv"))
LAB_DIR = Path(os.environ.get("GDBEXT_LAB_DIR", REPO_ROOT / ".lab"))

# Downloaded .debs (all builds) and the private apt trees scripts/setup makes per suite.
DEB_DIR = CACHE_DIR / "debs"
APT_DIR = CACHE_DIR / "apt"


class XenBuild(NamedTuple):
    """One Debian Xen build, unpacked with dpkg -x into ``root`` (never installed).

    ``suite`` is the Debian suite its packages come from; None means the system's own apt
    sources (the machine's release). ``efi_elf`` is None when the build ships no ELF twin of
    xen.efi (4.17 ships only the .efi.map). A NamedTuple, not a dataclass, so that scripts
    can load this file by path without registering it as a module.
    """
    name: str
    suite: Optional[str]
    packages: Tuple[str, str]          # (hypervisor, -dbg)
    root: Path
    image: Path                        # multiboot2 image, gzip'd
    syms: Path                         # xen-syms (ELF, symbols)
    syms_map: Path                     # nm map of xen-syms
    efi: Path                          # xen.efi (PE32+)
    efi_map: Path                      # nm map of xen.efi
    efi_elf: Optional[Path]            # ELF twin of xen.efi with its symbols

    @property
    def efi_syms(self) -> Path:
        """The symbols of xen.efi's layout (its sections are 2 MiB apart, not xen-syms'):
        the ELF twin where the build ships one (build-id in its .buildid), else the map."""
        return self.efi_elf if self.efi_elf is not None else self.efi_map

    def missing(self) -> Tuple[Path, ...]:
        """The files of this build that scripts/setup should have unpacked but are absent."""
        want = [self.image, self.syms, self.syms_map, self.efi, self.efi_map]
        if self.efi_elf is not None:
            want.append(self.efi_elf)
        return tuple(p for p in want if not p.is_file())


def _debian_build(version: str, suite: Optional[str], efi_elf: bool) -> XenBuild:
    root = CACHE_DIR / f"xen-{version}"
    flavour = f"{version}-amd64"
    debug = root / "usr" / "lib" / "debug" / "boot"
    return XenBuild(
        name=version,
        suite=suite,
        packages=(f"xen-hypervisor-{flavour}", f"xen-hypervisor-{flavour}-dbg"),
        root=root,
        image=root / "boot" / f"xen-{flavour}.gz",
        syms=debug / f"xen-syms-{flavour}",
        syms_map=debug / f"xen-syms-{flavour}.map",
        efi=root / "boot" / f"xen-{flavour}.efi",
        efi_map=debug / f"xen-{flavour}.efi.map",
        efi_elf=debug / f"xen-{flavour}.efi.elf" if efi_elf else None,
    )


# Debian 12 (bookworm, the machine's release) and Debian 13 (trixie).
BUILDS: Dict[str, XenBuild] = {
    b.name: b for b in (
        _debian_build("4.17", None, efi_elf=False),
        _debian_build("4.20", "trixie", efi_elf=True),
    )
}
DEFAULT_BUILD = "4.17"


def build(name: Optional[str] = None) -> XenBuild:
    """The build called ``name`` (default DEFAULT_BUILD); ValueError naming the choices."""
    name = DEFAULT_BUILD if name is None else name
    try:
        return BUILDS[name]
    except KeyError:
        raise ValueError(f"unknown Xen build {name!r}; choose one of {', '.join(BUILDS)}") from None


def image_and_syms(build_name: Optional[str], xen: Optional[Path],
                   xen_syms: Optional[Path], efi: bool = False) -> Tuple[Path, Optional[Path]]:
    """The (image, symbols) that ``--build NAME`` / ``--xen IMAGE`` / ``--xen-syms FILE``
    name, for every program that boots or checks Xen (the lab, xen-boot-check, the demo).

    A build gives both files (``--xen-syms`` may still replace its symbols); ``--xen``
    alone gives no symbols (a build's would not match another image); neither gives the
    default build. ValueError (one line) when ``--build`` and ``--xen`` both name an image.
    With ``efi`` the build's image is xen.efi and its symbols those of xen.efi's own layout
    (``efi_syms``), not xen-syms.
    """
    if build_name is not None and xen is not None:
        raise ValueError(f"--build {build_name} and --xen {xen} both name the image: give one")
    if xen is not None:
        return Path(xen), (Path(xen_syms) if xen_syms is not None else None)
    b = build(build_name)
    if efi:
        return b.efi, Path(xen_syms) if xen_syms is not None else b.efi_syms
    return b.image, Path(xen_syms) if xen_syms is not None else b.syms


def build_of(path: Path) -> Optional[XenBuild]:
    """The build one of whose files ``path`` is (to name its packages in a hint), or None."""
    for b in BUILDS.values():
        if Path(path) in (b.image, b.syms, b.syms_map, b.efi, b.efi_map, b.efi_elf):
            return b
    return None


# The default build under the names the rest of the code has always used.
_DEFAULT = BUILDS[DEFAULT_BUILD]
XEN_DEBIAN_PACKAGES = _DEFAULT.packages
XEN_DEBIAN_ROOT = _DEFAULT.root
XEN_DEBIAN_IMAGE = _DEFAULT.image
XEN_DEBIAN_EFI = _DEFAULT.efi
XEN_DEBIAN_SYMS = _DEFAULT.syms
XEN_DEBIAN_SYMS_MAP = _DEFAULT.syms_map
XEN_DEBIAN_EFI_MAP = _DEFAULT.efi_map

# The file GDB sources to load the extension (scripts, the lab and the tests use it).
GDBINIT = REPO_ROOT / "gdbext" / "gdbinit.py"

# Firmware and boot loader from Debian's ovmf and grub-efi-amd64-bin packages.
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
GRUB_EFI_MODULES = Path("/usr/lib/grub/x86_64-efi")
