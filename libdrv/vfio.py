"""A driver's PCI device through the VFIO fds rsd handed it (docs/vfio.md).

    from libdrv.vfio import VfioDevice
    dev = VfioDevice.inherited()            # RSD_RESOURCE_FDS vfio_container=N,vfio_device=M
    bar0 = dev.bar(0)                       # libdrv.pci.Bar: read32/write32 on the mmap
    cfg = dev.config                        # libdrv.pci.ConfigSpace
    mem = dev.dma(65536, iova=0x100000000)  # libdrv.dma.IommuBuffer, mapped for the device
    irq = dev.irq()                         # libdrv.irq.VfioIrq: INTx (or MSI) on an eventfd

The driver opens nothing: the container (its IOMMU domain, TYPE1v2 already
set) and the device come from rsd.  Every mapping it makes is in that
container, which rsd discards with the incarnation: a new incarnation
starts with no mappings.
"""

import ctypes
import errno
import os

from libdrv import vfio_abi as abi
from libdrv.vfio_abi import VfioError, ioctl

CONTAINER_NAME = "vfio_container"
DEVICE_NAME = "vfio_device"


def resource_fds(env=None):
    """{name: fd} from RSD_RESOURCE_FDS ("name=fd,...")."""
    env = os.environ if env is None else env
    out = {}
    for item in filter(None, env.get("RSD_RESOURCE_FDS", "").split(",")):
        name, _, fd = item.partition("=")
        out[name] = int(fd)
    return out


class Container:
    """The incarnation's IOMMU container: DMA mappings at IOVAs the driver picks."""

    def __init__(self, fd):
        self.fd = fd
        self._ranges = None
        self._pgsizes = None

    def fileno(self):
        return self.fd

    def _info(self):
        info = abi.vfio_iommu_type1_info.new()
        ioctl(self.fd, abi.VFIO_IOMMU_GET_INFO, info, "VFIO_IOMMU_GET_INFO")
        ranges = []
        if info.flags & abi.VFIO_IOMMU_INFO_CAPS and info.argsz > ctypes.sizeof(info):
            buf = (ctypes.c_uint8 * info.argsz)()
            head = abi.vfio_iommu_type1_info.from_buffer(buf)
            head.argsz = info.argsz
            ioctl(self.fd, abi.VFIO_IOMMU_GET_INFO, buf, "VFIO_IOMMU_GET_INFO")
            off = head.cap_offset
            while off and off + ctypes.sizeof(abi.vfio_info_cap_header) <= len(buf):
                cap = abi.vfio_info_cap_header.from_buffer(buf, off)
                if cap.id == abi.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE:
                    r = abi.vfio_iommu_type1_info_cap_iova_range.from_buffer(buf, off)
                    first = off + ctypes.sizeof(r)
                    for i in range(r.nr_iovas):
                        e = abi.vfio_iova_range.from_buffer(buf, first + i * ctypes.sizeof(abi.vfio_iova_range))
                        ranges.append((e.start, e.end))
                off = cap.next
        self._pgsizes = info.iova_pgsizes if info.flags & abi.VFIO_IOMMU_INFO_PGSIZES else 4096
        self._ranges = ranges or [(0, (1 << 64) - 1)]

    @property
    def iova_ranges(self):
        """[(first, last)] the IOMMU can translate (the MSI window and the like are holes)."""
        if self._ranges is None:
            self._info()
        return list(self._ranges)

    @property
    def page_sizes(self):
        if self._pgsizes is None:
            self._info()
        return self._pgsizes

    def check_iova(self, iova, size):
        """ValueError unless [iova, iova + size) is page aligned and inside one translatable range."""
        page = self.page_sizes & -self.page_sizes   # the smallest page the IOMMU maps
        if size <= 0 or iova % page or size % page:
            raise ValueError(f"IOVA {iova:#x}+{size:#x}: must be whole {page}-byte pages")
        if not any(first <= iova and iova + size - 1 <= last for first, last in self.iova_ranges):
            raise ValueError(f"IOVA {iova:#x}+{size:#x} is outside the IOMMU's ranges "
                             + ", ".join(f"{a:#x}-{b:#x}" for a, b in self.iova_ranges))

    def map_dma(self, vaddr, iova, size, readable=True, writable=True):
        """Let the device reach [vaddr, vaddr + size) of this process at iova (pins the pages)."""
        self.check_iova(iova, size)
        m = abi.vfio_iommu_type1_dma_map.new(vaddr=vaddr, iova=iova, size=size,
                                             flags=(abi.VFIO_DMA_MAP_FLAG_READ if readable else 0)
                                             | (abi.VFIO_DMA_MAP_FLAG_WRITE if writable else 0))
        try:
            ioctl(self.fd, abi.VFIO_IOMMU_MAP_DMA, m, "VFIO_IOMMU_MAP_DMA")
        except VfioError as exc:
            if exc.errno == errno.ENOMEM:  # ENOMEM: the pinned pages count against RLIMIT_MEMLOCK
                import resource
                soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
                raise VfioError(exc.errno, f"VFIO_IOMMU_MAP_DMA of {size} bytes: out of locked "
                                f"memory (RLIMIT_MEMLOCK {soft} bytes for this process: raise "
                                "LimitMEMLOCK= in rsd.service, see docs/vfio.md)") from None
            raise VfioError(exc.errno, f"VFIO_IOMMU_MAP_DMA {iova:#x}+{size:#x}: {exc.strerror}") from None

    def unmap_dma(self, iova, size):
        u = abi.vfio_iommu_type1_dma_unmap.new(iova=iova, size=size)
        ioctl(self.fd, abi.VFIO_IOMMU_UNMAP_DMA, u, "VFIO_IOMMU_UNMAP_DMA")
        return u.size

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Region:
    """One region of the device (a BAR, config space, ROM): where it is in the device fd."""

    def __init__(self, index, flags, size, offset):
        self.index, self.flags, self.size, self.offset = index, flags, size, offset

    readable = property(lambda self: bool(self.flags & abi.VFIO_REGION_INFO_FLAG_READ))
    writable = property(lambda self: bool(self.flags & abi.VFIO_REGION_INFO_FLAG_WRITE))
    mappable = property(lambda self: bool(self.flags & abi.VFIO_REGION_INFO_FLAG_MMAP))

    def __repr__(self):
        return f"Region({self.index}, size={self.size:#x}, offset={self.offset:#x}, flags={self.flags:#x})"


class VfioDevice:
    """The device fd (and the container it was opened in)."""

    def __init__(self, container_fd, device_fd):
        self.container = Container(container_fd)
        self.fd = device_fd
        info = abi.vfio_device_info.new()
        ioctl(self.fd, abi.VFIO_DEVICE_GET_INFO, info, "VFIO_DEVICE_GET_INFO")
        if not info.flags & abi.VFIO_DEVICE_FLAGS_PCI:
            raise VfioError(errno.ENODEV, "the VFIO device is not a PCI device")
        self.flags = info.flags
        self.num_regions = info.num_regions
        self.num_irqs = info.num_irqs
        self._config = None

    @classmethod
    def inherited(cls, env=None):
        """The device rsd handed this incarnation (RSD_RESOURCE_FDS)."""
        fds = resource_fds(env)
        if CONTAINER_NAME not in fds or DEVICE_NAME not in fds:
            raise VfioError(errno.EBADF, "no VFIO device was handed to this process (RSD_RESOURCE_FDS has "
                            f"{', '.join(fds) or 'nothing'}); name it in [resources] pci")
        return cls(fds[CONTAINER_NAME], fds[DEVICE_NAME])

    def fileno(self):
        return self.fd

    @property
    def can_reset(self):
        return bool(self.flags & abi.VFIO_DEVICE_FLAGS_RESET)

    def reset(self):
        """A function reset (VFIO_DEVICE_RESET); only where can_reset."""
        ioctl(self.fd, abi.VFIO_DEVICE_RESET, None, "VFIO_DEVICE_RESET")

    def region(self, index):
        if not 0 <= index < self.num_regions:
            raise ValueError(f"region {index}: the device has regions 0..{self.num_regions - 1}")
        r = abi.vfio_region_info.new(index=index)
        ioctl(self.fd, abi.VFIO_DEVICE_GET_REGION_INFO, r, "VFIO_DEVICE_GET_REGION_INFO")
        return Region(index, r.flags, r.size, r.offset)

    def irq_info(self, index):
        i = abi.vfio_irq_info.new(index=index)
        ioctl(self.fd, abi.VFIO_DEVICE_GET_IRQ_INFO, i, "VFIO_DEVICE_GET_IRQ_INFO")
        return i.flags, i.count

    def set_irqs(self, index, flags, start=0, fds=None, count=None):
        """VFIO_DEVICE_SET_IRQS with eventfds (fds), or no data (count)."""
        data = list(fds or ())
        n = len(data) if count is None else count
        buf = (ctypes.c_uint8 * (ctypes.sizeof(abi.vfio_irq_set) + 4 * len(data)))()
        head = abi.vfio_irq_set.from_buffer(buf)
        head.argsz = len(buf)
        head.flags = flags
        head.index = index
        head.start = start
        head.count = n
        if data:
            arr = (ctypes.c_int32 * len(data)).from_buffer(buf, ctypes.sizeof(abi.vfio_irq_set))
            arr[:] = data
        ioctl(self.fd, abi.VFIO_DEVICE_SET_IRQS, buf, "VFIO_DEVICE_SET_IRQS")

    # -- what drivers use (their own modules) -----------------------------------------
    @property
    def config(self):
        if self._config is None:
            from libdrv.pci import ConfigSpace
            self._config = ConfigSpace.of_vfio(self)
        return self._config

    def bar(self, index):
        from libdrv.pci import Bar
        return Bar.of_vfio(self, index)

    def dma(self, size, iova, hugepage=False, fd=None):
        """DMA memory at iova: anonymous, or a shared mapping of fd (a front end's memfd)."""
        from libdrv.dma import IommuBuffer
        return IommuBuffer(self.container, size, iova, hugepage=hugepage, fd=fd)

    def irq(self, index=abi.VFIO_PCI_INTX_IRQ_INDEX):
        from libdrv.irq import VfioIrq
        return VfioIrq(self, index)

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.container.close()
