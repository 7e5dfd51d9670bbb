"""The service record and the one function that decides what happens to it.

Every restart, refresh, stop and give-up is decided in Manager.on_event;
everything else here is mechanics (spawning, killing, publishing, timers)
that on_event calls.  The restart policy's numbers are in rsd/policy.py.

    WAITING (dependencies) -> STARTING -> INITIALISING -> UP
    UP -> (exit/crash/hang) -> RESTARTING (backoff timer) -> STARTING ...
                            -> DECIDING (a policy script decides) -> STARTING (rsctl restart)
                                                                  | FAILED (rsctl give-up) | DOWN
    STARTING/INITIALISING of a first start that fails -> FAILED
    FAILED (kept, holding nothing) -> STARTING (rsctl restart, up, reload) | DOWN (rsctl down)
    any -> STOPPING (rsctl down: SIGTERM, SIGKILL after 2 s) -> DOWN

An incarnation that rsd itself ends carries an Ending: why (a refresh, or
the failure rsd detected), so that its exit is read the right way.
"""

import dataclasses
import enum
import logging
import os
import signal
import socket
import time

from libdrv.channel import Channel, ChannelClosed, FrameError
from libdrv.loop import monotonic
from libdrv.wire import encode
from rsd import cuse, nbd, policy, service, tap, uio, vfio
from rsd.spawner import PLACED
from rsd.spawn import Spawner, base_env, open_listen_socket, open_process, open_resource_fds, pidfd_ended

log = logging.getLogger("rsd")

STOP_GRACE = 2.0          # SIGTERM, then SIGKILL after this (MINIX)
RESOURCE_RETRY = 1.0      # seconds before retrying resources that could not be opened


class State(enum.Enum):
    WAITING = "waiting"            # for its dependencies to be up
    STARTING = "starting"          # an incarnation is asked for (or its spawner is starting)
    INITIALISING = "initialising"  # the incarnation runs; rsd waits for "ready"
    UP = "up"
    RESTARTING = "restarting"      # between incarnations, on the backoff timer
    DECIDING = "deciding"          # between incarnations, its policy script decides
    FAILED = "failed"              # given up: kept with why, holding nothing, until rsctl down/up/restart/reload
    STOPPING = "stopping"          # rsctl down / shutdown: waiting for the exit
    DOWN = "down"                  # removed from the table


class Ending(enum.Enum):
    """Why rsd ended the current incarnation (None on a record: it ends on its own)."""
    REFRESH = "refresh"              # rsctl restart, or a changed service file: not a failure
    NO_HEARTBEAT = "no-heartbeat"
    INIT_TIMEOUT = "init-timeout"
    INIT_FAILED = "init-failed"


class Event(enum.Enum):
    START = "start"                  # a new record
    DEPS_UP = "deps-up"              # some service became ready: a waiting one may start
    ADOPTED = "adopted"              # taken over from a previous rsd
    SPAWNED = "spawned"              # the spawner forked the incarnation (pid)
    READY = "ready"
    INIT_FAILED = "init-failed"      # the incarnation said so (why)
    INIT_TIMEOUT = "init-timeout"
    NO_HEARTBEAT = "no-heartbeat"
    EXITED = "exited"                # the incarnation ended (status)
    FAILED = "failed"                # a failure to act on (reason, status, pid)
    SPAWN_FAILED = "spawn-failed"    # no incarnation can be had from this spawner (why)
    RESOURCES_FAILED = "resources-failed"  # its [resources] could not be opened (why)
    SPAWNER_DIED = "spawner-died"    # (sp, status)
    BACKOFF_ELAPSED = "backoff-elapsed"
    RESTART_REQUESTED = "restart-requested"  # rsctl restart (client)
    STOP_REQUESTED = "stop-requested"        # rsctl down, reload, shutdown
    GIVE_UP_REQUESTED = "give-up-requested"  # rsctl give-up (a policy script's last word; why)
    CONFIG_CHANGED = "config-changed"        # reload with a changed file (spec)


class Svc:
    """The runtime record of one service."""

    def __init__(self, spec, uid, gid, from_file):
        self.spec = spec
        self.uid = uid
        self.gid = gid
        self.from_file = from_file
        self.state = State.STARTING
        self.ending = None          # an Ending while rsd is ending the incarnation
        self.spawner = None
        self.listen = None
        self.ctl = None             # rsd's end of the control channel, from the spawn request on
        self.init_frame = None      # the init message, sent once the incarnation is placed
        self.cgroup = None          # rsd.cgroup.ServiceCgroup (None: no cgroups on this host)
        self.pid = None
        self.pidfd = None           # held from the moment rsd has checked the pid is its incarnation
        self.last_pid = None        # the incarnation that ended last (its late reports are old news)
        self.generation = 0
        self.restarts = 0           # consecutive, for backoff and scripts (decays)
        self.restarts_total = 0
        self.ever_ready = False     # a service that never was is given up, not retried
        self.up_since = None        # monotonic time of the last ready
        self.last_alive = 0.0
        self.next_init = ("fresh", None)
        self.last_failure = None
        self.restart_marks = []    # [(phase, monotonic)] from the predecessor's end to ready
        self.gave_up = None         # {"why", "time"} once FAILED
        self.released = False       # its spawner, cgroup, device, TAP and socket are let go
        self.timers = {}
        self.waiters = []           # (client, op) replied when the operation completes

    @property
    def label(self):
        return self.spec.label

    @property
    def awaiting_spawner(self):
        """An incarnation is wanted but not yet asked for (the spawner is not ready, or was lost)."""
        return (self.state is State.STARTING and self.ctl is None and self.pid is None
                and "resources" not in self.timers)

    def cancel(self, *names):
        for name in names or list(self.timers):
            t = self.timers.pop(name, None)
            if t is not None:
                t.cancel()

    def mark(self, phase):
        if self.restart_marks:
            self.restart_marks.append((phase, monotonic()))

    def status(self):
        now = monotonic()
        up = self.state is State.UP
        return {"label": self.label, "pid": self.pid, "state": self.state.value,
                "generation": self.generation, "restarts": self.restarts,
                "restarts_total": self.restarts_total, "class": self.spec.cls,
                "uid": self.uid, "period": self.spec.period,
                "uptime": round(now - self.up_since, 3) if self.up_since and up else None,
                "last_failure": self.last_failure, "gave_up": self.gave_up, "source": self.spec.source,
                # Has a PCI device: is its DMA confined by the IOMMU (VFIO), or not (no IOMMU)?
                "dma_isolated": (vfio.held(self.label) is not None) if self.spec.resources.pci else None}


class Manager:
    def __init__(self, loop, paths, table, publisher, scripts, python, orphan_timeout):
        self.loop = loop
        self.paths = paths
        self.table = table
        self.services = table.services
        self.publisher = publisher
        self.scripts = scripts
        self.python = python
        self.orphan_timeout = orphan_timeout
        self.shutting_down = None   # clients waiting for the end of a shutdown
        self.on_all_stopped = None  # called once a shutdown has stopped everything
        self.cgroups = None         # rsd.cgroup.CgroupTree, or None (process groups only)
        self.nbd = nbd.Connector(loop, paths.runtime_dir, monotonic)
        self.cuse = cuse.Registrar(loop, monotonic, lambda name: [
            label for label, s in self.services.items() if s.spec.resources.cuse == name])

    # == the decisions ==========================================================
    def on_event(self, svc, event, status=None, pid=None, reason=None, why=None, sp=None,
                 spec=None, child=None, client=None, pidfd=None):
        """Decide what svc does next.  Returns an error text for a request it refuses."""
        S = State
        if event is Event.START:
            if self._deps_up(svc):
                log.info("%s: starting %s as uid %d", svc.label, svc.spec.program, svc.uid)
                self._start_incarnation(svc)
            else:
                svc.state = S.WAITING
                log.info("%s: waiting for %s to be up", svc.label, ", ".join(svc.spec.depends_on))

        elif event is Event.DEPS_UP:
            if svc.state is S.WAITING and self._deps_up(svc):
                log.info("%s: dependencies up; starting %s as uid %d", svc.label, svc.spec.program, svc.uid)
                self._start_incarnation(svc)

        elif event is Event.ADOPTED:
            if child is None:
                # It was between incarnations (restarting, or waiting for its
                # policy script) when rsd died: start the next one now.
                svc.next_init = ("restart", "rsd-restart")
                self._start_incarnation(svc)
            else:
                svc.state = S.INITIALISING  # it said ready to our predecessor
                self._became_ready(svc)

        elif event is Event.SPAWNED:
            svc.pid, svc.pidfd = pid, pidfd
            if pidfd is None:
                # It ended before rsd could look at it: an initialisation that failed.
                self.on_event(svc, Event.EXITED, status=None)
            elif svc.state is S.STOPPING:
                self._kill(svc, signal.SIGKILL)  # asked for before the stop; its exit completes the stop
            else:
                self._initialise(svc)

        elif event is Event.READY:
            if svc.state is S.INITIALISING:
                self._became_ready(svc)

        elif event is Event.INIT_FAILED:
            if svc.state is S.INITIALISING:
                log.warning("%s: init failed: %s", svc.label, why)
                svc.ending = Ending.INIT_FAILED
                self._kill(svc, signal.SIGKILL)

        elif event is Event.INIT_TIMEOUT:
            if svc.state is S.INITIALISING:
                log.warning("%s: not ready within %.1f s: killing pid %d", svc.label,
                            svc.spec.init_timeout, svc.pid)
                svc.ending = Ending.INIT_TIMEOUT
                self._kill(svc, signal.SIGKILL)

        elif event is Event.NO_HEARTBEAT:
            log.warning("%s: no heartbeat for %.2f s: killing pid %d", svc.label,
                        monotonic() - svc.last_alive, svc.pid)
            svc.ending = Ending.NO_HEARTBEAT
            self._kill(svc, signal.SIGKILL)

        elif event is Event.EXITED:
            svc.restart_marks = [("ended", monotonic())]   # where a restart's time goes (rsd's log)
            was_initialising = svc.state in (S.STARTING, S.INITIALISING)
            ending, svc.ending = svc.ending, None
            pid = self._forget_incarnation(svc)
            if svc.state is S.STOPPING:
                self._remove(svc)
            elif ending is Ending.REFRESH:
                svc.next_init = ("restart", "refresh")
                old = svc.generation
                self._start_incarnation(svc)
                self.publisher.drv(svc.spec.cls, svc.label, "restarting", old)
            else:
                reason = policy.failure_reason(ending.value if ending else None, was_initialising, status)
                self.on_event(svc, Event.FAILED, reason=reason, status=status, pid=pid)
            if pid is not None:
                self.publisher.unregister(pid)

        elif event is Event.FAILED:
            self._record_failure(svc, reason, status, pid)
            if not svc.ever_ready:
                # MINIX: a service that never initialised is given up, not retried.
                code, sig = svc.last_failure["exit_status"], svc.last_failure["signal"]
                self._give_up(svc, "%s failed to start: %s (exit status %s, signal %s); see %s"
                              % (svc.label, reason, code, sig, self.paths.log_path(svc.label)))
                return None
            old = svc.generation
            self._complete(svc, ("restart",), {"ok": False, "error": "%s failed again: %s" % (svc.label, reason)})
            svc.next_init = ("restart", reason)
            if svc.spec.script:
                svc.state = S.DECIDING
                if not self._run_script(svc, reason, pid):
                    self._give_up(svc, "%s failed (%s) and its policy script %s could not run; see "
                                  "rsd's log" % (svc.label, reason, svc.spec.script))
                    return None
            else:
                svc.state = S.RESTARTING
                delay = policy.restart_delay(svc.restarts, svc.spec.backoff)
                if delay > 0:
                    log.info("%s: restarting in %.0f s (backoff)", svc.label, delay)
                    svc.timers["restart"] = self.loop.call_later(delay, self.on_event, svc,
                                                                 Event.BACKOFF_ELAPSED)
                else:
                    self.on_event(svc, Event.BACKOFF_ELAPSED)  # the spawner forks while we publish
            self.publisher.drv(svc.spec.cls, svc.label, "restarting", old)

        elif event is Event.SPAWN_FAILED:
            log.error("%s: %s", svc.label, why)
            if svc.spawner is sp:
                self._drop_spawner(svc)
            if not svc.ever_ready:
                self._record_failure(svc, "init-failed", None, None)
                self._give_up(svc, "%s: %s" % (svc.label, why))
            else:
                self.on_event(svc, Event.FAILED, reason="init-failed")

        elif event is Event.RESOURCES_FAILED:
            log.error("%s: %s", svc.label, why)
            if not svc.ever_ready:
                self._record_failure(svc, "init-failed", None, None)
                self._give_up(svc, "%s %s" % (svc.label, why))
            else:
                # Not at once: a resource that stays unavailable must not spin rsd.
                svc.timers["resources"] = self.loop.call_later(RESOURCE_RETRY, self._resources_retry, svc)

        elif event is Event.SPAWNER_DIED:
            if svc.spawner is sp:
                svc.spawner = None
                if svc.pid is not None:
                    # The incarnation dies with its spawner (parent-death signal);
                    # made sure of, as a hostile spawner may have forked it without.
                    log.warning("%s: its spawner died (status %s)", svc.label, status)
                    self._kill(svc, signal.SIGKILL)
                    self.on_event(svc, Event.EXITED, status=signal.SIGKILL)
                elif svc.awaiting_spawner:
                    self.on_event(svc, Event.SPAWN_FAILED, sp=sp,
                                  why="the spawner exited with status %s before it was ready; see %s"
                                  % (status, self.paths.log_path(svc.label)))

        elif event is Event.BACKOFF_ELAPSED:
            svc.cancel("restart")
            svc.restarts += 1
            svc.restarts_total += 1
            self._start_incarnation(svc)

        elif event is Event.RESTART_REQUESTED:
            if svc.state is S.FAILED:
                try:
                    svc = self.start_again(svc)
                except (OSError, KeyError) as exc:
                    return "cannot start %s again: %s" % (svc.label, exc)
                if client is not None:
                    svc.waiters.append((client, "restart"))
                return None
            if svc.state in (S.STARTING, S.STOPPING, S.WAITING):
                return "%s is %s; try again when it is up (rsctl status %s)" % (
                    svc.label, svc.state.value, svc.label)
            if client is not None:
                svc.waiters.append((client, "restart"))
            if svc.state in (S.UP, S.INITIALISING):
                svc.ending = Ending.REFRESH  # MINIX refresh: kill now, fresh copy now
                self._kill(svc, signal.SIGKILL)
            else:  # restarting (backoff) or deciding (a policy script asks us)
                self.on_event(svc, Event.BACKOFF_ELAPSED)

        elif event is Event.GIVE_UP_REQUESTED:
            if svc.state is S.FAILED:
                return None
            if svc.state not in (S.RESTARTING, S.DECIDING):
                return ("%s is %s: `rsctl give-up` is for a service between incarnations (what its "
                        "policy script runs); `rsctl down %s` stops a running one"
                        % (svc.label, svc.state.value, svc.label))
            self._give_up(svc, why or "%s: given up after %d restarts in a row (last failure: %s)"
                          % (svc.label, svc.restarts, (svc.last_failure or {}).get("reason")))

        elif event is Event.STOP_REQUESTED:
            if client is not None:
                svc.waiters.append((client, "down"))
            svc.cancel()
            if svc.pid is None and svc.state is not S.STARTING:
                self._remove(svc)
                return None
            svc.state = S.STOPPING
            if svc.pid is None:
                if svc.spawner is None or not svc.spawner.ready or svc.ctl is None:
                    self._remove(svc)
                return None  # the spawned report comes next, and SPAWNED kills it
            self._kill(svc, signal.SIGTERM)
            svc.timers["stop"] = self.loop.call_later(STOP_GRACE, self._kill, svc, signal.SIGKILL)

        elif event is Event.CONFIG_CHANGED:
            # A new spawner (the old one imported the old program), new ids.
            svc.spec = spec
            try:
                svc.uid, svc.gid = self.table.ids_for(spec)
                os.chown(self.paths.listen_path(svc.label), 0, svc.gid)
            except (KeyError, OSError) as exc:
                log.error("%s: cannot apply the new user/group: %s", svc.label, exc)
            old = svc.spawner
            if old is None:
                return None
            self.loop.remove_reader(old)
            old.stop()
            if svc.pid is not None:
                # The incarnation dies with its spawner; SPAWNER_DIED then
                # starts a fresh one: a refresh.
                svc.ending = Ending.REFRESH
                return None
            self._reap_soon(old)
            svc.spawner = None
            if svc.state is S.STARTING:
                self._start_incarnation(svc)
        else:
            raise ValueError("unknown event %r" % (event,))
        return None

    def _deps_up(self, svc):
        return all(self.services.get(d) is not None and self.services[d].ever_ready
                   and self.services[d].state is not State.FAILED for d in svc.spec.depends_on)

    def _resources_retry(self, svc):
        svc.timers.pop("resources", None)
        self.on_event(svc, Event.FAILED, reason="init-failed")

    # == adding services, reload, shutdown =========================================
    def add_service(self, spec, from_file):
        """A new record for spec, started; a FAILED record of its label is replaced.

        Raises (OSError, KeyError, ...) when it cannot even be tried; a failure
        once its record exists leaves it FAILED (and is raised too)."""
        old = self.services.get(spec.label)
        if old is not None and old.state is not State.FAILED:
            raise FileExistsError("%s is %s already; `rsctl down %s` first" % (spec.label, old.state.value, spec.label))
        uid, gid = self.table.ids_for(spec)
        self._check_uid_sharing(spec, uid)
        cgroup = self._make_cgroup(spec)
        svc = Svc(spec, uid, gid, from_file)
        svc.cgroup = cgroup
        svc.generation = self.table.generation(spec.label)
        svc.listen = open_listen_socket(self.paths.listen_path(spec.label), gid)
        self.services[spec.label] = svc  # in place of a FAILED record, which let go of everything
        try:
            self.on_event(svc, Event.START)
        except OSError as exc:
            svc.waiters = []
            self._give_up(svc, "%s: cannot start: %s" % (spec.label, exc))
            raise
        return svc

    def start_again(self, svc):
        """A FAILED service tried afresh from its spec (rsctl restart); the new record."""
        return self.add_service(svc.spec, svc.from_file)

    def _check_uid_sharing(self, spec, uid):
        """Two services of one uid can signal and trace each other: only when both say so."""
        for other in self.services.values():
            if other.label != spec.label and other.uid == uid and not (spec.shared_user and other.spec.shared_user):
                raise PermissionError(
                    "%s: runs as uid %d like service %s; services of one uid can kill and trace each "
                    "other, so each gets its own uid: leave `user` out (a dynamic uid), pick another "
                    "user, or set shared_user = true in both files if you accept that"
                    % (spec.source, uid, other.label))

    def _make_cgroup(self, spec):
        if self.cgroups is None:
            return None
        missing = self.cgroups.missing_controllers(spec.limits.given())
        if missing:
            raise PermissionError(
                "%s: [limits] needs the %s controller, which is not available in %s (delegate it to "
                "rsd, e.g. Delegate=yes in rsd.service, or remove those limits)"
                % (spec.source, " and ".join(missing), self.cgroups.root))
        return self.cgroups.create(spec.label, spec.limits.effective())

    def restore_saved_services(self):
        """Start the `rsctl up` services a dead predecessor ran and nobody adopted."""
        for label, data in self.table.saved_services().items():
            if label in self.services or not isinstance(data, dict):
                continue
            try:
                data = dict(data)
                source = data.pop("source", "rsctl up")
                spec = dataclasses.replace(service.from_dict(data, source=source,
                                                             policy_dir=self.paths.policy_dir),
                                           source=source)
                log.info("%s: started again (it ran under the previous rsd)", label)
                self.add_service(spec, from_file=False)
            except (service.ConfigError, OSError, KeyError, StopIteration) as exc:
                log.error("%s: cannot start it again: %s", label, exc)
        self.table.save_services()

    def reload(self):
        """Re-read services.d: start new files, stop removed ones, restart changed ones."""
        specs, errors = service.load_dir(self.paths.services_dir, self.paths.policy_dir)
        started, stopped, changed = [], [], []
        for label, svc in list(self.services.items()):
            if svc.state is State.FAILED and label in specs:
                continue  # tried again from its file below (add_service replaces the record)
            if not svc.from_file:
                if label in specs:
                    errors.append("%s: not applied: %s is running from `rsctl up`; `rsctl down %s` first"
                                  % (specs[label].source, label, label))
                    del specs[label]
                continue
            new = specs.get(label)
            if new is None:
                # A file that became invalid keeps its service running.
                if not any(svc.spec.source == e.split(":")[0] for e in errors):
                    stopped.append(label)
                    self.on_event(svc, Event.STOP_REQUESTED)
                continue
            if new != svc.spec:
                changed.append(label)
                self.on_event(svc, Event.CONFIG_CHANGED, spec=new)
            del specs[label]
        running = {label for label, svc in self.services.items() if svc.state is not State.FAILED}
        order, dep_errors = service.start_order(specs, running)
        errors.extend(dep_errors)
        for label in order:
            try:
                self.add_service(specs[label], from_file=True)
                started.append(label)
            except (OSError, KeyError, StopIteration) as exc:
                errors.append("%s: cannot start: %s" % (specs[label].source, exc))
        return {"started": started, "stopped": stopped, "changed": changed, "errors": errors}

    def shutdown(self, client):
        if self.shutting_down is None:
            self.shutting_down = []
            log.info("shutting down: stopping %d services", len(self.services))
            self.table.forget_services()
        if client is not None:
            self.shutting_down.append(client)
        for svc in list(self.services.values()):
            if svc.state is not State.STOPPING:
                self.on_event(svc, Event.STOP_REQUESTED)
        if not self.services:
            self._finish_shutdown()

    def _finish_shutdown(self):
        for client in self.shutting_down:
            client.reply({"ok": True, "state": "shut down"})
        if self.on_all_stopped is not None:
            self.on_all_stopped()

    # == spawning =======================================================================
    def _start_incarnation(self, svc):
        svc.state = State.STARTING
        if svc.ctl is not None and svc.pid is None:  # asked of a spawner that is gone
            self.loop.remove_reader(svc.ctl)
            svc.ctl.close()
            svc.ctl = None
        if svc.spawner is not None and svc.spawner.ready:
            self._spawn(svc)
            return
        if svc.spawner is None:
            sp = Spawner(svc.label, svc.spec.program_kind, svc.spec.program, svc.uid, svc.gid,
                         self.paths.log_path(svc.label), self.python, self.paths.ds_socket,
                         self.paths.adopt_socket(svc.label), self.orphan_timeout)
            sp.cgroup = svc.cgroup
            sp.extra_env = {"RSD_SANDBOX_DENY": ",".join(svc.spec.sandbox.deny),
                            "RSD_SANDBOX_ACTION": svc.spec.sandbox.action}
            sp.start()
            self.watch_spawner(svc, sp)
            self.table.save_spawners()
        # Its hello (_on_spawner) asks for the incarnation.

    def watch_spawner(self, svc, sp):
        svc.spawner = sp
        self.loop.add_reader(sp, self._on_spawner, svc, sp)
        self.loop.add_reader(sp.pidfd, self._on_spawner_exit, svc, sp)

    def _spawn(self, svc):
        svc.generation = self.table.next_generation(svc.label)
        try:
            resources = open_resource_fds(svc.spec, svc.generation, svc.uid, svc.gid)
        except (OSError, ValueError) as exc:
            self.on_event(svc, Event.RESOURCES_FAILED, why="cannot set up its [resources]: %s" % exc)
            return
        svc.mark("resources")
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fds = [theirs.fileno(), svc.listen.fileno()] + [fd for _, fd in resources]
        env = base_env(svc.label, self.paths.ds_socket)
        env.update({"RSD_CONTROL_FD": "3", "RSD_LISTEN_FD": "4",
                    "RSD_RUNTIME_DIR": os.path.dirname(self.paths.svc_dir),
                    "RSD_GENERATION": str(svc.generation),
                    "RSD_LISTEN_PATH": self.paths.listen_path(svc.label),
                    "RSD_RESOURCE_FDS": ",".join("%s=%d" % (name, 5 + i)
                                                 for i, (name, _) in enumerate(resources))})
        if svc.spec.dumpable:
            env["RSD_DUMPABLE"] = "1"
        argv = [svc.spec.program] + list(svc.spec.args)
        kind, reason = svc.next_init
        keep = os.dup(mine.fileno())  # the spawner holds our end for a successor rsd
        try:
            # Sent once the incarnation is placed (_initialise), with the PLACED byte.
            svc.init_frame = encode({"op": "init", "type": kind, "reason": reason, "restarts": svc.restarts,
                                     "generation": svc.generation, "label": svc.label})
            svc.spawner.spawn(svc.generation, env, argv, fds, keep=[keep])
        except OSError as exc:
            # Its spawner is dying; SPAWNER_DIED sees that it is still awaited and recovers.
            log.error("%s: cannot reach its spawner: %s", svc.label, exc)
            mine.close()
            return
        finally:
            os.close(keep)
            theirs.close()
            for _, fd in resources:
                os.close(fd)
        mine.setblocking(False)
        svc.ctl = Channel(mine)
        # Off the critical path: the spawner is forking meanwhile.
        self.table.save_generations()
        self.table.save_spawners()  # restart counts, for a successor rsd

    # == what the spawner says =============================================================
    def _on_spawner(self, svc, sp):
        msgs, eof = sp.read()
        for msg in msgs:
            op = msg.get("op")
            if op == "hello":
                sp.ready = True
                if svc.awaiting_spawner and svc.spawner is sp:
                    self._spawn(svc)
            elif op == "error":
                self.on_event(svc, Event.SPAWN_FAILED, sp=sp,
                              why="cannot load %s: %s" % (svc.spec.program, msg.get("error")))
                return
            elif op == "spawned":
                if not self._spawned_report(svc, sp, msg.get("pid")):
                    return
            elif op == "spawn_failed":
                self.on_event(svc, Event.SPAWN_FAILED, sp=sp, why="fork failed: %s" % msg.get("error"))
                return
            elif op == "exited":
                self._exited_report(svc, msg.get("pid"), msg.get("status"))
        if eof:
            self.loop.remove_reader(sp)  # its pidfd tells us when it is gone

    # A spawner runs its driver's import-time code: what it reports about
    # pids is checked against the kernel (a pidfd, /proc) before rsd acts
    # on it, so that a lying spawner never makes rsd signal, place or
    # forget a process that is not its incarnation.
    def _spawned_report(self, svc, sp, pid):
        """Take a "spawned" report; False if the spawner lied (and is stopped)."""
        if pid == svc.pid:
            return True  # adopted: known already
        if svc.pid is not None or svc.ctl is None:
            log.warning("%s: its spawner reports pid %r spawned, but no incarnation was asked for: ignored",
                        svc.label, pid)
            return True
        try:
            pidfd, info = open_process(pid)
        except ProcessLookupError:
            self.on_event(svc, Event.SPAWNED, pid=pid, pidfd=None)
            return True
        except (OSError, ValueError) as exc:
            pidfd, info = None, exc
        if pidfd is None or info.ppid != sp.pid or info.uids != (svc.uid,) * 4:
            if pidfd is not None:
                os.close(pidfd)
            log.warning("%s: its spawner reports pid %r as the new incarnation, which is not its child "
                        "with uid %d: ignored", svc.label, pid, svc.uid)
            self.on_event(svc, Event.SPAWN_FAILED, sp=sp,
                          why="its spawner (pid %d) reported pid %r as its incarnation, which is not its "
                          "child with uid %d; a spawner that lies is stopped" % (sp.pid, pid, svc.uid))
            return False
        self.on_event(svc, Event.SPAWNED, pid=pid, pidfd=pidfd)
        return True

    def _exited_report(self, svc, pid, status):
        """Take an "exited" report: believed only if the incarnation's pidfd says it has ended."""
        if pid is None or pid == svc.last_pid:
            return  # already handled (it died with its spawner, or before rsd looked)
        if pid != svc.pid:
            log.warning("%s: its spawner reports pid %r exited, which is not its incarnation: ignored",
                        svc.label, pid)
            return
        if not pidfd_ended(svc.pidfd):
            log.warning("%s: its spawner reports its incarnation (pid %d) exited, but it is still "
                        "running: ignored", svc.label, pid)
            return
        if not isinstance(status, int) or isinstance(status, bool):
            status = 0  # it did end; only the spawner knows how
        self.on_event(svc, Event.EXITED, status=status)

    def _on_spawner_exit(self, svc, sp):
        self.loop.remove_reader(sp.pidfd)
        if sp.sock is not None:
            # Drain what it said before dying (its last "exited" report).
            self._on_spawner(svc, sp)
            self.loop.remove_reader(sp)
        status = sp.reap()
        sp.stop()
        self.on_event(svc, Event.SPAWNER_DIED, sp=sp, status=status)

    def _drop_spawner(self, svc):
        sp = svc.spawner
        self.loop.remove_reader(sp)
        sp.stop()
        svc.spawner = None

    # == the incarnation ====================================================================
    def _initialise(self, svc):
        if svc.cgroup is not None:
            try:
                svc.cgroup.place_incarnation(svc.pid)
            except OSError as exc:
                # Never let it run outside the cgroup a restart kills.
                log.error("%s: cannot place pid %d in %s: %s; killing it", svc.label, svc.pid,
                          svc.cgroup.run, exc)
                svc.ending = Ending.INIT_FAILED
                self._kill(svc, signal.SIGKILL)
                return
        svc.state = State.INITIALISING
        svc.mark("placed")
        # The incarnation runs nothing of the service before this byte.
        try:
            svc.ctl.sock.send(PLACED + svc.init_frame, socket.MSG_DONTWAIT)
        except OSError:
            pass  # it is gone already: its exit report follows
        svc.init_frame = None
        self.watch_control(svc)
        svc.last_alive = monotonic()
        svc.timers["init"] = self.loop.call_later(svc.spec.init_timeout, self.on_event, svc,
                                                  Event.INIT_TIMEOUT)
        # The driver does not wait for these: SEF waits for its label itself
        # before its first DS request (libdrv/sef.py).
        self.publisher.register(svc.pid, svc.label)
        self.publisher.label(svc.label, svc.pid, svc.generation, svc.uid)

    def watch_control(self, svc):
        self.loop.add_reader(svc.ctl, self._on_ctl, svc, svc.ctl)

    def _on_ctl(self, svc, ctl):
        try:
            msgs = ctl.read_available()
        except (ChannelClosed, FrameError):
            self.loop.remove_reader(ctl)
            return
        svc.last_alive = monotonic()
        for msg in msgs:
            op = msg.get("op")
            if op == "ready":
                self.on_event(svc, Event.READY)
            elif op == "init_failed":
                self.on_event(svc, Event.INIT_FAILED, why=msg.get("error"))
            elif op == "nbd_connect":
                self.nbd.request(svc.spec, ctl, msg, lambda: svc.ctl is ctl)
            elif op == "cuse_open":
                self.cuse.request(svc.spec, ctl, msg, lambda: svc.ctl is ctl)

    def _became_ready(self, svc):
        svc.cancel("init")
        svc.state = State.UP
        first = not svc.ever_ready
        svc.ever_ready = True
        svc.up_since = monotonic()
        self.publisher.drv(svc.spec.cls, svc.label, "up", svc.generation)
        if first:
            self.table.save_spawners()  # a successor rsd retries it from now on
        svc.mark("ready")
        marks, svc.restart_marks = svc.restart_marks, []
        if len(marks) > 1:
            log.info("%s: up (pid %d, generation %d) %.1f ms after its predecessor ended (%s)", svc.label,
                     svc.pid, svc.generation, (marks[-1][1] - marks[0][1]) * 1e3,
                     ", ".join("%s +%.1f" % (name, (t - marks[i][1]) * 1e3)
                               for i, (name, t) in enumerate(marks[1:])))
        else:
            log.info("%s: up (pid %d, generation %d)", svc.label, svc.pid, svc.generation)
        if svc.spec.period > 0:
            svc.timers["ping"] = self.loop.call_later(svc.spec.period, self._ping, svc)
            svc.timers["heartbeat"] = self.loop.call_at(svc.last_alive + 2 * svc.spec.period,
                                                        self._heartbeat_check, svc)
        self._complete(svc, ("up", "restart"), {"ok": True, **svc.status()})
        for other in list(self.services.values()):
            self.on_event(other, Event.DEPS_UP)

    def _ping(self, svc):
        if svc.state is not State.UP:
            return
        svc.ctl.try_send({"op": "ping", "seq": svc.generation})
        svc.timers["ping"] = self.loop.call_later(svc.spec.period, self._ping, svc)

    def _heartbeat_check(self, svc):
        if svc.state is not State.UP:
            return
        deadline = svc.last_alive + 2 * svc.spec.period
        if monotonic() >= deadline:
            self.on_event(svc, Event.NO_HEARTBEAT)
        else:
            svc.timers["heartbeat"] = self.loop.call_at(deadline, self._heartbeat_check, svc)

    def _kill(self, svc, sig):
        """Signal the incarnation, through its pidfd only (a pid may be another process by now)."""
        if svc.pidfd is None:
            return
        try:
            signal.pidfd_send_signal(svc.pidfd, sig)
        except ProcessLookupError:
            pass
        if sig == signal.SIGKILL:
            self._kill_helpers(svc)

    def _kill_helpers(self, svc):
        """SIGKILL everything the incarnation forked: its cgroup, else its process group."""
        if svc.cgroup is not None:
            try:
                svc.cgroup.kill_incarnation()
            except OSError as exc:
                log.error("%s: cannot kill %s: %s", svc.label, svc.cgroup.run, exc)
        elif svc.pidfd is not None:
            try:
                # Only while it is unreaped is its pid (so its group id) still its own.
                signal.pidfd_send_signal(svc.pidfd, 0)
                os.killpg(svc.pid, signal.SIGKILL)  # it leads its process group
            except OSError:
                pass

    def _forget_incarnation(self, svc):
        """Close what rsd held of the incarnation that ended; returns its pid.

        What it forked dies with it, before anything new is started: nothing
        of one incarnation meets the next.
        """
        svc.cancel()
        self._kill_helpers(svc)
        if svc.ctl is not None:
            self.loop.remove_reader(svc.ctl)
            svc.ctl.close()
            svc.ctl = None
        if svc.pidfd is not None:
            os.close(svc.pidfd)
            svc.pidfd = None
        pid, svc.pid = svc.pid, None
        svc.last_pid = pid
        return pid

    def _record_failure(self, svc, reason, status, pid):
        uptime = monotonic() - svc.up_since if svc.up_since else 0.0
        svc.restarts = policy.decayed_restarts(svc.restarts, uptime, svc.spec.stable_uptime)
        svc.up_since = None
        sig = os.WTERMSIG(status) if status is not None and os.WIFSIGNALED(status) else None
        code = os.WEXITSTATUS(status) if status is not None and os.WIFEXITED(status) else None
        svc.last_failure = {"reason": reason, "time": time.time(), "exit_status": code,
                            "signal": sig, "pid": pid}
        log.warning("%s: %s (pid %s, exit status %s, signal %s) after %d restarts",
                    svc.label, reason, pid, code, sig, svc.restarts, extra={"RSD_REASON": reason})

    def _run_script(self, svc, reason, pid):
        f = svc.last_failure
        p = self.paths
        env = {"RS_EXIT_STATUS": "" if f["exit_status"] is None else str(f["exit_status"]),
               "RS_SIGNAL": "" if f["signal"] is None else str(f["signal"]),
               "RS_PID": "" if pid is None else str(pid),
               "RS_LOG": p.log_path(svc.label),
               "RSD_RUNTIME_DIR": p.runtime_dir, "RSD_STATE_DIR": p.state_dir,
               "RSD_CONFIG_DIR": p.config_dir,
               "RSD_SOCKET": p.control, "RSD_DS_SOCKET": p.ds_socket}
        return self.scripts.run(svc.label, svc.spec.script, reason, svc.restarts, svc.spec.script_timeout, env)

    # == removing ===========================================================================
    def _give_up(self, svc, why):
        """Stop trying: svc stays in the table as FAILED, with why, holding nothing, until
        rsctl down (removes it), restart, up or reload (start it afresh)."""
        if self.shutting_down is not None:
            self._remove(svc, error=why)  # a shutdown waits for an empty table
            return
        self._release(svc)
        svc.state = State.FAILED
        svc.gave_up = {"why": why, "time": time.time()}
        self.table.save_spawners()
        if svc.generation:
            self.publisher.down(svc.spec.cls, svc.label, svc.generation, purge=False)  # its state is kept
        log.error("%s: failed: %s; it stays failed until `rsctl restart %s` (or up, reload), "
                  "`rsctl down %s` forgets it", svc.label, why, svc.label, svc.label,
                  extra={"RSD_REASON": "gave-up"})
        self._complete(svc, None, {"ok": False, "error": why})

    def _in_use(self, label):
        """A record of label holds its cgroup and device (a FAILED one has let go of them)."""
        svc = self.services.get(label)
        return svc is not None and not svc.released

    def _release(self, svc):
        """Let go of all the service holds: timers, channel, spawner, cgroup, device, TAP, socket."""
        svc.cancel()
        if svc.released:
            return
        svc.released = True
        if svc.ctl is not None:
            self.loop.remove_reader(svc.ctl)
            svc.ctl.close()
            svc.ctl = None
        if svc.spawner is not None:
            sp = svc.spawner
            self.loop.remove_reader(sp)
            if sp.pidfd is not None:
                self.loop.remove_reader(sp.pidfd)
            sp.stop()
            self._reap_soon(sp)
            svc.spawner = None
        if svc.cgroup is not None:
            self._remove_cgroup(svc.label, svc.cgroup)
            svc.cgroup = None
        if svc.spec.resources.pci:
            self._release_device(svc.label)
        if svc.spec.resources.tap:
            tap.remove(svc.label, svc.spec.resources.tap, svc.uid)
        if svc.spec.resources.nbd:
            nbd.disconnect(self.paths.runtime_dir, svc.label, svc.spec.resources.nbd)
        if svc.listen is not None:
            svc.listen.close()
            try:
                os.unlink(self.paths.listen_path(svc.label))
            except OSError:
                pass
            svc.listen = None

    def _remove(self, svc, error=None):
        self._release(svc)
        if self.services.get(svc.label) is svc:
            del self.services[svc.label]
            self.table.save_spawners()
            if not svc.from_file and self.shutting_down is None:
                self.table.save_services()
        if svc.generation:
            if self.shutting_down is not None:
                self.publisher.drv(svc.spec.cls, svc.label, "down", svc.generation)
            else:
                self.publisher.down(svc.spec.cls, svc.label, svc.generation)
        svc.state = State.DOWN
        log.info("%s: down%s", svc.label, "" if error is None else " (%s)" % error)
        if error is None:
            self._complete(svc, None, {"ok": True, "label": svc.label, "state": "down"})
        else:
            self._complete(svc, None, {"ok": False, "error": error})
        if self.shutting_down is not None and not self.services:
            self._finish_shutdown()

    def _remove_cgroup(self, label, cgroup, tries=100):
        """Kill all that is left of the service, then rmdir its cgroups once they empty."""
        if tries < 100 and self._in_use(label):
            return  # started again meanwhile: it uses the same cgroup
        try:
            cgroup.kill_all()
            if cgroup.remove():
                return
        except OSError as exc:
            log.error("%s: cannot remove %s: %s", label, cgroup.path, exc)
            return
        if tries > 0:
            self.loop.call_later(0.05, self._remove_cgroup, label, cgroup, tries - 1)
        else:
            log.error("%s: %s still holds processes after SIGKILL; left in place", label, cgroup.path)

    def _release_device(self, label, tries=100):
        """Give the service's PCI device back once its last incarnation has let go of it."""
        if tries < 100 and self._in_use(label):
            return  # started again meanwhile: it keeps its device
        try:
            if vfio.release(label) and uio.release(label):
                return
        except OSError as exc:
            log.error("%s: cannot give its device back: %s", label, exc)
            return
        if tries > 0:
            self.loop.call_later(0.05, self._release_device, label, tries - 1)
        else:
            log.error("%s: its device is still held 5 s after it went down; left bound to vfio-pci", label)

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
