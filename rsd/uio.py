"""A service's PCI device on a machine without an IOMMU: rsd's side, as root (docs/vfio.md).

With no IOMMU group there is no VFIO: rsd binds the device to
uio_pci_generic instead (taking it from a kernel driver only when the
service file says take_from_kernel = true) and keeps it bound while the
service exists.  For every incarnation it opens /dev/uioN (INTx: the
interrupt count, and unmask by writing 1), the device's sysfs `config`
file and a `resourceN` file per memory BAR, and hands them over with an
rsdrv endpoint that holds the device for DMA buffers (rsd/spawn.py); the
driver opens nothing privileged (libdrv/uio.py).

What this cannot give: isolation.  The device can reach every bus
address, so a driver that programs it wrongly, or on purpose, can make it
write anywhere in memory.  rsd says so in its log and `rsctl status`
(DMA NOT ISOLATED).  A new incarnation finds the device in a known state
because the module clears bus mastering before it frees the last
incarnation's DMA buffers, and the driver resets the function's MAC
itself at init.

When the service goes rsd calls release(label): the device is unbound
from uio_pci_generic, driver_override restored, and given back to the
kernel driver rsd took it from, if any.
"""

import errno
import logging
import os

from rsd.vfio import PCI_DEVICES, PCI_DRIVERS, bind_to, current_driver

log = logging.getLogger("rsd.uio")

UIO_DRIVER = "uio_pci_generic"
IORESOURCE_MEM = 0x200          # <linux/ioport.h>, the flags column of sysfs `resource`


class Held:
    def __init__(self, label, bdf, original_driver, override):
        self.label, self.bdf = label, bdf
        self.original_driver, self.override = original_driver, override


_held = {}          # label -> Held


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)


def _bind(label, bdf, take_from_kernel):
    with open(os.path.join(PCI_DEVICES, bdf, "driver_override")) as f:
        override = f.read().strip()
    override = None if override == "(null)" else override
    driver = current_driver(bdf)
    if driver == UIO_DRIVER:
        return Held(label, bdf, None, override if override != UIO_DRIVER else None)
    if driver is None and override not in (None, ""):
        raise OSError(errno.EBUSY, "%s is claimed through driver_override=%s (an rsdrv endpoint "
                      "holds it?); rsd leaves it alone" % (bdf, override))
    bind_to(UIO_DRIVER, label, bdf, override, take_from_kernel,
            " (it needs a device with an INTx pin that can be masked)")
    log.info("%s: %s bound to uio_pci_generic (no IOMMU: DMA NOT ISOLATED)", label, bdf)
    return Held(label, bdf, driver, override)


def _memory_bars(bdf):
    """Indices of bdf's implemented memory BARs (sysfs `resource`: start end flags per line)."""
    out = []
    with open(os.path.join(PCI_DEVICES, bdf, "resource")) as f:
        for index, line in enumerate(f):
            if index > 5:
                break
            start, end, flags = (int(v, 16) for v in line.split())
            if flags & IORESOURCE_MEM and end > start:
                out.append(index)
    return out


def open_for_service(label, bdf, take_from_kernel=False):
    """The fds for label's next incarnation: [("uio", fd), ("pci_config", fd), ("pci_barN", fd)...].

    Raises OSError saying what to do.
    """
    h = _held.get(label)
    if h is not None and h.bdf != bdf:
        release(label)
        h = None
    if h is None:
        for other in _held.values():
            if other.bdf == bdf:
                raise OSError(errno.EBUSY, "%s is held by service %s" % (bdf, other.label))
        h = _held[label] = _bind(label, bdf, take_from_kernel)
    dev = os.path.join(PCI_DEVICES, bdf)
    try:
        names = os.listdir(os.path.join(dev, "uio"))
    except FileNotFoundError:
        names = []
    if len(names) != 1:
        raise OSError(errno.ENODEV, "%s: bound to uio_pci_generic but it has %s uio device" %
                      (bdf, len(names) or "no"))
    fds = []
    try:
        fds.append(("uio", os.open("/dev/" + names[0], os.O_RDWR | os.O_CLOEXEC)))
        fds.append(("pci_config", os.open(os.path.join(dev, "config"), os.O_RDWR | os.O_CLOEXEC)))
        for index in _memory_bars(bdf):
            fds.append(("pci_bar%d" % index, os.open(os.path.join(dev, "resource%d" % index),
                                                     os.O_RDWR | os.O_CLOEXEC)))
    except BaseException:
        for _, fd in fds:
            os.close(fd)
        raise
    return fds


def release(label):
    """label's service is gone: give its device back.  Always True (nothing to wait for: the
    module's endpoint, not this binding, is what a dying incarnation holds)."""
    h = _held.pop(label, None)
    if h is None:
        return True
    dev = os.path.join(PCI_DEVICES, h.bdf)
    try:
        if current_driver(h.bdf) == UIO_DRIVER:
            _write(os.path.join(dev, "driver", "unbind"), h.bdf)
        _write(os.path.join(dev, "driver_override"), (h.override or "") + "\n")
        if h.original_driver:
            _write(os.path.join(PCI_DRIVERS, h.original_driver, "bind"), h.bdf)
            log.info("%s: %s given back to the kernel driver %s", label, h.bdf, h.original_driver)
        else:
            log.info("%s: %s unbound from uio_pci_generic", label, h.bdf)
    except OSError as exc:
        log.error("%s: cannot give %s back: %s", label, h.bdf, exc)
    return True


def held(label):
    return _held.get(label)
