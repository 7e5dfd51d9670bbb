"""The e1000 driver (drivers/e1000) under a real rsd in the testbed guest, with the test itself
as its network front end: it creates the shared memory (libdrv.netshm) and doorbells, attaches
over the service socket (docs/net.md), puts frames for QEMU's user-net gateway 10.0.2.2 in the
TX area and finds the replies in the RX area.  Then the driver is restarted, killed, made to
DMA wild and fed a hostile front end, and must come back (or carry on) each time.  Run by
tests/vm/test_e1000.py; the tests build on each other in file order (one rsd for the module).
"""

import fcntl
import json
import mmap
import os
import re
import select
import socket
import struct
import subprocess
import time

import pytest

from libdrv import netshm
from libdrv.wire import FrameReader, encode
from testbed import E1000_BDF, GUEST_MAC

BASE = "/run/rsde1000"
CONFIG, RUNTIME, STATE = BASE + "/etc", BASE + "/run", BASE + "/state"
CGROUP = "/sys/fs/cgroup/rsde1000"
DEV = "/sys/bus/pci/devices/" + E1000_BDF
LABEL = "eth0"
FIGURES = "/tmp/e1000-figures.json"
ENV = dict(os.environ, RSD_RUNTIME_DIR=RUNTIME, RSD_STATE_DIR=STATE, RSD_CONFIG_DIR=CONFIG)
SERVICE = """\
program = "drivers.e1000"
class = "net"
period = 1
backoff = false
init_timeout = 60

[resources]
pci = ["8086:100e"]
"""
MAC = bytes.fromhex(GUEST_MAC.replace(":", ""))
GUEST_IP, GATEWAY_IP = bytes([10, 0, 2, 15]), bytes([10, 0, 2, 2])
VNET_NEEDS_CSUM, VNET_GSO_TCPV4 = 1, 1
FIGURES_SEEN = {}


def sh(line, check=True, timeout=60):
    r = subprocess.run(["sh", "-c", line], capture_output=True, text=True, env=ENV, timeout=timeout)
    if check:
        assert r.returncode == 0, "%s: rc %d\n%s%s" % (line, r.returncode, r.stdout, r.stderr)
    return r


def rsctl(*args, check=True):
    return sh("rsctl " + " ".join(args), check=check, timeout=90)


def status():
    r = rsctl("status", LABEL, "--json", check=False)
    return json.loads(r.stdout) if r.returncode == 0 else None


def driver_log():
    return sh("tail -n 40 %s/rsd.log; tail -n 60 %s/log/*.log 2>/dev/null" % (BASE, STATE), check=False).stdout


def wait(predicate, what, timeout=60, interval=0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, "timed out waiting for %s\n%s" % (what, driver_log())
        time.sleep(interval)


def up():
    return wait(lambda: (s := status()) and s.get("state") == "up" and s, LABEL + " up", 120, 0.1)


def replaced(old):
    return wait(lambda: (s := status()) and s["state"] == "up" and s["pid"] != old["pid"] and s,
                LABEL + " replaced", 60, 0.02)


def figure(name, value):
    FIGURES_SEEN[name] = value
    with open(FIGURES, "w") as f:
        json.dump(FIGURES_SEEN, f)


# -- frames ---------------------------------------------------------------------------------------

def inet_sum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def arp_request():
    return (b"\xff" * 6 + MAC + b"\x08\x06" + struct.pack(">HHBBH", 1, 0x0800, 6, 4, 1)
            + MAC + GUEST_IP + b"\x00" * 6 + GATEWAY_IP)


def is_arp_reply(frame):
    return frame[12:14] == b"\x08\x06" and frame[20:22] == b"\x00\x02" and frame[28:32] == GATEWAY_IP


def ipv4(proto, payload, ident=1):
    head = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, 0, 64, proto, 0, GUEST_IP, GATEWAY_IP)
    return head[:10] + struct.pack(">H", inet_sum(head)) + head[12:] + payload


def ping(gateway_mac, seq, offload=False):
    """An ICMP echo request to 10.0.2.2; offload: the checksum left to the device (NEEDS_CSUM)."""
    body = struct.pack(">BBHHH", 8, 0, 0, 0x1234, seq) + b"rsd-e1000-%04d" % seq + bytes(32)
    if not offload:
        body = body[:2] + struct.pack(">H", inet_sum(body)) + body[4:]
    return gateway_mac + MAC + b"\x08\x00" + ipv4(1, body, seq)


def is_echo_reply(frame, seq):
    return (frame[12:14] == b"\x08\x00" and frame[23] == 1 and frame[34] == 0
            and struct.unpack(">H", frame[40:42])[0] == seq and inet_sum(frame[34:]) == 0)


def vnet_header(flags=0, gso=0, hdr_len=0, gso_size=0, csum_start=0, csum_offset=0):
    return struct.pack("<BBHHHHH", flags, gso, hdr_len, gso_size, csum_start, csum_offset, 0)


# -- the test's own front end ------------------------------------------------------------------------

class FrontEnd:
    """What frontends/net does, in Python: enough to exchange a few frames with the driver."""

    def __init__(self, memfd=None):
        self.memfd = netshm.create(1) if memfd is None else memfd
        self.m = mmap.mmap(self.memfd, netshm.SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.doorbell = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)   # the driver's
        self.notify = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)     # ours
        self.sock = None
        self.reader = FrameReader()
        self.replies, self.events = {}, []
        self.ids = 0
        self.tx_posted = self.tx_off = self.rx_consumed = 0
        self.partial = b""
        self.frames = []

    # header fields (netshm.h: struct netshm_header)
    def u32(self, off, value=None):
        if value is None:
            return struct.unpack_from("<I", self.m, off)[0]
        struct.pack_into("<I", self.m, off, value & 0xFFFFFFFF)

    tx_done = property(lambda self: self.u32(128))
    rx_produced = property(lambda self: self.u32(132))

    def connect(self, timeout=30):
        self.close_socket()
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(timeout)
        self.sock.connect("%s/svc/%s.sock" % (RUNTIME, LABEL))
        self.reader = FrameReader()
        return self

    def close_socket(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def request(self, op, fds=None, timeout=30, **fields):
        self.ids += 1
        rid = self.ids
        data = encode({"op": op, "id": rid, **fields})
        if fds:
            socket.send_fds(self.sock, [data], fds)
        else:
            self.sock.sendall(data)
        deadline = time.monotonic() + timeout
        while rid not in self.replies:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the driver closed the connection (request %s)" % op)
            for msg in self.reader.feed(chunk):
                if "ev" in msg:
                    self.events.append(msg)
                else:
                    self.replies[msg.get("id")] = msg
        return self.replies.pop(rid)

    def wait_event(self, match, what, timeout=20):
        deadline = time.monotonic() + timeout
        while True:
            for i, ev in enumerate(self.events):
                if match(ev):
                    return self.events.pop(i)
            assert time.monotonic() < deadline, "no %s event within %.0f s; events %s\n%s" % (
                what, timeout, self.events, driver_log())
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                continue
            if not chunk:
                raise ConnectionError("the driver closed the connection (waiting for %s)" % what)
            for msg in self.reader.feed(chunk):
                (self.events.append(msg) if "ev" in msg else self.replies.__setitem__(msg.get("id"), msg))

    def attach(self, settings=None, **kw):
        self.u32(68, 0)               # rx_consumed: the driver starts rx_produced at 0
        self.u32(72, 1)               # frontend_idle: this one always wants the doorbell
        self.rx_consumed = 0
        self.partial, self.frames = b"", []
        fields = {"tx_done": kw.pop("tx_done", self.tx_done if self.tx_posted else 0)}
        if settings is not None:
            fields["settings"] = settings
        return self.request("attach", fds=kw.pop("fds", [self.memfd, self.doorbell, self.notify]), **fields)

    def post(self, frame, vnet=None):
        data = (vnet or vnet_header()) + frame
        if self.tx_off + len(data) > netshm.TX_DATA_SIZE:
            self.tx_off = 0
        slot = self.tx_posted % netshm.TX_SLOTS
        self.m[netshm.TXDATA_OFF + self.tx_off:netshm.TXDATA_OFF + self.tx_off + len(data)] = data
        struct.pack_into("<II", self.m, netshm.TXQ_OFF + 8 * slot, self.tx_off, len(data))
        self.tx_off = (self.tx_off + len(data) + netshm.TX_ALIGN - 1) // netshm.TX_ALIGN * netshm.TX_ALIGN
        self.tx_posted += 1
        self.u32(64, self.tx_posted)
        os.eventfd_write(self.doorbell, 1)

    def collect(self):
        """Complete frames the driver produced since the last call (buffers given back)."""
        produced = self.rx_produced
        assert (produced - self.rx_consumed) & 0xFFFFFFFF <= netshm.RX_BUFS
        while self.rx_consumed != produced:
            k = self.rx_consumed % netshm.RX_BUFS
            length, flags = struct.unpack_from("<HB", self.m, netshm.RXQ_OFF + 4 * k)
            assert length <= netshm.RX_BUF_SIZE
            start = netshm.RXBUF_OFF + k * netshm.RX_BUF_SIZE
            self.partial += self.m[start:start + length]
            if flags & netshm.RX_EOP:
                if not flags & netshm.RX_ERROR:
                    self.frames.append(self.partial)
                self.partial = b""
            self.rx_consumed = (self.rx_consumed + 1) & 0xFFFFFFFF
        self.u32(68, self.rx_consumed)
        os.eventfd_write(self.doorbell, 1)
        out, self.frames = self.frames, []
        return out

    def wait_frame(self, match, what, timeout=10):
        deadline = time.monotonic() + timeout
        seen = []
        while time.monotonic() < deadline:
            select.select([self.notify], [], [], 0.05)
            try:
                os.eventfd_read(self.notify)
            except BlockingIOError:
                pass
            for frame in self.collect():
                seen.append(frame)
                if match(frame):
                    return frame
        raise AssertionError("no %s within %.0f s; got %d frames %s; tx_posted %d tx_done %d rx_produced %d\n%s"
                             % (what, timeout, len(seen), [f[:42].hex() for f in seen[:5]], self.tx_posted,
                                self.tx_done, self.rx_produced, driver_log()))

    def close(self):
        self.close_socket()
        self.m.close()
        for fd in (self.memfd, self.doorbell, self.notify):
            os.close(fd)


def refused_connection(fe):
    """The driver has closed fe's connection (EOF), after whatever it last sent."""
    fe.sock.settimeout(10)
    try:
        while True:
            chunk = fe.sock.recv(65536)
            if not chunk:
                return True
            for msg in fe.reader.feed(chunk):
                (fe.events.append(msg) if "ev" in msg else fe.replies.__setitem__(msg.get("id"), msg))
    except (ConnectionResetError, BrokenPipeError):
        return True


# -- fixtures -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rsd():
    assert not os.path.exists(DEV + "/driver"), "the e1000 must start unbound (docs/testbed.md)"
    sh("modprobe vfio-pci")
    sh("rm -rf %s && mkdir -p %s/services.d %s %s" % (BASE, CONFIG, RUNTIME, STATE))
    ds = subprocess.Popen(["datastore"], stdout=open(BASE + "/datastore.log", "w"), stderr=subprocess.STDOUT,
                          env=ENV, start_new_session=True)
    wait(lambda: os.path.exists(RUNTIME + "/ds.sock"), "the data store to listen")
    proc = subprocess.Popen(["rsd", "--config-dir", CONFIG, "--runtime-dir", RUNTIME, "--state-dir", STATE,
                             "--cgroup-root", CGROUP], stdout=open(BASE + "/rsd.log", "w"),
                            stderr=subprocess.STDOUT, env=ENV, start_new_session=True)
    wait(lambda: os.path.exists(RUNTIME + "/rsd.sock"), "rsd to listen")
    with open("%s/services.d/%s.toml" % (CONFIG, LABEL), "w") as f:
        f.write(SERVICE)
    rsctl("reload")
    yield up()
    rsctl("down", LABEL, check=False)
    rsctl("shutdown", check=False)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    ds.terminate()
    ds.wait(30)
    sh("echo > %s/driver_override; modprobe -r vfio-pci; true" % DEV, check=False)


@pytest.fixture(scope="module")
def fe(rsd):
    f = FrontEnd().connect()
    yield f
    f.close()


@pytest.fixture(scope="module")
def gateway(fe):
    """The gateway's MAC, learnt by ARP through the driver (the first frames both ways)."""
    reply = fe.connect().attach()
    assert reply["ok"], reply
    fe.post(arp_request())
    frame = fe.wait_frame(is_arp_reply, "ARP reply from 10.0.2.2", 20)
    return frame[22:28]


# -- tests -------------------------------------------------------------------------------------------------

def test_the_driver_is_up_unprivileged_with_only_its_device(rsd):
    st = status()
    assert st["uid"] != 0 and st["dma_isolated"] is True, st
    assert os.path.basename(os.readlink(DEV + "/driver")) == "vfio-pci"


def test_attach_replies_the_eeprom_mac_link_and_limits(rsd, fe):
    t0 = time.monotonic()
    reply = fe.attach()
    figure("attach_reply_ms", round((time.monotonic() - t0) * 1e3, 1))
    assert reply["ok"], reply
    assert reply["mac"] == GUEST_MAC.lower()
    assert reply["link"] is True and reply["speed"] == 1000 and reply["duplex"] == "full", reply
    assert reply["max_mtu"] == 16110 - 18
    assert "csum" in reply["offloads"] and "tso4" in reply["offloads"]
    assert reply["settings"]["mac"] == GUEST_MAC.lower() and reply["settings"]["mtu"] == 1500
    # a second attach while one is attached
    other = FrontEnd().connect()
    try:
        busy = other.attach()
        assert not busy["ok"] and busy["err"] == "EBUSY", busy
        assert refused_connection(other)
    finally:
        other.close()
    fe.close_socket()          # detach: the next test attaches again


def test_an_arp_request_is_answered_through_the_shared_memory(rsd, fe, gateway):
    assert len(gateway) == 6 and gateway != b"\xff" * 6
    assert fe.tx_done == fe.tx_posted, "the driver confirms what the device sent"


def test_ping_with_and_without_checksum_offload(rsd, fe, gateway):
    fe.post(ping(gateway, 1))
    fe.wait_frame(lambda f: is_echo_reply(f, 1), "echo reply 1")
    # the ICMP checksum left to the device: slirp drops a request whose checksum is wrong
    fe.post(ping(gateway, 2, offload=True), vnet_header(VNET_NEEDS_CSUM, csum_start=34, csum_offset=2))
    fe.wait_frame(lambda f: is_echo_reply(f, 2), "echo reply 2 (checksum by the device)")


def test_a_posted_frame_is_sent_at_once_not_at_a_timer(rsd, fe, gateway):
    # Doorbell -> TDT -> written back -> interrupt -> tx_done -> our doorbell: nothing on the way
    # may wait for the driver's safety-net poll (0.5 s) or any other timer.
    sent_ms, rtt_ms = [], []
    for seq in range(100, 130):
        fe.collect()
        t0 = time.monotonic()
        fe.post(ping(gateway, seq))
        while fe.tx_done != fe.tx_posted:
            select.select([fe.notify], [], [], 0.05)
            try:
                os.eventfd_read(fe.notify)
            except BlockingIOError:
                pass
        sent_ms.append((time.monotonic() - t0) * 1e3)
        fe.wait_frame(lambda f, seq=seq: is_echo_reply(f, seq), "echo reply %d" % seq)
        rtt_ms.append((time.monotonic() - t0) * 1e3)
    sent_ms.sort()
    rtt_ms.sort()
    figure("tx_posted_to_done_median_ms", round(sent_ms[len(sent_ms) // 2], 3))
    figure("ping_gateway_median_ms", round(rtt_ms[len(rtt_ms) // 2], 3))
    assert sent_ms[len(sent_ms) // 2] < 50, sent_ms


def test_a_tso_frame_leaves_as_segments(rsd, fe, gateway):
    before = fe.request("stats")["stats"]
    # 3000 bytes: segments of 1024, 1024, 952 (QEMU adds an empty fourth to an exact multiple)
    payload = (bytes(range(256)) * 12)[:3000]
    tcp = struct.pack(">HHIIBBHHH", 40000, 9, 1000, 0, 5 << 4, 0x18, 65535, 0, 0)
    frame = gateway + MAC + b"\x08\x00" + ipv4(6, tcp + payload)
    fe.post(frame, vnet_header(VNET_NEEDS_CSUM, VNET_GSO_TCPV4, 54, 1024, 34, 16))
    wait(lambda: fe.tx_done == fe.tx_posted, "the TSO entry done", 10)
    after = wait(lambda: (s := fe.request("stats")["stats"])["tx_good_packets"] >= before["tx_good_packets"] + 3
                 and s, "3 segments counted", 10)
    assert after["tx_good_packets"] - before["tx_good_packets"] == 3, (before, after)
    assert after["driver_tx_tso"] >= 1


def test_set_and_stats(rsd, fe, gateway):
    r = fe.request("set", mtu=9000, mc=["01:00:5e:00:00:01"], allmulti=False)
    assert r["ok"] and r["settings"]["mtu"] == 9000 and r["settings"]["mc"] == ["01:00:5e:00:00:01"], r
    bad = fe.request("set", mtu=20000)
    assert not bad["ok"] and bad["err"] == "EINVAL" and "mtu" in bad["msg"], bad
    assert fe.request("set", mac="01:00:00:00:00:01")["err"] == "EINVAL"
    s = fe.request("stats")["stats"]
    assert s["tx_good_packets"] >= 5 and s["rx_good_octets"] > 0 and "rx_no_buffer" in s and "tx_restarts" in s, s


def driver_restart_ms():
    """The driver's own figure for its last restart init (its log line)."""
    found = re.findall(r"e1000: restarted after .*? in ([0-9.]+) ms \(device ([0-9.]+), interrupts ([0-9.]+)\)",
                       driver_log())
    return dict(zip(("total", "device", "interrupts"), map(float, found[-1]))) if found else None


def _restart_and_measure(fe, gateway, how, seq, post_while_down=False):
    """how(old) replaces the driver; then, as a front end would, attach at once (the listening
    socket stays rsd's: the new incarnation answers when it is ready) and ping."""
    old = status()
    t0 = time.monotonic()
    how(old)
    t_how = time.monotonic()
    if post_while_down:           # nobody takes it now: the next incarnation resends from tx_done
        fe.post(ping(gateway, seq))
    deadline = t0 + 60
    while True:
        try:
            fe.connect()
            reply = fe.attach()
            if reply.get("ok") and reply.get("generation", 0) > old["generation"] or \
                    not reply.get("ok") and reply.get("err") != "EBUSY":
                break             # (an attach the old incarnation answered on its way out: again)
        except (ConnectionError, OSError):
            pass                  # the old incarnation took the connection and then went
        assert time.monotonic() < deadline, "no new incarnation attached\n" + driver_log()
        time.sleep(0.01)
    t_attached = time.monotonic()
    assert reply["ok"], reply
    if not post_while_down:
        fe.post(ping(gateway, seq))
    fe.wait_frame(lambda f: is_echo_reply(f, seq), "echo reply after the restart")
    t_frames = time.monotonic()
    st = replaced(old)
    return st, reply, {"driver_init_ms": driver_restart_ms(), "command_ms": round((t_how - t0) * 1e3),
                       "to_attached_ms": round((t_attached - t0) * 1e3),
                       "attach_to_frames_ms": round((t_frames - t_attached) * 1e3),
                       "to_frames_ms": round((t_frames - t0) * 1e3)}


def test_rsctl_restart_keeps_settings_and_frames_flow_again_quickly(rsd, fe, gateway):
    st, reply, times = _restart_and_measure(fe, gateway, lambda old: rsctl("restart", LABEL), 10)
    figure("rsctl_restart", times)
    assert reply["settings"]["mtu"] == 9000 and reply["settings"]["mc"] == ["01:00:5e:00:00:01"], reply
    assert "restarted after" in driver_log()
    assert times["attach_to_frames_ms"] < 3000, times


def test_kill_9_the_driver_and_it_is_back(rsd, fe, gateway):
    before = fe.request("stats")["stats"]
    st, reply, times = _restart_and_measure(fe, gateway, lambda old: os.kill(old["pid"], 9), 11,
                                            post_while_down=True)
    figure("kill_9", times)
    figure("bring_up_phases_ms", re.findall(r"device phases \(ms\): (.*)", driver_log())[-2:])
    after = fe.request("stats")["stats"]
    # statistics accumulate across incarnations (DS)
    assert after["tx_good_packets"] >= before["tx_good_packets"], (before, after)
    assert after["tx_restarts"] > before["tx_restarts"], (before, after)   # the ping posted while down
    assert times["attach_to_frames_ms"] < 3000, times


def test_wild_dma_is_a_dmar_fault_and_a_restart(rsd, fe, gateway):
    old = status()
    dmesg_before = len(sh("dmesg").stdout.splitlines())
    for seq in range(100, 110):   # traffic flowing when the fault comes
        fe.post(ping(gateway, seq))
    rsctl("fi", LABEL, "--wild-dma")
    fe.post(arp_request())        # replies: what the device writes towards the wild address
    for seq in range(110, 130):
        fe.post(ping(gateway, seq))
    st = replaced(old)
    new = sh("dmesg").stdout.splitlines()[dmesg_before:]
    faults = [line for line in new if "DMAR" in line and "fault addr" in line]
    assert any(re.search(r"\[%s\] fault addr 0x10000000\b" % re.escape(E1000_BDF[5:]), line)
               for line in faults), "no DMAR fault at 0x10000000 in:\n%s" % "\n".join(new[-30:])
    assert "outside this driver's memory" in driver_log()
    assert st["last_failure"]["reason"] != "no-heartbeat", st
    fe.connect()
    assert fe.attach()["ok"]
    fe.post(ping(gateway, 20))
    fe.wait_frame(lambda f: is_echo_reply(f, 20), "echo reply after the wild DMA")


def test_hostile_front_ends_are_refused_and_the_driver_carries_on(rsd, fe, gateway):
    pid = status()["pid"]
    fe.close_socket()
    time.sleep(0.2)
    # memory that is not sealed
    loose = os.memfd_create("loose", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(loose, netshm.SIZE)
    h = FrontEnd(memfd=loose).connect()
    r = h.attach()
    assert not r["ok"] and r["err"] == "EINVAL" and "seal" in r["msg"], r
    assert refused_connection(h)
    h.close()
    # doorbells that are not eventfds
    h = FrontEnd().connect()
    rd, wr = os.pipe()
    r = h.attach(fds=[h.memfd, rd, wr])
    assert not r["ok"] and "eventfd" in r["msg"], r
    os.close(rd), os.close(wr)
    h.close()
    # a TX entry outside the data area
    h = FrontEnd().connect()
    assert h.attach()["ok"]
    struct.pack_into("<II", h.m, netshm.TXQ_OFF, netshm.TX_DATA_SIZE - 64, 4096)
    h.tx_posted = 1
    h.u32(64, 1)
    os.eventfd_write(h.doorbell, 1)
    assert refused_connection(h)
    assert any(e.get("ev") == "refused" for e in h.events), h.events
    h.close()
    # rx_consumed going backwards
    h = FrontEnd().connect()
    assert h.attach()["ok"]
    h.post(arp_request())
    h.wait_frame(is_arp_reply, "ARP reply for the hostile front end")
    time.sleep(1.0)               # the driver has taken rx_consumed (doorbell, or its poll)
    h.u32(68, (h.rx_consumed - 1) & 0xFFFFFFFF)
    os.eventfd_write(h.doorbell, 1)
    assert refused_connection(h)
    h.close()
    # a malformed frame (a length beyond any limit)
    h = FrontEnd().connect()
    h.sock.sendall(b"\xff\xff\xff\x7f" + bytes(16))
    assert refused_connection(h)
    h.close()
    # a front end that sends fds with a request other than attach
    h = FrontEnd().connect()
    r = h.request("stats", fds=[h.memfd])
    assert r["ok"]
    h.close()
    # ... and the driver is the same process, and serves a good front end
    assert status()["pid"] == pid
    fds = os.listdir("/proc/%d/fd" % pid)
    assert len(fds) < 20, fds       # what the hostile ones handed over was closed
    fe.connect()
    assert fe.attach()["ok"]
    fe.post(ping(gateway, 30))
    fe.wait_frame(lambda f: is_echo_reply(f, 30), "echo reply after the hostile front ends")
    st = fe.request("stats")["stats"]
    assert st["refused"] >= 2, st


def test_link_changes_are_events(rsd, fe, gateway, capsys):
    """QEMU's link goes down and up (the host does it when it reads our request on stdout)."""
    for up_, what in ((False, "down"), (True, "up")):
        with capsys.disabled():
            print("\nE1000-TESTBED set_link %s" % what, flush=True)
        ev = fe.wait_event(lambda e: e.get("ev") == "link" and e.get("up") is up_, "link " + what, 30)
        if up_:
            assert ev["speed"] == 1000 and ev["duplex"] == "full", ev
    fe.post(ping(gateway, 40))
    fe.wait_frame(lambda f: is_echo_reply(f, 40), "echo reply after the link came back")
