# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The AHCI data path: one port's command slots <-> the front end's shared memory (libdrv/blkshm.h).

One call per wakeup, no Python per request; the two wakeups of the data
path (on_interrupt: the interrupt's eventfd; on_doorbell: the front end's)
go straight into the driver's loop and call back into Python only for what
is rare (a port error, a front end that broke the rules).  service():
  reap   the slots the HBA has finished (PxCI and PxSACT clear) become
         completions in the shared memory, in the order they are found;
  take   submission entries sq_taken .. sq_posted-1 are copied into a
         private queue (each read once, then checked there);
  start  queued requests go into free command slots: READ/WRITE as NCQ
         (READ/WRITE FPDMA QUEUED, FUA in the FIS) up to the device's queue
         depth; FLUSH, DISCARD, and everything when the device has no NCQ,
         alone (AHCI forbids mixing queued and non-queued commands), which
         also gives FLUSH its ordering (blkshm.h);
  and rings the front end's eventfd once if completions were posted and it sleeps.

Data moves between the device and the shared memory's data area directly:
each command's one PRD entry points at the request's data (the whole memfd
is mapped for the device).  A request that breaks blkshm.h's rules
completes with -EINVAL without touching the device; a broken counter
raises ContractViolation (the driver refuses that front end).

The driver's own DMA memory (ctrl):
  CTRL_CMD_LIST   command list, 32 headers
  CTRL_RFIS       received FIS area
  CTRL_BUF        512 bytes for polled commands (IDENTIFY, READ LOG EXT)
  CTRL_DSM        512 bytes: one block of TRIM ranges
  CTRL_TABLES     one command table per slot (CFIS + CTRL_PRDS PRD entries)
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int32_t
from libc.string cimport memcpy, memset
from libdrv.blkshm cimport *

cdef extern from *:
    """
    #include <errno.h>
    #include <time.h>
    #include <unistd.h>
    #include <sys/ioctl.h>
    #include <linux/vfio.h>
    static inline void ahci_wr32(uint8_t *regs, uint32_t off, uint32_t v) {
        __atomic_thread_fence(__ATOMIC_SEQ_CST);   /* what the command refers to is in memory first */
        *(volatile uint32_t *)(regs + off) = v;
    }
    static inline uint32_t ahci_rd32(uint8_t *regs, uint32_t off) {
        uint32_t v = *(volatile uint32_t *)(regs + off);
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        return v;
    }
    static inline int ahci_notify(int fd) {
        uint64_t one = 1;
        return write(fd, &one, sizeof one) == sizeof one ? 0 : errno;
    }
    static inline void ahci_drain(int fd) {
        uint64_t count;
        if (fd >= 0) (void)!read(fd, &count, sizeof count);
    }
    static inline int ahci_set_irqs(int fd, struct vfio_irq_set *req) {
        return ioctl(fd, VFIO_DEVICE_SET_IRQS, req) == 0 ? 0 : errno;
    }
    static inline double ahci_now(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return ts.tv_sec + ts.tv_nsec * 1e-9;
    }
    static inline int ahci_ctz(uint32_t v) { return __builtin_ctz(v); }
    static inline int ahci_popcount(uint32_t v) { return __builtin_popcount(v); }
    """
    void ahci_wr32(uint8_t *regs, uint32_t off, uint32_t v) nogil
    uint32_t ahci_rd32(uint8_t *regs, uint32_t off) nogil
    int ahci_notify(int fd) nogil
    void ahci_drain(int fd) nogil
    double ahci_now() nogil
    int ahci_ctz(uint32_t v) nogil
    int ahci_popcount(uint32_t v) nogil
    struct vfio_irq_set:
        uint32_t argsz
        uint32_t flags
        uint32_t index
        uint32_t start
        uint32_t count
    int ahci_set_irqs(int fd, vfio_irq_set *req) nogil
    enum:
        VFIO_IRQ_SET_DATA_NONE
        VFIO_IRQ_SET_ACTION_UNMASK
        VFIO_PCI_INTX_IRQ_INDEX
        EINVAL
        EIO
        EOPNOTSUPP

# drivers/ahci/regs.py has these with their sources.
DEF HBA_IS = 0x08
DEF PxIS = 0x10
DEF PxCMD = 0x18
DEF PxTFD = 0x20
DEF PxSERR = 0x30
DEF PxSACT = 0x34
DEF PxCI = 0x38
DEF IS_OFS = 1 << 24
DEF IS_IFS = 1 << 27
DEF IS_HBDS = 1 << 28
DEF IS_HBFS = 1 << 29
DEF IS_TFES = 1 << 30
DEF IS_ERRORS = IS_OFS | IS_IFS | IS_HBDS | IS_HBFS | IS_TFES
DEF TFD_STS_ERR = 1 << 0
DEF CH_CFL_H2D = 5
DEF CH_WRITE = 1 << 6
DEF FIS_TYPE_REG_H2D = 0x27
DEF FIS_H2D_COMMAND = 0x80
DEF DEVICE_LBA = 1 << 6
DEF DEVICE_FUA = 1 << 7
DEF ATA_READ_DMA_EXT = 0x25
DEF ATA_WRITE_DMA_EXT = 0x35
DEF ATA_WRITE_DMA_FUA_EXT = 0x3D
DEF ATA_READ_FPDMA_QUEUED = 0x60
DEF ATA_WRITE_FPDMA_QUEUED = 0x61
DEF ATA_FLUSH_CACHE_EXT = 0xEA
DEF ATA_DATA_SET_MANAGEMENT = 0x06
DEF ATA_DSM_TRIM = 0x01
DEF DSM_RANGES = 64
DEF DSM_RANGE_MAX = 0xFFFF

DEF SLOTS_MAX = 32
DEF CTRL_CMD_LIST = 0x0000
DEF CTRL_RFIS = 0x0400
DEF CTRL_BUF = 0x0600
DEF CTRL_DSM = 0x0800
DEF CTRL_TABLES = 0x1000
DEF TABLE_SIZE = 0x100          # 128-byte CFIS/ACMD area + CTRL_PRDS entries
DEF TABLE_PRDT = 0x80
DEF CTRL_PRDS = 8
DEF CTRL_SIZE = CTRL_TABLES + SLOTS_MAX * TABLE_SIZE

CTRL_BYTES = (CTRL_SIZE + 4095) & ~4095
CTRL_CMD_LIST_OFF = CTRL_CMD_LIST
CTRL_RFIS_OFF = CTRL_RFIS
CTRL_BUF_OFF = CTRL_BUF
DISCARD_MAX_BLOCKS = DSM_RANGES * DSM_RANGE_MAX


class ContractViolation(Exception):
    """The front end broke blkshm.h's rules: refuse it."""


cdef struct job_t:
    blkshm_req req
    uint32_t seq         # submission order, for requeueing after an error
    uint8_t solo         # after an error: issue alone, not queued
    uint8_t errors       # port errors it was caught in
    uint8_t poisoned     # `rsctl fi --media-error`: sent to an LBA past the end, so the device fails it


cdef class Port:
    cdef uint8_t *abar
    cdef uint8_t *regs                 # this port's registers
    cdef uint32_t port_bit
    cdef uint8_t *ctrl
    cdef uint64_t ctrl_iova
    # the device, from IDENTIFY (configure())
    cdef readonly uint64_t capacity
    cdef readonly uint32_t block_size, depth
    cdef readonly bint ncq, fua_ncq, fua_ext, trim
    # slots
    cdef job_t slots[SLOTS_MAX]
    cdef readonly uint32_t issued      # slots the HBA has
    cdef bint exclusive                # a non-queued command is out: nothing else goes with it
    cdef readonly bint halted          # error recovery: nothing is issued
    cdef public bint poison_next       # the next READ/WRITE taken is poisoned (job_t.poisoned)
    # requests taken from the shared memory, not yet issued (a ring)
    cdef job_t pend[BLKSHM_SLOTS]
    cdef uint32_t pend_head, pend_count, seq
    # the front end's memory
    cdef uint8_t *shm
    cdef uint64_t data_iova
    cdef blkshm_header *hdr
    cdef blkshm_req *sq
    cdef blkshm_cpl *cq
    cdef uint32_t sq_taken, cq_posted, cq_consumed
    cdef bint posted_news
    cdef int frontend_efd, doorbell_efd, irq_efd, unmask_fd
    cdef vfio_irq_set unmask_req
    cdef object on_error, on_violation
    # counters
    cdef readonly uint64_t reads, writes, flushes, discards, bytes_read, bytes_written
    cdef readonly uint64_t failed, refused, requeued, interrupts, doorbells, services, notifies
    cdef readonly uint32_t max_issued     # the most commands the HBA had at once

    def __cinit__(self, size_t abar_addr, uint32_t port, size_t ctrl_addr, uint64_t ctrl_iova):
        if port >= 32:
            raise ValueError("an HBA has ports 0..31, not %d" % port)
        self.abar = <uint8_t *>abar_addr
        self.regs = self.abar + 0x100 + port * 0x80
        self.port_bit = 1u << port
        self.ctrl = <uint8_t *>ctrl_addr
        self.ctrl_iova = ctrl_iova
        self.frontend_efd = self.doorbell_efd = self.irq_efd = self.unmask_fd = -1
        self.depth = 1
        memset(self.ctrl, 0, CTRL_SIZE)
        self._detach()

    @property
    def cmd_list_iova(self):
        return self.ctrl_iova + CTRL_CMD_LIST

    @property
    def rfis_iova(self):
        return self.ctrl_iova + CTRL_RFIS

    @property
    def attached(self):
        return self.shm != NULL

    @property
    def outstanding(self):
        """Requests taken from the front end and not yet completed."""
        return ahci_popcount(self.issued) + self.pend_count

    def configure(self, uint64_t capacity, uint32_t block_size, uint32_t depth, bint ncq, bint fua_ncq,
                  bint fua_ext, bint trim):
        """What IDENTIFY said (and what the HBA allows: depth <= its command slots)."""
        if depth < 1 or depth > SLOTS_MAX or block_size not in (512, 4096):
            raise ValueError("depth 1..32 and block size 512 or 4096, not %d and %d" % (depth, block_size))
        self.capacity, self.block_size, self.depth = capacity, block_size, depth
        self.ncq, self.fua_ncq, self.fua_ext, self.trim = ncq, fua_ncq, fua_ext, trim

    def set_interrupt(self, int irq_efd, int device_fd, bint unmask_intx, on_error, on_violation):
        """irq_efd: the interrupt's eventfd; device_fd and unmask_intx: unmask INTx through VFIO
        after each interrupt (MSI needs none); on_error(pxis) for a port error (the driver's
        Python recovers the port, then calls recovered()); on_violation(message) for a front end
        that broke blkshm.h's rules."""
        self.irq_efd = irq_efd
        self.unmask_fd = device_fd if unmask_intx else -1
        memset(&self.unmask_req, 0, sizeof(vfio_irq_set))
        self.unmask_req.argsz = sizeof(vfio_irq_set)
        self.unmask_req.flags = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_UNMASK
        self.unmask_req.index = VFIO_PCI_INTX_IRQ_INDEX
        self.unmask_req.count = 1
        self.on_error = on_error
        self.on_violation = on_violation

    # -- the front end -----------------------------------------------------------------------------------
    def attach(self, size_t shm_addr, uint64_t shm_iova, int frontend_efd, int doorbell_efd):
        """Take a front end's memory (mapped at shm_addr, for the device at shm_iova; its counters
        at 0) and doorbells.  The port must be idle (nothing issued)."""
        if self.issued:
            raise RuntimeError("attach while commands are issued")
        self._detach()
        self.shm = <uint8_t *>shm_addr
        self.data_iova = shm_iova + BLKSHM_DATA_OFF
        self.hdr = <blkshm_header *>(self.shm + BLKSHM_HDR_OFF)
        self.sq = <blkshm_req *>(self.shm + BLKSHM_SQ_OFF)
        self.cq = <blkshm_cpl *>(self.shm + BLKSHM_CQ_OFF)
        self.frontend_efd = frontend_efd
        self.doorbell_efd = doorbell_efd
        blkshm_store(&self.hdr.sq_taken, 0)
        blkshm_store(&self.hdr.cq_posted, 0)
        blkshm_store(&self.hdr.driver_idle, 0)

    def detach(self):
        """Forget the front end and every request of it (the caller stopped the port first:
        the HBA has dropped whatever was issued)."""
        self._detach()

    cdef void _detach(self):
        self.shm = NULL
        self.hdr = NULL
        self.frontend_efd = self.doorbell_efd = -1
        self.issued = 0
        self.exclusive = self.halted = False
        self.pend_head = self.pend_count = 0
        self.sq_taken = self.cq_posted = self.cq_consumed = 0
        self.posted_news = False

    # -- the wakeups ---------------------------------------------------------------------------------------
    def on_interrupt(self):
        """The interrupt's eventfd is readable (a loop callback)."""
        cdef int err
        self.interrupts += 1
        ahci_drain(self.irq_efd)
        try:
            self._service_checked()
        finally:
            ahci_wr32(self.abar, HBA_IS, self.port_bit)
            if self.unmask_fd >= 0:
                err = ahci_set_irqs(self.unmask_fd, &self.unmask_req)
                if err:
                    raise OSError(err, "VFIO_DEVICE_SET_IRQS (unmask INTx) failed: the device fd %d is "
                                  "not the VFIO device's, or the device was released" % self.unmask_fd)

    def on_doorbell(self):
        """The front end's doorbell is readable (a loop callback)."""
        self.doorbells += 1
        ahci_drain(self.doorbell_efd)
        self._service_checked()

    def service(self):
        """Reap, take, start; also the safety net's call for a lost interrupt."""
        self._service_checked()

    cdef void _service_checked(self) except *:
        cdef uint32_t pxis
        try:
            pxis = self._service()
        except ContractViolation as exc:
            self.on_violation(str(exc))
            return
        if pxis & IS_ERRORS:
            self.on_error(pxis)

    cdef uint32_t _service(self) except? 0xFFFFFFFF:
        """Returns PxIS if it has an error bit (the port is then halted), else 0."""
        cdef uint32_t pxis = 0
        cdef bint again
        self.services += 1
        if self.hdr != NULL:
            blkshm_store(&self.hdr.driver_idle, 0)
        while True:
            pxis = self._reap()
            if pxis & IS_ERRORS:
                self.halted = True
                self._publish()
                return pxis
            if self.hdr == NULL:
                return 0
            self._take()
            self._start()
            if self.issued:
                pxis = self._reap()     # what finished meanwhile (QEMU completes some at once)
                if pxis & IS_ERRORS:
                    self.halted = True
                    self._publish()
                    return pxis
            # blkshm.h's sleep protocol: say we sleep, then look once more.
            blkshm_store(&self.hdr.driver_idle, 1)
            blkshm_barrier()
            again = blkshm_load(&self.hdr.sq_posted) != self.sq_taken and not self.halted
            if not again:
                break
            blkshm_store(&self.hdr.driver_idle, 0)
        self._publish()
        return 0

    cdef void _publish(self):
        if not self.posted_news or self.hdr == NULL:
            return
        self.posted_news = False
        blkshm_store(&self.hdr.cq_posted, self.cq_posted)
        blkshm_barrier()
        if blkshm_load(&self.hdr.frontend_idle) != 0 and self.frontend_efd >= 0:
            ahci_notify(self.frontend_efd)
            self.notifies += 1

    # -- completions ---------------------------------------------------------------------------------------
    cdef uint32_t _reap(self) except? 0xFFFFFFFF:
        cdef uint32_t pxis = ahci_rd32(self.regs, PxIS)
        cdef uint32_t busy, done
        cdef int s
        if pxis:
            ahci_wr32(self.regs, PxIS, pxis)     # cleared before CI is read: what comes later raises it again
        if self.issued == 0:
            return pxis
        busy = ahci_rd32(self.regs, PxCI)
        if self.ncq:
            busy |= ahci_rd32(self.regs, PxSACT)
        done = self.issued & ~busy
        while done:
            s = ahci_ctz(done)
            done &= done - 1
            self.issued &= ~(1u << s)
            self._account(&self.slots[s].req)
            self._complete(self.slots[s].req.tag, 0)
        if self.issued == 0:
            self.exclusive = False
        return pxis

    cdef void _account(self, blkshm_req *r):
        cdef uint64_t n = <uint64_t>r.count * self.block_size
        if r.op == BLKSHM_OP_READ:
            self.reads += 1
            self.bytes_read += n
        elif r.op == BLKSHM_OP_WRITE:
            self.writes += 1
            self.bytes_written += n
        elif r.op == BLKSHM_OP_FLUSH:
            self.flushes += 1
        else:
            self.discards += 1

    cdef int _complete(self, uint32_t tag, int32_t status) except -1:
        cdef uint32_t consumed, i
        if self.hdr == NULL:
            return 0
        if self.cq_posted - self.cq_consumed >= BLKSHM_SLOTS:
            consumed = blkshm_load(&self.hdr.cq_consumed)
            if consumed - self.cq_consumed > self.cq_posted - self.cq_consumed:
                raise ContractViolation("cq_consumed %d is not between the last one seen (%d) and cq_posted (%d)"
                                        % (consumed, self.cq_consumed, self.cq_posted))
            self.cq_consumed = consumed
            if self.cq_posted - self.cq_consumed >= BLKSHM_SLOTS:
                raise ContractViolation("the completion ring is full: the front end has more than %d "
                                        "requests outstanding" % BLKSHM_SLOTS)
        i = self.cq_posted % BLKSHM_SLOTS
        self.cq[i].tag = tag
        self.cq[i].status = status
        self.cq_posted += 1
        self.posted_news = True
        return 0

    # -- submissions ---------------------------------------------------------------------------------------
    cdef int _take(self) except -1:
        cdef uint32_t posted = blkshm_load(&self.hdr.sq_posted)
        cdef uint32_t n = posted - self.sq_taken
        cdef uint32_t consumed, i
        cdef job_t *j
        if n == 0:
            return 0
        if n > BLKSHM_SLOTS:
            raise ContractViolation("sq_posted %d is %d entries past sq_taken %d (at most %d)"
                                    % (posted, n, self.sq_taken, BLKSHM_SLOTS))
        consumed = blkshm_load(&self.hdr.cq_consumed)
        if consumed - self.cq_consumed > self.cq_posted - self.cq_consumed:
            raise ContractViolation("cq_consumed %d is not between the last one seen (%d) and cq_posted (%d)"
                                    % (consumed, self.cq_consumed, self.cq_posted))
        self.cq_consumed = consumed
        if n + self.pend_count + ahci_popcount(self.issued) + (self.cq_posted - self.cq_consumed) > BLKSHM_SLOTS:
            raise ContractViolation("the front end has more than %d requests outstanding" % BLKSHM_SLOTS)
        for i in range(n):
            j = &self.pend[(self.pend_head + self.pend_count) % BLKSHM_SLOTS]
            memcpy(&j.req, &self.sq[(self.sq_taken + i) % BLKSHM_SLOTS], sizeof(blkshm_req))
            j.seq = self.seq
            self.seq += 1
            j.solo = j.errors = j.poisoned = 0
            if self.poison_next and (j.req.op == BLKSHM_OP_READ or j.req.op == BLKSHM_OP_WRITE):
                j.poisoned = 1
                self.poison_next = False
            self.pend_count += 1
        self.sq_taken = posted
        blkshm_store(&self.hdr.sq_taken, posted)
        return 0

    cdef int32_t _check(self, blkshm_req *r):
        """0, or the status the request completes with without reaching the device (blkshm.h)."""
        cdef uint64_t nbytes
        if r.op == BLKSHM_OP_READ or r.op == BLKSHM_OP_WRITE:
            if r.flags & ~BLKSHM_F_FUA or (r.flags and r.op == BLKSHM_OP_READ):
                return -EINVAL
            nbytes = <uint64_t>r.count * self.block_size
            if r.count == 0 or nbytes > BLKSHM_IO_MAX or r.data_off % BLKSHM_DATA_ALIGN \
                    or r.data_off + nbytes > BLKSHM_DATA_SIZE:
                return -EINVAL
        elif r.op == BLKSHM_OP_FLUSH:
            return -EINVAL if r.lba or r.count or r.flags else 0
        elif r.op == BLKSHM_OP_DISCARD:
            if r.count == 0 or r.count > DSM_RANGES * DSM_RANGE_MAX or r.flags:
                return -EINVAL
            if not self.trim:
                return -EOPNOTSUPP
        else:
            return -EINVAL
        if r.lba > self.capacity or r.count > self.capacity - r.lba:
            return -EINVAL
        if r.flags & BLKSHM_F_FUA and not (self.fua_ncq if self.ncq else self.fua_ext):
            return -EOPNOTSUPP
        return 0

    cdef int _start(self) except -1:
        cdef uint32_t new_bits = 0, free_bits, s
        cdef int32_t status
        cdef job_t *j
        cdef bint queued
        while self.pend_count and not self.halted and not self.exclusive:
            j = &self.pend[self.pend_head]
            status = self._check(&j.req)
            if status:
                self.refused += 1
                self._complete(j.req.tag, status)
                self._pop()
                continue
            queued = self.ncq and not j.solo and (j.req.op == BLKSHM_OP_READ or j.req.op == BLKSHM_OP_WRITE)
            if not queued:
                if self.issued or new_bits:
                    break
                self._build(0, j, False)
                self.exclusive = True
                new_bits = 1
                self._pop()
                break
            if <uint32_t>ahci_popcount(self.issued | new_bits) >= self.depth:
                break
            free_bits = ~(self.issued | new_bits) & ((1u << self.depth) - 1 if self.depth < 32 else 0xFFFFFFFF)
            s = ahci_ctz(free_bits)
            self._build(s, j, True)
            new_bits |= 1u << s
            self._pop()
        if new_bits:
            self.issued |= new_bits
            if <uint32_t>ahci_popcount(self.issued) > self.max_issued:
                self.max_issued = ahci_popcount(self.issued)
            if not self.exclusive:
                ahci_wr32(self.regs, PxSACT, new_bits)
            ahci_wr32(self.regs, PxCI, new_bits)
        return 0

    cdef inline void _pop(self):
        self.pend_head = (self.pend_head + 1) % BLKSHM_SLOTS
        self.pend_count -= 1

    cdef void _build(self, uint32_t s, job_t *j, bint queued):
        cdef blkshm_req *r = &j.req
        cdef uint8_t *hdr = self.ctrl + CTRL_CMD_LIST + s * 32
        cdef uint8_t *table = self.ctrl + CTRL_TABLES + s * TABLE_SIZE
        cdef uint8_t *fis = table
        cdef uint64_t table_iova = self.ctrl_iova + CTRL_TABLES + s * TABLE_SIZE
        cdef uint64_t lba = r.lba, dba = 0, left, at
        cdef uint32_t nbytes = 0, dw0, count, n, k
        cdef uint64_t *ranges
        cdef uint8_t command, device = DEVICE_LBA
        cdef bint write = False
        memcpy(&self.slots[s], j, sizeof(job_t))
        memset(fis, 0, 20)
        fis[0] = FIS_TYPE_REG_H2D
        fis[1] = FIS_H2D_COMMAND
        count = r.count
        if r.op == BLKSHM_OP_READ or r.op == BLKSHM_OP_WRITE:
            write = r.op == BLKSHM_OP_WRITE
            nbytes = r.count * self.block_size
            dba = self.data_iova + r.data_off
            if queued:
                command = ATA_WRITE_FPDMA_QUEUED if write else ATA_READ_FPDMA_QUEUED
                fis[3] = count & 0xFF               # NCQ: the count goes in the features fields,
                fis[11] = (count >> 8) & 0xFF       # the tag in count bits 7:3
                fis[12] = s << 3
                if r.flags & BLKSHM_F_FUA:
                    device |= DEVICE_FUA
                count = 0
            elif write:
                command = ATA_WRITE_DMA_FUA_EXT if r.flags & BLKSHM_F_FUA else ATA_WRITE_DMA_EXT
            else:
                command = ATA_READ_DMA_EXT
        elif r.op == BLKSHM_OP_FLUSH:
            command = ATA_FLUSH_CACHE_EXT
            lba = count = 0
        else:
            # TRIM: one 512-byte block of (LBA 47:0, count 63:48) ranges, sent as data.
            command = ATA_DATA_SET_MANAGEMENT
            fis[3] = ATA_DSM_TRIM
            ranges = <uint64_t *>(self.ctrl + CTRL_DSM)
            memset(ranges, 0, 512)
            left, at, k = r.count, r.lba, 0
            while left:
                n = DSM_RANGE_MAX if left > DSM_RANGE_MAX else <uint32_t>left
                ranges[k] = at | (<uint64_t>n << 48)
                at += n
                left -= n
                k += 1
            lba, count, write = 0, 1, True
            nbytes = 512
            dba = self.ctrl_iova + CTRL_DSM
        if j.poisoned:
            lba = self.capacity + 0x10000   # the device's own range check fails it (ID not found)
        fis[2] = command
        fis[4] = lba & 0xFF
        fis[5] = (lba >> 8) & 0xFF
        fis[6] = (lba >> 16) & 0xFF
        fis[7] = device
        fis[8] = (lba >> 24) & 0xFF
        fis[9] = (lba >> 32) & 0xFF
        fis[10] = (lba >> 40) & 0xFF
        if not queued:
            fis[12] = count & 0xFF
            fis[13] = (count >> 8) & 0xFF
        dw0 = CH_CFL_H2D | (CH_WRITE if write else 0)
        if nbytes:
            # One PRD entry: the data is contiguous in IOVA space and at most 1 MiB (< 4 MiB).
            (<uint64_t *>(table + TABLE_PRDT))[0] = dba
            (<uint32_t *>(table + TABLE_PRDT))[2] = 0
            (<uint32_t *>(table + TABLE_PRDT))[3] = nbytes - 1
            dw0 |= 1u << 16
        (<uint32_t *>hdr)[0] = dw0
        (<uint32_t *>hdr)[1] = 0
        (<uint64_t *>(hdr + 8))[0] = table_iova

    # -- error recovery (the driver's Python drives it) ------------------------------------------------
    def issued_tags(self):
        """{slot: (tag, op, seq)} of what the HBA had when the port halted."""
        cdef uint32_t b = self.issued
        cdef int s
        out = {}
        while b:
            s = ahci_ctz(b)
            b &= b - 1
            out[s] = (self.slots[s].req.tag, self.slots[s].req.op, self.slots[s].seq)
        return out

    def recovered(self, fail_slots, uint32_t retry_limit=2):
        """The port was stopped and started again (PxCI and PxSACT are clear): the slots in
        fail_slots complete with -EIO; the rest go back to the head of the queue in submission
        order, each to be issued alone (not queued) so that one failing again fails alone.
        A request caught in more than retry_limit errors fails too."""
        cdef uint32_t b = self.issued
        cdef int s
        cdef job_t *j
        back = []
        while b:
            s = ahci_ctz(b)
            b &= b - 1
            self.slots[s].errors += 1
            if s in fail_slots or self.slots[s].errors > retry_limit:
                self.failed += 1
                self._complete(self.slots[s].req.tag, -EIO)
            else:
                back.append((self.slots[s].seq, s))
        back.sort(reverse=True)
        for _, s in back:      # pushed at the head, youngest first: the oldest ends up first
            self.pend_head = (self.pend_head + BLKSHM_SLOTS - 1) % BLKSHM_SLOTS
            j = &self.pend[self.pend_head]
            memcpy(j, &self.slots[s], sizeof(job_t))
            j.solo = 1
            self.pend_count += 1
            self.requeued += 1
        self.issued = 0
        self.exclusive = self.halted = False
        self._service_checked()

    # -- polled commands (init, recovery): the port must be idle ----------------------------------------
    def polled(self, uint8_t command, uint16_t features=0, uint16_t count=0, uint64_t lba=0,
               uint32_t nbytes=0, bint write=False, double timeout=1.0, bint while_halted=False):
        """Run one non-queued command in slot 0 with its data in the 512-byte buffer (CTRL_BUF)
        and wait for it by polling; returns (ok, PxTFD, PxIS).  while_halted: in error recovery,
        after the port was restarted (the HBA dropped what was issued; the jobs are kept)."""
        cdef uint8_t *hdr = self.ctrl + CTRL_CMD_LIST
        cdef uint8_t *fis = self.ctrl + CTRL_TABLES
        cdef uint32_t pxis = 0, tfd
        cdef double deadline
        if self.issued and not (while_halted and self.halted):
            raise RuntimeError("a polled command while commands are issued")
        if nbytes > 512:
            raise ValueError("a polled command moves at most 512 bytes")
        memset(fis, 0, 20)
        fis[0] = FIS_TYPE_REG_H2D
        fis[1] = FIS_H2D_COMMAND
        fis[2] = command
        fis[3] = features & 0xFF
        fis[11] = features >> 8
        fis[4] = lba & 0xFF
        fis[5] = (lba >> 8) & 0xFF
        fis[6] = (lba >> 16) & 0xFF
        fis[7] = DEVICE_LBA
        fis[8] = (lba >> 24) & 0xFF
        fis[9] = (lba >> 32) & 0xFF
        fis[10] = (lba >> 40) & 0xFF
        fis[12] = count & 0xFF
        fis[13] = count >> 8
        (<uint32_t *>hdr)[0] = CH_CFL_H2D | (CH_WRITE if write else 0) | ((1u << 16) if nbytes else 0)
        (<uint32_t *>hdr)[1] = 0
        (<uint64_t *>(hdr + 8))[0] = self.ctrl_iova + CTRL_TABLES
        if nbytes:
            (<uint64_t *>(fis + TABLE_PRDT))[0] = self.ctrl_iova + CTRL_BUF
            (<uint32_t *>(fis + TABLE_PRDT))[2] = 0
            (<uint32_t *>(fis + TABLE_PRDT))[3] = nbytes - 1
        ahci_wr32(self.regs, PxIS, 0xFFFFFFFF)
        ahci_wr32(self.regs, PxCI, 1)
        deadline = ahci_now() + timeout
        while True:
            pxis = ahci_rd32(self.regs, PxIS)
            if pxis & IS_ERRORS or not ahci_rd32(self.regs, PxCI) & 1:
                break
            if ahci_now() > deadline:
                break
        tfd = ahci_rd32(self.regs, PxTFD)
        ahci_wr32(self.regs, PxIS, pxis)
        ok = not (pxis & IS_ERRORS) and not (ahci_rd32(self.regs, PxCI) & 1) and not (tfd & TFD_STS_ERR)
        return ok, tfd, pxis

    def buffer(self):
        """The 512 bytes a polled command read."""
        return bytes((<char *>self.ctrl)[CTRL_BUF:CTRL_BUF + 512])

    def counters(self):
        return {"reads": self.reads, "writes": self.writes, "flushes": self.flushes,
                "discards": self.discards, "bytes_read": self.bytes_read,
                "bytes_written": self.bytes_written, "failed": self.failed, "refused": self.refused,
                "requeued": self.requeued, "interrupts": self.interrupts, "doorbells": self.doorbells,
                "services": self.services, "notifies": self.notifies, "max_issued": self.max_issued}
