"""The `datastore` daemon: one thread, one epoll loop, group commit.

Each pass of the loop reads every ready client, runs its requests against
the Store, appends the changes to the journal, syncs the journal once, and
only then releases the replies and notifications of that pass, in the
order the changes were made.  Nothing a client sends can block the loop:
sockets are non-blocking, frames are bounded, and a client that does not
read has its notifications dropped (with an "overflow" notice) and its
requests paused, never anyone else's.
"""

import argparse
import collections
import errno
import fcntl
import logging
import os
import selectors
import signal
import socket
import struct
import sys
import time

from libdrv import sdnotify
from libdrv.wire import DEFAULT_MAX_FRAME, FrameError, FrameReader, encode

from . import protocol as P
from .journal import Journal
from .store import Caller, Store, check_pid

log = logging.getLogger("datastore")

REGISTRAR_LABEL = "rs"
NOTIFY_VALUE_MAX = 64 << 10
READ_CHUNK = 256 << 10


def proc_starttime(pid):
    """Kernel start time of pid (clock ticks since boot), or None if gone.

    Stored with every registration so that a recycled pid never inherits a
    dead service's label.
    """
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            data = f.read()
    except OSError:
        return None
    # comm (field 2) may hold spaces and ')'; fields after the last ')' are fixed.
    rest = data[data.rfind(b")") + 2:].split()
    try:
        return int(rest[19])
    except (IndexError, ValueError):
        return None


class Client:
    __slots__ = ("sock", "fd", "reader", "out", "out_bytes", "sent", "held", "subs",
                 "pid", "uid", "starttime", "reading", "dropped", "closed", "next_sub")

    def __init__(self, sock, max_frame):
        self.sock = sock
        self.fd = sock.fileno()
        self.reader = FrameReader(max_frame)
        self.out = collections.deque()   # (frame, is_notification)
        self.out_bytes = 0
        self.sent = 0                    # bytes of out[0] already sent
        self.held = []                   # frames waiting for this pass's commit
        self.subs = {}                   # id -> (pattern, compiled)
        self.reading = True
        self.dropped = 0                 # notifications dropped since overflow
        self.closed = False
        self.next_sub = 1
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        self.pid, self.uid, _gid = struct.unpack("3i", creds)
        self.starttime = proc_starttime(self.pid)


class Server:
    def __init__(self, socket_path, state_dir, registrar_uid=0, max_value=P.DEFAULT_MAX_VALUE,
                 max_clients=1024, max_queue=8 << 20, fsync=True, socket_mode=0o666):
        self.socket_path = socket_path
        self.state_dir = state_dir
        self.registrar_uid = registrar_uid
        self.max_clients = max_clients
        self.max_queue = max_queue
        self.max_frame = max(DEFAULT_MAX_FRAME, max_value + (64 << 10))
        self.socket_mode = socket_mode
        self.store = Store(max_value)
        self.journal = Journal(state_dir, fsync=fsync)
        self.sel = selectors.DefaultSelector()
        self.clients = {}
        self.dirty = set()               # clients with held or queued output
        self.running = True
        self.listener = None
        self._lock_fd = None

    # -- start-up -----------------------------------------------------------
    def open(self):
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        self._lock_fd = os.open(os.path.join(self.state_dir, "ds.lock"),
                                os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit("datastore: another datastore uses %s; stop it first" % self.state_dir)
        replayed = 0
        for rec in self.journal.load():
            self.store.apply(rec)
            replayed += 1
        # Registrations of processes that died while we were down are void.
        for pid, reg in list(self.store.registry.items()):
            if proc_starttime(pid) != reg.starttime:
                del self.store.registry[pid]
        log.info("replayed %d records: %d keys, %d registrations", replayed,
                 len(self.store.entries), len(self.store.registry))
        self._listen()

    def _listen(self):
        path = self.socket_path
        os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
        if os.path.exists(path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # stale socket of a dead daemon
            else:
                raise SystemExit("datastore: a daemon already listens on %s" % path)
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        tmp = path + ".%d.tmp" % os.getpid()
        sock.bind(tmp)
        os.chmod(tmp, self.socket_mode)
        os.rename(tmp, path)  # appear atomically with the right mode
        sock.listen(512)
        self.listener = sock
        self.sel.register(sock, selectors.EVENT_READ, None)
        # Signals wake the loop through this pipe (select would otherwise resume).
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        self.sel.register(self._wake_r, selectors.EVENT_READ, "wakeup")

    # -- main loop ----------------------------------------------------------
    def serve_forever(self):
        sdnotify.notify("READY=1", "STATUS=serving %s" % self.socket_path)
        wd = sdnotify.watchdog_interval()
        next_wd = time.monotonic() + wd if wd else None
        while self.running:
            timeout = None if next_wd is None else max(0.0, next_wd - time.monotonic())
            try:
                events = self.sel.select(timeout)
            except InterruptedError:
                events = []
            for key, mask in events:
                client = key.data
                if client is None:
                    self._accept()
                    continue
                if client == "wakeup":
                    try:
                        os.read(self._wake_r, 512)
                    except BlockingIOError:
                        pass
                    continue
                if mask & selectors.EVENT_WRITE:
                    self._flush(client)
                if mask & selectors.EVENT_READ and not client.closed:
                    self._read(client)
            self._commit_and_release()
            if self.journal.want_compaction(self.store.live_bytes):
                self.journal.compact(list(self.store.live_records()))
            if next_wd is not None and time.monotonic() >= next_wd:
                sdnotify.notify("WATCHDOG=1")
                next_wd = time.monotonic() + wd
        self.close()

    def stop(self, *_):
        self.running = False

    def close(self):
        for c in list(self.clients.values()):
            self._drop(c)
        if self.listener is not None:
            self.sel.unregister(self.listener)
            self.listener.close()
            try:
                os.unlink(self.socket_path)
            except FileNotFoundError:
                pass
            self.listener = None
        self.journal.close()

    def _accept(self):
        for _ in range(64):
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: keep serving the others
                log.warning("accept failed: %s", exc)
                return
            sock.setblocking(False)
            if len(self.clients) >= self.max_clients:
                try:
                    sock.send(encode({"ok": False, "err": P.E_BUSY,
                                      "msg": "too many clients (%d); try again later" % self.max_clients}))
                except OSError:
                    pass
                sock.close()
                continue
            client = Client(sock, self.max_frame)
            self.clients[client.fd] = client
            self.sel.register(sock, selectors.EVENT_READ, client)

    def _read(self, client):
        try:
            data = client.sock.recv(READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(client)
            return
        try:
            msgs = client.reader.feed(data)
        except FrameError as exc:
            # The stream is out of step: say why, then hang up.
            self._hold(client, {"ok": False, "err": P.E_BADREQ, "msg": "malformed frame: %s" % exc})
            client.reading = False
            client.closed = True
            msgs = []
        for msg in msgs:
            self._hold(client, self._handle(client, msg))

    # -- requests ------------------------------------------------------------
    def _caller(self, client):
        registrar = client.uid == self.registrar_uid
        label = self.store.label_of(client.pid, client.starttime)
        if label is None and registrar:
            label = REGISTRAR_LABEL
        return Caller(client.pid, client.uid, label, registrar)

    def _handle(self, client, msg):
        rid = msg.get("id")
        if isinstance(rid, bool) or not isinstance(rid, int):
            rid = None
        op = msg.get("op")
        handler = self.HANDLERS.get(op) if isinstance(op, str) else None
        try:
            if handler is None:
                raise P.RequestError(P.E_BADREQ, "unknown operation %r; valid: %s"
                                     % (op, ", ".join(sorted(self.HANDLERS))))
            reply = handler(self, client, self._caller(client), msg) or {}
            reply["ok"] = True
        except _AlreadyReplied:
            return None
        except P.RequestError as exc:
            reply = {"ok": False, "err": exc.code, "msg": exc.msg}
        except (KeyError, TypeError, ValueError) as exc:
            reply = {"ok": False, "err": P.E_BADREQ, "msg": "bad %s request: %s" % (op, exc)}
        reply["id"] = rid
        return reply

    def do_publish(self, client, caller, msg):
        value = _field(msg, "value", None)
        vtype = _field(msg, "type", None)
        if vtype is None:
            vtype = P.infer_type(value)
        entry, rec = self.store.publish(caller, _field(msg, "key"), vtype, value,
                                        bool(_field(msg, "overwrite", False)), _field(msg, "flags", 0))
        self.journal.append(rec)
        self._notify(entry, "set")

    def do_retrieve(self, client, caller, msg):
        e = self.store.retrieve(caller, _field(msg, "key"))
        return {"key": e.key, "type": e.type, "value": e.value, "owner": e.owner, "flags": e.flags}

    def do_delete(self, client, caller, msg):
        entry, rec = self.store.delete(caller, _field(msg, "key"))
        self.journal.append(rec)
        self._notify(entry, "delete")

    def do_list(self, client, caller, msg):
        regex = P.compile_regex(_field(msg, "regex", ".*"))
        out = []
        for e in self.store.entries.values():
            if regex.fullmatch(e.key) and self.store.may_subscribe(caller, e):
                item = {"key": e.key, "type": e.type, "owner": e.owner, "flags": e.flags}
                if self.store.may_retrieve(caller, e):
                    item["value"] = e.value
                out.append(item)
        out.sort(key=lambda i: i["key"])
        return {"entries": out}

    def do_subscribe(self, client, caller, msg):
        pattern = _field(msg, "regex")
        regex = P.compile_regex(pattern)
        if len(client.subs) >= P.MAX_SUBS_PER_CLIENT:
            raise P.RequestError(P.E_BUSY, "at most %d subscriptions per connection" % P.MAX_SUBS_PER_CLIENT)
        sub = client.next_sub
        client.next_sub += 1
        client.subs[sub] = (pattern, regex)
        if _field(msg, "initial", False):
            # The reply goes first, then one "set" per existing match, so the
            # client knows the sub id before its notifications arrive.
            reply = {"ok": True, "sub": sub, "id": msg.get("id")}
            self._hold(client, reply)
            for e in sorted(self.store.entries.values(), key=lambda e: e.key):
                if regex.fullmatch(e.key) and self.store.may_subscribe(caller, e):
                    self._hold(client, self._notification(caller, sub, e, "set", initial=True), True)
            raise _AlreadyReplied
        return {"sub": sub}

    def do_unsubscribe(self, client, caller, msg):
        sub = _field(msg, "sub")
        if client.subs.pop(sub, None) is None:
            raise P.RequestError(P.E_NOENT, "no subscription %r on this connection" % (sub,))

    def do_register(self, client, caller, msg):
        pid = check_pid(_field(msg, "pid"))
        start = proc_starttime(pid)
        if start is None:
            raise P.RequestError(P.E_NOENT, "no process %d" % pid)
        self.journal.append(self.store.register(caller, pid, start, _field(msg, "label")))

    def do_unregister(self, client, caller, msg):
        self.journal.append(self.store.unregister(caller, check_pid(_field(msg, "pid"))))

    def do_purge(self, client, caller, msg):
        removed = self.store.purge(caller, _field(msg, "label"))
        for entry, rec in removed:
            self.journal.append(rec)
            self._notify(entry, "delete")
        return {"count": len(removed)}

    def do_whoami(self, client, caller, msg):
        return {"pid": caller.pid, "uid": caller.uid, "label": caller.label, "registrar": caller.registrar}

    def do_stats(self, client, caller, msg):
        return {"keys": len(self.store.entries), "clients": len(self.clients),
                "registrations": len(self.store.registry), "journal_bytes": self.journal.size,
                "syncs": self.journal.syncs}

    HANDLERS = {
        "publish": do_publish, "retrieve": do_retrieve, "delete": do_delete, "list": do_list,
        "subscribe": do_subscribe, "unsubscribe": do_unsubscribe, "register": do_register,
        "unregister": do_unregister, "purge": do_purge, "whoami": do_whoami, "stats": do_stats,
    }

    # -- notifications -------------------------------------------------------
    def _notification(self, caller, sub, entry, event, initial=False):
        n = {"ev": event, "sub": sub, "key": entry.key, "type": entry.type, "owner": entry.owner}
        if initial:
            n["initial"] = True
        if event == "set" and self.store.may_retrieve(caller, entry):
            if entry.type != "bytes" or len(entry.value) <= NOTIFY_VALUE_MAX:
                n["value"] = entry.value
        return n

    def _notify(self, entry, event):
        for client in self.clients.values():
            if not client.subs or client.closed:
                continue
            caller = None
            for sub, (_, regex) in client.subs.items():
                if regex.fullmatch(entry.key):
                    caller = caller or self._caller(client)
                    if self.store.may_subscribe(caller, entry):
                        self._hold(client, self._notification(caller, sub, entry, event), True)
                    break  # one notification per change per connection

    # -- output ----------------------------------------------------------------
    def _hold(self, client, msg, is_notification=False):
        if msg is None:
            return
        client.held.append((encode(msg), is_notification))
        self.dirty.add(client)

    def _commit_and_release(self):
        if self.journal.dirty:
            try:
                self.journal.commit()
            except OSError as exc:
                # Crash-only: the changes of this pass are in memory but not on
                # disk.  Exit without acknowledging them; a restart replays the
                # journal, which holds exactly what was acknowledged.
                log.critical("journal write failed (%s); exiting without acknowledging "
                             "unsynced changes. Free space in %s and restart datastore.",
                             exc, self.state_dir)
                os._exit(75)
        dirty, self.dirty = self.dirty, set()
        for client in dirty:
            if client.fd not in self.clients:
                continue
            for frame, is_notif in client.held:
                self._enqueue(client, frame, is_notif)
            client.held.clear()
            self._flush(client)

    def _enqueue(self, client, frame, is_notif):
        if is_notif and client.dropped:
            client.dropped += 1
            return
        if is_notif and client.out_bytes + len(frame) > self.max_queue:
            # The subscriber is too slow: drop its queued notifications (not
            # replies) and tell it once it catches up, so it can re-read.
            keep = collections.deque()
            first = True
            for f, n in client.out:
                if n and not (first and client.sent):
                    client.dropped += 1
                    client.out_bytes -= len(f)
                else:
                    keep.append((f, n))
                first = False
            client.out = keep
            client.dropped += 1
            return
        client.out.append((frame, is_notif))
        client.out_bytes += len(frame)

    def _flush(self, client):
        sock = client.sock
        while True:
            if not client.out and client.dropped:
                # Caught up after an overflow: say how much was lost.
                notice = encode({"ev": "overflow", "dropped": client.dropped,
                                 "msg": "notifications were dropped because this client read too "
                                        "slowly; list the keys again to resynchronise"})
                client.dropped = 0
                client.out.append((notice, False))
                client.out_bytes += len(notice)
            if not client.out:
                break
            # Coalesce queued frames into one send: one syscall per pass, and a
            # reader sees a reply together with the notifications behind it.
            chunk, size = [], 0
            for frame, _ in client.out:
                chunk.append(frame)
                size += len(frame)
                if size >= 256 << 10:
                    break
            data = chunk[0] if len(chunk) == 1 else b"".join(chunk)
            try:
                n = sock.send(memoryview(data)[client.sent:])
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._drop(client)
                return
            n += client.sent
            while client.out and n >= len(client.out[0][0]):
                frame = client.out.popleft()[0]
                n -= len(frame)
                client.out_bytes -= len(frame)
            client.sent = n
            if client.out and n:
                break  # the socket took part of a frame: it is full
        if client.closed and not client.out:
            self._drop(client)
            return
        self._update_interest(client)

    def _update_interest(self, client):
        # Stop reading from a client whose replies pile up: it only slows itself.
        client.reading = not client.closed and client.out_bytes < self.max_queue
        mask = (selectors.EVENT_READ if client.reading else 0) | (selectors.EVENT_WRITE if client.out else 0)
        if mask == 0:
            mask = selectors.EVENT_WRITE  # closing: wait until the last bytes leave
        try:
            self.sel.modify(client.sock, mask, client)
        except (KeyError, ValueError):
            pass

    def _drop(self, client):
        if client.fd in self.clients:
            del self.clients[client.fd]
            try:
                self.sel.unregister(client.sock)
            except (KeyError, ValueError):
                pass
        client.closed = True
        client.sock.close()
        self.dirty.discard(client)


class _AlreadyReplied(Exception):
    """A handler that queued its own reply (subscribe with INITIAL)."""


def _field(msg, name, *default):
    if name in msg:
        return msg[name]
    if default:
        return default[0]
    raise P.RequestError(P.E_BADREQ, "missing field %r" % name)


# -- command line ------------------------------------------------------------

def default_paths(env=os.environ):
    runtime = env.get("RSD_RUNTIME_DIR", "/run/rsd")
    state = env.get("RSD_STATE_DIR", "/var/lib/rsd")
    sock = env.get("RSD_DS_SOCKET", os.path.join(runtime, "ds.sock"))
    return runtime, state, sock


def parse_args(argv=None):
    runtime, state, sock = default_paths()
    p = argparse.ArgumentParser(prog="datastore", description="rsd data store daemon (DS)")
    p.add_argument("--runtime-dir", default=None, help="directory for the socket (env RSD_RUNTIME_DIR; default /run/rsd)")
    p.add_argument("--state-dir", default=None, help="state directory; the journal lives in STATE/ds (env RSD_STATE_DIR; default /var/lib/rsd)")
    p.add_argument("--socket", default=None, help="socket path (env RSD_DS_SOCKET; default RUNTIME/ds.sock)")
    p.add_argument("--registrar-uid", type=int, default=0, help="uid allowed to register labels and purge (default 0: rsd runs as root)")
    p.add_argument("--max-value", type=int, default=P.DEFAULT_MAX_VALUE, help="largest value in bytes (default 1 MiB)")
    p.add_argument("--max-clients", type=int, default=1024)
    p.add_argument("--max-queue", type=int, default=8 << 20, help="bytes queued to one client before its notifications are dropped")
    p.add_argument("--no-fsync", action="store_true", help="do not fsync the journal (UNSAFE: acknowledged writes may be lost on power failure)")
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    if a.runtime_dir is not None and a.socket is None:
        a.socket = os.path.join(a.runtime_dir, "ds.sock")
    a.socket = a.socket or sock
    a.state_dir = os.path.join(a.state_dir or state, "ds")
    if a.max_value < 1 or a.max_value > (64 << 20):
        p.error("--max-value must be between 1 and 67108864")
    if a.max_clients < 1 or a.max_queue < 4096:
        p.error("--max-clients must be >= 1 and --max-queue >= 4096")
    return a


def main(argv=None):
    a = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO,
                        format="datastore: %(levelname)s %(message)s", stream=sys.stderr)
    server = Server(a.socket, a.state_dir, registrar_uid=a.registrar_uid, max_value=a.max_value,
                    max_clients=a.max_clients, max_queue=a.max_queue, fsync=not a.no_fsync)
    try:
        server.open()
    except OSError as exc:
        print("datastore: cannot start: %s" % exc, file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, server.stop)
    signal.signal(signal.SIGINT, server.stop)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    log.info("listening on %s, state in %s", a.socket, a.state_dir)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
