"""A driver's side of its service socket: front ends' connections, framed requests, replies.

    server = DriverServer(sef, "ahci", {"attach": do_attach, "stats": do_stats}, on_drop=forget)
    sef.on_accept(server.accept)

    def do_attach(conn, msg):                  # a handler: returns the reply's fields
        fds = server.take_fds(conn)            # the fds that rode on this request
        raise Refused("EBUSY", "...")          # or refuse: {"ok": false, "err": ..., "msg": ...}

Requests are libdrv.wire frames {"op", "id", ...}; each gets one reply
{"id", "ok", ...}; events the driver pushes ({"ev": ...}) go the same way
(libdrv/drvlink.py is the front end's side).  A front end is hostile by
assumption: a malformed frame gets an error reply and the connection is
closed; fds that no request claims are closed; more fds at once than any
request carries are all closed; a front end that does not read its
replies is dropped once CLIENT_OUT_MAX bytes are queued for it.  Nothing
here blocks the driver's loop.
"""

import os
import socket

from libdrv.wire import FrameError, FrameReader, encode

MAX_CLIENT_FRAME = 64 << 10
CLIENT_OUT_MAX = 1 << 20
EVENTFD_LINK = "anon_inode:[eventfd]"


class Refused(Exception):
    """A request the driver does not carry out: err is the errno name the reply carries."""

    def __init__(self, err, msg):
        super().__init__(msg)
        self.err = err


class Connection:
    def __init__(self, sock):
        self.sock = sock
        self.reader = FrameReader(MAX_CLIENT_FRAME)
        self.out = bytearray()
        self.pending_fds = []       # fds that came with the bytes being parsed
        self.closing = False        # drop it once the reply is out

    def hung_up(self):
        """True if the peer closed its end (an EOF we have not read yet)."""
        try:
            return self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True


def is_eventfd(fd):
    try:
        return os.readlink("/proc/self/fd/%d" % fd) == EVENTFD_LINK
    except OSError:
        return False


def close_fds(fds):
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
    del fds[:]


class DriverServer:
    def __init__(self, sef, name, handlers, max_fds=3, on_drop=None):
        self.sef = sef
        self.name = name
        self.handlers = handlers
        self.max_fds = max_fds
        self.on_drop = on_drop
        self.connections = []

    def accept(self, sock):
        sock.setblocking(False)
        c = Connection(sock)
        self.connections.append(c)
        self.sef.add_reader(sock, self._on_readable, c)

    def take_fds(self, c):
        fds, c.pending_fds = c.pending_fds, []
        return fds

    def _on_readable(self, c):
        try:
            data, fds, _, _ = socket.recv_fds(c.sock, 65536, self.max_fds + 1, socket.MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data, fds = b"", []
        c.pending_fds.extend(fds)
        if len(c.pending_fds) > self.max_fds:      # more than any request carries: none is believed
            close_fds(c.pending_fds)
        if not data:
            self.drop(c)
            return
        try:
            msgs = c.reader.feed(data)
        except FrameError as exc:
            self.push(c, {"ok": False, "err": "EINVAL", "msg": "malformed frame: %s" % exc})
            self.drop(c)
            return
        for msg in msgs:
            if c.sock.fileno() < 0:
                return
            self.push(c, self._handle(c, msg))
            if c.closing:
                self.drop(c)
                return
        if not c.reader.pending:
            close_fds(c.pending_fds)       # fds no request claimed

    def _handle(self, c, msg):
        rid = msg.get("id")
        op = msg.get("op")
        handler = self.handlers.get(op) if isinstance(op, str) else None
        try:
            if handler is None:
                raise Refused("EINVAL", "unknown operation %r; valid: %s" % (op, ", ".join(sorted(self.handlers))))
            reply = handler(c, msg) or {}
            reply["ok"] = True
        except Refused as exc:
            reply = {"ok": False, "err": exc.err, "msg": str(exc)}
        reply["id"] = rid
        return reply

    def push(self, c, msg):
        if c.sock.fileno() < 0:
            return
        c.out += encode(msg)
        try:
            n = c.sock.send(c.out)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError:
            self.drop(c)
            return
        del c.out[:n]
        if len(c.out) > CLIENT_OUT_MAX:     # a front end that does not read its replies
            self.drop(c)

    def drop(self, c):
        if c.sock.fileno() < 0:
            return
        if self.on_drop is not None:
            self.on_drop(c)
        self.sef.remove_reader(c.sock)
        if c in self.connections:
            self.connections.remove(c)
        close_fds(c.pending_fds)
        c.sock.close()
