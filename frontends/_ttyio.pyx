# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The tty front end's data path (libdrv/chrshm.h): the pty master <-> the byte rings.

    pump = Pump(loop, on_rare)           # loop: the service's libdrv Loop (it watches fds itself)
    pump.set_master(fd)                  # the pty master (non-blocking, packet mode); -1: none
    pump.attach(memfd, driver_bell, our_bell)   # map; bytes held meanwhile go into the TX ring
    lost, rx_dropped = pump.detach()     # the driver is gone: what it had not sent is lost
    pump.service()                       # one wakeup's work (a timer calls it when the pty was full)
    pump.counters()

The loop calls on_master() when the pty master is readable and on_bell()
when the driver rang our eventfd; both are C all the way: the tty's termios
compared (a change is Python's business: on_rare("termios")), what
applications wrote read straight into the TX ring (readv: the packet-mode
byte apart, the ring's two pieces), what the driver received written
straight from the RX ring (writev), the driver rung once if it sleeps.
While no driver is attached, what applications write is held here (up to
HELD_MAX bytes) and goes into the next driver's TX ring at its attach.

Python is called (on_rare(what, detail)) only for: "termios" (the tty's
settings changed: before the data written after the change is taken),
"packet" (a flush of the pty: TIOCPKT_FLUSHREAD/FLUSHWRITE), "pty_full"
(the pty took less than the RX ring had: look again later) and
"violation" (the driver broke chrshm.h's rules: treat it as dead).

Everything the driver writes is read once into a local and checked against
our private copies: tx_done moves forward only and never past tx_posted;
rx_produced moves forward only and at most RX_SIZE ahead of rx_consumed.
"""

from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy, memcmp, memset
from libc.errno cimport errno, EAGAIN, EINTR, EIO
from libdrv.chrshm cimport *

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
    ssize_t readv(int fd, const iovec *iov, int iovcnt)
    ssize_t writev(int fd, const iovec *iov, int iovcnt)

cdef extern from "<sys/mman.h>" nogil:
    void *mmap(void *addr, size_t length, int prot, int flags, int fd, off_t offset)
    int munmap(void *addr, size_t length)
    int PROT_READ, PROT_WRITE, MAP_SHARED
    void *MAP_FAILED

cdef extern from "<termios.h>" nogil:
    struct termios:
        pass
    int tcgetattr(int fd, termios *t)

cdef extern from *:
    """
    #include <unistd.h>
    #include <stdint.h>
    static inline void ttyio_notify(int fd) {
        uint64_t one = 1;
        if (fd >= 0) (void)!write(fd, &one, sizeof one);   /* EAGAIN: the counter is full, news anyway */
    }
    static inline void ttyio_drain(int fd) {
        uint64_t count;
        if (fd >= 0) (void)!read(fd, &count, sizeof count);
    }
    """
    void ttyio_notify(int fd) nogil
    void ttyio_drain(int fd) nogil

DEF HELD_MAX = 64 * 1024             # what applications may write while no driver is attached
DEF TIOCPKT_DATA = 0
DEF TIOCPKT_FLUSHREAD = 1
DEF TIOCPKT_FLUSHWRITE = 2
# driver_idle (chrshm.h): 0 awake; 1 asleep, rings wanted for tx_posted; 2 for rx_consumed too
DEF DRIVER_IDLE_RX = 2

cdef enum:
    TX_RESUME = CHRSHM_TX_SIZE // 2  # free TX ring bytes before the pty is read again

HELD_LIMIT = HELD_MAX


cdef class Pump:
    cdef object loop, rare
    cdef int master
    cdef bint watching                # the loop watches the master
    cdef bint termios_valid
    cdef termios last_termios
    # the attached driver's memory (NULL when none)
    cdef uint8_t *shm
    cdef chrshm_header *hdr
    cdef uint8_t *rxr
    cdef uint8_t *txr
    cdef int driver_bell, our_bell
    cdef uint32_t tx_posted, tx_done, rx_consumed, rx_produced   # private, authoritative
    cdef bint pty_full
    # what applications wrote while no driver was attached
    cdef uint8_t *held
    cdef uint32_t held_len
    cdef char fault[200]
    cdef readonly uint64_t tx_accepted, tx_bytes, rx_bytes, bells_in, bells_out, packets, reads, writes

    def __cinit__(self, loop, on_rare):
        self.loop = loop
        self.rare = on_rare
        self.master = -1
        self.driver_bell = self.our_bell = -1
        self.held = <uint8_t *>malloc(HELD_MAX)
        if self.held == NULL:
            raise MemoryError()

    def __dealloc__(self):
        if self.shm != NULL:
            munmap(self.shm, CHRSHM_SIZE)
        free(self.held)

    # -- set-up ------------------------------------------------------------------------------
    def set_master(self, int fd):
        """Serve this pty master from now on (-1: none); the loop watches it while there is room."""
        if self.watching and self.master >= 0:
            self.loop.remove_reader(self.master)
        self.watching = False
        self.master = fd
        self.termios_valid = False
        self.pty_full = False
        if fd >= 0:
            self._termios_changed()      # the baseline
        self._watch()

    def attach(self, int memfd, int driver_bell, int our_bell):
        """Map a fresh chrshm memfd (counters 0: chrshm.create) whose attach the driver accepted."""
        cdef void *p
        cdef uint32_t n
        if self.shm != NULL:
            raise RuntimeError("a driver is attached already")
        p = mmap(NULL, CHRSHM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0)
        if p == MAP_FAILED:
            raise OSError(errno, "cannot map the shared memory")
        self.shm = <uint8_t *>p
        self.hdr = <chrshm_header *>(self.shm + CHRSHM_HDR_OFF)
        self.rxr = self.shm + CHRSHM_RX_OFF
        self.txr = self.shm + CHRSHM_TX_OFF
        self.driver_bell, self.our_bell = driver_bell, our_bell
        self.tx_posted = self.tx_done = self.rx_consumed = self.rx_produced = 0
        n = self.held_len          # <= HELD_MAX == what the empty ring takes
        if n > CHRSHM_TX_SIZE:
            n = CHRSHM_TX_SIZE
        memcpy(self.txr, self.held, n)
        self.held_len = 0
        self.tx_posted = n
        chrshm_store(&self.hdr.frontend_idle, 0)
        chrshm_store(&self.hdr.tx_posted, n)
        if n:
            ttyio_notify(self.driver_bell)
            self.bells_out += 1
        self._service()

    def detach(self):
        """The driver is gone.  Returns (lost, rx_dropped): bytes posted that it had not taken
        (never resent: some may be on the wire) and bytes it received that nobody read."""
        cdef uint32_t lost, dropped = 0, produced
        if self.shm == NULL:
            return 0, 0
        try:
            self._reap_tx()              # what it confirmed before dying still counts
        except ValueError:
            pass
        lost = self.tx_posted - self.tx_done
        produced = chrshm_load(&self.hdr.rx_produced)
        if <uint32_t>(produced - self.rx_consumed) <= CHRSHM_RX_SIZE:
            dropped = produced - self.rx_consumed
        munmap(self.shm, CHRSHM_SIZE)
        self.shm = NULL
        self.hdr = NULL
        self.driver_bell = self.our_bell = -1
        self.pty_full = False
        self._watch()
        return lost, dropped

    @property
    def attached(self):
        return self.shm != NULL

    @property
    def held(self):
        return self.held_len

    @property
    def unconfirmed(self):
        return self.tx_posted - self.tx_done if self.shm != NULL else 0

    def drop_held(self):
        """TCOFLUSH while no driver is attached: what was held is discarded; returns how much."""
        cdef uint32_t n = self.held_len
        self.held_len = 0
        self._watch()
        return n

    def take_pty(self):
        """Read what applications wrote into the ring (or held) until the pty is empty or
        there is no room: before a hang-up, which would discard it.  Returns bytes taken."""
        cdef uint64_t before = self.tx_accepted
        while self._read_master(False) > 0:
            pass
        return self.tx_accepted - before

    # -- the wakeups (loop callbacks) -------------------------------------------------------
    def on_master(self):
        if self._termios_changed():
            # Settings first: the bytes written after stty go out with the new ones.
            self.rare("termios", None)
        while self._read_master(True) > 0:
            pass
        self._service()

    def on_bell(self):
        self.bells_in += 1
        ttyio_drain(self.our_bell)
        self._service()

    def service(self):
        self._service()

    # -- the work ----------------------------------------------------------------------------
    cdef bint _termios_changed(self):
        cdef termios t
        memset(&t, 0, sizeof(termios))   # padding too: compared whole
        if self.master < 0 or tcgetattr(self.master, &t) != 0:
            return False
        if self.termios_valid and memcmp(&t, &self.last_termios, sizeof(termios)) == 0:
            return False
        memcpy(&self.last_termios, &t, sizeof(termios))
        self.termios_valid = True
        return True

    cdef uint32_t _tx_free(self):
        if self.shm == NULL:
            return HELD_MAX - self.held_len
        return CHRSHM_TX_SIZE - (self.tx_posted - self.tx_done)

    cdef void _watch(self):
        """Read the pty only while there is room for what it holds (back-pressure on writers)."""
        cdef bint want
        if self.master < 0:
            return
        if self.watching:
            want = self._tx_free() > 0
        else:
            want = self._tx_free() >= (TX_RESUME if self.shm != NULL else 1)
        if want == self.watching:
            return
        if want:
            self.loop.add_reader(self.master, self.on_master)
        else:
            self.loop.remove_reader(self.master)
        self.watching = want

    cdef long _read_master(self, bint ring) except -2:
        """One read of the pty master into the TX ring (or held); bytes taken, 0 when none."""
        cdef iovec iov[3]
        cdef uint8_t pkt
        cdef uint32_t free_ = self._tx_free(), pos, first
        cdef ssize_t r
        cdef int n_iov
        if self.master < 0 or free_ == 0:
            return 0
        iov[0].iov_base = &pkt
        iov[0].iov_len = 1
        if self.shm != NULL:
            pos = self.tx_posted & (CHRSHM_TX_SIZE - 1)
            first = CHRSHM_TX_SIZE - pos
            if first > free_:
                first = free_
            iov[1].iov_base = self.txr + pos
            iov[1].iov_len = first
            iov[2].iov_base = self.txr
            iov[2].iov_len = free_ - first
            n_iov = 3 if free_ > first else 2
        else:
            iov[1].iov_base = self.held + self.held_len
            iov[1].iov_len = free_
            n_iov = 2
        r = readv(self.master, iov, n_iov)
        if r < 0:
            if errno == EAGAIN or errno == EINTR or errno == EIO:   # EIO: no slave open now
                return 0
            raise OSError(errno, "reading the pty master failed")
        if r == 0:
            return 0
        self.reads += 1
        if pkt != TIOCPKT_DATA:
            self.packets += 1
            if pkt & (TIOCPKT_FLUSHREAD | TIOCPKT_FLUSHWRITE):
                self.rare("packet", pkt)
            return 1                     # look again: data may follow
        r -= 1
        self.tx_accepted += r
        if self.shm != NULL:
            self.tx_posted += <uint32_t>r
            chrshm_store(&self.hdr.tx_posted, self.tx_posted)
            if ring:
                chrshm_barrier()
                if chrshm_load(&self.hdr.driver_idle) != 0:
                    ttyio_notify(self.driver_bell)
                    self.bells_out += 1
        else:
            self.held_len += <uint32_t>r
        self._watch()
        return r

    cdef int _reap_tx(self) except -1:
        cdef uint32_t done = chrshm_load(&self.hdr.tx_done)
        cdef uint32_t advance = done - self.tx_done
        if advance > self.tx_posted - self.tx_done:
            raise ValueError("tx_done moved from %d to %d: backwards or past tx_posted %d"
                             % (self.tx_done, done, self.tx_posted))
        self.tx_done = done
        self.tx_bytes += advance
        return advance != 0

    cdef int _rx_to_pty(self) except -1:
        """Write what the driver received to the pty; returns 1 if rx_consumed moved."""
        cdef uint32_t produced = chrshm_load(&self.hdr.rx_produced)
        cdef uint32_t avail = produced - self.rx_consumed, pos, first
        cdef iovec iov[2]
        cdef ssize_t r
        if avail > CHRSHM_RX_SIZE or <uint32_t>(produced - self.rx_produced) > CHRSHM_RX_SIZE \
                or avail < self.rx_produced - self.rx_consumed:
            raise ValueError("rx_produced moved from %d to %d with rx_consumed %d: backwards or more "
                             "than the ring holds" % (self.rx_produced, produced, self.rx_consumed))
        self.rx_produced = produced
        if avail == 0 or self.master < 0:
            self.pty_full = False
            return 0
        pos = self.rx_consumed & (CHRSHM_RX_SIZE - 1)
        first = CHRSHM_RX_SIZE - pos
        if first > avail:
            first = avail
        iov[0].iov_base = self.rxr + pos
        iov[0].iov_len = first
        iov[1].iov_base = self.rxr
        iov[1].iov_len = avail - first
        r = writev(self.master, iov, 2 if avail > first else 1)
        if r < 0:
            if errno != EAGAIN and errno != EINTR:
                raise OSError(errno, "writing the pty master failed")
            r = 0
        self.writes += 1
        self.pty_full = <uint32_t>r < avail
        if r == 0:
            return 0
        self.rx_consumed += <uint32_t>r
        self.rx_bytes += r
        chrshm_store(&self.hdr.rx_consumed, self.rx_consumed)
        return 1

    cdef int _service(self) except -1:
        cdef bint rx_moved, tx_moved, again
        cdef uint32_t idle
        if self.shm == NULL:
            self._watch()
            return 0
        chrshm_store(&self.hdr.frontend_idle, 0)
        try:
            while True:
                tx_moved = self._reap_tx()
                rx_moved = self._rx_to_pty()
                self._watch()
                if rx_moved:
                    chrshm_barrier()
                    idle = chrshm_load(&self.hdr.driver_idle)
                    if idle >= DRIVER_IDLE_RX:
                        ttyio_notify(self.driver_bell)
                        self.bells_out += 1
                # Going to sleep: say so, then look once more (chrshm.h's doorbell rule).
                chrshm_store(&self.hdr.frontend_idle, 1)
                chrshm_barrier()
                again = chrshm_load(&self.hdr.tx_done) != self.tx_done or \
                    (not self.pty_full and chrshm_load(&self.hdr.rx_produced) != self.rx_produced)
                if not again:
                    break
                chrshm_store(&self.hdr.frontend_idle, 0)
        except ValueError as exc:
            self.rare("violation", str(exc))
            return 0
        if self.pty_full:
            self.rare("pty_full", None)
        return 0

    def counters(self):
        return {"tx_accepted": self.tx_accepted, "tx_bytes": self.tx_bytes, "rx_bytes": self.rx_bytes,
                "bells_in": self.bells_in, "bells_out": self.bells_out, "packets": self.packets,
                "reads": self.reads, "writes": self.writes}
