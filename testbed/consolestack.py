"""The console stack inside a booted testbed: datastore, rsd, the VGA display
driver, the i8042 keyboard driver (unless keyboard=False), and the console
front end.  What a server would run, with the paths of testbed.stack.

The screen is read from outside the guest: the VGA text buffer through QEMU's
monitor (`xp` on 0xb8000), so what the test sees is what the device holds.
"""

import json
import os
import re
import time

from .stack import CONFIG, GUEST_BASE, REPO_ROOT, RUNTIME, STATE, VENV_BIN, GuestStack

VGA_TOML = """\
# The testbed's VGA in text mode: the 80x25 text buffer and the CRT controller's index/data.
program = "drivers.vga.driver"
class = "chr"
group = "tty"               # the console front end shares it to reach the driver's socket
period = {period}
backoff = false
init_timeout = 30

[resources]
mem = ["0xb8000-0xb8fff"]
io = ["0x3d4-0x3d5"]
"""

KBD_TOML = """\
# The i8042 keyboard controller: data and command/status ports, IRQ 1.
program = "drivers.i8042.driver"
class = "chr"
group = "tty"
period = {period}
backoff = false
init_timeout = 30

[resources]
io = ["0x60-0x60", "0x64-0x64"]
irq = [1]
"""

CONSOLE_TOML = """\
# The console front end: a pty behind {runtime}/tty/console0 drawn on vga0{kbd_comment}.
program = "frontends.console"
args = ["--label", "console0", "--display", "vga0"{kbd_args}, "--consoles", "2", "--mode", "0666"]
class = "server"
user = "nobody"
group = "tty"
init_timeout = 30
"""

REACH_TOML = """\
# A driver given the VGA's second text page and graphics-controller ports that
# reaches for vga0's text buffer and CRT controller.
program = "{repo}/tests/guest/console_reach_driver.py"
class = "chr"
init_timeout = 30

[resources]
mem = ["0xb9000-0xb9fff"]
io = ["0x3ce-0x3cf"]
"""

DRIVER_STATUS = """\
import json, sys
from libdrv.drvlink import DriverLink
print(json.dumps(DriverLink(sys.argv[1]).call("status")))
"""


class ConsoleStack(GuestStack):
    def __init__(self, testbed, rsdrv_ko, period=1, keyboard=True, vtcon=True, echo=None):
        """vtcon: run policy.d/vtcon-follow for vga0 (the kernel's console kept off the
        display while vga0 runs, given it back when vga0 goes)."""
        super().__init__(testbed, echo)
        self.ko = rsdrv_ko
        self.vtcon = vtcon
        self.period = period
        self.keyboard = keyboard
        self.tty = RUNTIME + "/tty/console0"
        self.tty1 = RUNTIME + "/tty/console1"      # the second virtual console (Alt-F2)
        self.env = {"RSD_RUNTIME_DIR": RUNTIME, "RSD_STATE_DIR": STATE, "RSD_CONFIG_DIR": CONFIG,
                    "PATH": VENV_BIN + ":/usr/sbin:/usr/bin:/sbin:/bin"}
        self.labels = ["vga0", "console0"] + (["kbd0"] if keyboard else [])

    # -- the screen, from outside ----------------------------------------------------------
    def vga_cells(self, rows=25, cols=80):
        """The text buffer as [(char, attr), ...] per row, read by QEMU's monitor."""
        n = rows * cols
        text = self.testbed.qmp.hmp("xp /%dhx 0xb8000" % n)
        words = []
        for line in text.splitlines():
            _, _, rest = line.partition(":")
            words += [int(w, 16) for w in rest.split()]
        if len(words) != n:
            raise AssertionError("xp gave %d cells, expected %d:\n%s" % (len(words), n, text[:500]))
        return [[(w & 0xFF, w >> 8) for w in words[r * cols:(r + 1) * cols]] for r in range(rows)]

    def vga_text(self):
        return ["".join(chr(c) for c, _ in row).rstrip() for row in self.vga_cells()]

    def driver_status(self, label):
        self.testbed.write_file("/tmp/console_driver_status.py", DRIVER_STATUS.encode())
        r = self.sh("python /tmp/console_driver_status.py %s/svc/%s.sock" % (RUNTIME, label))
        r.check()
        return json.loads(r.stdout)

    def display_status(self):
        return self.driver_status("vga0")

    def frontend_status(self):
        r = self.rsctl("ds", "get", "console.console0.status", "--json")
        r.check()
        return json.loads(json.loads(r.stdout)["value"])

    def wait_settled(self, timeout=30, bytes_in=None):
        """Until the front end has read what was written (bytes_in at least) and the
        display answered every update, with nothing left to send; the front end's
        status.  The display driver's status then is kept in settled_display."""
        r = self.sh("python %s/tests/guest/console_settle.py console.console0.status %s/svc/vga0.sock %d %d"
                    % (REPO_ROOT, RUNTIME, bytes_in or 0, timeout), timeout=timeout + 30)
        try:
            out = json.loads(r.stdout)
        except ValueError:
            raise AssertionError("the settle helper failed: %s\n%s" % (r.stdout, r.stderr))
        if out["timeout"]:
            raise AssertionError("the console did not settle within %d s: %s\n%s" % (timeout, out["frontend"], self.logs()))
        self.settled_display = out["display"]
        return out["frontend"]

    def endpoint_info(self, label):
        text = self.sh("cat /sys/kernel/debug/rsdrv/endpoints").stdout
        m = re.search(r"^endpoint %s\b.*?(?=^endpoint |\Z)" % re.escape(label), text, re.S | re.M)
        return m.group(0) if m else "(no endpoint %s in:\n%s)" % (label, text)

    # -- life cycle ----------------------------------------------------------------------------
    def start(self, timeout=120):
        tb = self.testbed
        ko = tb.push(self.ko, "/tmp/rsdrv.ko")
        self.loaded_rsdrv = self.sh("[ -e /sys/module/rsdrv ]").rc != 0
        if self.loaded_rsdrv:
            self.sh("insmod %s" % ko).check()
        self.sh("mountpoint -q /sys/kernel/debug || mount -t debugfs none /sys/kernel/debug")
        self.sh("mkdir -p %s/services.d %s/tty %s && chown nobody:tty %s/tty"
                % (CONFIG, RUNTIME, STATE, RUNTIME)).check()
        tb.write_file(CONFIG + "/services.d/vga0.toml", VGA_TOML.format(period=self.period).encode())
        if self.keyboard:
            tb.write_file(CONFIG + "/services.d/kbd0.toml", KBD_TOML.format(period=self.period).encode())
        tb.write_file(CONFIG + "/services.d/console0.toml", CONSOLE_TOML.format(
            runtime=RUNTIME, kbd_comment=" and typed on kbd0" if self.keyboard else "",
            kbd_args=', "--keyboard", "kbd0"' if self.keyboard else "").encode())
        self.sh("setsid datastore > %s/datastore.log 2>&1 < /dev/null &" % GUEST_BASE).check()
        self.wait_for("[ -S %s/ds.sock ]" % RUNTIME, "datastore to listen")
        if self.vtcon:
            r = self.sh("setsid %s/policy.d/vtcon-follow vga0 > %s/vtcon.log 2>&1 < /dev/null & echo $!"
                        % (REPO_ROOT, GUEST_BASE))
            r.check()
            self.vtcon_pid = int(r.stdout.split()[-1])
        self.sh("setsid rsd > %s/rsd.log 2>&1 < /dev/null &" % GUEST_BASE).check()
        self.wait_for("[ -S %s/rsd.sock ]" % RUNTIME, "rsd to listen")
        deadline = time.monotonic() + timeout
        while True:
            try:
                if (all(self.status(label)["state"] == "up" for label in self.labels)
                        and self.frontend_status()["display"] is not None
                        and (not self.keyboard or self.frontend_status()["keyboard"] is not None)):
                    break
            except (AssertionError, ValueError, KeyError, RuntimeError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the console stack did not come up within %d s:\n%s" % (timeout, self.logs()))
            time.sleep(0.5)
        return self

    def logs(self):
        return self.sh("tail -n 30 %s/*.log %s/log/*.log 2>&1" % (GUEST_BASE, STATE)).stdout

    def vtcon_log(self):
        return self.sh("cat %s/vtcon.log" % GUEST_BASE).stdout

    def kernel_draws(self):
        """Whether the kernel's console draws on the display: its foreground VT in
        text mode (KDGETMODE), not in graphics mode (policy.d/vtcon-follow)."""
        r = self.sh("python3 -S -c 'import fcntl, os; m = bytearray(4); "
                    "fcntl.ioctl(os.open(\"/dev/\" + open(\"/sys/class/tty/tty0/active\").read().strip(), "
                    "os.O_RDWR | os.O_NOCTTY), 0x4B3B, m); print(m[0])'")
        r.check()
        if r.stdout.strip() not in ("0", "1"):
            raise AssertionError("KDGETMODE gave %r" % r.stdout)
        return r.stdout.strip() == "0"

    def stop(self):
        self.sh("rsctl shutdown; sleep 1; pkill -x datastore", timeout=60)
        if getattr(self, "vtcon_pid", None):
            self.sh("kill %d; for i in $(seq 50); do kill -0 %d 2>/dev/null || break; sleep 0.1; done"
                    % (self.vtcon_pid, self.vtcon_pid))
            self.vtcon_pid = None
        self.sh("rm -rf %s/services.d/*.toml" % CONFIG)
        if getattr(self, "loaded_rsdrv", False):
            self.sh("for i in $(seq 50); do rmmod rsdrv 2>/dev/null && break; sleep 0.2; done; "
                    "[ ! -e /sys/module/rsdrv ]", timeout=60).check()

    def run_reach_outside(self):
        """Start the misbehaving driver; return what it reported."""
        self.testbed.write_file(CONFIG + "/services.d/reach.toml", REACH_TOML.format(repo=REPO_ROOT).encode())
        try:
            self.rsctl("reload")
            deadline = time.monotonic() + 60
            while self.sh("grep -q 'done' %s/log/reach.log" % STATE).rc != 0:
                if time.monotonic() > deadline:
                    raise AssertionError("the reaching driver did not report:\n" + self.logs())
                time.sleep(0.3)
            return self.sh("cat %s/log/reach.log" % STATE).stdout
        finally:
            self.sh("rm -f %s/services.d/reach.toml" % CONFIG)
