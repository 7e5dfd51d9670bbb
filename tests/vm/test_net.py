"""Ethernet under rsd in the testbed: the e1000 driver (service eth0, VFIO) and its front end
(service eth0-net, the TAP eth0) carry real traffic between the guest's Linux stack and the
host's end of the link (a TAP in a private host namespace, testbed/hostnet.py), and TCP
streams survive the driver crashing, being killed and hanging.

One guest for the module (booted with host_net=True, so not the session's guest); the tests
run in file order and leave the stack up for the next one.
"""

import json
import re
import time

import pytest

from testbed import Testbed
from testbed.hostnet import GUEST_NET_IP, HOST_IP, TAP
from testbed.netstack import NetStack
from testbed.nettraffic import PYTHON, expected_sha, ping_from_guest, ping_from_host, stream_through, tcp_transfer


@pytest.fixture(scope="module")
def net():
    tb = Testbed(host_net=True)
    try:
        tb.start()
        tb.wait_ready()
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


def test_the_driver_is_unprivileged_and_holds_only_its_device_and_front_end_fds(net):
    pid = net.status("eth0")["pid"]
    st = net.sh("cat /proc/%d/status" % pid).stdout
    uids = re.search(r"^Uid:\s+(.*)$", st, re.M).group(1).split()
    assert "0" not in uids, st
    assert re.search(r"^CapEff:\s+0+$", st, re.M) and re.search(r"^CapBnd:\s+0+$", st, re.M), st
    fds = net.sh("ls -l /proc/%d/fd | sed 's/.*-> //'" % pid).stdout.split()
    assert "/dev/vfio/vfio" in fds, fds
    assert not [f for f in fds if re.fullmatch(r"/dev/vfio/\d+", f)], "the driver holds a VFIO group: %s" % fds
    assert not [f for f in fds if f.startswith("/dev/") and f not in ("/dev/null", "/dev/vfio/vfio")
                and not f.startswith("/dev/pts")], fds
    assert any("memfd:rsd-netshm" in f for f in fds), "no shared memory from the front end: %s" % fds


def test_ping_both_ways(net):
    ping_from_guest(net)
    ping_from_host(net)


@pytest.mark.parametrize("direction", ["host-to-guest", "guest-to-host"])
def test_tcp_content_arrives_intact(net, direction):
    nbytes, seed, port = 8 << 20, 11, 5201 + (direction == "guest-to-host")
    got = tcp_transfer(net, direction, nbytes, seed, port)
    assert got["bytes"] == nbytes and got["sha256"] == expected_sha(nbytes, seed), got


def test_ip_s_link_shows_the_counters(net):
    def counters():
        out = net.sh("ip -s -j link show eth0").stdout
        s = json.loads(out)[0]["stats64"]
        return s["rx"]["packets"], s["tx"]["packets"]
    rx0, tx0 = counters()
    ping_from_host(net, count=5)
    rx1, tx1 = counters()
    assert rx1 >= rx0 + 5 and tx1 >= tx0 + 5, (rx0, tx0, rx1, tx1)


def test_an_mtu_change_carries_bigger_frames(net):
    net.host.run(["ip", "link", "set", TAP, "mtu", "4000"], check=True)
    net.sh("ip link set eth0 mtu 4000").check()
    try:
        time.sleep(1.5)    # the front end follows the change through netlink
        ping_from_host(net, count=2, size=3900, extra=("-M", "do"))
        ping_from_guest(net, count=1)
    finally:
        net.sh("ip link set eth0 mtu 1500").check()
        net.host.run(["ip", "link", "set", TAP, "mtu", "1500"], check=True)


MCAST_LISTENER = """
import socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("", 5400))
s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
             socket.inet_aton("239.7.7.7") + socket.inet_aton("%s"))
s.settimeout(20)
print("joined", flush=True)
print(s.recv(100).decode(), flush=True)
""" % GUEST_NET_IP

MCAST_SENDER = """
import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("%s"))
for i in range(40):
    s.sendto(b"hello-group", ("239.7.7.7", 5400))
    time.sleep(0.25)
""" % HOST_IP


def test_a_multicast_group_the_guest_joins_reaches_it(net):
    net.testbed.write_file("/tmp/mcast.py", MCAST_LISTENER.encode())
    net.sh("setsid %s /tmp/mcast.py > /tmp/mcast.out 2>&1 < /dev/null &" % PYTHON).check()
    net.wait_for("grep -q joined /tmp/mcast.out", "the listener to join")
    sender = net.host.popen([PYTHON, "-c", MCAST_SENDER])
    try:
        net.wait_for("grep -q hello-group /tmp/mcast.out", "the group's datagram in the guest", 15)
    finally:
        sender.kill()
        sender.wait()


PACKET_COUNTER = """
import socket, sys, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88b5))
s.bind(("eth0", 0))
s.settimeout(0.5)
n, end = 0, time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    try:
        f = s.recv(2000)
    except socket.timeout:
        continue
    if f[:6] == bytes.fromhex("020000000099"):
        n += 1
print(n, flush=True)
"""

FOREIGN_SENDER = """
import socket, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("%s", 0))
frame = bytes.fromhex("020000000099") + bytes.fromhex("020000000001") + b"\\x88\\xb5" + b"x" * 50
for i in range(30):
    s.send(frame)
    time.sleep(0.1)
""" % TAP


def _foreign_frames_seen(net):
    net.testbed.write_file("/tmp/pkt.py", PACKET_COUNTER.encode())
    net.sh("setsid %s /tmp/pkt.py 6 > /tmp/pkt.out 2>&1 < /dev/null &" % PYTHON).check()
    time.sleep(2.0)   # the interpreter starts
    r = net.host.run([PYTHON, "-c", FOREIGN_SENDER])
    assert r.returncode == 0, r.stderr
    net.wait_for("grep -q '^[0-9]' /tmp/pkt.out", "the packet counter", 20)
    return int(net.sh("cat /tmp/pkt.out").stdout.split()[0])


def test_promiscuous_mode_receives_frames_for_other_addresses(net):
    assert _foreign_frames_seen(net) == 0, "frames for another MAC came in without promiscuous mode"
    net.sh("ip link set eth0 promisc on").check()
    try:
        time.sleep(1.0)
        assert _foreign_frames_seen(net) > 0, "no frames for another MAC in promiscuous mode\n" + net.logs()
    finally:
        net.sh("ip link set eth0 promisc off").check()


def test_link_down_and_up_from_the_monitor_is_the_carrier_of_eth0(net):
    carrier = lambda: net.sh("cat /sys/class/net/eth0/carrier").stdout.strip()
    assert carrier() == "1"
    net.testbed.qmp.execute("set_link", name="net0", up=False)
    try:
        net.wait_for("[ \"$(cat /sys/class/net/eth0/carrier)\" = 0 ]", "carrier off", 15)
    finally:
        net.testbed.qmp.execute("set_link", name="net0", up=True)
    net.wait_for("[ \"$(cat /sys/class/net/eth0/carrier)\" = 1 ]", "carrier on", 15)
    ping_from_guest(net, count=1)


def _fault(net, how):
    st = net.status("eth0")
    if how == "kill -9":
        net.sh("kill -9 %d" % st["pid"]).check()
    else:
        net.rsctl("fi", "eth0", "--" + how).check()
    return st["generation"]


@pytest.mark.parametrize("how", ["crash", "kill -9", "hang"])
def test_a_tcp_stream_survives_the_driver_failing_mid_stream(net, how):
    nbytes, seed, port = 6 << 20, 23, 5300
    got = stream_through(net, lambda: _fault(net, how), nbytes, seed, port)
    assert got["bytes"] == nbytes and got["sha256"] == expected_sha(nbytes, seed), got
    print("%s: the stream stalled at most %.3f s" % (how, got["max_gap"]))


def test_wild_dma_is_blocked_by_the_iommu_and_the_driver_replaced(net):
    before = len(net.sh("dmesg").stdout.splitlines())
    old = net.status("eth0")["generation"]
    pinger = net.host.popen(["ping", "-i", "0.2", "-c", "40", GUEST_NET_IP])
    try:
        net.rsctl("fi", "eth0", "--wild-dma").check()
        st = net.wait_up("eth0", old, timeout=30)
    finally:
        pinger.wait(30)
    log = net.sh("dmesg").stdout.splitlines()[before:]
    assert [l for l in log if "DMAR" in l and "[00:02.0] fault addr" in l], "\n".join(log[-40:])
    # The driver's own check of its RX ring finds the descriptor it did not program and it exits.
    assert (st.get("last_failure") or {}).get("reason") in ("exit", "signal", "no-heartbeat"), st
    ping_from_host(net)


def test_rsctl_restart_starts_a_fresh_copy_now(net):
    st = net.status("eth0")
    net.rsctl("restart", "eth0").check()
    new = net.wait_up("eth0", st["generation"], timeout=30)
    assert new["pid"] != st["pid"]
    ping_from_host(net)
    ping_from_guest(net)
