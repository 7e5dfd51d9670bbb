"""rsd's side of spawning: start a service's unprivileged spawner, ask it for
incarnations, and open what a service may not open itself.

Privilege is dropped here, once, in the forked child before it execs the
spawner: no supplementary groups, the service's gid and uid, an empty
capability bounding set and empty capability sets, no_new_privs, a clean
environment and only the descriptors rsd chose.  Every incarnation
inherits all of that from the spawner (and dies with it: its parent-death
signal points at the spawner, which itself outlives rsd to be adopted).
"""

import errno
import os
import select
import signal
import socket
import sys

from libdrv.wire import decode_body, encode
from rsd import privs

SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"


class ProcessInfo:
    """What /proc said about a process whose pidfd rsd holds."""

    def __init__(self, pid, state, ppid, start_time, uids):
        self.pid = pid
        self.state = state            # R, S, Z, ...
        self.ppid = ppid
        self.start_time = start_time  # clock ticks after boot: tells a reused pid from the original
        self.uids = uids              # (real, effective, saved, filesystem)


def pidfd_ended(pidfd):
    """True once the process behind pidfd has ended (a pidfd is readable from then on)."""
    p = select.poll()
    p.register(pidfd, select.POLLIN)
    return bool(p.poll(0))


def open_process(pid):
    """(pidfd, ProcessInfo) for pid, the information known to be about that very process.

    /proc is read after the pidfd is opened, and the pidfd is checked to be
    still alive afterwards: a pid is reused only once its process is gone,
    which the pidfd would show.  /proc is read here, not through psutil: the
    start time must be the kernel's exact tick count (psutil gives a float
    derived from it and the boot time), and psutil's uids() has no
    filesystem uid, which is checked too.  Raises ProcessLookupError when pid is gone
    (or ended meanwhile), OSError/ValueError when /proc cannot be read.
    """
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        raise ValueError("%r is not a process id" % (pid,))
    pidfd = os.pidfd_open(pid)
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            stat = f.read()
        # The command name (field 2) may hold spaces and parentheses: split after the last ")".
        fields = stat[stat.rindex(b")") + 2:].split()
        state, ppid, start_time = fields[0].decode(), int(fields[1]), int(fields[19])
        uids = None
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("Uid:"):
                    uids = tuple(int(u) for u in line.split()[1:5])
        if uids is None:
            raise ValueError("/proc/%d/status has no Uid line" % pid)
        if pidfd_ended(pidfd):
            raise ProcessLookupError(errno.ESRCH, "pid %d ended" % pid)
    except FileNotFoundError:
        os.close(pidfd)
        raise ProcessLookupError(errno.ESRCH, "pid %d ended" % pid) from None
    except BaseException:
        os.close(pidfd)
        raise
    return pidfd, ProcessInfo(pid, state, ppid, start_time, uids)


def base_env(label, ds_socket):
    env = {"PATH": SAFE_PATH, "LANG": "C.UTF-8", "HOME": "/", "RSD_LABEL": label,
           "PYTHONDONTWRITEBYTECODE": "1"}
    if ds_socket:
        env["RSD_DS_SOCKET"] = ds_socket
    return env


def open_resource_fds(spec, generation, uid, gid):
    """Open the service's privileged resources, as root, before each incarnation.

    Returns [(name, fd)]; the incarnation finds them as RSD_RESOURCE_FDS="name=fd,...".
    A PCI device in an IOMMU group goes through VFIO (rsd/vfio.py):
    "vfio_container" (a fresh TYPE1v2 container) and "vfio_device".  Without
    an IOMMU it goes to uio_pci_generic (rsd/uio.py: "uio", "pci_config",
    "pci_barN") and to the module for DMA buffers, which are not isolated;
    rsd says so in its log.  A service with other [resources] (or
    grant peers) gets a /dev/rsdrv endpoint with exactly those privileges,
    labelled with this incarnation's generation and sealed: the driver can
    use it but never widen it.  A `tap` is made sure of first (rsd/tap.py):
    a persistent TAP the service's uid:gid owns; it is not an fd.  rsd
    closes its copies after the spawn.
    spec.resources is already validated (rsd/service.py).
    Raises OSError/ValueError with a message that says what to do.
    """
    r = spec.resources
    if r.tap:
        from rsd import tap
        tap.ensure(spec.label, r.tap, uid, gid)
    fds, pci = [], r.pci
    if pci:
        if len(pci) > 1:
            raise ValueError("%s: a service gets one PCI device, not %d" % (spec.label, len(pci)))
        from rsd import vfio
        from rsd.endpoint import resolve_pci
        bdf = resolve_pci(pci[0])
        got = vfio.open_for_service(spec.label, bdf, r.take_from_kernel)
        if got is not None:
            fds, pci = got, ()
        else:
            import logging
            from rsd import uio
            fds = uio.open_for_service(spec.label, bdf, r.take_from_kernel)
            logging.getLogger("rsd").warning(
                "%s: %s has no IOMMU group: its DMA is NOT ISOLATED (uio_pci_generic, DMA buffers "
                "from the module; a faulty driver can make the device reach any memory)", spec.label, bdf)
    if not (r.io or r.irq or r.mem or pci or spec.ipc.grant_to):
        return fds
    from rsd.endpoint import for_service
    try:
        ep = for_service(spec.label, generation, io=r.io, irq=r.irq, mem=r.mem, pci=pci,
                         grant_to=spec.ipc.grant_to)
    except BaseException:
        for _, fd in fds:
            os.close(fd)
        raise
    return fds + [("rsdrv", ep.detach())]


def open_listen_socket(path, gid):
    """The service's listening socket: created once by rsd, kept across restarts.

    Clients that connect while the service restarts wait in the backlog.
    Mode 0660, owner root, group the service's gid.
    """
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    os.chown(path, 0, gid)
    os.chmod(path, 0o660)
    sock.listen(128)
    return sock


class Spawner:
    """One service's spawner process, seen from rsd."""

    def __init__(self, label, kind, program, uid, gid, log_path, python=None, ds_socket=None,
                 adopt_path=None, orphan_timeout=0.0):
        self.label = label
        self.adopt_path = adopt_path
        self.orphan_timeout = orphan_timeout
        self.kind = kind
        self.program = program
        self.uid = uid
        self.gid = gid
        self.log_path = log_path
        self.python = python or sys.executable
        self.ds_socket = ds_socket
        self.sock = None
        self.pid = None
        self.pidfd = None
        self.start_time = None  # from /proc: a successor rsd tells this spawner from a reused pid
        self.ready = False  # said hello
        self.cgroup = None  # rsd.cgroup.ServiceCgroup it starts in (None: no cgroups)
        self.extra_env = {}  # settings for the spawner itself (its sandbox)

    def start(self):
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        log_fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        null_fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        argv = [self.python, "-m", "rsd.spawner", self.label, self.kind, self.program,
                self.adopt_path or "", repr(float(self.orphan_timeout))]
        env = base_env(self.label, self.ds_socket)
        env.update(self.extra_env)
        rsd_pid = os.getpid()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child until exec
            try:
                os.setsid()
                os.dup2(null_fd, 0)
                os.dup2(log_fd, 1)
                os.dup2(log_fd, 2)
                os.dup2(child.fileno(), 3)
                os.closerange(4, os.sysconf("SC_OPEN_MAX"))
                os.chdir("/")
                os.umask(0o077)
                if self.cgroup is not None:  # before it runs anything of the service
                    self.cgroup.place_spawner(os.getpid())
                privs.become(self.uid, self.gid)
                # No parent-death signal: if rsd dies, the spawner keeps its
                # incarnation alive and waits for a new rsd to adopt it.
                if os.getppid() != rsd_pid:
                    os._exit(1)
                for sig in (signal.SIGPIPE, signal.SIGINT, signal.SIGTERM, signal.SIGCHLD):
                    signal.signal(sig, signal.SIG_DFL)
                os.execve(self.python, argv, env)
            except BaseException as exc:
                try:
                    os.write(2, ("rsd: cannot start the spawner for %s: %s\n" % (self.label, exc)).encode())
                finally:
                    os._exit(127)
        os.close(log_fd)
        os.close(null_fd)
        child.close()
        parent.setblocking(False)
        self.sock = parent
        self.pid = pid
        # Our unreaped child: its pid cannot be reused, so /proc is about it.
        self.pidfd, info = open_process(pid)
        self.start_time = info.start_time
        return self

    @classmethod
    def adopted(cls, label, kind, program, uid, gid, sock, pid, pidfd, start_time):
        """A spawner a previous rsd started, now reporting to us (pidfd: verified by rsd/adopt.py)."""
        sp = cls(label, kind, program, uid, gid, None)
        sock.setblocking(False)
        sp.sock = sock
        sp.pid = pid
        sp.pidfd = pidfd
        sp.start_time = start_time
        sp.ready = True
        return sp

    def fileno(self):
        return self.sock.fileno()

    def spawn(self, generation, env, argv, fds, keep=()):
        """Ask for an incarnation with these fds (placed at 3, 4, ...).

        keep: fds the spawner holds for a future rsd instead of passing them
        on.  Nothing else is kept there for that rsd: it rebuilds the service
        from its own state (rsd/table.py), not from what a spawner says.
        """
        msg = encode({"op": "spawn", "generation": generation, "env": env, "argv": argv,
                      "keep": len(keep)})
        socket.send_fds(self.sock, [msg], list(fds) + list(keep))

    def read(self):
        """(messages waiting from the spawner, True if it closed the channel)."""
        out = []
        while self.sock is not None:
            try:
                data = self.sock.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                return out, False
            except OSError:
                return out, True
            if not data:
                return out, True
            out.append(decode_body(data[4:]))
        return out, True

    def stop(self):
        """Close the channel (the spawner kills its children and exits) and kill it."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.pid is not None:
            try:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            except OSError:
                pass

    def reap(self):
        """Collect the spawner's exit status once its pidfd is readable."""
        status = None
        if self.pid is not None:
            try:
                _, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                pass
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None
        self.pid = None
        return status
