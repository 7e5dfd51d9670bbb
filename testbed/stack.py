"""The whole rsd stack inside a booted testbed: datastore, rsd, the 16550
driver for COM2 and its tty front end.  Used by the serial VM tests, the
demo (`make demo`) and the serial benchmark, so all three run the same
configuration a server would.

Host side, everything goes through the testbed agent (one shell command is
~40 ms in the guest); the far end of COM2 is `tb.com2`.
"""

import json
import os
import socket
import subprocess
import time

from . import REPO_ROOT

GUEST_BASE = "/run/rsdtest"
RUNTIME = GUEST_BASE + "/run"
STATE = GUEST_BASE + "/state"
CONFIG = GUEST_BASE + "/etc"
VENV_BIN = os.path.join(REPO_ROOT, ".venv", "bin")

SERIAL_TOML = """\
# COM2 of the testbed: ports 0x2f8-0x2ff, IRQ 3.
program = "drivers.serial16550.driver"
args = ["--base", "0x2f8", "--irq", "3"]
class = "chr"
group = "dialout"           # the front end shares it to reach the driver's socket
period = {period}
backoff = {backoff}
init_timeout = 30

[resources]
io = ["0x2f8-0x2ff"]
irq = [3]
"""

TTY_TOML = """\
# The tty front end for serial0: a pty behind {runtime}/tty/serial0.
program = "frontends.tty"
args = ["--label", "serial0", "--mode", "0666"]
class = "server"
user = "nobody"
group = "dialout"
init_timeout = 30
"""

BADPORT_TOML = """\
# A driver that reaches for COM1's ports while it owns only COM4's (free: COM2's
# are serial0's, and the module never grants one range twice).
program = "{repo}/tests/guest/badport_driver.py"
class = "chr"
init_timeout = 30

[resources]
io = ["0x2e8-0x2ef"]
"""


def unit_capabilities(unit=os.path.join(REPO_ROOT, "systemd", "rsd.service")):
    """The capabilities rsd.service's CapabilityBoundingSet= names, as setpriv spells them."""
    with open(unit) as f:
        for line in f:
            key, _, value = line.strip().partition("=")
            if key == "CapabilityBoundingSet":
                return [c.lower()[len("cap_"):] for c in value.split()]
    raise RuntimeError("%s has no CapabilityBoundingSet=" % unit)


def build_rsdrv(out_dir, kernel=None):
    """Build kmod/ in a temp copy (the checkout stays clean); return rsdrv.ko.

    Against the headers of `kernel` (a series such as "6.12" or a version), by default the
    testbed's kernel ($RSD_TESTBED_KERNEL, else 6.1): the one the session guest boots.
    """
    import shutil
    from .kernel import find_kernel
    kernel = find_kernel(kernel)
    src = os.path.join(out_dir, "kmod")
    shutil.rmtree(src, ignore_errors=True)
    shutil.copytree(os.path.join(REPO_ROOT, "kmod"), src)
    r = subprocess.run(["make", "-C", kernel.build_dir, "M=" + src, "modules"],
                       capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise RuntimeError("rsdrv module build failed:\n%s\n%s" % (r.stdout[-3000:], r.stderr[-3000:]))
    return os.path.join(src, "rsdrv.ko")


def read_exactly(sock, n, timeout):
    """Read n bytes from sock within timeout seconds (what arrived so far on failure)."""
    out = b""
    deadline = time.monotonic() + timeout
    while len(out) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError("got %d of %d bytes within %.0f s: %r" % (len(out), n, timeout, out[-200:]))
        sock.settimeout(left)
        try:
            data = sock.recv(n - len(out))
        except socket.timeout:
            continue
        if not data:
            raise AssertionError("the serial line closed after %d bytes" % len(out))
        out += data
    return out


class GuestStack:
    """What both guest stacks share: commands in the guest with the stack's paths, rsctl,
    waiting.  A subclass sets env (RSD_* paths, PATH) and logs()."""
    env = {}

    def __init__(self, testbed, echo=None):
        self.testbed = testbed
        self.echo = echo  # a callable to show each guest command (the demo)

    def sh(self, line, timeout=60):
        if self.echo:
            self.echo(line)
        return self.testbed.run(["sh", "-c", line], timeout=timeout, env=self.env)

    def rsctl(self, *args, timeout=60):
        return self.sh("rsctl " + " ".join(args), timeout=timeout)

    def status(self, label):
        r = self.rsctl("status", label, "--json")
        r.check()
        return json.loads(r.stdout)

    def logs(self):
        raise NotImplementedError

    def wait_for(self, test, what, timeout=60):
        deadline = time.monotonic() + timeout
        while self.sh(test).rc != 0:
            if time.monotonic() > deadline:
                raise RuntimeError("timed out waiting for %s:\n%s" % (what, self.logs()))
            time.sleep(0.3)

    def wait_up(self, label, old_generation, timeout=30):
        deadline = time.monotonic() + timeout
        while True:
            st = self.status(label)
            if st["state"] == "up" and st["generation"] > old_generation:
                return st
            if time.monotonic() > deadline:
                raise AssertionError("%s not up again within %d s: %s\n%s" % (label, timeout, st, self.logs()))
            time.sleep(0.2)


class SerialStack(GuestStack):
    def __init__(self, testbed, rsdrv_ko, period=1, backoff=False, echo=None, unit_bounding_set=False):
        super().__init__(testbed, echo)
        # Run rsd with exactly the capability bounding set systemd/rsd.service gives it.
        self.rsd_prefix = ("setpriv --bounding-set=-all,%s -- " % ",".join(
            "+" + c for c in unit_capabilities())) if unit_bounding_set else ""
        self.com2 = testbed.com2
        self.ko = rsdrv_ko
        self.period = period
        self.backoff = backoff
        self.tty = RUNTIME + "/tty/serial0"
        self.env = {"RSD_RUNTIME_DIR": RUNTIME, "RSD_STATE_DIR": STATE, "RSD_CONFIG_DIR": CONFIG,
                    "PATH": VENV_BIN + ":/usr/sbin:/usr/bin:/sbin:/bin"}

    # -- guest commands ------------------------------------------------------------
    def ctl(self, *args):
        r = self.sh("python -m drivers.serial16550.ctl " + " ".join(args))
        reply = json.loads(r.stdout)
        assert reply.get("ok"), reply
        return reply

    def driver_status(self):
        return self.ctl("status")

    def frontend_status(self):
        r = self.rsctl("ds", "get", "tty.serial0.status", "--json")
        r.check()
        return json.loads(json.loads(r.stdout)["value"])

    def endpoint_info(self, label):
        """The module's introspection of label's endpoint (debugfs)."""
        text = self.sh("cat /sys/kernel/debug/rsdrv/endpoints").stdout
        blocks, cur = {}, None
        for line in text.splitlines():
            if line.startswith("endpoint "):
                cur = line.split()[1]
                blocks[cur] = line + "\n"
            elif cur is not None and line.startswith("  "):
                blocks[cur] += line + "\n"
            else:
                cur = None
        return blocks.get(label, "(no endpoint %s in:\n%s)" % (label, text))

    # -- life cycle -------------------------------------------------------------------
    def start(self, timeout=120):
        tb = self.testbed
        ko = tb.push(self.ko, "/tmp/rsdrv.ko")
        # Loaded here, unloaded at stop: the next user of the session's guest finds it as it was.
        self.loaded_rsdrv = self.sh("[ -e /sys/module/rsdrv ]").rc != 0
        if self.loaded_rsdrv:
            self.sh("insmod %s" % ko).check()
        self.sh("mountpoint -q /sys/kernel/debug || mount -t debugfs none /sys/kernel/debug")
        self.sh("mkdir -p %s/services.d %s/tty %s && chown nobody:dialout %s/tty"
                % (CONFIG, RUNTIME, STATE, RUNTIME)).check()
        tb.write_file(CONFIG + "/services.d/serial0.toml",
                      SERIAL_TOML.format(period=self.period, backoff="true" if self.backoff else "false").encode())
        tb.write_file(CONFIG + "/services.d/tty0.toml", TTY_TOML.format(runtime=RUNTIME).encode())
        self.sh("setsid datastore > %s/datastore.log 2>&1 < /dev/null &" % GUEST_BASE).check()
        self.wait_for("[ -S %s/ds.sock ]" % RUNTIME, "datastore to listen")
        self.sh("setsid %srsd > %s/rsd.log 2>&1 < /dev/null &" % (self.rsd_prefix, GUEST_BASE)).check()
        self.wait_for("[ -S %s/rsd.sock ]" % RUNTIME, "rsd to listen")
        deadline = time.monotonic() + timeout
        while True:
            try:
                if (self.status("serial0")["state"] == "up" and self.status("tty0")["state"] == "up"
                        and self.frontend_status()["state"] == "up"):
                    break
            except (AssertionError, ValueError, KeyError, RuntimeError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the serial stack did not come up within %d s:\n%s" % (timeout, self.logs()))
            time.sleep(0.5)
        self.quiesce()
        return self

    def quiesce(self):
        """Discard what earlier users of COM2 left in flight, both ways: bytes
        queued in QEMU or the sockets for the guest, and for the host."""
        self.drain_host()
        self.sh("timeout 1 cat %s > /dev/null; true" % self.tty)
        self.drain_host()

    def drain_host(self, quiet=0.3):
        """Read and drop what waits at the host end of the line."""
        self.com2.settimeout(quiet)
        try:
            while self.com2.recv(65536):
                pass
        except socket.timeout:
            pass

    def logs(self):
        return self.sh("tail -n 30 %s/*.log %s/log/*.log 2>&1" % (GUEST_BASE, STATE)).stdout

    def stop(self):
        self.sh("rsctl shutdown; sleep 1; pkill -x datastore; pkill -f 'busybox getty'", timeout=60)
        if getattr(self, "loaded_rsdrv", False):
            # Endpoints close as their holders die: wait for the module to be free.
            self.sh("for i in $(seq 50); do rmmod rsdrv 2>/dev/null && break; sleep 0.2; done; "
                    "[ ! -e /sys/module/rsdrv ]", timeout=60).check()

    def wait_divisor(self, divisor, timeout=10):
        deadline = time.monotonic() + timeout
        while True:
            got = self.driver_status()["divisor"]
            if got == divisor:
                return
            if time.monotonic() > deadline:
                raise AssertionError("UART divisor is %d, expected %d" % (got, divisor))
            time.sleep(0.2)

    def wait_line(self, predicate, timeout=10):
        deadline = time.monotonic() + timeout
        while True:
            line = self.driver_status()["line"]
            if predicate(line):
                return line
            if time.monotonic() > deadline:
                raise AssertionError("line settings did not reach the driver: %s" % line)
            time.sleep(0.2)

    # -- applications in the guest ------------------------------------------------------
    def start_reader(self, n, path):
        self.sh("rm -f %s; setsid sh -c 'head -c %d %s > %s.part && mv %s.part %s' < /dev/null > /dev/null 2>&1 &"
                % (path, n, self.tty, path, path, path)).check()
        return path

    def finish_reader(self, path, timeout=30):
        self.wait_for("[ -e %s ]" % path, "the reader to get its bytes", timeout=timeout)
        return self.testbed.read_file(path)

    def start_writer(self, out):
        code = ("import os,sys\n"
                "fd=os.open(%r, os.O_WRONLY)\n"
                "n=0\n"
                "try:\n"
                "    while True:\n"
                "        n+=os.write(fd, b'x'*256)\n"
                "except OSError as e:\n"
                "    open(%r+'.part','w').write('errno=%%d written=%%d' %% (e.errno, n))\n"
                "    os.rename(%r+'.part', %r)\n") % (self.tty, out, out, out)
        self.testbed.write_file(out + ".py", code.encode())
        self.sh("rm -f %s; setsid python %s.py < /dev/null > /dev/null 2>&1 &" % (out, out)).check()
        return out

    def finish_writer(self, out, timeout=30):
        self.wait_for("[ -e %s ]" % out, "the writer to see an error", timeout=timeout)
        return self.testbed.read_file(out).decode()

    def run_probe_outside_entry(self):
        self.testbed.write_file(CONFIG + "/services.d/badport.toml", BADPORT_TOML.format(repo=REPO_ROOT).encode())
        try:
            self.rsctl("reload")
            deadline = time.monotonic() + 60
            while self.sh("grep -q 'outside' %s/log/badport.log" % STATE).rc != 0:
                if time.monotonic() > deadline:
                    raise AssertionError("badport driver did not report:\n" + self.logs())
                time.sleep(0.3)
            return self.sh("cat %s/log/badport.log" % STATE).stdout
        finally:
            self.sh("rm -f %s/services.d/badport.toml" % CONFIG)

    def start_getty(self):
        self.sh("setsid busybox getty -n -l /bin/sh 115200 %s < /dev/null > /dev/null 2>&1 &" % self.tty).check()

    def stop_getty(self):
        # Everything whose controlling tty is the pty goes (getty and the shell it started, whatever
        # its argv[0]): a shell left reading the tty would eat what later tests send.  getty leaves
        # the line cooked (onlcr, echo, ixon, ixoff): give later users a raw line again.
        pts = self.sh("readlink %s" % self.tty).stdout.strip().replace("/dev/", "")
        others = "pgrep -t %s | grep -vx %d" % (pts, self.status("tty0")["pid"])   # never the front end
        self.sh("pkill -f 'busybox getty'; %s | xargs -r kill -9; "
                "for i in 1 2 3 4 5 6 7 8 9 10; do %s >/dev/null || break; sleep 0.2; done; "
                "stty -F %s raw -echo -ixon -ixoff; true" % (others, others, self.tty))
        self.drain_host()
