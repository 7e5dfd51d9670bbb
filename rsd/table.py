"""The service table and what rsd keeps of it on disk.

rsd's state directory holds small JSON tables, each rewritten whole
(write to a temporary file, then rename) so that a crash leaves the old
or the new version, never half of one:

  generations.json  label -> last generation (generations never repeat)
  uids.json         label -> its dynamic uid (kept, so a label keeps its files)
  services.json     label -> spec of each `rsctl up` service (files are re-read)
  spawners.json     label -> {"pid", "uid"} of each running spawner, for a successor rsd

The table itself (label -> manager.Svc) lives here too; rsd/manager.py
decides what happens to its entries.
"""

import grp
import json
import os
import pwd

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
        self.adopt = os.path.join(runtime_dir, "adopt.sock")
        self.state_dir = state_dir
        self.log_dir = os.path.join(state_dir, "log")
        self.crash_dir = os.path.join(state_dir, "crash")
        self.ds_socket = ds_socket or os.environ.get("RSD_DS_SOCKET") or os.path.join(runtime_dir, "ds.sock")

    def listen_path(self, label):
        return os.path.join(self.svc_dir, label + ".sock")

    def log_path(self, label):
        return os.path.join(self.log_dir, label + ".log")

    def make_dirs(self):
        for d, mode in ((self.runtime_dir, 0o755), (self.svc_dir, 0o755), (self.state_dir, 0o755),
                        (self.log_dir, 0o750), (self.crash_dir, 0o750)):
            os.makedirs(d, mode=mode, exist_ok=True)


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
        with open(tmp, "w") as f:
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
        self.save("spawners.json", {
            label: {"pid": svc.spawner.pid, "uid": svc.uid}
            for label, svc in self.services.items() if svc.spawner is not None and svc.spawner.pid})

    def saved_spawners(self):
        """Spawners a previous rsd left running and still alive: pid -> (label, uid)."""
        adoptable = {}
        for label, rec in self.load("spawners.json").items():
            if isinstance(rec, dict) and isinstance(rec.get("pid"), int) and uid_of(rec["pid"]) == rec.get("uid"):
                adoptable[rec["pid"]] = (label, rec["uid"])
        return adoptable


def uid_of(pid):
    """The uid of a live process (None if it is gone or a zombie)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return None
        return os.stat("/proc/%d" % pid).st_uid
    except (OSError, TypeError, IndexError):
        return None


def uid_exists(uid):
    try:
        pwd.getpwuid(uid)
        return True
    except KeyError:
        return False
