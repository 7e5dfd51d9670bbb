"""The AHCI driver (drivers/ahci) under a real rsd in the testbed guest, with the test itself as
its block front end: it creates the shared memory (libdrv.blkshm) and doorbells, attaches over
the service socket (docs/block.md) and puts requests in the submission ring.  Reads and writes
with NCQ at full depth, FLUSH, FUA, TRIM, refused requests, restarts and kill -9 with requests
in flight (re-sent by the test, as the front end does), hostile front ends.  Run by
tests/vm/test_ahci.py, which checks the disk image afterwards; the tests build on each other in
file order (one rsd for the module).
"""

import json
import mmap
import os
import random
import select
import socket
import struct
import subprocess
import time

import pytest

from libdrv import blkshm
from libdrv.wire import FrameReader, encode
from testbed import AHCI_BDF

BASE = "/run/rsdahci"
CONFIG, RUNTIME, STATE = BASE + "/etc", BASE + "/run", BASE + "/state"
CGROUP = "/sys/fs/cgroup/rsdahci"
DEV = "/sys/bus/pci/devices/" + AHCI_BDF
LABEL = "disk0"
FIGURES = "/tmp/ahci-figures.json"
WRITTEN = "/tmp/ahci-written.json"      # what the host checks in the image: [[lba, seed, blocks], ...]
ENV = dict(os.environ, RSD_RUNTIME_DIR=RUNTIME, RSD_STATE_DIR=STATE, RSD_CONFIG_DIR=CONFIG)
SERVICE = """\
program = "drivers.ahci"
class = "blk"
period = 1
backoff = false
init_timeout = 60

[resources]
pci = ["%s"]             # q35 has its own ICH9 AHCI at 00:1f.2: the id matches both
""" % AHCI_BDF
BS = 512
EINVAL, EIO, EOPNOTSUPP = 22, 5, 95
FIGURES_SEEN = {}
WRITES = []


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
    def is_up():
        s = status()
        assert not s or s.get("state") != "failed", "%s failed: %s\n%s" % (LABEL, s, driver_log())
        return s and s.get("state") == "up" and s
    return wait(is_up, LABEL + " up", 120, 0.1)


def replaced(old):
    return wait(lambda: (s := status()) and s["state"] == "up" and s["pid"] != old["pid"] and s,
                LABEL + " replaced", 60, 0.005)


def figure(name, value):
    FIGURES_SEEN[name] = value
    with open(FIGURES, "w") as f:
        json.dump(FIGURES_SEEN, f)


def pattern(seed, blocks):
    return random.Random(seed).randbytes(blocks * BS)


def record_write(lba, seed, blocks):
    WRITES.append([lba, seed, blocks])
    with open(WRITTEN, "w") as f:
        json.dump(WRITES, f)


# -- the test's own front end ------------------------------------------------------------------------

REQ = struct.Struct("<QIIIBBHQ")
CPL = struct.Struct("<Ii")


class FrontEnd:
    """What frontends/blk does, in Python: requests through the rings, replies by tag."""

    def __init__(self, memfd=None):
        self.memfd = blkshm.create(1) if memfd is None else memfd
        self.m = mmap.mmap(self.memfd, blkshm.SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.doorbell = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)   # the driver's
        self.notify = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)     # ours
        self.sock = None
        self.reader = FrameReader()
        self.replies, self.events = {}, []
        self.ids = 0
        self.posted = self.consumed = 0
        self.next_tag = 0

    def u32(self, off, value=None):
        if value is None:
            return struct.unpack_from("<I", self.m, off)[0]
        struct.pack_into("<I", self.m, off, value & 0xFFFFFFFF)

    cq_posted = property(lambda self: self.u32(132))
    sq_taken = property(lambda self: self.u32(128))

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

    def attach(self):
        return self.request("attach", fds=[self.memfd, self.doorbell, self.notify], generation=1)

    def data(self, off, length):
        base = blkshm.DATA_OFF + off
        return self.m[base:base + length]

    def put_data(self, off, payload):
        base = blkshm.DATA_OFF + off
        self.m[base:base + len(payload)] = payload

    def submit(self, op, lba=0, count=0, data_off=0, flags=0, tag=None, ring=True):
        if tag is None:
            tag = self.next_tag
            self.next_tag += 1
        REQ.pack_into(self.m, blkshm.SQ_OFF + (self.posted % blkshm.SLOTS) * REQ.size,
                      lba, count, data_off, tag, op, flags, 0, 0)
        self.posted += 1
        self.u32(64, self.posted)
        if ring:
            os.eventfd_write(self.doorbell, 1)
        return tag

    def ring(self):
        os.eventfd_write(self.doorbell, 1)

    def completions(self, want, timeout=30):
        """{tag: status} until `want` completions came (or the timeout: what came by then)."""
        out = {}
        deadline = time.monotonic() + timeout
        while len(out) < want:
            posted = self.cq_posted
            while self.consumed != posted:
                tag, st = CPL.unpack_from(self.m, blkshm.CQ_OFF + (self.consumed % blkshm.SLOTS) * CPL.size)
                assert tag not in out, "tag %d completed twice" % tag
                out[tag] = st
                self.consumed += 1
            self.u32(68, self.consumed)
            if len(out) >= want:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self.u32(72, 1)     # frontend_idle: ring us
            if self.cq_posted == self.consumed:
                select.select([self.notify], [], [], min(left, 0.2))
            self.u32(72, 0)
            try:
                os.eventfd_read(self.notify)
            except BlockingIOError:
                pass
        return out

    def close(self):
        self.close_socket()
        if not self.m.closed:
            self.m.close()
            for fd in (self.memfd, self.doorbell, self.notify):
                os.close(fd)


def refused_connection(fe, timeout=10):
    fe.sock.settimeout(timeout)
    try:
        while True:
            chunk = fe.sock.recv(65536)
            if not chunk:
                return True
            fe.reader.feed(chunk)
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False


# -- fixtures --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rsd():
    assert not os.path.exists(DEV + "/driver"), "the AHCI must start unbound (docs/testbed.md)"
    sh("modprobe vfio-pci")
    sh("rm -rf %s && mkdir -p %s/services.d %s %s" % (BASE, CONFIG, RUNTIME, STATE))
    for path in (FIGURES, WRITTEN):
        if os.path.exists(path):
            os.unlink(path)
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
    reply = f.attach()
    assert reply["ok"], reply
    f.geometry = reply
    yield f
    f.close()


def write_and_check(fe, requests, flags=0):
    """requests: [(lba, blocks, seed)] written at once (NCQ), then read back and compared."""
    off, placed = 0, []
    for lba, blocks, seed in requests:
        fe.put_data(off, pattern(seed, blocks))
        placed.append((lba, blocks, seed, off))
        off += blocks * BS
    assert off <= blkshm.DATA_SIZE
    tags = {fe.submit(blkshm.OP_WRITE, lba, blocks, o, flags, ring=False): (lba, blocks, seed)
            for lba, blocks, seed, o in placed}
    fe.ring()
    done = fe.completions(len(tags))
    assert done == {t: 0 for t in tags}, done
    for lba, blocks, seed in tags.values():
        record_write(lba, seed, blocks)
    read_tags = {}
    for lba, blocks, seed, o in placed:
        fe.put_data(o, bytes(blocks * BS))
        read_tags[fe.submit(blkshm.OP_READ, lba, blocks, o, ring=False)] = (seed, blocks, o)
    fe.ring()
    done = fe.completions(len(read_tags))
    assert done == {t: 0 for t in read_tags}, done
    for t, (seed, blocks, o) in read_tags.items():
        assert fe.data(o, blocks * BS) == pattern(seed, blocks), "read back differs (tag %d)" % t


# -- tests -------------------------------------------------------------------------------------------------

def test_the_driver_is_up_unprivileged_with_only_its_device(rsd):
    st = status()
    assert st["uid"] != 0 and st["dma_isolated"] is True, st
    assert os.path.basename(os.readlink(DEV + "/driver")) == "vfio-pci"
    maps = open("/proc/%d/maps" % st["pid"]).read()
    assert "/dev/mem" not in maps


def test_attach_replies_the_disks_geometry(fe):
    g = fe.geometry
    image_blocks = int(os.environ["RSD_TEST_DISK_BYTES"]) // BS
    assert g["blocks"] == image_blocks and g["block_size"] == 512, g
    assert g["physical_block_size"] in (512, 4096), g
    assert g["write_cache"] is True and g["queue_depth"] == 32, g
    assert "QEMU" in g["model"] and g["serial"], g
    assert isinstance(g["discard"], bool) and isinstance(g["fua"], bool), g


def test_writes_and_reads_at_full_queue_depth(fe):
    rng = random.Random(1)
    lbas = rng.sample(range(0, fe.geometry["blocks"] - 256, 256), 48)
    t0 = time.monotonic()
    write_and_check(fe, [(lba, 128, 1000 + i) for i, lba in enumerate(lbas)])
    figure("48x64KiB_write_read_ms", round((time.monotonic() - t0) * 1e3, 1))
    st = fe.request("stats")["stats"]
    assert st["writes"] >= 48 and st["reads"] >= 48, st


def test_flush_and_fua(fe):
    write_and_check(fe, [(2048, 8, 1)])
    tag = fe.submit(blkshm.OP_FLUSH)
    assert fe.completions(1) == {tag: 0}
    if fe.geometry["fua"]:
        write_and_check(fe, [(4096, 16, 2)], flags=blkshm.F_FUA)
    else:
        fe.put_data(0, pattern(2, 16))
        tag = fe.submit(blkshm.OP_WRITE, 4096, 16, 0, blkshm.F_FUA)
        assert fe.completions(1) == {tag: -EOPNOTSUPP}
    # A flush in the middle of writes: the writes before it are complete when it completes.
    fe.put_data(0, pattern(3, 8))
    fe.put_data(8 * BS, pattern(4, 8))
    w1 = fe.submit(blkshm.OP_WRITE, 6000, 8, 0, ring=False)
    fl = fe.submit(blkshm.OP_FLUSH, ring=False)
    w2 = fe.submit(blkshm.OP_WRITE, 6008, 8, 8 * BS, ring=False)
    fe.ring()
    order = []
    done = {}
    while len(done) < 3:
        got = fe.completions(1)
        assert got, "no completion"
        order += list(got)
        done.update(got)
    assert done == {w1: 0, fl: 0, w2: 0}, done
    assert order.index(w1) < order.index(fl) < order.index(w2), order
    record_write(6000, 3, 8)
    record_write(6008, 4, 8)
    tag = fe.submit(blkshm.OP_FLUSH)
    assert fe.completions(1) == {tag: 0}


def test_trim(fe):
    tag = fe.submit(blkshm.OP_DISCARD, 100000, 2048)
    want = 0 if fe.geometry["discard"] else -EOPNOTSUPP
    assert fe.completions(1) == {tag: want}


def test_bad_requests_are_refused_and_the_driver_carries_on(fe):
    blocks = fe.geometry["blocks"]
    bad = [
        (blkshm.OP_READ, blocks - 4, 8, 0, 0),              # past the end
        (blkshm.OP_WRITE, blocks, 1, 0, 0),                 # at the end
        (blkshm.OP_READ, (1 << 64) - 1, 2, 0, 0),           # wraps around
        (blkshm.OP_READ, 0, 0, 0, 0),                       # nothing
        (blkshm.OP_READ, 0, 4096, 0, 0),                    # more than IO_MAX
        (blkshm.OP_READ, 0, 8, 100, 0),                     # data not aligned
        (blkshm.OP_READ, 0, 8, blkshm.DATA_SIZE - 2048, 0),  # data past the area
        (blkshm.OP_READ, 0, 8, 0, blkshm.F_FUA),            # FUA on a read
        (99, 0, 8, 0, 0),                                   # no such op
        (blkshm.OP_FLUSH, 5, 0, 0, 0),                      # a flush with an LBA
    ]
    tags = [fe.submit(op, lba, count, off, flags, ring=False) for op, lba, count, off, flags in bad]
    fe.ring()
    assert fe.completions(len(tags)) == {t: -EINVAL for t in tags}
    write_and_check(fe, [(8192, 8, 5)])
    assert fe.request("stats")["stats"]["refused"] >= len(bad)


def test_a_media_error_fails_one_request_and_the_rest_complete(fe):
    pid = status()["pid"]
    rsctl("fi", LABEL, "--media-error")
    time.sleep(0.3)
    seeds = {}
    off = 0
    for i in range(24):
        lba = 40000 + 16 * i
        fe.put_data(off, pattern(7000 + i, 16))
        seeds[fe.submit(blkshm.OP_WRITE, lba, 16, off, ring=False)] = (lba, 7000 + i, off)
        off += 16 * BS
    fe.ring()
    done = fe.completions(len(seeds))
    failed = [t for t, st in done.items() if st]
    assert len(done) == len(seeds) and len(failed) == 1 and done[failed[0]] == -EIO, done
    assert min(seeds) == failed[0], (failed, min(seeds))     # the first one taken was poisoned
    for t, (lba, seed, o) in seeds.items():
        if t in failed:
            continue
        record_write(lba, seed, 16)
        tag = fe.submit(blkshm.OP_READ, lba, 16, o)
        got = fe.completions(1)
        if got != {tag: 0}:
            open("/tmp/ahci-debug.txt", "w").write(driver_log())
        assert got == {tag: 0}, got
        assert fe.data(o, 16 * BS) == pattern(seed, 16)
    st = fe.request("stats")["stats"]
    assert st["port_errors"] >= 1 and st["failed"] >= 1, st
    assert status()["pid"] == pid
    assert "port 0 error" in driver_log()


def _restart_with_requests_in_flight(fe, kill, seed_base):
    """Writes in flight when the driver goes; the next incarnation gets what was not completed
    (a fresh memfd, as the front end does) and everything reads back."""
    old = status()
    reqs = [(20000 + 64 * i, 64, seed_base + i) for i in range(40)]
    after = [(30000 + 64 * i, 64, seed_base + 100 + i) for i in range(20)]
    placed = {}
    off = 0
    for lba, blocks, seed in reqs:
        fe.put_data(off, pattern(seed, blocks))
        placed[fe.submit(blkshm.OP_WRITE, lba, blocks, off, ring=False)] = (lba, blocks, seed)
        off += blocks * BS
    fe.ring()
    t_kill = time.monotonic()
    kill(old)
    for lba, blocks, seed in after:       # submitted to a driver that is going or gone
        fe.put_data(off, pattern(seed, blocks))
        placed[fe.submit(blkshm.OP_WRITE, lba, blocks, off, ring=False)] = (lba, blocks, seed)
        off += blocks * BS
    fe.ring()
    done = fe.completions(len(placed), timeout=0.05)
    assert all(st == 0 for st in done.values()), done
    new = FrontEnd()
    new.next_tag = fe.next_tag
    fe.close()

    def attached():
        # The socket stays (rsd holds it): what answers is the next incarnation; an attach to
        # the one going away ends with its connection.
        try:
            r = new.connect().attach()
        except (ConnectionError, OSError):
            return None
        return r if r["ok"] else None
    reply = wait(attached, "attach to the new incarnation", 60, 0.005)
    t_attached = time.monotonic()
    left = {t: v for t, v in placed.items() if t not in done}
    off = 0
    for tag, (lba, blocks, seed) in left.items():
        new.put_data(off, pattern(seed, blocks))
        new.submit(blkshm.OP_WRITE, lba, blocks, off, tag=tag, ring=False)
        off += blocks * BS
    new.ring()
    again = new.completions(len(left))
    t_done = time.monotonic()
    assert again == {t: 0 for t in left}, again
    st = replaced(old)
    for lba, blocks, seed in placed.values():
        record_write(lba, seed, blocks)
    for lba, blocks, seed in placed.values():
        tag = new.submit(blkshm.OP_READ, lba, blocks, 0)
        assert new.completions(1) == {tag: 0}
        assert new.data(0, blocks * BS) == pattern(seed, blocks), "lba %d differs after the restart" % lba
    new.geometry = reply
    assert len(left) >= len(after), (len(done), len(left))
    log = sh("cat %s/rsd.log" % BASE).stdout
    phases = [line.split(" after its predecessor")[0].split(")")[-1] + line.split("ended")[-1]
              for line in log.splitlines() if "after its predecessor" in line and LABEL in line]
    inits = [line.split("ahci: ")[-1] for line in driver_log().splitlines() if "ahci: restarted after" in line]
    return new, st, {"rsd": phases[-1:], "driver": inits[-1:],"completed_before": len(done), "resent": len(left),
                     "kill_to_attached_ms": round((t_attached - t_kill) * 1e3, 1),
                     "kill_to_all_done_ms": round((t_done - t_kill) * 1e3, 1)}


def test_rsctl_restart_with_requests_in_flight(fe, request):
    new, st, times = _restart_with_requests_in_flight(fe, lambda old: rsctl("restart", LABEL), 5000)
    request.node.fe = new
    figure("rsctl_restart", times)
    assert "restarted after" in driver_log()
    globals()["_FE"] = new


def test_kill_9_with_requests_in_flight():
    fe = globals()["_FE"]
    new, st, times = _restart_with_requests_in_flight(fe, lambda old: os.kill(old["pid"], 9), 6000)
    figure("kill_9", times)
    assert st["last_failure"]["reason"] != "no-heartbeat", st
    globals()["_FE"] = new


def test_hostile_front_ends_are_refused_and_the_driver_carries_on():
    fe = globals()["_FE"]
    pid = status()["pid"]
    fe.close_socket()
    time.sleep(0.2)
    # memory that is not sealed
    loose = os.memfd_create("loose", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(loose, blkshm.SIZE)
    h = FrontEnd(memfd=loose).connect()
    r = h.attach()
    assert not r["ok"] and r["err"] == "EINVAL" and "seal" in r["msg"], r
    assert refused_connection(h)
    h.close()
    # doorbells that are not eventfds
    h = FrontEnd().connect()
    r = h.request("attach", fds=[h.memfd, h.memfd, h.notify])
    assert not r["ok"] and "eventfd" in r["msg"], r
    h.close()
    # sq_posted far past sq_taken
    h = FrontEnd().connect()
    assert h.attach()["ok"]
    h.u32(64, 1000)
    h.ring()
    assert refused_connection(h)
    h.close()
    # cq_consumed past cq_posted
    h = FrontEnd().connect()
    assert h.attach()["ok"]
    h.u32(68, 7)
    h.put_data(0, bytes(512))
    h.submit(blkshm.OP_READ, 0, 1, 0)
    assert refused_connection(h)
    h.close()
    # more requests than slots outstanding: never consuming completions
    h = FrontEnd().connect()
    assert h.attach()["ok"]
    for i in range(blkshm.SLOTS):
        h.submit(blkshm.OP_READ, i, 1, 0, ring=False)
    h.ring()
    time.sleep(0.5)
    for i in range(8):
        h.submit(blkshm.OP_READ, i, 1, 0, ring=False)
    h.ring()
    assert refused_connection(h)
    h.close()
    # a malformed frame
    h = FrontEnd().connect()
    h.sock.sendall(b"\xff\xff\xff\x7f" + bytes(16))
    assert refused_connection(h)
    h.close()
    # ... and the driver is the same process, and serves a good front end
    assert status()["pid"] == pid
    fds = os.listdir("/proc/%d/fd" % pid)
    assert len(fds) < 24, fds
    # memory used before: its counters are not 0
    r = fe.connect().attach()
    assert not r["ok"] and "fresh shared memory" in r["msg"], r
    fe.close()
    fe = FrontEnd().connect()
    assert fe.attach()["ok"]
    write_and_check(fe, [(30000, 8, 7)])
    tag = fe.submit(blkshm.OP_FLUSH)
    assert fe.completions(1) == {tag: 0}
    assert fe.request("stats")["stats"]["refused_front_ends"] >= 3
    fe.close()


def test_down_gives_the_hba_back():
    rsctl("down", LABEL)
    wait(lambda: not os.path.exists(DEV + "/driver"), "the HBA unbound from vfio-pci", 30)
