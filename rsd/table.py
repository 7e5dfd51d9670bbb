"""The service table and what rsd keeps of it on disk.

rsd's state directory holds small JSON tables, each rewritten whole
(write to a temporary file, then rename) so that a crash leaves the old
or the new version, never half of one:

  generations.json  label -> last generation (generations never repeat)
  uids.json         label -> its dynamic uid (kept, so a label keeps its files)
  services.json     label -> spec of each `rsctl up` service (files are re-read)
  spawners.json     label -> each running spawner (pid, /proc start time, uid,
                    gid) and what a successor rsd needs to carry on with its
                    service (spec, restart counts, whether it was ever ready)

A successor rsd believes these, and nothing a spawner says about itself:
the state dir is root's alone (0700, files 0600).

The table itself (label -> manager.Svc) lives here too; rsd/manager.py
decides what happens to its entries.
"""

import grp
import json
import logging
import os
import pwd
import stat

from rsd.spawn import open_process

log = logging.getLogger("rsd")

DEFAULT_UID_BASE = 600000  # dynamic uids: Debian's "dynamically allocated" range
UID_RANGE = 10000


class Paths:
    """Where everything is: the directories rsd was given and what is derived from them."""

    def __init__(self, config_dir, runtime_dir, state_dir, ds_socket=None):
        self.config_dir = config_dir
        self.services_dir = os.path.join(config_dir, "services.d")
        self.policy_dir = os.path.join(config_dir, "policy.d")
        self.runtime_dir = runtime_dir
        self.svc_dir = os.path.join(runtime_dir, "svc")
        self.control = os.path.join(runtime_dir, "rsd.sock")
        self.adopt_dir = os.path.join(runtime_dir, "adopt")
        self.state_dir = state_dir
        self.log_dir = os.path.join(state_dir, "log")
        self.crash_dir = os.path.join(state_dir, "crash")
        self.ds_socket = ds_socket or os.environ.get("RSD_DS_SOCKET") or os.path.join(runtime_dir, "ds.sock")

    def listen_path(self, label):
        return os.path.join(self.svc_dir, label + ".sock")

    def log_path(self, label):
        return os.path.join(self.log_dir, label + ".log")

    def adopt_socket(self, label):
        """Where label's spawner looks for a new rsd (told in its argv)."""
        return os.path.join(self.adopt_dir, label + ".sock")

    def make_dirs(self):
        for d, mode in ((self.runtime_dir, 0o755), (self.svc_dir, 0o755), (self.adopt_dir, 0o755),
                        (self.state_dir, 0o700), (self.log_dir, 0o750), (self.crash_dir, 0o750)):
            os.makedirs(d, mode=mode, exist_ok=True)
        _tighten(self.adopt_dir, 0o755)
        _tighten(self.state_dir, 0o700)
        for name in STATE_FILES:
            path = os.path.join(self.state_dir, name)
            if os.path.exists(path):
                _tighten(path, 0o600)


STATE_FILES = ("generations.json", "uids.json", "services.json", "spawners.json")


def _tighten(path, mode):
    """Make path root's with at most mode: a successor rsd trusts what is in there."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise RuntimeError("%s is a symbolic link; rsd keeps its state in a real directory: "
                           "remove it and start rsd again" % path)
    if st.st_uid != 0 or st.st_gid != 0 or stat.S_IMODE(st.st_mode) & ~mode:
        log.warning("%s was owner %d:%d mode %04o; made root:root %04o (rsd's state is root's alone)",
                    path, st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), stat.S_IMODE(st.st_mode) & mode)
        os.chown(path, 0, 0)
        os.chmod(path, stat.S_IMODE(st.st_mode) & mode)


class SpawnerRecord:
    """A spawner of a previous rsd, as spawners.json describes it, with a pidfd on it."""

    def __init__(self, label, pid, pidfd, start_time, uid, gid, saved):
        self.label = label
        self.pid = pid
        self.pidfd = pidfd
        self.start_time = start_time
        self.uid = uid
        self.gid = gid
        self.saved = saved  # the rest of its spawners.json entry

    def close(self):
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


class Table:
    """label -> Svc, and the persistent tables above."""

    def __init__(self, paths, uid_base=DEFAULT_UID_BASE):
        self.paths = paths
        self.uid_base = uid_base
        self.services = {}
        self.generations = self.load("generations.json")
        self.uids = self.load("uids.json")

    # -- the JSON files ----------------------------------------------------------
    def load(self, name):
        """A table from the state dir; {} when it is missing or unreadable (start afresh)."""
        try:
            with open(os.path.join(self.paths.state_dir, name)) as f:
                data = json.load(f)
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def save(self, name, data):
        path = os.path.join(self.paths.state_dir, name)
        tmp = path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with open(fd, "w") as f:
            os.fchmod(fd, 0o600)  # a left-over .tmp keeps its mode through O_CREAT
            json.dump(data, f)
        os.replace(tmp, path)

    # -- generations ---------------------------------------------------------------
    def generation(self, label):
        return int(self.generations.get(label, 0))

    def next_generation(self, label):
        gen = self.generation(label) + 1
        self.generations[label] = gen
        return gen

    def note_generation(self, label, generation):
        """An adopted incarnation's generation: never hand it out again."""
        self.generations[label] = max(self.generation(label), generation)

    def save_generations(self):
        self.save("generations.json", self.generations)

    # -- uids ------------------------------------------------------------------------
    def ids_for(self, spec):
        """(uid, gid): the configured ones, or a dynamic uid kept per label."""
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
                           if u not in taken and not uid_exists(u))
                self.uids[spec.label] = uid
                self.save("uids.json", self.uids)
            gid = uid
        if spec.group is not None:
            gid = spec.group if isinstance(spec.group, int) else grp.getgrnam(spec.group).gr_gid
        return uid, gid

    # -- what a successor rsd needs ------------------------------------------------
    def save_services(self):
        """Services started by `rsctl up` (files are re-read anyway), for a successor rsd."""
        self.save("services.json", {label: svc.spec.to_dict() for label, svc in self.services.items()
                                    if not svc.from_file})

    def forget_services(self):
        """A deliberate stop: nothing to bring back."""
        self.save("services.json", {})

    def saved_services(self):
        return self.load("services.json")

    def save_spawners(self):
        """What a successor needs to take the running spawners over (after each spawn, ready, change)."""
        self.save("spawners.json", {
            label: {"pid": svc.spawner.pid, "start_time": svc.spawner.start_time,
                    "uid": svc.uid, "gid": svc.gid, "spec": svc.spec.to_dict(),
                    "from_file": svc.from_file, "restarts": svc.restarts,
                    "restarts_total": svc.restarts_total, "ever_ready": svc.ever_ready}
            for label, svc in self.services.items() if svc.spawner is not None and svc.spawner.pid})

    def saved_spawners(self):
        """The spawners a previous rsd left that are still those very processes: label -> SpawnerRecord.

        A recorded pid counts only if a pidfd on it shows the recorded /proc
        start time and uid: a pid reused by another process is not adopted.
        """
        records = {}
        for label, rec in self.load("spawners.json").items():
            if not isinstance(rec, dict):
                continue
            pid, start, uid, gid = (rec.get(k) for k in ("pid", "start_time", "uid", "gid"))
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in (pid, start, uid, gid)):
                log.warning("%s: its spawners.json entry is incomplete; starting it afresh", label)
                continue
            try:
                pidfd, info = open_process(pid)
            except (OSError, ValueError):
                continue  # gone: nothing to adopt
            if info.start_time != start or info.uids != (uid,) * 4 or info.state == "Z":
                log.warning("%s: pid %d is no longer its spawner (another process has that pid now); "
                            "starting it afresh", label, pid)
                os.close(pidfd)
                continue
            records[label] = SpawnerRecord(label, pid, pidfd, start, uid, gid, rec)
        return records


def uid_exists(uid):
    try:
        pwd.getpwuid(uid)
        return True
    except KeyError:
        return False
