"""The memory a block front end shares with its disk driver (libdrv/blkshm.h).

    from libdrv import blkshm
    fd = blkshm.create(generation)        # front end: a sealed memfd, header filled in
    blkshm.check_fd(fd)                   # driver: the size and seals it relies on

The layout, the counters and who may write what are described in blkshm.h;
the data paths (drivers/ahci/_port.pyx, frontends/_nbdio.pyx) cimport the
same declarations (libdrv/blkshm.pxd).  This module gives Python code the
constants and the memfd's creation and checks.
"""
import errno
import os
import struct

from libc.stdint cimport uint32_t

from libdrv import sealedmem

MAGIC = BLKSHM_MAGIC
VERSION = BLKSHM_VERSION
SIZE = BLKSHM_SIZE
SLOTS = BLKSHM_SLOTS
DATA_SIZE = BLKSHM_DATA_SIZE
IO_MAX = BLKSHM_IO_MAX
DATA_ALIGN = BLKSHM_DATA_ALIGN
SQ_OFF = BLKSHM_SQ_OFF
CQ_OFF = BLKSHM_CQ_OFF
DATA_OFF = BLKSHM_DATA_OFF
OP_READ = BLKSHM_OP_READ
OP_WRITE = BLKSHM_OP_WRITE
OP_FLUSH = BLKSHM_OP_FLUSH
OP_DISCARD = BLKSHM_OP_DISCARD
F_FUA = BLKSHM_F_FUA
# The statuses a completion may carry (blkshm.h); anything else is a broken driver.
STATUSES = frozenset((0, -errno.EIO, -errno.EINVAL, -errno.EOPNOTSUPP))

_HEADER = struct.Struct("<7I")


class BlkshmError(Exception):
    """The shared memory is not what blkshm.h says: refuse the peer."""


def create(uint32_t generation=0):
    """A new sealed memfd of SIZE bytes with its header filled in (the front end's side)."""
    return sealedmem.create("rsd-blkshm", SIZE,
                            _HEADER.pack(MAGIC, VERSION, SIZE, SLOTS, DATA_SIZE, IO_MAX, generation))


def stamp(fd, uint32_t generation):
    """Write the attach count into a memfd made earlier (a spare kept ready)."""
    os.pwrite(fd, struct.pack("<I", generation), 24)


def check_fd(fd):
    """Refuse an fd that is not a sealed memfd of SIZE bytes with our header (the driver's side)."""
    try:
        sealedmem.check(fd, SIZE)
    except ValueError as exc:
        raise BlkshmError(str(exc)) from None
    magic, version, hsize, slots, data_size, io_max, _ = _HEADER.unpack(os.pread(fd, _HEADER.size, 0))
    if (magic, version, hsize, slots, data_size, io_max) != (MAGIC, VERSION, SIZE, SLOTS, DATA_SIZE, IO_MAX):
        raise BlkshmError("the shared memory's header does not match this driver's layout "
                          f"(magic {magic:#x} version {version}); front end and driver differ")
