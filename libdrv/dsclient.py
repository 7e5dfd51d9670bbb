"""Client of the data store (datastore/), used by drivers, front ends,
rsd's tools and rsctl.  It lives in libdrv so that drivers never import the
daemon's package: datastore imports libdrv, never the other way round.

One connection, synchronous requests.  Notifications for this
connection's subscriptions may arrive between a request and its reply;
they are kept, in order, for get_notifications().  fileno() is the socket,
so an event loop can wait for notifications together with other fds; after
making calls of its own it must also look at has_notifications().
"""

import collections
import os
import select
import socket
import time
from dataclasses import dataclass

from libdrv.wire import FrameError, FrameReader, encode

# Value types (MINIX DS: u32, string, memory blob, label).
TYPES = ("u32", "str", "bytes", "label")

# Per-key flags, set by the publisher (MINIX DSF_PRIVATE_*).
PRIVATE_RETRIEVE = 0x1   # only the owner may retrieve (or list) the value
PRIVATE_SUBSCRIBE = 0x2  # only the owner is told of changes
PRIVATE_OVERWRITE = 0x4  # only the owner may overwrite
PRIVATE = PRIVATE_RETRIEVE | PRIVATE_SUBSCRIBE | PRIVATE_OVERWRITE
ALL_FLAGS = PRIVATE

# Error codes: stable strings, one per kind of refusal (the daemon uses these).
E_BADREQ = "EINVAL"       # malformed request, wrong type, bad key or regex
E_NOENT = "ENOENT"        # no such key / subscription
E_EXIST = "EEXIST"        # key exists and OVERWRITE was not given
E_PERM = "EPERM"          # caller's label (or lack of one) does not allow it
E_TOOBIG = "E2BIG"        # key or value over the limit
E_BUSY = "EBUSY"          # too many subscriptions / clients
E_QUOTA = "EDQUOT"        # the label's key or byte quota is used up
E_OVERFLOW = "EOVERFLOW"  # the client let too much output pile up: disconnected
E_IO = "EIO"              # the journal could not be written; nothing changed

PIPELINE_BATCH = 512      # requests publish_many sends before reading their replies


class DSError(Exception):
    """A request the data store refused; .code is the protocol error code."""
    code = None

    def __init__(self, msg, code=None):
        super().__init__(msg)
        if code is not None:
            self.code = code


class BadRequest(DSError):
    code = "EINVAL"


class NotFound(DSError):
    code = "ENOENT"


class Exists(DSError):
    code = "EEXIST"


class PermissionDenied(DSError):
    code = "EPERM"


class TooLarge(DSError):
    code = "E2BIG"


class Busy(DSError):
    code = "EBUSY"


class QuotaExceeded(DSError):
    code = "EDQUOT"


class DSUnavailable(DSError, ConnectionError):
    """The daemon is not running or the connection broke."""
    code = "ECONNREFUSED"


class Overflow(DSUnavailable):
    """The daemon hung up because replies and notifications piled up unread."""
    code = "EOVERFLOW"


_ERRORS = {cls.code: cls for cls in (BadRequest, NotFound, Exists, PermissionDenied, TooLarge, Busy,
                                     QuotaExceeded, Overflow)}


@dataclass(frozen=True)
class Entry:
    key: str
    type: str
    value: object
    owner: str
    flags: int = 0


@dataclass(frozen=True)
class Notification:
    """event is 'set', 'delete', or 'overflow' / 'reconnected' (then key is
    None and changes may have been missed: re-list what matters)."""
    sub: int
    key: object
    type: object
    owner: object
    event: str
    value: object = None
    has_value: bool = False
    initial: bool = False
    dropped: int = 0


def default_socket_path(env=os.environ):
    if env.get("RSD_DS_SOCKET"):
        return env["RSD_DS_SOCKET"]
    return os.path.join(env.get("RSD_RUNTIME_DIR", "/run/rsd"), "ds.sock")


class DSClient:
    """reconnect=True: after the connection breaks (the daemon was restarted),
    the next call connects again and re-subscribes every subscription with
    INITIAL, and get_notifications() returns a 'reconnected' notification
    first so the caller knows deletes may have been missed.  The call that
    was in flight when the connection broke still raises DSUnavailable:
    whether it took effect is unknown, and only the caller can decide."""

    def __init__(self, path=None, timeout=10.0, connect=True, reconnect=False):
        self.path = path or default_socket_path()
        self.timeout = timeout
        self.reconnect = reconnect
        self._subs = {}          # our sub id -> (regex, daemon's sub id)
        self._sock = None
        self._reader = FrameReader()
        self._next_id = 1
        self._notes = collections.deque()
        self._replies = {}
        if connect:
            self.connect()

    # -- connection --------------------------------------------------------
    def connect(self):
        self.close()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            s.connect(self.path)
        except OSError as exc:
            s.close()
            raise DSUnavailable("cannot reach the data store at %s (%s); is `datastore` running? "
                                "(systemctl start datastore, or set RSD_DS_SOCKET)"
                                % (self.path, exc.strerror or exc)) from None
        self._sock = s
        self._reader = FrameReader()
        self._replies.clear()

    def close(self):
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def fileno(self):
        return self._sock.fileno()

    # -- plumbing --------------------------------------------------------------
    def _ensure_connected(self):
        if self._sock is not None:
            return
        if not self.reconnect:
            raise DSUnavailable("not connected to the data store at %s" % self.path)
        self.connect()
        before = len(self._notes)  # undelivered notes from the old connection stay first
        old, self._subs = self._subs, {}
        for mine, (regex, _) in old.items():
            theirs = self._wait(self._send("subscribe", {"regex": regex, "initial": True}))["sub"]
            self._subs[mine] = (regex, theirs)
        self._notes.insert(before, {"ev": "reconnected", "sub": 0})

    def _send(self, op, fields):
        self._ensure_connected()
        rid = self._next_id
        self._next_id += 1
        msg = {"op": op, "id": rid}
        msg.update(fields)
        try:
            self._sock.sendall(encode(msg))
        except OSError as exc:
            # The daemon may have refused us (too many clients) and hung up
            # before we wrote: its reason is waiting in the socket.
            try:
                while self._pump(0):
                    pass
            except DSError as refusal:
                if not isinstance(refusal, DSUnavailable):
                    raise refusal from None
            self.close()
            raise DSUnavailable("lost the data store connection (%s)" % exc) from None
        return rid

    def _pump(self, timeout):
        """Read what is available (waiting up to timeout); sort into replies/notes."""
        self._ensure_connected()
        r, _, _ = select.select([self._sock], [], [], timeout)
        if not r:
            return False
        try:
            data = self._sock.recv(1 << 20)
        except OSError as exc:
            data = b""
            why = str(exc)
        else:
            why = "the daemon closed the connection"
        if not data:
            self.close()
            raise DSUnavailable("lost the data store connection: %s" % why)
        try:
            msgs = self._reader.feed(data)
        except FrameError as exc:
            self.close()
            raise DSUnavailable("the data store sent a malformed frame: %s" % exc) from None
        for m in msgs:
            if "ev" in m:
                self._notes.append(m)
            elif m.get("id") is None and not m.get("ok", True):
                # The daemon refused us before any request (e.g. too many clients).
                self.close()
                raise _error(m)
            else:
                self._replies[m.get("id")] = m
        return True

    def _wait(self, rid):
        deadline = time.monotonic() + self.timeout
        while rid not in self._replies:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DSUnavailable("the data store did not answer within %.1f s" % self.timeout)
            self._pump(left)
        reply = self._replies.pop(rid)
        if not reply.get("ok"):
            raise _error(reply)
        return reply

    def call(self, op, **fields):
        return self._wait(self._send(op, fields))

    # -- the API ---------------------------------------------------------------
    def publish(self, key, value, type=None, overwrite=False, flags=0):
        fields = {"key": key, "value": value, "overwrite": bool(overwrite), "flags": flags}
        if type is not None:
            fields["type"] = type
        self.call("publish", **fields)

    def publish_many(self, items, overwrite=False, flags=0):
        """Publish [(key, value), ...] pipelined: requests go out in batches
        before their replies are awaited, so a batch costs about one round
        trip and, in the daemon, shares one journal sync.  Batches keep this
        client's unread replies far below the daemon's budget (it stops
        reading a client whose replies pile up).  Raises the first refusal
        (the other items are still applied: each publish stands alone)."""
        first_error = None
        items = list(items)
        for start in range(0, len(items), PIPELINE_BATCH):
            ids = [self._send("publish", {"key": k, "value": v, "overwrite": bool(overwrite), "flags": flags})
                   for k, v in items[start:start + PIPELINE_BATCH]]
            for rid in ids:
                try:
                    self._wait(rid)
                except DSError as exc:
                    if isinstance(exc, DSUnavailable):
                        raise
                    first_error = first_error or exc
        if first_error is not None:
            raise first_error

    def retrieve(self, key):
        r = self.call("retrieve", key=key)
        return Entry(r["key"], r["type"], r["value"], r["owner"], r.get("flags", 0))

    def get(self, key, default=None):
        """The value of key, or default when it does not exist (or is private)."""
        try:
            return self.retrieve(key).value
        except NotFound:
            return default

    def delete(self, key):
        self.call("delete", key=key)

    def list(self, regex=".*", page=None):
        """Every visible key matching regex, in key order.  The daemon answers
        in pages no larger than a frame; this follows the continuation
        ("next": the last key sent) until the end.  page: entries per page."""
        out, after = [], None
        while True:
            fields = {"regex": regex}
            if after is not None:
                fields["after"] = after
            if page is not None:
                fields["limit"] = page
            r = self.call("list", **fields)
            out += [Entry(e["key"], e["type"], e.get("value"), e["owner"], e.get("flags", 0))
                    for e in r["entries"]]
            after = r.get("next")
            if after is None:
                return out

    def subscribe(self, regex, initial=False):
        theirs = self.call("subscribe", regex=regex, initial=bool(initial))["sub"]
        mine = max(self._subs, default=0) + 1 if self.reconnect else theirs
        self._subs[mine] = (regex, theirs)
        return mine

    def unsubscribe(self, sub):
        if sub not in self._subs:
            raise NotFound("no subscription %r on this connection" % (sub,))
        self.call("unsubscribe", sub=self._subs[sub][1])
        del self._subs[sub]

    def register(self, pid, label):
        self.call("register", pid=pid, label=label)

    def unregister(self, pid):
        self.call("unregister", pid=pid)

    def purge(self, label):
        return self.call("purge", label=label)["count"]

    def whoami(self):
        return self.call("whoami")

    def stats(self):
        return self.call("stats")

    def has_notifications(self):
        """True when notifications are already buffered here.  Any call may read
        notifications that arrived before its reply, and then the socket is no
        longer readable: an event loop must check this after its own calls."""
        return bool(self._notes)

    def get_notifications(self, timeout=0):
        """Return the notifications received so far, waiting up to timeout
        seconds (None: forever) for at least one."""
        deadline = None if timeout is None else time.monotonic() + timeout

        def left():
            return None if deadline is None else max(0.0, deadline - time.monotonic())

        while True:
            try:
                while self._pump(0):  # take what is readable now
                    pass
                if self._notes or left() == 0:
                    break
                self._pump(left())    # then wait for more
            except DSUnavailable:
                if not self.reconnect:
                    raise
                if left() == 0:
                    break
                time.sleep(0.05 if deadline is None else min(0.05, left()))
        theirs_to_mine = {theirs: mine for mine, (_, theirs) in self._subs.items()}
        out = []
        while self._notes:
            m = self._notes.popleft()
            out.append(Notification(theirs_to_mine.get(m.get("sub"), 0), m.get("key"), m.get("type"), m.get("owner"),
                                    m["ev"], m.get("value"), "value" in m, bool(m.get("initial")),
                                    m.get("dropped", 0)))
        return out


def _error(reply):
    code = reply.get("err")
    cls = _ERRORS.get(code, DSError)
    return cls(reply.get("msg") or "data store error %s" % code, code)
