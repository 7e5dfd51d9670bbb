"""The VFIO user ABI, from <linux/vfio.h>: ioctl numbers, flags, struct layouts.

One module holds every number and layout that rsd (rsd/vfio.py) and the
drivers (libdrv/vfio.py, libdrv/pci.py) use, so they cannot drift apart.
The values are the uapi header's (the ABI is fixed); the layouts are ctypes
Structures with the header's field order and widths, checked against the
header itself (sizes and numbers, compiled) in tests/host/test_vfio_host.py.

No library wraps this ABI for Python (DPDK, SPDK and ixy each carry their
own copy in C), so it is written here; only set-up paths use it.
"""

import ctypes
import os

VFIO_API_VERSION = 0
_TYPE = ord(";")   # VFIO_TYPE
_BASE = 100        # VFIO_BASE


def _io(n):
    """_IO(VFIO_TYPE, VFIO_BASE + n): VFIO encodes no size or direction in its numbers."""
    return (_TYPE << 8) | (_BASE + n)


# -- extensions and IOMMU types (VFIO_CHECK_EXTENSION, VFIO_SET_IOMMU) --------------
VFIO_TYPE1_IOMMU = 1
VFIO_TYPE1v2_IOMMU = 3
VFIO_NOIOMMU_IOMMU = 8
VFIO_UNMAP_ALL = 9

# -- the container (/dev/vfio/vfio) -------------------------------------------------
VFIO_GET_API_VERSION = _io(0)
VFIO_CHECK_EXTENSION = _io(1)
VFIO_SET_IOMMU = _io(2)
VFIO_IOMMU_GET_INFO = _io(12)
VFIO_IOMMU_MAP_DMA = _io(13)
VFIO_IOMMU_UNMAP_DMA = _io(14)

# -- the group (/dev/vfio/N) ----------------------------------------------------------
VFIO_GROUP_GET_STATUS = _io(3)
VFIO_GROUP_SET_CONTAINER = _io(4)
VFIO_GROUP_UNSET_CONTAINER = _io(5)
VFIO_GROUP_GET_DEVICE_FD = _io(6)
VFIO_GROUP_FLAGS_VIABLE = 1 << 0
VFIO_GROUP_FLAGS_CONTAINER_SET = 1 << 1

# -- the device ---------------------------------------------------------------------
VFIO_DEVICE_GET_INFO = _io(7)
VFIO_DEVICE_GET_REGION_INFO = _io(8)
VFIO_DEVICE_GET_IRQ_INFO = _io(9)
VFIO_DEVICE_SET_IRQS = _io(10)
VFIO_DEVICE_RESET = _io(11)
VFIO_DEVICE_FLAGS_RESET = 1 << 0
VFIO_DEVICE_FLAGS_PCI = 1 << 1

VFIO_REGION_INFO_FLAG_READ = 1 << 0
VFIO_REGION_INFO_FLAG_WRITE = 1 << 1
VFIO_REGION_INFO_FLAG_MMAP = 1 << 2
VFIO_REGION_INFO_FLAG_CAPS = 1 << 3

VFIO_IRQ_INFO_EVENTFD = 1 << 0
VFIO_IRQ_INFO_MASKABLE = 1 << 1
VFIO_IRQ_INFO_AUTOMASKED = 1 << 2
VFIO_IRQ_INFO_NORESIZE = 1 << 3

VFIO_IRQ_SET_DATA_NONE = 1 << 0
VFIO_IRQ_SET_DATA_BOOL = 1 << 1
VFIO_IRQ_SET_DATA_EVENTFD = 1 << 2
VFIO_IRQ_SET_ACTION_MASK = 1 << 3
VFIO_IRQ_SET_ACTION_UNMASK = 1 << 4
VFIO_IRQ_SET_ACTION_TRIGGER = 1 << 5

# vfio-pci's fixed region and IRQ indexes
VFIO_PCI_BAR0_REGION_INDEX = 0
VFIO_PCI_BAR5_REGION_INDEX = 5
VFIO_PCI_ROM_REGION_INDEX = 6
VFIO_PCI_CONFIG_REGION_INDEX = 7
VFIO_PCI_VGA_REGION_INDEX = 8
VFIO_PCI_NUM_REGIONS = 9
VFIO_PCI_INTX_IRQ_INDEX = 0
VFIO_PCI_MSI_IRQ_INDEX = 1
VFIO_PCI_MSIX_IRQ_INDEX = 2
VFIO_PCI_ERR_IRQ_INDEX = 3
VFIO_PCI_REQ_IRQ_INDEX = 4

# -- the type1 IOMMU ------------------------------------------------------------------
VFIO_IOMMU_INFO_PGSIZES = 1 << 0
VFIO_IOMMU_INFO_CAPS = 1 << 1
VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE = 1
VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL = 3
VFIO_DMA_MAP_FLAG_READ = 1 << 0
VFIO_DMA_MAP_FLAG_WRITE = 1 << 1
VFIO_DMA_UNMAP_FLAG_ALL = 1 << 1

u8, u16, u32, u64, s32 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64, ctypes.c_int32


class _Struct(ctypes.Structure):
    """A uapi struct whose first field is argsz (set to its own size by new())."""

    @classmethod
    def new(cls, **fields):
        s = cls(**fields)
        if "argsz" in dict(cls._fields_):
            s.argsz = ctypes.sizeof(cls)
        return s


class vfio_info_cap_header(_Struct):
    _fields_ = [("id", u16), ("version", u16), ("next", u32)]


class vfio_group_status(_Struct):
    _fields_ = [("argsz", u32), ("flags", u32)]


class vfio_device_info(_Struct):
    _fields_ = [("argsz", u32), ("flags", u32), ("num_regions", u32), ("num_irqs", u32),
                ("cap_offset", u32)]


class vfio_region_info(_Struct):
    _fields_ = [("argsz", u32), ("flags", u32), ("index", u32), ("cap_offset", u32),
                ("size", u64), ("offset", u64)]


class vfio_irq_info(_Struct):
    _fields_ = [("argsz", u32), ("flags", u32), ("index", u32), ("count", u32)]


class vfio_irq_set(_Struct):
    """The header; data[] (eventfds as s32, or bools as u8) follows it in the same buffer."""
    _fields_ = [("argsz", u32), ("flags", u32), ("index", u32), ("start", u32), ("count", u32)]


class vfio_iommu_type1_info(_Struct):
    _fields_ = [("argsz", u32), ("flags", u32), ("iova_pgsizes", u64), ("cap_offset", u32)]


class vfio_iova_range(_Struct):
    _fields_ = [("start", u64), ("end", u64)]


class vfio_iommu_type1_info_cap_iova_range(_Struct):
    """Header; nr_iovas vfio_iova_range entries follow."""
    _fields_ = [("header", vfio_info_cap_header), ("nr_iovas", u32), ("reserved", u32)]


class vfio_iommu_type1_info_dma_avail(_Struct):
    _fields_ = [("header", vfio_info_cap_header), ("avail", u32)]


class vfio_iommu_type1_dma_map(_Struct):
    _fields_ = [("argsz", u32), ("flags", u32), ("vaddr", u64), ("iova", u64), ("size", u64)]


class vfio_iommu_type1_dma_unmap(_Struct):
    _fields_ = [("argsz", u32), ("flags", u32), ("iova", u64), ("size", u64)]


_libc = ctypes.CDLL(None, use_errno=True)


class VfioError(OSError):
    """A VFIO call failed; the message names it (and, where rsd or libdrv knows, what to do)."""


def ioctl(fd, request, arg=None, what="ioctl"):
    """ioctl(2) with an int, nothing, or a ctypes object passed by reference; returns its result.

    ctypes rather than fcntl.ioctl: several VFIO calls return a new fd (or a
    count) as the call's result, which fcntl.ioctl hides for a bytes argument.
    """
    if arg is None or isinstance(arg, int):
        ptr = ctypes.c_ulong(arg or 0)
    else:
        ptr = ctypes.byref(arg)
    ret = _libc.ioctl(ctypes.c_int(fd), ctypes.c_ulong(request), ptr)
    if ret < 0:
        err = ctypes.get_errno()
        raise VfioError(err, "%s: %s" % (what, os.strerror(err)))
    return ret
