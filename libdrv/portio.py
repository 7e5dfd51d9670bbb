"""Port I/O through /dev/rsdrv (MINIX DEVIO / VDEVIO)."""
from libdrv._rsdrv import PioBatch, RawEndpoint


class PortIO:
    """The ports of one endpoint: single accesses, or a PioBatch in one system call."""

    def __init__(self, endpoint):
        if not isinstance(endpoint, RawEndpoint):
            raise TypeError("PortIO needs an rsdrv Endpoint (Endpoint.inherited() in a driver)")
        self.ep = endpoint

    def inb(self, port):
        return self.ep.pio_in(port, 1)

    def inw(self, port):
        return self.ep.pio_in(port, 2)

    def inl(self, port):
        return self.ep.pio_in(port, 4)

    def outb(self, port, value):
        self.ep.pio_out(port, 1, value)

    def outw(self, port, value):
        self.ep.pio_out(port, 2, value)

    def outl(self, port, value):
        self.ep.pio_out(port, 4, value)

    @staticmethod
    def batch(capacity=64):
        return PioBatch(capacity)

    def run(self, batch):
        """Do every access of the batch, in order, in one ioctl (all or nothing)."""
        self.ep.vpio(batch)
        return batch
