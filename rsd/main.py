"""rsd, the reincarnation server: the main loop and one handler per request.

One thread, one event loop (libdrv.loop).  Each service moves through

    starting -> initialising -> up -> (failure) -> restarting | failed -> starting ...
                                  \\-> stopping -> (gone)

and every move is published in DS (rsd/publish.py).  See docs/rsd.md.
"""

import argparse
import dataclasses
import json
import logging
import os
import signal
import socket
import struct
import sys
import time

from libdrv.channel import Channel, ChannelClosed, FrameError
from libdrv.loop import Loop, monotonic
from libdrv.wire import decode_body, encode
from rsd import policy, service
from rsd.control import ControlServer, DEFAULT_RUNTIME_DIR
from libdrv.sdnotify import notify as sd_notify, watchdog_interval
from rsd.publish import Publisher
from rsd.scripts import ScriptRunner
from rsd.spawn import Spawner, base_env, open_listen_socket, open_resource_fds

log = logging.getLogger("rsd")

STOP_GRACE = 2.0          # SIGTERM, then SIGKILL after this (MINIX)
DS_RETRY = 1.0            # seconds between attempts to reach a missing DS
ADOPT_WAIT = 3.0          # seconds a new rsd waits for the spawners of its predecessor
DEFAULT_ORPHAN_TIMEOUT = 60.0  # seconds services outlive a dead rsd, waiting for a new one
DEFAULT_UID_BASE = 600000  # dynamic uids: Debian's "dynamically allocated" range
UID_RANGE = 10000


class Svc:
    """The runtime state of one service."""

    def __init__(self, spec, uid, gid, from_file):
        self.spec = spec
        self.uid = uid
        self.gid = gid
        self.from_file = from_file
        self.state = "starting"
        self.spawner = None
        self.listen = None
        self.ctl = None
        self.pid = None
        self.pidfd = None
        self.generation = 0
        self.restarts = 0          # consecutive, for backoff and scripts (decays)
        self.restarts_total = 0
        self.ever_ready = False
        self.up_since = None       # monotonic time of the last ready
        self.last_alive = 0.0
        self.pending_reason = None  # why rsd killed it (no-heartbeat, init-timeout, init-failed)
        self.refresh = False        # an operator restart is in progress
        self.spawn_wanted = False   # spawn as soon as the spawner says hello
        self.next_init = ("fresh", None)
        self.last_failure = None
        self.timers = {}
        self.waiters = []           # (client, op) replied when the operation completes

    @property
    def label(self):
        return self.spec.label

    def cancel(self, *names):
        for name in names or list(self.timers):
            t = self.timers.pop(name, None)
            if t is not None:
                t.cancel()

    def status(self):
        now = monotonic()
        return {"label": self.label, "pid": self.pid, "state": self.state,
                "generation": self.generation, "restarts": self.restarts,
                "restarts_total": self.restarts_total, "class": self.spec.cls,
                "uid": self.uid, "period": self.spec.period,
                "uptime": round(now - self.up_since, 3) if self.up_since and self.state == "up" else None,
                "last_failure": self.last_failure, "source": self.spec.source}


class Rsd:
    def __init__(self, config_dir, runtime_dir, state_dir, ds_socket=None, python=None,
                 uid_base=DEFAULT_UID_BASE, orphan_timeout=DEFAULT_ORPHAN_TIMEOUT):
        self.config_dir = config_dir
        self.services_dir = os.path.join(config_dir, "services.d")
        self.policy_dir = os.path.join(config_dir, "policy.d")
        self.runtime_dir = runtime_dir
        self.state_dir = state_dir
        self.svc_dir = os.path.join(runtime_dir, "svc")
        self.log_dir = os.path.join(state_dir, "log")
        self.ds_socket = ds_socket or os.environ.get("RSD_DS_SOCKET") or os.path.join(runtime_dir, "ds.sock")
        self.python = python or sys.executable
        self.uid_base = uid_base
        self.orphan_timeout = orphan_timeout
        self.adopt_path = os.path.join(runtime_dir, "adopt.sock")
        self.loop = Loop()
        self.services = {}
        self.publisher = Publisher(self.loop, self.ds_socket)
        self.scripts = ScriptRunner(self.loop)
        self.shutting_down = None
        for d, mode in ((runtime_dir, 0o755), (self.svc_dir, 0o755), (state_dir, 0o755),
                        (self.log_dir, 0o750), (os.path.join(state_dir, "crash"), 0o750)):
            os.makedirs(d, mode=mode, exist_ok=True)
        self.generations = self._load_json("generations.json")
        self.uids = self._load_json("uids.json")
        # Spawners a previous rsd left running: pid -> (label, uid).
        self.adoptable = {}
        for label, rec in self._load_json("spawners.json").items():
            if isinstance(rec, dict) and isinstance(rec.get("pid"), int) and _uid_of(rec["pid"]) == rec.get("uid"):
                self.adoptable[rec["pid"]] = (label, rec["uid"])

    # -- small persistent tables ----------------------------------------------
    def _load_json(self, name):
        try:
            with open(os.path.join(self.state_dir, name)) as f:
                data = json.load(f)
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _save_json(self, name, data):
        path = os.path.join(self.state_dir, name)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)

    def _next_generation(self, label):
        gen = int(self.generations.get(label, 0)) + 1
        self.generations[label] = gen
        return gen

    def _ids_for(self, spec):
        """(uid, gid): the configured ones, or a dynamic uid kept per label."""
        import grp
        import pwd
        if isinstance(spec.user, int):
            uid = spec.user
            try:
                gid = pwd.getpwuid(uid).pw_gid
            except KeyError:
                gid = uid
        elif spec.user is not None:
            pw = pwd.getpwnam(spec.user)
            uid, gid = pw.pw_uid, pw.pw_gid
        else:
            uid = self.uids.get(spec.label)
            if uid is None:
                taken = set(self.uids.values())
                uid = next(u for u in range(self.uid_base, self.uid_base + UID_RANGE)
                           if u not in taken and not _uid_exists(u))
                self.uids[spec.label] = uid
                self._save_json("uids.json", self.uids)
            gid = uid
        if spec.group is not None:
            gid = spec.group if isinstance(spec.group, int) else grp.getgrnam(spec.group).gr_gid
        return uid, gid

    # -- start-up ----------------------------------------------------------------
    def _save_table(self):
        """Services started by `rsctl up` (files are re-read anyway), for a successor rsd."""
        self._save_json("services.json", {label: svc.spec.to_dict() for label, svc in self.services.items()
                                          if not svc.from_file})

    def _restore_table(self):
        """Start the `rsctl up` services a dead predecessor ran and nobody adopted."""
        for label, data in self._load_json("services.json").items():
            if label in self.services or not isinstance(data, dict):
                continue
            try:
                data = dict(data)
                source = data.pop("source", "rsctl up")
                spec = dataclasses.replace(service.from_dict(data, source=source, policy_dir=self.policy_dir),
                                           source=source)
                log.info("%s: started again (it ran under the previous rsd)", label)
                self.add_service(spec, from_file=False)
            except (service.ConfigError, OSError, KeyError, StopIteration) as exc:
                log.error("%s: cannot start it again: %s", label, exc)
        self._save_table()

    def _save_spawners(self):
        self._save_json("spawners.json", {
            label: {"pid": svc.spawner.pid, "uid": svc.uid}
            for label, svc in self.services.items() if svc.spawner is not None and svc.spawner.pid})

    def start(self):
        self.control = ControlServer(self.loop, os.path.join(self.runtime_dir, "rsd.sock"), self.handle)
        self._adopt_previous()
        self._restore_table()
        wake_r, wake_w = socket.socketpair()
        for s in (wake_r, wake_w):
            s.setblocking(False)
        self._wake = (wake_r, wake_w)
        signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda *_: None)
        self.loop.add_reader(wake_r, self._on_signal)
        report = self.reload()
        for err in report["errors"]:
            log.error("%s", err)
        self._ds_check()  # after the table is loaded: stale keys are told from live ones
        interval = watchdog_interval()
        if interval:
            self._watchdog(interval)
        sd_notify("READY=1\nSTATUS=supervising %d services" % len(self.services))
        log.info("rsd ready: %d services, control socket %s", len(self.services), self.control.path)

    def run(self):
        self.start()
        self.loop.run()
        self.control.close()
        self.adopt_sock.close()
        try:
            os.unlink(self.adopt_path)
        except OSError:
            pass
        self.publisher.close()
        return 0

    def _watchdog(self, interval):
        sd_notify("WATCHDOG=1")
        self.loop.call_later(interval, self._watchdog, interval)

    def _on_signal(self):
        try:
            data = self._wake[0].recv(64)
        except BlockingIOError:
            return
        if signal.SIGHUP in data:
            for err in self.reload()["errors"]:
                log.error("%s", err)
        if signal.SIGTERM in data or signal.SIGINT in data:
            self.shutdown(None)

    def _ds_check(self):
        """Keep a DS connection; after a reconnect, republish everything."""
        if not self.publisher.connected and self.publisher.connect():
            self._resync()
        self.loop.call_later(DS_RETRY, self._ds_check)

    def _resync(self):
        self.publisher.clear_stale(set(self.services))
        for svc in self.services.values():
            if svc.pid is not None:
                self.publisher.register(svc.pid, svc.label)
                self.publisher.label(svc.label, svc.pid, svc.generation, svc.uid)
            state = "up" if svc.state == "up" else "restarting"
            if svc.generation:
                self.publisher.drv(svc.spec.cls, svc.label, state, svc.generation)

    # -- adding and starting services -----------------------------------------------
    def add_service(self, spec, from_file):
        uid, gid = self._ids_for(spec)
        svc = Svc(spec, uid, gid, from_file)
        svc.generation = int(self.generations.get(spec.label, 0))
        svc.listen = open_listen_socket(os.path.join(self.svc_dir, spec.label + ".sock"), gid)
        self.services[spec.label] = svc
        try:
            if self._deps_up(svc):
                log.info("%s: starting %s as uid %d", spec.label, spec.program, uid)
                self._want_incarnation(svc)
            else:
                svc.state = "waiting"
                log.info("%s: waiting for %s to be up", spec.label, ", ".join(spec.depends_on))
        except OSError as exc:
            svc.waiters = []
            self._remove(svc, error=str(exc))
            raise
        return svc

    def _deps_up(self, svc):
        return all(self.services.get(d) is not None and self.services[d].ever_ready
                   for d in svc.spec.depends_on)

    def _start_waiting(self):
        for svc in list(self.services.values()):
            if svc.state == "waiting" and self._deps_up(svc):
                log.info("%s: dependencies up; starting %s as uid %d", svc.label, svc.spec.program, svc.uid)
                self._want_incarnation(svc)

    def _want_incarnation(self, svc):
        svc.state = "starting"
        if svc.spawner is not None and svc.spawner.ready:
            self._spawn(svc)
            return
        svc.spawn_wanted = True
        if svc.spawner is None:
            sp = Spawner(svc.label, svc.spec.program_kind, svc.spec.program, svc.uid, svc.gid,
                         os.path.join(self.log_dir, svc.label + ".log"), self.python, self.ds_socket,
                         self.adopt_path, self.orphan_timeout)
            sp.start()
            svc.spawner = sp
            self.loop.add_reader(sp, self._on_spawner, svc, sp)
            self.loop.add_reader(sp.pidfd, self._on_spawner_exit, svc, sp)
            self._save_spawners()

    def _spawn(self, svc):
        svc.spawn_wanted = False
        if svc.ctl is not None:  # from a spawn that never happened
            self.loop.remove_reader(svc.ctl)
            svc.ctl.close()
            svc.ctl = None
        svc.generation = self._next_generation(svc.label)
        try:
            resources = open_resource_fds(svc.spec, svc.generation)
        except (OSError, ValueError) as exc:
            self._resources_failed(svc, exc)
            return
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fds = [theirs.fileno(), svc.listen.fileno()] + [fd for _, fd in resources]
        env = base_env(svc.label, self.ds_socket)
        env.update({"RSD_CONTROL_FD": "3", "RSD_LISTEN_FD": "4",
                    "RSD_RUNTIME_DIR": os.path.dirname(self.svc_dir),
                    "RSD_GENERATION": str(svc.generation),
                    "RSD_LISTEN_PATH": os.path.join(self.svc_dir, svc.label + ".sock"),
                    "RSD_RESOURCE_FDS": ",".join("%s=%d" % (name, 5 + i)
                                                 for i, (name, _) in enumerate(resources))})
        argv = [svc.spec.program] + list(svc.spec.args)
        kind, reason = svc.next_init
        keep = os.dup(mine.fileno())  # the spawner holds our end for a successor rsd
        try:
            # The init message waits in the channel, so the incarnation starts
            # initialising without a round trip through rsd.
            mine.sendall(encode({"op": "init", "type": kind, "reason": reason, "restarts": svc.restarts,
                                 "generation": svc.generation, "label": svc.label}))
            svc.spawner.spawn(svc.generation, env, argv, fds, keep=[keep], record=self._record(svc))
        except OSError as exc:
            # Its spawner is dying; its pidfd handler sees spawn_wanted and recovers.
            log.error("%s: cannot reach its spawner: %s", svc.label, exc)
            mine.close()
            svc.spawn_wanted = True
            return
        finally:
            os.close(keep)
            theirs.close()
            for _, fd in resources:
                os.close(fd)
        mine.setblocking(False)
        svc.ctl = Channel(mine)
        svc.state = "starting"
        # Off the critical path: the spawner is forking meanwhile.
        self._save_json("generations.json", self.generations)

    def _record(self, svc):
        """What a successor rsd needs to take this service over (kept by its spawner)."""
        return json.dumps({"spec": svc.spec.to_dict(), "from_file": svc.from_file,
                           "restarts": svc.restarts, "restarts_total": svc.restarts_total,
                           "ever_ready": svc.ever_ready or svc.state == "initialising"})

    # -- adopting the services of a previous rsd ------------------------------------------
    def _adopt_previous(self):
        """Take over the spawners (and running incarnations) a dead rsd left behind."""
        try:
            os.unlink(self.adopt_path)
        except FileNotFoundError:
            pass
        self.adopt_sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.adopt_sock.bind(self.adopt_path)
        os.chmod(self.adopt_path, 0o666)  # spawners run as their service's uid; checked by SO_PEERCRED
        self.adopt_sock.listen(64)
        self.adopt_sock.setblocking(False)
        self.loop.add_reader(self.adopt_sock, self._on_adopt_connect)
        if self.adoptable:
            log.info("waiting for %d spawners of the previous rsd", len(self.adoptable))
            deadline = monotonic() + ADOPT_WAIT
            while self.adoptable and monotonic() < deadline:
                self.loop.run_once(0.05)
                for pid in [p for p, (_, uid) in self.adoptable.items() if _uid_of(p) != uid]:
                    label = self.adoptable.pop(pid)[0]
                    log.warning("%s: its spawner (pid %d) is gone; starting afresh", label, pid)
            for pid, (label, _) in self.adoptable.items():
                log.warning("%s: its spawner (pid %d) did not come back; starting afresh", label, pid)
            self.adoptable.clear()

    def _on_adopt_connect(self):
        try:
            conn, _ = self.adopt_sock.accept()
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
        except (ValueError, KeyError, OSError, service.ConfigError) as exc:
            log.error("%s: cannot adopt its spawner (pid %d): %s; it is stopped", label, pid, exc)
            for fd in fds:
                os.close(fd)
            conn.close()  # the spawner then kills its incarnation

    def _adopt(self, label, spawner_pid, uid, conn, msg, fds):
        record = json.loads(msg["record"])
        data = dict(record["spec"])
        source = data.pop("source")
        if data.get("label") != label or label in self.services:
            raise ValueError("its record names service %r" % data.get("label"))
        spec = dataclasses.replace(service.from_dict(data, source=source, policy_dir=self.policy_dir),
                                   source=source)
        svc_uid, gid = self._ids_for(spec)
        if svc_uid != uid:
            raise ValueError("it runs as uid %d, the service as %d" % (uid, svc_uid))
        named = dict(zip([n for n in msg.get("fds", []) if n], fds))
        svc = Svc(spec, uid, gid, record.get("from_file", False))
        svc.restarts = record.get("restarts", 0)
        svc.restarts_total = record.get("restarts_total", 0)
        svc.generation = msg.get("generation", 0)
        self.generations[label] = max(int(self.generations.get(label, 0)), svc.generation)
        path = os.path.join(self.svc_dir, label + ".sock")
        if "listen" in named:
            svc.listen = socket.socket(fileno=named["listen"])
        else:
            svc.listen = open_listen_socket(path, gid)
        conn.setblocking(False)
        sp = Spawner.adopted(label, spec.program_kind, spec.program, uid, gid, conn, spawner_pid)
        svc.spawner = sp
        self.services[label] = svc
        self.loop.add_reader(sp, self._on_spawner, svc, sp)
        self.loop.add_reader(sp.pidfd, self._on_spawner_exit, svc, sp)
        svc.ever_ready = bool(record.get("ever_ready", True))
        if "control" in named:
            ctl = socket.socket(fileno=named["control"])
            ctl.setblocking(False)
            svc.ctl = Channel(ctl)
        log.info("%s: adopted (pid %s, generation %d) from the previous rsd", label, msg.get("child"),
                 svc.generation)
        self._save_spawners()
        if msg.get("child") is None:
            # It was between incarnations (restarting, or waiting for its
            # policy script) when rsd died: start the next one now.
            svc.next_init = ("restart", "rsd-restart")
            self._want_incarnation(svc)
            return
        svc.pid = msg["child"]
        try:
            svc.pidfd = os.pidfd_open(svc.pid)
        except OSError:
            svc.pidfd = None  # it died meanwhile: the spawner's "exited" follows
        if svc.ctl is not None:
            self.loop.add_reader(svc.ctl, self._on_ctl, svc, svc.ctl)
        svc.state = "initialising"  # so that _on_ready applies: it said ready to our predecessor
        svc.last_alive = monotonic()
        self._on_ready(svc)

    # -- spawner events ---------------------------------------------------------------
    def _on_spawner(self, svc, sp):
        msgs, eof = sp.read()
        for msg in msgs:
            op = msg.get("op")
            if op == "hello":
                sp.ready = True
                if svc.spawn_wanted and svc.state == "starting":
                    self._spawn(svc)
            elif op == "error":
                self._spawner_failed(svc, sp, "cannot load %s: %s" % (svc.spec.program, msg.get("error")))
                return
            elif op == "spawned":
                if msg["pid"] != svc.pid:  # (an adopted one is known already)
                    self._on_spawned(svc, msg["pid"])
            elif op == "spawn_failed":
                self._spawner_failed(svc, sp, "fork failed: %s" % msg.get("error"))
                return
            elif op == "exited":
                if msg.get("pid") == svc.pid:
                    self._on_exit(svc, msg.get("status", 0))
        if eof:
            self.loop.remove_reader(sp)  # its pidfd tells us when it is gone

    def _on_spawner_exit(self, svc, sp):
        self.loop.remove_reader(sp.pidfd)
        if sp.sock is not None:
            # Drain what it said before dying (its last "exited" report).
            self._on_spawner(svc, sp)
            self.loop.remove_reader(sp)
        status = sp.reap()
        sp.stop()
        if svc.spawner is sp:
            svc.spawner = None
            if svc.pid is not None:
                # The incarnation died with its spawner (parent-death signal).
                log.warning("%s: its spawner died (status %s)", svc.label, status)
                self._on_exit(svc, signal.SIGKILL)
            elif svc.spawn_wanted and svc.state == "starting":
                self._spawner_failed(svc, sp, "the spawner exited with status %s before it was ready; "
                                     "see %s" % (status, os.path.join(self.log_dir, svc.label + ".log")))

    def _resources_failed(self, svc, exc):
        why = "cannot set up its [resources]: %s" % exc
        log.error("%s: %s", svc.label, why)
        if not svc.ever_ready:
            self._remove(svc, error="%s %s" % (svc.label, why))
        else:
            # Not at once: a resource that stays unavailable must not spin rsd.
            svc.timers["resources"] = self.loop.call_later(1.0, self._failure, svc, "init-failed", None)

    def _spawner_failed(self, svc, sp, why):
        log.error("%s: %s", svc.label, why)
        if svc.spawner is sp:
            self.loop.remove_reader(sp)
            sp.stop()
            svc.spawner = None
        svc.spawn_wanted = False
        if not svc.ever_ready:
            self._remove(svc, error="%s: %s" % (svc.label, why))
        else:
            self._failure(svc, "init-failed", None)

    def _on_spawned(self, svc, pid):
        svc.pid = pid
        try:
            svc.pidfd = os.pidfd_open(pid)
        except OSError:
            svc.pidfd = None  # already gone: its "exited" report follows
        if svc.state == "stopping":
            self._kill(svc, signal.SIGKILL)
            return
        svc.state = "initialising"
        self.loop.add_reader(svc.ctl, self._on_ctl, svc, svc.ctl)
        svc.last_alive = monotonic()
        svc.timers["init"] = self.loop.call_later(svc.spec.init_timeout, self._init_timeout, svc)
        # The driver does not wait for these: SEF waits for its label itself
        # before its first DS request (libdrv/sef.py).
        self.publisher.register(pid, svc.label)
        self.publisher.label(svc.label, pid, svc.generation, svc.uid)

    # -- the service's control channel -------------------------------------------------
    def _on_ctl(self, svc, ctl):
        try:
            msgs = ctl.read_available()
        except (ChannelClosed, FrameError):
            self.loop.remove_reader(ctl)
            return
        svc.last_alive = monotonic()
        for msg in msgs:
            op = msg.get("op")
            if op == "ready" and svc.state == "initialising":
                self._on_ready(svc)
            elif op == "init_failed" and svc.state == "initialising":
                log.warning("%s: init failed: %s", svc.label, msg.get("error"))
                svc.pending_reason = "init-failed"
                self._kill(svc, signal.SIGKILL)

    def _on_ready(self, svc):
        svc.cancel("init")
        svc.state = "up"
        svc.ever_ready = True
        svc.up_since = monotonic()
        self.publisher.drv(svc.spec.cls, svc.label, "up", svc.generation)
        log.info("%s: up (pid %d, generation %d)", svc.label, svc.pid, svc.generation)
        if svc.spec.period > 0:
            svc.timers["ping"] = self.loop.call_later(svc.spec.period, self._ping, svc)
            svc.timers["heartbeat"] = self.loop.call_at(svc.last_alive + 2 * svc.spec.period,
                                                        self._heartbeat_check, svc)
        self._complete(svc, ("up", "restart"), {"ok": True, **svc.status()})
        self._start_waiting()

    def _ping(self, svc):
        if svc.state != "up":
            return
        svc.ctl.try_send({"op": "ping", "seq": svc.generation})
        svc.timers["ping"] = self.loop.call_later(svc.spec.period, self._ping, svc)

    def _heartbeat_check(self, svc):
        if svc.state != "up":
            return
        deadline = svc.last_alive + 2 * svc.spec.period
        if monotonic() >= deadline:
            log.warning("%s: no heartbeat for %.2f s: killing pid %d", svc.label,
                        monotonic() - svc.last_alive, svc.pid)
            svc.pending_reason = "no-heartbeat"
            self._kill(svc, signal.SIGKILL)
        else:
            svc.timers["heartbeat"] = self.loop.call_at(deadline, self._heartbeat_check, svc)

    def _init_timeout(self, svc):
        if svc.state == "initialising":
            log.warning("%s: not ready within %.1f s: killing pid %d", svc.label,
                        svc.spec.init_timeout, svc.pid)
            svc.pending_reason = "init-timeout"
            self._kill(svc, signal.SIGKILL)

    def _kill(self, svc, sig):
        if svc.pidfd is None:
            return
        try:
            signal.pidfd_send_signal(svc.pidfd, sig)
        except ProcessLookupError:
            pass
        if sig == signal.SIGKILL:
            try:
                os.killpg(svc.pid, sig)  # its own helpers too (it leads its process group)
            except OSError:
                pass

    # -- an incarnation ended ---------------------------------------------------------------
    def _on_exit(self, svc, status):
        svc.cancel()
        if svc.ctl is not None:
            self.loop.remove_reader(svc.ctl)
            svc.ctl.close()
            svc.ctl = None
        if svc.pidfd is not None:
            os.close(svc.pidfd)
            svc.pidfd = None
        pid, svc.pid = svc.pid, None
        was_initialising = svc.state in ("starting", "initialising")
        if svc.state == "stopping":
            self._remove(svc)
        elif svc.refresh:
            svc.refresh = False
            svc.pending_reason = None
            svc.next_init = ("restart", "refresh")
            old = svc.generation
            self._want_incarnation(svc)
            self.publisher.drv(svc.spec.cls, svc.label, "restarting", old)
        else:
            reason = policy.failure_reason(svc.pending_reason, was_initialising, status)
            svc.pending_reason = None
            self._failure(svc, reason, status, pid)
        if pid is not None:
            self.publisher.unregister(pid)

    def _failure(self, svc, reason, status, pid=None):
        uptime = monotonic() - svc.up_since if svc.up_since else 0.0
        svc.restarts = policy.decayed_restarts(svc.restarts, uptime, svc.spec.stable_uptime)
        svc.up_since = None
        sig = os.WTERMSIG(status) if status is not None and os.WIFSIGNALED(status) else None
        code = os.WEXITSTATUS(status) if status is not None and os.WIFEXITED(status) else None
        svc.last_failure = {"reason": reason, "time": time.time(), "exit_status": code,
                            "signal": sig, "pid": pid}
        log.warning("%s: %s (pid %s, exit status %s, signal %s) after %d restarts",
                    svc.label, reason, pid, code, sig, svc.restarts)
        if not svc.ever_ready:
            # MINIX: a service that never initialised is taken down, not retried.
            self._remove(svc, error="%s failed to start: %s (exit status %s, signal %s); see %s"
                         % (svc.label, reason, code, sig,
                            os.path.join(self.log_dir, svc.label + ".log")))
            return
        old = svc.generation
        self._complete(svc, ("restart",), {"ok": False, "error": "%s failed again: %s" % (svc.label, reason)})
        svc.next_init = ("restart", reason)
        if svc.spec.script:
            svc.state = "failed"
            self._run_script(svc, reason, pid)
        else:
            svc.state = "restarting"
            delay = policy.restart_delay(svc.restarts, svc.spec.backoff)
            if delay > 0:
                log.info("%s: restarting in %.0f s (backoff)", svc.label, delay)
                svc.timers["restart"] = self.loop.call_later(delay, self._restart_now, svc)
            else:
                self._restart_now(svc)  # the spawner forks while we publish
        self.publisher.drv(svc.spec.cls, svc.label, "restarting", old)

    def _restart_now(self, svc):
        svc.cancel("restart")
        svc.restarts += 1
        svc.restarts_total += 1
        self._want_incarnation(svc)

    # -- policy scripts ------------------------------------------------------------------------
    def _run_script(self, svc, reason, pid):
        f = svc.last_failure
        env = {"RS_EXIT_STATUS": "" if f["exit_status"] is None else str(f["exit_status"]),
               "RS_SIGNAL": "" if f["signal"] is None else str(f["signal"]),
               "RS_PID": "" if pid is None else str(pid),
               "RS_LOG": os.path.join(self.log_dir, svc.label + ".log"),
               "RSD_RUNTIME_DIR": self.runtime_dir, "RSD_STATE_DIR": self.state_dir,
               "RSD_CONFIG_DIR": self.config_dir,
               "RSD_SOCKET": self.control.path, "RSD_DS_SOCKET": self.ds_socket}
        self.scripts.run(svc.label, svc.spec.script, reason, svc.restarts, svc.spec.script_timeout, env)

    # -- stopping ------------------------------------------------------------------------------
    def _stop(self, svc):
        svc.cancel()
        svc.spawn_wanted = False
        if svc.pid is None and svc.state != "starting":
            self._remove(svc)
            return
        svc.state = "stopping"
        if svc.pid is None:
            if svc.spawner is None or not svc.spawner.ready:
                self._remove(svc)
            return  # the spawned report comes next, and _on_spawned kills it
        self._kill(svc, signal.SIGTERM)
        svc.timers["stop"] = self.loop.call_later(STOP_GRACE, self._kill, svc, signal.SIGKILL)

    def _remove(self, svc, error=None):
        svc.cancel()
        if svc.ctl is not None:
            self.loop.remove_reader(svc.ctl)
            svc.ctl.close()
            svc.ctl = None
        if svc.spawner is not None:
            self.loop.remove_reader(svc.spawner)
            if svc.spawner.pidfd is not None:
                self.loop.remove_reader(svc.spawner.pidfd)
            svc.spawner.stop()
            self._reap_soon(svc.spawner)
            svc.spawner = None
        if svc.listen is not None:
            svc.listen.close()
            try:
                os.unlink(os.path.join(self.svc_dir, svc.label + ".sock"))
            except OSError:
                pass
            svc.listen = None
        if self.services.get(svc.label) is svc:
            del self.services[svc.label]
            self._save_spawners()
            if not svc.from_file and self.shutting_down is None:
                self._save_table()
        if svc.generation:
            if self.shutting_down is not None:
                self.publisher.drv(svc.spec.cls, svc.label, "down", svc.generation)
            else:
                self.publisher.down(svc.spec.cls, svc.label, svc.generation)
        svc.state = "down"
        log.info("%s: down%s", svc.label, "" if error is None else " (%s)" % error)
        if error is None:
            self._complete(svc, None, {"ok": True, "label": svc.label, "state": "down"})
        else:
            self._complete(svc, None, {"ok": False, "error": error})
        if self.shutting_down is not None and not self.services:
            self._finish_shutdown()

    def _reap_soon(self, sp):
        if sp.pidfd is None:
            return
        self.loop.add_reader(sp.pidfd, self._reap_spawner, sp)

    def _reap_spawner(self, sp):
        self.loop.remove_reader(sp.pidfd)
        sp.reap()

    def _complete(self, svc, ops, reply):
        """Answer the clients waiting on svc for one of ops (None: all)."""
        keep = []
        for client, op in svc.waiters:
            if ops is None or op in ops:
                client.reply(reply)
            else:
                keep.append((client, op))
        svc.waiters = keep

    # -- requests (rsctl) ---------------------------------------------------------------------------
    def handle(self, client, msg):
        op = msg.get("op")
        handler = getattr(self, "op_" + str(op), None) if isinstance(op, str) and op.isidentifier() else None
        if handler is None:
            client.error("unknown request %r; rsctl knows up, down, restart, status, fi, reload, shutdown" % op)
            return
        if self.shutting_down is not None and op not in ("status",):
            client.error("rsd is shutting down")
            return
        handler(client, msg)

    def _lookup(self, client, msg):
        label = msg.get("label")
        svc = self.services.get(label) if isinstance(label, str) else None
        if svc is None:
            client.error("no service labelled %r (see `rsctl status`)" % (label,))
        return svc

    def op_up(self, client, msg):
        try:
            spec = service.from_dict(msg.get("spec"), source="rsctl up", policy_dir=self.policy_dir)
        except service.ConfigError as exc:
            client.error(str(exc))
            return
        if spec.label in self.services:
            client.error("a service labelled %r is already running; use `rsctl restart %s`, or "
                         "`rsctl up --label OTHER`" % (spec.label, spec.label))
            return
        missing = [d for d in spec.depends_on if self.services.get(d) is None]
        if missing:
            client.error("%s depends on %s, which is not running: start it first"
                         % (spec.label, ", ".join(missing)))
            return
        try:
            svc = self.add_service(spec, from_file=False)
        except OSError as exc:
            client.error("cannot start %s: %s" % (spec.label, exc))
            return
        svc.waiters.append((client, "up"))
        self._save_table()

    def op_down(self, client, msg):
        svc = self._lookup(client, msg)
        if svc is not None:
            svc.waiters.append((client, "down"))
            self._stop(svc)

    def op_restart(self, client, msg):
        svc = self._lookup(client, msg)
        if svc is None:
            return
        if svc.state in ("starting", "stopping", "waiting"):
            client.error("%s is %s; try again when it is up (rsctl status %s)" % (svc.label, svc.state, svc.label))
            return
        svc.waiters.append((client, "restart"))
        if svc.state in ("up", "initialising"):
            svc.refresh = True  # MINIX refresh: kill now, fresh copy now
            self._kill(svc, signal.SIGKILL)
        else:  # restarting (backoff) or failed (a policy script asks us)
            self._restart_now(svc)

    def op_status(self, client, msg):
        label = msg.get("label")
        if label is not None:
            svc = self._lookup(client, msg)
            if svc is not None:
                client.reply({"ok": True, "services": [svc.status()]})
            return
        client.reply({"ok": True, "services": [s.status() for _, s in sorted(self.services.items())]})

    def op_fi(self, client, msg):
        svc = self._lookup(client, msg)
        if svc is None:
            return
        kind = msg.get("kind", "crash")
        if kind not in ("crash", "hang", "exit"):
            client.error("fault kind must be crash, hang or exit (got %r)" % (kind,))
            return
        if svc.state != "up" or svc.ctl is None:
            client.error("%s is %s, not up; inject faults into a running service" % (svc.label, svc.state))
            return
        if kind == "hang" and svc.spec.period <= 0:
            client.error("%s has no heartbeat (period 0), so a hang would never be detected; "
                         "give it a period (rsctl up --period S) or inject --crash" % svc.label)
            return
        svc.ctl.try_send({"op": "fi", "kind": kind})
        client.reply({"ok": True, "label": svc.label, "kind": kind, "pid": svc.pid})

    def op_reload(self, client, msg):
        client.reply({"ok": True, **self.reload()})

    def op_shutdown(self, client, msg):
        self.shutdown(client)

    # -- reload and shutdown ---------------------------------------------------------------------
    def reload(self):
        """Re-read services.d: start new files, stop removed ones, restart changed ones."""
        specs, errors = service.load_dir(self.services_dir, self.policy_dir)
        running = {label for label, s in self.services.items()}
        started, stopped, changed = [], [], []
        for label, svc in list(self.services.items()):
            if not svc.from_file:
                if label in specs:
                    errors.append("%s: not applied: %s is running from `rsctl up`; `rsctl down %s` first"
                                  % (specs[label].source, label, label))
                    del specs[label]
                continue
            new = specs.get(label)
            if new is None:
                if not any(svc.spec.source == e.split(":")[0] for e in errors):
                    stopped.append(label)
                    self._stop(svc)
                continue
            if new != svc.spec:
                changed.append(label)
                self._apply_change(svc, new)
            del specs[label]
        order, dep_errors = service.start_order(specs, running)
        errors.extend(dep_errors)
        for label in order:
            try:
                self.add_service(specs[label], from_file=True)
                started.append(label)
            except (OSError, KeyError, StopIteration) as exc:
                errors.append("%s: cannot start: %s" % (specs[label].source, exc))
        return {"started": started, "stopped": stopped, "changed": changed, "errors": errors}

    def _apply_change(self, svc, spec):
        """A changed service file: new spawner (it imported the old program), new ids."""
        svc.spec = spec
        try:
            svc.uid, svc.gid = self._ids_for(spec)
            os.chown(os.path.join(self.svc_dir, svc.label + ".sock"), 0, svc.gid)
        except (KeyError, OSError) as exc:
            log.error("%s: cannot apply the new user/group: %s", svc.label, exc)
        sp = svc.spawner
        if sp is None:
            return
        self.loop.remove_reader(sp)
        sp.stop()
        if svc.pid is not None:
            # The incarnation dies with its spawner; the spawner's pidfd
            # handler (_on_spawner_exit) then starts a fresh one: a refresh.
            svc.refresh = True
            return
        self._reap_soon(sp)
        svc.spawner = None
        if svc.state == "starting":
            self._want_incarnation(svc)

    def shutdown(self, client):
        if self.shutting_down is None:
            self.shutting_down = []
            log.info("shutting down: stopping %d services", len(self.services))
            self._save_json("services.json", {})  # a deliberate stop: nothing to bring back
        if client is not None:
            self.shutting_down.append(client)
        for svc in list(self.services.values()):
            if svc.state != "stopping":
                self._stop(svc)
        if not self.services:
            self._finish_shutdown()

    def _finish_shutdown(self):
        for client in self.shutting_down:
            client.reply({"ok": True, "state": "shut down"})
        sd_notify("STOPPING=1")
        self.loop.stop()


def _uid_of(pid):
    """The uid of a live process (None if it is gone or a zombie)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return None
        return os.stat("/proc/%d" % pid).st_uid
    except (OSError, TypeError, IndexError):
        return None


def _uid_exists(uid):
    import pwd
    try:
        pwd.getpwuid(uid)
        return True
    except KeyError:
        return False


def main(argv=None):
    p = argparse.ArgumentParser(prog="rsd", description="The reincarnation server: supervises drivers "
                                "and restarts them when they fail (see docs/rsd.md).")
    p.add_argument("--config-dir", default=os.environ.get("RSD_CONFIG_DIR", "/etc/rsd"),
                   help="holds services.d/ and policy.d/ (default $RSD_CONFIG_DIR or /etc/rsd)")
    p.add_argument("--runtime-dir", default=os.environ.get("RSD_RUNTIME_DIR", DEFAULT_RUNTIME_DIR),
                   help="sockets: rsd.sock and svc/<label>.sock (default $RSD_RUNTIME_DIR or /run/rsd)")
    p.add_argument("--state-dir", default=os.environ.get("RSD_STATE_DIR", "/var/lib/rsd"),
                   help="generations, dynamic uids, service logs, crash info (default $RSD_STATE_DIR "
                        "or /var/lib/rsd)")
    p.add_argument("--ds-socket", default=None, help="the data store's socket (default "
                   "$RSD_DS_SOCKET or RUNTIME_DIR/ds.sock)")
    p.add_argument("--python", default=os.environ.get("RSD_PYTHON", sys.executable),
                   help="interpreter for the spawners of Python services; service uids must be able "
                        "to run it (default $RSD_PYTHON or this interpreter)")
    p.add_argument("--uid-base", type=int, default=DEFAULT_UID_BASE,
                   help="first dynamically allocated service uid (default %d)" % DEFAULT_UID_BASE)
    p.add_argument("--orphan-timeout", type=float, default=DEFAULT_ORPHAN_TIMEOUT,
                   help="if rsd dies, its services keep running this long waiting for a new rsd to "
                        "adopt them (0: they die with rsd; default %.0f s)" % DEFAULT_ORPHAN_TIMEOUT)
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    a = p.parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if os.geteuid() != 0:
        print("rsd: must run as root (it drops privilege for each service itself)", file=sys.stderr)
        return 1
    if a.uid_base <= 0:
        print("rsd: --uid-base must be a positive uid", file=sys.stderr)
        return 2
    try:
        rsd = Rsd(os.path.abspath(a.config_dir), os.path.abspath(a.runtime_dir),
                  os.path.abspath(a.state_dir), a.ds_socket, python=a.python, uid_base=a.uid_base,
                  orphan_timeout=max(0.0, a.orphan_timeout))
        return rsd.run()
    except (RuntimeError, OSError) as exc:
        print("rsd: %s" % exc, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
