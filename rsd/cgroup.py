"""Containment by cgroup v2: one cgroup per service, killed as a whole.

A process group is not containment: a driver's helper that calls setsid()
and forks again leaves it and outlives the service, holding whatever fds
it inherited.  A cgroup cannot be left by an unprivileged process (moving
needs write access to the common ancestor's cgroup.procs, which is root's),
so rsd gives every service

    ROOT/services/<label>/            memory.max, pids.max, cpu.weight (the service's limits)
                          spawner/    the spawner and its standby child
                          run/        the incarnation and everything it forks

and ends an incarnation with `run/cgroup.kill`, a service with
`<label>/cgroup.kill`.  ROOT is rsd's own cgroup when it was delegated to
it (systemd's Delegate=yes: rsd then moves itself into ROOT/supervisor, as
the no-internal-processes rule asks), else `<cgroup2 mount>/rsd`, or what
`--cgroup-root` names.  Where no cgroup v2 is writable, `setup()` says why
and rsd falls back to process groups, loudly.
"""

import errno
import logging
import os

log = logging.getLogger("rsd.cgroup")

CONTROLLERS = ("memory", "pids", "cpu")
# The limit each controller enforces, and its file.
LIMIT_FILES = {"memory_max": ("memory", "memory.max"), "pids_max": ("pids", "pids.max"),
               "cpu_weight": ("cpu", "cpu.weight")}


class CgroupUnavailable(OSError):
    pass


def cgroup2_mount():
    """The mount point of the unified hierarchy, or None."""
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                if right.split()[:1] == ["cgroup2"]:
                    return left.split()[4]
    except OSError:
        pass
    return None


def own_cgroup(pid="self"):
    """The cgroup v2 path of a process ("/..." relative to the mount), or None."""
    try:
        with open("/proc/%s/cgroup" % pid) as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].strip()
    except OSError:
        pass
    return None


def _write(path, text):
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _read(path):
    with open(path) as f:
        return f.read()


class ServiceCgroup:
    """One service's cgroups."""

    def __init__(self, path):
        self.path = path
        self.spawner = os.path.join(path, "spawner")
        self.run = os.path.join(path, "run")

    def place_spawner(self, pid):
        _write(os.path.join(self.spawner, "cgroup.procs"), str(pid))

    def place_incarnation(self, pid):
        _write(os.path.join(self.run, "cgroup.procs"), str(pid))

    def kill_incarnation(self):
        """SIGKILL everything in run/ (the kernel leaves no window for a fork)."""
        _kill(self.run)

    def kill_all(self):
        _kill(self.path)

    def populated(self, which=None):
        try:
            for line in _read(os.path.join(which or self.path, "cgroup.events")).splitlines():
                key, _, value = line.partition(" ")
                if key == "populated":
                    return value.strip() == "1"
        except OSError:
            return False
        return False

    def procs(self, which=None):
        try:
            return [int(p) for p in _read(os.path.join(which or self.run, "cgroup.procs")).split()]
        except OSError:
            return []

    def remove(self):
        """rmdir the service's cgroups once empty; False if something still runs."""
        for d in (self.run, self.spawner, self.path):
            try:
                os.rmdir(d)
            except FileNotFoundError:
                pass
            except OSError as exc:
                if exc.errno == errno.EBUSY:
                    return False
                raise
        return True

    def limits(self):
        out = {}
        for key, (_, name) in LIMIT_FILES.items():
            try:
                out[key] = _read(os.path.join(self.path, name)).strip()
            except OSError:
                pass
        return out


def _kill(path):
    try:
        _write(os.path.join(path, "cgroup.kill"), "1")
    except FileNotFoundError:
        pass


class CgroupTree:
    """rsd's subtree of the unified hierarchy."""

    def __init__(self, root):
        self.root = root
        self.services = os.path.join(root, "services")
        self.controllers = ()

    @classmethod
    def setup(cls, root=None):
        """Prepare ROOT; raises CgroupUnavailable with the reason."""
        mount = cgroup2_mount()
        if mount is None:
            raise CgroupUnavailable(errno.ENOENT, "no cgroup v2 hierarchy is mounted (mount -t cgroup2 "
                                    "none /sys/fs/cgroup, or boot with systemd.unified_cgroup_hierarchy=1)")
        mine = own_cgroup()
        delegated = False
        if root is None:
            if mine not in (None, "/"):
                root = os.path.join(mount, mine.lstrip("/"))
                delegated = True
            else:
                root = os.path.join(mount, "rsd")
        elif mine is not None and os.path.realpath(root) == os.path.realpath(os.path.join(mount, mine.lstrip("/"))):
            delegated = True
        tree = cls(root)
        try:
            os.makedirs(root, exist_ok=True)
            if not os.path.exists(os.path.join(root, "cgroup.procs")):
                raise CgroupUnavailable(errno.ENOTDIR, "%s is not in a cgroup v2 hierarchy" % root)
            if delegated:
                # No processes in an inner cgroup: rsd itself moves to a leaf.
                os.makedirs(os.path.join(root, "supervisor"), exist_ok=True)
                _write(os.path.join(root, "supervisor", "cgroup.procs"), str(os.getpid()))
            os.makedirs(tree.services, exist_ok=True)
            if not os.path.exists(os.path.join(tree.services, "cgroup.kill")):
                raise CgroupUnavailable(errno.ENOSYS, "this kernel has no cgroup.kill (Linux 5.14+ needed)")
        except CgroupUnavailable:
            raise
        except OSError as exc:
            raise CgroupUnavailable(exc.errno, "cannot use %s: %s" % (root, exc.strerror)) from None
        if not delegated and os.path.dirname(root.rstrip("/")) == mount.rstrip("/"):
            # Our own top-level cgroup: the hierarchy's root must pass the controllers down
            # (systemd does that for a delegated unit; without systemd nobody has).
            tree._enable_in(mount)
        tree.controllers = tree._enable_controllers()
        return tree

    @staticmethod
    def _enable_in(directory):
        for ctl in CONTROLLERS:
            try:
                if ctl in _read(os.path.join(directory, "cgroup.controllers")).split():
                    _write(os.path.join(directory, "cgroup.subtree_control"), "+" + ctl)
            except OSError as exc:
                log.debug("cannot enable %s in %s: %s", ctl, directory, exc)

    def _enable_controllers(self):
        """Enable what we limit, as far as the parent delegates it; returns those enabled."""
        enabled = []
        for ctl in CONTROLLERS:
            try:
                for d in (self.root, self.services):
                    if ctl not in _read(os.path.join(d, "cgroup.controllers")).split():
                        raise OSError(errno.ENOENT, "not delegated")
                    if ctl not in _read(os.path.join(d, "cgroup.subtree_control")).split():
                        _write(os.path.join(d, "cgroup.subtree_control"), "+" + ctl)
                enabled.append(ctl)
            except OSError as exc:
                log.debug("controller %s not available under %s: %s", ctl, self.root, exc)
        return tuple(enabled)

    def service(self, label):
        return ServiceCgroup(os.path.join(self.services, label))

    def missing_controllers(self, limits):
        """Controllers that the set limits need and that this tree lacks."""
        return sorted({LIMIT_FILES[k][0] for k, v in limits.items() if v is not None}
                      - set(self.controllers))

    def create(self, label, limits):
        """The service's cgroups with its limits set; limits: {key: text or None}."""
        cg = self.service(label)
        for d in (cg.path, cg.spawner, cg.run):
            os.makedirs(d, exist_ok=True)
        self.apply_limits(cg, limits)
        return cg

    def apply_limits(self, cg, limits):
        for key, value in limits.items():
            ctl, name = LIMIT_FILES[key]
            if ctl not in self.controllers:
                continue
            _write(os.path.join(cg.path, name), "max" if value is None else str(value))
