"""Without an IOMMU: a service that names a PCI device gets it through the rsdrv module,
not VFIO, and rsd says its DMA is not isolated.  Boots its own guest with the IOMMU
switched off (`intel_iommu=off` after the testbed's `intel_iommu=on`)."""

import json
import time

import pytest

from testbed import E1000_BDF, REPO_ROOT, Testbed
from testbed.stack import build_rsdrv

BASE = "/run/rsdnoiommu"
ENV = {"RSD_RUNTIME_DIR": BASE + "/run", "RSD_STATE_DIR": BASE + "/state", "RSD_CONFIG_DIR": BASE + "/etc",
       "PATH": REPO_ROOT + "/.venv/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
SERVICE = """\
program = "%s/tests/guest/noiommu_dma_service.py"
class = "net"
init_timeout = 60

[resources]
pci = ["8086:100e"]
""" % REPO_ROOT
ASK = ("import socket,sys; s=socket.socket(socket.AF_UNIX); s.settimeout(30); s.connect(sys.argv[1]); "
       "print(s.makefile().readline().strip())")


@pytest.fixture(scope="module")
def guest(tmp_path_factory):
    ko = build_rsdrv(str(tmp_path_factory.mktemp("rsdrv")))
    with Testbed(kernel_args=("intel_iommu=off",)) as tb:
        tb.push(ko, "/tmp/rsdrv.ko")
        yield tb


def sh(tb, line, timeout=60):
    return tb.run(["sh", "-c", line], timeout=timeout, env=ENV)


def test_without_an_iommu_the_device_goes_to_the_module_and_is_reported_not_isolated(guest):
    assert sh(guest, "ls /sys/kernel/iommu_groups | wc -l").check().stdout.strip() == "0"
    assert sh(guest, "test -e /sys/bus/pci/devices/%s/iommu_group" % E1000_BDF).rc == 1
    sh(guest, "insmod /tmp/rsdrv.ko && mount -t debugfs none /sys/kernel/debug 2>/dev/null; "
              "mkdir -p %s/etc/services.d %s/run %s/state" % (BASE, BASE, BASE)).check()
    guest.write_file(BASE + "/etc/services.d/dma0.toml", SERVICE.encode())
    sh(guest, "setsid rsd --cgroup-root /sys/fs/cgroup/rsdnoiommu > %s/rsd.log 2>&1 < /dev/null &" % BASE).check()
    try:
        deadline = time.monotonic() + 120
        while True:
            r = sh(guest, "rsctl status dma0 --json")
            if r.rc == 0 and json.loads(r.stdout)["state"] == "up":
                break
            assert time.monotonic() < deadline, sh(guest, "cat %s/rsd.log %s/state/log/*.log" % (BASE, BASE)).stdout
            time.sleep(0.5)
        reply = json.loads(sh(guest, "python -c %s %s/run/svc/dma0.sock" % (json.dumps(ASK), BASE)).check().stdout)
        assert reply["resource_fds"] == "rsdrv=5", reply
        assert reply["dma"] and reply["bus_addr"] > 0 and reply["uid"] != 0, reply
        log = sh(guest, "cat %s/rsd.log" % BASE).stdout
        assert "dma0: %s has no IOMMU group: its DMA is NOT ISOLATED" % E1000_BDF in log, log
        assert json.loads(sh(guest, "rsctl status dma0 --json").stdout)["dma_isolated"] is False
        assert "DMA NOT ISOLATED" in sh(guest, "rsctl status").stdout
        endpoints = sh(guest, "cat /sys/kernel/debug/rsdrv/endpoints").stdout
        assert "DMA-NOT-ISOLATED" in endpoints, endpoints
        # the module, not vfio-pci, holds the device
        assert sh(guest, "cat /sys/bus/pci/devices/%s/driver_override" % E1000_BDF).stdout.strip() == "rsdrv"
    finally:
        sh(guest, "rsctl shutdown", timeout=60)
