"""rsd, the reincarnation server: start-up, the loop, signals, the watchdog.

This file wires the parts together and decides nothing:

  rsd/handlers.py  one function per rsctl verb, and the dispatcher
  rsd/manager.py   the service record, its states, and Manager.on_event,
                   where every restart, refresh, stop and give-up is decided
  rsd/policy.py    the restart policy's numbers (backoff, decay, reasons)
  rsd/spawn.py     rsd's side of the spawners
  rsd/table.py     the service table and what rsd keeps on disk
  rsd/adopt.py     taking over the spawners of a previous rsd
  rsd/publish.py   what rsd tells the data store

One thread, one event loop (libdrv.loop).  See docs/rsd.md.
"""

import argparse
import logging
import os
import signal
import socket
import sys
import time

from libdrv.loop import Loop
from libdrv.proctitle import set_process_title
from libdrv.sdnotify import notify as sd_notify, watchdog_interval
from rsd import handlers, logsetup
from rsd.adopt import Adopter
from rsd.cgroup import CONTROLLERS, CgroupTree, CgroupUnavailable
from rsd.control import ControlServer, DEFAULT_RUNTIME_DIR
from rsd.manager import Manager, State
from rsd.publish import Publisher
from rsd.scripts import ScriptRunner
from rsd.table import DEFAULT_UID_BASE, Paths, Table

log = logging.getLogger("rsd")

DS_RETRY = 1.0            # seconds between attempts to reach a missing DS
STATUS_PERIOD = 1.0       # seconds between checks of what `systemctl status rsd` should say
# SIGUSR2: exit and leave every service running, for the next rsd (a new version) to adopt;
# the exit status says so (rsd.service: SuccessExitStatus=, and Restart= starts the next).
HANDOVER_SIGNAL = signal.SIGUSR2
EXIT_HANDOVER = 75
DEFAULT_ORPHAN_TIMEOUT = 60.0  # seconds services outlive a dead rsd, waiting for a new one


class Rsd:
    def __init__(self, config_dir, runtime_dir, state_dir, ds_socket=None, python=None,
                 uid_base=DEFAULT_UID_BASE, orphan_timeout=DEFAULT_ORPHAN_TIMEOUT, cgroup_root=None):
        self.paths = Paths(config_dir, runtime_dir, state_dir, ds_socket)
        self.paths.make_dirs()
        self.loop = Loop()
        self.cgroups = _setup_cgroups(cgroup_root)
        self.table = Table(self.paths, uid_base)
        self.publisher = Publisher(self.loop, self.paths.ds_socket)
        self.manager = Manager(self.loop, self.paths, self.table, self.publisher, ScriptRunner(self.loop),
                               python or sys.executable, orphan_timeout)
        self.manager.on_all_stopped = self._stopped
        self.manager.cgroups = self.cgroups
        self.adopter = Adopter(self.loop, self.paths, self.table, self.manager)
        self.handing_over = False

    def start(self):
        self.control = ControlServer(self.loop, self.paths.control,
                                     lambda client, msg: handlers.dispatch(self, client, msg))
        self.adopter.open()
        self.adopter.wait_for_predecessor()
        self.manager.restore_saved_services()
        wake_r, wake_w = socket.socketpair()
        for s in (wake_r, wake_w):
            s.setblocking(False)
        self._wake = (wake_r, wake_w)
        signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, HANDOVER_SIGNAL):
            signal.signal(sig, lambda *_: None)
        self.loop.add_reader(wake_r, self._on_signal)
        report = self.manager.reload()
        for err in report["errors"]:
            log.error("%s", err)
        self._ds_check()  # after the table is loaded: stale keys are told from live ones
        interval = watchdog_interval()
        if interval:
            self._watchdog(interval)
        self._status_text = self.status_text()
        sd_notify("READY=1", "STATUS=" + self._status_text)
        if os.environ.get("NOTIFY_SOCKET"):
            self.loop.call_later(STATUS_PERIOD, self._status_update)
        log.info("rsd ready: %d services, control socket %s", len(self.manager.services), self.control.path)

    def status_text(self):
        """What systemd shows as Status: "3 services: 2 up, 1 failed" (states as rsctl's)."""
        services = self.manager.services
        counts = {}
        for svc in services.values():
            counts[svc.state.value] = counts.get(svc.state.value, 0) + 1
        order = [s.value for s in State]
        detail = ", ".join("%d %s" % (counts[k], k) for k in sorted(counts, key=order.index))
        return "%d service%s%s" % (len(services), "" if len(services) == 1 else "s",
                                   ": " + detail if detail else "")

    def _status_update(self):
        text = self.status_text()
        if text != self._status_text:
            self._status_text = text
            sd_notify("STATUS=" + text)
        self.loop.call_later(STATUS_PERIOD, self._status_update)

    def run(self):
        self.start()
        self.loop.run()
        if not self.handing_over:
            self._remove_service_cgroups()
        self.control.close()
        self.adopter.close()
        self.publisher.close()
        return EXIT_HANDOVER if self.handing_over else 0

    def _remove_service_cgroups(self, wait_s=2.0):
        """After a shutdown: the services' cgroups whose removal was still pending when the
        loop stopped (it waits for them to empty), removed now, or reported."""
        if self.cgroups is None or not os.path.isdir(self.cgroups.services):
            return
        deadline = time.monotonic() + wait_s
        for label in sorted(os.listdir(self.cgroups.services)):
            if not os.path.isdir(os.path.join(self.cgroups.services, label)):
                continue
            cg = self.cgroups.service(label)
            try:
                cg.kill_all()
                while not cg.remove():
                    if time.monotonic() > deadline:
                        log.error("%s: %s still holds processes after SIGKILL; left in place",
                                  label, cg.path)
                        break
                    time.sleep(0.05)
            except OSError as exc:
                log.error("%s: cannot remove %s: %s", label, cg.path, exc)

    def _stopped(self):
        sd_notify("STOPPING=1")
        self.loop.stop()

    def _watchdog(self, interval):
        sd_notify("WATCHDOG=1")
        self.loop.call_later(interval, self._watchdog, interval)

    def _on_signal(self):
        try:
            data = self._wake[0].recv(64)
        except BlockingIOError:
            return
        if signal.SIGHUP in data:
            for err in self.manager.reload()["errors"]:
                log.error("%s", err)
        if signal.SIGTERM in data or signal.SIGINT in data:
            self.manager.shutdown(None)
        elif HANDOVER_SIGNAL in data and self.manager.shutting_down is None:
            log.info("handing over: exiting with %d services left running for the next rsd to adopt",
                     len(self.manager.services))
            self.handing_over = True
            self.loop.stop()

    def _ds_check(self):
        """Keep a DS connection; after a reconnect, republish everything."""
        if not self.publisher.connected and self.publisher.connect():
            self._resync()
        self.loop.call_later(DS_RETRY, self._ds_check)

    def _resync(self):
        services = self.manager.services
        self.publisher.clear_stale(set(services))
        for svc in services.values():
            if svc.pid is not None:
                self.publisher.register(svc.pid, svc.label)
                self.publisher.label(svc.label, svc.pid, svc.generation, svc.uid)
            state = {State.UP: "up", State.FAILED: "down"}.get(svc.state, "restarting")
            if svc.generation:
                self.publisher.drv(svc.spec.cls, svc.label, state, svc.generation)


def _setup_cgroups(root):
    """rsd's cgroup subtree, or None (with a loud warning) where there is none to use."""
    try:
        tree = CgroupTree.setup(root)
    except CgroupUnavailable as exc:
        if root is not None:
            raise  # asked for by name: not having it is an error
        log.warning("NO CGROUP CONTAINMENT: %s; services are contained by process group only, so a "
                    "helper that leaves its process group (setsid) outlives its service, and "
                    "[limits] cannot be applied", exc.strerror)
        return None
    missing = sorted(set(CONTROLLERS) - set(tree.controllers))
    log.info("services run in cgroups under %s/services (controllers: %s%s)", tree.root,
             " ".join(tree.controllers) or "none",
             "; not delegated here: %s, so those [limits] are not applied" % " ".join(missing)
             if missing else "")
    return tree


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
    p.add_argument("--cgroup-root", default=os.environ.get("RSD_CGROUP_ROOT"),
                   help="cgroup v2 directory under which each service gets its cgroup (default "
                        "$RSD_CGROUP_ROOT, else rsd's own cgroup when delegated to it, else "
                        "<cgroup2 mount>/rsd)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    a = p.parse_args(argv)
    set_process_title("rsd")  # for `pidof rsd`
    logsetup.setup(a.log_level.upper())
    if os.geteuid() != 0:
        print("rsd: must run as root (it drops privilege for each service itself)", file=sys.stderr)
        return 1
    if a.uid_base <= 0:
        print("rsd: --uid-base must be a positive uid", file=sys.stderr)
        return 2
    try:
        rsd = Rsd(os.path.abspath(a.config_dir), os.path.abspath(a.runtime_dir),
                  os.path.abspath(a.state_dir), a.ds_socket, python=a.python, uid_base=a.uid_base,
                  orphan_timeout=max(0.0, a.orphan_timeout), cgroup_root=a.cgroup_root)
        return rsd.run()
    except (RuntimeError, OSError) as exc:
        print("rsd: %s" % exc, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
