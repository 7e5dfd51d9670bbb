"""Coherent DMA buffers for the endpoint's PCI device (no IOMMU isolation: the
endpoint is reported "DMA-NOT-ISOLATED" in /sys/kernel/debug/rsdrv/endpoints)."""
from libdrv._rsdrv import RawEndpoint
from libdrv.physmem import MappedRegion


class DmaBuffer(MappedRegion):
    """close() unmaps; the memory itself is freed when the endpoint is closed."""

    def __init__(self, endpoint, size):
        if not isinstance(endpoint, RawEndpoint):
            raise TypeError("DmaBuffer needs an rsdrv Endpoint with a PCI device")
        d = endpoint.dma_alloc(size)
        self.id = d["id"]
        self.size = d["size"]
        self.bus_addr = d["bus_addr"]          # what to program into the device
        self._map(endpoint, self.size, d["mmap_offset"])
