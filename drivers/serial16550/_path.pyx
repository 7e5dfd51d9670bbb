# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The 16550 data path in C: the UART <-> the front end's byte rings (libdrv/chrshm.h).

    path = SerialPath(endpoint_fd, base, fifo, irq_efd, irq_no)
    path.configure(lcr, divisor, fcr, mcr, clear_fifos)   # a burst: IER off, line, FIFOs, MCR, IER on
    path.set_flow(rtscts, ixon, ixoff, vstart, vstop)
    path.attach(memfd, driver_bell_fd, frontend_bell_fd, on_violation)
    loop.add_reader(irq_efd, path.on_irq)                 # the interrupt: no Python on the way
    loop.add_reader(driver_bell_fd, path.on_doorbell)     # the front end's doorbell: likewise
    path.detach()

One service per wakeup does everything: it reads IIR, LSR and MSR in one
VDEVIO ioctl, drains the RX FIFO into the RX ring (RBR read only for bytes
known to be there: docs/serial.md), fills the transmitter from the TX ring
a FIFO's worth at a time and, in the same burst, reads LSR again to keep
going while THRE is set (QEMU transmits at once; real hardware simply
stops and the THR-empty interrupt takes over), publishes what moved
(counters, icount, msr, lsr_temt, state_seq) and rings the front end once
if it sleeps.  Python runs only for what is rare: a front end that broke
chrshm.h's rules (on_violation).

The RX ring full, or no front end attached: ERBFI is masked (and RTS
dropped with rtscts) so the UART's FIFO holds what comes until there is
room; with IXOFF an XOFF goes out when the ring is nearly full and an XON
once it drained.  With IXON a received XOFF stops the transmitter until
XON; neither character is delivered.
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset
from libc.errno cimport errno
from libdrv.chrshm cimport *
from libdrv.rsdrv cimport rsdrv_pio, rsdrv_vpio, RSDRV_PIO_IN, RSDRV_PIO_OUT, RSDRV_IOC_VPIO, \
    RSDRV_IOC_IRQ_REENABLE

cdef extern from "<sys/types.h>" nogil:
    ctypedef long ssize_t
    ctypedef long off_t

cdef extern from "<sys/mman.h>" nogil:
    void *mmap(void *addr, size_t length, int prot, int flags, int fd, off_t offset)
    int munmap(void *addr, size_t length)
    int PROT_READ, PROT_WRITE, MAP_SHARED
    void *MAP_FAILED

cdef extern from *:
    """
    #include <errno.h>
    #include <unistd.h>
    #include <stdint.h>
    #include <sys/ioctl.h>
    static inline int sp_ioctl(int fd, unsigned long req, void *arg) {
        return ioctl(fd, req, arg) == 0 ? 0 : errno;
    }
    static inline void sp_notify(int fd) {
        uint64_t one = 1;
        (void)!write(fd, &one, sizeof one);   /* EAGAIN: its count is full, it has news anyway */
    }
    static inline void sp_drain(int fd) {
        uint64_t count;
        if (fd >= 0) (void)!read(fd, &count, sizeof count);
    }
    """
    int sp_ioctl(int fd, unsigned long req, void *arg) nogil
    void sp_notify(int fd) nogil
    void sp_drain(int fd) nogil

# Registers and bits (regs.py has them all, named as in the PC16550D datasheet).
DEF RBR = 0
DEF THR = 0
DEF DLL = 0
DEF DLM = 1
DEF IER = 1
DEF IIR = 2
DEF FCR = 2
DEF LCR = 3
DEF MCR = 4
DEF LSR = 5
DEF MSR = 6
DEF IER_ERBFI = 0x01
DEF IER_ETBEI = 0x02
DEF IER_ELSI = 0x04
DEF IER_EDSSI = 0x08
DEF IIR_NO_INT = 0x01
DEF IIR_ID_MASK = 0x0E
DEF IIR_RX_DATA = 0x04
DEF FCR_CLEAR_RX = 0x02
DEF FCR_CLEAR_TX = 0x04
DEF LCR_DLAB = 0x80
DEF LCR_BREAK = 0x40
DEF MCR_RTS = 0x02
DEF LSR_DR = 0x01
DEF LSR_OE = 0x02
DEF LSR_PE = 0x04
DEF LSR_FE = 0x08
DEF LSR_BI = 0x10
DEF LSR_THRE = 0x20
DEF LSR_TEMT = 0x40
DEF MSR_DCTS = 0x01
DEF MSR_DDSR = 0x02
DEF MSR_TERI = 0x04
DEF MSR_DDCD = 0x08
DEF MSR_CTS = 0x10

DEF FIFO_SIZE = 16
DEF RX_TRIGGER = 8            # the FIFO interrupts at 8 bytes (FCR_TRIGGER_8)
DEF MAX_OPS = 2 * RX_TRIGGER + 2 + FIFO_SIZE + 8
DEF TX_PER_PASS = 512         # bytes sent before RX is looked at again
DEF PASSES_MAX = 64           # a service ends even if the device keeps it busy
# Bytes one wakeup moves at most, each way: QEMU refills the FIFO as fast as it is read, and
# a wakeup that never ends starves the front end and the heartbeat.  With work left the
# service rings its own doorbell: the loop comes back to it after the others.
DEF RX_BUDGET = 2048
DEF DEFER_MAX = 16            # FIFO-fulls at most before the front end is rung anyway
DEF DEFER_BYTES = 2048        # ... or this much waiting in the RX ring
NOTIFY_DELAY = 0.001          # seconds a streaming ring waits for the next FIFO's worth
DEF TX_BUDGET = 4096
DEF RX_RESUME_ROOM = 1024     # RX is read again once this much of the ring is free

cdef enum:
    IXOFF_HIGH = CHRSHM_RX_SIZE - CHRSHM_RX_SIZE // 8   # used bytes at which XOFF goes out
    IXOFF_LOW = CHRSHM_RX_SIZE // 4                     # used bytes at which XON goes out
    IDLE_AWAKE = CHRSHM_IDLE_AWAKE     # driver_idle (chrshm.h)
    IDLE_TX = CHRSHM_IDLE_TX
    IDLE_RX_TOO = CHRSHM_IDLE_RX


class ContractViolation(Exception):
    """The front end broke chrshm.h's rules: refuse it (disconnect), carry on."""


cdef class SerialPath:
    cdef int ep_fd, irq_efd
    cdef uint32_t irq_no
    cdef uint16_t base
    cdef bint fifo
    cdef rsdrv_pio ops[MAX_OPS]
    cdef rsdrv_vpio vpio
    # the UART as programmed
    cdef readonly uint8_t lcr, mcr_wanted, ier, fcr, msr
    cdef bint configured
    cdef uint8_t mcr                       # mcr_wanted, with RTS dropped while RX is held (rtscts)
    cdef readonly bint rtscts, ixon, ixoff
    cdef readonly uint8_t vstart, vstop
    cdef readonly bint tx_xoff             # an XOFF came in (IXON): TX waits for XON
    cdef readonly bint sent_xoff           # we sent XOFF (IXOFF): XON goes once the ring drained
    cdef int x_char                        # a flow-control character to send first (-1: none)
    cdef readonly bint rx_stopped          # ERBFI masked: the ring is full or nobody is attached
    cdef bint temt                         # LSR.TEMT as last read
    cdef bint st_valid                     # st_lsr, st_iir: read at the end of the last burst
    cdef uint8_t st_lsr, st_iir
    cdef bint etbei                        # THR-empty interrupts on: bytes wait for THR to empty
    # the attached front end (shm NULL when none)
    cdef uint8_t *shm
    cdef chrshm_header *hdr
    cdef uint8_t *rxr
    cdef uint8_t *txr
    cdef int notify_efd, doorbell_efd
    # private, authoritative counters (chrshm.h)
    cdef uint32_t rx_produced, rx_consumed, tx_done, tx_posted
    cdef chrshm_icount ic
    cdef uint32_t state_seq
    cdef bint state_changed, moved
    cdef bint notify_due, notify_state    # the front end is to be rung (state_seq moved too)
    cdef uint32_t rx_budget, tx_budget     # what this service may still move
    cdef bint rx_bulk                      # this service drained a FIFO at its trigger level
    cdef bint deferred                     # a ring of the front end waits for the timer
    cdef int deferrals
    cdef object loop, timer
    cdef bint more                         # it stopped with work left: ring our own doorbell
    cdef readonly uint64_t budget_ends
    cdef object on_violation
    cdef readonly uint64_t interrupts, doorbells, notifies, services, polls, rx_stops, xoff_in, xon_in

    def __cinit__(self, int ep_fd, unsigned int base, bint fifo, int irq_efd, unsigned int irq_no):
        self.ep_fd = ep_fd
        self.base = base
        self.fifo = fifo
        self.irq_efd = irq_efd
        self.irq_no = irq_no
        self.shm = NULL
        self.hdr = NULL
        self.notify_efd = self.doorbell_efd = -1
        self.x_char = -1
        self.rx_stopped = True
        self.vstart, self.vstop = 0x11, 0x13
        memset(&self.ic, 0, sizeof(chrshm_icount))
        self.on_violation = None

    def __dealloc__(self):
        if self.shm != NULL:
            munmap(self.shm, CHRSHM_SIZE)

    # -- port bursts --------------------------------------------------------------------------
    cdef inline void op_in(self, int i, uint8_t reg):
        self.ops[i].port = self.base + reg
        self.ops[i].width = 1
        self.ops[i].dir = RSDRV_PIO_IN
        self.ops[i].value = 0

    cdef inline void op_out(self, int i, uint8_t reg, uint8_t value):
        self.ops[i].port = self.base + reg
        self.ops[i].width = 1
        self.ops[i].dir = RSDRV_PIO_OUT
        self.ops[i].value = value

    cdef int run(self, int n) except -1:
        """The first n ops in one VDEVIO ioctl (all or nothing)."""
        cdef int err
        self.vpio.ops = <uint64_t><size_t>self.ops
        self.vpio.count = n
        self.vpio.reserved = 0
        err = sp_ioctl(self.ep_fd, RSDRV_IOC_VPIO, &self.vpio)
        if err:
            raise OSError(err, "a burst of %d port accesses at %#x failed" % (n, self.base))
        return 0

    cdef inline uint8_t val(self, int i):
        return <uint8_t>self.ops[i].value

    # -- what every LSR and MSR read says ---------------------------------------------------------
    cdef inline void lsr_seen(self, uint8_t lsr):
        # Error bits clear as LSR is read: every read is counted.
        if lsr & (LSR_OE | LSR_PE | LSR_FE | LSR_BI):
            if lsr & LSR_OE:
                self.ic.overrun += 1
            if lsr & LSR_PE:
                self.ic.parity += 1
            if lsr & LSR_FE:
                self.ic.frame += 1
            if lsr & LSR_BI:
                self.ic.brk += 1
            self.state_changed = True
        self.temt = (lsr & LSR_TEMT) != 0

    cdef inline void msr_seen(self, uint8_t msr):
        # Delta bits clear as MSR is read: every read is counted.
        if msr & 0x0F:
            if msr & MSR_DCTS:
                self.ic.cts += 1
            if msr & MSR_DDSR:
                self.ic.dsr += 1
            if msr & MSR_TERI:
                self.ic.rng += 1
            if msr & MSR_DDCD:
                self.ic.dcd += 1
            self.state_changed = True
        if (msr & 0xF0) != (self.msr & 0xF0):
            self.state_changed = True
        self.msr = msr & 0xF0

    cdef inline bint tx_blocked(self):
        return self.tx_xoff or (self.rtscts and not self.msr & MSR_CTS)

    # -- configuration (Python calls these: rare) ---------------------------------------------------
    def configure(self, uint8_t lcr, uint16_t divisor, uint8_t fcr, uint8_t mcr, bint clear_fifos):
        """Line, FIFOs, modem lines and interrupts in one burst; the FIFOs are cleared only if asked
        (a restarted driver's FIFOs hold bytes already confirmed to the front end, or not yet read)."""
        self.lcr = lcr
        self.fcr = fcr
        self.mcr_wanted = mcr
        self.configured = True
        self._ier_for_rx()
        self.op_out(0, IER, 0)
        self.op_out(1, LCR, lcr | LCR_DLAB)
        self.op_out(2, DLL, divisor & 0xFF)
        self.op_out(3, DLM, divisor >> 8)
        self.op_out(4, LCR, lcr)
        self.op_out(5, FCR, fcr | ((FCR_CLEAR_RX | FCR_CLEAR_TX) if clear_fifos else 0))
        self.op_out(6, MCR, self.mcr)
        self.op_in(7, LSR)
        self.op_in(8, IIR)
        self.op_in(9, MSR)                   # stale causes cleared; RBR is data: kept
        self.op_out(10, IER, self.ier)
        self.run(11)
        self.lsr_seen(self.val(7))
        self.msr_seen(self.val(9))
        self._wake()

    def set_mcr(self, uint8_t mcr):
        self.mcr_wanted = mcr
        self._ier_for_rx()
        self.op_out(0, MCR, self.mcr)
        self.op_in(1, MSR)
        self.run(2)
        self.msr_seen(self.val(1))
        self.state_changed = True
        self._wake()

    def set_flow(self, bint rtscts, bint ixon, bint ixoff, uint8_t vstart, uint8_t vstop):
        self.rtscts = rtscts
        self.ixon = ixon
        self.ixoff = ixoff
        self.vstart = vstart
        self.vstop = vstop
        if not ixon:
            self.tx_xoff = False
        if not ixoff and self.sent_xoff:
            self.sent_xoff = False
            self.x_char = vstart             # the far end was told to stop: let it go
        if self.configured:
            self._ier_for_rx()               # RTS follows the RX gate only with rtscts
            self.op_out(0, MCR, self.mcr)
            self.run(1)
            self._wake()

    def set_break(self, bint on):
        self.op_out(0, LCR, self.lcr | (LCR_BREAK if on else 0))
        self.run(1)

    def flush(self, bint rx, bint tx):
        """TCIFLUSH / TCOFLUSH: the UART's FIFOs cleared; TX: what was posted counts as done."""
        cdef uint32_t posted
        if tx and self.hdr != NULL:
            posted = chrshm_load(&self.hdr.tx_posted)
            try:
                self._check_posted(posted)
            except ContractViolation as exc:
                if self.on_violation is not None:
                    self.on_violation(str(exc))
                return
            self.tx_done = posted
            chrshm_store(&self.hdr.tx_done, posted)
            self.moved = True
        if tx:
            self.x_char = -1
        self.op_out(0, FCR, self.fcr | (FCR_CLEAR_RX if rx else 0) | (FCR_CLEAR_TX if tx else 0))
        self.op_in(1, LSR)
        self.run(2)
        self.lsr_seen(self.val(1))
        self._wake()

    def regs(self):
        """LCR, MCR, IER, MSR, LSR, DLL, DLM as the UART itself has them (what tests observe)."""
        self.op_in(0, LCR)
        self.op_in(1, MCR)
        self.op_in(2, IER)
        self.op_in(3, MSR)
        self.op_in(4, LSR)
        self.op_out(5, LCR, self.lcr | LCR_DLAB)
        self.op_in(6, DLL)
        self.op_in(7, DLM)
        self.op_out(8, LCR, self.lcr)
        self.run(9)
        out = {"lcr": self.val(0), "mcr": self.val(1), "ier": self.val(2), "msr": self.val(3),
               "lsr": self.val(4), "dll": self.val(6), "dlm": self.val(7)}
        self.msr_seen(self.val(3))
        self.lsr_seen(self.val(4))
        self._wake()
        return out

    def read_lsr(self):
        self.op_in(0, LSR)
        self.run(1)
        self.lsr_seen(self.val(0))
        return self.val(0)

    @property
    def drained(self):
        """The TX ring empty and the transmitter too (LSR.TEMT as last read)."""
        return self.tx_done == self.tx_posted and self.temt and self.x_char < 0

    def quiet(self):
        """No interrupts from a port nobody serves (the driver exits)."""
        self.op_out(0, IER, 0)
        self.run(1)

    # -- the front end --------------------------------------------------------------------------------
    def attach(self, int memfd, int doorbell_efd, int notify_efd, on_violation):
        """Map the front end's memory (checked by chrshm.check_fd; counters 0) and take its doorbells."""
        cdef void *p
        if self.shm != NULL:
            raise RuntimeError("a front end is attached already")
        p = mmap(NULL, CHRSHM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0)
        if p == MAP_FAILED:
            raise OSError(errno, "cannot map the front end's shared memory")
        self.shm = <uint8_t *>p
        self.hdr = <chrshm_header *>(self.shm + CHRSHM_HDR_OFF)
        self.rxr = self.shm + CHRSHM_RX_OFF
        self.txr = self.shm + CHRSHM_TX_OFF
        self.doorbell_efd = doorbell_efd
        self.notify_efd = notify_efd
        self.on_violation = on_violation
        self.rx_produced = self.rx_consumed = self.tx_done = self.tx_posted = 0
        self.tx_xoff = self.sent_xoff = False
        chrshm_store(&self.hdr.tx_done, 0)
        chrshm_store(&self.hdr.rx_produced, 0)
        chrshm_store(&self.hdr.driver_idle, 0)
        self.state_changed = True
        self._rx_gate()
        self._wake()

    def detach(self):
        if self.shm == NULL:
            return
        munmap(self.shm, CHRSHM_SIZE)
        self.shm = NULL
        self.hdr = NULL
        self.notify_efd = self.doorbell_efd = -1
        self.on_violation = None
        self.rx_produced = self.rx_consumed = self.tx_done = self.tx_posted = 0
        self._rx_gate()

    @property
    def attached(self):
        return self.shm != NULL

    # -- the wakeups ------------------------------------------------------------------------------------
    def on_irq(self):
        """The IRQ's eventfd is readable (a loop callback): service, then re-enable the line."""
        cdef uint32_t irq = self.irq_no
        cdef int err
        self.interrupts += 1
        sp_drain(self.irq_efd)
        try:
            self._serve()
        finally:
            # Every cause handled (or the pass limit): an edge from here on is a new one.  The
            # line first, the front end after: the UART's next bytes can raise the interrupt
            # while the front end (and its application) take these.
            err = sp_ioctl(self.ep_fd, RSDRV_IOC_IRQ_REENABLE, &irq)
            if err:
                raise OSError(err, "re-enabling IRQ %d failed" % irq)
        self._notify()
        self._again()

    def on_doorbell(self):
        self.doorbells += 1
        sp_drain(self.doorbell_efd)
        self._wake()

    def poll(self):
        """The safety net for an edge lost while the line was masked (a timer calls it)."""
        self.polls += 1
        self._wake()

    def service(self):
        """One wakeup's work; a front end that broke the rules is reported to on_violation."""
        self._wake()

    cdef int _wake(self) except -1:
        self._serve()
        self._notify()
        self._again()
        return 0

    cdef void _again(self):
        """A service that ended on its budget with work left comes back through our own doorbell
        (the loop serves the others first; an edge-triggered IRQ held high would not)."""
        if self.more and self.doorbell_efd >= 0:
            self.more = False
            self.budget_ends += 1
            sp_notify(self.doorbell_efd)

    cdef int _serve(self) except -1:
        try:
            self._service()
        except ContractViolation as exc:
            self.notify_due = False
            cb = self.on_violation
            if cb is None:
                raise
            cb(str(exc))
        return 0

    def set_loop(self, loop):
        """The driver's loop: a stream of received bytes rings the front end once per
        NOTIFY_DELAY rather than once per FIFO's worth (its timer calls back into C)."""
        self.loop = loop

    def _deferred_notify(self):
        self.timer = None
        if self.deferred:
            self.deferred = False
            self.deferrals = 0
            self.notify_due = True
            self._notify()

    cdef void _notify(self):
        """Ring the front end once for what the service moved (if it sleeps, or the port's state
        changed: modem-line waiters sleep on purpose).  While the line streams (the FIFO
        reached its trigger level) and the front end has little to do, the ring waits a moment
        for the next FIFO's worth: each ring wakes the front end and its application, which
        costs far more than the bytes."""
        if not self.notify_due:
            return
        self.notify_due = False
        if self.hdr == NULL:
            return
        if (self.rx_bulk and not self.notify_state and self.loop is not None
                and self.deferrals < DEFER_MAX and <uint32_t>(self.rx_produced - self.rx_consumed) < DEFER_BYTES):
            self.deferrals += 1
            self.deferred = True
            if self.timer is None:
                self.timer = self.loop.call_later(NOTIFY_DELAY, self._deferred_notify)
            return
        self.deferred = False
        self.deferrals = 0
        chrshm_barrier()
        if self.notify_state or chrshm_load(&self.hdr.frontend_idle) != 0:
            sp_notify(self.notify_efd)
            self.notifies += 1
        self.notify_state = False

    # -- the work -------------------------------------------------------------------------------------------
    cdef int _check_posted(self, uint32_t posted) except -1:
        if <uint32_t>(posted - self.tx_done) > CHRSHM_TX_SIZE:
            raise ContractViolation("tx_posted %d is %d bytes ahead of tx_done %d; the TX ring holds %d"
                                    % (posted, <uint32_t>(posted - self.tx_done), self.tx_done, CHRSHM_TX_SIZE))
        if <uint32_t>(posted - self.tx_done) < <uint32_t>(self.tx_posted - self.tx_done):
            raise ContractViolation("tx_posted went back from %d to %d" % (self.tx_posted, posted))
        self.tx_posted = posted
        return 0

    cdef int _check_consumed(self, uint32_t consumed) except -1:
        if <uint32_t>(consumed - self.rx_consumed) > <uint32_t>(self.rx_produced - self.rx_consumed):
            raise ContractViolation("rx_consumed moved from %d to %d: backwards or past rx_produced %d"
                                    % (self.rx_consumed, consumed, self.rx_produced))
        self.rx_consumed = consumed
        return 0

    cdef inline uint32_t rx_room(self):
        return CHRSHM_RX_SIZE - <uint32_t>(self.rx_produced - self.rx_consumed)

    cdef void _ier_for_rx(self):
        """IER and MCR as the RX gate and the transmitter want them (no port access)."""
        self.ier = (IER_ETBEI if self.etbei else 0) | IER_ELSI | IER_EDSSI | (0 if self.rx_stopped else IER_ERBFI)
        self.mcr = self.mcr_wanted
        if self.rx_stopped and self.rtscts:
            self.mcr &= ~MCR_RTS

    cdef int _rx_gate(self) except -1:
        """Stop reading the UART while there is no room (or nobody attached); start again once there is."""
        cdef bint stop
        if self.shm == NULL:
            stop = True
        elif self.rx_stopped:
            stop = self.rx_room() < RX_RESUME_ROOM
        else:
            stop = self.rx_room() == 0
        if stop != self.rx_stopped:
            self.rx_stopped = stop
            if stop:
                self.rx_stops += 1
            self._ier_for_rx()
            if self.configured:
                self.op_out(0, IER, self.ier)
                self.op_out(1, MCR, self.mcr)
                self.run(2)
        if self.ixoff and self.shm != NULL:
            if not self.sent_xoff and <uint32_t>(self.rx_produced - self.rx_consumed) >= IXOFF_HIGH:
                self.sent_xoff = True
                self.x_char = self.vstop
            elif self.sent_xoff and <uint32_t>(self.rx_produced - self.rx_consumed) <= IXOFF_LOW:
                self.sent_xoff = False
                self.x_char = self.vstart
        return 0

    cdef int _service(self) except -1:
        cdef int passes = 0
        cdef uint8_t iir, lsr, msr
        cdef uint32_t known, idle
        cdef bint busy
        self.services += 1
        self.st_valid = False
        self.rx_budget = RX_BUDGET
        self.tx_budget = TX_BUDGET
        self.more = False
        self.rx_bulk = False
        if self.hdr != NULL:
            chrshm_store(&self.hdr.driver_idle, IDLE_AWAKE)
        while passes < PASSES_MAX:
            passes += 1
            if self.hdr != NULL:
                self._check_posted(chrshm_load(&self.hdr.tx_posted))
                self._check_consumed(chrshm_load(&self.hdr.rx_consumed))
            self._rx_gate()
            if self.st_valid and (self.st_iir & 0x0F) != 0x00 and (self.st_iir & 0x0F) != 0x06:
                # The burst just done ended with LSR and IIR, and no modem-status or line-status
                # cause is pending: they say what this pass needs (one ioctl saved per wakeup).
                iir, lsr = self.st_iir, self.st_lsr
            else:
                self.op_in(0, IIR)
                self.op_in(1, LSR)
                self.op_in(2, MSR)
                self.run(3)
                iir, lsr, msr = self.val(0), self.val(1), self.val(2)
                self.lsr_seen(lsr)
                self.msr_seen(msr)
            self.st_valid = False
            busy = False
            if lsr & LSR_DR and not self.rx_stopped:
                if self.rx_budget:
                    known = RX_TRIGGER if self.fifo and (iir & IIR_ID_MASK) == IIR_RX_DATA else 1
                    if known == RX_TRIGGER:
                        self.rx_bulk = True
                    self._drain(known)
                    busy = True
                else:
                    self.more = True
            if lsr & LSR_THRE and (self.x_char >= 0 or (self.tx_posted != self.tx_done and not self.tx_blocked())):
                if self.tx_budget:
                    self._fill()
                    busy = True
                else:
                    self.more = True
            if busy:
                continue
            if self.hdr == NULL:
                break
            # Going to sleep: say so, then look once more (chrshm.h's doorbell rule).
            self._publish()
            idle = IDLE_RX_TOO if (self.rx_stopped or self.sent_xoff) else IDLE_TX
            chrshm_store(&self.hdr.driver_idle, idle)
            chrshm_barrier()
            if chrshm_load(&self.hdr.tx_posted) != self.tx_posted \
                    or (idle == IDLE_RX_TOO and chrshm_load(&self.hdr.rx_consumed) != self.rx_consumed):
                chrshm_store(&self.hdr.driver_idle, IDLE_AWAKE)
                continue
            break
        if passes >= PASSES_MAX:
            self.more = True
        self._tx_interrupt()
        self._publish()
        if self.hdr != NULL and self.more:
            # Cut short with work left (the device or the interrupt takes it up): the front
            # end must still ring for what it posts next.
            chrshm_store(&self.hdr.driver_idle, IDLE_RX_TOO if (self.rx_stopped or self.sent_xoff) else IDLE_TX)
        if self.moved or self.state_changed:
            if self.hdr != NULL:
                if self.state_changed:
                    self.state_seq += 1
                    chrshm_store(&self.hdr.state_seq, self.state_seq)
                    self.notify_state = True
                self.notify_due = True
            self.moved = self.state_changed = False
        return 0

    cdef int _tx_interrupt(self) except -1:
        """THR-empty interrupts only while bytes wait for THR: QEMU transmits at once, so the
        burst empties the ring and no interrupt follows each one; on hardware with THR full
        the interrupt brings the driver back (enabling it with THR empty raises it at once)."""
        cdef bint want = self.configured and (self.x_char >= 0 or (
            self.hdr != NULL and self.tx_posted != self.tx_done and not self.tx_blocked()))
        if want != self.etbei:
            self.etbei = want
            self._ier_for_rx()
            self.op_out(0, IER, self.ier)
            self.run(1)
        return 0

    cdef void _publish(self):
        if self.hdr == NULL:
            return
        chrshm_store(&self.hdr.rx_produced, self.rx_produced)
        chrshm_store(&self.hdr.tx_done, self.tx_done)
        chrshm_store(&self.hdr.msr, self.msr)
        chrshm_store(&self.hdr.mcr, self.mcr)
        chrshm_store(&self.hdr.lsr_temt, 1 if (self.temt and self.tx_done == self.tx_posted) else 0)
        memcpy(<void *>&self.hdr.icount, &self.ic, sizeof(chrshm_icount))

    cdef int _drain(self, uint32_t known) except -1:
        """Read the RX FIFO, `known` bytes of which are certainly there, into the ring.

        RBR is read only for bytes known to be present: a batch cannot stop
        early, and reading RBR after LSR said "empty" would swallow a byte
        that arrived in between.  Each batch ends with LSR and IIR, which say
        how many the next may take: a trigger's worth, one, or none.
        """
        cdef uint32_t n, i, room
        cdef uint8_t lsr, iir, b
        cdef int k
        n = known if self.fifo else 1
        while n:
            room = self.rx_room()
            if room > self.rx_budget:
                room = self.rx_budget
            if room == 0:
                break
            if n > room:
                n = room
            self.rx_budget -= n
            k = 0
            for i in range(n):
                self.op_in(k, LSR)
                self.op_in(k + 1, RBR)
                k += 2
            self.op_in(k, LSR)
            self.op_in(k + 1, IIR)
            self.run(k + 2)
            for i in range(n):
                self.lsr_seen(self.val(2 * i))
                b = self.val(2 * i + 1)
                self.ic.rx += 1
                if self.ixon and (b == self.vstop or b == self.vstart):
                    if b == self.vstop:
                        self.tx_xoff = True
                        self.xoff_in += 1
                    else:
                        self.tx_xoff = False
                        self.xon_in += 1
                    continue
                self.rxr[self.rx_produced & (CHRSHM_RX_SIZE - 1)] = b
                self.rx_produced += 1
            self.moved = True
            lsr, iir = self.val(k), self.val(k + 1)
            self.lsr_seen(lsr)
            self.st_lsr, self.st_iir, self.st_valid = lsr, iir, True
            if self.fifo and (iir & IIR_ID_MASK) == IIR_RX_DATA:
                n = RX_TRIGGER
            else:
                n = 1 if lsr & LSR_DR else 0
        chrshm_barrier()
        chrshm_store(&self.hdr.rx_produced, self.rx_produced)
        self._rx_gate()
        return 0

    cdef int _fill(self) except -1:
        """A FIFO's worth per THRE; LSR read back in the same burst, and on while THRE is set again."""
        cdef uint32_t sent = 0, pending, chunk, i
        cdef int k
        cdef uint8_t lsr
        cdef uint32_t per = FIFO_SIZE if self.fifo else 1
        while sent < TX_PER_PASS and self.tx_budget:
            k = 0
            if self.x_char >= 0:
                self.op_out(k, THR, <uint8_t>self.x_char)
                self.x_char = -1
                self.ic.tx += 1
                k += 1
            chunk = 0
            if self.hdr != NULL and not self.tx_blocked():
                pending = self.tx_posted - self.tx_done
                chunk = per - k
                if chunk > pending:
                    chunk = pending
                if chunk > self.tx_budget:
                    chunk = self.tx_budget
                for i in range(chunk):
                    self.op_out(k, THR, self.txr[(self.tx_done + i) & (CHRSHM_TX_SIZE - 1)])
                    k += 1
            if k == 0:
                break
            self.op_in(k, LSR)
            self.op_in(k + 1, IIR)
            self.run(k + 2)
            self.tx_done += chunk
            self.ic.tx += chunk
            self.tx_budget -= chunk
            sent += chunk
            self.moved = True
            lsr = self.val(k)
            self.lsr_seen(lsr)
            self.st_lsr, self.st_iir, self.st_valid = lsr, self.val(k + 1), True
            if not lsr & LSR_THRE:
                break
        return 0

    # -- what the Python side reports ---------------------------------------------------------------
    def icount(self):
        ic = self.ic
        return {"cts": ic.cts, "dsr": ic.dsr, "rng": ic.rng, "dcd": ic.dcd, "rx": ic.rx, "tx": ic.tx,
                "frame": ic.frame, "overrun": ic.overrun, "parity": ic.parity, "brk": ic.brk,
                "buf_overrun": ic.buf_overrun}

    def counters(self):
        return {"interrupts": self.interrupts, "doorbells": self.doorbells, "notifies": self.notifies,
                "services": self.services, "polls": self.polls, "rx_stops": self.rx_stops,
                "budget_ends": self.budget_ends,
                "xoff_received": self.xoff_in, "xon_received": self.xon_in,
                "tx_stopped_xoff": self.tx_xoff, "sent_xoff": self.sent_xoff, "rx_stopped": self.rx_stopped}

    def position(self):
        return {"tx_done": self.tx_done, "tx_posted": self.tx_posted, "rx_produced": self.rx_produced,
                "rx_consumed": self.rx_consumed, "state_seq": self.state_seq}
