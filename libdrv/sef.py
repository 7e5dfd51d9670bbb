"""SEF: the driver life cycle every rsd service goes through (MINIX libsys SEF).

    from libdrv.sef import SEF

    def main():
        sef = SEF()

        @sef.on_init_fresh
        def fresh(sef): ...                      # first start: set the device up

        @sef.on_init_restart
        def again(sef, reason, restarts): ...    # after a crash: maybe restore state
            count = sef.restore_state("count", 0)

        @sef.on_accept
        def client(conn): ...                    # a client connected to our socket

        return sef.run()                         # init, say ready, then the event loop

What rsd gives the process (see docs/rsd.md, "The service side"):
  fd RSD_CONTROL_FD (3)  the control channel to rsd (libdrv.wire frames)
  fd RSD_LISTEN_FD (4)   the service's listening socket, kept across restarts
  RSD_LABEL, RSD_DS_SOCKET, RSD_RESOURCE_FDS (privileged fds rsd opened)

Heartbeat pings are answered from the event loop itself, so a callback that
never returns (a stuck driver) misses its heartbeat and rsd replaces it.
SIGTERM runs the exit callback and returns from run() with status 0.
"""

import os
import signal
import socket
import sys
import time
import traceback

from libdrv.channel import Channel, ChannelClosed, FrameError
from libdrv.loop import Loop
from libdrv.svcstate import state_prefix

FI_EXIT_STATUS = 1  # what `rsctl fi --exit` makes the service exit with
REQUEST_TIMEOUT = 20.0  # seconds request() waits for rsd's answer
REGISTRATION_WAIT = 5.0  # seconds a new incarnation waits for DS to know its label


class SEF:
    def __init__(self, label=None):
        env = os.environ
        self.label = label or env.get("RSD_LABEL") or os.path.basename(sys.argv[0] or "service")
        self.loop = Loop()
        self.control = None
        self.listener = None
        self.resource_fds = {}
        self.generation = 0
        self.init_type = "fresh"
        self.restart_reason = None
        self.restarts = 0
        self._init_fresh = None
        self._init_restart = None
        self._on_exit = None
        self._on_accept = None
        self._faults = {}
        self._ds = None
        self._exit_code = 0
        self._in_loop = False
        if env.get("RSD_CONTROL_FD"):
            sock = socket.socket(fileno=int(env["RSD_CONTROL_FD"]))
            self.control = Channel(sock)
        if env.get("RSD_LISTEN_FD"):
            self.listener = socket.socket(fileno=int(env["RSD_LISTEN_FD"]))
        for item in filter(None, env.get("RSD_RESOURCE_FDS", "").split(",")):
            name, _, fd = item.partition("=")
            self.resource_fds[name] = int(fd)

    # -- callbacks (usable as decorators) ------------------------------------
    def on_init_fresh(self, fn):
        self._init_fresh = fn
        return fn

    def on_init_restart(self, fn):
        self._init_restart = fn
        return fn

    def on_exit(self, fn):
        self._on_exit = fn
        return fn

    def on_accept(self, fn):
        """fn(conn) for every connection accepted on the listening socket."""
        self._on_accept = fn
        return fn

    def on_fault(self, kind):
        """Decorator: fn() runs when `rsctl fi --<kind>` names a fault this service models
        itself (a driver's "wild-dma": program its device to DMA outside its mappings)."""
        def register(fn):
            self._faults[kind] = fn
            return fn
        return register

    def add_reader(self, fileobj, callback, *args):
        self.loop.add_reader(fileobj, callback, *args)

    def remove_reader(self, fileobj):
        self.loop.remove_reader(fileobj)

    def request(self, op, timeout=REQUEST_TIMEOUT, **fields):
        """Ask rsd for something during init and wait for its answer: (reply, fds).

        For what only rsd can do (an NBD connection: docs/block.md).  Blocking, so
        only before the loop runs; other messages rsd sends meanwhile are kept for
        the loop.  Raises RuntimeError when rsd refuses or does not answer."""
        if self.control is None:
            raise RuntimeError("%s is not run by rsd: nobody to ask for %s" % (self.label, op))
        self._request_id = getattr(self, "_request_id", 0) + 1
        rid = self._request_id
        self.control.send(dict(fields, op=op, id=rid))
        deadline = time.monotonic() + timeout
        kept, fds = [], []
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError("rsd did not answer %s within %.0f s; see rsd's log" % (op, timeout))
                try:
                    msg = self.control.recv_blocking(timeout=left, fds_out=fds)
                except TimeoutError:
                    continue
                except (ChannelClosed, FrameError) as exc:
                    raise RuntimeError("the control channel to rsd broke while asking for %s: %s" % (op, exc))
                if msg.get("op") == "reply" and msg.get("id") == rid:
                    break
                kept.append(msg)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        finally:
            self.control._pending = kept + self.control.take_pending()
        if msg.get("ok") is not True:
            for fd in fds:
                os.close(fd)
            raise RuntimeError("rsd refused %s: %s" % (op, msg.get("error")))
        return msg, fds

    # -- state in DS ------------------------------------------------------------
    @property
    def ds(self):
        """A DS connection that speaks as this service's label.

        rsd registers our pid with DS while we initialise, without holding us
        up; so before the first request we wait (briefly) until DS knows us.
        """
        if self._ds is None:
            from libdrv.dsclient import DSClient
            client = DSClient()
            if self.control is not None:
                deadline = time.monotonic() + REGISTRATION_WAIT
                while client.whoami().get("label") != self.label:
                    if time.monotonic() > deadline:
                        client.close()
                        raise RuntimeError("DS does not know this process as %r after %.0f s; "
                                           "is rsd connected to DS?" % (self.label, REGISTRATION_WAIT))
                    time.sleep(0.0005)
            self._ds = client
        return self._ds

    def save_state(self, name, value, type=None):
        """Back up one value in DS as state.<label>.<name>; it survives crash restarts."""
        from libdrv.dsclient import PRIVATE_RETRIEVE
        self.ds.publish(state_prefix(self.label) + name, value, type=type,
                        overwrite=True, flags=PRIVATE_RETRIEVE)

    def restore_state(self, name, default=None):
        from libdrv.dsclient import NotFound
        try:
            return self.ds.retrieve(state_prefix(self.label) + name).value
        except NotFound:
            return default

    # -- life cycle ----------------------------------------------------------------
    def stop(self, code=0):
        """Leave the event loop; run() returns code."""
        self._exit_code = code
        self.loop.stop()

    def run(self):
        """Init (fresh or restart), tell rsd we are ready, run the loop; return a status."""
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, self._sigterm)
        try:
            if not self._initialise():
                return 1
            self.loop.add_reader(wake_r, self._on_wakeup, wake_r)
            if self.control is not None:
                self.loop.add_reader(self.control, self._on_control)
            if self.listener is not None and self._on_accept is not None:
                self.listener.setblocking(False)
                self.loop.add_reader(self.listener, self._accept)
            self.loop.run()
            return self._exit_code
        finally:
            signal.set_wakeup_fd(-1)
            wake_r.close()
            wake_w.close()

    def _initialise(self):
        msg = {"type": "fresh", "reason": None, "restarts": 0, "generation": 0}
        if self.control is not None:
            try:
                msg = self.control.recv_blocking()
            except (ChannelClosed, FrameError):
                return False
            if msg.get("op") != "init":
                self.control.send({"op": "init_failed", "error": "expected an init message first"})
                return False
        self.init_type = msg.get("type", "fresh")
        self.restart_reason = msg.get("reason")
        self.restarts = msg.get("restarts", 0)
        self.generation = msg.get("generation", 0)
        try:
            if self.init_type == "restart" and self._init_restart is not None:
                self._init_restart(self, self.restart_reason, self.restarts)
            elif self._init_fresh is not None:
                self._init_fresh(self)
        except Exception as exc:
            traceback.print_exc()
            if self.control is not None:
                self.control.send({"op": "init_failed", "error": "%s: %s" % (type(exc).__name__, exc)})
            return False
        # From here SIGTERM is handled by the loop (the wakeup fd keeps it),
        # so the exit callback runs even if it arrives right after ready.
        self._in_loop = True
        if self.control is not None:
            self.control.send({"op": "ready"})
            # Messages that came with init (e.g. an early ping) wait in the channel.
            for early in self.control.take_pending():
                self._handle(early)
        return True

    def _sigterm(self, signum, frame):
        if not self._in_loop:  # still initialising: just go
            raise SystemExit(0)
        # In the loop the wakeup fd reports it; nothing to do here.

    def _on_wakeup(self, wake_r):
        try:
            data = wake_r.recv(512)
        except BlockingIOError:
            return
        if signal.SIGTERM in data:
            if self._on_exit is not None:
                self._on_exit(self)
            self.stop(0)

    def _on_control(self):
        try:
            msgs = self.control.read_available()
        except (ChannelClosed, FrameError):
            # rsd went away: nobody supervises us, so stop rather than linger.
            self.loop.remove_reader(self.control)
            self.stop(0)
            return
        for msg in msgs:
            self._handle(msg)

    def _handle(self, msg):
        op = msg.get("op")
        if op == "ping":
            self.control.try_send({"op": "pong", "seq": msg.get("seq", 0)})
        elif op == "fi":
            kind = msg.get("kind", "crash")
            if kind in self._faults:
                self._faults[kind]()
            elif kind in ("crash", "hang", "exit"):
                inject_fault(kind)
            else:
                print("%s: fault %r is not modelled by this service; ignored" % (self.label, kind),
                      file=sys.stderr, flush=True)

    def _accept(self):
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        self._on_accept(conn)


def inject_fault(kind):
    """The faults `rsctl fi` can inject (MINIX `service fi`)."""
    if kind == "hang":
        while True:  # a busy, stuck main loop: heartbeats stop
            pass
    if kind == "exit":
        os._exit(FI_EXIT_STATUS)
    signal.signal(signal.SIGSEGV, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGSEGV)
