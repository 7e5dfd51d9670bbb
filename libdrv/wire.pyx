# cython: language_level=3, boundscheck=False, wraparound=False
"""Message framing shared by every rsd socket (DS, rsd control, drivers).

A message is a flat or nested mapping of short ASCII names to values of a
few types.  On the wire (all integers little-endian):

    frame   := u32 body_len | body
    body    := u8 version (=1) | u16 nfields | field*
    field   := u8 name_len | name | value
    value   := u8 kind | u32 len | payload
    kinds   := 0 int (i64, len 8) | 1 str (utf-8) | 2 bytes | 3 bool (len 1)
               | 4 none (len 0) | 5 list (u32 count | value*) | 6 map (body)

The decoder checks every length against the bytes it has and against the
frame limit before it allocates anything, so a hostile peer can cost us at
most one frame's worth of memory and gets a FrameError naming the fault.
"""

from libc.string cimport memcpy
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING

DEF VERSION = 1
DEF K_INT = 0
DEF K_STR = 1
DEF K_BYTES = 2
DEF K_BOOL = 3
DEF K_NONE = 4
DEF K_LIST = 5
DEF K_MAP = 6
DEF MAX_DEPTH = 8

DEFAULT_MAX_FRAME = (1 << 20) + (64 << 10)


class FrameError(ValueError):
    """The peer sent something that is not a valid frame."""


cdef inline void _put_u32(bytearray out, unsigned int v):
    out += (<unsigned int>v).to_bytes(4, "little")


cdef _encode_value(bytearray out, object v, int depth):
    cdef bytes b
    if depth > MAX_DEPTH:
        raise FrameError("message nested deeper than %d levels" % MAX_DEPTH)
    if v is None:
        out.append(K_NONE)
        _put_u32(out, 0)
    elif v is True or v is False:
        out.append(K_BOOL)
        _put_u32(out, 1)
        out.append(1 if v else 0)
    elif isinstance(v, int):
        out.append(K_INT)
        _put_u32(out, 8)
        out += (<object>v).to_bytes(8, "little", signed=True)
    elif isinstance(v, str):
        b = (<str>v).encode("utf-8")
        out.append(K_STR)
        _put_u32(out, len(b))
        out += b
    elif isinstance(v, (bytes, bytearray, memoryview)):
        b = bytes(v)
        out.append(K_BYTES)
        _put_u32(out, len(b))
        out += b
    elif isinstance(v, (list, tuple)):
        inner = bytearray()
        _put_u32(inner, len(v))
        for item in v:
            _encode_value(inner, item, depth + 1)
        out.append(K_LIST)
        _put_u32(out, len(inner))
        out += inner
    elif isinstance(v, dict):
        inner = bytearray()
        _encode_body(inner, v, depth + 1)
        out.append(K_MAP)
        _put_u32(out, len(inner))
        out += inner
    else:
        raise TypeError("cannot encode %s in a message" % type(v).__name__)


cdef _encode_body(bytearray out, dict msg, int depth):
    if len(msg) > 0xFFFF:
        raise FrameError("too many fields in one message")
    out.append(VERSION)
    out += (<unsigned int>len(msg)).to_bytes(2, "little")
    for name, v in msg.items():
        nb = (<str>name).encode("ascii")
        if not 0 < len(nb) < 256:
            raise FrameError("field name must be 1..255 ASCII bytes")
        out.append(len(nb))
        out += nb
        _encode_value(out, v, depth)


def encode(dict msg):
    """Return one complete frame (length prefix included) for msg."""
    body = bytearray(4)
    _encode_body(body, msg, 0)
    n = len(body) - 4
    body[0:4] = (<unsigned int>n).to_bytes(4, "little")
    return bytes(body)


cdef class _Cursor:
    cdef const unsigned char[:] buf
    cdef Py_ssize_t pos
    cdef Py_ssize_t end

    cdef unsigned int u8(self) except? 0xFFFFFFFF:
        if self.pos + 1 > self.end:
            raise FrameError("message truncated")
        self.pos += 1
        return self.buf[self.pos - 1]

    cdef unsigned int u32(self) except? 0xFFFFFFFF:
        cdef unsigned int v
        if self.pos + 4 > self.end:
            raise FrameError("message truncated")
        v = (self.buf[self.pos] | (self.buf[self.pos + 1] << 8)
             | (self.buf[self.pos + 2] << 16)
             | (<unsigned int>self.buf[self.pos + 3] << 24))
        self.pos += 4
        return v

    cdef bytes take(self, Py_ssize_t n):
        if n < 0 or self.pos + n > self.end:
            raise FrameError("field length runs past the end of the message")
        b = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return b


cdef object _decode_value(_Cursor c, int depth):
    cdef unsigned int kind = c.u8()
    cdef unsigned int n = c.u32()
    cdef Py_ssize_t stop
    cdef unsigned int count, i
    if depth > MAX_DEPTH:
        raise FrameError("message nested deeper than %d levels" % MAX_DEPTH)
    if n > <unsigned int>(c.end - c.pos):
        raise FrameError("field length runs past the end of the message")
    if kind == K_INT:
        if n != 8:
            raise FrameError("integer field must be 8 bytes")
        return int.from_bytes(c.take(8), "little", signed=True)
    if kind == K_STR:
        try:
            return c.take(n).decode("utf-8")
        except UnicodeDecodeError:
            raise FrameError("string field is not valid UTF-8")
    if kind == K_BYTES:
        return c.take(n)
    if kind == K_BOOL:
        if n != 1:
            raise FrameError("bool field must be 1 byte")
        return c.take(1) != b"\x00"
    if kind == K_NONE:
        if n != 0:
            raise FrameError("none field must be empty")
        return None
    if kind == K_LIST:
        stop = c.pos + n
        saved_end = c.end
        c.end = stop
        count = c.u32()
        if count > n:  # every item takes at least 5 bytes; cheap sanity bound
            raise FrameError("list count larger than its payload")
        out = []
        for i in range(count):
            out.append(_decode_value(c, depth + 1))
        if c.pos != stop:
            raise FrameError("list payload has trailing bytes")
        c.end = saved_end
        return out
    if kind == K_MAP:
        stop = c.pos + n
        saved_end = c.end
        c.end = stop
        m = _decode_body(c, depth + 1)
        if c.pos != stop:
            raise FrameError("map payload has trailing bytes")
        c.end = saved_end
        return m
    raise FrameError("unknown value kind %d" % kind)


cdef dict _decode_body(_Cursor c, int depth):
    cdef unsigned int version = c.u8()
    cdef unsigned int nfields, i, namelen
    if version != VERSION:
        raise FrameError("unsupported message version %d (this side speaks %d)"
                         % (version, VERSION))
    nfields = c.u8() | (c.u8() << 8)
    out = {}
    for i in range(nfields):
        namelen = c.u8()
        if namelen == 0:
            raise FrameError("empty field name")
        raw = c.take(namelen)
        try:
            name = raw.decode("ascii")
        except UnicodeDecodeError:
            raise FrameError("field name is not ASCII")
        if name in out:
            raise FrameError("duplicate field %r" % name)
        out[name] = _decode_value(c, depth)
    return out


def decode_body(body):
    """Decode one frame body (without its length prefix)."""
    cdef _Cursor c = _Cursor()
    c.buf = body
    c.pos = 0
    c.end = len(body)
    m = _decode_body(c, 0)
    if c.pos != c.end:
        raise FrameError("message has trailing bytes")
    return m


cdef class FrameReader:
    """Accumulates bytes from a stream socket and yields whole messages.

    feed() returns the list of messages completed by the new bytes.  A frame
    announced larger than max_frame is refused as soon as its length is read;
    a frame is never reserved at its announced size, only the bytes that
    actually arrived are held.  With max_msgs >= 0 at most that many messages
    are decoded and the rest stay buffered, still encoded (compact), for a
    later feed(b"", n): a server can then serve a pipelining client one
    request at a time.  When a frame is bad, the messages before it are
    returned first and the next call raises the FrameError.
    """
    cdef bytearray _buf
    cdef Py_ssize_t _start
    cdef public Py_ssize_t max_frame

    def __init__(self, Py_ssize_t max_frame=DEFAULT_MAX_FRAME):
        self._buf = bytearray()
        self._start = 0
        self.max_frame = max_frame

    @property
    def pending(self):
        """Bytes received and not yet returned as messages."""
        return len(self._buf) - self._start

    def feed(self, data=b"", Py_ssize_t max_msgs=-1):
        cdef Py_ssize_t pos = self._start, n, have
        cdef list out = []
        if len(data):
            self._buf += data
        have = len(self._buf)
        try:
            while have - pos >= 4:
                n = int.from_bytes(self._buf[pos:pos + 4], "little")
                if n > self.max_frame:
                    raise FrameError("frame of %d bytes exceeds the limit of %d"
                                     % (n, self.max_frame))
                if have - pos - 4 < n or 0 <= max_msgs <= len(out):
                    break
                out.append(decode_body(memoryview(self._buf)[pos + 4:pos + 4 + n]))
                pos += 4 + n
        except FrameError:
            if not out:
                raise
        finally:
            self._start = pos
            # Drop consumed bytes, but not on every message: a long pipelined
            # buffer served one message at a time would be moved each time.
            if pos and (pos == have or pos >= (64 << 10) or 2 * pos >= have):
                del self._buf[:pos]
                self._start = 0
        return out
