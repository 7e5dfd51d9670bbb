"""Adopting the spawners (and running incarnations) a dead rsd left behind.

A spawner runs the driver's import-time code, so a hostile driver controls
its spawner: adoption is a trust boundary.  A new rsd rebuilds each service
from its own root-owned state (spawners.json: spec, counts, the spawner's
pid, /proc start time, uid and gid; services.d and services.json are
re-read after) and takes from a spawner only what it can check:

  - that it is the recorded process: it reached RUNTIME/adopt/<label>.sock
    (root:gid 0660, made for that spawner only), with the SO_PEERCRED pid,
    uid and gid recorded, and a pidfd on that pid shows the recorded start
    time (rsd/table.py);
  - the descriptors it hands back: the listening socket must be an AF_UNIX
    SOCK_STREAM socket listening on the service's path, the control channel
    an AF_UNIX stream socket, both made by root (SO_PEERCRED);
  - the generation: an int no greater than generations.json's;
  - its incarnation's pid: a live child of that spawner, with the service's
    uid, held by a pidfd from then on.

Anything else is refused: the spawner is killed (it is the recorded one,
so that is safe) and the service starts afresh.  What happens to an adopted
service next is decided by rsd/manager.py (Event.ADOPTED).
"""

import dataclasses
import logging
import os
import signal
import socket
import struct

from libdrv.channel import Channel
from libdrv.loop import monotonic
from libdrv.wire import decode_body
from rsd import service
from rsd.manager import Event, Svc
from rsd.spawn import Spawner, open_listen_socket, open_process, pidfd_ended

log = logging.getLogger("rsd")

ADOPT_WAIT = 3.0  # seconds a new rsd waits for the spawners of its predecessor


class Refused(Exception):
    """An adoption request rsd will not take: the text says why."""


class Adopter:
    def __init__(self, loop, paths, table, manager):
        self.loop = loop
        self.paths = paths
        self.table = table
        self.manager = manager
        self.socks = {}  # label -> its adoption socket, while rsd waits for that spawner
        # The spawners a previous rsd left, verified to be those processes: label -> SpawnerRecord.
        self.waiting = table.saved_spawners()

    def open(self):
        """One adoption socket per recorded spawner: RUNTIME/adopt/<label>.sock, root:gid 0660.

        Only processes with the service's gid can even connect, and each
        socket takes only that one service's spawner.
        """
        d = self.paths.adopt_dir
        for name in os.listdir(d):  # a dead predecessor's
            try:
                os.unlink(os.path.join(d, name))
            except OSError as exc:
                log.warning("cannot remove %s: %s", os.path.join(d, name), exc)
        for label, rec in list(self.waiting.items()):
            path = self.paths.adopt_socket(label)
            tmp = path + ".new"
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
            old = os.umask(0o177)  # never world-connectable, not even between bind and chmod
            try:
                sock.bind(tmp)
            finally:
                os.umask(old)
            os.chown(tmp, 0, rec.gid)
            os.chmod(tmp, 0o660)
            sock.listen(4)
            os.rename(tmp, path)  # its spawner finds it only once it may connect
            sock.setblocking(False)
            self.socks[label] = sock
            self.loop.add_reader(sock, self._on_connect, label)

    def close(self):
        for label in list(self.socks):
            self._close(label)

    def _close(self, label):
        sock = self.socks.pop(label, None)
        if sock is None:
            return
        self.loop.remove_reader(sock)
        sock.close()
        try:
            os.unlink(self.paths.adopt_socket(label))
        except OSError:
            pass

    def wait_for_predecessor(self):
        """Run the loop until every recorded spawner came back, is gone, or ADOPT_WAIT passed."""
        if not self.waiting:
            return
        log.info("waiting for %d spawners of the previous rsd", len(self.waiting))
        deadline = monotonic() + ADOPT_WAIT
        while self.waiting and monotonic() < deadline:
            self.loop.run_once(0.05)
            for rec in [r for r in self.waiting.values() if pidfd_ended(r.pidfd)]:
                del self.waiting[rec.label]
                log.warning("%s: its spawner (pid %d) is gone; starting afresh", rec.label, rec.pid)
                rec.close()
        for rec in self.waiting.values():
            # Killed, so that it and a fresh copy never run side by side.
            log.warning("%s: its spawner (pid %d) did not come back; stopped, starting afresh",
                        rec.label, rec.pid)
            _kill(rec)
        self.waiting.clear()
        self.close()  # nobody else may come in later

    def _on_connect(self, label):
        try:
            conn, _ = self.socks[label].accept()
        except (BlockingIOError, InterruptedError, KeyError):
            return
        pid, uid, gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        rec = self.waiting.get(label)
        if rec is None or (pid, uid, gid) != (rec.pid, rec.uid, rec.gid) or pidfd_ended(rec.pidfd):
            log.warning("%s: adoption request from pid %d uid %d gid %d, which is not its spawner: refused",
                        label, pid, uid, gid)
            conn.close()
            return
        conn.settimeout(2.0)
        try:
            data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 4)
        except OSError as exc:
            log.warning("%s: adoption request from its spawner (pid %d) failed: %s", rec.label, pid, exc)
            conn.close()
            return
        del self.waiting[rec.label]
        self._close(label)
        wrapped = {}  # fd -> the socket object that owns it now
        try:
            self._adopt(rec, conn, data, fds, wrapped)
        except Refused as exc:
            log.error("%s: cannot adopt its spawner (pid %d): %s; it is stopped, starting afresh",
                      rec.label, pid, exc)
            for fd in fds:
                if fd in wrapped:
                    wrapped[fd].close()
                else:
                    os.close(fd)
            conn.close()
            _kill(rec)

    def _adopt(self, rec, conn, data, fds, wrapped):
        label = rec.label
        saved = rec.saved
        try:
            msg = decode_body(data[4:])
        except (ValueError, IndexError, TypeError) as exc:
            raise Refused("its message is not a wire frame (%s)" % exc) from None
        if not isinstance(msg, dict) or msg.get("op") != "adopt":
            raise Refused("it did not send an adoption request")
        if label in self.manager.services:
            raise Refused("%s is running already" % label)
        spec = self._spec(rec)
        svc_uid, gid = self.table.ids_for(spec)
        if (svc_uid, gid) != (rec.uid, rec.gid):
            raise Refused("it runs as %d:%d, the service as %d:%d" % (rec.uid, rec.gid, svc_uid, gid))
        generation = msg.get("generation")
        if not _is_int(generation) or not 0 <= generation <= self.table.generation(label):
            raise Refused("it names generation %r; the last one rsd started is %d"
                          % (generation, self.table.generation(label)))
        names = msg.get("fds")
        if not isinstance(names, list) or not all(n in (None, "control", "listen") for n in names):
            raise Refused("its descriptors are not named control/listen")
        names = [n for n in names if n]
        if len(names) != len(fds) or len(set(names)) != len(names):
            raise Refused("it sent %d descriptors for %s" % (len(fds), names or "none"))
        named = dict(zip(names, fds))
        listen = _listening_socket(named.get("listen"), self.paths.listen_path(label), wrapped)
        ctl = _stream_socket(named.get("control"), wrapped)
        child = claimed = msg.get("child")
        child_pidfd = None
        if child is not None:
            child_pidfd = self._child(rec, child)
            if child_pidfd is None:
                child = None  # it ended while no rsd ran: start the next one
            elif (self.manager.cgroups is not None
                  and child not in self.manager.cgroups.service(label).procs()):
                # The predecessor died between its spawn and its placement: it waits, unplaced,
                # for a byte that will never come, and must not run outside its cgroup.
                log.warning("%s: incarnation %d was never placed in its cgroup: killed, a new one starts",
                            label, child)
                signal.pidfd_send_signal(child_pidfd, signal.SIGKILL)
                os.close(child_pidfd)
                child_pidfd, child = None, None
        # Everything checked: from here on it is ours.
        if listen is None:  # it never spawned: rsd died before its first incarnation
            listen = open_listen_socket(self.paths.listen_path(label), rec.gid)
        if child is None and ctl is not None:
            ctl.close()
            ctl = None
        svc = Svc(spec, rec.uid, rec.gid, bool(saved.get("from_file")))
        if self.manager.cgroups is not None:  # where the predecessor put it
            svc.cgroup = self.manager.cgroups.service(label)
        svc.restarts = _count(saved.get("restarts"))
        svc.restarts_total = _count(saved.get("restarts_total"))
        svc.ever_ready = bool(saved.get("ever_ready", True))
        svc.generation = generation
        svc.listen = listen
        if child is None:
            svc.last_pid = claimed  # its "exited" report, queued by the spawner, is old news
        conn.setblocking(False)
        sp = Spawner.adopted(label, spec.program_kind, spec.program, rec.uid, rec.gid, conn, rec.pid,
                             rec.pidfd, rec.start_time)
        rec.pidfd = None  # the Spawner holds it now
        self.manager.services[label] = svc
        self.manager.watch_spawner(svc, sp)
        log.info("%s: adopted (pid %s, generation %d) from the previous rsd", label, child, svc.generation)
        self.table.save_spawners()
        if child is not None:
            svc.pid, svc.pidfd = child, child_pidfd
            if ctl is not None:
                ctl.setblocking(False)
                svc.ctl = Channel(ctl)
                self.manager.watch_control(svc)
            svc.last_alive = monotonic()
        self.manager.on_event(svc, Event.ADOPTED, child=child)

    def _spec(self, rec):
        """The service as rsd last ran it (its own spawners.json), checked like a new one."""
        data = rec.saved.get("spec")
        if not isinstance(data, dict) or data.get("label") != rec.label:
            raise Refused("spawners.json has no description of %s" % rec.label)
        data = dict(data)
        source = data.pop("source", "rsctl up")
        try:
            spec = service.from_dict(data, source=source, policy_dir=self.paths.policy_dir)
        except service.ConfigError as exc:
            raise Refused(str(exc)) from None
        return dataclasses.replace(spec, source=source)

    def _child(self, rec, child):
        """A pidfd on the incarnation the spawner names, if it is one; None if it has ended."""
        try:
            pidfd, info = open_process(child)
        except ProcessLookupError:
            log.warning("%s: its incarnation (pid %s) ended while no rsd ran; starting the next one",
                        rec.label, child)
            return None
        except (OSError, ValueError) as exc:
            raise Refused("it names incarnation %r, which rsd cannot check: %s" % (child, exc)) from None
        if info.ppid != rec.pid or info.uids != (rec.uid,) * 4:
            os.close(pidfd)
            raise Refused("it names pid %d as its incarnation, which is not its child with uid %d"
                          % (child, rec.uid))
        return pidfd


def _kill(rec):
    """Kill a recorded spawner through its pidfd (never by pid: that may be another process now)."""
    try:
        signal.pidfd_send_signal(rec.pidfd, signal.SIGKILL)
    except OSError:
        pass
    rec.close()


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _count(v):
    return v if _is_int(v) and v >= 0 else 0


def _socket_from(fd, wrapped):
    try:
        s = socket.socket(fileno=fd)
    except OSError:
        raise Refused("descriptor %d it sent is not a socket" % fd) from None
    wrapped[fd] = s
    return s


def _made_by_root(s):
    """True if a root process made s: SO_PEERCRED of a listening socket names who
    called listen(), of a socketpair end who created the pair.  A spawner
    cannot make such a socket; it can only hand back those rsd gave it."""
    _, uid, _ = struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return uid == 0


def _listening_socket(fd, path, wrapped):
    """The service's listening socket, if fd is one; None if there is no fd."""
    if fd is None:
        return None
    s = _socket_from(fd, wrapped)
    try:
        ok = (s.family == socket.AF_UNIX and s.type == socket.SOCK_STREAM
              and s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
              and s.getsockname() == path and _made_by_root(s))
    except OSError:
        ok = False
    if not ok:
        raise Refused("the listening socket it sent is not the one rsd bound to %s" % path)
    return s


def _stream_socket(fd, wrapped):
    """rsd's end of the control channel, if fd is an AF_UNIX stream socket; None if there is no fd."""
    if fd is None:
        return None
    s = _socket_from(fd, wrapped)
    try:
        ok = s.family == socket.AF_UNIX and s.type == socket.SOCK_STREAM and _made_by_root(s)
    except OSError:
        ok = False
    if not ok:
        raise Refused("the control channel it sent is not an AF_UNIX stream socket rsd made")
    return s
