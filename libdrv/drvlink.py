"""A front end's connection to its driver's service socket (libdrv.wire frames).

    drv = DriverLink("$RSD_RUNTIME_DIR/svc/<label>.sock")
    reply = drv.call("open")                  # DriverRefused on {"ok": false}
    reply = drv.call("attach", fds=[a, b, c], tx_done=0)   # fds ride on the first byte
    rid = drv.send("set", mtu=9000)           # not awaited: the reply comes with the events
    for ev in drv.read_events(): ...          # events and replies nobody waited for

ConnectionError means the driver is gone (EOF, a malformed frame, no answer
within 5 s): the front end treats it as the driver's death.

    for what, detail in driver_news(ds, "net", label, log):   # DS's drv.<class>.<label>
        up(detail) if what == "up" else down(detail)             # a generation / why it went
"""

import socket

from libdrv.dsclient import DSError
from libdrv.svcstate import parse_drv
from libdrv.wire import FrameError, FrameReader, encode


def driver_news(ds, cls, label, log):
    """What DS told us of drv.<cls>.<label> since we last looked (a subscription
    to it on ds): [("up", generation) | ("down", why), ...] in order."""
    try:
        notes = ds.get_notifications(0)
    except DSError as exc:
        log.warning("data store: %s", exc)
        return []
    news = []
    for n in notes:
        if n.event == "set":
            try:
                state, gen = parse_drv(n.value)
            except ValueError:
                log.warning("ignoring %s = %r", n.key, n.value)
                continue
            news.append(("up", gen) if state == "up" else ("down", "drv.%s.%s = %s" % (cls, label, n.value)))
        elif n.event == "delete":
            news.append(("down", "drv.%s.%s deleted" % (cls, label)))
    return news


class DriverLink:
    """The connection to the driver's socket."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(5)
        self.sock.connect(path)
        self.reader = FrameReader()
        self.next_id = 1
        self.events = []

    def call(self, op, fds=(), **fields):
        rid = self.send(op, fds, **fields)
        reply = None
        while reply is None:
            for m in self._read(blocking=True):
                if m.get("id") == rid:
                    reply = m
                else:
                    self.events.append(m)  # events and stale replies, in order
        if not reply.get("ok"):
            raise DriverRefused(reply.get("msg", "refused"))
        return reply

    def send(self, op, fds=(), **fields):
        """Send a request without awaiting its reply (it comes as an event); returns its id."""
        rid = self.next_id
        self.next_id += 1
        data = encode(dict(fields, op=op, id=rid))
        if fds:
            sent = socket.send_fds(self.sock, [data], list(fds))
            self.sock.sendall(data[sent:])
        else:
            self.sock.sendall(data)
        return rid

    def _read(self, blocking):
        self.sock.settimeout(5 if blocking else 0)
        try:
            data = self.sock.recv(1 << 20)
        except (BlockingIOError, socket.timeout):
            if blocking:
                raise ConnectionError("driver did not answer within 5 s")
            return []
        if not data:
            raise ConnectionError("driver closed the connection")
        try:
            return self.reader.feed(data)
        except FrameError as exc:
            raise ConnectionError("driver sent a malformed frame: %s" % exc)

    def read_events(self):
        """Events received so far; ConnectionError once they are all taken and the
        driver is gone (never before: its last txdone still counts)."""
        out, self.events = self.events, []
        try:
            out += self._read(blocking=False)
        except ConnectionError:
            if not out:
                raise
        return out

    def close(self):
        self.sock.close()


class DriverRefused(Exception):
    pass
