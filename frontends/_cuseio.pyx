# cython: language_level=3, boundscheck=False, wraparound=False
"""The CUSE front end's data path (frontends/cuse.py, docs/serial.md): READ, WRITE and POLL
requests from /dev/cuse served in C against the serial driver's byte rings (libdrv/chrshm.h).

One service() per wake-up (/dev/cuse readable, the driver's doorbell, a tick) reads every
request the kernel holds.  READ takes bytes from the RX ring, WRITE puts them in the TX ring,
POLL answers from the rings' state; a request that must wait (a blocking READ with nothing
to read, a blocking WRITE with no room) is kept and completed here when the doorbell says
the rings moved.  Every other request (OPEN, RELEASE, IOCTL, FLUSH, FSYNC, INTERRUPT) goes to
Python as its raw bytes; Python answers with reply().  Python is also called for the rare:
the driver broke chrshm.h's rules, the port state changed while Python waits for it, the
kernel closed the connection.

Open files are Python's (it numbers them at OPEN); it tells us each one's state: live, or
dead (opened before the driver died: every request on it fails with EIO).
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, int32_t, uint64_t, int64_t
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy, memset, strerror
from libc.errno cimport errno, EAGAIN, EINTR, EIO, EBADF, ENOENT, ENODEV, ENOMEM
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC
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
    ssize_t writev(int fd, const iovec *iov, int iovcnt)

cdef extern from "<sys/mman.h>" nogil:
    void *mmap(void *addr, size_t length, int prot, int flags, int fd, off_t offset)
    int munmap(void *addr, size_t length)
    int PROT_READ, PROT_WRITE, MAP_SHARED
    void *MAP_FAILED

cdef extern from "<fcntl.h>" nogil:
    int O_NONBLOCK

cdef extern from "<poll.h>" nogil:
    int POLLIN, POLLOUT, POLLERR, POLLHUP, POLLRDNORM, POLLWRNORM

cdef extern from "<stdio.h>" nogil:
    int snprintf(char *buf, size_t n, const char *fmt, ...)

cdef extern from "<linux/fuse.h>" nogil:
    struct fuse_in_header:
        uint32_t len
        uint32_t opcode
        uint64_t unique
        uint64_t nodeid
        uint32_t uid, gid, pid
    struct fuse_out_header:
        uint32_t len
        int32_t error
        uint64_t unique
    struct fuse_read_in:
        uint64_t fh
        uint64_t offset
        uint32_t size
        uint32_t read_flags
        uint64_t lock_owner
        uint32_t flags
    struct fuse_write_in:
        uint64_t fh
        uint64_t offset
        uint32_t size
        uint32_t write_flags
        uint64_t lock_owner
        uint32_t flags
    struct fuse_write_out:
        uint32_t size
        uint32_t padding
    struct fuse_poll_in:
        uint64_t fh
        uint64_t kh
        uint32_t flags
        uint32_t events
    struct fuse_poll_out:
        uint32_t revents
        uint32_t padding
    struct fuse_notify_poll_wakeup_out:
        uint64_t kh
    enum:
        FUSE_READ
        FUSE_WRITE
        FUSE_POLL
        FUSE_NOTIFY_POLL
        FUSE_POLL_SCHEDULE_NOTIFY

cdef enum:
    MAX_FH = 4096          # open files at once (Python refuses OPEN beyond)
    MAX_PEND = 256         # reads, and writes, kept waiting at once (one blocked thread each)
    MAX_POLL = 1024        # poll handles waiting for a notification
    FH_FREE = 0
    FH_LIVE = 1
    FH_DEAD = 2

# what service() leaves for Python
cdef enum:
    RARE_NONE = 0
    RARE_FAULT = 1         # the driver broke chrshm.h's rules
    RARE_GONE = 2          # the kernel ended the connection (ENODEV)
    RARE_ERROR = 3         # /dev/cuse failed otherwise

cdef struct pend_t:
    uint64_t unique
    uint64_t fh
    uint32_t size          # READ: bytes asked for; WRITE: bytes in data
    uint32_t done          # WRITE: bytes already in the ring
    uint32_t start         # WRITE: bytes that were in the ring when it was kept (data[0] is the next)
    uint8_t *data          # WRITE: its bytes not in the ring when it was kept (malloc'd)
    double deadline        # READ with VTIME: when it completes with what there is (0: none)


cdef inline double now_s() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef class CuseIO:
    cdef int fd
    cdef uint8_t *buf
    cdef size_t bufsize
    cdef uint8_t fh_state[MAX_FH]
    # the shared memory of the current attach
    cdef uint8_t *base
    cdef chrshm_header *hdr
    cdef uint8_t *rx
    cdef uint8_t *tx
    cdef int bell_fd, wake_fd
    cdef public bint attached
    cdef uint32_t rx_consumed, rx_produced, tx_posted, tx_done, state_seq
    # waiting requests, oldest first
    cdef pend_t reads[MAX_PEND]
    cdef int n_reads
    cdef pend_t writes[MAX_PEND]
    cdef int n_writes
    cdef uint64_t poll_kh[MAX_POLL]
    cdef uint32_t poll_events[MAX_POLL]
    cdef int n_poll
    cdef uint8_t vmin, vtime
    cdef public bint want_state    # Python waits for a port state change (TIOCMIWAIT, drain)
    cdef bint state_changed
    cdef object slow, rare
    cdef char fault[256]
    cdef int last_errno
    cdef uint64_t one
    cdef uint64_t c_reads, c_writes, c_polls, c_rx_bytes, c_tx_bytes, c_eagain, c_eio, c_interrupted
    cdef uint64_t c_notifies, c_bells, c_slow, c_waited, c_refused

    def __cinit__(self, int fd, size_t max_write):
        self.fd = fd
        # a WRITE of max_write bytes with its headers in one read (the kernel refuses smaller buffers)
        self.bufsize = max_write + 4096
        self.buf = <uint8_t *>malloc(self.bufsize)
        if self.buf == NULL:
            raise MemoryError()
        memset(self.fh_state, 0, MAX_FH)
        self.bell_fd = self.wake_fd = -1
        self.vmin = 1
        self.one = 1

    def __dealloc__(self):
        cdef int i
        for i in range(self.n_writes):
            free(self.writes[i].data)
        if self.base != NULL:
            munmap(self.base, CHRSHM_SIZE)
        free(self.buf)

    # -- Python's side -------------------------------------------------------------------
    def handlers(self, slow, rare):
        """slow(request bytes): every request not served here; rare(what, detail): "fault", "state",
        "gone", "error"."""
        self.slow = slow
        self.rare = rare

    def set_fh(self, uint64_t fh, int state):
        """An open file's state: 0 closed, 1 live, 2 dead (its requests fail with EIO)."""
        if fh >= MAX_FH:
            raise ValueError("fh %d out of range" % fh)
        self.fh_state[fh] = state
        if state != FH_LIVE:
            self._fail_fh(fh, -EIO)

    def kill_all(self):
        """The driver died: every open file is dead, every call in flight fails with EIO, pollers wake."""
        cdef int i
        for i in range(MAX_FH):
            if self.fh_state[i] == FH_LIVE:
                self.fh_state[i] = FH_DEAD
        self._fail_where(-EIO, 0, True)
        self._notify_all()

    def set_read_mode(self, int vmin, int vtime):
        """termios VMIN/VTIME: a blocking READ waits for min(VMIN, size) bytes (1 when VMIN is 0), and
        with VTIME completes after VTIME tenths with what there is."""
        self.vmin = vmin
        self.vtime = vtime

    @property
    def max_fh(self):
        return MAX_FH

    def attach(self, int memfd, int bell_fd, int wake_fd):
        """The driver took this memory: its rings start at 0; what waited is served now."""
        cdef void *p
        if self.attached:
            raise RuntimeError("attach while attached")
        p = mmap(NULL, CHRSHM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0)
        if p == MAP_FAILED:
            raise OSError(errno, "cannot map the shared memory: %s" % strerror(errno).decode())
        self.base = <uint8_t *>p
        self.hdr = <chrshm_header *>(self.base + CHRSHM_HDR_OFF)
        self.rx = self.base + CHRSHM_RX_OFF
        self.tx = self.base + CHRSHM_TX_OFF
        self.rx_consumed = self.rx_produced = self.tx_posted = self.tx_done = 0
        self.state_seq = chrshm_load(&self.hdr.state_seq)
        self.hdr.frontend_idle = 1     # we never promise to look again: always ring us
        self.bell_fd, self.wake_fd = bell_fd, wake_fd
        self.attached = True
        self.service()

    def detach(self):
        """The driver went: returns the bytes it had not handed to the UART (lost, never resent)."""
        cdef uint32_t lost = 0
        if not self.attached:
            return 0
        lost = self.tx_posted - self.tx_done
        munmap(self.base, CHRSHM_SIZE)
        self.base = NULL
        self.hdr = NULL
        self.attached = False
        self.bell_fd = self.wake_fd = -1
        return lost

    def reply(self, uint64_t unique, int error, const uint8_t[:] payload=None):
        """Answer a request Python took (error: 0 or a negative errno)."""
        cdef iovec iov[2]
        cdef fuse_out_header h
        cdef int n = 1
        h.len = sizeof(fuse_out_header)
        h.error = error
        h.unique = unique
        iov[0].iov_base = &h
        iov[0].iov_len = sizeof(h)
        if payload is not None and payload.shape[0] and error == 0:
            iov[1].iov_base = <void *>&payload[0]
            iov[1].iov_len = payload.shape[0]
            h.len += payload.shape[0]
            n = 2
        with nogil:
            self._writev(iov, n)

    def interrupt(self, uint64_t unique):
        """FUSE_INTERRUPT: a waiting READ or WRITE of that id fails with EINTR; False if none waits."""
        cdef int i
        for i in range(self.n_reads):
            if self.reads[i].unique == unique:
                self._err(unique, -EINTR)
                self._drop_read(i)
                self.c_interrupted += 1
                return True
        for i in range(self.n_writes):
            if self.writes[i].unique == unique:
                if self.writes[i].done:
                    self._reply_write(unique, self.writes[i].done)   # what is in the ring counts
                else:
                    self._err(unique, -EINTR)
                self._drop_write(i)
                self.c_interrupted += 1
                return True
        return False

    def inq(self):
        """Bytes received and not yet read (FIONREAD)."""
        if not self.attached:
            return 0
        return self.rx_produced - self.rx_consumed

    def outq(self):
        """Bytes written and not yet handed to the UART, waiting writes included (TIOCOUTQ)."""
        cdef uint64_t n = 0
        cdef int i
        for i in range(self.n_writes):
            n += self.writes[i].size - self.writes[i].done
        if self.attached:
            n += self.tx_posted - self.tx_done
        return n

    def flush_input(self):
        """TCIFLUSH: what the ring holds is dropped."""
        if self.attached:
            self.rx_consumed = self.rx_produced
            chrshm_store(&self.hdr.rx_consumed, self.rx_consumed)
            self._ring()

    def port_state(self):
        """What the driver published: msr, mcr, lsr_temt, state_seq, icount (serial_icounter_struct order),
        the TX ring's fill; None while detached."""
        cdef chrshm_icount ic
        if not self.attached:
            return None
        chrshm_barrier()
        memcpy(&ic, <void *>&self.hdr.icount, sizeof(ic))
        return {"msr": self.hdr.msr, "mcr": self.hdr.mcr, "lsr_temt": self.hdr.lsr_temt,
                "state_seq": self.hdr.state_seq, "tx_pending": self.tx_posted - self.tx_done,
                "icount": (ic.cts, ic.dsr, ic.rng, ic.dcd, ic.rx, ic.tx, ic.frame, ic.overrun, ic.parity,
                           ic.brk, ic.buf_overrun)}

    def counters(self):
        return {"reads": self.c_reads, "writes": self.c_writes, "polls": self.c_polls,
                "rx_bytes": self.c_rx_bytes, "tx_bytes": self.c_tx_bytes, "eagain": self.c_eagain,
                "eio": self.c_eio, "interrupted": self.c_interrupted, "poll_notifies": self.c_notifies,
                "bells": self.c_bells, "slow": self.c_slow, "waited": self.c_waited, "refused": self.c_refused,
                "reads_waiting": self.n_reads, "writes_waiting": self.n_writes, "pollers": self.n_poll}

    def refresh(self):
        """Look at the rings now (after a request that moved them, e.g. a flush): waiting requests
        completed, pollers woken; nothing is read from /dev/cuse (safe inside a request's handling)."""
        cdef int what
        with nogil:
            what = self._progress()
        if what == RARE_FAULT:
            self.rare("fault", self.fault.decode())

    def kick(self):
        """Ring the driver if bytes wait in the TX ring (a tick's insurance against a lost doorbell)."""
        if self.attached and self.tx_posted != self.tx_done:
            self.hdr.frontend_idle = 1
            chrshm_barrier()
            write(self.bell_fd, &self.one, 8)
            self.c_bells += 1

    def notify_pollers(self):
        """Wake every poller (Python changed something poll reports)."""
        self._notify_all()

    def service(self):
        """One wake-up: our doorbell emptied, every request the kernel holds taken, waiting
        requests completed from the rings, the driver rung once, pollers woken."""
        cdef uint64_t value
        cdef int what = RARE_NONE
        cdef list slow = None
        cdef ssize_t n
        while True:
            with nogil:
                if self.wake_fd >= 0:
                    read(self.wake_fd, &value, 8)
                n = self._take(&what)
            if n <= 0:
                break
            # a request for Python: its bytes are copied, the buffer is reused
            self.c_slow += 1
            if slow is None:
                slow = []
            slow.append(self.buf[:n])
        if what == RARE_NONE:
            with nogil:
                what = self._progress()
        if slow is not None:
            for req in slow:
                self.slow(req)
        if what == RARE_FAULT:
            self.rare("fault", self.fault.decode())
        elif what == RARE_GONE:
            self.rare("gone", "the kernel ended the CUSE connection")
        elif what == RARE_ERROR:
            self.rare("error", OSError(self.last_errno, "/dev/cuse: %s" % strerror(self.last_errno).decode()))
        if self.state_changed and self.want_state:
            self.state_changed = False
            self.rare("state", None)

    # -- requests from the kernel -------------------------------------------------------------
    cdef ssize_t _take(self, int *what) noexcept nogil:
        """Serve requests until one is for Python (its length returned), none is left (0), or an error (-1)."""
        cdef ssize_t n
        cdef fuse_in_header *h
        while True:
            n = read(self.fd, self.buf, self.bufsize)
            if n < 0:
                if errno == EINTR or errno == ENOENT:
                    continue        # ENOENT: a request the kernel took back (its caller was killed)
                if errno == EAGAIN:
                    return 0
                if errno == ENODEV:
                    what[0] = RARE_GONE
                else:
                    self.last_errno = errno
                    what[0] = RARE_ERROR
                return -1
            if <size_t>n < sizeof(fuse_in_header):
                continue
            h = <fuse_in_header *>self.buf
            if h.opcode == FUSE_READ and <size_t>n >= sizeof(fuse_in_header) + sizeof(fuse_read_in):
                self._read(h.unique, <fuse_read_in *>(self.buf + sizeof(fuse_in_header)))
            elif h.opcode == FUSE_WRITE and <size_t>n >= sizeof(fuse_in_header) + sizeof(fuse_write_in):
                self._write(h.unique, <fuse_write_in *>(self.buf + sizeof(fuse_in_header)),
                            self.buf + sizeof(fuse_in_header) + sizeof(fuse_write_in),
                            n - sizeof(fuse_in_header) - sizeof(fuse_write_in))
            elif h.opcode == FUSE_POLL and <size_t>n >= sizeof(fuse_in_header) + sizeof(fuse_poll_in):
                self._poll(h.unique, <fuse_poll_in *>(self.buf + sizeof(fuse_in_header)))
            else:
                return n

    cdef int _fh_error(self, uint64_t fh) noexcept nogil:
        if fh >= MAX_FH or self.fh_state[fh] == FH_FREE:
            return -EBADF
        if self.fh_state[fh] == FH_DEAD:
            self.c_eio += 1
            return -EIO
        return 0

    cdef uint32_t _read_want(self, uint32_t size) noexcept nogil:
        if self.vmin == 0:
            return 1
        return self.vmin if self.vmin < size else size

    cdef void _read(self, uint64_t unique, fuse_read_in *r) noexcept nogil:
        cdef int err = self._fh_error(r.fh)
        cdef uint32_t avail
        cdef pend_t *p
        self.c_reads += 1
        if err:
            self._err(unique, err)
            return
        if r.size == 0:
            self._reply_rx(unique, 0)
            return
        avail = self.rx_produced - self.rx_consumed if self.attached else 0
        if self.n_reads == 0 and avail and (avail >= self._read_want(r.size) or (r.flags & O_NONBLOCK)):
            self._reply_rx(unique, avail if avail < r.size else r.size)
            return
        if r.flags & O_NONBLOCK:
            self.c_eagain += 1
            self._err(unique, -EAGAIN)
            return
        if self.vmin == 0 and self.vtime == 0:
            self._reply_rx(unique, 0)       # a "polling read": what there is, maybe nothing
            return
        if self.n_reads >= MAX_PEND:
            self.c_refused += 1
            self._err(unique, -ENOMEM)
            return
        p = &self.reads[self.n_reads]
        self.n_reads += 1
        p.unique = unique
        p.fh = r.fh
        p.size = r.size
        p.deadline = now_s() + self.vtime * 0.1 if self.vtime else 0
        self.c_waited += 1

    cdef void _write(self, uint64_t unique, fuse_write_in *w, uint8_t *data, size_t have) noexcept nogil:
        cdef int err = self._fh_error(w.fh)
        cdef uint32_t size = w.size, n = 0
        cdef pend_t *p
        self.c_writes += 1
        if err:
            self._err(unique, err)
            return
        if size > have:
            self._err(unique, -EIO)         # the kernel promised more than it sent
            return
        if size == 0:
            self._reply_write(unique, 0)
            return
        if self.attached and self.n_writes == 0:
            n = self._put(data, size)
            if n == size or (n and (w.flags & O_NONBLOCK)):
                self._reply_write(unique, n)
                self._ring()
                return
        if w.flags & O_NONBLOCK:
            self.c_eagain += 1
            self._err(unique, -EAGAIN)
            return
        if self.n_writes >= MAX_PEND:
            self.c_refused += 1
            self._err(unique, -ENOMEM)
            return
        p = &self.writes[self.n_writes]
        p.data = <uint8_t *>malloc(size - n)
        if p.data == NULL:
            self._err(unique, -ENOMEM)
            return
        memcpy(p.data, data + n, size - n)
        self.n_writes += 1
        p.unique = unique
        p.fh = w.fh
        p.size = size
        p.done = p.start = n
        self.c_waited += 1
        if n:
            self._ring()

    cdef uint32_t _revents(self, uint64_t fh) noexcept nogil:
        cdef uint32_t ev = 0
        if fh >= MAX_FH or self.fh_state[fh] != FH_LIVE:
            return POLLERR | POLLHUP | POLLIN | POLLOUT | POLLRDNORM | POLLWRNORM
        if self.attached:
            if self.rx_produced != self.rx_consumed:
                ev |= POLLIN | POLLRDNORM
            if self.n_writes == 0 and self.tx_posted - self.tx_done < CHRSHM_TX_SIZE:
                ev |= POLLOUT | POLLWRNORM
        return ev

    cdef void _poll(self, uint64_t unique, fuse_poll_in *pi) noexcept nogil:
        cdef fuse_poll_out out
        cdef iovec iov[2]
        cdef fuse_out_header h
        cdef int i
        self.c_polls += 1
        out.revents = self._revents(pi.fh)
        out.padding = 0
        if (pi.flags & FUSE_POLL_SCHEDULE_NOTIFY) and not (out.revents & pi.events):
            for i in range(self.n_poll):
                if self.poll_kh[i] == pi.kh:
                    self.poll_events[i] = pi.events
                    break
            else:
                if self.n_poll < MAX_POLL:
                    self.poll_kh[self.n_poll] = pi.kh
                    self.poll_events[self.n_poll] = pi.events
                    self.n_poll += 1
                else:
                    out.revents |= POLLERR   # no room to remember it: it must not sleep forever
        h.len = sizeof(h) + sizeof(out)
        h.error = 0
        h.unique = unique
        iov[0].iov_base = &h
        iov[0].iov_len = sizeof(h)
        iov[1].iov_base = &out
        iov[1].iov_len = sizeof(out)
        self._writev(iov, 2)

    # -- the rings --------------------------------------------------------------------------------
    cdef int _progress(self) noexcept nogil:
        """Look at what the driver moved; complete waiting requests; ring it; wake pollers."""
        cdef uint32_t produced, done, seq, avail, want, n
        cdef double t = 0
        cdef int i
        cdef pend_t *p
        cdef bint moved = False
        if self.attached:
            produced = chrshm_load(&self.hdr.rx_produced)
            done = chrshm_load(&self.hdr.tx_done)
            if <int32_t>(produced - self.rx_produced) < 0 or produced - self.rx_consumed > CHRSHM_RX_SIZE:
                snprintf(self.fault, 256, "rx_produced moved from %u to %u with %u consumed (ring of %u)",
                         self.rx_produced, produced, self.rx_consumed, <uint32_t>CHRSHM_RX_SIZE)
                return RARE_FAULT
            if <int32_t>(done - self.tx_done) < 0 or <int32_t>(self.tx_posted - done) < 0:
                snprintf(self.fault, 256, "tx_done moved from %u to %u with %u posted",
                         self.tx_done, done, self.tx_posted)
                return RARE_FAULT
            if produced != self.rx_produced or done != self.tx_done:
                moved = True
            self.rx_produced = produced
            self.tx_done = done
            seq = chrshm_load(&self.hdr.state_seq)
            if seq != self.state_seq:
                self.state_seq = seq
                self.state_changed = True
            # waiting writes, in order, as room allows
            while self.n_writes:
                p = &self.writes[0]
                n = self._put(p.data + (p.done - p.start), p.size - p.done)
                p.done += n
                if n:
                    self._ring()
                if p.done < p.size:
                    break
                self._reply_write(p.unique, p.size)
                self._drop_write(0)
        # waiting reads, in order, as data allows (or their VTIME ran out)
        i = 0
        while i < self.n_reads:
            p = &self.reads[i]
            avail = self.rx_produced - self.rx_consumed if self.attached else 0
            want = self._read_want(p.size)
            if avail < want and p.deadline != 0:
                if t == 0:
                    t = now_s()
                if t >= p.deadline and (avail or self.vmin == 0):
                    want = avail
            if avail < want or (want == 0 and p.deadline == 0):
                if avail == 0:
                    break               # the oldest gets the next bytes; others wait behind it
                i += 1
                continue
            self._reply_rx(p.unique, avail if avail < p.size else p.size)
            self._drop_read(i)
        if self.n_poll:
            self._notify_ready()
        return RARE_NONE

    cdef uint32_t _put(self, const uint8_t *data, uint32_t size) noexcept nogil:
        """Copy what fits of data into the TX ring; returns how much (tx_posted published)."""
        cdef uint32_t room = CHRSHM_TX_SIZE - (self.tx_posted - self.tx_done)
        cdef uint32_t n = size if size < room else room
        cdef uint32_t at = self.tx_posted & (CHRSHM_TX_SIZE - 1)
        cdef uint32_t first = CHRSHM_TX_SIZE - at
        if n == 0:
            return 0
        if first > n:
            first = n
        memcpy(self.tx + at, data, first)
        if n > first:
            memcpy(self.tx, data + first, n - first)
        self.tx_posted += n
        chrshm_store(&self.hdr.tx_posted, self.tx_posted)
        self.c_tx_bytes += n
        return n

    cdef void _ring(self) noexcept nogil:
        cdef uint64_t one = 1
        if self.bell_fd >= 0:
            chrshm_barrier()
            if chrshm_load(&self.hdr.driver_idle) != 0:
                write(self.bell_fd, &one, 8)
                self.c_bells += 1

    cdef void _reply_rx(self, uint64_t unique, uint32_t n) noexcept nogil:
        """Answer a READ with the next n bytes of the RX ring (n may be 0)."""
        cdef iovec iov[3]
        cdef fuse_out_header h
        cdef int cnt = 1
        cdef uint32_t at, first
        h.len = sizeof(h) + n
        h.error = 0
        h.unique = unique
        iov[0].iov_base = &h
        iov[0].iov_len = sizeof(h)
        if n:
            at = self.rx_consumed & (CHRSHM_RX_SIZE - 1)
            first = CHRSHM_RX_SIZE - at
            if first > n:
                first = n
            iov[1].iov_base = self.rx + at
            iov[1].iov_len = first
            cnt = 2
            if n > first:
                iov[2].iov_base = self.rx
                iov[2].iov_len = n - first
                cnt = 3
        if self._writev(iov, cnt) == 0 and n:
            # consumed only if the caller got them (else it was interrupted: they stay for the next)
            self.rx_consumed += n
            self.c_rx_bytes += n
            chrshm_store(&self.hdr.rx_consumed, self.rx_consumed)
            self._ring()

    cdef void _reply_write(self, uint64_t unique, uint32_t n) noexcept nogil:
        cdef iovec iov[2]
        cdef fuse_out_header h
        cdef fuse_write_out out
        h.len = sizeof(h) + sizeof(out)
        h.error = 0
        h.unique = unique
        out.size = n
        out.padding = 0
        iov[0].iov_base = &h
        iov[0].iov_len = sizeof(h)
        iov[1].iov_base = &out
        iov[1].iov_len = sizeof(out)
        self._writev(iov, 2)

    cdef void _err(self, uint64_t unique, int error) noexcept nogil:
        cdef iovec iov[1]
        cdef fuse_out_header h
        h.len = sizeof(h)
        h.error = error
        h.unique = unique
        iov[0].iov_base = &h
        iov[0].iov_len = sizeof(h)
        self._writev(iov, 1)

    cdef int _writev(self, iovec *iov, int cnt) noexcept nogil:
        """Send one reply; -1 if the kernel no longer wants it (its caller is gone: ENOENT)."""
        cdef ssize_t n
        while True:
            n = writev(self.fd, iov, cnt)
            if n >= 0:
                return 0
            if errno != EINTR:
                return -1

    cdef void _drop_read(self, int i) noexcept nogil:
        cdef int j
        for j in range(i, self.n_reads - 1):
            self.reads[j] = self.reads[j + 1]
        self.n_reads -= 1

    cdef void _drop_write(self, int i) noexcept nogil:
        cdef int j
        free(self.writes[i].data)
        for j in range(i, self.n_writes - 1):
            self.writes[j] = self.writes[j + 1]
        self.n_writes -= 1

    cdef void _fail_fh(self, uint64_t fh, int error) noexcept nogil:
        cdef int i = 0
        while i < self.n_reads:
            if self.reads[i].fh == fh:
                self._err(self.reads[i].unique, error)
                self._drop_read(i)
            else:
                i += 1
        i = 0
        while i < self.n_writes:
            if self.writes[i].fh == fh:
                self._err(self.writes[i].unique, error)
                self._drop_write(i)
            else:
                i += 1

    cdef void _fail_where(self, int error, uint64_t unused, bint dead_only) noexcept nogil:
        cdef int i = 0
        while i < self.n_reads:
            if not dead_only or self.reads[i].fh >= MAX_FH or self.fh_state[self.reads[i].fh] != FH_LIVE:
                self._err(self.reads[i].unique, error)
                self.c_eio += 1
                self._drop_read(i)
            else:
                i += 1
        i = 0
        while i < self.n_writes:
            if not dead_only or self.writes[i].fh >= MAX_FH or self.fh_state[self.writes[i].fh] != FH_LIVE:
                self._err(self.writes[i].unique, error)
                self.c_eio += 1
                self._drop_write(i)
            else:
                i += 1

    cdef void _notify_one(self, uint64_t kh) noexcept nogil:
        cdef iovec iov[2]
        cdef fuse_out_header h
        cdef fuse_notify_poll_wakeup_out out
        h.len = sizeof(h) + sizeof(out)
        h.error = FUSE_NOTIFY_POLL
        h.unique = 0
        out.kh = kh
        iov[0].iov_base = &h
        iov[0].iov_len = sizeof(h)
        iov[1].iov_base = &out
        iov[1].iov_len = sizeof(out)
        self._writev(iov, 2)
        self.c_notifies += 1

    cdef void _notify_all(self) noexcept nogil:
        cdef int i
        for i in range(self.n_poll):
            self._notify_one(self.poll_kh[i])
        self.n_poll = 0

    cdef void _notify_ready(self) noexcept nogil:
        """Wake the pollers whose events are now ready (any live file sees the same rings)."""
        cdef uint32_t ev = POLLERR | POLLHUP
        cdef int i = 0
        if self.attached:
            if self.rx_produced != self.rx_consumed:
                ev |= POLLIN | POLLRDNORM
            if self.n_writes == 0 and self.tx_posted - self.tx_done < CHRSHM_TX_SIZE:
                ev |= POLLOUT | POLLWRNORM
        while i < self.n_poll:
            if self.poll_events[i] & ev & ~(POLLERR | POLLHUP):
                self._notify_one(self.poll_kh[i])
                self.n_poll -= 1
                self.poll_kh[i] = self.poll_kh[self.n_poll]
                self.poll_events[i] = self.poll_events[self.n_poll]
            else:
                i += 1
