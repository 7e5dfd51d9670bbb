"""The memory a serial front end shares with its driver (libdrv/chrshm.h).

    from libdrv import chrshm
    fd = chrshm.create(generation)        # front end: a sealed memfd, header filled in
    chrshm.check_fd(fd)                   # driver: the size and seals it relies on
    chrshm.snapshot(buf)                  # anyone holding a mapping: the counters, as a dict

The layout, the counters and who may write what are described in chrshm.h;
the data paths (the 16550 driver's and the front ends' Cython) cimport the
same declarations (libdrv/chrshm.pxd).  This module gives Python code the
constants, the memfd's creation and checks, and a read-only look at the
header for status reports and tests.
"""
import os
import struct

from libc.stdint cimport uint32_t
from libc.string cimport memcpy

from libdrv import sealedmem

MAGIC = CHRSHM_MAGIC
VERSION = CHRSHM_VERSION
SIZE = CHRSHM_SIZE
RX_SIZE = CHRSHM_RX_SIZE
TX_SIZE = CHRSHM_TX_SIZE
RX_OFF = CHRSHM_RX_OFF
TX_OFF = CHRSHM_TX_OFF
IDLE_AWAKE = CHRSHM_IDLE_AWAKE
IDLE_TX = CHRSHM_IDLE_TX
IDLE_RX = CHRSHM_IDLE_RX
# Header offsets of the counters (chrshm.h), for Python that looks at a mapping.
TX_POSTED_OFF, RX_CONSUMED_OFF, FRONTEND_IDLE_OFF = 64, 68, 72
TX_DONE_OFF, RX_PRODUCED_OFF, DRIVER_IDLE_OFF, STATE_SEQ_OFF = 128, 132, 136, 140

_HEAD = struct.Struct("<6I")
ICOUNT_FIELDS = ("cts", "dsr", "rng", "dcd", "rx", "tx", "frame", "overrun", "parity", "brk", "buf_overrun")


class ChrshmError(Exception):
    """The shared memory is not what chrshm.h says: refuse the peer."""


def create(uint32_t generation=0):
    """A new sealed memfd of SIZE bytes with its header filled in (the front end's side)."""
    return sealedmem.create("rsd-chrshm", SIZE, _HEAD.pack(MAGIC, VERSION, SIZE, RX_SIZE, TX_SIZE, generation))


def check_fd(fd):
    """Refuse an fd that is not a sealed memfd of SIZE bytes with our header (the driver's side)."""
    try:
        sealedmem.check(fd, SIZE)
    except ValueError as exc:
        raise ChrshmError(str(exc)) from None
    magic, version, hsize, rx_size, tx_size = struct.unpack("<5I", os.pread(fd, 20, 0))
    if (magic, version, hsize, rx_size, tx_size) != (MAGIC, VERSION, SIZE, RX_SIZE, TX_SIZE):
        raise ChrshmError("the shared memory's header does not match this driver's layout "
                          f"(magic {magic:#x} version {version}); front end and driver differ")


def snapshot(const unsigned char[:] buf):
    """The header's counters and port state from a mapping of the memfd (at least its first page)."""
    cdef chrshm_header h
    if buf.shape[0] < sizeof(chrshm_header):
        raise ValueError("a chrshm mapping is at least %d bytes" % sizeof(chrshm_header))
    memcpy(&h, &buf[0], sizeof(chrshm_header))
    ic = h.icount
    return {
        "generation": h.generation,
        "tx_posted": h.tx_posted, "rx_consumed": h.rx_consumed, "frontend_idle": h.frontend_idle,
        "tx_done": h.tx_done, "rx_produced": h.rx_produced, "driver_idle": h.driver_idle,
        "state_seq": h.state_seq, "msr": h.msr, "mcr": h.mcr, "lsr_temt": h.lsr_temt,
        "icount": {"cts": ic.cts, "dsr": ic.dsr, "rng": ic.rng, "dcd": ic.dcd, "rx": ic.rx, "tx": ic.tx,
                   "frame": ic.frame, "overrun": ic.overrun, "parity": ic.parity, "brk": ic.brk,
                   "buf_overrun": ic.buf_overrun},
    }
