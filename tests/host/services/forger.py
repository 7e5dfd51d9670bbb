"""A service whose spawner lies to rsd, for tests/host/test_rsd_trust.py.

rsd's spawner imports a Python service before running it, so a driver's
import-time code runs inside the spawner: this module's top level takes
its spawner over, as a hostile driver could, and makes it lie.  Which lies
it tells comes from lies.json next to this file, by label ($RSD_LABEL is in
the spawner's environment):

  "spawned_pid": N       report pid N as the new incarnation ("rsd": rsd's own pid)
  "false_exited": true   report each live incarnation as exited (at once
                         and again when the spawner is next idle)
  "adopt": {...}         fields to put into the adoption request to a new rsd
                         ("record", "child", "generation", ...)
  "listen": "forged"     hand a new rsd a listening socket of its own instead
                         of the service's
  "control": "forged"    hand a new rsd a control channel of its own (one end
                         of a socketpair it made) instead of rsd's

Its incarnations run probe.py (lies.json's "probe_dir" says where it is).
"""

import json
import os
import socket
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

with open(os.path.join(HERE, "lies.json")) as f:
    _all = json.load(f)
LIES = _all.get(os.environ.get("RSD_LABEL", ""), {})
sys.path.insert(0, _all["probe_dir"])
from probe import main  # noqa: E402,F401  (the incarnation is an honest probe)

_spawner = sys.modules.get("__main__")
_Spawner = getattr(_spawner, "_Spawner", None)

if _Spawner is not None:  # imported by rsd's spawner (not by a test)
    _encode = _spawner.encode
    _honest_tell = _Spawner.tell
    _honest_standby = _Spawner.make_standby

    def _lying_tell(self, msg):
        if msg.get("op") == "spawned" and "spawned_pid" in LIES:
            target = LIES["spawned_pid"]
            msg = dict(msg, pid=os.getppid() if target == "rsd" else target)
        _honest_tell(self, msg)
        if msg.get("op") == "spawned" and LIES.get("false_exited"):
            _honest_tell(self, {"op": "exited", "pid": msg["pid"], "status": 0})

    def _lying_standby(self):
        if LIES.get("false_exited"):
            for pid in list(self.children.values()):
                _honest_tell(self, {"op": "exited", "pid": pid, "status": 0})
        _honest_standby(self)

    def _forged_listener():
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind("\0forged-%d" % os.getpid())  # abstract: the spawner may create no files
        s.listen(1)
        return s

    def _lying_wait_for_new_rsd(self):
        """The spawner's own wait_for_new_rsd, with the adoption request forged."""
        self.sel.unregister(self.sock)
        self.sock.close()
        self.sock = None
        child = next(iter(self.children.values()), None)
        forged = _forged_listener() if LIES.get("listen") == "forged" else None
        deadline = time.monotonic() + self.orphan_timeout
        while time.monotonic() < deadline:
            for key, _ in self.sel.select(0.05):
                if key.fileobj in self.children:
                    self.reap(key.fileobj)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                s.connect(self.adopt_path)
            except OSError:
                s.close()
                continue
            control = self.kept.get(child)
            if LIES.get("control") == "forged":
                mine, theirs = socket.socketpair()
                self.forged_control = (mine, theirs)
                control = theirs.fileno()
            listen = forged.fileno() if forged is not None else self.listen_fd
            msg = {"op": "adopt", "pid": self.me, "child": child, "generation": self.generation,
                   "fds": ["control" if control is not None else None, "listen" if listen is not None else None]}
            msg.update(LIES.get("adopt", {}))
            try:
                socket.send_fds(s, [_encode(msg)], [fd for fd in (control, listen) if fd is not None])
            except OSError:
                s.close()
                continue
            self.sock = s
            self.sel.register(s, _spawner.selectors.EVENT_READ)
            return True
        return False

    _Spawner.tell = _lying_tell
    _Spawner.make_standby = _lying_standby
    if LIES.get("adopt") or LIES.get("listen") or LIES.get("control"):
        _Spawner.wait_for_new_rsd = _lying_wait_for_new_rsd
