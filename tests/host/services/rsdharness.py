"""Run a real rsd (with a real datastore) in temp directories, for host tests."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
PROBE = os.path.join(HERE, "probe.py")
RSCTL = os.path.join(os.path.dirname(sys.executable), "rsctl")


def wait_for(cond, timeout=5.0, interval=0.01, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %.1f s waiting for %s" % (timeout, what))
        time.sleep(interval)


def alive(pid):
    """True while pid runs (a zombie has ended: it only waits to be reaped)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class RsdDaemon:
    def __init__(self, ds, uid_base=610000, extra_env=None, orphan_timeout=5.0, argv_prefix=(),
                 cgroups=True):
        self.ds = ds
        self.base = tempfile.mkdtemp(prefix="rsd-test-")
        os.chmod(self.base, 0o755)
        self.config_dir = os.path.join(self.base, "etc")
        self.services_dir = os.path.join(self.config_dir, "services.d")
        self.policy_dir = os.path.join(self.config_dir, "policy.d")
        self.state_dir = os.path.join(self.base, "state")
        self.runtime_dir = ds.runtime_dir
        self.socket_path = os.path.join(self.runtime_dir, "rsd.sock")
        self.log_path = os.path.join(self.base, "rsd.log")
        self.uid_base = uid_base
        self.orphan_timeout = orphan_timeout
        self.extra_env = extra_env or {}
        self.argv_prefix = list(argv_prefix)  # e.g. a namespace to run rsd in
        # Each test's rsd has its own cgroup subtree, removed at cleanup.
        from rsd.cgroup import cgroup2_mount
        mount = cgroup2_mount() if cgroups else None
        self.cgroup_root = os.path.join(mount, os.path.basename(self.base)) if mount else None
        if self.cgroup_root:
            self.extra_env.setdefault("RSD_CGROUP_ROOT", self.cgroup_root)
        self.proc = None
        os.makedirs(self.services_dir)
        os.makedirs(self.policy_dir)
        # rsd runs policy scripts as root only from directories nobody else can write.
        for d in (self.config_dir, self.services_dir, self.policy_dir):
            os.chmod(d, 0o755)

    @property
    def env(self):
        env = dict(os.environ, RSD_RUNTIME_DIR=self.runtime_dir, RSD_DS_SOCKET=self.ds.socket_path)
        env.pop("RSD_SOCKET", None)
        return env

    def start(self, timeout=10.0):
        notify_path = os.path.join(self.base, "notify.sock")
        if os.path.exists(notify_path):  # a restart of this rsd
            os.unlink(notify_path)
        ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        ns.bind(notify_path)
        env = dict(self.env, NOTIFY_SOCKET=notify_path, **self.extra_env)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv_prefix + [sys.executable, "-m", "rsd.main", "--config-dir", self.config_dir,
                 "--runtime-dir", self.runtime_dir, "--state-dir", self.state_dir,
                 "--ds-socket", self.ds.socket_path, "--uid-base", str(self.uid_base),
                 "--orphan-timeout", str(self.orphan_timeout)],
                env=env, stdout=log, stderr=log)
        self.notify = ns
        ns.settimeout(0.1)
        deadline = time.monotonic() + timeout
        self.notifications = []
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError("rsd exited with %s before READY=1:\n%s" % (self.proc.returncode, self.log()))
            try:
                data = ns.recv(4096).decode()
            except socket.timeout:
                continue
            self.notifications.append(data)
            if "READY=1" in data.split("\n"):
                return self
        raise AssertionError("rsd did not send READY=1:\n" + self.log())

    def log(self):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def service_log(self, label):
        with open(os.path.join(self.state_dir, "log", label + ".log"), errors="replace") as f:
            return f.read()

    def request(self, msg, timeout=30.0):
        from rsd.control import request
        return request(msg, self.socket_path, timeout)

    def up(self, program=PROBE, label="probe", args=(), **spec):
        spec.update(label=label, program=program, args=list(args))
        reply = self.request({"op": "up", "spec": spec})
        assert reply.get("ok"), "up failed: %s\n%s" % (reply.get("error"), self.log())
        return reply

    def status(self, label):
        reply = self.request({"op": "status", "label": label})
        assert reply.get("ok"), reply
        return reply["services"][0]

    def rsctl(self, *args, user=None, timeout=30):
        kw = {}
        if user is not None:
            kw = dict(user=user, group=user, extra_groups=[], cwd="/")
        return subprocess.run([RSCTL, *args], capture_output=True, text=True, env=self.env,
                              timeout=timeout, **kw)

    def sock_path(self, label):
        return os.path.join(self.runtime_dir, "svc", label + ".sock")

    def ask(self, label, command, timeout=10.0):
        """One command to the probe service; waits in the backlog across restarts."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(self.sock_path(label))
            s.sendall(command.encode())
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        finally:
            s.close()
        return json.loads(data)

    def wait_generation(self, label, above, timeout=5.0, state="up"):
        def check():
            st = self.status(label)
            return st if st["generation"] > above and st["state"] == state else None
        return wait_for(check, timeout, what="%s generation > %d and %s\n%s" % (label, above, state, self.log()))

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.notify.close()

    def service_cgroup(self, label):
        return os.path.join(self.cgroup_root, "services", label)

    def cleanup(self):
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)
        if self.cgroup_root and os.path.isdir(self.cgroup_root):
            remove_cgroup_tree(self.cgroup_root)


def remove_cgroup_tree(root):
    """Kill what is left under root and rmdir it, leaves first."""
    try:
        with open(os.path.join(root, "cgroup.kill"), "w") as f:
            f.write("1")
    except OSError:
        pass
    deadline = time.monotonic() + 5
    for d, _, _ in sorted(os.walk(root), key=lambda w: -w[0].count("/")):
        while True:
            try:
                os.rmdir(d)
                break
            except FileNotFoundError:
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
