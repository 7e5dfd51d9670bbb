"""Physical memory ranges of the privilege entry, mapped uncached (e.g. VGA text memory)."""
import mmap

from libdrv._rsdrv import RawEndpoint
from libdrv.rsdrv_errors import NotPermitted


class MappedRegion:
    """A shared mapping of an endpoint: .map (mmap) and .view (memoryview).

    The module makes it VM_DONTCOPY | VM_IO: a forked child does not get it (and
    madvise(MADV_DOFORK) is refused), so device memory and DMA buffers stay the driver's."""

    def _map(self, endpoint, size, offset):
        self.map = mmap.mmap(endpoint.fileno(), size, mmap.MAP_SHARED,
                             mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
        self.view = memoryview(self.map)

    def close(self):
        self.view.release()
        self.map.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class PhysMem(MappedRegion):
    def __init__(self, endpoint, phys, size):
        if not isinstance(endpoint, RawEndpoint):
            raise TypeError("PhysMem needs an rsdrv Endpoint")
        if phys % mmap.PAGESIZE or size % mmap.PAGESIZE or size <= 0:
            raise ValueError(f"{phys:#x}+{size:#x}: physical ranges are mapped in whole pages")
        self.phys = phys
        self.size = size
        try:
            self._map(endpoint, size, phys)
        except PermissionError as e:
            raise NotPermitted(e.errno, f"rsdrv: map {phys:#x}+{size:#x}: not in this "
                                        "endpoint's memory ranges") from None
