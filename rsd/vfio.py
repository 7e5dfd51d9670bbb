"""A service's PCI device through VFIO: rsd's side, as root (docs/vfio.md).

For a service whose [resources] pci names a device in an IOMMU group, rsd
binds the device to vfio-pci (taking it from a kernel driver only when the
file says take_from_kernel = true), opens its group once and keeps that
open while the service exists.  For every incarnation it builds a fresh
container (VFIO_TYPE1v2), attaches the group, opens the device and hands
the container and device fds over; the driver opens nothing privileged.

A fresh container per incarnation is what clears the previous one's DMA:
its mappings live in its container, and the group leaves that container
(VFIO_GROUP_UNSET_CONTAINER) before the next is attached.  The kernel
refuses that while any process still holds a device fd, so no leftover of
an old incarnation ever shares the device with a new one.  When the last
device fd closes, vfio-pci clears bus mastering, disables the device's
interrupts and resets the function where the device can be reset; when a
new device fd is opened it resets it again (and rsd asks VFIO_DEVICE_RESET
once more where the device offers one).

The group stays open until the service is gone, which rsd sees by its
listening socket: rsd holds it from the service's start to its removal
(rsctl down, shutdown, a service that never started), across restarts and
across its own restart (adoption hands it back).  When rsd removes the
service it calls release(label), and again on a timer until no process
holds the device any more; then it closes the group and gives the device
back: unbound from vfio-pci, driver_override as it was, and bound to the
kernel driver rsd took it from, if any.
"""

import atexit
import ctypes
import errno
import json
import logging
import os
import re
import time

from libdrv import vfio_abi as abi

log = logging.getLogger("rsd.vfio")

PCI_DEVICES = "/sys/bus/pci/devices"
PCI_DRIVERS = "/sys/bus/pci/drivers"
IOMMU_GROUPS = "/sys/kernel/iommu_groups"
VFIO_DIR = "/dev/vfio"
VFIO_DRIVER = "vfio-pci"
RELEASE_GRACE = 5.0       # seconds rsd waits at exit for devices to come free

_DRIVER_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")

VfioError = abi.VfioError
_ioctl = abi.ioctl


def _read(path):
    with open(path) as f:
        return f.read().strip()


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)


def current_driver(bdf, devices=PCI_DEVICES):
    """The name of the driver bound to bdf, or None."""
    try:
        return os.path.basename(os.readlink(os.path.join(devices, bdf, "driver")))
    except FileNotFoundError:
        return None


def iommu_group(bdf, devices=PCI_DEVICES):
    """bdf's IOMMU group number, or None when the device has none (no IOMMU)."""
    try:
        return int(os.path.basename(os.readlink(os.path.join(devices, bdf, "iommu_group"))))
    except FileNotFoundError:
        return None


def _socket_inodes():
    """Inodes of the sockets this process holds open."""
    out = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink("/proc/self/fd/" + name)
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(int(target[8:-1]))
    return out


def listening_socket_of(label):
    """(inode, path) of the listening socket rsd holds for label (RUNTIME/svc/<label>.sock).

    It is rsd's for the service's whole life (rsd/table.py Paths.listen_path,
    rsd/manager.py add_service and _remove): the sign that the service exists.
    """
    mine = _socket_inodes()
    suffix = "/svc/%s.sock" % label
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            fields = line.split()
            if len(fields) >= 8 and fields[7].endswith(suffix) and int(fields[6]) in mine:
                return int(fields[6]), fields[7]
    return None, None


class Holder:
    """One service's device: its group fd, kept while the service exists."""

    def __init__(self, label, bdf, group, original_driver, override, listen_inode, record):
        self.label = label
        self.bdf = bdf
        self.group = group                  # IOMMU group number
        self.original_driver = original_driver  # the kernel driver rsd took it from (None: none)
        self.override = override            # driver_override before rsd set it
        self.listen_inode = listen_inode
        self.record = record                # RUNTIME/vfio/<bdf>.json, for a successor rsd
        self.group_fd = -1
        self.reset_logged = False


_held = {}              # label -> Holder
_exit_hook = False


def _release_all_at_exit():
    deadline = time.monotonic() + RELEASE_GRACE
    while _held and time.monotonic() < deadline:
        for h in list(_held.values()):
            _try_release(h)
        if _held:
            time.sleep(0.05)
    for h in _held.values():
            log.error("%s: %s is still in use at rsd's exit; left bound to vfio-pci", h.label, h.bdf)


def held(label):
    """The Holder of label's device, or None (for tests and status)."""
    return _held.get(label)


def release(label):
    """label's service is gone: give its device back.  False while a process still holds
    the device (its last incarnation is still dying): call again later."""
    h = _held.get(label)
    return True if h is None else _try_release(h)


# == giving the device back ==============================================================
def _device_idle(h):
    """True once no process holds a device fd: the group's container can be dropped."""
    st = abi.vfio_group_status.new()
    _ioctl(h.group_fd, abi.VFIO_GROUP_GET_STATUS, st, "VFIO_GROUP_GET_STATUS")
    if not st.flags & abi.VFIO_GROUP_FLAGS_CONTAINER_SET:
        return True
    try:
        _ioctl(h.group_fd, abi.VFIO_GROUP_UNSET_CONTAINER, None, "VFIO_GROUP_UNSET_CONTAINER")
    except VfioError as exc:
        if exc.errno == errno.EBUSY:
            return False
        raise
    return True


def _try_release(h):
    """Give h's device back if nothing holds it any more."""
    try:
        if h.group_fd >= 0:
            if not _device_idle(h):
                return False
            os.close(h.group_fd)
            h.group_fd = -1
        _unbind_from_vfio(h)
    except OSError as exc:
        log.error("%s: cannot give %s back: %s", h.label, h.bdf, exc)
        if h.group_fd >= 0:
            os.close(h.group_fd)
            h.group_fd = -1
    _held.pop(h.label, None)
    if h.record:
        try:
            os.unlink(h.record)
        except FileNotFoundError:
            pass
    return True


def _unbind_from_vfio(h):
    dev = os.path.join(PCI_DEVICES, h.bdf)
    if current_driver(h.bdf) == VFIO_DRIVER and h.original_driver != VFIO_DRIVER:
        _write(os.path.join(dev, "driver", "unbind"), h.bdf)
    if h.original_driver == VFIO_DRIVER:
        log.info("%s: %s stays with vfio-pci, where rsd found it", h.label, h.bdf)
        return
    _write(os.path.join(dev, "driver_override"), (h.override or "") + "\n")
    if h.original_driver:
        try:
            _write(os.path.join(PCI_DRIVERS, h.original_driver, "bind"), h.bdf)
        except OSError as exc:
            log.error("%s: %s: cannot give it back to %s: %s", h.label, h.bdf, h.original_driver, exc)
            return
        log.info("%s: %s given back to the kernel driver %s", h.label, h.bdf, h.original_driver)
    else:
        log.info("%s: %s unbound from vfio-pci (it had no driver before)", h.label, h.bdf)


# == taking the device ===================================================================
def _check_group(bdf, group):
    members = sorted(os.listdir(os.path.join(IOMMU_GROUPS, str(group), "devices")))
    others = [m for m in members if m != bdf]
    if others:
        raise VfioError(errno.EBUSY, "%s shares IOMMU group %d with %s; rsd gives a service only a "
                        "group of its own device (DMA from one device of a group reaches the "
                        "mappings of all)" % (bdf, group, ", ".join(others)))


def _found_state(bdf, record, label):
    """(driver, driver_override) as rsd found bdf, before any rsd touched it.

    A device already on vfio-pci may have been bound by a previous rsd (which
    died): its record, if it names this service, says what was there before.
    """
    dev = os.path.join(PCI_DEVICES, bdf)
    override = _read(os.path.join(dev, "driver_override"))
    override = None if override == "(null)" else override
    driver = current_driver(bdf)
    if driver == VFIO_DRIVER and record:
        try:
            with open(record) as f:
                saved = json.load(f)
            d, o = saved.get("driver"), saved.get("override")
            # rsd's own file (root's, 0600 in a 0700 directory), still checked: the names
            # end up in sysfs paths and writes.
            if (saved.get("label") == label and saved.get("bdf") == bdf
                    and all(v is None or (isinstance(v, str) and _DRIVER_RE.fullmatch(v)) for v in (d, o))):
                return d, o
        except (OSError, ValueError):
            pass
    return driver, override


def _write_record(record, label, bdf, driver, override):
    if not record:
        return
    os.makedirs(os.path.dirname(record), mode=0o700, exist_ok=True)
    tmp = record + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"label": label, "bdf": bdf, "driver": driver, "override": override}, f)
    os.replace(tmp, record)


def bind_to(target, label, bdf, override, take_from_kernel, refused_hint=""):
    """Bind bdf to the driver target (vfio-pci, uio_pci_generic), unbinding the kernel driver it
    has only when take_from_kernel; override: its driver_override as found, restored on failure."""
    dev = os.path.join(PCI_DEVICES, bdf)
    now = current_driver(bdf)
    if now == target:
        return
    if not os.path.isdir(os.path.join(PCI_DRIVERS, target)):
        raise VfioError(errno.ENODEV, "%s: the %s driver is not loaded: `modprobe %s` (at boot: "
                        "/etc/modules-load.d/); rsd loads no modules itself" % (bdf, target, target))
    if now is not None:
        if not take_from_kernel:
            raise VfioError(errno.EBUSY, "%s is driven by the kernel driver %s; rsd takes a device "
                            "away from a kernel driver only when the service file says so: "
                            "[resources] take_from_kernel = true (or unbind it yourself)" % (bdf, now))
        log.warning("%s: taking %s from the kernel driver %s", label, bdf, now)
        _write(os.path.join(dev, "driver", "unbind"), bdf)
    _write(os.path.join(dev, "driver_override"), target)
    try:
        _write(os.path.join(PCI_DRIVERS, target, "bind"), bdf)
    except OSError as exc:
        _write(os.path.join(dev, "driver_override"), (override or "") + "\n")
        if now is not None:
            _write(os.path.join(PCI_DRIVERS, now, "bind"), bdf)
        raise VfioError(exc.errno, "%s: %s refused the device: %s%s"
                        % (bdf, target, exc.strerror, refused_hint)) from None
    if current_driver(bdf) != target:
        raise VfioError(errno.EIO, "%s: not bound to %s after bind (driver %s)" % (bdf, target, current_driver(bdf)))


def _record_path(listen_path, bdf):
    if listen_path is None:
        return None
    runtime = os.path.dirname(os.path.dirname(listen_path))
    return os.path.join(runtime, "vfio", bdf + ".json")


def _take(label, bdf, group, take_from_kernel):
    _check_group(bdf, group)
    for other in _held.values():
        if other.bdf == bdf:
            raise VfioError(errno.EBUSY, "%s is held by service %s" % (bdf, other.label))
    inode, listen_path = listening_socket_of(label)
    if inode is None:
        log.warning("%s: rsd holds no listening socket for it: %s is given back whenever no "
                    "incarnation holds it (slower restarts)", label, bdf)
    record = _record_path(listen_path, bdf)
    driver, override = _found_state(bdf, record, label)
    if driver is None and override not in (None, "", VFIO_DRIVER):
        # No driver, yet an override: someone keeps kernel drivers off it (an rsdrv
        # endpoint sets "rsdrv" for as long as it holds the device).
        raise VfioError(errno.EBUSY, "%s is claimed through driver_override=%s (an rsdrv endpoint "
                        "holds it?); rsd leaves it alone" % (bdf, override))
    if driver not in (None, VFIO_DRIVER) and not take_from_kernel:
        raise VfioError(errno.EBUSY, "%s is driven by the kernel driver %s; rsd takes a device "
                        "away from a kernel driver only when the service file says so: "
                        "[resources] take_from_kernel = true (or unbind it yourself)" % (bdf, driver))
    # Written before rsd changes anything: a successor rsd then knows what to restore.
    _write_record(record, label, bdf, driver, override)
    h = Holder(label, bdf, group, driver, override, inode, record)
    try:
        bind_to(VFIO_DRIVER, label, bdf, override, take_from_kernel)
        h.group_fd = os.open(os.path.join(VFIO_DIR, str(group)), os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.EBUSY and current_driver(bdf) == VFIO_DRIVER:
            # Held by a process of an earlier incarnation (under an rsd that
            # died): keep the binding and the record, and try again later.
            raise VfioError(exc.errno, "%s: IOMMU group %d is held by another process (an "
                            "incarnation started by an earlier rsd, or a process it forked); "
                            "rsd retries once it is gone" % (bdf, group)) from None
        _try_release(h)
        raise
    st = abi.vfio_group_status.new()
    _ioctl(h.group_fd, abi.VFIO_GROUP_GET_STATUS, st, "VFIO_GROUP_GET_STATUS")
    if not st.flags & abi.VFIO_GROUP_FLAGS_VIABLE:
        _try_release(h)
        raise VfioError(errno.EBUSY, "IOMMU group %d of %s is not viable: every device in it must be "
                        "bound to vfio-pci or to no driver" % (group, bdf))
    _held[label] = h
    global _exit_hook
    if not _exit_hook:
        atexit.register(_release_all_at_exit)
        _exit_hook = True
    log.info("%s: %s bound to vfio-pci, IOMMU group %d (DMA-isolated)", label, bdf, group)
    return h


def _incarnation_fds(h):
    """A fresh container with the group attached, and a device fd: [(name, fd)]."""
    if not _device_idle(h):
        raise VfioError(errno.EBUSY, "%s is still held by the previous incarnation or a process it "
                        "forked; rsd retries once it is gone" % h.bdf)
    container = os.open(os.path.join(VFIO_DIR, "vfio"), os.O_RDWR | os.O_CLOEXEC)
    try:
        if _ioctl(container, abi.VFIO_GET_API_VERSION, None, "VFIO_GET_API_VERSION") != abi.VFIO_API_VERSION:
            raise VfioError(errno.EPROTO, "VFIO API version is not %d" % abi.VFIO_API_VERSION)
        if _ioctl(container, abi.VFIO_CHECK_EXTENSION, abi.VFIO_TYPE1v2_IOMMU, "VFIO_CHECK_EXTENSION") != 1:
            raise VfioError(errno.ENOTSUP, "this kernel's VFIO has no TYPE1v2 IOMMU")
        fd = ctypes.c_int32(container)
        _ioctl(h.group_fd, abi.VFIO_GROUP_SET_CONTAINER, fd, "VFIO_GROUP_SET_CONTAINER")
        try:
            _ioctl(container, abi.VFIO_SET_IOMMU, abi.VFIO_TYPE1v2_IOMMU, "VFIO_SET_IOMMU")
        except VfioError as exc:
            if exc.errno == errno.EPERM:
                raise VfioError(exc.errno, "VFIO_SET_IOMMU: EPERM: the IOMMU has no interrupt "
                                "remapping (intremap=on for QEMU's intel-iommu)") from None
            raise
        name = ctypes.create_string_buffer(h.bdf.encode())
        device = _ioctl(h.group_fd, abi.VFIO_GROUP_GET_DEVICE_FD, name, "VFIO_GROUP_GET_DEVICE_FD")
    except BaseException:
        os.close(container)
        raise
    try:
        os.set_inheritable(device, False)
        info = abi.vfio_device_info.new()
        _ioctl(device, abi.VFIO_DEVICE_GET_INFO, info, "VFIO_DEVICE_GET_INFO")
        if info.flags & abi.VFIO_DEVICE_FLAGS_RESET:
            _ioctl(device, abi.VFIO_DEVICE_RESET, None, "VFIO_DEVICE_RESET")
        elif not h.reset_logged:
            log.info("%s: %s has no function reset; its driver resets it itself at init",
                     h.label, h.bdf)
            h.reset_logged = True
    except BaseException:
        os.close(device)
        os.close(container)
        raise
    return [("vfio_container", container), ("vfio_device", device)]


def open_for_service(label, bdf, take_from_kernel=False):
    """The VFIO fds for label's next incarnation: [("vfio_container", fd), ("vfio_device", fd)].

    None when bdf has no IOMMU group (no IOMMU on this machine): the caller
    falls back to the module's DMA buffers, not DMA-isolated.  Raises
    VfioError (an OSError) saying what to do.
    """
    group = iommu_group(bdf)
    if group is None:
        return None
    h = _held.get(label)
    if h is not None and h.bdf != bdf:
        # Its file names another device now: the old one goes back first.
        if not _try_release(h):
            raise VfioError(errno.EBUSY, "%s: %s is still held by its previous incarnation"
                            % (label, h.bdf))
        h = None
    if h is None:
        h = _take(label, bdf, group, take_from_kernel)
    return _incarnation_fds(h)
