"""DMA memory for a driver's device.

DmaBuffer: coherent buffers from the rsdrv module for the endpoint's PCI
device (no IOMMU isolation: the endpoint is reported "DMA-NOT-ISOLATED" in
/sys/kernel/debug/rsdrv/endpoints).  IommuBuffer: the driver's own memory,
mapped for its device at an IOVA through its VFIO container (docs/vfio.md).
"""
import ctypes as _ctypes
import mmap as _mmap

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


# -- DMA memory behind an IOMMU (VFIO) ------------------------------------------------------
_MAP_HUGETLB = 0x40000        # <asm-generic/mman.h>; Python's mmap module does not export it
_HUGE_PAGE = 2 << 20


class IommuBuffer:
    """Memory this process allocates and lets its device reach at an IOVA it chose.

    An anonymous mapping (or, with fd, a shared mapping of that file: memory
    a front end shares, which the device then reads and writes in place) (2 MiB huge pages with hugepage=True), pinned and
    entered into the incarnation's IOMMU container by VFIO_IOMMU_MAP_DMA; the
    device reaches it at .iova and nothing else of memory.  MADV_DONTFORK: a
    forked child gets no copy of pinned pages.  close() unmaps it from the
    IOMMU, then from the process; the container going away with the
    incarnation unmaps whatever is left.
    """

    def __init__(self, container, size, iova, hugepage=False, fd=None):
        page = _HUGE_PAGE if hugepage else _mmap.PAGESIZE
        if size <= 0:
            raise ValueError("a DMA buffer needs a positive size")
        size = -(-size // page) * page
        container.check_iova(iova, size)
        if fd is None:
            flags = _mmap.MAP_PRIVATE | _mmap.MAP_ANONYMOUS | (_MAP_HUGETLB if hugepage else 0)
            self.map = _mmap.mmap(-1, size, flags, _mmap.PROT_READ | _mmap.PROT_WRITE)
        else:   # memory shared with another process (a front end's memfd)
            self.map = _mmap.mmap(fd, size, _mmap.MAP_SHARED, _mmap.PROT_READ | _mmap.PROT_WRITE)
        self.map.madvise(_mmap.MADV_DONTFORK)
        anchor = _ctypes.c_char.from_buffer(self.map)
        self.vaddr = _ctypes.addressof(anchor)
        del anchor   # it holds a buffer export; the address stays valid while the map is open
        self.container, self.size, self.iova = container, size, iova
        self.mapped = False
        try:
            container.map_dma(self.vaddr, iova, size)
        except BaseException:
            self.map.close()
            raise
        self.mapped = True
        self.view = memoryview(self.map)

    def contains(self, iova, length=1):
        """True if [iova, iova + length) is inside this buffer (the driver's own check)."""
        return self.iova <= iova and iova + length <= self.iova + self.size

    def iova_of(self, offset):
        if not 0 <= offset < self.size:
            raise ValueError(f"offset {offset:#x} outside a {self.size:#x}-byte buffer")
        return self.iova + offset

    def close(self):
        if self.mapped:
            self.mapped = False
            if self.container.fd >= 0:
                self.container.unmap_dma(self.iova, self.size)
        if self.map is not None:
            self.view.release()
            self.map.close()
            self.map = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
