"""The `datastore` daemon: one thread, one epoll loop, group commit.

Each pass of the loop reads every ready client, runs its requests against
the Store, appends the changes to the journal, syncs the journal once, and
only then releases the replies and notifications of that pass, in the
order the changes were made.  Nothing a client sends can block the loop or
grow the daemon without bound: sockets are non-blocking; frames are bounded
and never reserved at their announced size; requests are decoded one at a
time and served only while the client's unread output is under its budget;
notifications to a client that does not read are dropped (with an
"overflow" notice); output and partial input of all clients together have
hard limits, past which the biggest offender is disconnected; and some
connection slots are kept for rsd and root (docs/datastore.md).
"""

import argparse
import collections
import ctypes
import fcntl
import logging
import os
import resource
import selectors
import signal
import socket
import struct
import sys
import time

from libdrv import sdnotify
from libdrv.proctitle import set_process_title
from libdrv.svcstate import REGISTRAR_LABEL
from libdrv.wire import DEFAULT_MAX_FRAME, FrameError, FrameReader, encode

from . import protocol as P
from .journal import Journal
from .store import DEFAULT_QUOTA_BYTES, DEFAULT_QUOTA_KEYS, Caller, Store, check_pid

log = logging.getLogger("datastore")

NOTIFY_VALUE_MAX = 64 << 10      # larger values are announced without their bytes
READ_CHUNK = 256 << 10
LIST_PAGE_BYTES = 256 << 10      # a list reply stops after about this much (one entry at least)
LIST_MAX_LIMIT = 100000
REQUESTS_PER_PASS = 256          # per client, so one pipelining client cannot starve the others
PASS_JOURNAL_BYTES = 8 << 20     # stop taking changes in a pass once this much awaits the sync
DEFAULT_MAX_CLIENTS = 1024
DEFAULT_RESERVED_CLIENTS = 16
DEFAULT_MAX_CLIENTS_PER_UID = 128
DEFAULT_MAX_QUEUE = 4 << 20      # one client's unread output: budget
DEFAULT_MAX_QUEUE_HARD = 16 << 20  # one client's unread output: disconnect
DEFAULT_MAX_OUTPUT = 32 << 20    # all clients' unread output: disconnect the biggest
DEFAULT_MAX_INPUT = 16 << 20     # all clients' partial frames: disconnect the biggest


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
    __slots__ = ("sock", "fd", "reader", "out", "out_bytes", "sent", "held", "held_bytes", "subs",
                 "pid", "uid", "starttime", "privileged", "reading", "dropped", "closed", "next_sub",
                 "requests", "backlog", "in_bytes", "gone")

    def __init__(self, sock, max_frame, pid, uid, privileged):
        self.sock = sock
        self.fd = sock.fileno()
        self.reader = FrameReader(max_frame)
        self.out = collections.deque()   # (frame, is_notification)
        self.out_bytes = 0
        self.sent = 0                    # bytes of out[0] already sent
        self.held = []                   # frames waiting for this pass's commit
        self.held_bytes = 0
        self.subs = {}                   # id -> (pattern, compiled)
        self.reading = True
        self.dropped = 0                 # notifications dropped since overflow
        self.closed = False
        self.next_sub = 1
        self.requests = collections.deque()  # decoded, not yet served (a few at most)
        self.backlog = False             # the reader may hold whole frames not yet decoded
        self.in_bytes = 0                # reader.pending as last counted in Server.input_bytes
        self.gone = False                # dropped: its socket is closed
        self.pid, self.uid, self.privileged = pid, uid, privileged
        self.starttime = proc_starttime(pid)

    @property
    def queued(self):
        return self.held_bytes + self.out_bytes


def peer_creds(sock):
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _gid = struct.unpack("3i", creds)
    return pid, uid


class Server:
    def __init__(self, socket_path, state_dir, registrar_uid=0, max_value=P.DEFAULT_MAX_VALUE,
                 max_clients=DEFAULT_MAX_CLIENTS, reserved_clients=DEFAULT_RESERVED_CLIENTS,
                 max_clients_per_uid=DEFAULT_MAX_CLIENTS_PER_UID, max_queue=DEFAULT_MAX_QUEUE,
                 max_queue_hard=DEFAULT_MAX_QUEUE_HARD, max_output=DEFAULT_MAX_OUTPUT,
                 max_input=DEFAULT_MAX_INPUT, quota_keys=DEFAULT_QUOTA_KEYS,
                 quota_bytes=DEFAULT_QUOTA_BYTES, fsync=True, socket_mode=0o666):
        self.socket_path = socket_path
        self.state_dir = state_dir
        self.registrar_uid = registrar_uid
        self.max_clients = max_clients
        self.reserved_clients = min(reserved_clients, max_clients)
        self.max_clients_per_uid = max_clients_per_uid
        self.max_frame = max(DEFAULT_MAX_FRAME, max_value + (64 << 10))
        self.max_queue = max_queue
        # A client may always have one full reply queued beyond its budget.
        self.max_queue_hard = max(max_queue_hard, max_queue + self.max_frame)
        self.max_output = max(max_output, self.max_queue_hard)
        self.max_input = max(max_input, 2 * (self.max_frame + READ_CHUNK))
        self.socket_mode = socket_mode
        self.store = Store(max_value, quota_keys, quota_bytes)
        self.journal = Journal(state_dir, fsync=fsync)
        self.sel = selectors.DefaultSelector()
        self.clients = {}
        self.per_uid = collections.Counter()   # connections per uid
        self.output_bytes = 0            # unread output of all clients (held + queued)
        self.input_bytes = 0             # buffered input of all clients
        self.runnable = set()            # clients with requests to serve
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
        replayed = self.store.replay(self.journal.load())
        # Registrations of processes that died while we were down are void.
        for pid, reg in list(self.store.registry.items()):
            if proc_starttime(pid) != reg.starttime:
                del self.store.registry[pid]
        # Keys squatted in an owned namespace before the trust rules existed
        # would block their rightful writer forever: they go.
        for e in self.store.squatted():
            log.warning("deleting %s: it is owned by %s but its namespace belongs to another label",
                        e.key, e.owner)
            rec = {"o": "del", "k": e.key}
            self.store.apply(rec)
            self.journal.append(rec)
        self.journal.commit()
        log.info("replayed %d records: %d keys, %d registrations", replayed,
                 len(self.store.entries), len(self.store.registry))
        self._raise_fd_limit()
        self._listen()

    def _raise_fd_limit(self):
        # One descriptor per client: the soft limit (often 1024) must not be
        # what refuses rsd, so take what the hard limit allows.
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = self.max_clients + 64
        if hard != resource.RLIM_INFINITY:
            want = min(want, hard)
        if soft != resource.RLIM_INFINITY and soft < want:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
                soft = want
            except (ValueError, OSError):
                pass
        if soft != resource.RLIM_INFINITY and self.max_clients > soft - 64:
            self.max_clients = max(1, soft - 64)
            self.reserved_clients = min(self.reserved_clients, self.max_clients)
            log.warning("only %d file descriptors allowed: serving at most %d clients "
                        "(raise LimitNOFILE to allow --max-clients)", soft, self.max_clients)

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
            if self.runnable:
                timeout = 0  # requests left over from the last pass
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
                if client.gone:
                    continue  # dropped earlier in this pass (its fd may be reused)
                if mask & selectors.EVENT_WRITE:
                    self._flush(client)
                if mask & selectors.EVENT_READ and not client.closed:
                    self._read(client)
            self._serve()
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
            try:
                pid, uid = peer_creds(sock)
            except OSError:
                sock.close()
                continue
            privileged = uid in (0, self.registrar_uid)
            why = self._refusal(uid, privileged)
            if why is not None:
                try:
                    sock.send(encode({"ok": False, "err": P.E_BUSY, "msg": why}))
                except OSError:
                    pass
                sock.close()
                continue
            client = Client(sock, self.max_frame, pid, uid, privileged)
            self.clients[client.fd] = client
            self.per_uid[uid] += 1
            self.sel.register(sock, selectors.EVENT_READ, client)

    def _refusal(self, uid, privileged):
        """Why a new connection from uid is refused, or None."""
        n = len(self.clients)
        if n >= self.max_clients:
            return ("too many clients (%d, datastore --max-clients); try again later"
                    % self.max_clients)
        if privileged:
            return None
        if n >= self.max_clients - self.reserved_clients:
            return ("too many clients: the %d unreserved connection slots are in use (%d more are kept "
                    "for rsd and root); try again later" % (self.max_clients - self.reserved_clients,
                                                           self.reserved_clients))
        if self.per_uid[uid] >= self.max_clients_per_uid:
            return ("too many clients from uid %d (%d, datastore --max-clients-per-uid); close some "
                    "connections" % (uid, self.max_clients_per_uid))
        return None

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
            client.reader.feed(data, 0)  # decoded later, one request at a time
        except FrameError as exc:
            self._hold(client, {"ok": False, "err": P.E_BADREQ, "msg": "malformed frame: %s" % exc})
            client.closed = True
            self._count_input(client)
            return
        client.backlog = True
        self._count_input(client)
        self.runnable.add(client)
        self._update_interest(client)
        if self.input_bytes > self.max_input:
            self._shed_input()

    def _count_input(self, client):
        n = client.reader.pending
        self.input_bytes += n - client.in_bytes
        client.in_bytes = n

    def _shed_input(self):
        # Partial frames of all clients are over their limit: hang up on
        # whoever holds the most (a frame is never buffered before its bytes
        # arrive, so this is what a many-connection attack must pay).
        while self.input_bytes > self.max_input:
            victim = _biggest(self.clients.values(), "in_bytes")
            if victim is None:
                break
            log.warning("pid %d uid %d: %d bytes of unfinished requests while all clients' input is "
                        "over %d; disconnecting it", victim.pid, victim.uid, victim.in_bytes,
                        self.max_input)
            self._refuse_and_drop(victim, P.E_BUSY,
                                  "too much unfinished input buffered in the data store (%d bytes from "
                                  "this connection); send whole frames promptly" % victim.in_bytes)

    def _serve(self):
        """Serve decoded requests of runnable clients while their budgets allow."""
        for client in list(self.runnable):
            self.runnable.discard(client)
            served = 0
            while (not client.closed and served < REQUESTS_PER_PASS
                   and client.queued < self.max_queue
                   and self.journal.pending_bytes < PASS_JOURNAL_BYTES):
                if not client.requests:
                    if not client.backlog:
                        break
                    try:
                        msgs = client.reader.feed(b"", 16)
                    except FrameError as exc:
                        # The stream is out of step: say why, then hang up.
                        self._hold(client, {"ok": False, "err": P.E_BADREQ,
                                            "msg": "malformed frame: %s" % exc})
                        client.closed = True
                        client.backlog = False
                        break
                    finally:
                        self._count_input(client)
                    client.backlog = len(msgs) == 16
                    if not msgs:
                        break
                    client.requests.extend(msgs)
                self._hold(client, self._handle(client, client.requests.popleft()))
                served += 1
            if client.closed:
                continue
            if ((client.requests or client.backlog) and client.queued < self.max_queue
                    and (served >= REQUESTS_PER_PASS or self.journal.pending_bytes >= PASS_JOURNAL_BYTES)):
                self.runnable.add(client)   # more next pass; others first
            self._update_interest(client)

    # -- requests ------------------------------------------------------------
    def _caller(self, client):
        # A registered process is a service even when it runs as the
        # registrar uid: its code is not trusted with rsd's powers.
        label = self.store.label_of(client.pid, client.starttime)
        registrar = label is None and client.uid == self.registrar_uid
        if registrar:
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
        after = _field(msg, "after", None)
        if after is not None and not isinstance(after, str):
            raise P.RequestError(P.E_BADREQ, "after must be the key a previous list reply gave as next")
        limit = _field(msg, "limit", LIST_MAX_LIMIT)
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= LIST_MAX_LIMIT:
            raise P.RequestError(P.E_BADREQ, "limit must be an integer from 1 to %d" % LIST_MAX_LIMIT)
        # Pages keep every reply within a frame and a client's budget; "next"
        # is the continuation the client sends back as "after".
        entries, nxt = self.store.list_page(caller, regex, after, limit, LIST_PAGE_BYTES)
        reply = {"entries": entries}
        if nxt is not None:
            reply["next"] = nxt
        return reply

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
        reply = {"pid": caller.pid, "uid": caller.uid, "label": caller.label, "registrar": caller.registrar}
        if caller.label is not None:
            keys, used = self.store.usage.get(caller.label, (0, 0))
            reply.update(keys=keys, bytes=used)
            if not caller.registrar:
                reply.update(quota_keys=self.store.quota_keys, quota_bytes=self.store.quota_bytes)
        return reply

    def do_stats(self, client, caller, msg):
        return {"keys": len(self.store.entries), "clients": len(self.clients),
                "registrations": len(self.store.registry), "journal_bytes": self.journal.size,
                "syncs": self.journal.syncs, "output_bytes": self.output_bytes,
                "input_bytes": self.input_bytes}

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
        if event == "set" and self.store.may_retrieve(caller, entry) and entry.vsize <= NOTIFY_VALUE_MAX:
            n["value"] = entry.value
        return n

    def _notify(self, entry, event):
        for client in list(self.clients.values()):  # a client may be dropped on the way
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
    # Every frame for a client is counted from the moment it is built (held
    # for this pass's commit, then queued until the socket takes it), in the
    # client's total and in the daemon's.

    def _hold(self, client, msg, is_notification=False):
        if msg is None or client.closed:
            return
        if is_notification and client.dropped:
            client.dropped += 1  # counted, not built: it will read an overflow notice
            return
        frame = encode(msg)
        size = len(frame)
        if is_notification and (client.queued + size > self.max_queue
                                or self.output_bytes + size > self.max_output):
            self._drop_notifications(client)
            client.dropped += 1
            return
        client.held.append((frame, is_notification))
        client.held_bytes += size
        self.output_bytes += size
        self.dirty.add(client)
        if client.queued > self.max_queue_hard:
            self._overflow(client)
        elif self.output_bytes > self.max_output:
            self._shed_output()

    def _drop_notifications(self, client):
        # The subscriber is too slow: drop its pending notifications (never
        # replies, nor a frame partly sent) and tell it once it catches up.
        keep = collections.deque()
        for i, (f, n) in enumerate(client.out):
            if n and not (i == 0 and client.sent):
                client.dropped += 1
                client.out_bytes -= len(f)
                self.output_bytes -= len(f)
            else:
                keep.append((f, n))
        client.out = keep
        held = []
        for f, n in client.held:
            if n:
                client.dropped += 1
                client.held_bytes -= len(f)
                self.output_bytes -= len(f)
            else:
                held.append((f, n))
        client.held = held

    def _shed_output(self):
        while self.output_bytes > self.max_output:
            victim = _biggest(self.clients.values(), "queued")
            if victim is None:
                break
            self._overflow(victim)

    def _overflow(self, client):
        log.warning("pid %d uid %d: %d bytes of replies and notifications unread; disconnecting it",
                    client.pid, client.uid, client.queued)
        self._refuse_and_drop(client, P.E_OVERFLOW,
                              "overflow: %d bytes of replies and notifications piled up unread (limits: "
                              "%d per client, %d for all); read replies before sending more requests"
                              % (client.queued, self.max_queue_hard, self.max_output))

    def _refuse_and_drop(self, client, code, msg):
        """Discard what the client has pending, try to say why, hang up."""
        if not client.sent:  # mid-frame, a new frame would be garbage to it
            try:
                client.sock.send(encode({"ok": False, "err": code, "msg": msg}))
            except OSError:
                pass
        self._drop(client)

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
            if self.clients.get(client.fd) is not client:
                continue
            client.out.extend(client.held)
            client.out_bytes += client.held_bytes
            client.held.clear()
            client.held_bytes = 0
            self._flush(client)

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
                self.output_bytes += len(notice)
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
                self.output_bytes -= len(frame)
            client.sent = n
            if client.out and n:
                break  # the socket took part of a frame: it is full
        if client.closed and not client.out:
            self._drop(client)
            return
        if (client.requests or client.backlog) and client.queued < self.max_queue:
            self.runnable.add(client)  # drained below its budget: serve it again
        self._update_interest(client)

    def _update_interest(self, client):
        # Read only what can be served now: a client whose output piles up,
        # or whose earlier requests still wait, only slows itself.
        client.reading = (not client.closed and client.queued < self.max_queue
                          and not client.requests and not client.backlog)
        mask = (selectors.EVENT_READ if client.reading else 0) | (selectors.EVENT_WRITE if client.out else 0)
        if mask == 0:
            mask = selectors.EVENT_WRITE  # closing: wait until the last bytes leave
        try:
            self.sel.modify(client.sock, mask, client)
        except (KeyError, ValueError):
            pass

    def _drop(self, client):
        if client.gone:
            return
        client.gone = True
        if self.clients.get(client.fd) is client:
            del self.clients[client.fd]
            self.per_uid[client.uid] -= 1
            if not self.per_uid[client.uid]:
                del self.per_uid[client.uid]
            try:
                self.sel.unregister(client.sock)
            except (KeyError, ValueError):
                pass
            self.output_bytes -= client.queued
            self.input_bytes -= client.in_bytes
        client.out.clear()
        client.held = []
        client.out_bytes = client.held_bytes = client.in_bytes = 0
        client.requests.clear()
        client.backlog = False
        client.closed = True
        client.sock.close()
        self.dirty.discard(client)
        self.runnable.discard(client)


def _biggest(clients, attr):
    """The client holding the most of attr, an unprivileged one if any holds some."""
    holders = [c for c in clients if getattr(c, attr) > 0]
    unprivileged = [c for c in holders if not c.privileged]
    return max(unprivileged or holders, key=lambda c: getattr(c, attr), default=None)


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
    p.add_argument("--max-clients", type=int, default=DEFAULT_MAX_CLIENTS, help="connections at once (default %(default)s)")
    p.add_argument("--reserved-clients", type=int, default=None,
                   help="of those, slots only root and the registrar uid may take "
                        "(default 16, at most a quarter of --max-clients)")
    p.add_argument("--max-clients-per-uid", type=int, default=DEFAULT_MAX_CLIENTS_PER_UID,
                   help="connections one unprivileged uid may hold (default %(default)s)")
    p.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                   help="a client's unread output (bytes) past which its requests wait and its "
                        "notifications are dropped (default 4 MiB)")
    p.add_argument("--max-queue-hard", type=int, default=DEFAULT_MAX_QUEUE_HARD,
                   help="a client's unread output past which it is disconnected (default 16 MiB)")
    p.add_argument("--max-output", type=int, default=DEFAULT_MAX_OUTPUT,
                   help="all clients' unread output past which the client with the most is disconnected (default 32 MiB)")
    p.add_argument("--max-input", type=int, default=DEFAULT_MAX_INPUT,
                   help="all clients' unfinished request bytes past which the biggest sender is disconnected (default 16 MiB)")
    p.add_argument("--quota-keys", type=int, default=DEFAULT_QUOTA_KEYS,
                   help="keys one label may own (default %(default)s; the registrar is exempt)")
    p.add_argument("--quota-bytes", type=int, default=DEFAULT_QUOTA_BYTES,
                   help="bytes of keys and values one label may own (default 8 MiB; the registrar is exempt)")
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
    if a.reserved_clients is None:
        a.reserved_clients = min(DEFAULT_RESERVED_CLIENTS, a.max_clients // 4)
    if not 0 <= a.reserved_clients < a.max_clients:
        p.error("--reserved-clients must be from 0 to --max-clients - 1")
    if a.max_clients_per_uid < 1 or a.quota_keys < 1 or a.quota_bytes < 1:
        p.error("--max-clients-per-uid, --quota-keys and --quota-bytes must be >= 1")
    for name in ("max_queue_hard", "max_output", "max_input"):
        if getattr(a, name) < 4096:
            p.error("--%s must be >= 4096" % name.replace("_", "-"))
    return a


def _return_freed_memory():
    # glibc raises its mmap threshold after large frees, so 1 MiB frames
    # would end up in the heap and keep the daemon's RSS high after a burst.
    # A fixed threshold keeps big buffers in mmap: freed means returned.
    try:
        ctypes.CDLL(None).mallopt(-3, 128 << 10)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc: its own policy applies


def main(argv=None):
    a = parse_args(argv)
    set_process_title("datastore")  # `pidof datastore`
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO,
                        format="datastore: %(levelname)s %(message)s", stream=sys.stderr)
    _return_freed_memory()
    server = Server(a.socket, a.state_dir, registrar_uid=a.registrar_uid, max_value=a.max_value,
                    max_clients=a.max_clients, reserved_clients=a.reserved_clients,
                    max_clients_per_uid=a.max_clients_per_uid, max_queue=a.max_queue,
                    max_queue_hard=a.max_queue_hard, max_output=a.max_output, max_input=a.max_input,
                    quota_keys=a.quota_keys, quota_bytes=a.quota_bytes, fsync=not a.no_fsync)
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
