"""Without an IOMMU: the e1000 service gets its device through uio_pci_generic and DMA buffers
from the rsdrv module, carries real traffic, survives its driver failing, and rsd says its DMA
is not isolated.  Boots its own guest with the IOMMU switched off (`intel_iommu=off` after the
testbed's `intel_iommu=on`) and the e1000 on the host's TAP, as tests/vm/test_net.py does."""

import re
import time

import pytest

from testbed import E1000_BDF, Testbed
from testbed.netstack import NetStack
from testbed.stack import build_rsdrv

from testbed.nettraffic import expected_sha, ping_from_guest, ping_from_host, stream_through, tcp_transfer


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    ko = build_rsdrv(str(tmp_path_factory.mktemp("rsdrv")))
    tb = Testbed(host_net=True, kernel_args=("intel_iommu=off",))
    try:
        tb.start()
        tb.wait_ready()
        tb.push(ko, "/tmp/rsdrv.ko")
        tb.run(["sh", "-c", "insmod /tmp/rsdrv.ko && modprobe uio_pci_generic && "
                            "(mount -t debugfs none /sys/kernel/debug 2>/dev/null; true)"]).check()
        stack = NetStack(tb).start()
    except BaseException:
        tb.close()
        raise
    try:
        yield stack
    finally:
        try:
            stack.stop()
        finally:
            tb.close()


def test_the_guest_has_no_iommu_and_the_device_is_on_uio_not_vfio(net):
    assert net.sh("ls /sys/kernel/iommu_groups | wc -l").check().stdout.strip() == "0"
    assert net.sh("test -e /sys/bus/pci/devices/%s/iommu_group" % E1000_BDF).rc == 1
    driver = net.sh("basename $(readlink /sys/bus/pci/devices/%s/driver)" % E1000_BDF).check().stdout.strip()
    assert driver == "uio_pci_generic", driver
    # the module holds it for DMA buffers: no kernel driver may bind meanwhile
    assert net.sh("cat /sys/bus/pci/devices/%s/driver_override" % E1000_BDF).stdout.strip() == "rsdrv"


def test_rsd_reports_the_service_as_not_dma_isolated(net):
    assert net.status("eth0")["dma_isolated"] is False
    assert "DMA NOT ISOLATED" in net.rsctl("status").stdout
    log = net.sh("cat /run/rsdnet/rsd.log").stdout
    assert "eth0: %s has no IOMMU group: its DMA is NOT ISOLATED" % E1000_BDF in log, log
    endpoints = net.sh("cat /sys/kernel/debug/rsdrv/endpoints").stdout
    assert re.search(r"endpoint eth0 .*\n\s+pci %s dma-buffers \d+ bytes DMA-NOT-ISOLATED" % E1000_BDF,
                     endpoints), endpoints


def test_the_driver_is_unprivileged_and_holds_only_its_device_fds(net):
    pid = net.status("eth0")["pid"]
    st = net.sh("cat /proc/%d/status" % pid).stdout
    uids = re.search(r"^Uid:\s+(.*)$", st, re.M).group(1).split()
    assert "0" not in uids, st
    assert re.search(r"^CapEff:\s+0+$", st, re.M) and re.search(r"^CapBnd:\s+0+$", st, re.M), st
    fds = net.sh("ls -l /proc/%d/fd | sed 's/.*-> //'" % pid).stdout.split()
    # (Python's mmap keeps a dup of each fd it maps: the same open files, more than once.)
    devices = sorted({f for f in fds if f.startswith(("/dev/", "/sys/")) and f != "/dev/null"
                      and not f.startswith("/dev/pts")})
    assert devices == sorted(["/dev/rsdrv", "/dev/uio0", "/sys/devices/pci0000:00/%s/config" % E1000_BDF,
                              "/sys/devices/pci0000:00/%s/resource0" % E1000_BDF]), devices
    assert any("memfd:rsd-netshm" in f for f in fds), "no shared memory from the front end: %s" % fds


def test_ping_both_ways(net):
    ping_from_guest(net)
    ping_from_host(net)


@pytest.mark.parametrize("direction", ["host-to-guest", "guest-to-host"])
def test_tcp_content_arrives_intact_through_the_bounce_buffers(net, direction):
    nbytes, seed, port = 8 << 20, 31, 5401 + (direction == "guest-to-host")
    got = tcp_transfer(net, direction, nbytes, seed, port)
    assert got["bytes"] == nbytes and got["sha256"] == expected_sha(nbytes, seed), got


def _kill_driver(net):
    st = net.status("eth0")
    net.sh("kill -9 %d" % st["pid"]).check()
    return st["generation"]


def test_a_tcp_stream_survives_the_driver_killed_mid_stream(net):
    nbytes, seed, port = 4 << 20, 37, 5403
    got = stream_through(net, lambda: _kill_driver(net), nbytes, seed, port)
    assert got["bytes"] == nbytes and got["sha256"] == expected_sha(nbytes, seed), got
    # the dead incarnation's buffers went back to the kernel without a complaint about the pages
    dmesg = net.sh("dmesg | tail -n 50").stdout
    assert "BUG" not in dmesg and "bad page" not in dmesg.lower(), dmesg


def test_wild_dma_is_refused_without_an_iommu_to_confine_it(net):
    st = net.status("eth0")
    net.rsctl("fi", "eth0", "--wild-dma").check()
    deadline = time.monotonic() + 20
    while "fault injection refused: --wild-dma needs an IOMMU" not in net.sh(
            "cat /run/rsdnet/state/log/eth0.log").stdout:
        assert time.monotonic() < deadline, net.logs()
        time.sleep(0.5)
    ping_from_host(net)
    after = net.status("eth0")
    assert (after["pid"], after["generation"]) == (st["pid"], st["generation"]), after


def test_the_device_goes_back_when_the_service_goes(net):
    net.rsctl("down", "eth0").check()
    deadline = time.monotonic() + 20
    while True:
        driver = net.sh("readlink /sys/bus/pci/devices/%s/driver" % E1000_BDF).stdout.strip()
        override = net.sh("cat /sys/bus/pci/devices/%s/driver_override" % E1000_BDF).stdout.strip()
        if not driver and override == "(null)":
            break
        assert time.monotonic() < deadline, (driver, override, net.logs())
        time.sleep(0.5)
    # and it can no longer reach memory: bus mastering is off in its command register
    command = int(net.sh("od -An -tx2 -j4 -N2 /sys/bus/pci/devices/%s/config" % E1000_BDF).check().stdout, 16)
    assert not command & 0x4, hex(command)
