"""A PCI device on a machine without an IOMMU: uio_pci_generic plus the rsdrv module's DMA buffers.

    dev = UioDevice.inherited()     # RSD_RESOURCE_FDS uio=N,pci_config=N,pci_bar0=N,...,rsdrv=N
    bar = dev.bar(0)                # libdrv.pci.Bar: the BAR's sysfs resource file, mmap'ed
    dev.config.enable(master=True)  # libdrv.pci.ConfigSpace over the sysfs config file
    irq = dev.irq()                 # INTx through /dev/uioN (its fd for the loop)
    buf = dev.dma(size)             # coherent memory from the module: .vaddr, .iova (the bus address)

rsd (rsd/uio.py) binds the device to uio_pci_generic and opens, as root,
/dev/uioN, the device's sysfs config file and a resourceN file per memory
BAR; the driver opens nothing privileged.  The same shape as
libdrv.vfio.VfioDevice, so a driver runs on either; what differs is what
the device can reach: with no IOMMU every bus address is reachable, so
the driver programs the device only with the module's buffers and copies
a front end's memory through them (a bounce), and rsd reports the service
as not DMA-isolated.

INTx: uio_pci_generic masks the function's interrupt (the command
register's INTx-disable bit, so a shared line keeps serving the others)
when it fires and counts it on /dev/uioN; the driver reads the count,
quiets the device, and unmasks by clearing the bit through the config
file (uio_pci_generic has no irqcontrol: a write to /dev/uioN is ENOSYS).
"""

import ctypes
import errno
import os

from libdrv.dma import DmaBuffer
from libdrv.pci import Bar, ConfigSpace
from libdrv.rsdrv import Endpoint
from libdrv.vfio import resource_fds

UIO_NAME = "uio"
CONFIG_NAME = "pci_config"
BAR_NAME = "pci_bar%d"


class UioDevice:
    def __init__(self, uio_fd, config_fd, bar_fds, endpoint):
        self.fd = uio_fd
        self.bar_fds = dict(bar_fds)
        self.endpoint = endpoint
        self.config = ConfigSpace(config_fd, 0, os.fstat(config_fd).st_size)

    @classmethod
    def inherited(cls, env=None):
        """The device rsd handed this incarnation (RSD_RESOURCE_FDS)."""
        fds = resource_fds(env)
        if UIO_NAME not in fds or CONFIG_NAME not in fds:
            raise OSError(errno.EBADF, "no UIO device was handed to this process (RSD_RESOURCE_FDS has "
                          f"{', '.join(fds) or 'nothing'}); name it in [resources] pci")
        bars = {i: fds[BAR_NAME % i] for i in range(6) if BAR_NAME % i in fds}
        return cls(fds[UIO_NAME], fds[CONFIG_NAME], bars, Endpoint.inherited(env))

    def fileno(self):
        return self.fd

    def bar(self, index):
        fd = self.bar_fds.get(index)
        if fd is None:
            raise ValueError(f"BAR {index} was not handed over (memory BARs: {sorted(self.bar_fds)})")
        return Bar(fd, index, 0, os.fstat(fd).st_size, True)

    def dma(self, size, iova=None, hugepage=False, fd=None):
        """Coherent memory from the module; iova is ignored: the device sees it at its bus address."""
        if fd is not None:
            raise ValueError("without an IOMMU a front end's memory cannot be given to the device; "
                             "copy through a buffer from dma()")
        return ModuleDma(self.endpoint, size)

    def irq(self):
        return UioIrq(self.fd)

    def close(self):
        for fd in [self.fd, self.config.fd, *self.bar_fds.values()]:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fd = -1
        self.endpoint.close()


class ModuleDma(DmaBuffer):
    """A DmaBuffer with the names VFIO's buffers have (.vaddr, .iova) for the driver's data path."""

    def __init__(self, endpoint, size):
        super().__init__(endpoint, size)
        anchor = ctypes.c_char.from_buffer(self.map)
        self.vaddr = ctypes.addressof(anchor)
        del anchor
        self.iova = self.bus_addr

    def contains(self, iova, length=1):
        return self.iova <= iova and iova + length <= self.iova + self.size


class UioIrq:
    """INTx of a uio_pci_generic device: /dev/uioN, for the driver's loop.  Reading the count
    and unmasking (the command register through the config file) are the driver's data path's
    (drivers/e1000/_rings.pyx), once per interrupt in C."""

    maskable = True

    def __init__(self, fd):
        os.set_blocking(fd, False)
        self.fd = fd

    def fileno(self):
        return self.fd

    def close(self):
        pass
