"""The network front end (frontends/net.py) on real TAPs, in network namespaces.

The front end runs as an unprivileged uid in namespace A, serving the
persistent TAP eth0 (10.77.0.1).  The driver is played by DriverPeer, in
this process, over the real socket, shared memory and eventfds: it is not
the e1000 driver, it stands in for its far side.  What the front end posts
for transmission it writes to a second TAP, far0 (10.77.0.2) in namespace
B, and what B's stack sends on far0 it puts into the RX buffers.  So A and
B talk through the front end and the shared memory as through a cable.
Variants of the peer hold frames unconfirmed (a driver that dies with
frames in flight) or write garbage (a hostile driver).
"""

import ctypes
import json
import mmap
import os
import select
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid

import pytest

from frontends.net import open_tap
from libdrv import netshm
from libdrv.wire import FrameReader, encode

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "services"))
from rsdharness import RsdDaemon, wait_for  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(HERE))
FE_UID = 610977          # the front end's unprivileged uid (owns the TAP)
A_ADDR, B_ADDR = "10.77.0.1", "10.77.0.2"
EEPROM_MAC = "52:54:00:12:34:56"

CLONE_NEWNET = 0x40000000

# netshm.h header offsets
TX_POSTED, RX_CONSUMED = 64, 68
TX_DONE, RX_PRODUCED = 128, 132

libc = ctypes.CDLL(None, use_errno=True)


def sh(*args):
    subprocess.run(args, check=True, capture_output=True)


def in_netns(ns, fn):
    """Run fn in a thread that entered namespace ns: sockets and TAP fds it opens stay there."""
    out = {}

    def run():
        fd = os.open("/run/netns/%s" % ns, os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns %s" % ns)
        finally:
            os.close(fd)
        try:
            out["value"] = fn()
        except BaseException as exc:
            out["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


class DriverPeer(threading.Thread):
    """Plays the driver over the real protocol; the far side of its 'wire' is far0.

    forward: put TX frames on far0 and far0's frames into the RX buffers.
    confirm: advance tx_done for the frames it took (off: a driver that dies
    with frames in flight).  reply: fields that override the attach reply.
    """

    def __init__(self, path, far_fd, forward=True, confirm=True, offloads=("csum", "tso4", "tso6"), reply=None,
                 serve_again=False):
        super().__init__(daemon=True)
        self.serve_again = serve_again   # accept the next front end connection (a restarted front end)
        self.attaches = 0
        self.path, self.far_fd = path, far_fd
        self.forward, self.confirm, self.offloads, self.reply_extra = forward, confirm, list(offloads), reply or {}
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if os.path.exists(path):
            os.unlink(path)
        self.listener.bind(path)
        os.chmod(path, 0o666)
        self.listener.listen(4)
        self.conn = None
        self.attach = None          # the attach request
        self.attached = threading.Event()
        self.closed_by_frontend = threading.Event()
        self.sets = []              # `set` requests
        self.tx_frames = []         # (index, vnet header + frame) as posted
        self.rx_frames = []         # the frames put into the RX buffers, as given
        self.mm = None
        self.stopping = False
        self.next_tx = 0
        self.rx_produced = 0
        self.start()

    # shared memory words
    def u32(self, off):
        return struct.unpack_from("<I", self.mm, off)[0]

    def put_u32(self, off, v):
        struct.pack_into("<I", self.mm, off, v & 0xffffffff)

    def ring(self):
        os.eventfd_write(self.bell_frontend, 1)

    def send_event(self, **ev):
        self.conn.sendall(encode(ev))

    def run(self):
        self.listener.settimeout(10)
        while self.serve() and self.serve_again and not self.stopping:
            self.end_session()

    def end_session(self):
        self.conn.close()
        self.conn = None
        if self.attached.is_set():
            os.close(self.bell_driver)
            os.close(self.bell_frontend)
            self.attached.clear()

    def serve(self):
        """One front end connection; True when the front end closed it."""
        try:
            self.conn, _ = self.listener.accept()
        except OSError:
            return False
        if self.stopping:  # crash() woke us
            return False
        reader = FrameReader()
        data, fds, _, _ = socket.recv_fds(self.conn, 1 << 16, 3)
        msgs = reader.feed(data)
        self.attach = msgs[0]
        self.attaches += 1
        memfd, self.bell_driver, self.bell_frontend = fds
        netshm.check_fd(memfd)
        self.mm = mmap.mmap(memfd, netshm.SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        os.close(memfd)
        self.next_tx = self.attach["tx_done"]
        self.rx_produced = 0
        self.put_u32(TX_DONE, self.next_tx)
        reply = {"id": self.attach["id"], "ok": True, "mac": EEPROM_MAC, "link": True, "speed": 1000,
                 "duplex": "full", "max_mtu": 9000, "offloads": self.offloads,
                 "settings": self.attach["settings"]}
        reply.update(self.reply_extra)
        if not self.reply_extra.get("silent"):
            self.conn.sendall(self.reply_extra.get("raw") or encode(reply))
        self.attached.set()
        self.conn.setblocking(False)
        while not self.stopping:
            watch = [self.conn, self.bell_driver] + ([self.far_fd] if self.forward else [])
            ready, _, _ = select.select(watch, [], [], 0.01)
            if self.conn in ready:
                try:
                    data = self.conn.recv(1 << 16)
                except BlockingIOError:
                    data = None
                except OSError:
                    data = b""
                if data == b"":
                    self.closed_by_frontend.set()
                    return True
                for m in reader.feed(data or b""):
                    self.answer(m)
            if self.bell_driver in ready:
                os.eventfd_read(self.bell_driver)
            if self.stopping:
                break
            self.take_tx()
            if self.forward:
                self.give_rx()
        return False

    def answer(self, m):
        if m.get("op") == "set" and m.get("mtu", 0) > 9000:
            self.conn.sendall(encode({"id": m["id"], "ok": False, "err": "EINVAL", "msg": "mtu must be 68..9000"}))
        elif m.get("op") == "set":
            self.sets.append({k: v for k, v in m.items() if k not in ("op", "id")})
            self.conn.sendall(encode({"id": m["id"], "ok": True, "settings": self.sets[-1]}))
        else:
            self.conn.sendall(encode({"id": m.get("id"), "ok": False, "err": "EINVAL", "msg": "not modelled"}))

    def take_tx(self):
        posted = self.u32(TX_POSTED)
        moved = False
        while self.next_tx != posted:
            slot = self.next_tx % netshm.TX_SLOTS
            off, length = struct.unpack_from("<II", self.mm, netshm.TXQ_OFF + 8 * slot)
            frame = bytes(self.mm[netshm.TXDATA_OFF + off:netshm.TXDATA_OFF + off + length])
            self.tx_frames.append((self.next_tx, frame))
            if self.forward:
                try:
                    os.write(self.far_fd, frame)
                except OSError:
                    pass  # far0 refused it: a frame lost on the wire
            self.next_tx = (self.next_tx + 1) & 0xffffffff
            if self.confirm:
                self.put_u32(TX_DONE, self.next_tx)
                moved = True
        if moved:
            self.ring()

    def give_rx(self):
        moved = False
        while True:
            free = netshm.RX_BUFS - ((self.rx_produced - self.u32(RX_CONSUMED)) & 0xffffffff)
            if free < netshm.RX_FRAME_BUFS:
                break
            try:
                data = os.read(self.far_fd, 70000)
            except BlockingIOError:
                break
            frame = data[12:]  # far0's vnet header: nothing to offload, so nothing to keep
            self.rx_frames.append(frame)
            pieces = [frame[i:i + netshm.RX_BUF_SIZE] for i in range(0, len(frame), netshm.RX_BUF_SIZE)]
            for i, piece in enumerate(pieces):
                k = self.rx_produced % netshm.RX_BUFS
                at = netshm.RXBUF_OFF + k * netshm.RX_BUF_SIZE
                self.mm[at:at + len(piece)] = piece
                flags = netshm.RX_EOP if i == len(pieces) - 1 else 0
                struct.pack_into("<HBB", self.mm, netshm.RXQ_OFF + 4 * k, len(piece), flags, 0)
                self.rx_produced = (self.rx_produced + 1) & 0xffffffff
            self.put_u32(RX_PRODUCED, self.rx_produced)
            moved = True
        if moved:
            self.ring()

    def crash(self):
        """Die as a driver dies: the connection and fds go, nothing more is done."""
        if self.listener is None:
            return
        self.stopping = True
        if self.is_alive():
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as wake:  # an accept() waiting
                try:
                    wake.connect(self.path)
                except OSError:
                    pass
                self.join(5)
        assert not self.is_alive(), "the driver peer thread did not stop"
        if self.conn is not None:
            self.end_session()
        self.listener.close()
        self.listener = None


class Bench:
    """Two namespaces, the front end serving A's eth0, the DS the test is registrar of."""

    def __init__(self, ds, tmp, frontend_tap=True):
        tag = uuid.uuid4().hex[:6]
        self.ns_a, self.ns_b = "rsdnetA" + tag, "rsdnetB" + tag
        self.ds = ds
        self.reg = ds.client()
        self.generation = 0
        self.peers = []
        self.fe = None
        self.log_path = os.path.join(str(tmp), "frontend.log")
        for ns in (self.ns_a, self.ns_b):
            sh("ip", "netns", "add", ns)
            sh("ip", "netns", "exec", ns, "sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1")
            sh("ip", "netns", "exec", ns, "sysctl", "-q", "-w", "net.ipv6.conf.default.disable_ipv6=1")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        if frontend_tap:  # else rsd makes it ([resources] tap)
            sh("ip", "-n", self.ns_a, "tuntap", "add", "eth0", "mode", "tap", "user", str(FE_UID),
               "group", str(FE_UID), "vnet_hdr")
            self.configure_eth0()
        sh("ip", "-n", self.ns_b, "tuntap", "add", "far0", "mode", "tap", "vnet_hdr")
        sh("ip", "-n", self.ns_b, "addr", "add", B_ADDR + "/24", "dev", "far0")
        sh("ip", "-n", self.ns_b, "link", "set", "far0", "up")
        self.far_fd = in_netns(self.ns_b, lambda: open_tap("far0"))
        self.svc = os.path.join(ds.runtime_dir, "svc")
        os.makedirs(self.svc, exist_ok=True)
        os.chmod(self.svc, 0o755)
        self.sock_path = os.path.join(self.svc, "eth0.sock")

    def configure_eth0(self):
        sh("ip", "-n", self.ns_a, "addr", "add", A_ADDR + "/24", "dev", "eth0")
        sh("ip", "-n", self.ns_a, "link", "set", "eth0", "up")

    def start_frontend(self, grace=5.0):
        env = {"PYTHONPATH": ROOT, "RSD_DS_SOCKET": self.ds.socket_path, "RSD_LABEL": "eth0-net",
               "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
        with open(self.log_path, "ab") as log:
            self.fe = subprocess.Popen(
                ["ip", "netns", "exec", self.ns_a, "setpriv", "--reuid=%d" % FE_UID, "--regid=%d" % FE_UID,
                 "--clear-groups", sys.executable, "-m", "frontends.net", "--label", "eth0",
                 "--runtime-dir", self.ds.runtime_dir, "--carrier-grace", str(grace)],
                env=env, stdout=log, stderr=log, cwd="/")
        self.reg.register(self.fe.pid, "eth0-net")
        wait_for(lambda: self.status() is not None, 10, what="the front end's status in DS")

    def status(self):
        entry = self.reg.get("net.eth0.status")
        return json.loads(entry) if entry is not None else None

    def log(self):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return "(no front end log yet)"

    def wait_attached(self, peer):
        """The peer got its attach and the front end took the reply (carrier on: frames flow)."""
        assert peer.attached.wait(10), self.log()
        wait_for(lambda: carrier(self), 5, what="carrier on after the attach\n" + self.log())

    def driver_up(self, **peer_args):
        """A new driver incarnation: its socket, then DS says up with a new generation."""
        peer = DriverPeer(self.sock_path, self.far_fd, **peer_args)
        self.peers.append(peer)
        self.generation += 1
        self.reg.publish("drv.net.eth0", "up %d" % self.generation, overwrite=True)
        return peer

    def driver_crashed(self, peer):
        peer.crash()
        self.reg.publish("drv.net.eth0", "restarting %d" % self.generation, overwrite=True)

    def link_show(self, name="eth0"):
        return subprocess.run(["ip", "-n", self.ns_a, "-s", "-j", "link", "show", name], check=True,
                              capture_output=True, text=True).stdout

    def close(self):
        if self.fe is not None:
            self.fe.terminate()
            try:
                self.fe.wait(5)
            except subprocess.TimeoutExpired:
                self.fe.kill()
                self.fe.wait()
        for peer in self.peers:
            peer.crash()
        os.close(self.far_fd)
        self.reg.close()
        for ns in (self.ns_a, self.ns_b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.fixture
def bench(ds, tmp_path):
    b = Bench(ds, tmp_path)
    try:
        yield b
    finally:
        b.close()


def udp_socket(bench, ns, addr, port):
    def make():
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((addr, port))
        s.settimeout(5)
        return s
    return in_netns(ns, make)


def test_udp_crosses_the_tap_and_the_shared_memory_both_ways(bench):
    bench.start_frontend()
    peer = bench.driver_up()
    bench.wait_attached(peer)
    a = udp_socket(bench, bench.ns_a, A_ADDR, 4000)
    b = udp_socket(bench, bench.ns_b, B_ADDR, 4001)
    a.sendto(b"from A", (B_ADDR, 4001))      # ARP, then the datagram, both ways through the peer
    data, src = b.recvfrom(100)
    assert (data, src) == (b"from A", (A_ADDR, 4000))
    b.sendto(b"from B", (A_ADDR, 4000))
    assert a.recvfrom(100) == (b"from B", (B_ADDR, 4001))
    # What the TAP gave the front end sits in the TX area with a 12-byte vnet header first.
    udp = [f for _, f in peer.tx_frames if f[12 + 12:12 + 14] == b"\x08\x00" and f.endswith(b"from A")]
    assert len(udp) == 1 and len(udp[0]) == 12 + 14 + 20 + 8 + 6
    stats = json.loads(bench.link_show())[0]["stats64"]
    assert stats["tx"]["packets"] >= 2 and stats["rx"]["packets"] >= 2  # the TAP's own counters
    st = wait_for(lambda: (lambda s: s if s["rx_frames"] >= 2 and s["tx_frames"] >= 2 else None)(bench.status()),
                  5, what="counters in DS")
    assert st["state"] == "up" and st["generation"] == 1 and st["carrier"] is True
    assert st["driver"]["mac"] == EEPROM_MAC and "EEPROM MAC %s" % EEPROM_MAC in bench.log()


def tcp_pair(bench):
    def listen():
        s = socket.socket()
        s.bind((B_ADDR, 5000))
        s.listen(1)
        s.settimeout(10)
        return s
    server = in_netns(bench.ns_b, listen)

    def connect():
        c = socket.create_connection((B_ADDR, 5000), timeout=10)
        return c
    client = in_netns(bench.ns_a, connect)
    conn, _ = server.accept()
    conn.settimeout(20)
    server.close()
    return client, conn


def recv_exactly(sock, n):
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        assert chunk, "connection closed after %d of %d bytes" % (len(out), n)
        out += chunk
    return bytes(out)


def test_tcp_with_segmentation_offload_streams_through(bench):
    bench.start_frontend()
    peer = bench.driver_up()
    bench.wait_attached(peer)
    client, server = tcp_pair(bench)
    payload = os.urandom(4 << 20)
    sender = threading.Thread(target=client.sendall, args=(payload,))
    sender.start()
    assert recv_exactly(server, len(payload)) == payload
    sender.join()
    # The stack handed the TAP segments larger than the MTU: the offloads the peer offered are on.
    assert max(len(f) for _, f in peer.tx_frames) > 1514 + 12


def test_unconfirmed_tx_frames_are_resent_by_the_next_incarnation(bench):
    bench.start_frontend()
    sh("ip", "-n", bench.ns_a, "neigh", "replace", B_ADDR, "lladdr", "02:00:00:00:00:02", "dev", "eth0")
    first = bench.driver_up(forward=False, confirm=False)  # takes frames, never finishes them
    bench.wait_attached(first)
    a = udp_socket(bench, bench.ns_a, A_ADDR, 4000)
    for i in range(3):
        a.sendto(b"datagram %d" % i, (B_ADDR, 4001))
    wait_for(lambda: len(first.tx_frames) >= 3, 5, what="three frames posted")
    bench.driver_crashed(first)
    wait_for(lambda: bench.status()["state"] == "waiting", 5, what="the front end to see the death")
    a.sendto(b"while down", (B_ADDR, 4001))  # queued in the TX area: no driver to take it
    wait_for(lambda: bench.status()["tx_backlog"] == 4, 5, what="the frame queued while down")
    second = bench.driver_up(forward=False)
    bench.wait_attached(second)
    assert second.attach["tx_done"] == first.attach["tx_done"] == 0
    wait_for(lambda: len(second.tx_frames) >= 4, 5, what="the resend")
    assert [f for _, f in second.tx_frames[:3]] == [f for _, f in first.tx_frames[:3]]
    assert second.tx_frames[3][1].endswith(b"while down")
    st = wait_for(lambda: (lambda s: s if s["tx_backlog"] == 0 else None)(bench.status()), 5,
                  what="the resent frames confirmed")
    assert st["tx_resent"] == 3 and st["driver_deaths"] == 1 and st["generation"] == 2


def test_tcp_connection_survives_a_driver_crash(bench):
    bench.start_frontend()
    first = bench.driver_up()
    bench.wait_attached(first)
    client, server = tcp_pair(bench)
    client.sendall(b"before")
    assert recv_exactly(server, 6) == b"before"
    first.forward = False      # the device stops: frames taken, never sent, never confirmed
    first.confirm = False
    client.sendall(b"in flight")
    wait_for(lambda: any(f.endswith(b"in flight") for _, f in first.tx_frames), 5, what="the frame posted")
    bench.driver_crashed(first)
    second = bench.driver_up()
    bench.wait_attached(second)
    assert recv_exactly(server, 9) == b"in flight"
    server.sendall(b"reply")
    assert recv_exactly(client, 5) == b"reply"
    wait_for(lambda: bench.status()["tx_resent"] >= 1, 5, what="the resend counted")


def garbage_tx_done_backwards(peer):
    peer.put_u32(TX_DONE, peer.u32(TX_DONE) - 1)


def garbage_tx_done_past_posted(peer):
    peer.put_u32(TX_DONE, peer.u32(TX_POSTED) + 1)


def garbage_rx_produced_jump(peer):
    peer.put_u32(RX_PRODUCED, peer.u32(RX_CONSUMED) + netshm.RX_BUFS + 1)


def garbage_rx_len_beyond_buffer(peer):
    struct.pack_into("<HBB", peer.mm, netshm.RXQ_OFF, netshm.RX_BUF_SIZE + 1, netshm.RX_EOP, 0)
    peer.put_u32(RX_PRODUCED, 1)


def garbage_rx_frame_without_eop(peer):
    for k in range(netshm.RX_FRAME_BUFS + 1):
        struct.pack_into("<HBB", peer.mm, netshm.RXQ_OFF + 4 * k, 100, 0, 0)
    peer.put_u32(RX_PRODUCED, netshm.RX_FRAME_BUFS + 1)


GARBAGE = {
    "tx_done backwards": (garbage_tx_done_backwards, "tx_done"),
    "tx_done past tx_posted": (garbage_tx_done_past_posted, "tx_done"),
    "rx_produced more than RX_BUFS ahead": (garbage_rx_produced_jump, "buffers ahead"),
    "rx len beyond its buffer": (garbage_rx_len_beyond_buffer, "has len"),
    "rx frame without EOP over too many buffers": (garbage_rx_frame_without_eop, "without EOP"),
}


@pytest.mark.parametrize("kind", sorted(GARBAGE))
def test_garbage_in_shared_memory_refuses_the_incarnation_and_the_next_works(bench, kind):
    write_garbage, reason = GARBAGE[kind]
    bench.start_frontend()
    bad = bench.driver_up(forward=False, confirm=False)
    bench.wait_attached(bad)
    bad.stopping = True  # the thread stops touching the memory; the test writes it
    bad.join(5)
    write_garbage(bad)
    bad.ring()
    wait_for(lambda: bench.status()["state"] == "refused", 5, what="the refusal")
    assert "refusing driver eth0 generation 1: " in bench.log() and reason in bench.log()
    assert bad.conn.recv(10) == b""  # the front end closed the connection
    assert_next_generation_works(bench)


def assert_next_generation_works(bench):
    good = bench.driver_up()
    bench.wait_attached(good)
    a = udp_socket(bench, bench.ns_a, A_ADDR, 4000)
    b = udp_socket(bench, bench.ns_b, B_ADDR, 4001)
    a.sendto(b"after", (B_ADDR, 4001))
    assert b.recvfrom(100)[0] == b"after"
    b.sendto(b"back", (A_ADDR, 4000))
    assert a.recvfrom(100)[0] == b"back"
    st = bench.status()
    assert st["refusals"] == 1 and st["invalid"] <= 1


@pytest.mark.parametrize("reply", [{"mac": "not a mac"}, {"link": "yes"}, {"offloads": ["warp"]},
                                   {"max_mtu": 1 << 40}, {"ok": "yes"},
                                   {"raw": b"\xff\xff\xff\x7fnot a frame"}])
def test_an_invalid_attach_reply_is_refused_and_the_next_works(bench, reply):
    bench.start_frontend()
    bad = bench.driver_up(reply=reply)
    assert bad.attached.wait(10)
    wait_for(lambda: bench.status()["state"] == "refused", 5, what="the refusal")
    assert bad.closed_by_frontend.wait(5)
    assert_next_generation_works(bench)


def test_mtu_promisc_and_multicast_changes_reach_the_driver(bench):
    bench.start_frontend()
    peer = bench.driver_up()
    bench.wait_attached(peer)
    mac = json.loads(bench.link_show())[0]["address"]
    settings = peer.attach["settings"]
    assert settings["mac"] == mac and settings["mtu"] == 1500 and settings["promisc"] is False
    sh("ip", "-n", bench.ns_a, "link", "set", "eth0", "mtu", "1400")
    wait_for(lambda: any(s.get("mtu") == 1400 for s in peer.sets), 5, what="set mtu 1400")
    sh("ip", "-n", bench.ns_a, "link", "set", "eth0", "promisc", "on")
    wait_for(lambda: any(s.get("promisc") is True for s in peer.sets), 5, what="set promisc")
    sh("ip", "-n", bench.ns_a, "link", "set", "eth0", "allmulticast", "on")
    wait_for(lambda: any(s.get("allmulti") is True for s in peer.sets), 5, what="set allmulti")
    sh("ip", "-n", bench.ns_a, "link", "set", "eth0", "address", "02:11:22:33:44:55")
    wait_for(lambda: any(s.get("mac") == "02:11:22:33:44:55" for s in peer.sets), 5, what="set mac")
    sh("ip", "-n", bench.ns_a, "maddr", "add", "01:00:5e:01:02:03", "dev", "eth0")
    wait_for(lambda: any("01:00:5e:01:02:03" in s.get("mc", ()) for s in peer.sets), 5, what="set mc")
    sh("ip", "-n", bench.ns_a, "link", "set", "eth0", "mtu", "9500")  # beyond the driver's max_mtu
    wait_for(lambda: bench.status()["set_refused"] == 1, 5, what="the refused set counted")
    assert "driver eth0 refused {'mtu': 9500}: mtu must be 68..9000 (the TAP keeps it" in bench.log()
    sh("ip", "-n", bench.ns_a, "link", "set", "eth0", "mtu", "1400")
    # A new incarnation gets all of it with its attach.
    bench.driver_crashed(peer)
    second = bench.driver_up()
    bench.wait_attached(second)
    s = second.attach["settings"]
    assert (s["mtu"], s["promisc"], s["allmulti"]) == (1400, True, True) and "01:00:5e:01:02:03" in s["mc"]


def carrier(bench):
    return "NO-CARRIER" not in subprocess.run(["ip", "-n", bench.ns_a, "link", "show", "eth0"],
                                              capture_output=True, text=True, check=True).stdout


def test_carrier_follows_link_events_and_outlives_a_short_restart(bench):
    bench.start_frontend(grace=2.0)
    assert not carrier(bench)  # no driver yet
    peer = bench.driver_up()
    bench.wait_attached(peer)
    wait_for(lambda: carrier(bench), 5, what="carrier on")
    peer.send_event(ev="link", up=False, speed=0, duplex="half")
    wait_for(lambda: not carrier(bench), 5, what="carrier off at link down")
    peer.send_event(ev="link", up=True, speed=1000, duplex="full")
    wait_for(lambda: carrier(bench), 5, what="carrier on at link up")
    bench.driver_crashed(peer)
    time.sleep(1.0)
    assert carrier(bench)  # within the grace period
    wait_for(lambda: not carrier(bench), 5, what="carrier off after the grace period")


def test_while_no_driver_runs_the_tap_is_read_until_the_tx_area_is_full(bench):
    bench.start_frontend(grace=30.0)  # the carrier stays on: the stack keeps sending
    sh("ip", "-n", bench.ns_a, "neigh", "replace", B_ADDR, "lladdr", "02:00:00:00:00:02", "dev", "eth0")
    first = bench.driver_up(forward=False)
    bench.wait_attached(first)
    bench.driver_crashed(first)
    wait_for(lambda: bench.status()["state"] == "waiting", 5, what="the front end to see the death")
    a = udp_socket(bench, bench.ns_a, A_ADDR, 4000)
    a.setblocking(False)
    sent = 0
    for i in range(netshm.TX_SLOTS + 200):
        try:
            a.sendto(b"queued %d" % i, (B_ADDR, 4001))
            sent += 1
        except BlockingIOError:
            time.sleep(0.01)
    wait_for(lambda: bench.status()["tx_backlog"] == netshm.TX_SLOTS, 5, what="a full TX queue")
    time.sleep(0.3)
    assert bench.status()["tx_backlog"] == netshm.TX_SLOTS  # it stopped reading: the kernel holds the rest
    second = bench.driver_up(forward=False)
    bench.wait_attached(second)
    wait_for(lambda: len(second.tx_frames) >= netshm.TX_SLOTS + 1, 10, what="the queue and then more")
    udp = [f for _, f in second.tx_frames if b"queued " in f]
    assert udp[0].endswith(b"queued 0") and len(udp) > netshm.TX_SLOTS


def checksum(data):
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while total >> 16:
        total = (total & 0xffff) + (total >> 16)
    return ~total & 0xffff


def udp_frame(dst_mac, payload, port=4000, good_checksum=True):
    """An Ethernet frame B -> A (10.77.0.2:4001 -> 10.77.0.1:port), built by hand."""
    src, dst = socket.inet_aton(B_ADDR), socket.inet_aton(A_ADDR)
    udp = struct.pack("!HHHH", 4001, port, 8 + len(payload), 0) + payload
    csum = checksum(src + dst + struct.pack("!BBH", 0, 17, len(udp)) + udp) or 0xffff
    udp = udp[:6] + struct.pack("!H", csum if good_checksum else csum ^ 0x5555) + udp[8:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0, src, dst)
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    return bytes.fromhex(dst_mac.replace(":", "")) + bytes.fromhex("020000000002") + b"\x08\x00" + ip + udp


def put_rx(peer, frames):
    """Write (frame, flags) into the next RX buffers, one buffer each; returns rx_produced."""
    for frame, flags in frames:
        k = peer.rx_produced % netshm.RX_BUFS
        at = netshm.RXBUF_OFF + k * netshm.RX_BUF_SIZE
        peer.mm[at:at + len(frame)] = frame
        struct.pack_into("<HBB", peer.mm, netshm.RXQ_OFF + 4 * k, len(frame), flags, 0)
        peer.rx_produced += 1
    peer.put_u32(RX_PRODUCED, peer.rx_produced)


def test_error_frames_are_dropped_and_a_claimed_checksum_does_not_bypass_the_stack(bench):
    bench.start_frontend()
    peer = bench.driver_up(forward=False)
    bench.wait_attached(peer)
    peer.stopping = True
    peer.join(5)
    mac = json.loads(bench.link_show())[0]["address"]
    a = udp_socket(bench, bench.ns_a, A_ADDR, 4000)
    a.settimeout(0.5)
    eop, ok, bad = netshm.RX_EOP, netshm.RX_CSUM_OK, netshm.RX_ERROR
    put_rx(peer, [(udp_frame(mac, b"wrong sum", good_checksum=False), eop),
                  (udp_frame(mac, b"flagged in error"), eop | bad),
                  (udp_frame(mac, b"wrong sum, device says fine", good_checksum=False), eop | ok),
                  (udp_frame(mac, b"right sum, device says fine"), eop | ok),
                  (udp_frame(mac, b"right sum"), eop)])
    peer.ring()
    # The front end marks CSUM_OK frames DATA_VALID, but Linux's tun takes only NEEDS_CSUM
    # from a writer: the stack checks every sum itself, so a lying driver corrupts nothing.
    assert a.recvfrom(100)[0] == b"right sum, device says fine"
    assert a.recvfrom(100)[0] == b"right sum"
    with pytest.raises(socket.timeout):
        a.recvfrom(100)
    st = wait_for(lambda: (lambda s: s if s["rx_frames"] == 4 else None)(bench.status()), 5,
                  what="four frames written to the TAP")
    assert st["rx_errors"] == 1 and st["invalid"] == 0


def test_a_dying_driver_s_completed_rx_frames_are_delivered_and_a_partial_one_counted(bench):
    bench.start_frontend()
    peer = bench.driver_up(forward=False)
    bench.wait_attached(peer)
    peer.stopping = True
    peer.join(5)
    mac = json.loads(bench.link_show())[0]["address"]
    a = udp_socket(bench, bench.ns_a, A_ADDR, 4000)
    frame = udp_frame(mac, b"x" * 3000)
    put_rx(peer, [(frame[:2048], 0), (frame[2048:], netshm.RX_EOP), (frame[:2048], 0)])  # the last unfinished
    bench.driver_crashed(peer)   # no doorbell: the front end finds them when it sees the death
    assert a.recvfrom(4000)[0] == b"x" * 3000
    wait_for(lambda: bench.status()["rx_lost_bufs"] == 1, 5, what="the unfinished frame counted")
    assert bench.status()["rx_frames"] == 1


def test_malformed_events_and_replies_on_the_socket_are_ignored(bench):
    bench.start_frontend()
    peer = bench.driver_up()
    bench.wait_attached(peer)
    wait_for(lambda: carrier(bench), 5, what="carrier on")
    peer.send_event(ev="link", up="no", speed=0, duplex="half")
    peer.send_event(ev="link", up=False, speed=b"\xff", duplex=["x"])
    peer.send_event(id=[1], ok=False, msg=b"\xff")
    peer.send_event(id=12345, ok=True)
    peer.send_event(ev="link", up=False, speed=10, duplex="half")
    wait_for(lambda: not carrier(bench), 5, what="the well-formed link event")
    st = wait_for(lambda: (lambda s: s if s["driver"].get("speed") == 10 else None)(bench.status()), 5,
                  what="the status published")
    assert st["state"] == "up" and bench.fe.poll() is None
    assert bench.log().count("ignoring a malformed link event") == 2


def test_the_front_end_runs_as_an_rsd_service_on_the_tap_rsd_made(ds, tmp_path):
    bench = Bench(ds, tmp_path, frontend_tap=False)
    # rsd in namespace A (it makes the TAP there); `ip netns exec` gives it A's /sys, without cgroups.
    rsd = RsdDaemon(ds, argv_prefix=["ip", "netns", "exec", bench.ns_a, "sh", "-c",
                                     'mount -t cgroup2 none /sys/fs/cgroup && exec "$@"', "sh"])
    try:
        rsd.start()
        bench.log_path = os.path.join(rsd.state_dir, "log", "eth0-net.log")
        rsd.up(program="frontends.net", label="eth0-net", args=["--label", "eth0"], resources={"tap": "eth0"})
        st = wait_for(lambda: rsd.status("eth0-net")["state"] == "up" and rsd.status("eth0-net"), 10,
                      what="the front end up under rsd\n" + rsd.log())
        bench.configure_eth0()
        wait_for(lambda: bench.status() is not None, 10, what="its status in DS")
        peer = bench.driver_up(serve_again=True)
        bench.wait_attached(peer)
        a = udp_socket(bench, bench.ns_a, A_ADDR, 4000)
        b = udp_socket(bench, bench.ns_b, B_ADDR, 4001)
        a.sendto(b"under rsd", (B_ADDR, 4001))
        assert b.recvfrom(100)[0] == b"under rsd"
        b.sendto(b"back", (A_ADDR, 4000))
        assert a.recvfrom(100)[0] == b"back"
        time.sleep(3)  # heartbeats answered from the loop: no restart
        now = rsd.status("eth0-net")
        assert now["state"] == "up" and now["generation"] == st["generation"], rsd.log()
        # The front end restarted: the TAP (and its address) stays, the new one attaches again.
        ifindex = json.loads(bench.link_show())[0]["ifindex"]
        r = rsd.rsctl("restart", "eth0-net")
        assert r.returncode == 0, r.stderr
        rsd.wait_generation("eth0-net", st["generation"])
        wait_for(lambda: peer.attaches == 2, 10, what="the restarted front end's attach\n" + bench.log())
        bench.wait_attached(peer)
        a.sendto(b"after the restart", (B_ADDR, 4001))
        assert b.recvfrom(100)[0] == b"after the restart"
        assert json.loads(bench.link_show())[0]["ifindex"] == ifindex
    finally:
        rsd.cleanup()
        bench.close()


def test_a_driver_that_never_answers_the_attach_is_refused_without_stalling_the_front_end(bench):
    bench.start_frontend()
    silent = bench.driver_up(reply={"silent": True})
    assert silent.attached.wait(10)
    wait_for(lambda: bench.status()["state"] == "attaching", 5, what="the attach sent")
    before = bench.reg.get("net.eth0.status")
    wait_for(lambda: bench.reg.get("net.eth0.status") != before, 3, what="status published while waiting")
    wait_for(lambda: bench.status()["state"] == "refused", 8, what="the refusal after the attach timeout")
    assert "no reply to attach within 5 s" in bench.log()
    assert silent.closed_by_frontend.wait(5)
    assert_next_generation_works(bench)


def test_an_attach_answered_with_an_error_is_retried_for_the_same_generation(bench):
    bench.start_frontend()
    busy = bench.driver_up(reply={"ok": False, "err": "EBUSY", "msg": "a front end is attached already"})
    assert busy.attached.wait(10)
    assert busy.closed_by_frontend.wait(5)
    busy.crash()
    again = DriverPeer(bench.sock_path, bench.far_fd)  # the same incarnation, now free
    bench.peers.append(again)
    bench.wait_attached(again)
    assert "refused the attach: EBUSY a front end is attached already (will retry in 1 s)" in bench.log()
    st = wait_for(lambda: (lambda s: s if s["state"] == "up" else None)(bench.status()), 5, what="up")
    assert st["generation"] == 1 and st["refusals"] == 0


def test_random_garbage_in_the_drivers_fields_never_breaks_the_data_path(bench):
    """The data path itself (frontends._netio, in this process) against a driver writing
    random counters and RX entries: each lie is refused, nothing is read or written
    outside the memory, and the TX queue stays consistent for the next incarnation."""
    import random
    from frontends._netio import DataPath
    rng = random.Random(1)
    sh("ip", "-n", bench.ns_a, "tuntap", "add", "fz0", "mode", "tap", "vnet_hdr")
    sh("ip", "-n", bench.ns_a, "addr", "add", "10.78.0.1/24", "dev", "fz0")
    sh("ip", "-n", bench.ns_a, "link", "set", "fz0", "up")
    sh("ip", "-n", bench.ns_a, "neigh", "replace", "10.78.0.2", "lladdr", "02:00:00:00:00:02", "dev", "fz0")
    tap = in_netns(bench.ns_a, lambda: open_tap("fz0"))
    sender = udp_socket(bench, bench.ns_a, "10.78.0.1", 4000)
    sender.setblocking(False)
    memfd = netshm.create(0)
    dp = DataPath(tap, memfd)
    os.close(memfd)
    bell = os.eventfd(0, os.EFD_NONBLOCK)
    faults = 0
    try:
        for incarnation in range(200):
            memfd = netshm.create(incarnation + 1)
            dp.remap(memfd)
            mm = mmap.mmap(memfd, netshm.SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            os.close(memfd)
            dp.attach(bell)
            for _ in range(20):
                try:
                    sender.sendto(b"fuzz", ("10.78.0.2", 4001))
                except BlockingIOError:
                    pass
                dp.pull_tap()
                what = rng.randrange(6)
                if what == 5:  # an honest frame of 60 bytes
                    produced = struct.unpack_from("<I", mm, RX_PRODUCED)[0]
                    struct.pack_into("<HBB", mm, netshm.RXQ_OFF + 4 * (produced % netshm.RX_BUFS), 60,
                                     netshm.RX_EOP, 0)
                    struct.pack_into("<I", mm, RX_PRODUCED, produced + 1)
                elif what == 0:
                    struct.pack_into("<I", mm, TX_DONE, rng.getrandbits(32))
                elif what == 4:  # often honest: confirms 0..2 frames, sometimes more than posted
                    done = struct.unpack_from("<I", mm, TX_DONE)[0] + rng.randrange(3)
                    struct.pack_into("<I", mm, TX_DONE, done)
                elif what == 1:
                    struct.pack_into("<I", mm, RX_PRODUCED, rng.choice([rng.getrandbits(32), rng.randrange(600)]))
                else:
                    k = rng.randrange(netshm.RX_BUFS)
                    struct.pack_into("<HBB", mm, netshm.RXQ_OFF + 4 * k, rng.getrandbits(16) >> rng.randrange(16),
                                     rng.getrandbits(8), 0)
                fault = dp.poll_driver()
                if fault:
                    faults += 1
                    break
            dp.detach(False)
            mm.close()
            assert 0 <= dp.tx_backlog <= netshm.TX_SLOTS
        c = dp.counters()
        assert faults == c["invalid"] and faults > 100  # most incarnations were caught lying
        assert c["tx_queued"] > netshm.TX_SLOTS and c["tx_frames"] > 0 and c["tx_resent"] > 0
        assert c["rx_frames"] > 0
        assert c["tx_queued"] - c["tx_frames"] == dp.tx_backlog
    finally:
        os.close(bell)
        os.close(tap)


def test_a_driver_that_refuses_our_memory_gets_a_fresh_attach_from_us(bench):
    bench.start_frontend()
    peer = bench.driver_up(serve_again=True)
    bench.wait_attached(peer)
    first_memory = peer.attach
    peer.send_event(ev="refused", msg="rx_consumed moved backwards")
    peer.conn.shutdown(socket.SHUT_RDWR)  # as the driver does: it closes the connection
    wait_for(lambda: peer.attaches == 2, 5, what="the second attach\n" + bench.log())
    bench.wait_attached(peer)
    assert "refused our memory: rx_consumed moved backwards; attaching again in 1 s" in bench.log()
    assert peer.attach is not first_memory and peer.attach["tx_done"] == 0
    st = wait_for(lambda: (lambda s: s if s["state"] == "up" and s["refused_by_driver"] == 1 else None)(
        bench.status()), 5, what="up again, counted")
    assert st["generation"] == 1 and st["refusals"] == 0


def test_tcp_segments_from_the_wire_are_merged_into_gso_frames_and_arrive_intact(bench):
    bench.start_frontend()
    peer = bench.driver_up()
    bench.wait_attached(peer)
    client, server = tcp_pair(bench)  # client in A: B's segments reach it through the RX buffers
    payload = os.urandom(4 << 20)
    sender = threading.Thread(target=server.sendall, args=(payload,))
    sender.start()
    client.settimeout(20)
    assert recv_exactly(client, len(payload)) == payload
    sender.join()
    st = wait_for(lambda: (lambda s: s if s["rx_gro_frames"] else None)(bench.status()), 5,
                  what="GSO frames written to the TAP\n" + bench.log())
    assert st["rx_gro_segments"] > 2 * st["rx_gro_frames"] and st["rx_csum_bad"] == 0
    assert st["rx_gro_refused"] == 0 and st["rx_tap_drops"] == 0


def tcp_continuations(template, payloads, corrupt=()):
    """Segments that continue the TCP stream of template (an Ethernet + IPv4 + TCP frame
    with data): the same headers and options, the next sequence numbers and IP IDs.
    An index in corrupt gets its payload changed after its checksum is computed."""
    ihl = (template[14] & 0x0f) * 4
    tcp_at = 14 + ihl
    doff = (template[tcp_at + 12] >> 4) * 4
    ip_id = struct.unpack_from("!H", template, 18)[0]
    seq = struct.unpack_from("!I", template, tcp_at + 4)[0]
    seq += struct.unpack_from("!H", template, 16)[0] - ihl - doff
    src, dst = template[26:30], template[30:34]
    frames = []
    for i, data in enumerate(payloads):
        tcp = bytearray(template[tcp_at:tcp_at + doff])
        struct.pack_into("!I", tcp, 4, seq & 0xffffffff)
        tcp[13] = 0x18 if i == len(payloads) - 1 else 0x10  # ACK, PSH on the last (it ends a run)
        struct.pack_into("!H", tcp, 16, 0)
        segment = bytes(tcp) + data
        csum = checksum(src + dst + struct.pack("!BBH", 0, 6, len(segment)) + segment)
        struct.pack_into("!H", tcp, 16, csum)
        if i in corrupt:
            data = bytes(b ^ 0x20 for b in data)
        ip = bytearray(template[14:tcp_at])
        struct.pack_into("!HH", ip, 2, ihl + doff + len(data), (ip_id + 1 + i) & 0xffff)
        struct.pack_into("!H", ip, 10, 0)
        struct.pack_into("!H", ip, 10, checksum(bytes(ip)))
        frames.append(template[:14] + bytes(ip) + bytes(tcp) + data)
        seq += len(data)
    return frames


def quiet_tcp_stream(bench):
    """A connection B -> A, a few bytes carried and acknowledged, then the peer stopped:
    the RX buffers are ours to fill.  Returns (peer, A's socket, the last data frame B sent)."""
    bench.start_frontend()
    peer = bench.driver_up()
    bench.wait_attached(peer)
    client, server = tcp_pair(bench)
    server.sendall(b"hello")
    client.settimeout(5)
    assert recv_exactly(client, 5) == b"hello"
    time.sleep(0.5)  # A's ACK reaches B: B has nothing left to send
    peer.stopping = True
    peer.join(5)
    data_frames = [f for f in peer.rx_frames if f[12:14] == b"\x08\x00" and f[23] == 6
                   and f.endswith(b"hello")]
    assert data_frames, "B's segment carrying hello was not seen"
    time.sleep(1.5)  # the status (published every second) has counted all of it
    return peer, client, data_frames[-1]


def test_out_of_order_segments_are_not_merged_and_in_order_ones_are(bench):
    peer, client, template = quiet_tcp_stream(bench)
    before = bench.status()
    payloads = [os.urandom(1000) for _ in range(5)]
    frames = tcp_continuations(template, payloads)
    eop = netshm.RX_EOP
    put_rx(peer, [(frames[1], eop), (frames[0], eop)])  # swapped: two frames, as they came
    peer.ring()
    assert recv_exactly(client, 2000) == payloads[0] + payloads[1]
    st = wait_for(lambda: (lambda s: s if s["rx_frames"] == before["rx_frames"] + 2 else None)(bench.status()),
                  5, what="the two swapped segments written")
    assert st["rx_gro_frames"] == before["rx_gro_frames"]
    put_rx(peer, [(f, eop) for f in frames[2:]])  # in order, one batch: one GSO frame
    peer.ring()
    assert recv_exactly(client, 3000) == b"".join(payloads[2:])
    st = wait_for(lambda: (lambda s: s if s["rx_frames"] == before["rx_frames"] + 5 else None)(bench.status()),
                  5, what="the three in-order segments written")
    assert st["rx_gro_frames"] == before["rx_gro_frames"] + 1
    assert st["rx_gro_segments"] == before["rx_gro_segments"] + 3


def test_a_segment_with_a_wrong_tcp_checksum_is_not_merged_and_never_reaches_the_socket(bench):
    peer, client, template = quiet_tcp_stream(bench)
    before = bench.status()
    payloads = [os.urandom(1000) for _ in range(3)]
    eop = netshm.RX_EOP
    # The middle one corrupted on the wire: merged, its checksum would be trusted.
    put_rx(peer, [(f, eop) for f in tcp_continuations(template, payloads, corrupt={1})])
    peer.ring()
    assert recv_exactly(client, 1000) == payloads[0]
    client.settimeout(0.5)
    with pytest.raises(socket.timeout):
        client.recv(4000)  # the third waits behind the hole the dropped one left
    st = wait_for(lambda: (lambda s: s if s["rx_csum_bad"] == 1 else None)(bench.status()), 5,
                  what="the corrupted segment counted")
    assert st["rx_gro_frames"] == before["rx_gro_frames"]
    # Its retransmission fills the hole.
    put_rx(peer, [(tcp_continuations(template, payloads)[1], eop)])
    peer.ring()
    client.settimeout(5)
    assert recv_exactly(client, 2000) == payloads[1] + payloads[2]


def test_ipv6_tcp_segments_are_merged_too_and_arrive_intact(bench):
    bench.start_frontend()
    peer = bench.driver_up()
    bench.wait_attached(peer)
    for ns, dev, addr in ((bench.ns_a, "eth0", "fd77::1"), (bench.ns_b, "far0", "fd77::2")):
        sh("ip", "netns", "exec", ns, "sysctl", "-q", "-w", "net.ipv6.conf.%s.disable_ipv6=0" % dev)
        sh("ip", "-n", ns, "addr", "add", addr + "/64", "dev", dev, "nodad")

    def listen():
        s = socket.socket(socket.AF_INET6)
        s.bind(("fd77::2", 5001))
        s.listen(1)
        s.settimeout(10)
        return s
    listener = in_netns(bench.ns_b, listen)
    client = in_netns(bench.ns_a, lambda: socket.create_connection(("fd77::2", 5001), timeout=10))
    server, _ = listener.accept()
    listener.close()
    time.sleep(1.5)  # the status (published every second) has counted the IPv4 traffic so far
    before = bench.status()
    payload = os.urandom(2 << 20)
    sender = threading.Thread(target=server.sendall, args=(payload,))
    sender.start()
    client.settimeout(20)
    assert recv_exactly(client, len(payload)) == payload
    sender.join()
    st = wait_for(lambda: (lambda s: s if s["rx_gro_frames"] > before["rx_gro_frames"] else None)(bench.status()),
                  5, what="IPv6 GSO frames written to the TAP\n" + bench.log())
    assert st["rx_csum_bad"] == 0 and st["rx_gro_refused"] == 0
