/*
 * The memory a network front end shares with its driver (docs/net.md).
 *
 * The front end creates one sealed memfd of NETSHM_SIZE bytes and hands it
 * to the driver with two eventfds.  The driver maps it MAP_SHARED and enters
 * the whole of it into its IOMMU container at one IOVA, so the device reads
 * TX frames and writes RX frames in place: no copy in the driver.
 *
 * Layout (offsets from the start; every area page aligned):
 *   NETSHM_HDR_OFF      struct netshm_header
 *   NETSHM_TXQ_OFF      struct netshm_tx_entry [NETSHM_TX_SLOTS]   front end writes
 *   NETSHM_RXQ_OFF      struct netshm_rx_entry [NETSHM_RX_BUFS]    driver writes
 *   NETSHM_RXBUF_OFF    NETSHM_RX_BUFS buffers of NETSHM_RX_BUF_SIZE driver (device) writes
 *   NETSHM_TXDATA_OFF   NETSHM_TX_DATA_SIZE bytes of TX frames      front end writes
 *
 * Counters are free-running uint32 (they wrap; compare by difference).
 * Each side writes only its own counters and keeps the authoritative copy
 * in private memory: what it reads of the other side's is checked before use
 * (the other side may be buggy or hostile).
 *
 * TX (front end -> device):  the front end reads a frame from its TAP into
 * the TX data area at some off (12-byte virtio_net_hdr_v1 first, then the
 * Ethernet frame), fills txq[tx_posted % TX_SLOTS] = {off, len}, then bumps
 * tx_posted.  The driver puts entries tx_done .. tx_posted-1 on the device
 * in order and bumps tx_done once the device has finished with an entry
 * (its descriptors written back).  Frames are placed contiguously, 64-byte
 * aligned; an entry never wraps around the end of the data area.
 * Invariants the driver checks: tx_posted - tx_done <= TX_SLOTS; off is
 * 64-byte aligned, len >= 12 + 14, len <= NETSHM_TX_FRAME_MAX,
 * off + len <= TX_DATA_SIZE.  The front end checks: tx_done moves forward
 * only, by at most tx_posted - tx_done.
 *
 * RX (device -> front end): RX buffer k is the driver's RX descriptor k
 * (the driver's RX ring has NETSHM_RX_BUFS descriptors).  Buffers
 * rx_consumed .. rx_consumed + RX_BUFS - 1 (mod RX_BUFS) are the driver's;
 * when the device has written buffer k = rx_produced % RX_BUFS the driver
 * sets rxq[k] = {len, flags} and bumps rx_produced.  A frame longer than a
 * buffer spans consecutive buffers; the last one has NETSHM_RX_EOP.  The
 * front end writes complete frames to its TAP and bumps rx_consumed; the
 * driver hands buffers up to rx_consumed + RX_BUFS - 1 back to the device.
 * The front end checks: rx_produced - rx_consumed <= RX_BUFS, len <=
 * RX_BUF_SIZE, a frame of at most NETSHM_RX_FRAME_BUFS buffers.  The driver
 * checks: rx_consumed moves forward only, never past rx_produced.
 *
 * Doorbells: the front end writes 1 to the driver's eventfd after it moved
 * tx_posted or rx_consumed (once per batch); the driver writes 1 to the
 * front end's eventfd after it moved tx_done or rx_produced (once per
 * batch).  A side may skip the write while the other's *_idle flag is 0
 * (it is awake and will look again before it sleeps): the sleeper sets its
 * flag to 1, looks at the counters once more, then sleeps.
 */
#ifndef RSD_NETSHM_H
#define RSD_NETSHM_H

#include <stdint.h>

#define NETSHM_MAGIC          0x4d48534eu     /* "NSHM" */
#define NETSHM_VERSION        1u
#define NETSHM_PAGE           4096u

#define NETSHM_TX_SLOTS       512u            /* power of two */
#define NETSHM_RX_BUFS        512u            /* power of two: the driver's RX ring size */
#define NETSHM_RX_BUF_SIZE    2048u           /* e1000 RCTL.BSIZE 2048 */
#define NETSHM_RX_FRAME_BUFS  8u              /* 16 KiB: more than the 82540EM's jumbo frame */
#define NETSHM_TX_DATA_SIZE   (4u << 20)
#define NETSHM_VNET_HDR_LEN   12u             /* struct virtio_net_hdr_v1 (TUNSETVNETHDRSZ 12) */
#define NETSHM_TX_FRAME_MAX   (NETSHM_VNET_HDR_LEN + 65536u + 14u + 4u)  /* GSO frame from a TAP */
#define NETSHM_TX_ALIGN       64u

#define NETSHM_HDR_OFF        0u
#define NETSHM_TXQ_OFF        NETSHM_PAGE
#define NETSHM_RXQ_OFF        (NETSHM_TXQ_OFF + NETSHM_PAGE)
#define NETSHM_RXBUF_OFF      (NETSHM_RXQ_OFF + NETSHM_PAGE)
#define NETSHM_TXDATA_OFF     (NETSHM_RXBUF_OFF + NETSHM_RX_BUFS * NETSHM_RX_BUF_SIZE)
#define NETSHM_SIZE           (NETSHM_TXDATA_OFF + NETSHM_TX_DATA_SIZE)

/* rx entry flags */
#define NETSHM_RX_EOP         0x01u           /* last buffer of a frame */
#define NETSHM_RX_CSUM_OK     0x02u           /* the device verified the L4 checksum */
#define NETSHM_RX_ERROR       0x04u           /* the device flagged the frame bad: drop it */

struct netshm_tx_entry {
    uint32_t off;      /* into the TX data area (not the memfd) */
    uint32_t len;      /* virtio_net_hdr_v1 + frame */
};

struct netshm_rx_entry {
    uint16_t len;      /* bytes in this buffer */
    uint8_t flags;
    uint8_t pad;
};

struct netshm_header {
    uint32_t magic, version, size;
    uint32_t tx_slots, rx_bufs, rx_buf_size, tx_data_size;
    uint32_t generation;        /* the front end's attach count, for logs */
    uint8_t pad0[64 - 8 * 4];
    /* written by the front end only */
    volatile uint32_t tx_posted;
    volatile uint32_t rx_consumed;
    volatile uint32_t frontend_idle;
    uint8_t pad1[64 - 3 * 4];
    /* written by the driver only */
    volatile uint32_t tx_done;
    volatile uint32_t rx_produced;
    volatile uint32_t driver_idle;
    uint8_t pad2[64 - 3 * 4];
};

_Static_assert(sizeof(struct netshm_header) == 192, "netshm_header layout");
_Static_assert(NETSHM_TX_SLOTS * sizeof(struct netshm_tx_entry) <= NETSHM_PAGE, "txq fits its page");
_Static_assert(NETSHM_RX_BUFS * sizeof(struct netshm_rx_entry) <= NETSHM_PAGE, "rxq fits its page");

/* Ordering between the data and the counters (x86 is TSO; the compiler must not reorder). */
#define netshm_barrier()      __atomic_thread_fence(__ATOMIC_SEQ_CST)
#define netshm_store(p, v)    __atomic_store_n((p), (v), __ATOMIC_RELEASE)
#define netshm_load(p)        __atomic_load_n((p), __ATOMIC_ACQUIRE)

#endif
