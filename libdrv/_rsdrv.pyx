# cython: language_level=3
"""The /dev/rsdrv system calls: one ioctl per method, structures from the uapi header.

Hot paths (single port I/O, a batch of port I/O, a safecopy) do one ioctl with
no Python object per access.  Errors become the exceptions of
libdrv.rsdrv_errors; this module has no policy of its own.
"""
from libc.errno cimport errno
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport malloc, free
from libc.string cimport memset, strncpy, strlen
from posix.unistd cimport close as c_close
from posix.types cimport pid_t
from libdrv.rsdrv cimport *

from libdrv.rsdrv_errors import rsdrv_error

cdef extern from "sys/ioctl.h" nogil:
    int ioctl(int fd, unsigned long request, ...)

cdef extern from "sys/uio.h" nogil:
    struct iovec:
        void *iov_base
        size_t iov_len
    ssize_t process_vm_readv(pid_t pid, const iovec *local, unsigned long liovcnt,
                             const iovec *remote, unsigned long riovcnt, unsigned long flags)
    ssize_t process_vm_writev(pid_t pid, const iovec *local, unsigned long liovcnt,
                              const iovec *remote, unsigned long riovcnt, unsigned long flags)

API_VERSION = RSDRV_API_VERSION
LABEL_MAX = RSDRV_LABEL_MAX
MAX_PIO_BATCH = RSDRV_MAX_PIO_BATCH
MAX_COPY_BATCH = RSDRV_MAX_COPY_BATCH
MAX_GRANT_LEN = RSDRV_MAX_GRANT_LEN
MAX_DMA_BUF = RSDRV_MAX_DMA_BUF
DMA_MMAP_BASE = RSDRV_DMA_MMAP_BASE
INFO_SEALED = RSDRV_INFO_SEALED
INFO_DMA = RSDRV_INFO_DMA
GRANT_READ = RSDRV_GRANT_READ
GRANT_WRITE = RSDRV_GRANT_WRITE
COPY_FROM_GRANT = RSDRV_COPY_FROM_GRANT
COPY_TO_GRANT = RSDRV_COPY_TO_GRANT
PIO_IN = RSDRV_PIO_IN
PIO_OUT = RSDRV_PIO_OUT
IOC = {
    "SET_LABEL": RSDRV_IOC_SET_LABEL, "ALLOW_IO": RSDRV_IOC_ALLOW_IO,
    "ALLOW_IRQ": RSDRV_IOC_ALLOW_IRQ, "ALLOW_MEM": RSDRV_IOC_ALLOW_MEM,
    "ALLOW_PCI": RSDRV_IOC_ALLOW_PCI, "ALLOW_GRANT_TO": RSDRV_IOC_ALLOW_GRANT_TO,
    "SEAL": RSDRV_IOC_SEAL, "INFO": RSDRV_IOC_INFO, "PIO": RSDRV_IOC_PIO,
    "VPIO": RSDRV_IOC_VPIO, "IRQ_BIND": RSDRV_IOC_IRQ_BIND,
    "IRQ_REENABLE": RSDRV_IOC_IRQ_REENABLE, "IRQ_UNBIND": RSDRV_IOC_IRQ_UNBIND,
    "GRANT": RSDRV_IOC_GRANT, "REVOKE": RSDRV_IOC_REVOKE, "SAFECOPY": RSDRV_IOC_SAFECOPY,
    "VSAFECOPY": RSDRV_IOC_VSAFECOPY, "DMA_ALLOC": RSDRV_IOC_DMA_ALLOC,
}


cdef bytes _label_bytes(label):
    """Check a label once, here: 1..31 bytes of [A-Za-z0-9_.-]."""
    if not isinstance(label, str):
        raise TypeError(f"label must be a str, not {type(label).__name__}")
    b = label.encode("ascii", "replace")
    if not 0 < len(b) < RSDRV_LABEL_MAX or any(
            not (chr(c).isalnum() or chr(c) in "_.-") for c in b):
        raise ValueError(f"bad label {label!r}: 1..{RSDRV_LABEL_MAX - 1} characters "
                         "of A-Z a-z 0-9 _ . -")
    return b


cdef int _check_u(value, unsigned long long limit, str what) except -1:
    if not isinstance(value, int) or value < 0 or value > limit:
        raise ValueError(f"{what} must be an int in 0..{limit:#x}, not {value!r}")
    return 0


def parse_bdf(bdf):
    """'0000:00:02.0' or '00:02.0' -> (domain, bus, devfn)."""
    try:
        parts = bdf.split(":")
        if len(parts) == 2:
            parts = ["0"] + parts
        domain, bus, rest = parts
        slot, fn = rest.split(".")
        d, b, s, f = int(domain, 16), int(bus, 16), int(slot, 16), int(fn, 16)
    except (AttributeError, ValueError):
        raise ValueError(f"bad PCI address {bdf!r}: expected DDDD:BB:SS.F, e.g. 0000:00:02.0")
    if d > 0xffff or b > 0xff or s > 0x1f or f > 7:
        raise ValueError(f"bad PCI address {bdf!r}: field out of range")
    return d, b, (s << 3) | f


cdef class RawEndpoint:
    """One /dev/rsdrv file (an endpoint).  Owns its fd unless detached."""
    cdef public int fd

    def __cinit__(self, int fd):
        self.fd = fd

    def __dealloc__(self):
        if self.fd >= 0:
            c_close(self.fd)

    def fileno(self):
        if self.fd < 0:
            raise ValueError("endpoint is closed")
        return self.fd

    def close(self):
        if self.fd >= 0:
            c_close(self.fd)
            self.fd = -1

    def detach(self):
        """Give up ownership of the fd (e.g. after passing it to a child) and return it."""
        fd, self.fd = self.fd, -1
        return fd

    cdef int _ioctl(self, unsigned long req, void *arg, str fmt, tuple args=(), bint copy=False,
                    object resource=None) except -1:
        """One ioctl; the error's text (fmt % args) is made only if there is an error."""
        cdef int rc
        if self.fd < 0:
            raise ValueError("endpoint is closed")
        with nogil:
            rc = ioctl(self.fd, req, arg)
        if rc < 0:
            raise rsdrv_error(errno, fmt % args if args else fmt, copy, resource)
        return rc

    cdef inline int _fast(self, unsigned long req, void *arg) noexcept nogil:
        """One ioctl for the hot paths: 0, or the errno (the caller builds the error only then)."""
        if self.fd < 0:
            return -1
        return 0 if ioctl(self.fd, req, arg) == 0 else errno

    cdef int _failed(self, int err, str fmt, tuple args) except -1:
        if err < 0:
            raise ValueError("endpoint is closed")
        raise rsdrv_error(err, fmt % args)

    # ---- set-up (CAP_SYS_RAWIO, before seal) ----
    def set_label(self, label, generation=0):
        cdef rsdrv_label arg
        b = _label_bytes(label)
        _check_u(generation, 0xfffffffffffffffe, "generation")
        memset(&arg, 0, sizeof(arg))
        strncpy(arg.label, b, RSDRV_LABEL_MAX - 1)
        arg.generation = generation
        self._ioctl(RSDRV_IOC_SET_LABEL, &arg, "set label %r", (label,))
        return arg.generation

    def allow_io(self, base, count):
        cdef rsdrv_io_range arg
        _check_u(base, 0xffff, "port base")
        _check_u(count, 0x10000 - base, "port count")
        if count == 0:
            raise ValueError("port count must be at least 1")
        arg.base = base
        arg.count = count
        self._ioctl(RSDRV_IOC_ALLOW_IO, &arg, "allow io %#x-%#x", (base, base + count - 1),
                    False, ("io", base, base + count - 1))

    def allow_irq(self, irq):
        cdef uint32_t arg
        _check_u(irq, 0xffffffff, "irq")
        arg = irq
        self._ioctl(RSDRV_IOC_ALLOW_IRQ, &arg, "allow irq %d", (irq,))

    def allow_mem(self, phys, size):
        cdef rsdrv_mem_range arg
        _check_u(phys, 0xffffffffffffffff, "phys")
        _check_u(size, 0xffffffffffffffff, "size")
        if phys % 4096 or size % 4096 or size == 0:
            raise ValueError(f"memory range {phys:#x}+{size:#x} must be page aligned and non-empty")
        arg.phys = phys
        arg.size = size
        self._ioctl(RSDRV_IOC_ALLOW_MEM, &arg, "allow mem %#x-%#x", (phys, phys + size - 1),
                    False, ("mem", phys, phys + size - 1))

    def allow_pci(self, bdf):
        cdef rsdrv_pci arg
        d, b, df = parse_bdf(bdf)
        memset(&arg, 0, sizeof(arg))
        arg.domain, arg.bus, arg.devfn = d, b, df
        bdf = f"{d:04x}:{b:02x}:{df >> 3:02x}.{df & 7:x}"
        self._ioctl(RSDRV_IOC_ALLOW_PCI, &arg, "allow pci %s", (bdf,), False, ("pci", bdf))

    def allow_grant_to(self, label):
        cdef rsdrv_peer arg
        b = _label_bytes(label)
        memset(&arg, 0, sizeof(arg))
        strncpy(arg.label, b, RSDRV_LABEL_MAX - 1)
        self._ioctl(RSDRV_IOC_ALLOW_GRANT_TO, &arg, "allow grant to %r", (label,))

    def seal(self):
        self._ioctl(RSDRV_IOC_SEAL, NULL, "seal")

    def info(self):
        cdef rsdrv_info arg
        memset(&arg, 0, sizeof(arg))
        self._ioctl(RSDRV_IOC_INFO, &arg, "info")
        return {"label": arg.label[:strlen(arg.label)].decode(), "generation": arg.generation,
                "sealed": bool(arg.flags & RSDRV_INFO_SEALED),
                "dma": bool(arg.flags & RSDRV_INFO_DMA), "api_version": arg.api_version}

    # ---- port I/O ----
    cpdef unsigned int pio_in(self, unsigned int port, unsigned int width) except? 0xffffffff:
        cdef rsdrv_pio op
        op.port = port
        op.width = width
        op.dir = RSDRV_PIO_IN
        op.value = 0
        if port > 0xffff:
            raise ValueError(f"port {port:#x} out of range")
        cdef int err = self._fast(RSDRV_IOC_PIO, &op)
        if err:
            self._failed(err, "in%d %#x", (width * 8, port))
        return op.value

    cpdef int pio_out(self, unsigned int port, unsigned int width, unsigned int value) except -1:
        cdef rsdrv_pio op
        if port > 0xffff:
            raise ValueError(f"port {port:#x} out of range")
        if width < 4 and value >> (8 * width):
            raise ValueError(f"value {value:#x} does not fit {width * 8} bits")
        op.port = port
        op.width = width
        op.dir = RSDRV_PIO_OUT
        op.value = value
        cdef int err = self._fast(RSDRV_IOC_PIO, &op)
        if err:
            self._failed(err, "out%d %#x", (width * 8, port))
        return 0

    def vpio(self, PioBatch batch):
        cdef rsdrv_vpio arg
        if batch.n == 0:
            return
        arg.ops = <uint64_t><size_t>batch.ops
        arg.count = batch.n
        arg.reserved = 0
        cdef int err = self._fast(RSDRV_IOC_VPIO, &arg)
        if err:
            self._failed(err, "batch of %d port accesses", (batch.n,))

    # ---- IRQs ----
    def irq_bind(self, irq, eventfd):
        cdef rsdrv_irq_bind arg
        _check_u(irq, 0xffffffff, "irq")
        arg.irq = irq
        arg.eventfd = eventfd
        self._ioctl(RSDRV_IOC_IRQ_BIND, &arg, "bind irq %d", (irq,))

    def irq_reenable(self, unsigned int irq):
        cdef uint32_t arg = irq
        cdef int err = self._fast(RSDRV_IOC_IRQ_REENABLE, &arg)
        if err:
            self._failed(err, "re-enable irq %d", (irq,))

    def irq_unbind(self, unsigned int irq):
        cdef uint32_t arg = irq
        self._ioctl(RSDRV_IOC_IRQ_UNBIND, &arg, "unbind irq %d", (irq,))

    # ---- grants ----
    def grant(self, unsigned long long addr, unsigned long long length, unsigned int access,
              grantee):
        cdef rsdrv_grant arg
        b = _label_bytes(grantee)
        memset(&arg, 0, sizeof(arg))
        arg.addr = addr
        arg.len = length
        arg.access = access
        strncpy(arg.grantee, b, RSDRV_LABEL_MAX - 1)
        self._ioctl(RSDRV_IOC_GRANT, &arg, "grant %d bytes to %r", (length, grantee))
        return arg.id

    def revoke(self, unsigned int grant_id):
        cdef uint32_t arg = grant_id
        self._ioctl(RSDRV_IOC_REVOKE, &arg, "revoke grant %d", (grant_id,), True)

    def safecopy(self, granter, unsigned long long gen, unsigned int grant_id,
                 unsigned int direction, unsigned long long offset,
                 unsigned long long addr, unsigned long long length):
        cdef rsdrv_safecopy c
        b = _label_bytes(granter)
        memset(&c, 0, sizeof(c))
        strncpy(c.granter, b, RSDRV_LABEL_MAX - 1)
        c.granter_gen = gen
        c.grant_id = grant_id
        c.dir = direction
        c.offset = offset
        c.addr = addr
        c.len = length
        self._ioctl(RSDRV_IOC_SAFECOPY, &c, "safecopy grant %s/%d#%d", (granter, gen, grant_id), True)

    def vsafecopy(self, copies):
        """copies: list of (granter, gen, grant_id, direction, offset, addr, length).
        Returns the number done; raises on the first failure (its .done says how many)."""
        cdef rsdrv_vsafecopy arg
        cdef rsdrv_safecopy *v
        cdef int i, n = len(copies)
        if not 0 < n <= RSDRV_MAX_COPY_BATCH:
            raise ValueError(f"a vectored copy takes 1..{RSDRV_MAX_COPY_BATCH} copies, not {n}")
        v = <rsdrv_safecopy *>malloc(n * sizeof(rsdrv_safecopy))
        if v == NULL:
            raise MemoryError()
        try:
            memset(v, 0, n * sizeof(rsdrv_safecopy))
            for i, (granter, gen, gid, direction, offset, addr, length) in enumerate(copies):
                strncpy(v[i].granter, _label_bytes(granter), RSDRV_LABEL_MAX - 1)
                v[i].granter_gen = gen
                v[i].grant_id = gid
                v[i].dir = direction
                v[i].offset = offset
                v[i].addr = addr
                v[i].len = length
            arg.copies = <uint64_t><size_t>v
            arg.count = n
            arg.done = 0
            try:
                self._ioctl(RSDRV_IOC_VSAFECOPY, &arg, "vectored safecopy (%d)", (n,), True)
            except OSError as e:
                e.done = arg.done
                raise
            return arg.done
        finally:
            free(v)

    # ---- DMA ----
    def dma_alloc(self, size):
        cdef rsdrv_dma arg
        _check_u(size, RSDRV_MAX_DMA_BUF, "DMA buffer size")
        memset(&arg, 0, sizeof(arg))
        arg.size = size
        self._ioctl(RSDRV_IOC_DMA_ALLOC, &arg, "DMA buffer of %d bytes", (size,))
        return {"id": arg.id, "size": arg.size, "bus_addr": arg.bus_addr,
                "mmap_offset": arg.mmap_offset}


cdef class PioBatch:
    """A VDEVIO batch built once and run many times; in() slots read back by index."""
    cdef rsdrv_pio *ops
    cdef public unsigned int n
    cdef unsigned int cap

    def __cinit__(self, unsigned int capacity=64):
        if not 0 < capacity <= RSDRV_MAX_PIO_BATCH:
            raise ValueError(f"batch capacity must be 1..{RSDRV_MAX_PIO_BATCH}")
        self.ops = <rsdrv_pio *>malloc(capacity * sizeof(rsdrv_pio))
        if self.ops == NULL:
            raise MemoryError()
        self.cap = capacity
        self.n = 0

    def __dealloc__(self):
        free(self.ops)

    cdef int _add(self, unsigned int port, unsigned int width, unsigned int direction,
                  unsigned int value) except -1:
        if self.n == self.cap:
            raise ValueError(f"batch is full ({self.cap} accesses)")
        if port > 0xffff:
            raise ValueError(f"port {port:#x} out of range")
        if width != 1 and width != 2 and width != 4:
            raise ValueError(f"width must be 1, 2 or 4 bytes, not {width}")
        if width < 4 and value >> (8 * width):
            raise ValueError(f"value {value:#x} does not fit {width * 8} bits")
        self.ops[self.n].port = port
        self.ops[self.n].width = width
        self.ops[self.n].dir = direction
        self.ops[self.n].value = value
        self.n += 1
        return self.n - 1

    def add_in(self, unsigned int port, unsigned int width=1):
        """Queue a read; returns its index for value()."""
        return self._add(port, width, RSDRV_PIO_IN, 0)

    def add_out(self, unsigned int port, unsigned int value, unsigned int width=1):
        return self._add(port, width, RSDRV_PIO_OUT, value)

    def value(self, unsigned int index):
        if index >= self.n:
            raise IndexError(index)
        return self.ops[index].value

    def clear(self):
        self.n = 0


def process_vm_copy(int pid, unsigned long long remote, buf, bint write):
    """Unenforced fallback copy (no module): process_vm_readv/writev on `pid`."""
    cdef unsigned char[::1] view
    cdef const unsigned char[::1] cview
    cdef iovec local, rem
    cdef ssize_t got
    if write:
        cview = buf
        local.iov_base = <void *>&cview[0] if cview.shape[0] else NULL
        local.iov_len = cview.shape[0]
    else:
        view = buf
        local.iov_base = <void *>&view[0] if view.shape[0] else NULL
        local.iov_len = view.shape[0]
    rem.iov_base = <void *><size_t>remote
    rem.iov_len = local.iov_len
    with nogil:
        if write:
            got = process_vm_writev(pid, &local, 1, &rem, 1, 0)
        else:
            got = process_vm_readv(pid, &local, 1, &rem, 1, 0)
    if got < 0:
        import os
        raise OSError(errno, f"process_vm_{'writev' if write else 'readv'} on pid {pid}: "
                      f"{os.strerror(errno)}")
    if <size_t>got != local.iov_len:
        raise OSError(14, f"short copy with pid {pid}: {got} of {local.iov_len} bytes")
    return got


def buffer_address(buf, bint writable):
    """Address and length of a contiguous buffer (kept alive by the caller)."""
    cdef unsigned char[::1] view
    cdef const unsigned char[::1] cview
    if writable:
        view = buf
        return (<size_t>&view[0] if view.shape[0] else 0), view.shape[0]
    cview = buf
    return (<size_t>&cview[0] if cview.shape[0] else 0), cview.shape[0]
