"""Host test fixtures: a real datastore daemon in a temp dir, and labelled
client processes running as an unprivileged uid."""

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from libdrv.dsclient import DSClient

HERE = os.path.dirname(os.path.abspath(__file__))
NOBODY = 65534


def wait_ready(notify_sock, proc, timeout=10.0):
    """Wait for READY=1 on a NOTIFY_SOCKET datagram socket (sd_notify)."""
    notify_sock.settimeout(0.1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("daemon exited with status %s before READY=1" % proc.returncode)
        try:
            data = notify_sock.recv(4096)
        except socket.timeout:
            continue
        if b"READY=1" in data.split(b"\n"):
            return
    raise RuntimeError("daemon did not send READY=1 within %.0f s" % timeout)


class DSDaemon:
    """A datastore process with its own runtime and state directories."""

    def __init__(self, base, extra_args=()):
        self.base = base
        self.runtime_dir = os.path.join(base, "run")
        self.state_dir = os.path.join(base, "state")
        self.socket_path = os.path.join(self.runtime_dir, "ds.sock")
        self.extra_args = list(extra_args)
        self.proc = None
        self.log_path = os.path.join(base, "datastore.log")
        os.makedirs(self.runtime_dir, exist_ok=True)
        os.chmod(base, 0o755)
        os.chmod(self.runtime_dir, 0o755)

    def start(self):
        notify_path = os.path.join(self.base, "notify.sock")
        if os.path.exists(notify_path):
            os.unlink(notify_path)
        ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        ns.bind(notify_path)
        env = dict(os.environ, NOTIFY_SOCKET=notify_path)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "datastore.server", "--runtime-dir", self.runtime_dir,
             "--state-dir", self.state_dir] + self.extra_args,
            env=env, stdout=log, stderr=log)
        log.close()
        try:
            wait_ready(ns, self.proc)
        finally:
            ns.close()
        return self

    def kill9(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def alive(self):
        return self.proc.poll() is None

    def client(self, **kw):
        return DSClient(self.socket_path, **kw)

    def log(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()


class Agent:
    """A DS client in its own process (see dsagent.py)."""

    def __init__(self, socket_path, uid=NOBODY):
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "dsagent.py"), socket_path],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, user=uid, group=uid,
            extra_groups=[], cwd="/", env={"PYTHONPATH": os.path.dirname(os.path.dirname(HERE))})
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("DS agent process failed to start")
        self.pid = json.loads(line)["ready"]

    def __getattr__(self, call):
        def remote(*args, **kwargs):
            enc = lambda v: {"b64": base64.b64encode(v).decode()} if isinstance(v, bytes) else v
            req = {"call": call, "args": [enc(a) for a in args], "kwargs": {k: enc(v) for k, v in kwargs.items()}}
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError("DS agent process died")
            return json.loads(line)
        return remote

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(5)


@pytest.fixture
def ds_factory():
    bases, daemons = [], []

    def make(extra_args=()):
        base = tempfile.mkdtemp(prefix="rsd-ds-")
        bases.append(base)
        d = DSDaemon(base, extra_args)
        daemons.append(d)
        return d

    yield make
    for d in daemons:
        d.stop()
    for b in bases:
        shutil.rmtree(b, ignore_errors=True)


@pytest.fixture
def ds(ds_factory):
    """A running datastore whose registrar is root (the test process)."""
    return ds_factory().start()


@pytest.fixture
def rsd(ds):
    """A running rsd (as root, the registrar) on the ds fixture's data store."""
    sys.path.insert(0, os.path.join(HERE, "services"))
    from rsdharness import RsdDaemon
    d = RsdDaemon(ds).start()
    yield d
    d.cleanup()


@pytest.fixture
def agent_on():
    """make(ds_daemon, label=None, uid=NOBODY): a DS client process on that daemon, labelled
    by the daemon's registrar when label is given."""
    made = []

    def make(d, label=None, uid=NOBODY):
        a = Agent(d.socket_path, uid=uid)
        made.append(a)
        if label:
            with d.client() as reg:
                reg.register(a.pid, label)
        return a

    yield make
    for a in made:
        try:
            a.close()
        except Exception:
            a.proc.kill()


@pytest.fixture
def agents(ds, agent_on):
    return lambda label=None, uid=NOBODY: agent_on(ds, label, uid)
