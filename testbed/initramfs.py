"""Build the guest's initramfs: busybox-static, the modules that reach the host's root, /init.

The archive is cached per kernel version (and per content hash, so a change to /init or to
the module list rebuilds it) under $RSD_TESTBED_CACHE or ~/.cache/rsd-testbed/<version>/.
"""

import hashlib
import os
import shutil
import stat
import tempfile
import time

from .errors import TestbedError
from .machine import COM2_PORT

# What /init needs before it can mount the host's root: virtio PCI transport, 9p over
# virtio, overlayfs, and virtio_console for the agent's virtio-serial port. Each with its
# dependencies from modules.dep; what the kernel has built in is skipped (6.12 builds in
# virtio_pci and virtio_console, 6.1 has them as modules; 6.12's are .ko.xz).
WANTED_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay", "virtio_console")
BUSYBOX_PATHS = ("/bin/busybox", "/usr/bin/busybox")
FORMAT_VERSION = "1"

INIT_SCRIPT = r"""#!/bin/busybox sh
# rsd testbed initramfs: host root (9p, read-only) + tmpfs overlay, then switch_root.
B=/bin/busybox
fail() {
    $B echo "testbed-initramfs: FAILED: $*"
    $B poweroff -f
}
$B mkdir -p /proc /sys /dev /lower /rw /newroot
$B mount -t proc proc /proc
$B mount -t sysfs sysfs /sys
$B mount -t devtmpfs devtmpfs /dev
for m in $($B cat /modules.list); do
    $B insmod "/modules/$m.ko" || fail "insmod $m"
done
# COM2 is the user-mode driver's. 8250.nr_uarts=1 keeps 6.1's 8250 off it; after 6.1 it
# limits only the legacy ports and the 8250 takes every UART ACPI lists (6.12 does): unbind
# COM2 from it (a no-op on 6.1, which never bound it) so its ports and IRQ stay free.
for d in /sys/bus/pnp/devices/*; do
    if [ -e "$d/driver" ] && $B grep -q "^io @COM2_IO@$" "$d/resources"; then
        $B echo "${d##*/}" > "$d/driver/unbind" || fail "unbind of COM2 (@COM2_IO@) from the kernel"
    fi
done
options="trans=virtio,version=9p2000.L,ro,msize=262144,cache=${tb_9p_cache:-loose}"
$B mount -t 9p -o "$options" hostroot /lower \
    || fail "mount of the host root over 9p (mount_tag hostroot)"
$B mount -t tmpfs -o mode=0755 testbed-rw /rw || fail "tmpfs for the overlay"
$B mkdir -p /rw/upper /rw/work
$B mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work testbed-root /newroot \
    || fail "overlay mount"
# (-L: the venv's python is an absolute symlink, only resolvable after switch_root)
[ -e "/newroot$tb_python" ] || [ -L "/newroot$tb_python" ] \
    || fail "guest python $tb_python not found in the host root"
[ -f "/newroot$tb_init" ] || fail "guest init $tb_init not found in the host root"
$B umount /proc /sys /dev
exec $B switch_root /newroot "$tb_python" "$tb_init"
""".replace("@COM2_IO@", f"{COM2_PORT:#x}-{COM2_PORT + 7:#x}")


def cache_root():
    return os.environ.get("RSD_TESTBED_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "rsd-testbed")


def find_busybox():
    for path in BUSYBOX_PATHS:
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    raise TestbedError("busybox not found in " + ", ".join(BUSYBOX_PATHS)
                       + ": install the Debian package busybox-static (`make setup`)")


def _read_modules_dep(modules_dir):
    deps = {}
    with open(os.path.join(modules_dir, "modules.dep")) as f:
        for line in f:
            path, _, rest = line.partition(":")
            deps[_module_name(path)] = (path, [_module_name(p) for p in rest.split()])
    return deps


def _builtin_names(modules_dir):
    try:
        with open(os.path.join(modules_dir, "modules.builtin")) as f:
            return {_module_name(line.strip()) for line in f if line.strip()}
    except FileNotFoundError:
        return set()


def _module_name(path):
    base = os.path.basename(path)
    for ext in (".ko.xz", ".ko.zst", ".ko.gz", ".ko"):
        if base.endswith(ext):
            base = base[: -len(ext)]
            break
    return base.replace("-", "_")


def module_load_order(modules_dir, wanted=WANTED_MODULES):
    """[(name, path relative to modules_dir)] with every module after its dependencies."""
    deps = _read_modules_dep(modules_dir)
    builtin = _builtin_names(modules_dir)
    order, seen = [], set()

    def visit(name):
        if name in seen:
            return
        seen.add(name)
        if name not in deps:
            if name in builtin:
                return
            raise TestbedError(f"kernel module {name} is neither in {modules_dir}/modules.dep "
                               "nor built in: this kernel cannot run the testbed")
        path, needs = deps[name]
        for dep in reversed(needs):  # modules.dep lists the deepest dependency last
            visit(dep)
        order.append((name, path))

    for name in wanted:
        visit(name)
    return order


def _read_module(path):
    if path.endswith(".ko"):
        with open(path, "rb") as f:
            return f.read()
    if path.endswith(".xz"):
        import lzma
        with lzma.open(path) as f:
            return f.read()
    if path.endswith(".gz"):
        import gzip
        with gzip.open(path) as f:
            return f.read()
    raise TestbedError(f"cannot unpack {path}: busybox insmod needs plain .ko files")


class _Cpio:
    """A newc ("070701") cpio archive, which the kernel unpacks as the initramfs."""

    def __init__(self):
        self.parts = []
        self.ino = 1

    def _entry(self, name, mode, data=b"", nlink=1):
        name_b = name.encode() + b"\0"
        fields = [self.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0, len(name_b), 0]
        self.ino += 1
        header = b"070701" + b"".join(b"%08X" % v for v in fields)
        self.parts += [header, name_b, b"\0" * (-(len(header) + len(name_b)) % 4),
                       data, b"\0" * (-len(data) % 4)]

    def dir(self, name):
        self._entry(name, stat.S_IFDIR | 0o755, nlink=2)

    def file(self, name, data, mode=0o644):
        self._entry(name, stat.S_IFREG | mode, data)

    def bytes(self):
        self._entry("TRAILER!!!", 0)
        return b"".join(self.parts)


def _contents(kernel):
    busybox = find_busybox()
    with open(busybox, "rb") as f:
        busybox_data = f.read()
    order = module_load_order(kernel.modules)
    modules = [(name, _read_module(os.path.join(kernel.modules, path))) for name, path in order]
    return busybox_data, modules


def build(kernel, cache_dir=None):
    """Path of the initramfs for `kernel`, built on first use (atomic: safe with two testbeds)."""
    busybox_data, modules = _contents(kernel)
    digest = hashlib.sha256(FORMAT_VERSION.encode() + INIT_SCRIPT.encode() + busybox_data)
    for name, data in modules:
        digest.update(name.encode() + hashlib.sha256(data).digest())
    directory = os.path.join(cache_dir or cache_root(), kernel.version)
    target = os.path.join(directory, f"initramfs-{digest.hexdigest()[:16]}.cpio")
    if os.path.isfile(target):
        return target
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise TestbedError(f"cannot create the testbed cache {directory}: {e}; "
                           "set RSD_TESTBED_CACHE to a writable directory") from None
    archive = _Cpio()
    for d in ("bin", "modules", "proc", "sys", "dev", "lower", "rw", "newroot"):
        archive.dir(d)
    archive.file("bin/busybox", busybox_data, 0o755)
    archive.file("init", INIT_SCRIPT.encode(), 0o755)
    archive.file("modules.list", "".join(f"{n}\n" for n, _ in modules).encode())
    for name, data in modules:
        archive.file(f"modules/{name}.ko", data)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".initramfs-")
    with os.fdopen(fd, "wb") as f:
        f.write(archive.bytes())
    os.replace(tmp, target)
    _remove_stale(directory, keep=target)
    return target


def _remove_stale(directory, keep, max_age_s=86400):
    # Only old ones: another checkout (other code, other hash) may be booting from its own.
    now = time.time()
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if path != keep and name.startswith("initramfs-") and name.endswith(".cpio"):
            try:
                if now - os.stat(path).st_mtime > max_age_s:
                    os.unlink(path)
            except OSError:
                pass


def clear_cache(cache_dir=None):
    shutil.rmtree(cache_dir or cache_root(), ignore_errors=True)
