/*
 * The memory a character (serial) front end shares with its driver (docs/serial.md).
 *
 * The front end creates one sealed memfd of CHRSHM_SIZE bytes at each attach
 * and hands it to the driver with two eventfds (the driver's doorbell, then
 * the front end's).  Both sides map it MAP_SHARED.  Bytes move through two
 * byte rings; everything else a port does (line settings, modem lines,
 * break, flushes, drain) is a request on the service socket.
 *
 * Layout (offsets from the start; every area page aligned):
 *   CHRSHM_HDR_OFF    struct chrshm_header
 *   CHRSHM_RX_OFF     CHRSHM_RX_SIZE bytes: received from the line   driver writes
 *   CHRSHM_TX_OFF     CHRSHM_TX_SIZE bytes: to send on the line      front end writes
 *
 * Counters are free-running uint32 byte counts (they wrap; compare by
 * difference); byte k of a stream is at ring[k % SIZE].  Each side writes
 * only its own fields and keeps the authoritative copy of its counters in
 * private memory: what it reads of the other side's is checked before use
 * (the other side may be buggy or hostile).
 *
 * RX (line -> front end): the driver writes received bytes at rx_produced
 * and then bumps it; the front end hands bytes rx_consumed .. rx_produced-1
 * to applications and bumps rx_consumed.  When the ring is full the driver
 * stops reading the UART (the FIFO fills; with rtscts it drops RTS) until
 * the front end consumes: no byte is dropped in the ring.  Bytes the UART
 * itself lost (FIFO overrun) are counted in icount.overrun.
 * The front end checks: rx_produced - rx_consumed <= RX_SIZE and
 * rx_produced moves forward only.  The driver checks: rx_consumed moves
 * forward only, never past rx_produced.
 *
 * TX (front end -> line): the front end writes bytes at tx_posted and then
 * bumps it; the driver hands bytes tx_done .. tx_posted-1 to the UART in
 * order and bumps tx_done as it does (tx_done: handed to the transmitter;
 * whether they have left the shift register is the drain request's
 * business).  The driver checks: tx_posted - tx_done <= TX_SIZE and
 * tx_posted moves forward only.  The front end checks: tx_done moves
 * forward only, never past tx_posted.  A flush request (TCOFLUSH) makes
 * the driver set tx_done = tx_posted without sending.
 *
 * Port state the driver publishes (for TIOCMGET, TIOCGICOUNT, TIOCMIWAIT
 * without a request): msr is the last modem status register read, mcr the
 * modem control register as programmed, lsr_temt 1 when the transmitter
 * was last seen empty (FIFO and shift register) with nothing left in the
 * ring; icount is struct serial_icounter_struct's counting (linux/serial.h),
 * each field free-running.  state_seq is bumped after any of them changed.
 *
 * Doorbells: the front end writes 1 to the driver's eventfd after it moved
 * tx_posted or rx_consumed (once per batch); the driver writes 1 to the front
 * end's eventfd after it moved tx_done or rx_produced or state_seq (once per
 * batch).  A side may skip the write while the other's *_idle flag is 0 (it
 * is awake and will look again before it sleeps): the sleeper sets its flag
 * nonzero, looks at the counters once more, then sleeps.  A change of
 * state_seq always rings (modem-line waiters are asleep on purpose).
 * driver_idle says what the sleeping driver waits for: CHRSHM_IDLE_TX (1)
 * only tx_posted (a front end may skip the write for rx_consumed alone: the
 * driver is not holding RX back); CHRSHM_IDLE_RX (2) tx_posted and
 * rx_consumed (the RX ring was full, or an XOFF went out: it waits for room).
 * Ringing whenever driver_idle is nonzero is always correct.
 *
 * At attach all four counters are 0 (the driver refuses anything else); the
 * front end posts bytes it held only after the attach's reply.
 */
#ifndef RSD_CHRSHM_H
#define RSD_CHRSHM_H

#include <stddef.h>
#include <stdint.h>

#define CHRSHM_MAGIC          0x4d485343u     /* "CSHM" */
#define CHRSHM_VERSION        1u
#define CHRSHM_PAGE           4096u

#define CHRSHM_IDLE_AWAKE     0u
#define CHRSHM_IDLE_TX        1u              /* driver_idle: asleep, waits for tx_posted */
#define CHRSHM_IDLE_RX        2u              /* driver_idle: asleep, waits for tx_posted and rx_consumed */

#define CHRSHM_RX_SIZE        (64u << 10)     /* power of two */
#define CHRSHM_TX_SIZE        (64u << 10)     /* power of two */

#define CHRSHM_HDR_OFF        0u
#define CHRSHM_RX_OFF         CHRSHM_PAGE
#define CHRSHM_TX_OFF         (CHRSHM_RX_OFF + CHRSHM_RX_SIZE)
#define CHRSHM_SIZE           (CHRSHM_TX_OFF + CHRSHM_TX_SIZE)

/* The modem lines' counting, as struct serial_icounter_struct has it. */
struct chrshm_icount {
    uint32_t cts, dsr, rng, dcd;     /* transitions of each input line */
    uint32_t rx, tx;                 /* bytes received from / handed to the UART */
    uint32_t frame, overrun, parity, brk;
    uint32_t buf_overrun;            /* bytes the driver could not keep (0 by design: it stops reading) */
};

struct chrshm_header {
    uint32_t magic, version, size;
    uint32_t rx_size, tx_size;
    uint32_t generation;        /* the front end's attach count, for logs */
    uint8_t pad0[64 - 6 * 4];
    /* written by the front end only */
    volatile uint32_t tx_posted;
    volatile uint32_t rx_consumed;
    volatile uint32_t frontend_idle;
    uint8_t pad1[64 - 3 * 4];
    /* written by the driver only */
    volatile uint32_t tx_done;
    volatile uint32_t rx_produced;
    volatile uint32_t driver_idle;
    volatile uint32_t state_seq;
    volatile uint32_t msr;
    volatile uint32_t mcr;
    volatile uint32_t lsr_temt;
    uint8_t pad2[64 - 7 * 4];
    volatile struct chrshm_icount icount;
    uint8_t pad3[64 - 11 * 4];
};

_Static_assert(sizeof(struct chrshm_header) == 256, "chrshm_header layout");
_Static_assert(offsetof(struct chrshm_header, tx_posted) == 64, "front end's counters at 64");
_Static_assert(offsetof(struct chrshm_header, tx_done) == 128, "driver's counters at 128");
_Static_assert(offsetof(struct chrshm_header, icount) == 192, "icount at 192");
_Static_assert((CHRSHM_RX_SIZE & (CHRSHM_RX_SIZE - 1)) == 0, "rx ring size a power of two");
_Static_assert((CHRSHM_TX_SIZE & (CHRSHM_TX_SIZE - 1)) == 0, "tx ring size a power of two");

/* Ordering between the data and the counters (x86 is TSO; the compiler must not reorder). */
#define chrshm_barrier()      __atomic_thread_fence(__ATOMIC_SEQ_CST)
#define chrshm_store(p, v)    __atomic_store_n((p), (v), __ATOMIC_RELEASE)
#define chrshm_load(p)        __atomic_load_n((p), __ATOMIC_ACQUIRE)

#endif
