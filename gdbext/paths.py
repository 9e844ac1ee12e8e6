"""Where things live: the repository, its caches, and the Debian Xen 4.17 files.

One home for every path so that scripts, the lab, GDB and the tests agree.
``scripts/setup`` fills the cache; nothing here downloads anything.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

# Overridable so that CI or a user can keep the cache elsewhere.
CACHE_DIR = Path(os.environ.get("GDBEXT_CACHE", REPO_ROOT / ".cache"))
VENV_DIR = Path(os.environ.get("GDBEXT_VENV", REPO_ROOT / ".venv"))
LAB_DIR = Path(os.environ.get("GDBEXT_LAB_DIR", REPO_ROOT / ".lab"))

# The Debian bookworm packages the lab boots by default (unpacked with dpkg -x,
# never installed).
XEN_DEBIAN_PACKAGES = ("xen-hypervisor-4.17-amd64", "xen-hypervisor-4.17-amd64-dbg")
XEN_DEBIAN_ROOT = CACHE_DIR / "xen-4.17"
XEN_DEBIAN_IMAGE = XEN_DEBIAN_ROOT / "boot" / "xen-4.17-amd64.gz"
XEN_DEBIAN_EFI = XEN_DEBIAN_ROOT / "boot" / "xen-4.17-amd64.efi"
XEN_DEBIAN_SYMS = XEN_DEBIAN_ROOT / "usr" / "lib" / "debug" / "boot" / "xen-syms-4.17-amd64"
XEN_DEBIAN_SYMS_MAP = XEN_DEBIAN_SYMS.with_name("xen-syms-4.17-amd64.map")
XEN_DEBIAN_EFI_MAP = XEN_DEBIAN_SYMS.with_name("xen-4.17-amd64.efi.map")

# The file GDB sources to load the extension (scripts, the lab and the tests use it).
GDBINIT = REPO_ROOT / "gdbext" / "gdbinit.py"

# Firmware and boot loader from Debian's ovmf and grub-efi-amd64-bin packages.
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
GRUB_EFI_MODULES = Path("/usr/lib/grub/x86_64-efi")
