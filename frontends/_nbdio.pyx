# cython: language_level=3, boundscheck=False, wraparound=False
"""The block front end's data path (frontends/blk.py, docs/block.md): NBD
requests from the kernel's socket to the disk driver's rings and back, in C.

One service() per wake-up (the NBD socket readable or writable, the
driver's doorbell, a tick) reads every request the socket holds, receives
write data straight into the shared memory's data area, fills submission
entries, rings the driver once, reaps completions and sends the replies
(read data straight from the data area, many replies per sendmsg).  Python
is called back only for the rare: a driver that broke blkshm.h's rules, the
socket closing, a protocol error from the kernel.

Every request is kept (its data area region with it) until its reply is
sent.  A driver that goes away leaves its unfinished requests to the next
attach, which gets a fresh memfd with the live regions copied over; they
are submitted again in their original order (a FLUSH in its place).  A
request outstanding at more than retry_limit driver deaths fails with EIO.
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, int32_t, uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy, memset, strerror
from libc.errno cimport errno, EAGAIN, EINTR, EIO, EINVAL
from libdrv.blkshm cimport *

cdef extern from "<sys/types.h>" nogil:
    ctypedef long ssize_t
    ctypedef long off_t

cdef extern from "<unistd.h>" nogil:
    ssize_t read(int fd, void *buf, size_t n)
    ssize_t write(int fd, const void *buf, size_t n)
    int close(int fd)

cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void *iov_base
        size_t iov_len

cdef extern from "<sys/socket.h>" nogil:
    struct msghdr:
        void *msg_name
        int msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags
    ssize_t recv(int fd, void *buf, size_t n, int flags)
    ssize_t sendmsg(int fd, const msghdr *msg, int flags)
    int MSG_DONTWAIT, MSG_NOSIGNAL

cdef extern from "<sys/epoll.h>" nogil:
    ctypedef union epoll_data_t:
        int fd
        uint64_t u64
    struct epoll_event:
        uint32_t events
        epoll_data_t data
    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event *event)
    int EPOLL_CTL_ADD, EPOLL_CTL_MOD, EPOLLIN, EPOLLOUT, EPOLL_CLOEXEC

cdef extern from "<sys/mman.h>" nogil:
    void *mmap(void *addr, size_t length, int prot, int flags, int fd, off_t offset)
    int munmap(void *addr, size_t length)
    int PROT_READ, PROT_WRITE, MAP_SHARED
    void *MAP_FAILED

cdef extern from "<errno.h>":
    int EOPNOTSUPP

cdef extern from *:
    """
    #include <endian.h>
    static inline uint32_t nbdio_be32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return be32toh(v); }
    static inline uint64_t nbdio_be64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return be64toh(v); }
    static inline void nbdio_put_be32(uint8_t *p, uint32_t v) { v = htobe32(v); memcpy(p, &v, 4); }
    #define NBDIO_UNITS (BLKSHM_DATA_SIZE / 4096u)
    """
    enum: NBDIO_UNITS
    uint32_t nbdio_be32(const uint8_t *p) nogil
    uint64_t nbdio_be64(const uint8_t *p) nogil
    void nbdio_put_be32(uint8_t *p, uint32_t v) nogil

cdef extern from "<stdio.h>" nogil:
    int snprintf(char *buf, size_t n, const char *fmt, ...)

# The NBD transmission protocol (simple replies)
cdef enum:
    NBD_REQUEST_MAGIC = 0x25609513
    NBD_REPLY_MAGIC = 0x67446698
    NBD_CMD_READ = 0
    NBD_CMD_WRITE = 1
    NBD_CMD_DISC = 2
    NBD_CMD_FLUSH = 3
    NBD_CMD_TRIM = 4
    NBD_CMD_FLAG_FUA = 1          # in the upper 16 bits of the type word
    REQ_HDR = 28
    REPLY_HDR = 16

cdef enum:
    MAX_REQS = 512                # the kernel keeps at most 128 requests outstanding per queue
    ORDER_CAP = 4096              # arrival-order entries, finished ones included until the oldest finishes
    UNIT = 4096
    INBUF = 65536
    MAX_IOV = 64

# request states
cdef enum:
    R_FREE = 0
    R_RECV = 1       # a WRITE whose data is still arriving
    R_QUEUED = 2     # to submit (or submitted, pieces outstanding)
    R_DONE = 3       # in the reply queue

# what service() leaves for Python
cdef enum:
    RARE_NONE = 0
    RARE_FAULT = 1    # the driver broke a rule
    RARE_EOF = 2      # the kernel closed the socket
    RARE_PROTO = 3    # the kernel sent something that is not NBD
    RARE_DISC = 4     # the kernel asked us to disconnect
    RARE_SOCK = 5     # a socket error

# flags of a request while a driver goes away
cdef enum:
    F_AGAIN = 1       # it had pieces submitted: all of it goes again
    F_DEATH = 2       # the dead driver had taken one of them: counted once

cdef struct req_t:
    uint8_t handle[8]
    uint64_t offset
    uint64_t seq
    uint32_t length
    uint32_t unit          # first unit of its data region
    uint32_t units         # 0: none
    uint32_t issued        # bytes (blocks for TRIM) submitted so far at this attach
    uint32_t total         # what issued must reach
    uint32_t pieces_out
    uint32_t recv_have
    uint32_t deaths
    uint32_t sent          # reply bytes sent
    int32_t status
    uint16_t cmd
    uint16_t nbd_flags
    uint8_t state
    uint8_t resubmitted
    uint8_t reply[16]

cdef struct piece_t:
    int32_t req            # -1: free
    uint32_t sqpos         # sq_posted when it was submitted
    uint32_t tag           # slot | a submission count above it: a stale completion of a reused slot
                           # names another tag


cdef class DataPath:
    cdef int sock_fd, ep_fd
    cdef uint32_t ep_mask
    cdef int bell_fd, wake_fd
    cdef uint8_t *base
    cdef blkshm_header *hdr
    cdef blkshm_req *sq
    cdef blkshm_cpl *cq
    cdef uint8_t *data
    cdef uint64_t size
    cdef uint32_t block_size, discard_max, retry_limit
    cdef req_t *reqs
    cdef uint8_t *used            # per data unit
    cdef uint32_t *order          # request indices in arrival order (ring)
    cdef uint64_t *order_seq
    cdef uint32_t order_head, order_tail
    cdef uint32_t *replyq
    cdef uint32_t reply_head, reply_tail
    cdef piece_t pieces[BLKSHM_SLOTS]
    cdef uint32_t outstanding
    cdef uint32_t sq_posted, cq_consumed
    cdef uint64_t next_seq
    cdef uint32_t tag_seq
    cdef int recv_req             # the WRITE receiving its data, or -1
    cdef uint8_t inbuf[INBUF]
    cdef uint32_t in_have, in_pos
    cdef bint blocked_space, out_blocked, closed
    cdef public bint attached
    cdef object rare
    cdef char fault[256]
    cdef uint64_t c_requests, c_reads, c_writes, c_flushes, c_trims, c_bytes_read, c_bytes_written
    cdef uint64_t c_failed, c_resubmitted, c_invalid, c_bells, c_retry_failed, c_pieces

    def __cinit__(self, int sock_fd, int memfd, uint64_t size, uint32_t block_size,
                  uint32_t discard_max_blocks, uint32_t retry_limit):
        cdef epoll_event ev
        cdef uint32_t i
        self.sock_fd = sock_fd
        self.size = size
        self.block_size = block_size
        self.discard_max = discard_max_blocks if discard_max_blocks else 1
        self.retry_limit = retry_limit
        self.bell_fd = self.wake_fd = -1
        self.recv_req = -1
        self.reqs = <req_t *>calloc(MAX_REQS, sizeof(req_t))
        self.used = <uint8_t *>calloc(NBDIO_UNITS, 1)
        self.order = <uint32_t *>calloc(ORDER_CAP, sizeof(uint32_t))
        self.order_seq = <uint64_t *>calloc(ORDER_CAP, sizeof(uint64_t))
        self.replyq = <uint32_t *>calloc(MAX_REQS, sizeof(uint32_t))
        if not (self.reqs and self.used and self.order and self.order_seq and self.replyq):
            raise MemoryError()
        for i in range(BLKSHM_SLOTS):
            self.pieces[i].req = -1
        self.ep_fd = epoll_create1(EPOLL_CLOEXEC)
        if self.ep_fd < 0:
            raise OSError(errno, "epoll_create1: %s" % strerror(errno).decode())
        ev.events = EPOLLIN
        ev.data.u64 = 0
        self.ep_mask = EPOLLIN
        if epoll_ctl(self.ep_fd, EPOLL_CTL_ADD, sock_fd, &ev) < 0:
            raise OSError(errno, "epoll_ctl: %s" % strerror(errno).decode())
        self._map(memfd)

    def __dealloc__(self):
        if self.base != NULL:
            munmap(self.base, BLKSHM_SIZE)
        if self.ep_fd >= 0:
            close(self.ep_fd)
        free(self.reqs)
        free(self.used)
        free(self.order)
        free(self.order_seq)
        free(self.replyq)

    cdef _map(self, int memfd):
        cdef void *p = mmap(NULL, BLKSHM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0)
        if p == MAP_FAILED:
            raise OSError(errno, "cannot map the shared memory: %s" % strerror(errno).decode())
        self.base = <uint8_t *>p
        self.hdr = <blkshm_header *>(self.base + BLKSHM_HDR_OFF)
        self.sq = <blkshm_req *>(self.base + BLKSHM_SQ_OFF)
        self.cq = <blkshm_cpl *>(self.base + BLKSHM_CQ_OFF)
        self.data = self.base + BLKSHM_DATA_OFF
        self.hdr.frontend_idle = 1  # we never promise to look again: always ring us

    # -- Python's side ---------------------------------------------------------------
    @property
    def epoll_fd(self):
        """Readable when the NBD socket needs us: the loop watches this, not the socket."""
        return self.ep_fd

    def on_rare(self, handler):
        """handler(what, detail): "fault" (refuse the driver), "eof", "protocol", "disc", "socket"."""
        self.rare = handler

    def remap(self, int memfd):
        """A fresh memfd for the next attach: every live data region is copied over, at the same offsets."""
        cdef uint8_t *old = self.base
        cdef uint8_t *old_data = self.data
        cdef uint32_t u = 0, start
        if self.attached:
            raise RuntimeError("remap while attached")
        self._map(memfd)
        with nogil:
            while u < NBDIO_UNITS:
                if not self.used[u]:
                    u += 1
                    continue
                start = u
                while u < NBDIO_UNITS and self.used[u]:
                    u += 1
                memcpy(self.data + start * UNIT, old_data + start * UNIT, (u - start) * UNIT)
        munmap(old, BLKSHM_SIZE)

    def attach(self, int bell_fd, int wake_fd):
        """The driver has accepted this memory: its rings start at 0; everything unfinished is submitted again."""
        self.sq_posted = self.cq_consumed = 0
        self.bell_fd, self.wake_fd = bell_fd, wake_fd
        self.attached = True

    def detach(self, bint died):
        """The driver went (died: it crashed or was killed; else we refused it).  Its pieces go
        back to their requests, which go again whole at the next attach; a request the dead
        driver had taken counts a death, and one over retry_limit deaths fails with EIO.
        Returns the number of requests to submit again."""
        cdef uint32_t i, taken, again = 0
        cdef req_t *r
        cdef bint sq_ok
        if not self.attached:
            return 0
        taken = blkshm_load(&self.hdr.sq_taken)
        sq_ok = self.sq_posted - taken <= self.outstanding     # read once, checked: else all count as taken
        for i in range(BLKSHM_SLOTS):
            if self.pieces[i].req < 0:
                continue
            r = &self.reqs[self.pieces[i].req]
            r.resubmitted |= F_AGAIN
            if died and not (r.resubmitted & F_DEATH) and (not sq_ok or <int32_t>(self.pieces[i].sqpos - taken) < 0):
                r.resubmitted |= F_DEATH
                r.deaths += 1
            self.pieces[i].req = -1
            r.pieces_out = 0
            r.issued = 0
            r.status = 0
        self.outstanding = 0
        for i in range(MAX_REQS):
            r = &self.reqs[i]
            if r.state != R_QUEUED or not r.resubmitted:
                continue
            r.resubmitted = 0
            if r.deaths > self.retry_limit:
                r.status = -EIO
                self.c_retry_failed += 1
                self._finish(i)
            else:
                again += 1
        self.c_resubmitted += again
        self.attached = False
        self.bell_fd = self.wake_fd = -1
        return again

    def kick(self):
        """Ring the driver if it holds requests (a tick's insurance against a lost doorbell)."""
        if self.attached and self.outstanding:
            self._ring()

    @property
    def pending(self):
        """Requests received and not yet answered."""
        cdef uint32_t i, n = 0
        for i in range(MAX_REQS):
            if self.reqs[i].state != R_FREE:
                n += 1
        return n

    def counters(self):
        return {"requests": self.c_requests, "reads": self.c_reads, "writes": self.c_writes,
                "flushes": self.c_flushes, "trims": self.c_trims, "bytes_read": self.c_bytes_read,
                "bytes_written": self.c_bytes_written, "failed": self.c_failed,
                "resubmitted": self.c_resubmitted, "retry_failed": self.c_retry_failed,
                "invalid_from_driver": self.c_invalid, "bells": self.c_bells, "pieces": self.c_pieces,
                "pending": self.pending, "in_flight": self.outstanding, "states": self.states(),
                "waiting_for_room": bool(self.blocked_space), "receiving": self.recv_req >= 0,
                "replies_blocked": bool(self.out_blocked), "attached": bool(self.attached)}

    def states(self):
        """How many requests are in each state (receiving, queued, replying): where a stall is."""
        cdef uint32_t i
        out = {"receiving": 0, "queued": 0, "queued_unissued": 0, "replying": 0}
        for i in range(MAX_REQS):
            st = self.reqs[i].state
            if st == R_RECV:
                out["receiving"] += 1
            elif st == R_QUEUED:
                out["queued"] += 1
                if self.reqs[i].issued < self.reqs[i].total:
                    out["queued_unissued"] += 1
            elif st == R_DONE:
                out["replying"] += 1
        return out

    def service(self):
        """One wake-up, all in C: our doorbell emptied, completions reaped, every request the socket
        holds taken, pieces submitted (the driver rung once), replies sent."""
        cdef uint64_t value
        cdef int what = RARE_NONE
        cdef int err = 0
        with nogil:
            if self.wake_fd >= 0:
                read(self.wake_fd, &value, 8)
            if self.attached:
                what = self._reap()
            if what == RARE_NONE and not self.closed:
                what = self._take_requests(&err)
            if self.attached and (what == RARE_NONE or what == RARE_DISC):
                self._submit()
            if not self.closed:
                if self._send_replies(&err) < 0 and what == RARE_NONE:
                    what = RARE_SOCK
                if what == RARE_NONE and self.blocked_space:
                    # replies sent free room: take what waited for it now, not at the next tick
                    what = self._take_requests(&err)
                    if self.attached and what == RARE_NONE:
                        self._submit()
                self._watch()
        if what == RARE_NONE:
            return
        if what == RARE_FAULT:
            self.c_invalid += 1
            self.rare("fault", self.fault.decode())
        elif what == RARE_EOF:
            self.closed = True
            self.rare("eof", "the kernel closed the NBD socket")
        elif what == RARE_PROTO:
            self.closed = True
            self.rare("protocol", self.fault.decode())
        elif what == RARE_DISC:
            self.rare("disc", "the kernel asked to disconnect (NBD_CMD_DISC)")
        else:
            self.closed = True
            self.rare("socket", OSError(err, "the NBD socket: %s" % strerror(err).decode()))

    # -- the data area -----------------------------------------------------------------
    cdef int _alloc(self, uint32_t n) noexcept nogil:
        """First fit of n contiguous units; -1 if none."""
        cdef uint32_t u = 0, run = 0
        while u < NBDIO_UNITS:
            if self.used[u]:
                run = 0
            else:
                run += 1
                if run == n:
                    memset(self.used + u + 1 - n, 1, n)
                    return u + 1 - n
            u += 1
        return -1

    # -- requests from the kernel --------------------------------------------------------
    cdef int _free_req(self) noexcept nogil:
        cdef int i
        for i in range(MAX_REQS):
            if self.reqs[i].state == R_FREE:
                return i
        return -1

    cdef int _take_requests(self, int *err) noexcept nogil:
        cdef ssize_t n
        cdef uint32_t need, have, magic, typ, length
        cdef uint64_t offset
        cdef int idx, unit
        cdef req_t *r
        cdef uint8_t *h
        self.blocked_space = False
        while True:
            if self.recv_req >= 0:
                r = &self.reqs[self.recv_req]
                need = r.length - r.recv_have
                have = self.in_have - self.in_pos
                if have:
                    if have > need:
                        have = need
                    if r.units:
                        memcpy(self.data + r.unit * UNIT + r.recv_have, self.inbuf + self.in_pos, have)
                    self.in_pos += have
                    r.recv_have += have
                    need -= have
                while need:
                    if r.units:
                        n = recv(self.sock_fd, self.data + r.unit * UNIT + r.recv_have, need, MSG_DONTWAIT)
                    else:  # a refused WRITE: its data is read and dropped
                        n = recv(self.sock_fd, self.inbuf, need if need < INBUF else INBUF, MSG_DONTWAIT)
                    if n < 0:
                        if errno == EAGAIN or errno == EINTR:
                            return RARE_NONE
                        err[0] = errno
                        return RARE_SOCK
                    if n == 0:
                        return RARE_EOF
                    r.recv_have += n
                    need -= n
                self._queued(self.recv_req)
                self.recv_req = -1
                continue
            if self.in_have - self.in_pos < REQ_HDR:
                if self.in_pos:
                    memcpy(self.inbuf, self.inbuf + self.in_pos, self.in_have - self.in_pos)
                    self.in_have -= self.in_pos
                    self.in_pos = 0
                n = recv(self.sock_fd, self.inbuf + self.in_have, INBUF - self.in_have, MSG_DONTWAIT)
                if n < 0:
                    if errno == EAGAIN or errno == EINTR:
                        return RARE_NONE
                    err[0] = errno
                    return RARE_SOCK
                if n == 0:
                    return RARE_EOF
                self.in_have += n
                continue
            h = self.inbuf + self.in_pos
            magic = nbdio_be32(h)
            if magic != NBD_REQUEST_MAGIC:
                snprintf(self.fault, 256, "a request with magic %#x, not %#x: not the NBD protocol",
                         magic, NBD_REQUEST_MAGIC)
                return RARE_PROTO
            typ = nbdio_be32(h + 4)
            offset = nbdio_be64(h + 16)
            length = nbdio_be32(h + 24)
            if (typ & 0xffff) == NBD_CMD_DISC:
                self.in_pos += REQ_HDR
                return RARE_DISC
            idx = self._free_req()
            if idx < 0 or self.order_tail - self.order_head >= ORDER_CAP:
                self.blocked_space = True
                return RARE_NONE          # every slot holds a request: the kernel waits
            r = &self.reqs[idx]
            unit = -1
            if ((typ & 0xffff) == NBD_CMD_READ or (typ & 0xffff) == NBD_CMD_WRITE) and self._valid(offset, length) \
                    and length <= BLKSHM_DATA_SIZE:
                unit = self._alloc((length + UNIT - 1) // UNIT)
                if unit < 0:
                    self.blocked_space = True
                    return RARE_NONE      # the data area is full: the request waits in the socket
            self.in_pos += REQ_HDR
            memset(r, 0, sizeof(req_t))
            memcpy(r.handle, h + 8, 8)
            r.cmd = typ & 0xffff
            r.nbd_flags = typ >> 16
            r.offset = offset
            r.length = length
            r.seq = self.next_seq
            self.next_seq += 1
            self.c_requests += 1
            if unit >= 0:
                r.unit = unit
                r.units = (length + UNIT - 1) // UNIT
            self.order[self.order_tail % ORDER_CAP] = idx
            self.order_seq[self.order_tail % ORDER_CAP] = r.seq
            self.order_tail += 1
            if r.cmd == NBD_CMD_WRITE:
                self.c_writes += 1
                r.state = R_RECV
                if unit < 0:
                    r.status = -EINVAL
                self.recv_req = idx
                continue
            r.state = R_QUEUED
            self._queued(idx)

    cdef bint _valid(self, uint64_t offset, uint32_t length) noexcept nogil:
        return (length > 0 and offset % self.block_size == 0 and length % self.block_size == 0
                and offset <= self.size and length <= self.size - offset)

    cdef void _queued(self, int idx) noexcept nogil:
        """Its header (and a WRITE's data) is in: what it has to submit, or its reply if it cannot go."""
        cdef req_t *r = &self.reqs[idx]
        r.state = R_QUEUED
        if r.cmd == NBD_CMD_READ:
            self.c_reads += 1
            r.total = r.length
            if not r.units:
                r.status = -EINVAL
        elif r.cmd == NBD_CMD_WRITE:
            r.total = r.length
        elif r.cmd == NBD_CMD_FLUSH:
            self.c_flushes += 1
            r.total = 1
        elif r.cmd == NBD_CMD_TRIM:
            self.c_trims += 1
            if not self._valid(r.offset, r.length):
                r.status = -EINVAL
            r.total = r.length // self.block_size
        else:
            r.status = -EINVAL
        if r.status:
            self._finish(idx)

    # -- the rings ---------------------------------------------------------------------------
    cdef void _submit(self) noexcept nogil:
        cdef uint32_t pos, idx, tag, chunk, slot
        cdef req_t *r
        cdef blkshm_req *e
        cdef bint moved = False
        # the oldest entries of requests that are finished or gone leave the ring
        while self.order_head != self.order_tail:
            idx = self.order[self.order_head % ORDER_CAP]
            r = &self.reqs[idx]
            if r.seq == self.order_seq[self.order_head % ORDER_CAP] and (r.state == R_RECV or (
                    r.state == R_QUEUED and (r.issued < r.total or r.pieces_out))):
                break
            self.order_head += 1
        pos = self.order_head
        tag = 0
        while pos != self.order_tail and self.outstanding < BLKSHM_SLOTS:
            idx = self.order[pos % ORDER_CAP]
            r = &self.reqs[idx]
            if r.seq != self.order_seq[pos % ORDER_CAP] or r.state == R_DONE or r.state == R_FREE:
                pos += 1
                continue
            if r.state == R_RECV:
                break                 # in order: nothing after it goes first
            if r.issued >= r.total or r.status:
                pos += 1
                continue
            while tag < BLKSHM_SLOTS and self.pieces[tag].req >= 0:
                tag += 1
            slot = self.sq_posted % BLKSHM_SLOTS
            e = &self.sq[slot]
            memset(e, 0, sizeof(blkshm_req))
            self.tag_seq += 1
            self.pieces[tag].tag = (self.tag_seq << 6) | tag
            e.tag = self.pieces[tag].tag
            if r.cmd == NBD_CMD_FLUSH:
                e.op = BLKSHM_OP_FLUSH
                chunk = 1
            elif r.cmd == NBD_CMD_TRIM:
                chunk = r.total - r.issued
                if chunk > self.discard_max:
                    chunk = self.discard_max
                e.op = BLKSHM_OP_DISCARD
                e.lba = r.offset // self.block_size + r.issued
                e.count = chunk
            else:
                chunk = r.total - r.issued
                if chunk > BLKSHM_IO_MAX:
                    chunk = BLKSHM_IO_MAX
                e.op = BLKSHM_OP_READ if r.cmd == NBD_CMD_READ else BLKSHM_OP_WRITE
                e.lba = (r.offset + r.issued) // self.block_size
                e.count = chunk // self.block_size
                e.data_off = r.unit * UNIT + r.issued
                if r.cmd == NBD_CMD_WRITE and (r.nbd_flags & NBD_CMD_FLAG_FUA):
                    e.flags = BLKSHM_F_FUA
            r.issued += chunk
            r.pieces_out += 1
            self.pieces[tag].req = idx
            self.pieces[tag].sqpos = self.sq_posted
            self.outstanding += 1
            self.sq_posted += 1
            self.c_pieces += 1
            moved = True
        if moved:
            blkshm_store(&self.hdr.sq_posted, self.sq_posted)
            self._ring()

    cdef void _ring(self) noexcept nogil:
        cdef uint64_t one = 1
        if self.bell_fd >= 0:
            blkshm_barrier()
            if blkshm_load(&self.hdr.driver_idle) != 0:
                write(self.bell_fd, &one, 8)   # EAGAIN only with 2^64-2 unread rings: it is awake
                self.c_bells += 1

    cdef int _reap(self) noexcept nogil:
        cdef uint32_t posted = blkshm_load(&self.hdr.cq_posted)
        cdef uint32_t n = posted - self.cq_consumed
        cdef uint32_t i, tag
        cdef int32_t status
        cdef blkshm_cpl c
        cdef req_t *r
        if n == 0:
            return RARE_NONE
        if n > self.outstanding:
            snprintf(self.fault, 256, "cq_posted moved from %u to %u with %u requests outstanding",
                     self.cq_consumed, posted, self.outstanding)
            return RARE_FAULT
        for i in range(n):
            memcpy(&c, &self.cq[(self.cq_consumed) % BLKSHM_SLOTS], sizeof(c))   # read once
            tag = c.tag
            status = c.status
            if self.pieces[tag & (BLKSHM_SLOTS - 1)].req < 0 or self.pieces[tag & (BLKSHM_SLOTS - 1)].tag != tag:
                snprintf(self.fault, 256, "a completion for tag %u, which is not outstanding (never sent, "
                         "or completed already)", tag)
                self._consumed()
                return RARE_FAULT
            if status != 0 and status != -EIO and status != -EINVAL and status != -EOPNOTSUPP:
                snprintf(self.fault, 256, "a completion with status %d, not 0, -EIO, -EINVAL or -EOPNOTSUPP",
                         status)
                self._consumed()
                return RARE_FAULT
            tag &= BLKSHM_SLOTS - 1
            r = &self.reqs[self.pieces[tag].req]
            self.pieces[tag].req = -1
            self.outstanding -= 1
            self.cq_consumed += 1
            r.pieces_out -= 1
            if status and not r.status:
                r.status = status
            if r.pieces_out == 0 and (r.issued >= r.total or r.status):
                self._finish(<int>(r - self.reqs))
        self._consumed()
        return RARE_NONE

    cdef void _consumed(self) noexcept nogil:
        blkshm_store(&self.hdr.cq_consumed, self.cq_consumed)
        self._ring()

    cdef void _finish(self, int idx) noexcept nogil:
        """Into the reply queue."""
        cdef req_t *r = &self.reqs[idx]
        r.state = R_DONE
        r.sent = 0
        nbdio_put_be32(r.reply, NBD_REPLY_MAGIC)
        nbdio_put_be32(r.reply + 4, <uint32_t>(-r.status))
        memcpy(r.reply + 8, r.handle, 8)
        if r.status:
            self.c_failed += 1
        elif r.cmd == NBD_CMD_READ:
            self.c_bytes_read += r.length
        elif r.cmd == NBD_CMD_WRITE:
            self.c_bytes_written += r.length
        self.replyq[self.reply_tail % MAX_REQS] = idx
        self.reply_tail += 1

    # -- replies -----------------------------------------------------------------------------
    cdef int _send_replies(self, int *err) noexcept nogil:
        cdef iovec iov[MAX_IOV]
        cdef msghdr msg
        cdef int niov
        cdef uint32_t q, total, off
        cdef ssize_t n
        cdef req_t *r
        self.out_blocked = False
        while self.reply_head != self.reply_tail:
            niov = 0
            q = self.reply_head
            while q != self.reply_tail and niov + 2 <= MAX_IOV:
                r = &self.reqs[self.replyq[q % MAX_REQS]]
                off = r.sent
                if off < REPLY_HDR:
                    iov[niov].iov_base = r.reply + off
                    iov[niov].iov_len = REPLY_HDR - off
                    niov += 1
                    off = REPLY_HDR
                if r.cmd == NBD_CMD_READ and r.status == 0:
                    iov[niov].iov_base = self.data + r.unit * UNIT + (off - REPLY_HDR)
                    iov[niov].iov_len = r.length - (off - REPLY_HDR)
                    niov += 1
                q += 1
            memset(&msg, 0, sizeof(msg))
            msg.msg_iov = iov
            msg.msg_iovlen = niov
            n = sendmsg(self.sock_fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL)
            if n < 0:
                if errno == EAGAIN or errno == EINTR:
                    self.out_blocked = True
                    return 0
                err[0] = errno
                return -1
            while n > 0:
                r = &self.reqs[self.replyq[self.reply_head % MAX_REQS]]
                total = REPLY_HDR + (r.length if (r.cmd == NBD_CMD_READ and r.status == 0) else 0)
                if <uint32_t>n < total - r.sent:
                    r.sent += n
                    n = 0
                    break
                n -= total - r.sent
                if r.units:
                    memset(self.used + r.unit, 0, r.units)
                r.state = R_FREE
                self.reply_head += 1
            if self.reply_head != q:
                self.out_blocked = True
                return 0              # a short send: the socket is full
        return 0

    cdef void _watch(self) noexcept nogil:
        """The loop wakes us for input unless we cannot take it (no room), for output while replies wait."""
        cdef epoll_event ev
        cdef uint32_t want = 0
        if not self.blocked_space and self._free_req_any():
            want |= EPOLLIN
        if self.out_blocked:
            want |= EPOLLOUT
        if want != self.ep_mask:
            ev.events = want
            ev.data.u64 = 0
            epoll_ctl(self.ep_fd, EPOLL_CTL_MOD, self.sock_fd, &ev)
            self.ep_mask = want

    cdef bint _free_req_any(self) noexcept nogil:
        return self._free_req() >= 0

