"""The spawner: a pre-imported, unprivileged parent for one service's incarnations.

rsd starts one spawner per service, already under the service's uid/gid with
no capabilities and no_new_privs (rsd/spawn.py does that before exec).  The
spawner imports the driver's module once (but never runs it), then waits on
its SOCK_SEQPACKET channel to rsd (fd 3).  Each "spawn" request carries the
incarnation's file descriptors (SCM_RIGHTS); the spawner forks, and the child
runs the driver's main() in a fresh process: no interpreter start on the
restart path and no state of the old incarnation.

Messages (libdrv.wire frames, one per packet):
  spawner -> rsd  {"op": "hello", "pid"} | {"op": "error", "error"}
  rsd -> spawner  {"op": "spawn", "generation", "env", "argv", "keep"}
                  + fds [control, listen, resources..., rsd's end of control]
  spawner -> rsd  {"op": "spawned", "generation", "pid"} | {"op": "spawn_failed", "generation", "error"}
                  {"op": "exited", "pid", "status"}  (the raw wait status)

The last `keep` fds of a spawn are not given to the child: the spawner holds
them for rsd (rsd's end of the control channel), with the listening socket.
If rsd dies, the spawner and its incarnation live on ("orphaned"): the
spawner connects to its adoption socket (argv) every ORPHAN_RETRY seconds
and, when a new rsd answers, sends
  {"op": "adopt", "pid", "child", "generation"} + fds [rsd's control end, listen]
followed by any "exited" that happened meanwhile ("child" is None when there
was no incarnation).  The new rsd checks all of it (rsd/adopt.py) and takes
the service's description from its own state, never from a spawner.  After
ORPHAN_TIMEOUT without an rsd it kills its incarnation and exits.  rsd stopping a service kills its spawner.
"""

import fcntl
import gc
import importlib
import importlib.util
import os
import selectors
import signal
import socket
import sys
import traceback

from libdrv.wire import decode_body, encode
from rsd import privs, sandbox

CHANNEL_FD = 3
ORPHAN_RETRY = 0.05  # seconds between attempts to reach a new rsd
STANDBY_DELAY = 0.05  # seconds of quiet before forking the next incarnation ahead
FIRST_SERVICE_FD = 3  # the service sees control at 3, listen at 4, resources from 5
PLACED = b"\x01"     # rsd -> incarnation, first byte on the control channel


def _preload(label, kind, program):
    """Import the driver (without running it); return its entry point or None for exec."""
    import libdrv.sef  # noqa: F401  (the life cycle every driver uses)
    try:
        import libdrv.dsclient  # noqa: F401
    except ImportError:
        pass
    if kind == "exec":
        if not os.access(program, os.X_OK):
            raise RuntimeError("%s is not executable by uid %d" % (program, os.getuid()))
        return None
    if kind == "pyfile":
        sys.path.insert(0, os.path.dirname(program))
        spec = importlib.util.spec_from_file_location("rsd_service_" + label.replace("-", "_"), program)
        if spec is None:
            raise RuntimeError("cannot load %s as Python" % program)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        attr = "main"
    else:
        name, _, attr = program.partition(":")
        module = importlib.import_module(name)
        attr = attr or "main"
    entry = getattr(module, attr, None)
    if not callable(entry):
        raise RuntimeError("%s has no callable %s(); a Python driver defines main()" % (program, attr))
    return entry


def _send(sock, msg):
    sock.send(encode(msg))


def _become_child(spawner_pid, label, keep=()):
    """First steps of every incarnation, done as soon as it is forked.

    It stays non-dumpable (inherited from the spawner): a running
    incarnation of the same uid must not ptrace the standby that becomes
    the next one.  Only a service that asks for core dumps is made dumpable,
    after it has been placed (_incarnate).
    """
    os.setsid()  # own process group and session: no controlling tty to inherit
    privs.set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != spawner_pid:
        os._exit(1)
    privs.set_name(label)
    os.closerange(FIRST_SERVICE_FD, min(keep) if keep else os.sysconf("SC_OPEN_MAX"))


def _wait_until_placed(control_fd):
    """Block until rsd has moved us into the service's run cgroup.

    rsd sends one byte on the control channel once it has checked our pid
    and placed us; nothing of the service runs before that, so nothing it
    forks can start outside the cgroup that a restart kills.
    """
    try:
        go = os.read(control_fd, 1)
    except OSError:
        go = b""
    if go != PLACED:
        os._exit(1)  # rsd refused us or is gone


def _standby(spawner_pid, go, kind, program, entry, label):
    """A child forked ahead of need: it waits for the next spawn's fds."""
    code = 1
    try:
        _become_child(spawner_pid, label, keep=(go.fileno(),))
        if kind != "exec":  # an exec replaces the memory anyway
            privs.prefault_private_memory()
        data, fds, _, _ = socket.recv_fds(go, 1 << 16, 16)
        if not data:
            os._exit(0)  # the spawner is shutting down
        go.detach()
        _incarnate(fds, decode_body(data[4:]), kind, program, entry)
    except BaseException:
        traceback.print_exc()
    os._exit(code)


def _incarnate(fds, msg, kind, program, entry):
    """Take the fds and become the service.  Never returns."""
    code = 1
    try:
        # Move the received fds out of the way, then into place at 3, 4, ...
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 64) for fd in fds]
        for i, fd in enumerate(high):
            os.dup2(fd, FIRST_SERVICE_FD + i, inheritable=True)
        os.closerange(FIRST_SERVICE_FD + len(high), os.sysconf("SC_OPEN_MAX"))
        env = {str(k): str(v) for k, v in msg.get("env", {}).items()}
        argv = [str(a) for a in msg.get("argv", [program])]
        _wait_until_placed(FIRST_SERVICE_FD)
        extra = tuple(filter(None, os.environ.get("RSD_SANDBOX_DENY", "").split(",")))
        if extra:  # the service file's own additions, stacked on the spawner's filter
            sandbox.apply(extra, os.environ.get("RSD_SANDBOX_ACTION", "errno"), base=False)
        if env.get("RSD_DUMPABLE") == "1":
            privs.set_dumpable(True)  # its crash-dump policy asked for cores
        if kind == "exec":
            for sig in (signal.SIGPIPE, signal.SIGINT, signal.SIGTERM, signal.SIGXFSZ):
                signal.signal(sig, signal.SIG_DFL)
            os.execve(program, argv, env)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.environ.clear()
        os.environ.update(env)
        sys.argv = argv
        rc = entry()
        code = rc if isinstance(rc, int) and not isinstance(rc, bool) else 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code & 0xFF)


class _Spawner:
    def __init__(self, sock, label, kind, program, entry, adopt_path=None, orphan_timeout=0.0):
        self.sock = sock
        self.adopt_path = adopt_path
        self.orphan_timeout = orphan_timeout
        self.kept = {}       # child pid -> rsd's end of its control channel (fd)
        self.listen_fd = None
        self.generation = 0
        self.backlog = []    # messages for rsd while there is none
        self.label = label
        self.kind = kind
        self.program = program
        self.entry = entry
        self.me = os.getpid()
        self.sel = selectors.DefaultSelector()
        self.sel.register(sock, selectors.EVENT_READ)
        self.children = {}  # pidfd -> pid
        self.standby = None  # (pid, go socket)

    def make_standby(self):
        """Fork the next incarnation now, so a restart pays no fork."""
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:
            mine.detach()
            _standby(self.me, theirs, self.kind, self.program, self.entry, self.label)
        theirs.close()
        self.standby = (pid, mine)

    def drop_standby(self):
        if self.standby is not None:
            pid, go = self.standby
            self.standby = None
            go.close()  # it exits on EOF
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass

    def spawn(self, data, fds, msg):
        gen = msg.get("generation", 0)
        keep = int(msg.get("keep", 0))
        if keep:
            fds, kept = fds[:-keep], fds[-keep:]
        else:
            kept = []
        self.generation = gen
        if len(fds) > 1:  # the listening socket, for a future rsd
            if self.listen_fd is not None:
                os.close(self.listen_fd)
            self.listen_fd = os.dup(fds[1])
        pid = None
        if self.standby is not None:
            pid, go = self.standby
            self.standby = None
            try:
                socket.send_fds(go, [data], fds)
            except OSError:  # it died waiting; fall back to a plain fork
                os.waitpid(pid, 0)
                pid = None
            go.close()
        if pid is None:
            try:
                pid = os.fork()
            except OSError as exc:
                for fd in fds + kept:
                    os.close(fd)
                self.tell({"op": "spawn_failed", "generation": gen, "error": str(exc)})
                return
            if pid == 0:
                self.sock.detach()
                _become_child(self.me, self.label, keep=fds)
                _incarnate(fds, msg, self.kind, self.program, self.entry)
        for fd in fds:
            os.close(fd)
        for fd in kept:
            self.kept[pid] = fd
        pidfd = os.pidfd_open(pid)
        self.children[pidfd] = pid
        self.sel.register(pidfd, selectors.EVENT_READ)
        self.tell({"op": "spawned", "generation": gen, "pid": pid})

    def run(self):
        while True:
            # Fork the standby only when idle, not while a new incarnation
            # is initialising and needs the CPU.
            events = self.sel.select(STANDBY_DELAY if self.standby is None else None)
            if not events and self.standby is None:
                self.make_standby()
            for key, _ in events:
                if key.fileobj is self.sock:
                    try:
                        data, fds, _, _ = socket.recv_fds(self.sock, 1 << 16, 16)
                    except OSError:
                        data, fds = b"", []
                    if not data:
                        if self.adopt_path and self.orphan_timeout > 0 and self.wait_for_new_rsd():
                            break  # adopted: carry on with the new rsd
                        self.drop_standby()
                        for pid in self.children.values():
                            try:
                                os.killpg(pid, signal.SIGKILL)
                            except OSError:
                                pass
                        for pid in self.children.values():  # reaped here, not orphaned
                            try:
                                os.waitpid(pid, 0)
                            except ChildProcessError:
                                pass
                        return 0
                    msg = decode_body(data[4:])
                    if msg.get("op") == "spawn":
                        self.spawn(data, fds, msg)
                    else:
                        for fd in fds:
                            os.close(fd)
                else:
                    self.reap(key.fileobj)

    def tell(self, msg):
        """Send to rsd; if it is gone, keep the message for its successor."""
        if self.sock is None:
            self.backlog.append(msg)
            return
        try:
            _send(self.sock, msg)
        except OSError:
            self.backlog.append(msg)  # the channel's EOF brings us to wait_for_new_rsd

    def reap(self, pidfd):
        pid = self.children.pop(pidfd)
        self.sel.unregister(pidfd)
        os.close(pidfd)
        _, status = os.waitpid(pid, 0)
        try:  # helpers it forked die with it (it led its process group)
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass
        kept = self.kept.pop(pid, None)
        if kept is not None:
            os.close(kept)
        self.tell({"op": "exited", "pid": pid, "status": status})

    def wait_for_new_rsd(self):
        """rsd is gone but an incarnation runs: wait for a new rsd to adopt us."""
        import time
        self.sel.unregister(self.sock)
        self.sock.close()
        self.sock = None
        child = next(iter(self.children.values()), None)
        deadline = time.monotonic() + self.orphan_timeout
        while time.monotonic() < deadline:
            for key, _ in self.sel.select(ORPHAN_RETRY):
                if key.fileobj in self.children:
                    self.reap(key.fileobj)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
            try:
                s.connect(self.adopt_path)
            except OSError:
                s.close()
                continue
            fds = [fd for fd in (self.kept.get(child), self.listen_fd) if fd is not None]
            try:
                socket.send_fds(s, [encode({"op": "adopt", "pid": self.me, "child": child,
                                            "generation": self.generation,
                                            "fds": ["control" if self.kept.get(child) is not None else None,
                                                    "listen" if self.listen_fd is not None else None]})], fds)
                for msg in self.backlog:
                    _send(s, msg)
            except OSError:
                s.close()
                continue
            self.backlog = []
            self.sock = s
            self.sel.register(s, selectors.EVENT_READ)
            return True
        return False


def main():
    label, kind, program = sys.argv[1:4]
    adopt_path = sys.argv[4] if len(sys.argv) > 4 else None
    orphan_timeout = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
    sock = socket.socket(fileno=CHANNEL_FD)
    privs.set_dumpable(False)  # incarnations (same uid) must not ptrace their parent
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        # Before the driver's code runs at all: its import may be hostile.
        sandbox.apply(action=os.environ.get("RSD_SANDBOX_ACTION", "errno"))
        entry = _preload(label, kind, program)
    except BaseException as exc:
        traceback.print_exc()
        _send(sock, {"op": "error", "error": "%s: %s" % (type(exc).__name__, exc)})
        return 2
    me = os.getpid()
    # Park everything imported so far outside the collector: a child's first
    # collection then does not touch (and copy) every inherited page.
    gc.collect()
    gc.freeze()
    _send(sock, {"op": "hello", "pid": me})
    return _Spawner(sock, label, kind, program, entry, adopt_path, orphan_timeout).run()


if __name__ == "__main__":
    sys.exit(main())
