# cython: boundscheck=False, wraparound=False
"""The event loop's machinery in C: epoll, the timer heap, the dispatch.

A wakeup is one epoll_wait, one dict lookup per ready fd and a direct call
of its callback; no bytecode runs in between, so a callback that is itself
C (a cdef class's method, a builtin) keeps the whole path in C.  libdrv.loop
holds the documentation and is the module to import.
"""

from cpython.exc cimport PyErr_CheckSignals, PyErr_SetFromErrno
from libc.errno cimport errno, EINTR, ENOENT, EEXIST
from libc.math cimport ceil
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC
from posix.unistd cimport close as c_close


cdef extern from "<sys/epoll.h>" nogil:
    ctypedef union epoll_data_t:
        int fd
        unsigned long long u64
    struct epoll_event:
        unsigned int events
        epoll_data_t data
    enum:
        EPOLLIN
        EPOLL_CTL_ADD
        EPOLL_CTL_MOD
        EPOLL_CTL_DEL
        EPOLL_CLOEXEC
    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event *event)
    int epoll_wait(int epfd, epoll_event *events, int maxevents, int timeout)


# Events taken per epoll_wait: more than any service has fds, and the rest
# (level-triggered) come with the next call anyway.
cdef enum:
    MAX_EVENTS = 64


cdef inline double monotonic_now() noexcept nogil:
    # CLOCK_MONOTONIC is what time.monotonic() reads, so times from either agree.
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef class Timer:
    """Handle returned by call_at/call_later; cancel() is idempotent."""

    cdef public double when
    cdef public object callback
    cdef public tuple args
    cdef public bint cancelled
    cdef unsigned long long seq   # ties broken in the order timers were made

    def __cinit__(self, double when, callback, tuple args):
        self.when = when
        self.callback = callback
        self.args = args
        self.cancelled = False

    def cancel(self):
        self.cancelled = True

    def __repr__(self):
        return "<Timer when=%.6f %r%s>" % (self.when, self.callback,
                                         " cancelled" if self.cancelled else "")


cdef class _Reader:
    cdef object fileobj
    cdef object callback
    cdef tuple args
    cdef unsigned long long serial  # when it was added: later than a wait means not ready in it


cdef inline bint earlier(Timer a, Timer b) noexcept:
    return a.when < b.when or (a.when == b.when and a.seq < b.seq)


cdef int fileobj_to_fd(fileobj) except? -2:
    """The fd behind fileobj, or -1 if it has none any more (closed)."""
    cdef long fd
    if isinstance(fileobj, int):
        fd = fileobj
    else:
        try:
            fd = int(fileobj.fileno())
        except (AttributeError, TypeError, ValueError):
            raise ValueError("Invalid file object: %r" % (fileobj,)) from None
    return fd if fd >= 0 else -1


cdef class Loop:
    cdef int epfd
    cdef dict readers            # fd -> _Reader
    cdef list timers             # a binary heap of Timer, earliest first
    cdef unsigned long long timer_seq
    cdef unsigned long long reader_serial
    cdef bint running

    def __cinit__(self):
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.epfd < 0:
            PyErr_SetFromErrno(OSError)
        self.readers = {}
        self.timers = []

    def __dealloc__(self):
        if self.epfd >= 0:
            c_close(self.epfd)

    # -- file descriptors -------------------------------------------------
    def add_reader(self, fileobj, callback, *args):
        """Call callback(*args) whenever fileobj is readable (replaces any previous)."""
        cdef int fd = fileobj_to_fd(fileobj)
        cdef epoll_event ev
        cdef _Reader old
        if fd < 0:
            raise ValueError("Invalid file descriptor: %r" % (fileobj,))
        self.check_open()
        old = self.readers.get(fd)
        ev.events = EPOLLIN
        ev.data.u64 = 0
        ev.data.fd = fd
        # The same object again: only the callback changes, the kernel's entry stays.
        # Another object on that fd: the old one was closed and the number reused,
        # so its kernel entry (if the file is gone) is too.
        if old is None or old.fileobj is not fileobj:
            if old is not None:
                epoll_ctl(self.epfd, EPOLL_CTL_DEL, fd, NULL)
            if epoll_ctl(self.epfd, EPOLL_CTL_ADD, fd, &ev) < 0:
                if errno != EEXIST or epoll_ctl(self.epfd, EPOLL_CTL_MOD, fd, &ev) < 0:
                    PyErr_SetFromErrno(OSError)
        cdef _Reader reader = _Reader.__new__(_Reader)
        reader.fileobj = fileobj
        reader.callback = callback
        reader.args = args
        self.reader_serial += 1
        reader.serial = self.reader_serial
        self.readers[fd] = reader

    def remove_reader(self, fileobj):
        """Stop watching fileobj; a no-op if it is not watched or already closed."""
        cdef int fd
        try:
            fd = fileobj_to_fd(fileobj)
        except ValueError:
            fd = -1
        if fd < 0:
            # Closed before it was removed: find it by the object itself.
            for known, reader in self.readers.items():
                if (<_Reader>reader).fileobj is fileobj:
                    fd = known
                    break
            else:
                return
        if self.readers.pop(fd, None) is None:
            return
        if self.epfd >= 0:
            # A closed fd gives EBADF (the kernel dropped it already): nothing to undo.
            epoll_ctl(self.epfd, EPOLL_CTL_DEL, fd, NULL)

    # -- timers -------------------------------------------------------------
    def call_at(self, double when, callback, *args):
        cdef Timer t = Timer.__new__(Timer, when, callback, args)
        self.timer_seq += 1
        t.seq = self.timer_seq
        self.heap_push(t)
        return t

    def call_later(self, double delay, callback, *args):
        cdef Timer t = Timer.__new__(Timer, monotonic_now() + delay, callback, args)
        self.timer_seq += 1
        t.seq = self.timer_seq
        self.heap_push(t)
        return t

    cdef heap_push(self, Timer t):
        cdef list heap = self.timers
        cdef Py_ssize_t i = len(heap), parent
        heap.append(t)
        while i > 0:
            parent = (i - 1) >> 1
            if not earlier(t, <Timer>heap[parent]):
                break
            heap[i] = heap[parent]
            i = parent
        heap[i] = t

    cdef Timer heap_pop(self):
        cdef list heap = self.timers
        cdef Timer top = <Timer>heap[0]
        cdef Timer last = <Timer>heap.pop()
        cdef Py_ssize_t n = len(heap), i = 0, child
        if n == 0:
            return top
        while True:
            child = 2 * i + 1
            if child >= n:
                break
            if child + 1 < n and earlier(<Timer>heap[child + 1], <Timer>heap[child]):
                child += 1
            if not earlier(<Timer>heap[child], last):
                break
            heap[i] = heap[child]
            i = child
        heap[i] = last
        return top

    # -- running -------------------------------------------------------------
    def stop(self):
        self.running = False

    cdef check_open(self):
        if self.epfd < 0:
            raise ValueError("the loop is closed")

    def run_once(self, max_wait=None):
        """Wait for at most max_wait seconds (None: until something happens)."""
        cdef double wait = -1.0 if max_wait is None else max(0.0, <double>max_wait)
        self.wait_and_dispatch(wait)

    cdef wait_and_dispatch(self, double max_wait):
        # On the stack, not in the loop: a callback may run a nested run_once.
        cdef epoll_event events[MAX_EVENTS]
        cdef double deadline = -1.0, now, wait
        cdef int n, i, timeout_ms
        cdef unsigned long long wait_serial
        cdef Timer t
        cdef _Reader reader
        cdef list heap = self.timers
        self.check_open()
        while heap and (<Timer>heap[0]).cancelled:
            self.heap_pop()
        now = monotonic_now()
        if max_wait >= 0:
            deadline = now + max_wait
        if heap and (deadline < 0 or (<Timer>heap[0]).when < deadline):
            deadline = (<Timer>heap[0]).when
        while True:
            if deadline < 0:
                timeout_ms = -1
            else:
                # Rounded up: waking before the timer is due would only spin.
                wait = deadline - now
                timeout_ms = 0 if wait <= 0 else <int>ceil(wait * 1e3)
            wait_serial = self.reader_serial
            with nogil:
                n = epoll_wait(self.epfd, events, MAX_EVENTS, timeout_ms)
            if n >= 0:
                break
            if errno != EINTR:
                PyErr_SetFromErrno(OSError)
            # A signal: its Python handler runs now (and may raise); then wait the rest.
            PyErr_CheckSignals()
            now = monotonic_now()
        if n:
            # Handlers of signals that came with these events: before their callbacks,
            # as the interpreter would when the wait returned into bytecode.
            PyErr_CheckSignals()
        for i in range(n):
            reader = self.readers.get(events[i].data.fd)
            # Removed, or replaced, by a callback earlier in this batch.
            if reader is None or reader.serial > wait_serial:
                continue
            if reader.args:
                reader.callback(*reader.args)
            else:
                reader.callback()
        if heap:
            now = monotonic_now()
            while heap and (<Timer>heap[0]).when <= now:
                t = self.heap_pop()
                if not t.cancelled:
                    t.cancelled = True
                    if t.args:
                        t.callback(*t.args)
                    else:
                        t.callback()

    def run(self):
        self.running = True
        while self.running:
            self.wait_and_dispatch(-1.0)

    def close(self):
        if self.epfd >= 0:
            c_close(self.epfd)
            self.epfd = -1
        self.readers.clear()
