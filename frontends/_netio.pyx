# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The network front end's data path (libdrv/netshm.h): TAP <-> shared memory.

    dp = DataPath(tap_fd, memfd)     # map the TX area now: the TAP is read before any driver
    dp.remap(new_memfd)              # a new incarnation's memory: unconfirmed TX frames copied in
    dp.attach(driver_bell_fd)        # -> tx_done for the attach message
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
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy, memset, strerror
from libc.errno cimport errno, EAGAIN, EINTR
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
    /* One RX entry as a single 32-bit load: the driver may rewrite it while we
       look, so its len and flags must come from the same read, read once. */
    static inline uint32_t netio_load_rx_entry(const struct netshm_rx_entry *e) {
        return __atomic_load_n((const uint32_t *)e, __ATOMIC_ACQUIRE);
    }
    """
    uint32_t netio_load_rx_entry(const netshm_rx_entry *e) nogil

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
    cdef char fault[256]

    def __cinit__(self, int tap_fd, int memfd):
        self.tap_fd = tap_fd
        self.bell_fd = -1
        self.base = NULL
        self.tx_private = <netshm_tx_entry *>calloc(NETSHM_TX_SLOTS, sizeof(netshm_tx_entry))
        if self.tx_private == NULL:
            raise MemoryError()
        self._map(memfd)

    def __dealloc__(self):
        if self.base != NULL:
            munmap(self.base, NETSHM_SIZE)
        free(self.tx_private)

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

    def attach(self, int bell_fd):
        """A driver takes the memory: returns tx_done for its attach message."""
        self.bell_fd = bell_fd
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
        cdef long off
        cdef ssize_t r
        cdef uint32_t slot, n = 0
        cdef int err = 0
        with nogil:
            while True:
                off = self._reserve()
                if off < 0:
                    break
                r = read(self.tap_fd, self.txdata + off, NETSHM_TX_FRAME_MAX)
                if r < 0:
                    if errno == EINTR:
                        continue
                    if errno != EAGAIN:
                        err = errno
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
                self._ring()
        if err:
            raise OSError(err, "reading the TAP: %s" % strerror(err).decode())
        return n

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
        cdef int bad = 0
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
            if error:
                self.c_rx_errors += 1
            elif total < ETH_HLEN:
                self.c_rx_runts += 1
            else:
                memset(vnet, 0, sizeof(vnet))
                if last_flags & NETSHM_RX_CSUM_OK:
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
        if moved[0]:
            netshm_store(&self.hdr.rx_consumed, self.rx_consumed)
        return bad

    def counters(self):
        return {"tx_queued": self.c_tx_queued, "tx_frames": self.c_tx_frames, "tx_bytes": self.c_tx_bytes,
                "tx_runts": self.c_tx_runts, "tx_resent": self.c_tx_resent,
                "tx_backlog": self.tx_posted - self.tx_done,
                "rx_frames": self.c_rx_frames, "rx_bytes": self.c_rx_bytes, "rx_errors": self.c_rx_errors,
                "rx_runts": self.c_rx_runts, "rx_tap_drops": self.c_rx_tap_drops,
                "rx_lost_bufs": self.c_rx_lost_bufs, "invalid": self.c_invalid, "bells": self.c_bells}


cdef extern from "<stdio.h>" nogil:
    int snprintf(char *s, size_t n, const char *fmt, ...)
