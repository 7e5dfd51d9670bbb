#!/usr/bin/env python3
"""Crash -> ready latency of one small Python service under rsd and its peers.

The same service (bench/restart_service.py) runs under rsd,
systemd, s6, runit and supervisord, each in its default and its fastest
documented setting, all side by side in one run. The bench SIGKILLs the
service and measures the time until the new incarnation announces that it
is ready (one datagram with its pid and a CLOCK_MONOTONIC timestamp).

    sudo .venv/bin/python bench/bench_restart.py [--runs 1] [--kills 25] [--gap 1.2]

(bench/README.md lists the rows and options.) All supervisors run at the same time, but kills are serialised: a row is
killed only when no other restart is in flight, and only `--gap` seconds
after its current incarnation became ready, so the 1 s floors of s6 and
runit (counted from the last readiness or start) show only in the settings
that cannot avoid them.

Clean-up: the bench re-executes itself inside a new PID + mount namespace
(`unshare --pid --kill-child`); when the bench ends, however it ends, the
kernel kills every supervisor and service it started. If unshare is refused
the bench stops and says so; --no-sandbox runs without it (supervisors then
die with the bench through a parent-death signal, their services may not).
"""
import argparse
import json
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SERVICE = os.path.join(HERE, "restart_service.py")
PYTHON = sys.executable
SANDBOX_ENV = "RSD_BENCH_SANDBOX"
OUTER_UID_ENV = "RSD_BENCH_OUTER_UID"  # the uid we had before unshare (0 inside a user ns)
NS = 1_000_000_000


# ---------------------------------------------------------------- listening

@dataclass
class Announcement:
    tag: str
    pid: int
    ready_ns: int
    received_ns: int


class Listener:
    """The unix datagram socket every service announces its readiness to."""

    def __init__(self, path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        os.chmod(path, 0o666)  # services may run under another uid

    def receive(self, deadline_ns):
        """Next well-formed announcement before deadline_ns, else None."""
        while True:
            left = (deadline_ns - time.monotonic_ns()) / NS
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(512)
            except socket.timeout:
                return None
            received = time.monotonic_ns()
            parts = data.decode(errors="replace").split()
            if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
                return Announcement(parts[0], int(parts[1]), int(parts[2]), received)
            print(f"warning: ignored malformed announcement {data[:80]!r}", file=sys.stderr)

    def close(self):
        self.sock.close()


# ---------------------------------------------------------------- processes

def _die_with_parent():
    """preexec_fn: SIGKILL this child when the bench dies (fallback clean-up)."""
    import ctypes
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def spawn(argv, cwd, log_path, env=None):
    log = open(log_path, "ab")
    try:
        return subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, preexec_fn=_die_with_parent)
    finally:
        log.close()


def terminate(proc, grace_s=3.0):
    """SIGTERM a supervisor (they all stop their service on it), then SIGKILL its group."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def kill_quietly(pid):
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def write_file(path, text, mode=0o644):
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)


def service_argv(tag, socket_path, *extra):
    return [PYTHON, SERVICE, tag, socket_path, *extra]


def sh_exec_script(argv):
    """A ./run script as s6 and runit users write it: sh that execs the service."""
    import shlex
    return "#!/bin/sh\nexec " + " ".join(shlex.quote(a) for a in argv) + "\n"


# ---------------------------------------------------------------- peers

class Peer:
    """One row: a supervisor in one setting, supervising one service instance."""
    supervisor = ""
    setting = ""
    notes = ""

    def __init__(self, tag):
        self.tag = tag
        self.procs = []
        self.unavailable = None  # reason string when this row cannot run here

    def probe(self):
        """Return None if this row can run here, else the reason it cannot."""
        return None

    def start(self, workdir, socket_path):
        raise NotImplementedError

    def stop(self):
        for proc in reversed(self.procs):
            terminate(proc)

    def logs(self):
        return []


class ExecBaseline(Peer):
    """No supervisor: the bench itself reaps and re-executes the service right
    after each kill (posix_spawn, nothing else). The floor for any supervisor
    that execs the program."""
    supervisor = "(none: bench re-execs)"
    setting = "waitpid + posix_spawn of the same python service"
    notes = "what any exec-based supervisor pays at least: the interpreter start"

    def start(self, workdir, socket_path):
        self.argv = service_argv(self.tag, socket_path)
        self.log_fd = os.open(os.path.join(workdir, self.tag + ".log"),
                              os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        self.pid = self._spawn()

    def _spawn(self):
        actions = [(os.POSIX_SPAWN_DUP2, self.log_fd, 1), (os.POSIX_SPAWN_DUP2, self.log_fd, 2)]
        return os.posix_spawn(PYTHON, self.argv, os.environ, file_actions=actions)

    def after_kill(self):
        os.waitpid(self.pid, 0)
        self.pid = self._spawn()

    def stop(self):
        if getattr(self, "pid", None):
            kill_quietly(self.pid)
            os.waitpid(self.pid, 0)
            os.close(self.log_fd)


def really_root():
    """Root outside any user namespace the bench made for itself."""
    return os.geteuid() == 0 and os.environ.get(OUTER_UID_ENV, "0") == "0"


def _need(*programs):
    missing = [p for p in programs if shutil.which(p) is None]
    if missing:
        return f"{', '.join(missing)} not installed (apt-get install s6 runit supervisor)"
    return None


class S6Peer(Peer):
    supervisor = "s6-supervise"
    VARIANTS = {
        "default": "default (no notification-fd)",
        "notify": "notification-fd 3",
        "notify-finish": "notification-fd 3 + ./finish",
    }

    def __init__(self, tag, variant):
        super().__init__(tag)
        self.variant = variant
        self.setting = self.VARIANTS[variant]
        if variant == "default":
            self.notes = "without readiness it waits 1 s after every death"
        else:
            self.notes = ("the 1 s throttle runs from the last readiness; kills come "
                          "after --gap, so it is not hit")

    def probe(self):
        return _need("s6-supervise")

    def start(self, workdir, socket_path):
        sdir = os.path.join(workdir, "s6-" + self.tag)
        os.makedirs(sdir)
        extra = () if self.variant == "default" else ("--notify-fd", "3")
        write_file(os.path.join(sdir, "run"),
                   sh_exec_script(service_argv(self.tag, socket_path, *extra)), 0o755)
        if self.variant != "default":
            write_file(os.path.join(sdir, "notification-fd"), "3\n")
        if self.variant == "notify-finish":
            write_file(os.path.join(sdir, "finish"), "#!/bin/sh\nexit 0\n", 0o755)
        self.log = os.path.join(workdir, self.tag + ".log")
        self.procs.append(spawn(["s6-supervise", sdir], workdir, self.log))

    def logs(self):
        return [self.log]


class RunitPeer(Peer):
    supervisor = "runit runsv"
    setting = "default (no faster setting exists)"
    notes = "waits 1 s only if ./run lived < 1 s; kills come after --gap, so it is not hit"

    def probe(self):
        return _need("runsv")

    def start(self, workdir, socket_path):
        sdir = os.path.join(workdir, "runit-" + self.tag)
        os.makedirs(sdir)
        write_file(os.path.join(sdir, "run"),
                   sh_exec_script(service_argv(self.tag, socket_path)), 0o755)
        self.log = os.path.join(workdir, self.tag + ".log")
        self.procs.append(spawn(["runsv", sdir], workdir, self.log))

    def logs(self):
        return [self.log]


class SupervisordPeer(Peer):
    supervisor = "supervisord"

    def __init__(self, tag, fastest):
        super().__init__(tag)
        self.fastest = fastest
        if fastest:
            self.setting = "startsecs=0 autorestart=true"
        else:
            self.setting = "default (autorestart=unexpected, startsecs=1)"
        self.notes = ("its loop acts on a reaped child only at the next pass, after a 1 s "
                      "poll timeout")

    def probe(self):
        return _need("supervisord")

    def start(self, workdir, socket_path):
        import shlex
        cdir = os.path.join(workdir, "supervisord-" + self.tag)
        os.makedirs(cdir)
        program = [f"command={shlex.join(service_argv(self.tag, socket_path))}",
                   "stdout_logfile=" + os.path.join(cdir, "service.log"),
                   "redirect_stderr=true"]
        if self.fastest:
            program += ["startsecs=0", "autorestart=true"]
        conf = "\n".join([
            "[supervisord]", "nodaemon=true", "user=root" if os.geteuid() == 0 else "",
            f"logfile={cdir}/supervisord.log", f"pidfile={cdir}/supervisord.pid",
            f"childlogdir={cdir}", "",
            f"[program:{self.tag}]", *program, ""])
        conf_path = os.path.join(cdir, "supervisord.conf")
        write_file(conf_path, conf)
        self.log = os.path.join(cdir, "supervisord.log")
        self.procs.append(spawn(["supervisord", "-n", "-c", conf_path], cdir,
                                os.path.join(cdir, "stdout.log")))

    def logs(self):
        return [self.log]


class SystemdPeer(Peer):
    """systemd's service manager, run as a user manager (PID 1 here is not systemd).

    `systemd --user` runs only where /run/systemd/system exists, and on start it
    moves every process of its own cgroup into <cgroup>/init.scope, in every
    cgroup hierarchy it can see. So each manager runs in a mount namespace of
    its own that shows it a /run/systemd/system and only the controller-less
    cgroup hierarchies (name=systemd, unified), and it starts in a fresh empty
    cgroup there: nothing but itself and its service is ever moved."""
    supervisor = "systemd --user"
    notes = ("not PID 1 here (a user manager in its own mount ns and cgroup); Type=notify; "
             "Restart= is off by default; StartLimitIntervalSec=0, else the 6th start in 10 s "
             "is refused")
    MANAGER = "/lib/systemd/systemd"
    HIERARCHIES = ("/sys/fs/cgroup/systemd", "/sys/fs/cgroup/unified")

    def __init__(self, tag, restart_sec):
        super().__init__(tag)
        self.restart_sec = restart_sec
        self.cgroup = None
        if restart_sec is None:
            self.setting = "Restart=always, RestartSec unset (100ms)"
        else:
            self.setting = f"Restart=always, RestartSec={restart_sec}"

    def probe(self):
        if not os.access(self.MANAGER, os.X_OK):
            return f"{self.MANAGER} not installed (apt-get install systemd)"
        if not really_root() or os.environ.get(SANDBOX_ENV) != "1":
            return "needs root and the bench's PID namespace (mounts, cgroups, clean-up)"
        missing = [h for h in self.HIERARCHIES + ("/run/systemd",) if not os.path.isdir(h)]
        if missing:
            return f"needs {', '.join(missing)} (a systemd-style cgroup layout)"
        return None

    def start(self, workdir, socket_path):
        import shlex
        home = os.path.join(workdir, "systemd-" + self.tag)
        self.cgroup = f"{os.path.basename(workdir)}-{self.tag}"  # unique per run
        units = os.path.join(home, "config", "systemd", "user")
        runtime = os.path.join(home, "runtime")
        os.makedirs(units)
        os.makedirs(runtime, mode=0o700)
        unit = self.tag + ".service"  # unique: unit names are cgroup names
        restart_sec = "" if self.restart_sec is None else f"RestartSec={self.restart_sec}\n"
        # '%' starts a unit specifier: the command line must not contain one.
        command = shlex.join(service_argv(self.tag, socket_path, "--sd-notify"))
        if "%" in command:
            raise RuntimeError(f"path contains '%', which systemd would expand: {command}")
        write_file(os.path.join(units, unit),
                   "[Unit]\nStartLimitIntervalSec=0\n\n"
                   f"[Service]\nType=notify\nNotifyAccess=main\nExecStart={command}\n"
                   f"Restart=always\n{restart_sec}")
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": home,
               "XDG_RUNTIME_DIR": runtime, "XDG_CONFIG_HOME": os.path.join(home, "config"),
               "SYSTEMD_LOG_TARGET": "console", "SYSTEMD_LOG_LEVEL": "notice"}
        setup = "\n".join([
            "set -e",
            "mount -t tmpfs -o mode=755 tmpfs /run/systemd",
            "mkdir /run/systemd/system",
            "mount -t tmpfs -o mode=755 tmpfs /sys/fs/cgroup",
            "mkdir /sys/fs/cgroup/systemd /sys/fs/cgroup/unified",
            "mount -t cgroup -o none,name=systemd cgroup /sys/fs/cgroup/systemd",
            "mount -t cgroup2 cgroup2 /sys/fs/cgroup/unified",
            f"for h in /sys/fs/cgroup/systemd /sys/fs/cgroup/unified; do "
            f"mkdir $h/{self.cgroup}; echo $$ > $h/{self.cgroup}/cgroup.procs; done",
            f"exec {self.MANAGER} --user --unit={unit}",
        ])
        self.log = os.path.join(home, "manager.log")
        self.procs.append(spawn(["unshare", "--mount", "--propagation", "private",
                                 "/bin/sh", "-c", setup], home, self.log, env=env))

    def stop(self):
        super().stop()
        for hierarchy in self.HIERARCHIES if self.cgroup else ():
            remove_cgroup(os.path.join(hierarchy, self.cgroup))

    def logs(self):
        return [self.log]


def remove_cgroup(path, attempts=50):
    """rmdir a cgroup subtree, leaves first (only empty cgroups can go)."""
    if not os.path.isdir(path):
        return True
    for _ in range(attempts):  # the manager's last processes may take a moment to go
        try:
            for root, dirs, _files in os.walk(path, topdown=False):
                for d in dirs:
                    os.rmdir(os.path.join(root, d))
            os.rmdir(path)
            return True
        except OSError:
            time.sleep(0.1)
    if attempts > 1:
        print(f"warning: could not remove cgroup {path}", file=sys.stderr)
    return False


# ---------------------------------------------------------------- rsd

class RsdPeer(Peer):
    """rsd as documented: a DS daemon and rsd in a temp runtime dir, the service
    declared in services.d/<label>.toml with backoff = false (restart at once
    every time; MINIX `service -b`). The service is the same program, run as a
    libdrv SEF driver forked from rsd's pre-imported spawner.

    Two readiness paths are measured: the service's own announcement (as for
    every peer) and rsd's: the DS notification drv.server.<label> = "up <gen>"
    that front ends wait for, which rsd publishes when SEF says ready."""
    supervisor = "rsd"
    LABEL = "restartbench"

    def __init__(self, tag, ds_fsync=True, uid_base=600000):
        super().__init__(tag)
        self.ds_fsync = ds_fsync
        self.uid_base = uid_base
        self.ups = []  # (monotonic_ns received, value) of drv.* notifications
        self.watcher = None
        if ds_fsync:
            self.setting = "backoff=false, SEF driver forked from the spawner"
            self.notes = "announcement made in SEF init, before SEF tells rsd ready"
        else:
            self.setting = "same, DS started with --no-fsync (diagnostic, not a default)"
            self.notes = "shows what DS's journal fsync adds to rsd's restart path"

    def probe(self):
        needed = ("rsd/main.py", "rsd/spawner.py", "libdrv/sef.py", "datastore/server.py")
        missing = [p for p in needed if not os.path.exists(os.path.join(REPO, p))]
        if missing:
            return "rsd not available: " + ", ".join(missing) + " missing"
        if not really_root():
            return "rsd not available: rsd must run as root (it drops privilege per service)"
        done = subprocess.run([PYTHON, "-c", "import rsd.main, rsd.spawner, libdrv.sef, libdrv.dsclient"],
                              capture_output=True, text=True, cwd=REPO)
        if done.returncode != 0:
            return "rsd not available: cannot import it: " + done.stderr.strip().splitlines()[-1]
        return None

    def start(self, workdir, socket_path):
        base = os.path.join(workdir, self.tag)
        config, runtime, state = (os.path.join(base, d) for d in ("config", "runtime", "state"))
        os.makedirs(os.path.join(config, "services.d"))
        ds_socket = os.path.join(runtime, "ds.sock")
        self.logs_ = [os.path.join(base, "datastore.log"), os.path.join(base, "rsd.log"),
                      os.path.join(state, "log", self.LABEL + ".log")]
        env = dict(os.environ, RSD_DS_SOCKET=ds_socket)
        env.pop("NOTIFY_SOCKET", None)
        fsync = [] if self.ds_fsync else ["--no-fsync"]
        self.procs.append(spawn([PYTHON, "-m", "datastore.server", "--runtime-dir", runtime,
                                 "--state-dir", state, *fsync], base, self.logs_[0], env=env))
        self.watcher = DrvWatcher(ds_socket, self.LABEL, self.ups)  # waits for DS to listen
        write_file(os.path.join(config, "services.d", self.LABEL + ".toml"),
                   f'program = "{SERVICE}"\n'
                   f"args = {json.dumps([self.tag, socket_path])}\n"
                   "backoff = false\n")
        self.procs.append(spawn([PYTHON, "-m", "rsd.main", "--config-dir", config,
                                 "--runtime-dir", runtime, "--state-dir", state,
                                 "--uid-base", str(self.uid_base)],
                                base, self.logs_[1], env=env))

    def stop(self):
        super().stop()
        if self.watcher is not None:
            self.watcher.close()

    def logs(self):
        return self.logs_

    def supervisor_ready(self, kills_ns):
        """For each kill time, ns until rsd published the next 'up' (None if never)."""
        ups = [t for t, value in self.ups if str(value).startswith("up ")]
        out = []
        for i, killed in enumerate(kills_ns):
            limit = kills_ns[i + 1] if i + 1 < len(kills_ns) else float("inf")
            after = [t for t in ups if killed < t < limit]
            out.append(after[0] - killed if after else None)
        return out


class DrvWatcher:
    """A DS subscriber on drv.*.<label>, in a thread: records when each value arrives."""

    def __init__(self, ds_socket, label, sink, timeout_s=10.0):
        import threading
        from libdrv.dsclient import DSClient, DSError
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.client = DSClient(ds_socket, timeout=2.0)
                break
            except (DSError, OSError) as e:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the data store did not come up: {e}")
                time.sleep(0.02)
        self.client.subscribe(r"drv\.[a-z]+\." + label)
        self.sink = sink
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while self.running:
            try:
                notes = self.client.get_notifications(timeout=0.5)
            except Exception:  # DS went away (the end of the run): stop watching
                return
            now = time.monotonic_ns()
            self.sink.extend((now, n.value) for n in notes if n.event == "set")

    def close(self):
        self.running = False
        self.thread.join(2.0)
        self.client.close()


# ---------------------------------------------------------------- measuring

@dataclass
class Row:
    peer: Peer
    pid: int = 0
    ready_ns: int = 0
    latencies_ns: list = field(default_factory=list)
    received_ns: list = field(default_factory=list)
    kills_ns: list = field(default_factory=list)
    failure: str = ""
    unexpected: int = 0

    @property
    def live(self):
        return not self.peer.unavailable and not self.failure


def build_rows(only):
    peers = [
        RsdPeer("rsd"),
        RsdPeer("rsd-ds-nofsync", ds_fsync=False, uid_base=601000),
        ExecBaseline("exec-baseline"),
        SystemdPeer("systemd-default", None),
        SystemdPeer("systemd-fast", 0),
        S6Peer("s6-default", "default"),
        S6Peer("s6-notify", "notify"),
        S6Peer("s6-notify-finish", "notify-finish"),
        RunitPeer("runit"),
        SupervisordPeer("supervisord-default", fastest=False),
        SupervisordPeer("supervisord-fast", fastest=True),
    ]
    if only:
        unknown = set(only) - {p.tag for p in peers}
        if unknown:
            raise SystemExit(f"--only: unknown rows {sorted(unknown)}; "
                             f"choose from {[p.tag for p in peers]}")
        peers = [p for p in peers if p.tag in only]
    return [Row(p) for p in peers]


def tail(path, lines=8):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def route(rows_by_tag, ann):
    """Record an announcement that is not the one being waited for."""
    row = rows_by_tag.get(ann.tag)
    if row is None:
        print(f"warning: announcement from unknown service {ann.tag!r}", file=sys.stderr)
        return
    if row.pid and ann.pid != row.pid:
        row.unexpected += 1  # restarted without our kill: says the service died on its own
    row.pid, row.ready_ns = ann.pid, ann.ready_ns


def start_rows(rows, workdir, listener, timeout_s):
    rows_by_tag = {r.peer.tag: r for r in rows}
    for row in rows:
        row.peer.unavailable = row.peer.probe()
        if row.peer.unavailable:
            continue
        try:
            row.peer.start(workdir, listener.path)
        except Exception as e:  # a peer that cannot start is a row, not a crash
            row.failure = f"cannot start: {e}"
    deadline = time.monotonic_ns() + int(timeout_s * NS)
    while any(r.live and not r.pid for r in rows):
        ann = listener.receive(deadline)
        if ann is None:
            break
        route(rows_by_tag, ann)
    for row in rows:
        if row.live and not row.pid:
            logs = "; ".join(tail(p, 3).strip() for p in row.peer.logs())
            row.failure = f"no first announcement within {timeout_s:.0f} s ({logs or 'no log'})"


def kill_and_wait(row, rows_by_tag, listener, timeout_s):
    old_pid = row.pid
    killed_ns = time.monotonic_ns()
    try:
        os.kill(old_pid, signal.SIGKILL)
    except ProcessLookupError:
        row.failure = f"service pid {old_pid} was already gone before kill {len(row.latencies_ns) + 1}"
        return
    if hasattr(row.peer, "after_kill"):
        row.peer.after_kill()
    deadline = killed_ns + int(timeout_s * NS)
    while True:
        ann = listener.receive(deadline)
        if ann is None:
            row.failure = (f"no restart within {timeout_s:.0f} s after kill "
                           f"{len(row.latencies_ns) + 1}")
            return
        if ann.tag == row.peer.tag and ann.pid != old_pid:
            row.pid, row.ready_ns = ann.pid, ann.ready_ns
            row.kills_ns.append(killed_ns)
            row.latencies_ns.append(ann.ready_ns - killed_ns)
            row.received_ns.append(ann.received_ns - killed_ns)
            return
        route(rows_by_tag, ann)


def measure(rows, listener, kills, gap_s, timeout_s):
    """Kill each live row `kills` times; one restart in flight at a time."""
    rows_by_tag = {r.peer.tag: r for r in rows}
    gap_ns = int(gap_s * NS)
    while True:
        waiting = [r for r in rows if r.live and len(r.latencies_ns) < kills]
        if not waiting:
            return
        row = min(waiting, key=lambda r: r.ready_ns)  # longest-ready first: round robin
        pause = (row.ready_ns + gap_ns - time.monotonic_ns()) / NS
        if pause > 0:
            time.sleep(pause)
        kill_and_wait(row, rows_by_tag, listener, timeout_s)


# ---------------------------------------------------------------- reporting

def p90(values):
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.9 * len(ordered)) - 1)]


def summarise(runs):
    """One entry per row, pooling its kills over all runs (runs: lists of Rows, same order)."""
    out = []
    for same_row in zip(*runs):
        peer = same_row[0].peer
        ms = [v / 1e6 for row in same_row for v in row.latencies_ns]
        received = [v / 1e6 for row in same_row for v in row.received_ns]
        entry = {"row": peer.tag, "supervisor": peer.supervisor, "setting": peer.setting,
                 "notes": peer.notes, "kills": len(ms),
                 "unexpected_restarts": sum(row.unexpected for row in same_row)}
        errors = [row.peer.unavailable or row.failure for row in same_row
                  if row.peer.unavailable or row.failure]
        if errors:
            entry["error"] = errors[0]
        if ms:
            entry.update(median_ms=statistics.median(ms), p90_ms=p90(ms), min_ms=min(ms),
                         max_ms=max(ms), received_median_ms=statistics.median(received),
                         run_medians_ms=[statistics.median(row.latencies_ns) / 1e6
                                         for row in same_row if row.latencies_ns])
        if hasattr(peer, "supervisor_ready") and ms:
            seen = [v / 1e6 for row in same_row
                    for v in row.peer.supervisor_ready(row.kills_ns) if v is not None]
            entry["supervisor_ready_seen"] = len(seen)
            if seen:
                entry.update(supervisor_ready_median_ms=statistics.median(seen),
                             supervisor_ready_p90_ms=p90(seen))
        out.append(entry)
    rsd = next((e for e in out if e["row"] == "rsd" and "median_ms" in e and "error" not in e), None)
    for e in out:
        if rsd and "median_ms" in e:
            e["x_rsd_median"] = e["median_ms"] / rsd["median_ms"]
            e["x_rsd_p90"] = e["p90_ms"] / rsd["p90_ms"]
    return out


def one_line(text, limit=160):
    text = " ".join(str(text).split()).replace("|", "/")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def render(summary, markdown):
    head = ["supervisor", "setting", "kills", "median ms", "p90 ms", "min ms", "max ms",
            "run medians ms", "median / rsd", "p90 / rsd"]
    lines = []
    for e in summary:
        if "error" in e and "median_ms" not in e:
            cells = [e["supervisor"], e["setting"], str(e["kills"]), one_line(e["error"]),
                     "", "", "", "", "", ""]
        else:
            ratio = lambda k: f"{e[k]:.1f}x" if k in e else "n/a"
            cells = [e["supervisor"], e["setting"], str(e["kills"]),
                     f"{e['median_ms']:.1f}", f"{e['p90_ms']:.1f}",
                     f"{e['min_ms']:.1f}", f"{e['max_ms']:.1f}",
                     " ".join(f"{m:.1f}" for m in e["run_medians_ms"]),
                     ratio("x_rsd_median"), ratio("x_rsd_p90")]
            if "error" in e:
                cells[1] += f" [stopped early: {one_line(e['error'])}]"
        lines.append(cells)
    if markdown:
        rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        rows += ["| " + " | ".join(c) + " |" for c in lines]
        return "\n".join(rows)
    widths = [max(len(h), *(len(c[i]) for c in lines)) if lines else len(h)
              for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(c) for c in lines])


# ---------------------------------------------------------------- sandbox

def unshare_argv():
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    argv = [unshare, "--pid", "--fork", "--kill-child", "--mount", "--propagation", "private",
            "--mount-proc"]
    if os.geteuid() != 0:
        argv.insert(1, "--map-root-user")
    return argv


def enter_sandbox():
    """Re-exec inside a PID + mount namespace; returns only if that is impossible."""
    argv = unshare_argv()
    if argv is None:
        return "unshare(1) not found"
    probe = subprocess.run(argv + ["true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return "unshare refused: " + probe.stderr.strip()
    env = dict(os.environ, **{SANDBOX_ENV: "1", OUTER_UID_ENV: str(os.geteuid())})
    os.execve(argv[0], argv + [PYTHON, os.path.abspath(__file__)] + sys.argv[1:], env)


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=25, help="SIGKILLs per row (>= 20 for results)")
    ap.add_argument("--runs", type=int, default=1,
                    help="repeat the whole measurement (fresh supervisors) this many times")
    ap.add_argument("--gap", type=float, default=1.2,
                    help="seconds between a service's readiness and its next kill (> 1)")
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for a restart")
    ap.add_argument("--only", default="", help="comma-separated row tags to run")
    ap.add_argument("--markdown", action="store_true", help="print the table as markdown")
    ap.add_argument("--json", metavar="PATH", help="also write the raw results as JSON")
    ap.add_argument("--keep", action="store_true",
                    help="keep the temp dir (supervisor and service logs) and print its path")
    ap.add_argument("--no-sandbox", action="store_true",
                    help="do not re-exec in a PID namespace (a killed bench may then leave "
                         "services behind)")
    args = ap.parse_args(argv)
    if args.kills < 1 or args.runs < 1:
        ap.error("--kills and --runs must be at least 1")
    if args.gap <= 0 or args.timeout <= 0:
        ap.error("--gap and --timeout must be positive")
    args.only = [t for t in args.only.split(",") if t]
    return args


WORKDIR_PREFIX = "rsd-bench-restart-"


def make_workdir():
    """A temp dir holding a lock for as long as this bench lives (see sweep_stale)."""
    import fcntl
    workdir = tempfile.mkdtemp(prefix=WORKDIR_PREFIX)
    os.chmod(workdir, 0o755)  # rsd runs its service under a dynamic unprivileged uid
    lock = os.open(os.path.join(workdir, ".lock"), os.O_CREAT | os.O_RDWR, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)  # released by the kernel however the bench ends
    return workdir, lock


def sweep_stale():
    """Remove what a killed earlier run left: its temp dir and empty cgroups."""
    import fcntl
    import glob
    for workdir in glob.glob(os.path.join(tempfile.gettempdir(), WORKDIR_PREFIX + "*")):
        try:
            lock = os.open(os.path.join(workdir, ".lock"), os.O_RDWR)
        except OSError:
            continue  # not ours, or being created right now
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # a live bench holds it
        finally:
            os.close(lock)
        shutil.rmtree(workdir, ignore_errors=True)
    for hierarchy in SystemdPeer.HIERARCHIES:
        for path in glob.glob(os.path.join(hierarchy, WORKDIR_PREFIX + "*")):
            remove_cgroup(path, attempts=1)  # fails, harmlessly, while in use


def run_once(rows, args):
    """Start every row's supervisor, kill its service args.kills times, stop everything."""
    workdir, lock = make_workdir()
    listener = Listener(os.path.join(workdir, "ready.sock"))
    try:
        start_rows(rows, workdir, listener, args.timeout)
        measure(rows, listener, args.kills, args.gap, args.timeout)
        time.sleep(0.5)  # let the last supervisor-side notifications (rsd's DS publish) arrive
    finally:
        for row in rows:
            row.peer.stop()
            if row.pid:
                kill_quietly(row.pid)
        listener.close()
        if args.keep:
            print(f"# logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
        os.close(lock)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    sandbox = "pid+mount namespace" if os.environ.get(SANDBOX_ENV) == "1" else None
    if not sandbox and not args.no_sandbox:
        reason = enter_sandbox()  # returns only on failure
        raise SystemExit(f"bench_restart: cannot run in a PID namespace ({reason}). Run it as "
                         "root, or pass --no-sandbox to run without one: then a bench that is "
                         "killed can leave services (not supervisors) behind.")
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, _: sys.exit(128 + signum))

    sweep_stale()
    started = time.monotonic()
    runs = []
    for _ in range(args.runs):
        rows = build_rows(args.only)
        run_once(rows, args)
        runs.append(rows)
    elapsed = time.monotonic() - started

    summary = summarise(runs)
    print("# restart latency: SIGKILL -> new incarnation's readiness announcement")
    print(f"# {args.runs} run(s) x {args.kills} kills per row, kills >= {args.gap} s after readiness, one restart "
          f"in flight at a time; python {sys.version.split()[0]} ({PYTHON}); "
          f"{elapsed:.0f} s; clean-up: {sandbox or 'signals only'}")
    print(render(summary, args.markdown))
    notes = [f"{e['supervisor']} {e['setting']}: {e['notes']}" for e in summary if e["notes"]]
    notes += [f"{e['row']}: kill -> rsd published up (DS notification received): median "
              f"{e['supervisor_ready_median_ms']:.1f} ms, p90 {e['supervisor_ready_p90_ms']:.1f} ms "
              f"({e['supervisor_ready_seen']} of {e['kills']} kills)"
              for e in summary if "supervisor_ready_median_ms" in e]
    unexpected = [f"{e['row']}: {e['unexpected_restarts']} restarts not caused by the bench"
                  for e in summary if e["unexpected_restarts"]]
    for line in notes + unexpected:
        print("# " + line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs": args.runs, "kills": args.kills, "gap_s": args.gap, "python": PYTHON,
                       "elapsed_s": elapsed, "rows": summary}, f, indent=2)
    failed = [e for e in summary if "error" in e and e["row"] != "rsd"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
