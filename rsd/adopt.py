"""Adopting the spawners (and running incarnations) a dead rsd left behind.

When rsd's channel closes, each spawner connects to RUNTIME_DIR/adopt.sock
every 50 ms; the new rsd accepts only the pids its predecessor recorded in
spawners.json, with the recorded uid, and takes the service over: same pid,
same generation.  What happens to an adopted service next is decided by
rsd/manager.py (Event.ADOPTED).  See docs/rsd.md, "When rsd itself dies".
"""

import dataclasses
import json
import logging
import os
import socket
import struct

from libdrv.channel import Channel
from libdrv.loop import monotonic
from libdrv.wire import decode_body
from rsd import service
from rsd.manager import Event, Svc
from rsd.spawn import Spawner, open_listen_socket
from rsd.table import uid_of

log = logging.getLogger("rsd")

ADOPT_WAIT = 3.0  # seconds a new rsd waits for the spawners of its predecessor


class Adopter:
    def __init__(self, loop, paths, table, manager):
        self.loop = loop
        self.paths = paths
        self.table = table
        self.manager = manager
        self.sock = None
        # Spawners a previous rsd left running: pid -> (label, uid).
        self.adoptable = table.saved_spawners()

    def open(self):
        try:
            os.unlink(self.paths.adopt)
        except FileNotFoundError:
            pass
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.sock.bind(self.paths.adopt)
        os.chmod(self.paths.adopt, 0o666)  # spawners run as their service's uid; checked by SO_PEERCRED
        self.sock.listen(64)
        self.sock.setblocking(False)
        self.loop.add_reader(self.sock, self._on_connect)

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        try:
            os.unlink(self.paths.adopt)
        except OSError:
            pass

    def wait_for_predecessor(self):
        """Run the loop until every recorded spawner came back, is gone, or ADOPT_WAIT passed."""
        if not self.adoptable:
            return
        log.info("waiting for %d spawners of the previous rsd", len(self.adoptable))
        deadline = monotonic() + ADOPT_WAIT
        while self.adoptable and monotonic() < deadline:
            self.loop.run_once(0.05)
            for pid in [p for p, (_, uid) in self.adoptable.items() if uid_of(p) != uid]:
                label = self.adoptable.pop(pid)[0]
                log.warning("%s: its spawner (pid %d) is gone; starting afresh", label, pid)
        for pid, (label, _) in self.adoptable.items():
            log.warning("%s: its spawner (pid %d) did not come back; starting afresh", label, pid)
        self.adoptable.clear()

    def _on_connect(self):
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        pid, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        if pid not in self.adoptable or self.adoptable[pid][1] != uid:
            log.warning("adoption request from pid %d uid %d, which is no spawner of ours: refused", pid, uid)
            conn.close()
            return
        conn.settimeout(2.0)
        try:
            data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 4)
            msg = decode_body(data[4:])
        except (OSError, ValueError) as exc:
            log.warning("adoption request from pid %d failed: %s", pid, exc)
            conn.close()
            return
        label, _ = self.adoptable.pop(pid)
        try:
            self._adopt(label, pid, uid, conn, msg, fds)
        except (ValueError, KeyError, TypeError, OSError, service.ConfigError) as exc:
            log.error("%s: cannot adopt its spawner (pid %d): %s; it is stopped", label, pid, exc)
            for fd in fds:
                os.close(fd)
            conn.close()  # the spawner then kills its incarnation

    def _adopt(self, label, spawner_pid, uid, conn, msg, fds):
        record = json.loads(msg["record"])
        data = dict(record["spec"])
        source = data.pop("source")
        if data.get("label") != label or label in self.manager.services:
            raise ValueError("its record names service %r" % data.get("label"))
        spec = dataclasses.replace(service.from_dict(data, source=source, policy_dir=self.paths.policy_dir),
                                   source=source)
        svc_uid, gid = self.table.ids_for(spec)
        if svc_uid != uid:
            raise ValueError("it runs as uid %d, the service as %d" % (uid, svc_uid))
        named = dict(zip([n for n in msg.get("fds", []) if n], fds))
        svc = Svc(spec, uid, gid, record.get("from_file", False))
        if self.manager.cgroups is not None:  # where the predecessor put it
            svc.cgroup = self.manager.cgroups.service(label)
        svc.restarts = record.get("restarts", 0)
        svc.restarts_total = record.get("restarts_total", 0)
        svc.generation = msg.get("generation", 0)
        self.table.note_generation(label, svc.generation)
        if "listen" in named:
            svc.listen = socket.socket(fileno=named["listen"])
        else:
            svc.listen = open_listen_socket(self.paths.listen_path(label), gid)
        conn.setblocking(False)
        sp = Spawner.adopted(label, spec.program_kind, spec.program, uid, gid, conn, spawner_pid)
        self.manager.services[label] = svc
        self.manager.watch_spawner(svc, sp)
        svc.ever_ready = bool(record.get("ever_ready", True))
        if "control" in named:
            ctl = socket.socket(fileno=named["control"])
            ctl.setblocking(False)
            svc.ctl = Channel(ctl)
        child = msg.get("child")
        log.info("%s: adopted (pid %s, generation %d) from the previous rsd", label, child, svc.generation)
        self.table.save_spawners()
        if child is not None:
            svc.pid = child
            try:
                svc.pidfd = os.pidfd_open(svc.pid)
            except OSError:
                svc.pidfd = None  # it died meanwhile: the spawner's "exited" follows
            if svc.ctl is not None:
                self.manager.watch_control(svc)
            svc.last_alive = monotonic()
        self.manager.on_event(svc, Event.ADOPTED, child=child)
