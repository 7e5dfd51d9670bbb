"""The rsd network stack inside a booted testbed: datastore, rsd, the e1000
driver (service eth0, on VFIO) and its front end (service eth0-net, serving
the TAP eth0), configured as a server would be.  Used by the network VM
tests, the benchmark and the demo.

The testbed must be booted with host_net=True: the e1000's far end is then
the TAP tbtap0 (testbed/hostnet.py HOST_IP) in a private host namespace, and
the guest's eth0 gets GUEST_NET_IP.
"""

import json
import time

from .hostnet import GUEST_NET_IP, HOST_IP, PREFIX
from .machine import E1000_BDF
from .stack import VENV_BIN, GuestStack, unit_capabilities

GUEST_BASE = "/run/rsdnet"
RUNTIME = GUEST_BASE + "/run"
STATE = GUEST_BASE + "/state"
CONFIG = GUEST_BASE + "/etc"
CGROUP = "/sys/fs/cgroup/rsdnet"
GROUP = "rsdnet"     # the driver's and the front end's: the front end reaches the driver's socket

DRIVER_TOML = """\
# The testbed's e1000 (82540EM at {bdf}) through VFIO.
program = "drivers.e1000"
class = "net"
group = "{group}"
period = {period}
backoff = false
init_timeout = 60

[resources]
pci = ["{bdf}"]
"""

FRONTEND_TOML = """\
# The TAP eth0 the Linux stack uses, kept across the driver's restarts.
program = "frontends.net"
args = ["--label", "eth0"]
class = "server"
group = "{group}"
init_timeout = 60

[resources]
tap = "eth0"
"""


class NetStack(GuestStack):
    def __init__(self, testbed, period=1, echo=None):
        if testbed.host_net is None:
            raise ValueError("NetStack needs a Testbed(host_net=True)")
        super().__init__(testbed, echo)
        self.host = testbed.host_net
        self.period = period
        self.rsd_prefix = "setpriv --bounding-set=-all,%s -- " % ",".join(
            "+" + c for c in unit_capabilities())
        self.env = {"RSD_RUNTIME_DIR": RUNTIME, "RSD_STATE_DIR": STATE, "RSD_CONFIG_DIR": CONFIG,
                    "PATH": VENV_BIN + ":/usr/sbin:/usr/bin:/sbin:/bin"}

    def frontend_status(self):
        r = self.rsctl("ds", "get", "net.eth0.status", "--json")
        r.check()
        return json.loads(json.loads(r.stdout)["value"])

    def logs(self):
        return self.sh("tail -n 40 %s/*.log %s/log/*.log 2>&1; dmesg | tail -n 20" % (GUEST_BASE, STATE)).stdout

    def start(self, timeout=180):
        # The guest has no udev: give /dev/net/tun the mode udev's default rules give it.
        self.sh("modprobe vfio-pci && modprobe tun && chmod 0666 /dev/net/tun").check()
        self.sh("getent group %s >/dev/null || groupadd -r %s" % (GROUP, GROUP)).check()
        self.sh("rm -rf %s && mkdir -p %s/services.d %s %s" % (GUEST_BASE, CONFIG, RUNTIME, STATE)).check()
        tb = self.testbed
        tb.write_file(CONFIG + "/services.d/eth0.toml", DRIVER_TOML.format(
            bdf=E1000_BDF, group=GROUP, period=self.period).encode())
        tb.write_file(CONFIG + "/services.d/eth0-net.toml", FRONTEND_TOML.format(group=GROUP).encode())
        self.sh("setsid datastore > %s/datastore.log 2>&1 < /dev/null &" % GUEST_BASE).check()
        self.wait_for("[ -S %s/ds.sock ]" % RUNTIME, "datastore to listen")
        self.sh("setsid %srsd --cgroup-root %s > %s/rsd.log 2>&1 < /dev/null &"
                % (self.rsd_prefix, CGROUP, GUEST_BASE)).check()
        self.wait_for("[ -S %s/rsd.sock ]" % RUNTIME, "rsd to listen")
        self.wait_for("[ -e /sys/class/net/eth0 ]", "the TAP eth0", timeout)
        self.sh("ip addr add %s/%d dev eth0 && ip link set eth0 up" % (GUEST_NET_IP, PREFIX)).check()
        deadline = time.monotonic() + timeout
        while True:
            try:
                if (self.status("eth0")["state"] == "up" and self.status("eth0-net")["state"] == "up"
                        and self.frontend_status().get("state") == "up"):
                    break
            except (AssertionError, ValueError, KeyError, RuntimeError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the network stack did not come up within %d s:\n%s" % (timeout, self.logs()))
            time.sleep(0.5)
        self.wait_for("ping -c1 -W1 %s" % HOST_IP, "the host end to answer a ping", 30)
        return self

    def stop(self):
        self.sh("rsctl shutdown; sleep 1; pkill -x datastore", timeout=60)
