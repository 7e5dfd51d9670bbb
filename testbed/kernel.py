"""Find a stock kernel the guest can boot and that out-of-tree modules build against.

A kernel is named by its full version (6.1.0-57-amd64) or by its series (6.1, 6.12: the
newest usable installed kernel of that series). Without a name it is $RSD_TESTBED_KERNEL,
else DEFAULT_SERIES: Debian 12's own kernel, so installing a newer one changes nothing
until someone asks for it.
"""

import os
import re
from dataclasses import dataclass

from .errors import TestbedError

BOOT_DIR = "/boot"
MODULES_DIR = "/lib/modules"
DEFAULT_SERIES = "6.1"
# The Debian packages that bring each series' image and headers (what `make setup` installs).
PACKAGES = {"6.1": ("linux-image-amd64", "linux-headers-amd64"),
            "6.12": ("linux-image-6.12-amd64", "linux-headers-6.12-amd64")}
_VERSION_RE = re.compile(r"^[A-Za-z0-9._+-]+$")
_SERIES_RE = re.compile(r"^(\d+)\.(\d+)$")


@dataclass(frozen=True)
class Kernel:
    version: str
    image: str          # /boot/vmlinuz-<version>
    modules: str        # /lib/modules/<version>

    @property
    def build_dir(self):
        return os.path.join(self.modules, "build")

    @property
    def series(self):
        return series_of(self.version)


def series_of(version):
    """"6.12" for "6.12.117+deb12-amd64", "6.1" for "6.1.0-57-amd64"."""
    m = re.match(r"^(\d+)\.(\d+)", version)
    return f"{m.group(1)}.{m.group(2)}" if m else None


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
    """The kernel to boot: `version`, else $RSD_TESTBED_KERNEL, else the DEFAULT_SERIES one.

    `version` is a full version or a series ("6.12": the newest usable kernel of that series).
    Usable: /boot/vmlinuz-<v> readable, /lib/modules/<v>/modules.dep and /build present.
    Anything missing is a TestbedError that says which package to install.
    """
    version = version or os.environ.get("RSD_TESTBED_KERNEL") or DEFAULT_SERIES
    if not _VERSION_RE.match(version):
        raise TestbedError(f"bad kernel version {version!r}: "
                           "expected a series like 6.12 or a version like 6.1.0-57-amd64")
    if _SERIES_RE.match(version):
        return _newest_of_series(version)
    problems = _problems(version)
    if problems:
        raise TestbedError(f"kernel {version} cannot be used: " + "; ".join(problems))
    return _kernel(version)


def _newest_of_series(series):
    try:
        names = os.listdir(BOOT_DIR)
    except OSError as e:
        raise TestbedError(f"cannot list {BOOT_DIR}: {e}") from None
    candidates = sorted((n[len("vmlinuz-"):] for n in names if n.startswith("vmlinuz-")),
                        key=_version_key, reverse=True)
    rejected = []
    for v in candidates:
        if series_of(v) != series:
            continue
        problems = _problems(v)
        if not problems:
            return _kernel(v)
        rejected.append(f"{v}: " + "; ".join(problems))
    image, headers = PACKAGES.get(series, ("linux-image-<version>", "linux-headers-<version>"))
    detail = (" Rejected: " + " | ".join(rejected)) if rejected else ""
    raise TestbedError(f"no usable {series} guest kernel: need /boot/vmlinuz-{series}.* with "
                       f"/lib/modules/<v>/build; install the Debian packages {image} and "
                       f"{headers} (`make setup`), or choose another kernel with "
                       f"RSD_TESTBED_KERNEL / --kernel." + detail)


def _kernel(version):
    return Kernel(version, os.path.join(BOOT_DIR, f"vmlinuz-{version}"),
                  os.path.join(MODULES_DIR, version))
