"""The serial stack with the CUSE front end instead of the pty one: datastore, rsd, the 16550
driver for COM2 (serial0) and the character device front end (serial0-cuse, /dev/ttyRSD1).
Used by tests/vm/test_cuse.py.

    stack = CuseStack(tb, rsdrv_ko).start()
    stack.probe("termios", ...)      # tests/guest/cuse_probe.py in the guest, its JSON answer
    stack.stop()
"""

import json
import time

from . import REPO_ROOT
from .stack import CONFIG, GUEST_BASE, RUNTIME, SERIAL_TOML, STATE, SerialStack

DEVICE = "/dev/ttyRSD1"
PROBE = REPO_ROOT + "/tests/guest/cuse_probe.py"

CUSE_TOML = """\
# The CUSE front end for serial0: {device}, root:dialout 0660 (rsd registers it).
program = "frontends.cuse"
args = ["--label", "serial0", "--name", "{name}"]
class = "server"
group = "dialout"           # the driver's socket is group dialout, 0660: the front end reaches it
period = 5                  # rsd waits 2 x 5 s, more than the 5 s a request to a hung driver may block us
init_timeout = 30
depends_on = ["serial0"]

[resources]
cuse = "{cuse}"
"""


class CuseStack(SerialStack):
    def __init__(self, testbed, rsdrv_ko, period=1, echo=None):
        super().__init__(testbed, rsdrv_ko, period=period, backoff=False, echo=echo, unit_bounding_set=True)
        self.device = DEVICE
        self.tty = DEVICE

    def frontend_status(self):
        r = self.rsctl("ds", "get", "cuse.ttyRSD1.status", "--json")
        r.check()
        return json.loads(json.loads(r.stdout)["value"])

    def probe(self, *args, timeout=120):
        """Run tests/guest/cuse_probe.py in the guest; its JSON answer (AssertionError with its output if none)."""
        r = self.sh("python %s %s" % (PROBE, " ".join("'%s'" % a for a in args)), timeout=timeout)
        try:
            return json.loads(r.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise AssertionError("the probe %s said no JSON (rc %s):\n%s\n%s\n%s" % (
                args, r.rc, r.stdout[-3000:], r.stderr[-3000:], self.logs())) from None

    def start(self, timeout=120):
        tb = self.testbed
        ko = tb.push(self.ko, "/tmp/rsdrv.ko")
        self.loaded_rsdrv = self.sh("[ -e /sys/module/rsdrv ]").rc != 0
        if self.loaded_rsdrv:
            self.sh("insmod %s" % ko).check()
        self.loaded_cuse = self.sh("[ -e /sys/module/cuse ]").rc != 0
        self.sh("modprobe cuse").check()
        self.sh("rm -rf %s && mkdir -p %s/services.d %s %s" % (GUEST_BASE, CONFIG, RUNTIME, STATE)).check()
        tb.write_file(CONFIG + "/services.d/serial0.toml",
                      SERIAL_TOML.format(period=self.period, backoff="false").encode())
        self.write_frontend("serial0-cuse", "ttyRSD1", "ttyRSD1")
        self.sh("setsid datastore > %s/datastore.log 2>&1 < /dev/null &" % GUEST_BASE).check()
        self.wait_for("[ -S %s/ds.sock ]" % RUNTIME, "datastore to listen")
        self.sh("setsid %srsd > %s/rsd.log 2>&1 < /dev/null &" % (self.rsd_prefix, GUEST_BASE)).check()
        self.wait_for("[ -S %s/rsd.sock ]" % RUNTIME, "rsd to listen")
        self.wait_ready(timeout)
        self.drain_host()
        return self

    def write_frontend(self, label, name, cuse):
        self.testbed.write_file(CONFIG + "/services.d/%s.toml" % label, CUSE_TOML.format(
            device="/dev/" + cuse, name=name, cuse=cuse).encode())

    def wait_ready(self, timeout=90):
        deadline = time.monotonic() + timeout
        while True:
            try:
                if (self.status("serial0")["state"] == "up" and self.status("serial0-cuse")["state"] == "up"
                        and self.frontend_status()["state"] == "up"):
                    return
            except (AssertionError, ValueError, KeyError, RuntimeError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the CUSE stack did not come up within %d s:\n%s" % (timeout, self.logs()))
            time.sleep(0.3)

    def logs(self):
        return self.sh("tail -n 30 %s/*.log %s/log/*.log 2>&1; dmesg | tail -n 10" % (GUEST_BASE, STATE)).stdout

    def stop(self):
        self.sh("rsctl shutdown; for i in $(seq 50); do pgrep -x rsd >/dev/null || break; sleep 0.2; done; "
                "pkill -x datastore; true", timeout=60)
        if getattr(self, "loaded_cuse", False):
            self.sh("for i in $(seq 50); do modprobe -r cuse 2>/dev/null && break; sleep 0.2; done; true")
        if getattr(self, "loaded_rsdrv", False):
            self.sh("for i in $(seq 50); do rmmod rsdrv 2>/dev/null && break; sleep 0.2; done; "
                    "[ ! -e /sys/module/rsdrv ]", timeout=60).check()
