# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The e1000 data path: the device's rings <-> the front end's shared memory (libdrv/netshm.h).

One call per wakeup does everything with no Python per frame, and on the
two wakeups of the data path no Python at all: on_interrupt() (the INTx
eventfd: drain it, read ICR, service, unmask the line through VFIO) and
on_doorbell() (the front end's eventfd: drain it, service) go straight
into the driver's loop; they call back into Python only for what is rare
(a link change, a front end that broke the rules).  service():
  TX  takes entries tx_queued .. tx_posted-1 from the shared memory, checks
      each (netshm.h's rules), turns its virtio_net_hdr_v1 into a context
      descriptor when needed (checksum offload, TSO) and its frame into data
      descriptors pointing into the shared memory; writes TDT once;
      reclaims what the device wrote back and advances tx_done in order.
  RX  turns written-back descriptors into rxq entries and advances
      rx_produced; hands buffers up to rx_consumed + RX_BUFS - 1 back (RDT).
  and rings the front end's eventfd once if a counter moved and it sleeps.

Everything the front end wrote is read once into a local and checked
there; a violation raises ContractViolation (the driver refuses that front
end).  An RX descriptor written back with a buffer address that is not the
one the driver programmed raises DeviceFault (the device was made to DMA
elsewhere; the driver exits and rsd replaces it).

The descriptors live in the driver's own DMA memory:
  ring memory  [0, RX_RING_BYTES)   RX ring: NETSHM_RX_BUFS legacy descriptors, k -> buffer k
               [RX_RING_BYTES, ..)  TX ring: tx_ring_size descriptors
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int32_t
from libc.string cimport memcpy, memset, memcmp
from libc.stdlib cimport malloc, free
from libdrv.netshm cimport *

cdef extern from *:
    """
    #include <errno.h>
    #include <unistd.h>
    #include <sys/ioctl.h>
    #include <linux/vfio.h>
    struct e1k_rx_desc { uint64_t addr; uint16_t length; uint16_t csum; uint8_t status; uint8_t errors; uint16_t special; };
    struct e1k_tx_desc { uint64_t addr; uint32_t lower; uint32_t upper; };
    _Static_assert(sizeof(struct e1k_rx_desc) == 16, "rx descriptor layout");
    _Static_assert(sizeof(struct e1k_tx_desc) == 16, "tx descriptor layout");
    /* MMIO: one 32-bit access each, after everything written to memory (descriptors) is visible. */
    static inline void e1k_wr32(uint8_t *regs, uint32_t off, uint32_t v) {
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        *(volatile uint32_t *)(regs + off) = v;
    }
    static inline uint32_t e1k_rd32(uint8_t *regs, uint32_t off) { return *(volatile uint32_t *)(regs + off); }
    /* What the device writes back by DMA is read once, with acquire order (status before the rest). */
    static inline uint8_t e1k_load8(uint8_t *p) { return __atomic_load_n((volatile uint8_t *)p, __ATOMIC_ACQUIRE); }
    static inline uint32_t e1k_load32(uint32_t *p) { return __atomic_load_n((volatile uint32_t *)p, __ATOMIC_ACQUIRE); }
    static inline uint64_t e1k_load64(uint64_t *p) { return __atomic_load_n((volatile uint64_t *)p, __ATOMIC_RELAXED); }
    static inline uint16_t e1k_load16(uint16_t *p) { return __atomic_load_n((volatile uint16_t *)p, __ATOMIC_RELAXED); }
    static inline int e1k_notify(int fd) {
        uint64_t one = 1;
        return write(fd, &one, sizeof one) == sizeof one ? 0 : errno;
    }
    /* An eventfd's count to 0; EAGAIN (nothing there) is the usual case for a doorbell. */
    static inline void e1k_drain(int fd) {
        uint64_t count;
        if (fd >= 0) (void)!read(fd, &count, sizeof count);
    }
    /* uio_pci_generic: a read takes the interrupt count (exactly 4 bytes); it masks INTx with the
       command register's INTx-disable bit, and the driver unmasks by writing the register back
       without it (through the device's config file: uio_pci_generic has no irqcontrol). */
    static inline void e1k_uio_take(int fd) {
        int32_t count;
        (void)!read(fd, &count, sizeof count);
    }
    static inline int e1k_uio_unmask(int config_fd, uint16_t command) {
        return pwrite(config_fd, &command, sizeof command, 4) == sizeof command ? 0 : errno;
    }
    static inline int e1k_set_irqs(int fd, struct vfio_irq_set *req) {
        return ioctl(fd, VFIO_DEVICE_SET_IRQS, req) == 0 ? 0 : errno;
    }
    static inline uint16_t e1k_be16(const uint8_t *p) { return (uint16_t)((p[0] << 8) | p[1]); }
    static inline void e1k_put_be16(uint8_t *p, uint16_t v) { p[0] = v >> 8; p[1] = v & 0xff; }
    """
    struct e1k_rx_desc:
        uint64_t addr
        uint16_t length
        uint16_t csum
        uint8_t status
        uint8_t errors
        uint16_t special
    struct e1k_tx_desc:
        uint64_t addr
        uint32_t lower
        uint32_t upper
    void e1k_wr32(uint8_t *regs, uint32_t off, uint32_t v) nogil
    uint32_t e1k_rd32(uint8_t *regs, uint32_t off) nogil
    uint8_t e1k_load8(uint8_t *p) nogil
    uint32_t e1k_load32(uint32_t *p) nogil
    uint64_t e1k_load64(uint64_t *p) nogil
    uint16_t e1k_load16(uint16_t *p) nogil
    int e1k_notify(int fd) nogil
    void e1k_drain(int fd) nogil
    void e1k_uio_take(int fd) nogil
    int e1k_uio_unmask(int config_fd, uint16_t command) nogil
    struct vfio_irq_set:
        uint32_t argsz
        uint32_t flags
        uint32_t index
        uint32_t start
        uint32_t count
    int e1k_set_irqs(int fd, vfio_irq_set *req) nogil
    enum:
        VFIO_IRQ_SET_DATA_NONE
        VFIO_IRQ_SET_ACTION_UNMASK
        VFIO_PCI_INTX_IRQ_INDEX
    uint16_t e1k_be16(const uint8_t *p) nogil
    void e1k_put_be16(uint8_t *p, uint16_t v) nogil

# Registers and bits (drivers/e1000/regs.py has them all, with their sources).
DEF ICR = 0x00C0
DEF ICR_LSC = 1 << 2
DEF RDT = 0x2818
DEF TDT = 0x3818
DEF RXD_STAT_DD = 0x01
DEF RXD_STAT_EOP = 0x02
DEF RXD_STAT_IXSM = 0x04
DEF RXD_STAT_TCPCS = 0x20
DEF RXD_STAT_IPCS = 0x40
DEF RXD_ERR_FRAME = 0x01 | 0x02 | 0x04 | 0x10 | 0x80
DEF RXD_ERR_TCPE = 0x20
DEF RXD_ERR_IPE = 0x40
DEF TXD_CMD_EOP = 1 << 24
DEF TXD_CMD_IFCS = 1 << 25
DEF TXD_CMD_TSE = 1 << 26
DEF TXD_CMD_RS = 1 << 27
DEF TXD_CMD_DEXT = 1 << 29
DEF TXD_CMD_IDE = 1 << 31
DEF TXD_CMD_TCP = 1 << 24
DEF TXD_CMD_IP = 1 << 25
DEF TXD_DTYP_D = 1 << 20
DEF TXD_STAT_DD = 0x01
DEF TXD_POPTS_IXSM = 0x01
DEF TXD_POPTS_TXSM = 0x02
DEF TXD_MAX_DATA = 4096
# The most descriptors one entry takes: a context and NETSHM_TX_FRAME_MAX bytes of data.
DEF TXD_PER_ENTRY_MAX = 1 + (65536 + 14 + 4 + TXD_MAX_DATA - 1) // TXD_MAX_DATA

# virtio_net_hdr_v1 (the TAP's TUNSETVNETHDRSZ 12 header)
DEF VNET_F_NEEDS_CSUM = 1
DEF VNET_GSO_NONE = 0
DEF VNET_GSO_TCPV4 = 1
DEF VNET_GSO_TCPV6 = 4
DEF VNET_GSO_ECN = 0x80
DEF ETH_P_IP = 0x0800
DEF ETH_P_IPV6 = 0x86DD
DEF ETH_P_8021Q = 0x8100
DEF IPPROTO_TCP = 6
DEF HEADER_COPY = 256          # what TSO header parsing may look at

RX_RING_BYTES = NETSHM_RX_BUFS * 16
TX_DESC_PER_ENTRY_MAX = TXD_PER_ENTRY_MAX


class ContractViolation(Exception):
    """The front end broke netshm.h's rules: refuse it (disconnect), carry on."""


class DeviceFault(Exception):
    """The device did what the driver never asked for: exit, let rsd restart the driver."""


cdef struct tx_context:      # what the device remembers of the last context descriptor
    uint64_t first
    uint32_t lower
    uint32_t upper


cdef inline uint32_t fold(uint64_t sum) nogil:
    while sum >> 16:
        sum = (sum & 0xFFFF) + (sum >> 16)
    return <uint32_t>sum


cdef uint32_t sum16(const uint8_t *p, size_t n) nogil:
    cdef uint64_t s = 0
    cdef size_t i = 0
    while i + 1 < n:
        s += (<uint32_t>p[i] << 8) | p[i + 1]
        i += 2
    if i < n:
        s += <uint32_t>p[i] << 8
    return fold(s)


cdef class Rings:
    cdef uint8_t *regs
    cdef size_t regs_size
    cdef e1k_rx_desc *rxr
    cdef e1k_tx_desc *txr
    cdef readonly uint64_t rx_ring_iova, tx_ring_iova
    cdef readonly uint32_t tx_ring_size
    # the attached front end's memory (NULL when none)
    cdef uint8_t *shm
    cdef uint64_t shm_iova
    cdef netshm_header *hdr
    cdef netshm_tx_entry *txq
    cdef netshm_rx_entry *rxq
    cdef int frontend_efd, doorbell_efd
    # the interrupt: its eventfd, and the unmask request for the device fd (-1: none to issue)
    cdef int irq_efd, unmask_fd
    cdef bint irq_uio                     # the interrupt is /dev/uioN's count, not an eventfd
    cdef uint16_t uio_command             # the command register, INTx enabled: what unmasks
    # Without an IOMMU the device reaches only the module's buffers: frames go through these
    # copies of the RX buffers and the TX data area (NULL: the device reaches the shared memory).
    cdef uint8_t *bounce_rx
    cdef uint8_t *bounce_tx
    cdef uint64_t bounce_rx_bus, bounce_tx_bus
    cdef vfio_irq_set unmask_req
    cdef object on_link_change, on_violation     # the driver's Python, for what is rare
    # private, authoritative counters (netshm.h)
    cdef uint32_t tx_done, tx_queued, tx_seen_posted
    cdef uint32_t tx_tail, tx_clean       # TX ring: next descriptor to fill, oldest in flight
    cdef int32_t *entry_last              # TX entry slot -> its last descriptor (-1: none)
    cdef uint32_t rx_produced, rx_consumed, rx_given
    cdef uint32_t rx_frame_bufs
    cdef bint rx_discarding
    cdef tx_context ctx
    cdef bint ctx_valid
    cdef public object wild_rx_iova       # set by the wild-dma fault: the next RX buffer's address
    # counters for `stats`
    cdef readonly uint64_t tx_frames, tx_bytes, tx_tso, tx_csum, tx_dropped, tx_ring_full
    cdef readonly uint64_t rx_frames, rx_bytes, rx_errors, rx_csum_ok, rx_truncated, rx_no_buffer
    cdef readonly uint64_t notifies, services, interrupts, doorbells

    def __cinit__(self, size_t regs_addr, size_t regs_size, size_t ring_addr, uint64_t ring_iova,
                  uint32_t tx_ring_size):
        if tx_ring_size % 8 or tx_ring_size < 2 * TXD_PER_ENTRY_MAX or tx_ring_size > 65536:
            raise ValueError("the TX ring needs a multiple of 8 descriptors, %d..65536"
                             % (2 * TXD_PER_ENTRY_MAX))
        self.regs = <uint8_t *>regs_addr
        self.regs_size = regs_size
        self.rxr = <e1k_rx_desc *>ring_addr
        self.txr = <e1k_tx_desc *>(ring_addr + NETSHM_RX_BUFS * 16)
        self.rx_ring_iova = ring_iova
        self.tx_ring_iova = ring_iova + NETSHM_RX_BUFS * 16
        self.tx_ring_size = tx_ring_size
        self.entry_last = <int32_t *>malloc(NETSHM_TX_SLOTS * sizeof(int32_t))
        if self.entry_last == NULL:
            raise MemoryError()
        self.frontend_efd = self.doorbell_efd = self.irq_efd = self.unmask_fd = -1
        self.irq_uio = False
        self.bounce_rx = self.bounce_tx = NULL
        self.wild_rx_iova = None
        self.reset()

    def __dealloc__(self):
        free(self.entry_last)

    @staticmethod
    def ring_bytes(uint32_t tx_ring_size):
        return NETSHM_RX_BUFS * 16 + tx_ring_size * 16

    def reset(self):
        """Empty rings, no front end (the device's ring registers are reset by the caller)."""
        memset(self.rxr, 0, NETSHM_RX_BUFS * 16)
        memset(self.txr, 0, self.tx_ring_size * 16)
        self.shm = NULL
        self.hdr = NULL
        self.bounce_rx = self.bounce_tx = NULL
        self.frontend_efd = self.doorbell_efd = -1
        self.tx_done = self.tx_queued = self.tx_seen_posted = 0
        self.tx_tail = self.tx_clean = 0
        self.rx_produced = self.rx_consumed = self.rx_given = 0
        self.rx_frame_bufs = 0
        self.rx_discarding = False
        self.ctx_valid = False

    @property
    def attached(self):
        return self.shm != NULL

    def set_interrupt(self, int irq_efd, int device_fd, bint unmask_intx, on_link_change, on_violation,
                      bint uio=False, uint16_t command=0):
        """What on_interrupt() and on_doorbell() need: the interrupt's eventfd; the VFIO device fd
        and whether its INTx line is to be unmasked after each interrupt (vfio-pci masks it as
        it fires; MSI needs none); on_link_change(icr) for an interrupt with ICR.LSC;
        on_violation(message) when the front end broke netshm.h's rules (refuse it).
        uio: irq_efd is /dev/uioN (uio_pci_generic), device_fd the device's config file, and
        command the command register's value with INTx enabled (written to unmask).
        """
        self.irq_efd = irq_efd
        self.irq_uio = uio
        self.uio_command = command
        self.unmask_fd = device_fd if unmask_intx else -1
        memset(&self.unmask_req, 0, sizeof(vfio_irq_set))
        self.unmask_req.argsz = sizeof(vfio_irq_set)
        self.unmask_req.flags = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_UNMASK
        self.unmask_req.index = VFIO_PCI_INTX_IRQ_INDEX
        self.unmask_req.start = 0
        self.unmask_req.count = 1
        self.on_link_change = on_link_change
        self.on_violation = on_violation

    @staticmethod
    def bounce_sizes():
        """(RX, TX) bytes of the buffers attach_bounced() wants."""
        return NETSHM_RX_BUFS * NETSHM_RX_BUF_SIZE, NETSHM_TX_DATA_SIZE

    def attach(self, size_t shm_addr, uint64_t shm_iova, uint32_t tx_done, int frontend_efd,
               int doorbell_efd=-1):
        """Take the front end's memory (mapped at shm_addr, and for the device at shm_iova) and
        its doorbells (doorbell_efd: ours, which it writes; frontend_efd: its, which we write).

        The device's RDH/TDH/RDT/TDT must be 0 and the rings empty (reset()).
        Entries tx_done .. tx_posted-1 go on the wire at the next service().
        """
        self._attach(shm_addr, shm_iova, tx_done, frontend_efd, doorbell_efd)

    def attach_bounced(self, size_t shm_addr, uint32_t tx_done, int frontend_efd, int doorbell_efd,
                       size_t rx_addr, uint64_t rx_bus, size_t tx_addr, uint64_t tx_bus):
        """attach() for a device that cannot reach the shared memory (no IOMMU): it DMAs into
        the driver's buffers at rx_bus / tx_bus (of bounce_sizes()), and frames are copied
        between them and the shared memory; a TX frame is copied before it is looked at, so
        what the device sends is what was checked."""
        self._attach(shm_addr, 0, tx_done, frontend_efd, doorbell_efd)
        self.bounce_rx, self.bounce_rx_bus = <uint8_t *>rx_addr, rx_bus
        self.bounce_tx, self.bounce_tx_bus = <uint8_t *>tx_addr, tx_bus

    cdef _attach(self, size_t shm_addr, uint64_t shm_iova, uint32_t tx_done, int frontend_efd,
                 int doorbell_efd):
        self.reset()
        self.shm = <uint8_t *>shm_addr
        self.shm_iova = shm_iova
        self.hdr = <netshm_header *>(self.shm + NETSHM_HDR_OFF)
        self.txq = <netshm_tx_entry *>(self.shm + NETSHM_TXQ_OFF)
        self.rxq = <netshm_rx_entry *>(self.shm + NETSHM_RXQ_OFF)
        self.frontend_efd = frontend_efd
        self.doorbell_efd = doorbell_efd
        self.tx_done = self.tx_queued = self.tx_seen_posted = tx_done
        netshm_store(&self.hdr.tx_done, tx_done)
        netshm_store(&self.hdr.rx_produced, 0)
        netshm_store(&self.hdr.driver_idle, 0)
        memset(self.rxq, 0, NETSHM_RX_BUFS * sizeof(netshm_rx_entry))

    def detach(self):
        """Forget the front end's memory (the caller stopped the device's RX and TX first)."""
        self.reset()

    cdef inline uint64_t rx_buf_iova(self, uint32_t k):
        if self.bounce_rx != NULL:
            return self.bounce_rx_bus + <uint64_t>k * NETSHM_RX_BUF_SIZE
        return self.shm_iova + NETSHM_RXBUF_OFF + <uint64_t>k * NETSHM_RX_BUF_SIZE

    # -- the wakeups ----------------------------------------------------------------------------
    def on_interrupt(self):
        """The interrupt's eventfd is readable (a loop callback); Python only for what is rare."""
        cdef uint32_t icr
        try:
            icr = self._interrupt()
        except ContractViolation as exc:
            self.on_violation(str(exc))
            return
        if icr & ICR_LSC:
            self.on_link_change(icr)

    def on_doorbell(self):
        """The front end's doorbell is readable (a loop callback)."""
        self.doorbells += 1
        e1k_drain(self.doorbell_efd)
        try:
            self._service()
        except ContractViolation as exc:
            self.on_violation(str(exc))

    cdef uint32_t _interrupt(self) except? 0xFFFFFFFF:
        """Drain the eventfd, read (and so clear) ICR, service, unmask; returns ICR."""
        cdef uint32_t icr
        cdef int err
        self.interrupts += 1
        if self.irq_uio:
            e1k_uio_take(self.irq_efd)
        else:
            e1k_drain(self.irq_efd)
        icr = e1k_rd32(self.regs, ICR)
        try:
            self._service()
        finally:
            # The line was masked as it fired; ICR's read deasserted it.  Unmasked even when
            # the front end is refused, or the interrupts would stop for the next one.
            if self.unmask_fd >= 0 and self.irq_uio:
                err = e1k_uio_unmask(self.unmask_fd, self.uio_command)
                if err:
                    raise OSError(err, "unmasking INTx through the config file (fd %d) failed" % self.unmask_fd)
            elif self.unmask_fd >= 0:
                err = e1k_set_irqs(self.unmask_fd, &self.unmask_req)
                if err:
                    raise OSError(err, "VFIO_DEVICE_SET_IRQS (unmask INTx) failed: the device fd %d is "
                                  "not the VFIO device's, or the device was released" % self.unmask_fd)
        return icr

    # -- the one call per wakeup -------------------------------------------------------------
    def service(self):
        """Move frames both ways; returns True if a shared counter moved.

        Raises ContractViolation (refuse the front end) or DeviceFault (exit).
        """
        return self._service()

    cdef bint _service(self) except -1:
        cdef bint moved = False, again
        cdef uint32_t posted, consumed
        if self.shm == NULL:
            return False
        self.services += 1
        netshm_store(&self.hdr.driver_idle, 0)
        while True:
            moved |= self._tx_reclaim()
            moved |= self._rx_collect()
            self._rx_refill()     # buffers first: what we send may be answered at once
            self._tx_queue()
            # netshm.h's sleep protocol: say we sleep, then look once more.
            netshm_store(&self.hdr.driver_idle, 1)
            netshm_barrier()
            posted = netshm_load(&self.hdr.tx_posted)
            consumed = netshm_load(&self.hdr.rx_consumed)
            again = (posted != self.tx_seen_posted and self._tx_ring_free() >= TXD_PER_ENTRY_MAX) \
                or consumed != self.rx_consumed
            if not again:
                break
            netshm_store(&self.hdr.driver_idle, 0)
        if moved:
            netshm_barrier()
            if netshm_load(&self.hdr.frontend_idle) != 0 and self.frontend_efd >= 0:
                e1k_notify(self.frontend_efd)   # EAGAIN: its counter is full, it has news anyway
                self.notifies += 1
        return moved

    # -- TX ------------------------------------------------------------------------------------
    cdef inline uint32_t _tx_ring_free(self):
        return self.tx_ring_size - 1 - ((self.tx_tail - self.tx_clean + self.tx_ring_size) % self.tx_ring_size)

    cdef bint _tx_reclaim(self) except -1:
        cdef uint32_t start = self.tx_done
        cdef int32_t last
        while self.tx_done != self.tx_queued:
            last = self.entry_last[self.tx_done % NETSHM_TX_SLOTS]
            if last >= 0:
                if not e1k_load8(<uint8_t *>&self.txr[last].upper) & TXD_STAT_DD:
                    break
                self.tx_clean = (<uint32_t>last + 1) % self.tx_ring_size
            self.tx_done += 1
        if self.tx_done != start:
            netshm_store(&self.hdr.tx_done, self.tx_done)
            return True
        return False

    cdef int _tx_queue(self) except -1:
        cdef uint32_t posted = netshm_load(&self.hdr.tx_posted)
        cdef uint32_t off, length
        cdef uint32_t tail_before = self.tx_tail
        cdef int32_t last
        if <uint32_t>(posted - self.tx_done) > NETSHM_TX_SLOTS:
            raise ContractViolation("tx_posted %d is %d entries ahead of tx_done %d; at most %d fit"
                                    % (posted, <uint32_t>(posted - self.tx_done), self.tx_done, NETSHM_TX_SLOTS))
        if <uint32_t>(posted - self.tx_done) < <uint32_t>(self.tx_queued - self.tx_done):
            raise ContractViolation("tx_posted went back from %d to %d" % (self.tx_seen_posted, posted))
        self.tx_seen_posted = posted
        while self.tx_queued != posted:
            if self._tx_ring_free() < TXD_PER_ENTRY_MAX:
                self.tx_ring_full += 1
                break
            # The entry is read once; what we check is what we use.
            off = e1k_load32(&self.txq[self.tx_queued % NETSHM_TX_SLOTS].off)
            length = e1k_load32(&self.txq[self.tx_queued % NETSHM_TX_SLOTS].len)
            if off % NETSHM_TX_ALIGN or length < NETSHM_VNET_HDR_LEN + 14 or length > NETSHM_TX_FRAME_MAX \
                    or <uint64_t>off + length > NETSHM_TX_DATA_SIZE:
                if self.tx_tail != tail_before:
                    e1k_wr32(self.regs, TDT, self.tx_tail)   # what was good goes out still
                raise ContractViolation("TX entry %d {off %d, len %d} breaks netshm.h's rules (off 64-byte "
                                        "aligned, 26 <= len <= %d, off + len <= %d)"
                                        % (self.tx_queued, off, length, NETSHM_TX_FRAME_MAX, NETSHM_TX_DATA_SIZE))
            last = self._tx_entry(off, length)
            self.entry_last[self.tx_queued % NETSHM_TX_SLOTS] = last
            self.tx_queued += 1
        if self.tx_tail != tail_before:
            e1k_wr32(self.regs, TDT, self.tx_tail)
        return 0

    cdef inline void _put_desc(self, uint64_t addr, uint32_t lower, uint32_t upper):
        cdef e1k_tx_desc *d = &self.txr[self.tx_tail]
        d.addr = addr
        d.lower = lower
        d.upper = upper
        self.tx_tail = (self.tx_tail + 1) % self.tx_ring_size

    cdef void _put_context(self, uint64_t first, uint32_t lower, uint32_t upper):
        if self.ctx_valid and self.ctx.first == first and self.ctx.lower == lower and self.ctx.upper == upper:
            return
        self._put_desc(first, lower, upper)
        self.ctx.first, self.ctx.lower, self.ctx.upper = first, lower, upper
        self.ctx_valid = True

    cdef int32_t _tx_entry(self, uint32_t off, uint32_t length):
        """Descriptors for one checked entry; returns its last descriptor, or -1 if dropped."""
        cdef uint8_t *vnet = self.shm + NETSHM_TXDATA_OFF + off
        cdef uint8_t *frame
        cdef uint32_t flen = length - NETSHM_VNET_HDR_LEN
        cdef uint64_t iova = self.shm_iova + NETSHM_TXDATA_OFF + off + NETSHM_VNET_HDR_LEN
        if self.bounce_tx != NULL:
            memcpy(self.bounce_tx + off, vnet, length)
            vnet = self.bounce_tx + off
            iova = self.bounce_tx_bus + off + NETSHM_VNET_HDR_LEN
        frame = vnet + NETSHM_VNET_HDR_LEN
        cdef uint8_t hdr[12]
        cdef uint8_t flags, gso
        cdef uint16_t csum_start, csum_offset, gso_size
        cdef uint32_t dcmd = 0, popts = 0, done = 0, chunk
        memcpy(hdr, vnet, 12)        # read once: the front end may change it meanwhile
        flags = hdr[0]
        gso = hdr[1] & ~VNET_GSO_ECN
        gso_size = hdr[4] | (hdr[5] << 8)
        csum_start = hdr[6] | (hdr[7] << 8)
        csum_offset = hdr[8] | (hdr[9] << 8)
        if gso == VNET_GSO_TCPV4 or gso == VNET_GSO_TCPV6:
            if not self._tso_context(frame, flen, gso_size, gso == VNET_GSO_TCPV4):
                self.tx_dropped += 1
                return -1
            dcmd = TXD_CMD_DEXT | TXD_DTYP_D | TXD_CMD_TSE
            popts = TXD_POPTS_TXSM | (TXD_POPTS_IXSM if gso == VNET_GSO_TCPV4 else 0)
            self.tx_tso += 1
        elif gso != VNET_GSO_NONE:
            self.tx_dropped += 1     # UDP fragmentation and the like: never offered (offloads)
            return -1
        elif flags & VNET_F_NEEDS_CSUM:
            if <uint32_t>csum_start + csum_offset + 2 > flen:
                self.tx_dropped += 1
                return -1
            if csum_start + csum_offset <= 255:
                # context: TUCSS, TUCSO, TUCSE 0 (to the end); no TSE
                self._put_context((<uint64_t>csum_start << 32) | (<uint64_t>(csum_start + csum_offset) << 40),
                                  TXD_CMD_DEXT, 0)
                dcmd = TXD_CMD_DEXT | TXD_DTYP_D
                popts = TXD_POPTS_TXSM
            else:    # beyond what the context's 8-bit offsets reach: sum it here
                e1k_put_be16(frame + csum_start + csum_offset,
                             <uint16_t>(~sum16(frame + csum_start, flen - csum_start) & 0xFFFF))
            self.tx_csum += 1
        while done < flen:
            chunk = flen - done
            if chunk > TXD_MAX_DATA:
                chunk = TXD_MAX_DATA
            if dcmd:
                self._put_desc(iova + done, chunk | dcmd | TXD_CMD_IFCS | (
                    (TXD_CMD_EOP | TXD_CMD_RS | TXD_CMD_IDE) if done + chunk == flen else 0), popts << 8)
            else:    # legacy descriptor: length in the low 16 bits, CMD in the top byte
                self._put_desc(iova + done, chunk | TXD_CMD_IFCS | (
                    (TXD_CMD_EOP | TXD_CMD_RS | TXD_CMD_IDE) if done + chunk == flen else 0), 0)
            done += chunk
        self.tx_frames += 1
        self.tx_bytes += flen
        return <int32_t>((self.tx_tail + self.tx_ring_size - 1) % self.tx_ring_size)

    cdef bint _tso_context(self, uint8_t *frame, uint32_t flen, uint16_t mss, bint v4):
        """The TSO context descriptor for a TCP frame of flen bytes; False if the frame is not one.

        The header length comes from the headers themselves (the front end's
        hdr_len is not trusted).  As the 8254x wants it (and QEMU models): the
        IPv4 total length and checksum 0, the IPv6 payload length 0, the TCP
        checksum the pseudo-header sum without the length.
        """
        cdef uint8_t h[HEADER_COPY]
        cdef uint32_t n = flen if flen < HEADER_COPY else HEADER_COPY
        cdef uint32_t l3, l4, hdrlen, ethertype, ihl, paylen
        cdef uint64_t s
        cdef int i
        memcpy(h, frame, n)
        l3 = 14
        ethertype = e1k_be16(h + 12)
        if ethertype == ETH_P_8021Q:
            if n < 18:
                return False
            ethertype = e1k_be16(h + 16)
            l3 = 18
        if v4:
            if ethertype != ETH_P_IP or n < l3 + 20 or h[l3] >> 4 != 4:
                return False
            ihl = (h[l3] & 0xF) * 4
            if ihl < 20 or h[l3 + 9] != IPPROTO_TCP:
                return False
            l4 = l3 + ihl
        else:
            if ethertype != ETH_P_IPV6 or n < l3 + 40 or h[l3] >> 4 != 6 or h[l3 + 6] != IPPROTO_TCP:
                return False          # extension headers before TCP: not segmented here
            l4 = l3 + 40
        if n < l4 + 20:
            return False
        hdrlen = l4 + (h[l4 + 12] >> 4) * 4
        if (h[l4 + 12] >> 4) < 5 or hdrlen > n or hdrlen > 255 or hdrlen >= flen:
            return False
        if mss == 0 or hdrlen + mss > 16110:
            return False
        paylen = flen - hdrlen
        s = IPPROTO_TCP
        if v4:
            for i in range(4):
                s += e1k_be16(h + l3 + 12 + 2 * i)       # source and destination addresses
            e1k_put_be16(frame + l3 + 2, 0)             # total length: the device sets it per segment
            e1k_put_be16(frame + l3 + 10, 0)            # header checksum: the device computes it (IXSM)
        else:
            for i in range(16):
                s += e1k_be16(h + l3 + 8 + 2 * i)
            e1k_put_be16(frame + l3 + 4, 0)             # payload length
        e1k_put_be16(frame + l4 + 16, <uint16_t>fold(s))
        self._put_context(
            <uint64_t>l3 | (<uint64_t>(l3 + 10) << 8) | (<uint64_t>((l4 - 1) if v4 else 0) << 16)
            | (<uint64_t>l4 << 32) | (<uint64_t>(l4 + 16) << 40),
            paylen | TXD_CMD_DEXT | TXD_CMD_TSE | TXD_CMD_TCP | (TXD_CMD_IP if v4 else 0),
            (hdrlen << 8) | (<uint32_t>mss << 16))
        return True

    # -- RX ------------------------------------------------------------------------------------
    cdef bint _rx_collect(self) except -1:
        cdef uint32_t start = self.rx_produced, k, length
        cdef uint8_t status, errors, flags
        cdef uint64_t addr
        cdef e1k_rx_desc *d
        while self.rx_produced != self.rx_given:
            k = self.rx_produced % NETSHM_RX_BUFS
            d = &self.rxr[k]
            status = e1k_load8(&d.status)
            if not status & RXD_STAT_DD:
                break
            addr = e1k_load64(&d.addr)
            if addr != self.rx_buf_iova(k):
                raise DeviceFault("RX descriptor %d came back with buffer address %#x, not its buffer %#x: "
                                  "the device was programmed to DMA outside this driver's memory"
                                  % (k, addr, self.rx_buf_iova(k)))
            length = e1k_load16(&d.length)
            errors = d.errors
            if length > NETSHM_RX_BUF_SIZE:
                raise DeviceFault("RX descriptor %d reports %d bytes in a %d-byte buffer"
                                  % (k, length, NETSHM_RX_BUF_SIZE))
            flags = 0
            if status & RXD_STAT_EOP:
                flags = NETSHM_RX_EOP
                if errors & RXD_ERR_FRAME or self.rx_discarding:
                    flags |= NETSHM_RX_ERROR
                    self.rx_errors += 1
                elif not status & RXD_STAT_IXSM and status & RXD_STAT_TCPCS and not errors & RXD_ERR_TCPE \
                        and not (status & RXD_STAT_IPCS and errors & RXD_ERR_IPE):
                    flags |= NETSHM_RX_CSUM_OK
                    self.rx_csum_ok += 1
                if not flags & NETSHM_RX_ERROR:
                    self.rx_frames += 1
                self.rx_frame_bufs = 0
                self.rx_discarding = False
            elif self.rx_discarding:
                flags = NETSHM_RX_EOP | NETSHM_RX_ERROR
            else:
                self.rx_frame_bufs += 1
                if self.rx_frame_bufs >= NETSHM_RX_FRAME_BUFS:
                    # longer than netshm.h lets a frame be: end it here as bad, drop the rest
                    flags = NETSHM_RX_EOP | NETSHM_RX_ERROR
                    self.rx_discarding = True
                    self.rx_frame_bufs = 0
                    self.rx_truncated += 1
            self.rx_bytes += length
            if self.bounce_rx != NULL:
                memcpy(self.shm + NETSHM_RXBUF_OFF + <size_t>k * NETSHM_RX_BUF_SIZE,
                       self.bounce_rx + <size_t>k * NETSHM_RX_BUF_SIZE, length)
            self.rxq[k].len = <uint16_t>length
            self.rxq[k].flags = flags
            self.rx_produced += 1
        if self.rx_produced != start:
            netshm_store(&self.hdr.rx_produced, self.rx_produced)
            if self.rx_produced == self.rx_given:
                self.rx_no_buffer += 1    # the device has filled every buffer it had
            return True
        return False

    cdef int _rx_refill(self) except -1:
        cdef uint32_t consumed = netshm_load(&self.hdr.rx_consumed)
        cdef uint32_t target, k, start = self.rx_given
        cdef e1k_rx_desc *d
        if <uint32_t>(consumed - self.rx_consumed) > <uint32_t>(self.rx_produced - self.rx_consumed):
            raise ContractViolation("rx_consumed moved from %d to %d: backwards or past rx_produced %d"
                                    % (self.rx_consumed, consumed, self.rx_produced))
        self.rx_consumed = consumed
        target = consumed + NETSHM_RX_BUFS - 1     # one descriptor stays empty: RDT == RDH means none
        while self.rx_given != target:
            k = self.rx_given % NETSHM_RX_BUFS
            d = &self.rxr[k]
            d.addr = self.rx_buf_iova(k)
            d.length = 0
            d.csum = 0
            d.errors = 0
            d.special = 0
            d.status = 0
            self.rx_given += 1
        if self.wild_rx_iova is not None:
            # the fault: the next buffer the device fills is somewhere no mapping covers
            self.rxr[self.rx_produced % NETSHM_RX_BUFS].addr = <uint64_t>self.wild_rx_iova
            self.wild_rx_iova = None
            start = self.rx_given - 1     # force the RDT write below
        if self.rx_given != start:
            e1k_wr32(self.regs, RDT, self.rx_given % NETSHM_RX_BUFS)
        return 0

    # -- what the Python side reports -------------------------------------------------------
    def counters(self):
        return {"tx_frames": self.tx_frames, "tx_bytes": self.tx_bytes, "tx_tso": self.tx_tso,
                "tx_csum_offload": self.tx_csum, "tx_dropped": self.tx_dropped,
                "tx_ring_full": self.tx_ring_full, "rx_frames": self.rx_frames, "rx_bytes": self.rx_bytes,
                "rx_errors": self.rx_errors, "rx_csum_ok": self.rx_csum_ok, "rx_truncated": self.rx_truncated,
                "rx_no_buffer": self.rx_no_buffer,
                "notifies": self.notifies, "services": self.services, "interrupts": self.interrupts,
                "doorbells": self.doorbells}

    def position(self):
        return {"tx_done": self.tx_done, "tx_queued": self.tx_queued, "tx_tail": self.tx_tail,
                "tx_clean": self.tx_clean, "rx_produced": self.rx_produced,
                "rx_consumed": self.rx_consumed, "rx_given": self.rx_given}
