"""Testbed: one QEMU guest with the standard machine, its agent and its host-side handles."""

import atexit
import itertools
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref

from . import initramfs, machine
from .agent_client import AgentClient, b64decode, b64encode
from .console import TAIL_LINES as CONSOLE_TAIL_LINES
from .console import ConsoleLog
from .errors import CommandTimeout, TestbedError
from .hostnet import HostNet
from .kernel import find_kernel
from .qmp import QMP
from .results import PytestResult, RunResult, parse_report

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(PACKAGE_DIR)
GUEST_INIT = os.path.join(PACKAGE_DIR, "guest_init.py")
DEFAULT_BOOT_TIMEOUT_S = 90.0
TMPDIR_PREFIX = "rsd-testbed-"
OWNER_FILE = "owner.pid"
CONNECT_TIMEOUT_S = 30.0      # QEMU connects to our sockets while it starts
REPLY_GRACE_S = 20.0          # beyond a command's timeout, before the guest counts as hung
# PID 1 of the guest: testbed/guest_init.py itself, or systemd (testbed/guest_systemd.py).
INIT_SYSTEMS = ("testbed", "systemd")
_live = weakref.WeakSet()


def guest_python():
    """The interpreter the guest runs: the checkout's venv (never a pyenv shim: 4 s a call)."""
    explicit = os.environ.get("RSD_TESTBED_PYTHON")
    if explicit:
        return explicit
    venv = os.path.join(REPO_ROOT, ".venv", "bin", "python")
    return venv if os.path.exists(venv) else sys.executable


class Testbed:
    """A booted guest. Use as a context manager, or start()/wait_ready()/close().

    Parameters are checked here, once; see docs/testbed.md for the machine.
    """

    __test__ = False

    def __init__(self, disk_size_mb=64, disk_image=None, memory_mb=512, cpus=1,
                 boot_timeout=None, kernel=None, kernel_args=(), extra_qemu_args=(),
                 mode="agent", interactive=False, echo_console=None, reply_grace=None,
                 root_cache="loose", netdev="user", host_net=False, init="testbed",
                 root_disk_mb=None):
        self._init_args = {k: v for k, v in locals().items() if k != "self"}
        for name, value, low, high in (("disk_size_mb", disk_size_mb, 1, 1 << 20),
                                       ("memory_mb", memory_mb, 128, 1 << 16),
                                       ("cpus", cpus, 1, 64)):
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
        if isinstance(kernel_args, str) or not all(
                isinstance(w, str) and w and not any(c.isspace() for c in w) for w in kernel_args):
            raise ValueError(f"kernel_args must be a list of words without spaces, "
                             f"got {kernel_args!r}")
        if isinstance(extra_qemu_args, str) or not all(isinstance(a, str) for a in extra_qemu_args):
            raise ValueError(f"extra_qemu_args must be a list of str, got {extra_qemu_args!r}")
        if (not isinstance(netdev, str) or not netdev or any(c.isspace() for c in netdev)
                or "id=" in netdev):
            raise ValueError(f"netdev must be a QEMU -netdev spec without id= (net0 is added), "
                             f"e.g. 'user' or 'tap,ifname=tb0,script=no,downscript=no'; "
                             f"got {netdev!r}")
        if root_cache not in ("loose", "mmap", "none"):
            raise ValueError(f"root_cache must be 'loose', 'mmap' or 'none', got {root_cache!r}")
        if mode not in ("agent", "shell"):
            raise ValueError(f"mode must be 'agent' or 'shell', got {mode!r}")
        if init not in INIT_SYSTEMS:
            raise ValueError(f"init must be one of {', '.join(map(repr, INIT_SYSTEMS))}, "
                             f"got {init!r}")
        if root_disk_mb is not None:
            if (not isinstance(root_disk_mb, int) or isinstance(root_disk_mb, bool)
                    or not 64 <= root_disk_mb <= 1 << 20):
                raise ValueError(f"root_disk_mb must be an integer in [64, {1 << 20}], "
                                 f"got {root_disk_mb!r}")
            if init != "systemd":
                raise ValueError("root_disk_mb needs init=\"systemd\" (its guest set-up mounts "
                                 "the root disk)")
        if disk_image is not None and not os.path.isfile(disk_image):
            raise ValueError(f"disk_image {disk_image!r} does not exist (omit it to get a fresh "
                             f"{disk_size_mb} MiB image)")
        if boot_timeout is None:
            boot_timeout = float(os.environ.get("RSD_TESTBED_BOOT_TIMEOUT", DEFAULT_BOOT_TIMEOUT_S))
        if not boot_timeout > 0:
            raise ValueError(f"boot_timeout must be > 0, got {boot_timeout!r}")
        self.disk_size_mb, self.memory_mb, self.cpus = disk_size_mb, memory_mb, cpus
        self.boot_timeout = float(boot_timeout)
        self.reply_grace = REPLY_GRACE_S if reply_grace is None else _check_timeout(reply_grace)
        self.kernel_version = kernel
        self.kernel_args = tuple(kernel_args)
        self.extra_qemu_args = tuple(extra_qemu_args)
        self.mode, self.interactive = mode, interactive
        self.root_cache = root_cache
        self.init = init
        self.root_disk_mb = root_disk_mb
        self.root_disk = None      # the image of the root's upper layer, with root_disk_mb
        self.netdev = netdev
        # The e1000 on a TAP in a private host namespace (testbed/hostnet.py) instead of netdev.
        self.host_net = HostNet() if host_net else None
        if echo_console is None:
            echo_console = os.environ.get("RSD_TESTBED_ECHO") == "1"
        self.echo_console = echo_console and not interactive
        self._given_disk = disk_image
        self.disk_image = disk_image
        self.tmpdir = None
        self.proc = None
        self.qmp = None
        self.com2 = None
        self.agent = None
        self.boot_seconds = None
        self.kernel = None
        self._watchdog = None
        self._listeners = []
        self._socket_paths = {}
        self.console = None
        self.console_path = None
        self._forwards = {}
        self._pytest_runs = itertools.count(1)
        self._lock = threading.RLock()
        self._closed = False
        self._failure = None
        self._started_at = None

    # ----- life cycle -------------------------------------------------------------------

    def __enter__(self):
        self.start()
        self.wait_ready()
        return self

    def __exit__(self, *exc):
        self.close()

    def start(self):
        """Launch QEMU and connect the host ends; returns before the guest is ready."""
        if self.proc is not None:
            raise TestbedError("this Testbed was already started; make a new one")
        self.kernel = find_kernel(self.kernel_version)
        image = initramfs.build(self.kernel)
        python = guest_python()
        if not os.path.exists(python):
            raise TestbedError(f"guest python {python} does not exist: run `make setup` "
                               "or set RSD_TESTBED_PYTHON")
        _sweep_orphaned_tmpdirs()
        self.tmpdir = tempfile.mkdtemp(prefix=TMPDIR_PREFIX)
        with open(os.path.join(self.tmpdir, OWNER_FILE), "w") as f:
            f.write(str(os.getpid()))
        _live.add(self)
        try:
            if self.disk_image is None:
                self.disk_image = os.path.join(self.tmpdir, "disk.img")
                _make_disk(self.disk_image, self.disk_size_mb)
            if self.root_disk_mb is not None:
                self.root_disk = os.path.join(self.tmpdir, "root-disk.img")
                _make_root_disk(self.root_disk, self.root_disk_mb, self.kernel.modules)
            sockets = {n: os.path.join(self.tmpdir, f"{n}.sock") for n in ("agent", "com2", "qmp")}
            self._socket_paths = sockets
            listeners = self._listen_all()
            if self.host_net is not None:
                self.host_net.create()
                self.netdev = self.host_net.netdev
            cfg = machine.MachineConfig(
                kernel_image=self.kernel.image, initramfs=image, disk_image=self.disk_image,
                guest_python=python, guest_init=GUEST_INIT,
                agent_socket=sockets["agent"], com2_socket=sockets["com2"],
                qmp_socket=sockets["qmp"], memory_mb=self.memory_mb, cpus=self.cpus,
                mode=self.mode, interactive=self.interactive,
                kernel_args=self.kernel_args, extra_qemu_args=self.extra_qemu_args,
                netdev=self.netdev, root_disk=self.root_disk or "",
                env_words={"tb_cwd": REPO_ROOT, "tb_9p_cache": self.root_cache,
                           "tb_init_system": self.init})
            self.command = machine.qemu_command(cfg)
            if self.host_net is not None:
                self.command = self.host_net.wrap(self.command)
            self._launch()
            self._connect(listeners)
        except TestbedError as e:
            failure = str(e)
        except BaseException:
            self.close()
            raise
        else:
            return self
        self._fail(failure)

    def _listen_all(self):
        listeners = {}
        for name, path in self._socket_paths.items():
            if os.path.lexists(path):   # the previous QEMU's (reboot)
                os.unlink(path)
            listeners[name] = _listen(path)
        self._listeners = list(listeners.values())
        return listeners

    def _connect(self, listeners):
        conns = self._accept_all(listeners)
        self.com2 = conns["com2"]
        self.agent = AgentClient(conns["agent"])
        self.qmp = QMP(conns["qmp"])

    def _launch(self):
        piped = not self.interactive
        self.console_path = os.path.join(self.tmpdir, "console.log")
        self._started_at = time.monotonic()
        self.proc = subprocess.Popen(
            self.command, stdin=subprocess.DEVNULL if piped else None,
            stdout=subprocess.PIPE if piped else None, stderr=subprocess.STDOUT if piped else None,
            start_new_session=piped, cwd=self.tmpdir)
        # If this process dies without close() (even SIGKILL), the watchdog's stdin hits EOF
        # and it kills QEMU: no orphaned guests.
        self._watchdog = subprocess.Popen(
            ["/bin/sh", "-c", 'read _ ; kill -9 "$1" 2>/dev/null', "testbed-watchdog",
             str(self.proc.pid)], stdin=subprocess.PIPE, start_new_session=True)
        if piped:
            self.console = ConsoleLog(self.proc.stdout, self.console_path, self.echo_console)

    def _accept_all(self, listeners):
        conns, deadline = {}, time.monotonic() + CONNECT_TIMEOUT_S
        while len(conns) < len(listeners):
            if self.proc.poll() is not None:
                time.sleep(0.2)  # let the console reader catch QEMU's last words
                raise TestbedError(f"QEMU exited at start with status {self.proc.returncode}; "
                                   f"command: {' '.join(self.command)}")
            if time.monotonic() > deadline:
                raise TestbedError(f"QEMU did not connect its sockets within {CONNECT_TIMEOUT_S}s")
            waiting = {l.fileno(): n for n, l in listeners.items() if n not in conns}
            ready, _, _ = select.select(list(waiting), [], [], 0.2)
            for fd in ready:
                name = waiting[fd]
                conn, _ = listeners[name].accept()
                conn.setblocking(True)
                conns[name] = conn
        for l in listeners.values():
            l.close()
        self._listeners = []
        return conns

    def wait_ready(self):
        """Block until the guest agent says ready; TestbedError with the console tail if not."""
        deadline = self._started_at + self.boot_timeout
        while not self.agent.ready.wait(0.25):
            if self.proc.poll() is not None:
                self._fail(f"guest died during boot (QEMU exit status {self.proc.returncode})")
            if time.monotonic() > deadline:
                self._fail(f"guest not ready within the boot timeout of {self.boot_timeout:.0f}s")
        if self.agent.ready_info is None:
            self._fail(f"guest died during boot ({self.agent.closed_reason})", settle_s=2.0)
        self.boot_seconds = time.monotonic() - self._started_at
        return self

    def restart(self):
        """Close this guest (dead or alive) and boot a fresh one with the same settings, in
        this same object (a fresh disk image too, unless one was given)."""
        self.close()
        self.__init__(**self._init_args)
        self.start()
        return self.wait_ready()

    def reboot(self, timeout=120):
        """Reboot the guest from inside and wait until it is ready again: `systemctl reboot`
        (units stopped, file systems synced), which ends QEMU (-no-reboot), then the same QEMU
        command: the same disks (the AHCI image; with root_disk_mb, the root's writes), new
        connections (tb.com2, the agent, QMP; hostfwd ports are gone). Needs init="systemd"."""
        if self.init != "systemd":
            raise TestbedError("reboot() needs a systemd guest (Testbed(init=\"systemd\")): the "
                               "testbed's own init only powers off")
        timeout = _check_timeout(timeout)
        # A second later, from a transient timer: the agent answers before the reboot begins.
        self.run(["systemd-run", "--quiet", "--on-active=1", "/bin/systemctl", "--no-block",
                  "reboot"], timeout=30).check()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._fail(f"the guest did not reboot within {timeout:.0f}s")
        if self.proc.returncode != 0:
            self._fail(f"QEMU exited with status {self.proc.returncode} during the reboot")
        self._drop_connections()
        self._forwards = {}
        try:
            listeners = self._listen_all()
            self._launch()
            self._connect(listeners)
        except TestbedError as e:
            self._fail(str(e))
        return self.wait_ready()

    def _drop_connections(self):
        """Close what belongs to the QEMU that ran (it exited): handles, console, watchdog."""
        if self._watchdog is not None:
            self._watchdog.kill()  # QEMU is reaped: the watchdog must not kill a reused pid
            self._watchdog.wait()
            self._watchdog.stdin.close()
            self._watchdog = None
        for handle in (self.agent, self.qmp):
            if handle is not None:
                handle.close()
        for sock in [self.com2] + self._listeners:
            if sock is not None:
                sock.close()
        self.agent = self.qmp = self.com2 = None
        self._listeners = []
        if self.console is not None:
            self.console.join(5)
            self.console = None
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()

    @property
    def failure(self):
        """Why this testbed failed (the message of the TestbedError), or None."""
        return self._failure

    @property
    def alive(self):
        return (self.proc is not None and self.proc.poll() is None and not self._closed
                and self.agent is not None and self.agent.alive)

    def close(self):
        """Stop QEMU (quit, then kill), close every handle, remove the temp dir. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self.proc is not None and self.proc.poll() is None:
            if self.qmp is not None:
                try:
                    self.qmp.sock.settimeout(3)
                    self.qmp.execute("quit")
                except (TestbedError, OSError, ValueError):
                    pass
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._drop_connections()
        if self.host_net is not None:
            self.host_net.close()
        if self.tmpdir:
            if os.environ.get("RSD_TESTBED_KEEP") == "1":
                os.unlink(os.path.join(self.tmpdir, OWNER_FILE))  # the sweep leaves it alone
                print(f"testbed: kept {self.tmpdir} (RSD_TESTBED_KEEP=1)", file=sys.stderr)
            else:
                shutil.rmtree(self.tmpdir, ignore_errors=True)
        _live.discard(self)

    def kill(self):
        """Kill QEMU at once (as a crash would), then clean up."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self.close()

    # ----- console ----------------------------------------------------------------------

    def console_tail(self, lines=CONSOLE_TAIL_LINES):
        """The last lines the guest printed on its console (COM1)."""
        if self.console is None:
            return "(the console was on the terminal)" if self.interactive else "(no console)"
        exited = self.proc is not None and self.proc.poll() is not None
        return self.console.tail(lines, settle_s=0.5 if exited else 0.0)

    def _fail(self, message, settle_s=0.0):
        status = None
        if self.proc is not None and self.proc.poll() is None:
            try:  # a dying QEMU (panic, power-off) gets a moment to exit by itself
                self.proc.wait(settle_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()  # hung or broken: do not wait for a polite quit
                self.proc.wait()
        if self.proc is not None:
            status = self.proc.returncode
        tail = self.console_tail() if self.proc is not None else None
        self.close()
        self._failure = message if tail is None else (
            f"{message}\n--- guest console, last {CONSOLE_TAIL_LINES} lines "
            f"(QEMU status {status}) ---\n{tail}")
        raise TestbedError(self._failure)

    def _qemu_alive(self):
        return self.proc is not None and self.proc.poll() is None

    # ----- the agent --------------------------------------------------------------------

    def _request(self, what, op, wait_s, on_output=None, **fields):
        if self._failure is not None:
            raise TestbedError(f"this testbed failed earlier: {self._failure}")
        if self._closed or self.agent is None:
            raise TestbedError("this testbed is not running (it was closed)")
        death = None
        try:
            pending = self.agent.send(op, on_output=on_output, **fields)
            reply = self.agent.wait(pending, wait_s, self._qemu_alive)
        except TestbedError as e:
            death = str(e)
        if death is not None:
            self._fail(f"{what}: the guest died ({death})", settle_s=2.0)
        if reply is None:
            self._fail(f"{what}: no answer from the guest agent within {wait_s:.0f}s: "
                       "the guest hung; QEMU killed")
        if "error" in reply:
            raise TestbedError(f"{what}: the agent refused: {reply['error']}")
        if on_output is not None:
            reply["streamed"] = {fd: b"".join(chunks) for fd, chunks in pending.output.items()}
        return reply

    def run(self, argv, timeout=60, env=None, cwd=None, input=None, check=False, on_output=None):
        """Run argv in the guest as root; returns RunResult(.rc .stdout .stderr ...).

        env adds to the guest's environment (PATH starts with the venv's bin); cwd defaults
        to the checkout (REPO_ROOT, the same path as on the host). On timeout the command's
        process group is killed and CommandTimeout is raised.
        on_output(fd, data), if given, gets stdout (1) and stderr (2) as they are produced
        (called from the reader thread; keep it short); the result still holds all of it.
        """
        if isinstance(argv, (str, bytes)) or not argv or not all(isinstance(a, str) for a in argv):
            raise ValueError(f"argv must be a non-empty list of str (for a shell line use "
                             f"['sh', '-c', line]), got {argv!r}")
        timeout = _check_timeout(timeout)
        if env is not None and not all(isinstance(k, str) and isinstance(v, str)
                                       for k, v in dict(env).items()):
            raise ValueError("env must map str to str")
        if isinstance(input, str):
            input = input.encode()
        if on_output is not None and not callable(on_output):
            raise ValueError("on_output must be a callable(fd, data)")
        reply = self._request(f"run {list(argv)!r}", "run", timeout + self.reply_grace,
                              on_output=on_output, argv=list(argv),
                              env=dict(env) if env else None, cwd=str(cwd or REPO_ROOT),
                              timeout=timeout,
                              stdin=b64encode(input) if input is not None else None,
                              stream=on_output is not None)
        if on_output is not None:
            out, err = reply["streamed"][1], reply["streamed"][2]
        else:
            out, err = b64decode(reply["stdout"]), b64decode(reply["stderr"])
        result = RunResult(list(argv), reply["rc"], out, err, reply["duration"], reply["timed_out"])
        if result.timed_out:
            raise CommandTimeout(f"guest command timed out after {timeout}s and was killed\n"
                                 + result.describe(), result)
        return result.check() if check else result

    def read_file(self, path, timeout=60):
        """The bytes of a file in the guest."""
        reply = self._request(f"read {path}", "read", _check_timeout(timeout), path=str(path))
        return b64decode(reply["data"])

    def write_file(self, path, data, mode=0o644, timeout=60):
        """Create or replace a file in the guest (in its tmpfs overlay) with `data`.

        Use it for a file the host changed after the guest booted: the 9p root is mounted
        cache=loose, so the guest may keep seeing the old contents of a rewritten file.
        """
        if isinstance(data, str):
            data = data.encode()
        if not isinstance(mode, int) or not 0 <= mode <= 0o7777:
            raise ValueError(f"mode must be a permission number like 0o644, got {mode!r}")
        self._request(f"write {path}", "write", _check_timeout(timeout), path=str(path),
                      data=b64encode(bytes(data)), mode=mode)

    def push(self, host_path, guest_path=None, timeout=60):
        """Copy a host file into the guest (default: to the same path); returns the guest path."""
        with open(host_path, "rb") as f:
            data = f.read()
        guest_path = guest_path or os.path.abspath(host_path)
        self.write_file(guest_path, data, os.stat(host_path).st_mode & 0o7777, timeout)
        return guest_path

    def drop_caches(self, timeout=60):
        """Make the guest see the host's files as they are now: drops its page, dentry and
        inode caches (the 9p root is cache=loose). The next reads are cold (a pytest
        process then costs ~3 s more)."""
        self.run(["sh", "-c", "sync; echo 3 > /proc/sys/vm/drop_caches"], timeout=timeout).check()

    def journal(self, *args, timeout=60):
        """journalctl's output in a systemd guest (Testbed(init="systemd")), e.g.
        tb.journal("-u", "rsd", "-o", "json"); the journal is volatile (/run/log/journal)."""
        if self.init != "systemd":
            raise TestbedError("no journal: this guest's PID 1 is the testbed's own init; "
                               "boot Testbed(init=\"systemd\") for one")
        return self.run(["journalctl", "--no-pager", *args], timeout=timeout).check().stdout

    def ping(self, timeout=30):
        """One round trip through the agent without starting a process."""
        self._request("ping", "ping", _check_timeout(timeout))

    def run_pytest(self, args, timeout=600, env=None, cwd=None, on_output=None):
        """One pytest process in the guest (cwd: the checkout); per-test outcomes returned.

        args are pytest arguments, e.g. ["tests/guest/test_kmod_guest.py", "-x"].
        """
        if isinstance(args, str) or not all(isinstance(a, str) for a in args):
            raise ValueError(f"args must be a list of str, got {args!r}")
        report = f"/tmp/testbed-pytest-{next(self._pytest_runs)}.jsonl"
        full_env = {"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1", "RSD_TESTBED_PYTEST_REPORT": report}
        full_env.update(env or {})
        argv = [guest_python(), "-m", "pytest", "-p", "no:cacheprovider",
                "-p", "testbed.guest_pytest_plugin", *args]
        result = self.run(argv, timeout=timeout, env=full_env, cwd=cwd or REPO_ROOT,
                          on_output=on_output)
        try:
            text = self.read_file(report).decode()
        except TestbedError:
            if not self.alive:
                raise
            text = ""  # pytest ran no test (bad arguments): the output tells why
        return PytestResult(result, parse_report(text))

    # ----- host-side handles ------------------------------------------------------------

    def hostfwd(self, guest_port, proto="tcp"):
        """A host port on 127.0.0.1 forwarded to guest_port on the e1000 (10.0.2.15)."""
        if not isinstance(guest_port, int) or not 0 < guest_port < 65536:
            raise ValueError(f"guest_port must be 1..65535, got {guest_port!r}")
        if proto not in ("tcp", "udp"):
            raise ValueError(f"proto must be 'tcp' or 'udp', got {proto!r}")
        if not self.netdev.startswith("user"):
            raise TestbedError(f"hostfwd needs user-mode networking; this testbed's e1000 uses "
                               f"netdev {self.netdev!r}")
        key = (proto, guest_port)
        if key in self._forwards:
            return self._forwards[key]
        last = ""
        for _ in range(5):  # a free port can be taken between probe and use: retry
            host_port = _free_port(proto)
            last = self.qmp.hmp(f"hostfwd_add net0 {proto}:127.0.0.1:{host_port}-:{guest_port}")
            if not last.strip():
                self._forwards[key] = host_port
                return host_port
        raise TestbedError(f"hostfwd for guest {proto} port {guest_port} failed: {last.strip()}")

    @property
    def console_log(self):
        """Everything the guest printed on its console so far."""
        if self.console is None:
            raise TestbedError("no console log: the testbed was not started, or is interactive")
        return self.console.text()


def _sweep_orphaned_tmpdirs():
    """Remove temp dirs whose owner died without closing (SIGKILL): its QEMU is gone too."""
    root = tempfile.gettempdir()
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if not name.startswith(TMPDIR_PREFIX):
            continue
        try:
            with open(os.path.join(path, OWNER_FILE)) as f:
                owner = int(f.read())
            os.kill(owner, 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except (OSError, ValueError):
            continue  # no owner file (kept, or being created) or not ours to judge


def _check_timeout(timeout):
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
    return float(timeout)


def _listen(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(1)
    return s


def _make_disk(path, size_mb):
    with open(path, "wb") as f:
        try:  # preallocated: the AHCI benchmarks should not measure sparse-file allocation
            os.posix_fallocate(f.fileno(), 0, size_mb << 20)
        except OSError:
            f.truncate(size_mb << 20)


# The module tree a root disk's guest sees (Testbed(root_disk_mb=)): these modules and their
# dependencies, not the kernel's ~4000. DKMS runs depmod for every install and removal, and
# depmod reads every module: minutes under TCG with the full tree (6.12's .ko.xz worst).
# What the systemd guest loads: its disk, the front ends' nbd and cuse, what systemd's
# modprobe@ units ask for, the testbed's own devices' drivers.
ROOT_DISK_MODULES = ("virtio_blk", "ext4", "overlay", "9p", "9pnet_virtio", "virtio_pci",
                     "virtio_console", "nbd", "cuse", "fuse", "loop", "dm_mod", "efi_pstore",
                     "tun", "e1000", "ahci", "sd_mod", "vfio_pci", "uio_pci_generic")


def _make_root_disk(path, size_mb, modules_dir=None):
    # Sparse: the guest's writes alone take space. ext4 with a journal: the guest's root
    # overlay keeps its upper layer there (guest_systemd.py) across a reboot. With
    # modules_dir, the guest kernel's module tree on it is ROOT_DISK_MODULES only: an opaque
    # kernel/ directory (hard links, copied in by mkfs -d) hides the host's full one.
    with open(path, "wb") as f:
        f.truncate(size_mb << 20)
    mkfs = shutil.which("mkfs.ext4") or "/sbin/mkfs.ext4"
    content = []
    if modules_dir:
        src = path + ".d"
        content = ["-d", src]
        real = os.path.realpath(modules_dir)       # /lib is /usr/lib on merged-/usr Debian
        target = os.path.join(src, "upper", real.lstrip("/"))
        os.makedirs(os.path.join(target, "kernel"))
        # overlayfs's mark: the lower layers' kernel/ is not merged in.
        os.setxattr(os.path.join(target, "kernel"), "trusted.overlay.opaque", b"y")
        for _, rel in initramfs.module_load_order(real, ROOT_DISK_MODULES):
            os.makedirs(os.path.dirname(os.path.join(target, rel)), exist_ok=True)
            os.link(os.path.join(real, rel), os.path.join(target, rel))
    try:
        r = subprocess.run([mkfs, "-q", "-F", "-m", "0", "-L", "testbed-root", *content, path],
                           capture_output=True, text=True, timeout=300)
    except FileNotFoundError:
        raise TestbedError("mkfs.ext4 not found: install the Debian package e2fsprogs "
                           "(`make setup`)") from None
    finally:
        if content:
            shutil.rmtree(content[1], ignore_errors=True)
    if r.returncode != 0:
        raise TestbedError(f"mkfs.ext4 {path} failed: {r.stderr.strip()}")


def _free_port(proto):
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@atexit.register
def _close_all():
    for tb in list(_live):
        tb.close()
