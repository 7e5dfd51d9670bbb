"""The block front end under rsd in the testbed: a real NBD device (/dev/nbdN, connected by
rsd) served by frontends.blk, with the file-backed test disk driver (tests/guest/
file_blk_driver.py) behind it; I/O survives the driver crashing, being killed and hanging,
and the front end itself being killed; hostile drivers are refused; the retry limit fails one
request only.

One guest for the module; the tests run in file order and leave the stack up for the next one.
"""

import hashlib
import json
import os
import random
import time

import pytest

from testbed import REPO_ROOT, CommandTimeout, Testbed
from testbed.stack import VENV_BIN, GuestStack, unit_capabilities

BASE = "/run/rsdblk"
RUNTIME = BASE + "/run"
STATE = BASE + "/state"
CONFIG = BASE + "/etc"
DISK = BASE + "/disk.img"
BEHAVIOUR = BASE + "/behaviour"
LINK = RUNTIME + "/blk/disk0"
GROUP = "rsdblk"
DISK_MB = 64
PYTHON = os.path.join(REPO_ROOT, ".venv", "bin", "python")
DRIVER = os.path.join(REPO_ROOT, "tests", "guest", "file_blk_driver.py")

DRIVER_TOML = """\
program = "{driver}"
args = ["--file", "{disk}", "--behaviour-file", "{behaviour}"]
class = "blk"
group = "{group}"
period = 1
backoff = false
init_timeout = 60
"""

FRONTEND_TOML = """\
program = "frontends.blk"
args = ["--label", "disk0"]
class = "server"
group = "{group}"
period = 2
backoff = false
init_timeout = 60
depends_on = ["disk0"]

[resources]
nbd = "disk0"
"""

# Direct I/O in the guest: for at least SECONDS, writes a seeded pattern over a region in 64 KiB
# blocks and reads it back; counts every failed system call and every block that reads back wrong.
IO_SCRIPT = r'''
import json, mmap, os, random, sys, time
dev, start_mb, size_mb, seed, seconds, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), sys.argv[6]
BS = 65536
fd = os.open(dev, os.O_RDWR | os.O_DIRECT)
buf = mmap.mmap(-1, BS)
print("started", flush=True)
errors, bad, n = [], 0, size_mb * 1024 * 1024 // BS
t0 = time.monotonic()
slowest = 0.0
p = 0
while p == 0 or time.monotonic() - t0 < seconds:
    p += 1
    rnd = random.Random(seed + p)
    blocks = [rnd.randbytes(BS) for _ in range(n)]
    for i, b in enumerate(blocks):
        buf[:] = b
        try:
            t = time.monotonic()
            os.pwritev(fd, [buf], start_mb * 1048576 + i * BS)
            slowest = max(slowest, time.monotonic() - t)
        except OSError as e:
            errors.append("write %d: %s" % (i, e))
    t = time.monotonic()
    os.fsync(fd)
    slowest = max(slowest, time.monotonic() - t)
    for i, b in enumerate(blocks):
        try:
            t = time.monotonic()
            os.preadv(fd, [buf], start_mb * 1048576 + i * BS)
            slowest = max(slowest, time.monotonic() - t)
            if buf[:] != b:
                bad += 1
        except OSError as e:
            errors.append("read %d: %s" % (i, e))
os.close(fd)
open(out + ".part", "w").write(json.dumps({"errors": errors, "bad": bad, "seconds": time.monotonic() - t0, "passes": p, "t0": t0, "t1": time.monotonic(),
                                      "slowest": slowest}))
os.rename(out + ".part", out)
'''


class BlkStack(GuestStack):
    def __init__(self, testbed):
        super().__init__(testbed)
        # exactly rsd.service's bounding set (it has CAP_SYS_ADMIN, which NBD's netlink commands need)
        self.rsd_prefix = "setpriv --bounding-set=-all,%s -- " % ",".join(
            "+" + c for c in unit_capabilities())
        self.env = {"RSD_RUNTIME_DIR": RUNTIME, "RSD_STATE_DIR": STATE, "RSD_CONFIG_DIR": CONFIG,
                    "PATH": VENV_BIN + ":/usr/sbin:/usr/bin:/sbin:/bin"}

    def sh(self, line, timeout=60):
        try:
            return super().sh(line, timeout=timeout)
        except CommandTimeout as exc:
            raise AssertionError("%s\n%s" % (exc, super().sh("cat %s/log/disk0-blk.log | tail -n 40; tail -n 30 "
                                                         "%s/rsd.log; dmesg | tail -n 30" % (STATE, BASE)).stdout))

    def logs(self):
        return super().sh("tail -n 40 %s/*.log %s/log/*.log 2>&1; dmesg | tail -n 20" % (BASE, STATE)).stdout

    def frontend_status(self):
        r = self.rsctl("ds", "get", "blk.disk0.status", "--json")
        r.check()
        return json.loads(json.loads(r.stdout)["value"])

    def start(self, timeout=180):
        self.sh("modprobe nbd").check()
        self.sh("getent group %s >/dev/null || groupadd -r %s" % (GROUP, GROUP)).check()
        self.sh("rm -rf %s && mkdir -p %s/services.d %s %s" % (BASE, CONFIG, RUNTIME, STATE)).check()
        self.sh("truncate -s %dM %s && chmod 0666 %s && echo none > %s && chmod 0644 %s"
                % (DISK_MB, DISK, DISK, BEHAVIOUR, BEHAVIOUR)).check()
        tb = self.testbed
        tb.write_file(CONFIG + "/services.d/disk0.toml", DRIVER_TOML.format(
            driver=DRIVER, disk=DISK, behaviour=BEHAVIOUR, group=GROUP).encode())
        tb.write_file(CONFIG + "/services.d/disk0-blk.toml", FRONTEND_TOML.format(group=GROUP).encode())
        tb.write_file("/tmp/blkio.py", IO_SCRIPT.encode())
        self.sh("setsid datastore > %s/datastore.log 2>&1 < /dev/null &" % BASE).check()
        self.wait_for("[ -S %s/ds.sock ]" % RUNTIME, "datastore to listen")
        self.sh("setsid %srsd > %s/rsd.log 2>&1 < /dev/null &" % (self.rsd_prefix, BASE)).check()
        self.wait_for("[ -S %s/rsd.sock ]" % RUNTIME, "rsd to listen")
        self.wait_up_state(timeout)
        return self

    def wait_up_state(self, timeout=90):
        deadline = time.monotonic() + timeout
        while True:
            try:
                if (self.status("disk0")["state"] == "up" and self.status("disk0-blk")["state"] == "up"
                        and self.frontend_status().get("state") == "up"):
                    return
            except (AssertionError, ValueError, KeyError, RuntimeError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the block stack did not come up within %d s:\n%s" % (timeout, self.logs()))
            time.sleep(0.5)

    def stop(self):
        self.sh("rsctl shutdown; sleep 1; pkill -x datastore", timeout=60)

    def io_start(self, start_mb, size_mb, seed, seconds, out):
        self.sh("rm -f %s; setsid %s /tmp/blkio.py %s %d %d %d %s %s > %s.log 2>&1 < /dev/null &"
                % (out, PYTHON, LINK, start_mb, size_mb, seed, seconds, out, out)).check()
        self.wait_for("grep -q started %s.log" % out, "the I/O to start")

    def still_running(self, out):
        assert self.sh("[ ! -e %s ]" % out).rc == 0, "the I/O ended too soon to overlap the fault: lengthen it"

    def io_result(self, out, timeout=150):
        self.wait_for("[ -e %s ]" % out, "the I/O in %s to finish (%s)" % (out, self.sh("cat %s.log" % out).stdout),
                      timeout)
        return json.loads(self.testbed.read_file(out))

    def spans_an_attach(self, res):
        """The I/O started before the fault and was still running when the replacement attached."""
        lines = [l for l in self.sh("cat %s/log/disk0.log" % STATE).stdout.splitlines() if "at monotonic" in l]
        attached = float(lines[-1].split()[-1])
        assert res["t0"] < attached < res["t1"], ("the I/O (%.2f..%.2f) did not span the attach at %.2f: "
                                                  "lengthen it" % (res["t0"], res["t1"], attached))

    def behaviour(self, text):
        self.sh("echo %s > %s" % (text, BEHAVIOUR)).check()


@pytest.fixture(scope="module")
def blk():
    tb = Testbed(disk_size_mb=8)
    try:
        tb.start()
        tb.wait_ready()
        stack = BlkStack(tb).start()
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


def sha(data):
    return hashlib.sha256(data).hexdigest()


def test_the_device_is_connected_by_rsd_and_served_unprivileged(blk):
    target = blk.sh("readlink %s" % LINK).stdout.strip()
    assert target.startswith("/dev/nbd"), target
    st = blk.frontend_status()
    assert st["device"] == LINK and st["geometry"]["blocks"] == DISK_MB * 2048, st
    size = int(blk.sh("blockdev --getsize64 %s" % LINK).stdout)
    assert size == DISK_MB << 20
    pid = blk.status("disk0-blk")["pid"]
    uids = blk.sh("grep ^Uid: /proc/%d/status" % pid).stdout.split()[1:]
    assert "0" not in uids, uids


def test_written_data_reaches_the_backing_file_and_reads_back(blk):
    data = random.Random(1).randbytes(3 << 20)
    blk.testbed.write_file("/tmp/pattern", data)
    blk.sh("dd if=/tmp/pattern of=%s bs=1M seek=5 oflag=direct conv=fsync status=none" % LINK).check()
    got = blk.sh("dd if=%s bs=1M skip=5 count=3 status=none | sha256sum" % DISK).stdout.split()[0]
    assert got == sha(data), blk.logs()
    back = blk.sh("dd if=%s bs=1M skip=5 count=3 iflag=direct status=none | sha256sum" % LINK).stdout.split()[0]
    assert back == sha(data)
    # small, unaligned-to-the-request sizes: 512-byte writes straight through
    blk.sh("dd if=/tmp/pattern of=%s bs=512 count=7 seek=3 oflag=direct status=none" % LINK).check()
    got = blk.sh("dd if=%s bs=512 skip=3 count=7 status=none | sha256sum" % DISK).stdout.split()[0]
    assert got == sha(data[:7 * 512])


def test_ext4_mkfs_mount_files_fsck(blk):
    r = blk.sh("mkfs.ext4 -q -F %s && mkdir -p /mnt/blk && mount %s /mnt/blk && "
               "dd if=/tmp/pattern of=/mnt/blk/a bs=1M status=none && cp /mnt/blk/a /mnt/blk/b && sync && "
               "sha256sum /mnt/blk/a /mnt/blk/b && umount /mnt/blk && fsck.ext4 -fn %s" % (LINK, LINK, LINK),
               timeout=180)
    assert r.rc == 0, r.stdout + r.stderr + blk.logs()
    sums = {line.split()[0] for line in r.stdout.splitlines() if "/mnt/blk/" in line}
    assert len(sums) == 1, r.stdout


@pytest.mark.parametrize("fault", ["kill", "crash", "hang"])
def test_io_survives_the_driver_failing(blk, fault):
    before = blk.frontend_status()
    st = blk.status("disk0")
    gen = st["generation"]
    out = "/tmp/io-%s" % fault
    # rsctl fi starts a Python client in the guest (~1-3 s under load) before the fault
    blk.io_start(20, 2, 100 + len(fault), 8 if fault == "kill" else 12, out)
    time.sleep(0.5)
    blk.still_running(out)
    if fault == "kill":
        blk.sh("kill -9 %d" % st["pid"]).check()
    else:
        blk.rsctl("fi", "disk0", "--" + fault).check()
    blk.wait_up("disk0", gen, timeout=60)
    res = blk.io_result(out)
    blk.spans_an_attach(res)
    assert res["errors"] == [] and res["bad"] == 0, (res, blk.logs())
    print("driver %s: the slowest 64 KiB direct I/O took %.2f s" % (fault, res["slowest"]))
    after = blk.frontend_status()
    assert after["driver_deaths"] > before["driver_deaths"], after
    assert after["failed"] == before["failed"], after


def test_a_flush_acknowledged_before_a_crash_survives(blk):
    data = random.Random(7).randbytes(1 << 20)
    blk.testbed.write_file("/tmp/flushed", data)
    gen = blk.status("disk0")["generation"]
    blk.sh("dd if=/tmp/flushed of=%s bs=1M seek=30 conv=fsync status=none" % LINK).check()
    blk.rsctl("fi", "disk0", "--crash").check()
    blk.wait_up("disk0", gen, timeout=60)
    got = blk.sh("dd if=%s bs=1M skip=30 count=1 status=none | sha256sum" % DISK).stdout.split()[0]
    assert got == sha(data)
    back = blk.sh("dd if=%s bs=1M skip=30 count=1 iflag=direct status=none | sha256sum" % LINK).stdout.split()[0]
    assert back == sha(data)


def test_io_survives_the_front_end_killed(blk):
    st = blk.status("disk0-blk")
    gen = st["generation"]
    out = "/tmp/io-fe"
    blk.io_start(40, 2, 300, 8, out)
    time.sleep(0.5)
    blk.still_running(out)
    blk.sh("kill -9 %d" % st["pid"]).check()
    blk.wait_up("disk0-blk", gen, timeout=60)
    res = blk.io_result(out)
    blk.spans_an_attach(res)
    assert res["errors"] == [] and res["bad"] == 0, (res, blk.logs())
    print("front end killed: the slowest 64 KiB direct I/O took %.2f s" % res["slowest"])
    assert "reconfigured" in blk.sh("grep -h 'nbd' %s/rsd.log" % BASE).stdout, blk.logs()


HOSTILE = ("unknown-tag", "twice", "bad-status", "jump", "garbage")


def test_each_hostile_driver_is_refused_and_io_carries_on(blk):
    """Each behaviour in its own generation (the restart that starts the next one also ends the
    refused one); I/O started under each completes intact once a sane driver is back."""
    outs, faults = [], {}
    refusals = blk.frontend_status()["refusals"]
    gen = blk.status("disk0")["generation"]
    for i, behaviour in enumerate(HOSTILE):
        blk.behaviour(behaviour)
        blk.rsctl("restart", "disk0").check()
        gen = blk.wait_up("disk0", gen, timeout=60)["generation"]
        out = "/tmp/io-" + behaviour
        blk.io_start(48 + i, 1, 500 + i, 0, out)
        outs.append(out)
        deadline = time.monotonic() + 60
        while True:
            st = blk.frontend_status()
            if st["refusals"] > refusals:
                refusals = st["refusals"]
                break
            assert time.monotonic() < deadline, "%s: not refused: %s\n%s" % (behaviour, st, blk.logs())
            time.sleep(0.3)
        assert st["state"] == "refused" and st["last_fault"], st
        faults[behaviour] = st["last_fault"]
    print("refusals:", json.dumps(faults, indent=1))
    assert "not outstanding" in faults["unknown-tag"] and "not outstanding" in faults["twice"], faults
    assert "status -4242" in faults["bad-status"] and "cq_posted" in faults["jump"], faults
    blk.behaviour("none")
    blk.rsctl("restart", "disk0").check()
    blk.wait_up("disk0", gen, timeout=60)
    for out in outs:
        res = blk.io_result(out)
        assert res["errors"] == [] and res["bad"] == 0, (out, res, blk.logs())
    assert blk.frontend_status()["state"] == "up"


def test_the_retry_limit_fails_one_request_only(blk):
    poison_lba = (52 << 20) // 512
    before = blk.frontend_status()
    blk.behaviour("poison:%d" % poison_lba)
    gen = blk.status("disk0")["generation"]
    blk.rsctl("restart", "disk0").check()
    blk.wait_up("disk0", gen, timeout=60)
    r = blk.sh("dd if=%s of=/dev/null bs=4096 count=1 skip=%d iflag=direct" % (LINK, (52 << 20) // 4096),
               timeout=120)
    assert r.rc != 0 and "Input/output error" in r.stderr, r.stdout + r.stderr + blk.logs()
    blk.behaviour("none")
    gen = blk.status("disk0")["generation"]
    blk.rsctl("restart", "disk0").check()
    blk.wait_up("disk0", gen, timeout=60)
    st = blk.frontend_status()
    assert st["retry_failed"] == before["retry_failed"] + 1, st
    assert st["failed"] == before["failed"] + 1, st
    back = blk.sh("dd if=%s bs=1M skip=30 count=1 iflag=direct status=none | sha256sum" % LINK)
    assert back.rc == 0, back.stderr


def test_rsd_disconnects_the_device_when_the_front_end_goes(blk):
    index = int(blk.sh("readlink %s" % LINK).stdout.strip()[len("/dev/nbd"):])
    assert blk.rsctl("down", "disk0-blk").rc == 0
    blk.wait_for("[ ! -e %s ] && [ ! -e %s/nbd/disk0.json ]" % (LINK, RUNTIME), "the link and record removed", 30)
    blk.wait_for("[ \"$(cat /sys/block/nbd%d/size)\" = 0 ]" % index, "nbd%d disconnected" % index, 30)
