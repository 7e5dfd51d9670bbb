"""Coherent DMA buffers for the endpoint's PCI device (no IOMMU isolation: the
endpoint is reported "DMA-NOT-ISOLATED" in /sys/kernel/debug/rsdrv/endpoints)."""
import mmap

from libdrv._rsdrv import RawEndpoint


class DmaBuffer:
    def __init__(self, endpoint, size):
        if not isinstance(endpoint, RawEndpoint):
            raise TypeError("DmaBuffer needs an rsdrv Endpoint with a PCI device")
        d = endpoint.dma_alloc(size)
        self.id = d["id"]
        self.size = d["size"]
        self.bus_addr = d["bus_addr"]          # what to program into the device
        self.map = mmap.mmap(endpoint.fileno(), self.size, mmap.MAP_SHARED,
                             mmap.PROT_READ | mmap.PROT_WRITE, offset=d["mmap_offset"])
        self.view = memoryview(self.map)

    def close(self):
        """Unmap; the memory itself is freed when the endpoint is closed."""
        self.view.release()
        self.map.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
