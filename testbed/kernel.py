"""Find a stock kernel the guest can boot and that out-of-tree modules build against."""

import os
import re
from dataclasses import dataclass

from .errors import TestbedError

BOOT_DIR = "/boot"
MODULES_DIR = "/lib/modules"
_VERSION_RE = re.compile(r"^[A-Za-z0-9._+-]+$")


@dataclass(frozen=True)
class Kernel:
    version: str
    image: str          # /boot/vmlinuz-<version>
    modules: str        # /lib/modules/<version>

    @property
    def build_dir(self):
        return os.path.join(self.modules, "build")


def _version_key(version):
    # "6.1.0-56-amd64" sorts after "6.1.0-9-amd64": compare digit runs as numbers.
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", version)]


def _problems(version):
    image = os.path.join(BOOT_DIR, f"vmlinuz-{version}")
    modules = os.path.join(MODULES_DIR, version)
    problems = []
    if not os.path.isfile(image):
        problems.append(f"{image} is missing")
    elif not os.access(image, os.R_OK):
        problems.append(f"{image} is not readable (Debian makes it 0600: run as root "
                        f"or `sudo chmod 0644 {image}`)")
    if not os.path.isfile(os.path.join(modules, "modules.dep")):
        problems.append(f"{modules}/modules.dep is missing (install linux-image-{version})")
    if not os.path.isdir(os.path.join(modules, "build")):
        problems.append(f"{modules}/build is missing (install linux-headers-{version})")
    return problems


def find_kernel(version=None):
    """The kernel to boot: `version` or $RSD_TESTBED_KERNEL if given, else the newest usable one.

    Usable: /boot/vmlinuz-<v> readable, /lib/modules/<v>/modules.dep and /build present.
    """
    version = version or os.environ.get("RSD_TESTBED_KERNEL") or None
    if version is not None:
        if not _VERSION_RE.match(version):
            raise TestbedError(f"bad kernel version {version!r}: "
                               "expected something like 6.1.0-56-amd64")
        problems = _problems(version)
        if problems:
            raise TestbedError(f"kernel {version} cannot be used: " + "; ".join(problems))
        return _kernel(version)
    try:
        names = os.listdir(BOOT_DIR)
    except OSError as e:
        raise TestbedError(f"cannot list {BOOT_DIR}: {e}") from None
    candidates = sorted((n[len("vmlinuz-"):] for n in names if n.startswith("vmlinuz-")),
                        key=_version_key, reverse=True)
    rejected = []
    for v in candidates:
        problems = _problems(v)
        if not problems:
            return _kernel(v)
        rejected.append(f"{v}: " + "; ".join(problems))
    detail = (" Rejected: " + " | ".join(rejected)) if rejected else ""
    raise TestbedError("no usable guest kernel: need /boot/vmlinuz-<v> with "
                       "/lib/modules/<v>/build; install the Debian packages linux-image-amd64 "
                       "and linux-headers-amd64 (`make setup`)." + detail)


def _kernel(version):
    return Kernel(version, os.path.join(BOOT_DIR, f"vmlinuz-{version}"),
                  os.path.join(MODULES_DIR, version))
