# The block front end <-> disk driver shared memory (libdrv/blkshm.h, docs/block.md),
# for the Cython data paths on both sides: `from libdrv.blkshm cimport *`.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, int32_t, uint64_t

cdef extern from "blkshm.h" nogil:
    enum:
        BLKSHM_MAGIC
        BLKSHM_VERSION
        BLKSHM_PAGE
        BLKSHM_SLOTS
        BLKSHM_DATA_SIZE
        BLKSHM_IO_MAX
        BLKSHM_DATA_ALIGN
        BLKSHM_HDR_OFF
        BLKSHM_SQ_OFF
        BLKSHM_CQ_OFF
        BLKSHM_DATA_OFF
        BLKSHM_SIZE
        BLKSHM_OP_READ
        BLKSHM_OP_WRITE
        BLKSHM_OP_FLUSH
        BLKSHM_OP_DISCARD
        BLKSHM_F_FUA

    struct blkshm_req:
        uint64_t lba
        uint32_t count
        uint32_t data_off
        uint32_t tag
        uint8_t op
        uint8_t flags
        uint16_t pad0
        uint64_t pad1

    struct blkshm_cpl:
        uint32_t tag
        int32_t status

    struct blkshm_header:
        uint32_t magic, version, size
        uint32_t slots, data_size, io_max
        uint32_t generation
        uint32_t sq_posted
        uint32_t cq_consumed
        uint32_t frontend_idle
        uint32_t sq_taken
        uint32_t cq_posted
        uint32_t driver_idle

    void blkshm_barrier()
    void blkshm_store(uint32_t *p, uint32_t v)
    uint32_t blkshm_load(uint32_t *p)
