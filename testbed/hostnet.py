"""The e1000's far end as a TAP in a private network namespace on the host.

QEMU's user-mode networking (slirp) halves the e1000's throughput and cannot
reach the guest unasked; a TAP can, both ways, at the speed the device
model allows.  So a Testbed(host_net=True) runs QEMU inside a namespace of
its own, `rsdtb-<pid>-<n>`, holding only `lo` and the TAP `tbtap0`
(HOST_IP/24); nothing of the host's own network is touched or reachable.
Commands for the host side of the link run in the namespace:
`tb.host_net.run(["ping", "-c1", GUEST_NET_IP])`.
"""

import itertools
import os
import subprocess

from .errors import TestbedError

TAP = "tbtap0"
HOST_IP = "10.0.3.1"
GUEST_NET_IP = "10.0.3.2"     # what a test gives the guest's interface on this link
PREFIX = 24
NETNS_PREFIX = "rsdtb-"
_serial = itertools.count(1)


def _ip(*args, ns=None, check=True):
    argv = ["ip"] + (["netns", "exec", ns, "ip"] if ns else []) + list(args)
    r = subprocess.run(argv, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise TestbedError(f"`{' '.join(argv)}` failed ({r.returncode}): {r.stderr.strip()}; "
                           "the host network testbed needs root, /dev/net/tun and `ip netns`")
    return r


class HostNet:
    def __init__(self):
        self.ns = f"{NETNS_PREFIX}{os.getpid()}-{next(_serial)}"
        self.created = False

    def create(self):
        sweep_orphans()
        _ip("netns", "add", self.ns)
        self.created = True
        _ip("link", "set", "lo", "up", ns=self.ns)
        _ip("tuntap", "add", TAP, "mode", "tap", "vnet_hdr", ns=self.ns)
        _ip("addr", "add", f"{HOST_IP}/{PREFIX}", "dev", TAP, ns=self.ns)
        _ip("link", "set", TAP, "up", ns=self.ns)
        return self

    @property
    def netdev(self):
        return f"tap,ifname={TAP},script=no,downscript=no,vnet_hdr=on"

    def wrap(self, argv):
        """argv run inside the namespace (QEMU, iperf3, ping)."""
        return ["ip", "netns", "exec", self.ns] + list(argv)

    def run(self, argv, timeout=60, check=False, **kw):
        r = subprocess.run(self.wrap(argv), capture_output=True, text=True, timeout=timeout, **kw)
        if check and r.returncode != 0:
            raise TestbedError(f"{' '.join(argv)} in {self.ns}: rc {r.returncode}\n{r.stdout}{r.stderr}")
        return r

    def popen(self, argv, **kw):
        return subprocess.Popen(self.wrap(argv), **kw)

    def close(self):
        if self.created:
            self.created = False
            _ip("netns", "del", self.ns, check=False)


def sweep_orphans():
    """Namespaces of testbed processes that died without cleaning up."""
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    for line in r.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if not name.startswith(NETNS_PREFIX):
            continue
        pid = name[len(NETNS_PREFIX):].partition("-")[0]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            _ip("netns", "del", name, check=False)
