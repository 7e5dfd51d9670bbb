"""The memory a network front end shares with its driver (libdrv/netshm.h).

    from libdrv import netshm
    fd = netshm.create(generation)        # front end: a sealed memfd, header filled in
    netshm.check_fd(fd)                   # driver: the size and seals it relies on

The layout, the counters and who may write what are described in netshm.h;
the data paths (drivers/e1000/_rings.pyx, frontends/_netio.pyx) cimport
the same declarations (libdrv/netshm.pxd).  This module gives Python code
the constants and the memfd's creation and checks.
"""
import os
import struct

from libc.stdint cimport uint32_t

from libdrv import sealedmem

MAGIC = NETSHM_MAGIC
VERSION = NETSHM_VERSION
SIZE = NETSHM_SIZE
TX_SLOTS = NETSHM_TX_SLOTS
RX_BUFS = NETSHM_RX_BUFS
RX_BUF_SIZE = NETSHM_RX_BUF_SIZE
RX_FRAME_BUFS = NETSHM_RX_FRAME_BUFS
TX_DATA_SIZE = NETSHM_TX_DATA_SIZE
VNET_HDR_LEN = NETSHM_VNET_HDR_LEN
TX_FRAME_MAX = NETSHM_TX_FRAME_MAX
TX_ALIGN = NETSHM_TX_ALIGN
TXQ_OFF = NETSHM_TXQ_OFF
RXQ_OFF = NETSHM_RXQ_OFF
RXBUF_OFF = NETSHM_RXBUF_OFF
TXDATA_OFF = NETSHM_TXDATA_OFF
RX_EOP = NETSHM_RX_EOP
RX_CSUM_OK = NETSHM_RX_CSUM_OK
RX_ERROR = NETSHM_RX_ERROR


class NetshmError(Exception):
    """The shared memory is not what netshm.h says: refuse the peer."""


def create(uint32_t generation=0):
    """A new sealed memfd of SIZE bytes with its header filled in (the front end's side)."""
    return sealedmem.create("rsd-netshm", SIZE, struct.pack("<8I", MAGIC, VERSION, SIZE, TX_SLOTS, RX_BUFS,
                                                          RX_BUF_SIZE, TX_DATA_SIZE, generation))


def stamp(fd, uint32_t generation):
    """Write the attach count into a memfd made earlier (a spare kept ready)."""
    os.pwrite(fd, struct.pack("<I", generation), 28)


def check_fd(fd):
    """Refuse an fd that is not a sealed memfd of SIZE bytes with our header (the driver's side)."""
    try:
        sealedmem.check(fd, SIZE)
    except ValueError as exc:
        raise NetshmError(str(exc)) from None
    head = os.pread(fd, 28, 0)
    magic, version, hsize, tx_slots, rx_bufs, rx_buf_size, tx_data = struct.unpack("<7I", head)
    if (magic, version, hsize, tx_slots, rx_bufs, rx_buf_size, tx_data) != (
            MAGIC, VERSION, SIZE, TX_SLOTS, RX_BUFS, RX_BUF_SIZE, TX_DATA_SIZE):
        raise NetshmError("the shared memory's header does not match this driver's layout "
                          f"(magic {magic:#x} version {version}); front end and driver differ")
