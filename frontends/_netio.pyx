# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The network front end's data path (libdrv/netshm.h): TAP <-> shared memory.

    dp = DataPath(tap_fd, memfd)     # map the TX area now: the TAP is read before any driver
    dp.remap(new_memfd)              # a new incarnation's memory: unconfirmed TX frames copied in
    dp.attach(driver_bell_fd, our_bell_fd)  # -> tx_done for the attach message
    dp.on_rare(handler)              # service() calls handler(what, detail) for what needs Python
    dp.service()                     # one wake-up: doorbell read, tx_done, RX -> TAP (GRO), TAP -> TX, ring
    dp.pull_tap()                    # TAP -> TX area, until EAGAIN or full
    fault = dp.poll_driver()         # tx_done reaped, RX frames -> TAP; a string when the driver lied
    dp.detach()                      # the driver died: its completed RX frames delivered, the rest counted
    dp.counters()                    # {name: count}

All loops are C (no Python per frame).  Everything the driver writes is
read once into a local and checked before use: the counters against our
private copies (tx_done forward only and never past tx_posted, rx_produced
at most RX_BUFS ahead of rx_consumed) and each RX entry's length against
its buffer.  The TX queue's authoritative copy (off, len per slot) is
private, so nothing the driver scribbles into the shared txq can make us
copy or account outside the TX data area.

RX does software GRO within each batch: consecutive in-order TCP segments
of one flow go to the TAP as one GSO frame (NEEDS_CSUM: the stack trusts
its checksum), so each segment's IPv4 and TCP checksums are verified here
first and a wrong one is written alone, for the stack to drop.  The
super-frame's headers are a private copy (the driver may rewrite its
buffers under us); its payloads are written from the RX buffers in place.
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy, memset, strerror
from libc.errno cimport errno, EAGAIN, EINTR, EINVAL
from libdrv.netshm cimport *

cdef extern from "<sys/types.h>" nogil:
    ctypedef long ssize_t
    ctypedef long off_t

cdef extern from "<unistd.h>" nogil:
    ssize_t read(int fd, void *buf, size_t n)
    ssize_t write(int fd, const void *buf, size_t n)

cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void *iov_base
        size_t iov_len
    ssize_t writev(int fd, const iovec *iov, int iovcnt)

cdef extern from "<sys/mman.h>" nogil:
    void *mmap(void *addr, size_t length, int prot, int flags, int fd, off_t offset)
    int munmap(void *addr, size_t length)
    int PROT_READ, PROT_WRITE, MAP_SHARED
    void *MAP_FAILED

cdef extern from *:
    """
    #include <string.h>
    #include <arpa/inet.h>
    #include <sys/uio.h>

    /* One RX entry as a single 32-bit load: the driver may rewrite it while we
       look, so its len and flags must come from the same read, read once. */
    static inline uint32_t netio_load_rx_entry(const struct netshm_rx_entry *e) {
        return __atomic_load_n((const uint32_t *)e, __ATOMIC_ACQUIRE);
    }

    /* Software GRO: consecutive in-order TCP segments of one flow become one
       GSO frame, so the stack runs its receive path once per 64 KiB instead of
       once per 1500 bytes (what the kernel's own e1000 driver gets from
       napi_gro_receive). */
    #define NETIO_GRO_MAX_SEGS 64
    #define NETIO_HDR_MAX (14 + 40 + 60)   /* Ethernet + IPv6 (or IPv4 + options: refused) + TCP */
    #define NETIO_GSO_MAX 65535u           /* the IP length field (and tun's 64 KiB) bounds a super-frame */

    struct netio_seg {
        uint8_t hdr[NETIO_HDR_MAX];   /* private copy: the driver may rewrite the buffer while we look */
        const uint8_t *frame;         /* in the shared RX buffer */
        uint32_t frame_len;
        uint32_t l4_off, hdr_len, payload_len, seq;
        int v6;
    };

    struct netio_gro {
        struct netio_seg first;       /* its headers, adjusted, head the super-frame */
        uint32_t nsegs, mss, payload, next_seq, bytes;
        uint16_t next_id;
        int closed;                   /* a short or PSH segment ended the run */
        uint8_t psh;
        uint8_t vnet[12];
        struct iovec iov[2 + NETIO_GRO_MAX_SEGS];
        const uint8_t *frames[NETIO_GRO_MAX_SEGS];   /* to write them one by one if tun refuses the whole */
        uint32_t frame_lens[NETIO_GRO_MAX_SEGS];
    };

    /* One's complement sum of native-order words: folded, it is the sum as the
       packet's bytes hold it (RFC 1071's byte-order independence). */
    static inline uint64_t netio_sum(uint64_t sum, const uint8_t *p, size_t n) {
        uint32_t w;
        uint16_t h = 0;
        while (n >= 4) { memcpy(&w, p, 4); sum += w; p += 4; n -= 4; }
        if (n >= 2) { memcpy(&h, p, 2); sum += h; p += 2; n -= 2; }
        if (n) { h = 0; memcpy(&h, p, 1); sum += h; }
        return sum;
    }

    static inline uint16_t netio_fold(uint64_t sum) {
        while (sum >> 16)
            sum = (sum & 0xffff) + (sum >> 16);
        return (uint16_t)sum;
    }

    static inline uint32_t netio_be32(const uint8_t *p) {
        return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
    }

    static inline uint64_t netio_pseudo(const uint8_t *hdr, int v6, uint32_t l4_len) {
        uint64_t sum = netio_sum(0, hdr + (v6 ? 14 + 8 : 14 + 12), v6 ? 32 : 8);
        return sum + htons(6) + htons((uint16_t)l4_len);
    }

    /* 1: a TCP segment GRO may merge, its IP and TCP checksums right; -1: such a
       segment with a wrong checksum (never merged: a GSO frame's checksum is
       trusted); 0: anything else. */
    static int netio_parse_tcp(const uint8_t *frame, uint32_t len, struct netio_seg *s) {
        const uint8_t *h = s->hdr, *th;
        uint32_t ip_hlen, l4_len, tcp_hlen;
        uint64_t sum;
        if (len < 14 + 20 + 20)
            return 0;
        memcpy(s->hdr, frame, len < NETIO_HDR_MAX ? len : NETIO_HDR_MAX);
        s->frame = frame;
        s->frame_len = len;
        if (h[12] == 0x08 && h[13] == 0x00) {
            if (h[14] != 0x45 || h[14 + 9] != 6)
                return 0;                                 /* IP options, not TCP */
            if (((h[14 + 6] << 8 | h[14 + 7]) & 0x3fff) != 0)
                return 0;                                 /* a fragment */
            l4_len = (uint32_t)(h[14 + 2] << 8 | h[14 + 3]);
            if (l4_len < 20 + 20 || 14 + l4_len > len)
                return 0;
            l4_len -= 20;
            ip_hlen = 20;
            s->v6 = 0;
        } else if (h[12] == 0x86 && h[13] == 0xdd) {
            if ((h[14] >> 4) != 6 || h[14 + 6] != 6)
                return 0;                                 /* extension headers */
            l4_len = (uint32_t)(h[14 + 4] << 8 | h[14 + 5]);
            if (l4_len < 20 || 14 + 40 + l4_len > len)
                return 0;
            ip_hlen = 40;
            s->v6 = 1;
        } else {
            return 0;
        }
        s->l4_off = 14 + ip_hlen;
        th = h + s->l4_off;
        tcp_hlen = (uint32_t)(th[12] >> 4) * 4;
        if (tcp_hlen < 20 || tcp_hlen > l4_len || (th[12] & 0x0f) != 0)
            return 0;
        if ((th[13] & ~0x08) != 0x10)
            return 0;                                     /* flags other than ACK and PSH */
        s->hdr_len = s->l4_off + tcp_hlen;
        s->payload_len = l4_len - tcp_hlen;
        if (s->payload_len == 0)
            return 0;
        s->seq = netio_be32(th + 4);
        if (!s->v6 && netio_fold(netio_sum(0, h + 14, 20)) != 0xffff)
            return -1;
        sum = netio_pseudo(h, s->v6, l4_len);
        sum = netio_sum(sum, th, tcp_hlen);
        sum = netio_sum(sum, frame + s->hdr_len, s->payload_len);
        return netio_fold(sum) == 0xffff ? 1 : -1;
    }

    static void netio_gro_start(struct netio_gro *g, const struct netio_seg *s) {
        const uint8_t *th = s->hdr + s->l4_off;
        g->first = *s;
        g->nsegs = 1;
        g->mss = s->payload_len;
        g->payload = s->payload_len;
        g->bytes = s->frame_len;
        g->next_seq = s->seq + s->payload_len;
        g->next_id = (uint16_t)((s->hdr[18] << 8 | s->hdr[19]) + 1);
        g->psh = th[13] & 0x08;
        g->closed = g->psh != 0;
        g->iov[2].iov_base = (void *)(s->frame + s->hdr_len);
        g->iov[2].iov_len = s->payload_len;
        g->frames[0] = s->frame;
        g->frame_lens[0] = s->frame_len;
    }

    /* Whether s continues g's run: the same flow and headers (only the IP ID,
       lengths and checksums, the sequence number and PSH may differ), the next
       sequence number, at most the run's MSS. */
    static int netio_gro_fits(const struct netio_gro *g, const struct netio_seg *s) {
        const uint8_t *a = g->first.hdr, *b = s->hdr;
        const uint8_t *ta = a + g->first.l4_off, *tb = b + s->l4_off;
        if (g->closed || g->nsegs >= NETIO_GRO_MAX_SEGS)
            return 0;
        if (s->v6 != g->first.v6 || s->hdr_len != g->first.hdr_len || s->seq != g->next_seq)
            return 0;
        if (s->payload_len > g->mss || s->hdr_len - 14 + g->payload + s->payload_len > NETIO_GSO_MAX)
            return 0;
        if (memcmp(a, b, 14) != 0)
            return 0;
        if (!s->v6) {
            if (a[15] != b[15] || a[20] != b[20] || a[21] != b[21] || a[22] != b[22]
                    || memcmp(a + 26, b + 26, 8) != 0)
                return 0;                                 /* TOS, DF, TTL, addresses */
            if (!(b[20] & 0x40) && (uint16_t)(b[18] << 8 | b[19]) != g->next_id)
                return 0;                                 /* without DF the IDs must count up */
        } else {
            if (memcmp(a + 14, b + 14, 4) != 0 || a[21] != b[21] || memcmp(a + 22, b + 22, 32) != 0)
                return 0;                                 /* class, flow label, hop limit, addresses */
        }
        if (memcmp(ta, tb, 4) != 0 || memcmp(ta + 8, tb + 8, 5) != 0 || (tb[13] & ~0x08) != (ta[13] & ~0x08)
                || memcmp(ta + 14, tb + 14, 2) != 0 || memcmp(ta + 18, tb + 18, s->hdr_len - s->l4_off - 18) != 0)
            return 0;                                     /* ports, ACK, offset, window, urgent, options */
        return 1;
    }

    static void netio_gro_add(struct netio_gro *g, const struct netio_seg *s) {
        uint32_t i = g->nsegs;
        g->iov[2 + i].iov_base = (void *)(s->frame + s->hdr_len);
        g->iov[2 + i].iov_len = s->payload_len;
        g->frames[i] = s->frame;
        g->frame_lens[i] = s->frame_len;
        g->nsegs = i + 1;
        g->payload += s->payload_len;
        g->bytes += s->frame_len;
        g->next_seq += s->payload_len;
        g->next_id++;
        g->psh = s->hdr[s->l4_off + 13] & 0x08;
        g->closed = g->psh != 0 || s->payload_len < g->mss;
    }

    /* The run as one GSO frame: the first segment's headers with the lengths
       and the IPv4 checksum fixed, PSH if the last had it, the TCP checksum
       field the pseudo-header sum, and a virtio_net_hdr_v1 the way tun's
       virtio_net_hdr_to_skb takes a GSO frame (NEEDS_CSUM at the TCP header).
       A run of one is the frame as it came. */
    static ssize_t netio_gro_write(int fd, struct netio_gro *g) {
        uint8_t *h = g->first.hdr, *th = h + g->first.l4_off;
        uint32_t l4_len = g->first.hdr_len - g->first.l4_off + g->payload;
        uint16_t v;
        if (g->nsegs == 1) {
            memset(g->vnet, 0, sizeof(g->vnet));
            g->iov[1].iov_base = (void *)g->first.frame;
            g->iov[1].iov_len = g->first.frame_len;
            g->iov[0].iov_base = g->vnet;
            g->iov[0].iov_len = sizeof(g->vnet);
            return writev(fd, g->iov, 2);
        }
        if (!g->first.v6) {
            v = htons((uint16_t)(20 + l4_len));
            memcpy(h + 14 + 2, &v, 2);
            memset(h + 14 + 10, 0, 2);
            v = (uint16_t)~netio_fold(netio_sum(0, h + 14, 20));
            memcpy(h + 14 + 10, &v, 2);
        } else {
            v = htons((uint16_t)l4_len);
            memcpy(h + 14 + 4, &v, 2);
        }
        th[13] |= g->psh;
        v = netio_fold(netio_pseudo(h, g->first.v6, l4_len));
        memcpy(th + 16, &v, 2);
        /* virtio_net_hdr_v1, little endian: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers */
        memset(g->vnet, 0, sizeof(g->vnet));
        g->vnet[0] = 1;                                   /* VIRTIO_NET_HDR_F_NEEDS_CSUM */
        g->vnet[1] = g->first.v6 ? 4 : 1;                 /* VIRTIO_NET_HDR_GSO_TCPV6 : _TCPV4 */
        g->vnet[2] = g->first.hdr_len & 0xff; g->vnet[3] = g->first.hdr_len >> 8;
        g->vnet[4] = g->mss & 0xff; g->vnet[5] = g->mss >> 8;
        g->vnet[6] = g->first.l4_off & 0xff; g->vnet[7] = g->first.l4_off >> 8;
        g->vnet[8] = 16;                                  /* offsetof(struct tcphdr, check) */
        g->iov[0].iov_base = g->vnet;
        g->iov[0].iov_len = sizeof(g->vnet);
        g->iov[1].iov_base = h;
        g->iov[1].iov_len = g->first.hdr_len;
        return writev(fd, g->iov, 2 + g->nsegs);
    }

    /* The run's segments one by one, as they came (tun refused the GSO frame). */
    static uint32_t netio_gro_write_each(int fd, struct netio_gro *g) {
        struct iovec iov[2];
        uint32_t i, written = 0;
        memset(g->vnet, 0, sizeof(g->vnet));
        iov[0].iov_base = g->vnet;
        iov[0].iov_len = sizeof(g->vnet);
        for (i = 0; i < g->nsegs; i++) {
            iov[1].iov_base = (void *)g->frames[i];
            iov[1].iov_len = g->frame_lens[i];
            if (writev(fd, iov, 2) >= 0)
                written++;
        }
        return written;
    }
    """
    uint32_t netio_load_rx_entry(const netshm_rx_entry *e) nogil
    struct netio_seg:
        uint32_t frame_len
    struct netio_gro:
        uint32_t nsegs, bytes
    int netio_parse_tcp(const uint8_t *frame, uint32_t len, netio_seg *s) nogil
    void netio_gro_start(netio_gro *g, const netio_seg *s) nogil
    int netio_gro_fits(const netio_gro *g, const netio_seg *s) nogil
    void netio_gro_add(netio_gro *g, const netio_seg *s) nogil
    ssize_t netio_gro_write(int fd, netio_gro *g) nogil
    uint32_t netio_gro_write_each(int fd, netio_gro *g) nogil

DEF ETH_HLEN = 14
DEF VIRTIO_NET_HDR_F_DATA_VALID = 2

cdef inline uint32_t align_up(uint32_t v) nogil:
    return (v + NETSHM_TX_ALIGN - 1) & ~(<uint32_t>NETSHM_TX_ALIGN - 1)


cdef class DataPath:
    cdef int tap_fd
    cdef int bell_fd                 # the driver's doorbell; -1 while no driver is attached
    cdef uint8_t *base
    cdef netshm_header *hdr
    cdef netshm_tx_entry *txq
    cdef netshm_rx_entry *rxq
    cdef uint8_t *rxbuf
    cdef uint8_t *txdata
    cdef netshm_tx_entry *tx_private  # the authoritative txq
    # private copies of the counters
    cdef uint32_t tx_posted, tx_done, rx_consumed, tx_head
    cdef uint32_t tx_handed           # tx_posted when the last driver went away
    cdef bint handed_valid
    cdef uint64_t c_tx_queued, c_tx_frames, c_tx_bytes, c_tx_runts, c_tx_resent
    cdef uint64_t c_rx_frames, c_rx_bytes, c_rx_errors, c_rx_runts, c_rx_tap_drops, c_rx_lost_bufs
    cdef uint64_t c_invalid, c_bells
    cdef uint64_t c_rx_gro_frames, c_rx_gro_segments, c_rx_csum_bad, c_rx_gro_refused
    cdef netio_gro *gro
    cdef netio_seg seg
    cdef int wake_fd                 # our doorbell (the driver rings it); -1 while no driver is attached
    cdef public bint tap_watched     # whether the loop watches the TAP (Python's business: service() says when to change)
    cdef object rare                 # called with (what, detail) when service() found something for Python
    cdef char fault[256]

    def __cinit__(self, int tap_fd, int memfd):
        self.tap_fd = tap_fd
        self.bell_fd = -1
        self.wake_fd = -1
        self.base = NULL
        self.tx_private = <netshm_tx_entry *>calloc(NETSHM_TX_SLOTS, sizeof(netshm_tx_entry))
        self.gro = <netio_gro *>calloc(1, sizeof(netio_gro))
        if self.tx_private == NULL or self.gro == NULL:
            raise MemoryError()
        self._map(memfd)

    def __dealloc__(self):
        if self.base != NULL:
            munmap(self.base, NETSHM_SIZE)
        free(self.tx_private)
        free(self.gro)

    cdef _map(self, int memfd):
        cdef void *p = mmap(NULL, NETSHM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0)
        if p == MAP_FAILED:
            raise OSError(errno, "cannot map the shared memory: %s" % strerror(errno).decode())
        self.base = <uint8_t *>p
        self.hdr = <netshm_header *>(self.base + NETSHM_HDR_OFF)
        self.txq = <netshm_tx_entry *>(self.base + NETSHM_TXQ_OFF)
        self.rxq = <netshm_rx_entry *>(self.base + NETSHM_RXQ_OFF)
        self.rxbuf = self.base + NETSHM_RXBUF_OFF
        self.txdata = self.base + NETSHM_TXDATA_OFF
        self.hdr.frontend_idle = 1  # we never promise to look again: always ring us

    def remap(self, int memfd):
        """Move to a fresh memfd (created by netshm.create): the unconfirmed TX
        frames and their entries are copied in, the RX side starts empty."""
        cdef uint8_t *old = self.base
        cdef uint8_t *old_txdata = self.txdata
        cdef uint32_t i, slot
        if self.bell_fd >= 0:
            raise RuntimeError("remap while a driver is attached; detach first")
        self._map(memfd)
        with nogil:
            i = self.tx_done
            while i != self.tx_posted:
                slot = i & (NETSHM_TX_SLOTS - 1)
                memcpy(self.txdata + self.tx_private[slot].off, old_txdata + self.tx_private[slot].off,
                       self.tx_private[slot].len)
                self.txq[slot] = self.tx_private[slot]
                i += 1
        munmap(old, NETSHM_SIZE)
        # The driver's fields start where the driver must take them up (it sets them
        # itself too), so nothing stale is ever read as the driver's.
        self.hdr.tx_done = self.tx_done
        self.hdr.rx_produced = 0
        self.rx_consumed = 0
        self.hdr.rx_consumed = 0
        netshm_store(&self.hdr.tx_posted, self.tx_posted)

    def attach(self, int bell_fd, int wake_fd=-1):
        """A driver takes the memory (bell_fd: its doorbell; wake_fd: ours, which
        service() empties): returns tx_done for its attach message."""
        self.bell_fd = bell_fd
        self.wake_fd = wake_fd
        if self.handed_valid:
            self.c_tx_resent += self.tx_handed - self.tx_done
            self.handed_valid = False
        return self.tx_done

    def detach(self, bint drain=True):
        """The driver is gone: with drain, deliver the RX frames it completed and
        that pass the checks, and count the buffers of a frame it never finished
        (a refused driver's memory is not looked at again).  Returns the fault
        found on the way, or None."""
        cdef object fault = self._poll(False) if drain else None
        cdef uint32_t unfinished = netshm_load(&self.hdr.rx_produced) - self.rx_consumed
        if drain and fault is None and unfinished <= NETSHM_RX_BUFS:  # read again: checked again
            self.c_rx_lost_bufs += unfinished  # a frame whose last buffer the driver never wrote
        self.bell_fd = -1
        self.wake_fd = -1
        self.tx_handed = self.tx_posted
        self.handed_valid = True
        return fault

    @property
    def attached(self):
        return self.bell_fd >= 0

    @property
    def tx_resend_from(self):
        """Where the unconfirmed TX frames start (the attach message's tx_done)."""
        return self.tx_done

    @property
    def tx_backlog(self):
        """TX frames read from the TAP and not yet confirmed by a driver."""
        return self.tx_posted - self.tx_done

    @property
    def tx_room(self):
        """Whether another frame of the largest size fits (else: stop reading the TAP)."""
        return self._reserve() >= 0

    @property
    def generation(self):
        return self.hdr.generation

    cdef long _reserve(self) nogil:
        """Where the next TX frame goes: NETSHM_TX_FRAME_MAX contiguous bytes, or -1."""
        cdef uint32_t oldest
        if self.tx_posted - self.tx_done >= NETSHM_TX_SLOTS:
            return -1
        if self.tx_posted == self.tx_done:
            self.tx_head = 0
            return 0
        oldest = self.tx_private[self.tx_done & (NETSHM_TX_SLOTS - 1)].off
        if self.tx_head > oldest:  # free: [head, end) and [0, oldest)
            if NETSHM_TX_DATA_SIZE - self.tx_head >= NETSHM_TX_FRAME_MAX:
                return self.tx_head
            if oldest >= NETSHM_TX_FRAME_MAX:
                return 0
            return -1
        if oldest - self.tx_head >= NETSHM_TX_FRAME_MAX:  # wrapped: free [head, oldest)
            return self.tx_head
        return -1

    def pull_tap(self):
        """TAP -> TX area until the TAP is empty or the area full; rings the driver.
        Returns the number of frames queued."""
        cdef uint32_t n
        cdef int err = 0
        with nogil:
            n = self._pull(&err)
            if n:
                self._ring()
        if err:
            raise OSError(err, "reading the TAP: %s" % strerror(err).decode())
        return n

    cdef uint32_t _pull(self, int *err) nogil:
        cdef long off
        cdef ssize_t r
        cdef uint32_t slot, n = 0
        while True:
            off = self._reserve()
            if off < 0:
                break
            r = read(self.tap_fd, self.txdata + off, NETSHM_TX_FRAME_MAX)
            if r < 0:
                if errno == EINTR:
                    continue
                if errno != EAGAIN:
                    err[0] = errno
                break
            if r < NETSHM_VNET_HDR_LEN + ETH_HLEN:
                self.c_tx_runts += 1
                continue
            slot = self.tx_posted & (NETSHM_TX_SLOTS - 1)
            self.tx_private[slot].off = <uint32_t>off
            self.tx_private[slot].len = <uint32_t>r
            self.txq[slot] = self.tx_private[slot]
            self.tx_head = align_up(<uint32_t>off + <uint32_t>r)
            self.tx_posted += 1
            n += 1
        if n:
            self.c_tx_queued += n
            netshm_store(&self.hdr.tx_posted, self.tx_posted)
        return n

    def on_rare(self, handler):
        """handler(what, detail) hears what service() leaves to Python: ("fault",
        what the driver did wrong: refuse it), ("tap_error", OSError),
        ("tap_room", bool: start or stop watching the TAP)."""
        self.rare = handler

    def service(self):
        """One wake-up (the driver's doorbell, the TAP readable, a tick), all in C:
        empty our doorbell, reap tx_done, RX frames to the TAP, the TAP into the
        TX area (while the loop watches the TAP it says when; otherwise whenever
        there is room), ring the driver once.  Python hears only of the rare
        (on_rare)."""
        cdef uint64_t value
        cdef uint32_t pulled = 0
        cdef int bad = 0, err = 0
        cdef bint moved = False, room
        with nogil:
            if self.wake_fd >= 0:
                read(self.wake_fd, &value, 8)  # EAGAIN: nobody rang, a tick or the TAP woke us
            if self.bell_fd >= 0:
                bad = self._reap_tx()
                if not bad:
                    bad = self._rx_to_tap(&moved)
            if not bad:
                pulled = self._pull(&err)
            if moved or pulled:
                self._ring()
            room = self._reserve() >= 0
        if bad:
            self.c_invalid += 1
            self.rare("fault", self.fault.decode())
        elif err:
            self.rare("tap_error", OSError(err, "reading the TAP: %s" % strerror(err).decode()))
        elif room != self.tap_watched:
            self.rare("tap_room", room)

    cdef void _ring(self) nogil:
        cdef uint64_t one = 1
        if self.bell_fd >= 0:
            write(self.bell_fd, &one, 8)  # EAGAIN only with 2^64-2 unread rings: it is awake
            self.c_bells += 1

    def poll_driver(self):
        """Reap tx_done and pass completed RX frames to the TAP; ring the driver if
        anything moved.  Returns None, or what the driver did wrong (refuse it)."""
        if self.bell_fd < 0:
            return None
        return self._poll(True)

    cdef object _poll(self, bint ring):
        cdef int bad
        cdef bint moved = False
        with nogil:
            bad = self._reap_tx()
            if not bad:
                bad = self._rx_to_tap(&moved)
            if moved and ring:
                self._ring()
        if bad:
            self.c_invalid += 1
            return self.fault.decode()
        return None

    cdef int _reap_tx(self) nogil:
        cdef uint32_t done = netshm_load(&self.hdr.tx_done)
        cdef uint32_t advance = done - self.tx_done
        cdef uint32_t slot
        if advance > self.tx_posted - self.tx_done:
            snprintf(self.fault, sizeof(self.fault),
                     "tx_done %u is not within tx_done %u .. tx_posted %u (it moved backwards or "
                     "past what was posted)", done, self.tx_done, self.tx_posted)
            return 1
        while self.tx_done != done:
            slot = self.tx_done & (NETSHM_TX_SLOTS - 1)
            self.c_tx_frames += 1
            self.c_tx_bytes += self.tx_private[slot].len - NETSHM_VNET_HDR_LEN
            self.tx_done += 1
        return 0

    cdef int _rx_to_tap(self, bint *moved) nogil:
        cdef uint32_t produced = netshm_load(&self.hdr.rx_produced)
        cdef uint32_t avail = produced - self.rx_consumed
        cdef uint32_t n, k, entry, total
        cdef uint16_t length
        cdef uint8_t flags, last_flags
        cdef bint error, eop
        cdef iovec iov[1 + NETSHM_RX_FRAME_BUFS]
        cdef uint8_t vnet[NETSHM_VNET_HDR_LEN]
        cdef ssize_t r
        cdef int bad = 0, parsed
        if avail > NETSHM_RX_BUFS:
            snprintf(self.fault, sizeof(self.fault),
                     "rx_produced %u is %u buffers ahead of rx_consumed %u (at most %u)",
                     produced, avail, self.rx_consumed, <uint32_t>NETSHM_RX_BUFS)
            return 1
        while avail:
            n = 0
            total = 0
            error = False
            eop = False
            last_flags = 0
            while n < avail and n < NETSHM_RX_FRAME_BUFS:
                k = (self.rx_consumed + n) & (NETSHM_RX_BUFS - 1)
                entry = netio_load_rx_entry(&self.rxq[k])
                length = entry & 0xffff
                flags = (entry >> 16) & 0xff
                if length > NETSHM_RX_BUF_SIZE:
                    snprintf(self.fault, sizeof(self.fault),
                             "rx buffer %u has len %u (buffers are %u bytes)",
                             k, <uint32_t>length, <uint32_t>NETSHM_RX_BUF_SIZE)
                    bad = 1
                    break
                iov[1 + n].iov_base = self.rxbuf + <size_t>k * NETSHM_RX_BUF_SIZE
                iov[1 + n].iov_len = length
                total += length
                n += 1
                if flags & NETSHM_RX_ERROR:
                    error = True
                if flags & NETSHM_RX_EOP:
                    eop = True
                    last_flags = flags
                    break
            if bad:
                break
            if not eop:
                if n == NETSHM_RX_FRAME_BUFS:
                    snprintf(self.fault, sizeof(self.fault),
                             "a frame at rx buffer %u spans more than %u buffers without EOP",
                             self.rx_consumed & (NETSHM_RX_BUFS - 1), <uint32_t>NETSHM_RX_FRAME_BUFS)
                    bad = 1
                break  # the rest of the frame is not written yet
            # The run's payloads stay in their RX buffers until it is written: rx_consumed
            # is published only after the last write below.
            if error:
                self.c_rx_errors += 1
            elif total < ETH_HLEN:
                self.c_rx_runts += 1
            else:
                parsed = netio_parse_tcp(<uint8_t *>iov[1].iov_base, total, &self.seg) if n == 1 else 0
                if parsed == 1 and self.gro.nsegs and netio_gro_fits(self.gro, &self.seg):
                    netio_gro_add(self.gro, &self.seg)
                else:
                    self._gro_flush()
                    if parsed == 1:
                        netio_gro_start(self.gro, &self.seg)
                    else:
                        memset(vnet, 0, sizeof(vnet))
                        if parsed == -1:
                            self.c_rx_csum_bad += 1  # the stack checks it again and drops it
                        elif last_flags & NETSHM_RX_CSUM_OK:
                            vnet[0] = VIRTIO_NET_HDR_F_DATA_VALID
                        iov[0].iov_base = vnet
                        iov[0].iov_len = NETSHM_VNET_HDR_LEN
                        r = writev(self.tap_fd, iov, 1 + n)
                        if r < 0:
                            self.c_rx_tap_drops += 1  # the stack refused it (down, queue full)
                        else:
                            self.c_rx_frames += 1
                            self.c_rx_bytes += total
            self.rx_consumed += n
            avail -= n
            moved[0] = True
        self._gro_flush()
        if moved[0]:
            netshm_store(&self.hdr.rx_consumed, self.rx_consumed)
        return bad

    cdef void _gro_flush(self) nogil:
        cdef uint32_t nsegs = self.gro.nsegs
        cdef uint32_t written
        if nsegs == 0:
            return
        if netio_gro_write(self.tap_fd, self.gro) >= 0:
            written = nsegs
            if nsegs > 1:
                self.c_rx_gro_frames += 1
                self.c_rx_gro_segments += nsegs
        elif nsegs > 1 and errno == EINVAL:
            self.c_rx_gro_refused += 1  # this kernel's tun does not take the GSO frame: one by one
            written = netio_gro_write_each(self.tap_fd, self.gro)
        else:
            written = 0
        self.c_rx_frames += written
        self.c_rx_tap_drops += nsegs - written
        if written == nsegs:
            self.c_rx_bytes += self.gro.bytes
        self.gro.nsegs = 0

    def counters(self):
        return {"tx_queued": self.c_tx_queued, "tx_frames": self.c_tx_frames, "tx_bytes": self.c_tx_bytes,
                "tx_runts": self.c_tx_runts, "tx_resent": self.c_tx_resent,
                "tx_backlog": self.tx_posted - self.tx_done,
                "rx_frames": self.c_rx_frames, "rx_bytes": self.c_rx_bytes, "rx_errors": self.c_rx_errors,
                "rx_runts": self.c_rx_runts, "rx_tap_drops": self.c_rx_tap_drops,
                "rx_lost_bufs": self.c_rx_lost_bufs, "invalid": self.c_invalid, "bells": self.c_bells,
                "rx_gro_frames": self.c_rx_gro_frames, "rx_gro_segments": self.c_rx_gro_segments,
                "rx_csum_bad": self.c_rx_csum_bad, "rx_gro_refused": self.c_rx_gro_refused}


cdef extern from "<stdio.h>" nogil:
    int snprintf(char *s, size_t n, const char *fmt, ...)
