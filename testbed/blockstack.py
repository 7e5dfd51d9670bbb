"""The rsd disk stack inside a booted testbed: datastore, rsd, the AHCI driver (service disk0,
on VFIO, the testbed's ICH9 AHCI at 00:03.0 with its raw disk) and the block front end
(service disk0-blk, an NBD device at RUNTIME/blk/disk0), configured as a server would be.
Used by the block VM tests, the benchmark and the demo.

    stack = BlockStack(tb).start()
    stack.device()                  # "/dev/nbd0"
    stack.stop()                    # services down, the HBA and /dev/nbdN given back
"""

import json
import time

from .machine import AHCI_BDF
from .stack import VENV_BIN, GuestStack, unit_capabilities

GUEST_BASE = "/run/rsdblock"
RUNTIME = GUEST_BASE + "/run"
STATE = GUEST_BASE + "/state"
CONFIG = GUEST_BASE + "/etc"
CGROUP = "/sys/fs/cgroup/rsdblock"
GROUP = "rsdblk"    # the driver's and the front end's: the front end reaches the driver's socket
LINK = RUNTIME + "/blk/disk0"

DRIVER_TOML = """\
# The testbed's ICH9 AHCI (at {bdf}; q35's own, at 00:1f.2, has the same id) through VFIO.
program = "drivers.ahci"
class = "blk"
group = "{group}"
period = {period}
backoff = false
init_timeout = 60

[resources]
pci = ["{bdf}"]
"""

FRONTEND_TOML = """\
# The block device the kernel sees (NBD), kept across the driver's restarts.
program = "frontends.blk"
args = ["--label", "disk0"]
class = "server"
group = "{group}"
period = 2
init_timeout = 60
depends_on = ["disk0"]

[resources]
nbd = "disk0"
"""


class BlockStack(GuestStack):
    def __init__(self, testbed, period=1, echo=None):
        super().__init__(testbed, echo)
        self.period = period
        # rsd runs with exactly rsd.service's bounding set, as under systemd
        self.rsd_prefix = "setpriv --bounding-set=-all,%s -- " % ",".join("+" + c for c in unit_capabilities())
        self.env = {"RSD_RUNTIME_DIR": RUNTIME, "RSD_STATE_DIR": STATE, "RSD_CONFIG_DIR": CONFIG,
                    "PATH": VENV_BIN + ":/usr/sbin:/usr/bin:/sbin:/bin"}

    def frontend_status(self):
        r = self.rsctl("ds", "get", "blk.disk0.status", "--json")
        r.check()
        return json.loads(json.loads(r.stdout)["value"])

    def device(self):
        return self.sh("readlink -f %s" % LINK).check().stdout.strip()

    def logs(self):
        return self.sh("tail -n 40 %s/*.log %s/log/*.log 2>&1; dmesg | tail -n 20" % (GUEST_BASE, STATE)).stdout

    def start(self, timeout=180):
        self.sh("modprobe vfio-pci && modprobe nbd").check()
        self.sh("getent group %s >/dev/null || groupadd -r %s" % (GROUP, GROUP)).check()
        self.sh("rm -rf %s && mkdir -p %s/services.d %s %s" % (GUEST_BASE, CONFIG, RUNTIME, STATE)).check()
        tb = self.testbed
        tb.write_file(CONFIG + "/services.d/disk0.toml", DRIVER_TOML.format(
            bdf=AHCI_BDF, group=GROUP, period=self.period).encode())
        tb.write_file(CONFIG + "/services.d/disk0-blk.toml", FRONTEND_TOML.format(group=GROUP).encode())
        self.sh("setsid datastore > %s/datastore.log 2>&1 < /dev/null &" % GUEST_BASE).check()
        self.wait_for("[ -S %s/ds.sock ]" % RUNTIME, "the data store to listen")
        self.sh("setsid %srsd --cgroup-root %s > %s/rsd.log 2>&1 < /dev/null &"
                % (self.rsd_prefix, CGROUP, GUEST_BASE)).check()
        self.wait_for("[ -S %s/rsd.sock ]" % RUNTIME, "rsd to listen")
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout=90):
        """Both services up and the front end serving its NBD device."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if (self.status("disk0")["state"] == "up" and self.status("disk0-blk")["state"] == "up"
                        and self.frontend_status().get("state") == "up"):
                    return
            except (AssertionError, ValueError, KeyError, RuntimeError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the disk stack did not come up within %d s:\n%s" % (timeout, self.logs()))
            time.sleep(0.5)

    def stop(self):
        self.sh("rsctl shutdown; for i in $(seq 50); do pgrep -x rsd >/dev/null || break; sleep 0.2; done; "
                "pkill -x datastore; modprobe -r nbd; modprobe -r vfio-pci; true", timeout=90)
