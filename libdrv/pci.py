"""PCI configuration space and BARs of a device handed to a driver.

Both are a window of some fd: with VFIO (libdrv.vfio.VfioDevice) the device
fd at its regions' offsets, where vfio-pci virtualises what a driver must
not change (the BARs' addresses, MSI's message address, ...) and passes
the rest through; without an IOMMU (libdrv.uio.UioDevice) the device's
sysfs `config` and `resourceN` files rsd opened.  Config space is read and
written with pread/pwrite; BARs are mmap'ed (MMIO: no system call per
access) or, where the fd cannot be mapped, read and written with
pread/pwrite.
"""

import mmap
import os
import struct

from libdrv import vfio_abi as abi

# Standard header offsets and bits (PCI Local Bus spec 3.0, 6.2)
VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION = 0x08
CLASS = 0x09
HEADER_TYPE = 0x0E
BAR0 = 0x10
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D
CAP_PTR = 0x34
COMMAND_IO = 1 << 0
COMMAND_MEMORY = 1 << 1
COMMAND_MASTER = 1 << 2
COMMAND_INTX_DISABLE = 1 << 10
STATUS_CAP_LIST = 1 << 4
STATUS_INTERRUPT = 1 << 3

_FMT = {1: "<B", 2: "<H", 4: "<I"}


class ConfigSpace:
    """Config space at offset..offset+size of fd."""

    def __init__(self, fd, offset, size):
        self.fd, self.offset, self.size = fd, offset, size

    @classmethod
    def of_vfio(cls, device):
        r = device.region(abi.VFIO_PCI_CONFIG_REGION_INDEX)
        return cls(device.fd, r.offset, r.size)

    def _check(self, offset, width):
        if width not in _FMT or offset % width or not 0 <= offset <= self.size - width:
            raise ValueError(f"config {offset:#x}/{width}: out of range or unaligned")

    def read(self, offset, width=4):
        self._check(offset, width)
        data = os.pread(self.fd, width, self.offset + offset)
        if len(data) != width:
            raise OSError(f"config read at {offset:#x}: {len(data)} of {width} bytes")
        return struct.unpack(_FMT[width], data)[0]

    def write(self, offset, value, width=4):
        self._check(offset, width)
        n = os.pwrite(self.fd, struct.pack(_FMT[width], value), self.offset + offset)
        if n != width:
            raise OSError(f"config write at {offset:#x}: {n} of {width} bytes")

    read8 = lambda self, off: self.read(off, 1)
    read16 = lambda self, off: self.read(off, 2)
    read32 = lambda self, off: self.read(off, 4)
    write8 = lambda self, off, v: self.write(off, v, 1)
    write16 = lambda self, off, v: self.write(off, v, 2)
    write32 = lambda self, off, v: self.write(off, v, 4)

    @property
    def ids(self):
        return self.read16(VENDOR_ID), self.read16(DEVICE_ID)

    def enable(self, master=True, memory=True, io=False, intx=True):
        """Set the command register: memory/I/O decoding, bus mastering (DMA), INTx."""
        cmd = self.read16(COMMAND)
        for bit, on in ((COMMAND_MEMORY, memory), (COMMAND_IO, io), (COMMAND_MASTER, master),
                        (COMMAND_INTX_DISABLE, not intx)):
            cmd = (cmd | bit) if on else (cmd & ~bit)
        self.write16(COMMAND, cmd)
        return cmd

    def capabilities(self):
        """{cap id: offset} of the standard capability list."""
        out = {}
        if not self.read16(STATUS) & STATUS_CAP_LIST:
            return out
        ptr, seen = self.read8(CAP_PTR) & ~3, 0
        while ptr and seen < 48:
            cid = self.read8(ptr)
            out.setdefault(cid, ptr)
            ptr = self.read8(ptr + 1) & ~3
            seen += 1
        return out


class Bar:
    """One BAR: size bytes at offset of fd; mmap'ed where mappable, read32/write32 either way."""

    def __init__(self, fd, index, offset, size, mappable):
        if size == 0:
            raise ValueError(f"BAR {index} is not implemented by this device")
        self.fd, self.index, self.offset, self.size = fd, index, offset, size
        self.map = None
        self.view = None
        if mappable:
            self.map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
            # 32-bit accesses, as MMIO registers want them (a memoryview cast does one load each).
            self.view = memoryview(self.map).cast("I")

    @classmethod
    def of_vfio(cls, device, index):
        if not abi.VFIO_PCI_BAR0_REGION_INDEX <= index <= abi.VFIO_PCI_BAR5_REGION_INDEX:
            raise ValueError(f"BAR {index}: BARs are 0..5")
        r = device.region(index)
        return cls(device.fd, index, r.offset, r.size, r.mappable)

    def read32(self, offset):
        if offset % 4 or not 0 <= offset <= self.size - 4:
            raise ValueError(f"BAR {self.index} offset {offset:#x}: out of range or unaligned")
        if self.view is not None:
            return self.view[offset >> 2]
        return struct.unpack("<I", os.pread(self.fd, 4, self.offset + offset))[0]

    def write32(self, offset, value):
        if offset % 4 or not 0 <= offset <= self.size - 4:
            raise ValueError(f"BAR {self.index} offset {offset:#x}: out of range or unaligned")
        if self.view is not None:
            self.view[offset >> 2] = value & 0xFFFFFFFF
        else:
            os.pwrite(self.fd, struct.pack("<I", value & 0xFFFFFFFF), self.offset + offset)

    def close(self):
        if self.view is not None:
            self.view.release()
            self.map.close()
            self.view = self.map = None
