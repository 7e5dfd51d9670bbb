# The serial front end <-> driver shared memory (libdrv/chrshm.h, docs/serial.md),
# for the Cython data paths on both sides: `from libdrv.chrshm cimport *`.
from libc.stdint cimport uint8_t, uint32_t

cdef extern from "chrshm.h" nogil:
    enum:
        CHRSHM_MAGIC
        CHRSHM_VERSION
        CHRSHM_PAGE
        CHRSHM_RX_SIZE
        CHRSHM_TX_SIZE
        CHRSHM_HDR_OFF
        CHRSHM_RX_OFF
        CHRSHM_TX_OFF
        CHRSHM_SIZE
        CHRSHM_IDLE_AWAKE
        CHRSHM_IDLE_TX
        CHRSHM_IDLE_RX

    struct chrshm_icount:
        uint32_t cts, dsr, rng, dcd
        uint32_t rx, tx
        uint32_t frame, overrun, parity, brk
        uint32_t buf_overrun

    struct chrshm_header:
        uint32_t magic, version, size
        uint32_t rx_size, tx_size
        uint32_t generation
        uint32_t tx_posted
        uint32_t rx_consumed
        uint32_t frontend_idle
        uint32_t tx_done
        uint32_t rx_produced
        uint32_t driver_idle
        uint32_t state_seq
        uint32_t msr
        uint32_t mcr
        uint32_t lsr_temt
        chrshm_icount icount

    void chrshm_barrier()
    void chrshm_store(uint32_t *p, uint32_t v)
    uint32_t chrshm_load(uint32_t *p)
