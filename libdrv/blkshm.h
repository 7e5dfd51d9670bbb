/*
 * The memory a block front end shares with its disk driver (docs/block.md).
 *
 * The front end creates one sealed memfd of BLKSHM_SIZE bytes per attach and
 * hands it to the driver with two eventfds.  The driver maps it MAP_SHARED
 * and enters the whole of it into its IOMMU container at one IOVA, so the
 * device reads write data from, and writes read data into, the data area in
 * place: the only copy is the front end's, between the NBD socket and the
 * data area.
 *
 * Layout (offsets from the start; every area page aligned):
 *   BLKSHM_HDR_OFF    struct blkshm_header
 *   BLKSHM_SQ_OFF     struct blkshm_req [BLKSHM_SLOTS]     front end writes
 *   BLKSHM_CQ_OFF     struct blkshm_cpl [BLKSHM_SLOTS]     driver writes
 *   BLKSHM_DATA_OFF   BLKSHM_DATA_SIZE bytes of request data (write data: front end;
 *                     read data: the device)
 *
 * Counters are free-running uint32 (they wrap; compare by difference).  Each
 * side writes only its own counters and keeps the authoritative copy in
 * private memory; what it reads of the other side's is checked before use
 * (the other side may be buggy or hostile).
 *
 * Submission (front end -> driver): the front end fills
 * sq[sq_posted % SLOTS] and then bumps sq_posted.  The driver copies entries
 * sq_taken .. sq_posted-1 out (it never reads an entry twice) and bumps
 * sq_taken.  Requests are started in submission order; the device may
 * complete them in any order, except around a FLUSH: the driver starts a
 * FLUSH only when every request submitted before it has completed, and starts
 * nothing submitted after it until the FLUSH has completed.
 *
 * Completion (driver -> front end): for each request, exactly once, the
 * driver fills cq[cq_posted % SLOTS] = {tag, status} and then bumps
 * cq_posted.  The front end consumes entries up to cq_posted and bumps
 * cq_consumed.  The front end never has more than SLOTS requests between
 * submitting one and consuming its completion, so neither ring can overrun.
 *
 * Invariants the driver checks: sq_posted - sq_taken <= SLOTS; cq_posted -
 * cq_consumed <= SLOTS before it posts; cq_consumed moves forward only, never
 * past cq_posted; op is one of BLKSHM_OP_*; for READ and WRITE 1 <= count,
 * count * block_size <= BLKSHM_IO_MAX, data_off is BLKSHM_DATA_ALIGN aligned,
 * data_off + count * block_size <= DATA_SIZE; lba + count <= the capacity it
 * reported (for DISCARD too).  A request that breaks them completes with
 * -EINVAL (the driver never touches the device for it).  A broken counter
 * means a broken front end: the driver drops the attach.
 * The front end checks: cq_posted moves forward only, by at most the number
 * of requests outstanding; each tag names a request outstanding at this
 * attach, completed once; status is 0 or one of the errnos below.
 *
 * Status: 0, or a negative errno: -EIO (the device failed it: a media or
 * task-file error), -EINVAL (refused: out of range or malformed), -EOPNOTSUPP
 * (the device cannot: DISCARD without TRIM, FUA without support).
 *
 * Doorbells: the front end writes 1 to the driver's eventfd after it moved
 * sq_posted or cq_consumed (once per batch); the driver writes 1 to the front
 * end's eventfd after it moved cq_posted (once per batch).  A side may skip
 * the write while the other's *_idle flag is 0 (it is awake and will look
 * again before it sleeps): the sleeper sets its flag to 1, looks at the
 * counters once more, then sleeps.
 */
#ifndef RSD_BLKSHM_H
#define RSD_BLKSHM_H

#include <stdint.h>

#define BLKSHM_MAGIC          0x4d48534bu     /* "KSHM" */
#define BLKSHM_VERSION        1u
#define BLKSHM_PAGE           4096u

#define BLKSHM_SLOTS          64u             /* power of two; more than AHCI's 32 NCQ tags */
#define BLKSHM_DATA_SIZE      (6u << 20)      /* with the driver's own DMA memory, under 8 MiB of memlock */
#define BLKSHM_IO_MAX         (1u << 20)      /* largest request; the front end splits bigger ones */
#define BLKSHM_DATA_ALIGN     4096u

#define BLKSHM_HDR_OFF        0u
#define BLKSHM_SQ_OFF         BLKSHM_PAGE
#define BLKSHM_CQ_OFF         (BLKSHM_SQ_OFF + BLKSHM_PAGE)
#define BLKSHM_DATA_OFF       (BLKSHM_CQ_OFF + BLKSHM_PAGE)
#define BLKSHM_SIZE           (BLKSHM_DATA_OFF + BLKSHM_DATA_SIZE)

/* op */
#define BLKSHM_OP_READ        1u
#define BLKSHM_OP_WRITE       2u
#define BLKSHM_OP_FLUSH       3u              /* lba and count 0 */
#define BLKSHM_OP_DISCARD     4u              /* count blocks from lba; no data */

/* flags */
#define BLKSHM_F_FUA          0x01u           /* WRITE: on stable media before it completes */

struct blkshm_req {
    uint64_t lba;        /* first logical block */
    uint32_t count;      /* logical blocks */
    uint32_t data_off;   /* into the data area (not the memfd) */
    uint32_t tag;        /* the front end's name for it, echoed in its completion */
    uint8_t op;
    uint8_t flags;
    uint16_t pad0;
    uint64_t pad1;
};

struct blkshm_cpl {
    uint32_t tag;
    int32_t status;      /* 0 or a negative errno */
};

struct blkshm_header {
    uint32_t magic, version, size;
    uint32_t slots, data_size, io_max;
    uint32_t generation;        /* the front end's attach count, for logs */
    uint8_t pad0[64 - 7 * 4];
    /* written by the front end only */
    volatile uint32_t sq_posted;
    volatile uint32_t cq_consumed;
    volatile uint32_t frontend_idle;
    uint8_t pad1[64 - 3 * 4];
    /* written by the driver only */
    volatile uint32_t sq_taken;
    volatile uint32_t cq_posted;
    volatile uint32_t driver_idle;
    uint8_t pad2[64 - 3 * 4];
};

_Static_assert(sizeof(struct blkshm_req) == 32, "blkshm_req layout");
_Static_assert(sizeof(struct blkshm_header) == 192, "blkshm_header layout");
_Static_assert(BLKSHM_SLOTS * sizeof(struct blkshm_req) <= BLKSHM_PAGE, "sq fits its page");
_Static_assert(BLKSHM_SLOTS * sizeof(struct blkshm_cpl) <= BLKSHM_PAGE, "cq fits its page");

#define blkshm_barrier()      __atomic_thread_fence(__ATOMIC_SEQ_CST)
#define blkshm_store(p, v)    __atomic_store_n((p), (v), __ATOMIC_RELEASE)
#define blkshm_load(p)        __atomic_load_n((p), __ATOMIC_ACQUIRE)

#endif
