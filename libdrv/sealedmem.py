"""Sealed memfds: the memory a front end shares with its driver (libdrv/netshm, libdrv/blkshm).

    fd = create("rsd-blkshm", size, header)     # allocated, header written, sealed
    check(fd, size)                              # the peer's: the size and the seals relied on

The seals both sides rely on: nobody can shrink the memfd under the other's
mapping (a shrunk mapping is SIGBUS on access) or grow it, and the seals are
final.  check() raises ValueError saying what is wrong (callers turn it into
their own error).
"""

import fcntl
import mmap
import os

REQUIRED_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
PAGE = 4096


def create(name, size, header):
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        # Every page allocated (and zeroed) now, not when a driver pins them for its device:
        # that would be on the restart's critical path.
        os.posix_fallocate(fd, 0, size)
        m = mmap.mmap(fd, PAGE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            m[:len(header)] = header
        finally:
            m.close()
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, REQUIRED_SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check(fd, size):
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError as exc:
        raise ValueError(f"the shared memory is not a sealable memfd ({exc.strerror})") from None
    if seals & REQUIRED_SEALS != REQUIRED_SEALS:
        raise ValueError(f"the shared memory's seals are {seals:#x}, not {REQUIRED_SEALS:#x} "
                         "(shrink, grow and seal sealed)")
    actual = os.fstat(fd).st_size
    if actual != size:
        raise ValueError(f"the shared memory is {actual} bytes, not {size}")
