"""IRQ lines delivered as eventfd notifications (MINIX IRQCTL + IRQ_REENABLE).

The kernel masks the line when it fires; after quieting the device, the driver
calls reenable().  fileno() goes into the libdrv event loop.
"""
import os
import select

from libdrv._rsdrv import RawEndpoint


class IrqLine:
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

    def reenable(self):
        self.ep.irq_reenable(self.irq)

    def close(self):
        if self._efd >= 0:
            try:
                if self.ep.fd >= 0:
                    self.ep.irq_unbind(self.irq)
            finally:
                os.close(self._efd)
                self._efd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
