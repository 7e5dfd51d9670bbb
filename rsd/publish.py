"""Telling DS about every state change of a service, without waiting for it.

rsd is DS's registrar.  Requests are pipelined on one connection and their
replies read by the event loop, so a restart never waits for DS's journal
fsync; the order of publications is the order of events because DS answers
one connection's requests in order.  A lost DS connection never stops
supervision: rsd reconnects and republishes its whole table (resync).

This speaks the DS protocol (datastore/protocol.py) directly: a request is
{"op", "id", ...}, its reply {"id", "ok", ...} or {"id", "ok": False, "err", "msg"}.
"""

import logging
import socket

from libdrv.svcstate import drv_key, format_drv, format_label, label_key
from libdrv.wire import FrameError, FrameReader, encode

log = logging.getLogger("rsd.publish")

MAX_BACKLOG = 1 << 20  # bytes DS may fall behind before we drop and resync


class Publisher:
    def __init__(self, loop, socket_path):
        self.loop = loop
        self.socket_path = socket_path
        self.sock = None
        self.reader = None
        self.out = bytearray()
        self.next_id = 1
        self.pending = {}  # id -> (description, error codes to ignore)
        self.warned = False

    @property
    def connected(self):
        return self.sock is not None

    def connect(self):
        """Try to (re)connect; True when connected now."""
        if self.sock is not None:
            return True
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            s.connect(self.socket_path)
        except OSError as exc:
            s.close()
            if not self.warned:
                log.warning("data store unavailable at %s (%s); will keep trying",
                            self.socket_path, exc.strerror or exc)
                self.warned = True
            return False
        s.setblocking(False)
        self.sock, self.reader, self.out = s, FrameReader(), bytearray()
        self.pending.clear()
        self.loop.add_reader(s, self._readable)
        self.warned = False
        log.info("connected to the data store at %s", self.socket_path)
        return True

    def _drop(self, why):
        log.warning("lost the data store (%s); will reconnect and republish", why)
        self.loop.remove_reader(self.sock)
        self.sock.close()
        self.sock = None
        self.pending.clear()

    def _request(self, what, op, ignore=(), on_reply=None, **fields):
        if self.sock is None:
            return
        rid = self.next_id
        self.next_id += 1
        fields.update(op=op, id=rid)
        self.pending[rid] = (what, ignore, on_reply)
        self.out += encode(fields)
        self.flush()

    def flush(self):
        while self.sock is not None and self.out:
            try:
                n = self.sock.send(self.out)
            except (BlockingIOError, InterruptedError):
                if len(self.out) > MAX_BACKLOG:
                    self._drop("it is not reading its socket")
                return
            except OSError as exc:
                self._drop(str(exc))
                return
            del self.out[:n]

    def _readable(self):
        try:
            data = self.sock.recv(1 << 16)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._drop(str(exc))
            return
        if not data:
            self._drop("it closed the connection")
            return
        try:
            msgs = self.reader.feed(data)
        except FrameError as exc:
            self._drop("malformed reply: %s" % exc)
            return
        for m in msgs:
            what, ignore, on_reply = self.pending.pop(m.get("id"), ("?", (), None))
            if not m.get("ok", True):
                if m.get("err") not in ignore:
                    log.warning("data store refused %s: %s", what, m.get("msg") or m.get("err"))
            elif on_reply is not None:
                on_reply(m)
        self.flush()

    # -- what rsd publishes --------------------------------------------------------
    def register(self, pid, label):
        self._request("register %d as %s" % (pid, label), "register", pid=pid, label=label)

    def unregister(self, pid):
        self._request("unregister %d" % pid, "unregister", ignore=("ENOENT",), pid=pid)

    def label(self, label, pid, generation, uid):
        self._request("publish " + label_key(label), "publish", key=label_key(label),
                      value=format_label(pid, generation, uid), type="str", overwrite=True, flags=0)

    def drv(self, cls, label, state, generation):
        self._request("publish " + drv_key(cls, label), "publish", key=drv_key(cls, label),
                      value=format_drv(state, generation), type="str", overwrite=True, flags=0)

    def down(self, cls, label, generation, purge=True):
        """Gone for good: drv = down, label key deleted, its own keys purged."""
        self.drv(cls, label, "down", generation)
        self._request("delete " + label_key(label), "delete", ignore=("ENOENT",), key=label_key(label))
        if purge:
            self._request("purge " + label, "purge", label=label)

    def clear_stale(self, live_labels):
        """After rsd (re)starts: services DS still shows but rsd no longer runs.

        Their drv key becomes "down <g>" and their label key goes; their own
        state.<L>.* keys stay (only `rsctl down` purges).
        """
        regex = r"(drv\.[a-z]+|label)\..+"

        def on_list(reply):
            if reply.get("next") is not None:  # the daemon answers in pages: ask for the next one
                self._request("list stale keys", "list", regex=regex, after=reply["next"], on_reply=on_list)
            for e in reply.get("entries", ()):
                if e.get("owner") != "rs":
                    continue
                kind, _, rest = e["key"].partition(".")
                label = rest.split(".", 1)[1] if kind == "drv" and "." in rest else rest
                if label in live_labels:
                    continue
                if kind == "label":
                    self._request("delete stale " + e["key"], "delete", ignore=("ENOENT",), key=e["key"])
                elif kind == "drv" and isinstance(e.get("value"), str) and not e["value"].startswith("down "):
                    gen = e["value"].partition(" ")[2]
                    if gen.isdigit():
                        log.info("%s: no longer running: %s = down", label, e["key"])
                        self._request("publish " + e["key"], "publish", key=e["key"],
                                      value=format_drv("down", int(gen)), type="str", overwrite=True, flags=0)
        self._request("list stale keys", "list", regex=regex, on_reply=on_list)

    def close(self):
        if self.sock is not None:
            self.sock.setblocking(True)
            self.sock.settimeout(2.0)
            try:
                if self.out:
                    self.sock.sendall(self.out)
                # Wait for the answers so that a shutdown's publications land.
                while self.pending:
                    data = self.sock.recv(1 << 16)
                    if not data:
                        break
                    for m in self.reader.feed(data):
                        self.pending.pop(m.get("id"), None)
            except OSError:
                pass
            self.loop.remove_reader(self.sock)
            self.sock.close()
            self.sock = None

