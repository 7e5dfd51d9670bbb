# The front end <-> network driver shared memory (libdrv/netshm.h, docs/net.md),
# for the Cython data paths on both sides: `from libdrv.netshm cimport *`.
from libc.stdint cimport uint8_t, uint16_t, uint32_t

cdef extern from "netshm.h" nogil:
    enum:
        NETSHM_MAGIC
        NETSHM_VERSION
        NETSHM_PAGE
        NETSHM_TX_SLOTS
        NETSHM_RX_BUFS
        NETSHM_RX_BUF_SIZE
        NETSHM_RX_FRAME_BUFS
        NETSHM_TX_DATA_SIZE
        NETSHM_VNET_HDR_LEN
        NETSHM_TX_FRAME_MAX
        NETSHM_TX_ALIGN
        NETSHM_HDR_OFF
        NETSHM_TXQ_OFF
        NETSHM_RXQ_OFF
        NETSHM_RXBUF_OFF
        NETSHM_TXDATA_OFF
        NETSHM_SIZE
        NETSHM_RX_EOP
        NETSHM_RX_CSUM_OK
        NETSHM_RX_ERROR

    struct netshm_tx_entry:
        uint32_t off
        uint32_t len

    struct netshm_rx_entry:
        uint16_t len
        uint8_t flags
        uint8_t pad

    struct netshm_header:
        uint32_t magic, version, size
        uint32_t tx_slots, rx_bufs, rx_buf_size, tx_data_size
        uint32_t generation
        uint32_t tx_posted
        uint32_t rx_consumed
        uint32_t frontend_idle
        uint32_t tx_done
        uint32_t rx_produced
        uint32_t driver_idle

    void netshm_barrier()
    void netshm_store(uint32_t *p, uint32_t v)
    uint32_t netshm_load(uint32_t *p)
