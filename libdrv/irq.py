"""IRQ lines delivered as eventfd notifications (MINIX IRQCTL + IRQ_REENABLE).

The kernel masks the line when it fires; after quieting the device, the driver
calls reenable().  fileno() goes into the libdrv event loop.
"""
import os
import select

from libdrv._rsdrv import RawEndpoint


class _EventfdIrq:
    """What both kinds share: an eventfd the kernel signals, for the driver's loop."""
    _efd = -1

    def fileno(self):
        return self._efd

    def take(self):
        """Interrupts signalled since the last take (0 if none); does not block."""
        try:
            return os.eventfd_read(self._efd)
        except BlockingIOError:
            return 0

    def wait(self, timeout=None):
        """Block up to timeout seconds; returns the count taken (0 on timeout)."""
        ready, _, _ = select.select([self._efd], [], [], timeout)
        return self.take() if ready else 0

    def _unbind(self):
        raise NotImplementedError

    def close(self):
        if self._efd >= 0:
            try:
                self._unbind()
            finally:
                os.close(self._efd)
                self._efd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class IrqLine(_EventfdIrq):
    """An ISA/legacy line through the rsdrv module."""

    def __init__(self, endpoint, irq):
        if not isinstance(endpoint, RawEndpoint):
            raise TypeError("IrqLine needs an rsdrv Endpoint")
        self.ep = endpoint
        self.irq = irq
        self._efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            endpoint.irq_bind(irq, self._efd)
        except BaseException:
            os.close(self._efd)
            raise

    def reenable(self):
        self.ep.irq_reenable(self.irq)

    def _unbind(self):
        if self.ep.fd >= 0:
            self.ep.irq_unbind(self.irq)


class VfioIrq(_EventfdIrq):
    """A VFIO device's interrupt (INTx by default, or MSI vector 0) on an eventfd.

    vfio-pci masks INTx when it fires (a level-triggered line stays asserted
    until the device is quieted); after quieting the device, the driver
    calls unmask().  MSI is edge-like: unmask() is a no-op for it.
    fileno() goes into the driver's loop (SEF.add_reader).
    """

    def __init__(self, device, index=0):
        from libdrv import vfio_abi as abi
        self._abi = abi
        self.device = device
        self.index = index
        flags, count = device.irq_info(index)
        if count < 1 or not flags & abi.VFIO_IRQ_INFO_EVENTFD:
            raise ValueError(f"the device has no eventfd interrupt at index {index}")
        self.maskable = bool(flags & abi.VFIO_IRQ_INFO_MASKABLE)
        self._efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            device.set_irqs(index, abi.VFIO_IRQ_SET_DATA_EVENTFD | abi.VFIO_IRQ_SET_ACTION_TRIGGER,
                            fds=[self._efd])
        except BaseException:
            os.close(self._efd)
            raise

    def unmask(self):
        if self.maskable and self.index == self._abi.VFIO_PCI_INTX_IRQ_INDEX:
            self.device.set_irqs(self.index, self._abi.VFIO_IRQ_SET_DATA_NONE
                                 | self._abi.VFIO_IRQ_SET_ACTION_UNMASK, count=1)

    def _unbind(self):
        if self.device.fd >= 0:
            self.device.set_irqs(self.index, self._abi.VFIO_IRQ_SET_DATA_NONE
                                 | self._abi.VFIO_IRQ_SET_ACTION_TRIGGER, count=0)
