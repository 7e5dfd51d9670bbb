"""The disk under rsd in the testbed: the AHCI driver (service disk0, VFIO) and the block
front end (service disk0-blk, an NBD device) carry a file system, and it carries on, with
every byte, while the driver crashes, is killed, hangs, and while the front end is killed;
what was flushed is in the raw image even while no driver runs; NCQ keeps the device's queue
full under load.

One guest for the module (its own: it loads nbd and binds the HBA); the tests run in file
order and leave the stack up for the next one.
"""

import json
import os
import random
import re
import time

import pytest

from testbed import REPO_ROOT, Testbed
from testbed.blockstack import LINK, BlockStack

PYTHON = os.path.join(REPO_ROOT, ".venv", "bin", "python")
FS_LOAD = os.path.join(REPO_ROOT, "tests", "guest", "fs_load.py")
DISK_MB = 256
MNT = "/mnt/rsdblock"
MIB = 1 << 20
ASK_STATS = ("import sys; from libdrv.drvlink import DriverLink; "
             "print(__import__('json').dumps(DriverLink(sys.argv[1]).call('stats')['stats']))")


@pytest.fixture(scope="module")
def disk():
    tb = Testbed(disk_size_mb=DISK_MB)
    try:
        tb.start()
        tb.wait_ready()
        stack = BlockStack(tb).start()
    except BaseException:
        tb.close()
        raise
    try:
        yield stack
    finally:
        try:
            stack.sh("umount %s; true" % MNT)
            stack.stop()
        finally:
            tb.close()


def pattern(seed, nbytes):
    return random.Random(seed).randbytes(nbytes)


def image_bytes(disk, offset, length):
    with open(disk.testbed.disk_image, "rb") as f:
        f.seek(offset)
        return f.read(length)


def put_pattern(disk, seed, nbytes, path):
    disk.testbed.write_file(path, pattern(seed, nbytes))


def driver_stats(disk):
    r = disk.sh("%s -c \"%s\" %s/svc/disk0.sock" % (PYTHON, ASK_STATS, LINK.rsplit("/blk/", 1)[0]))
    r.check()
    return json.loads(r.stdout)


def kill_driver(disk):
    old = disk.status("disk0")
    disk.sh("kill -9 %d" % old["pid"]).check()
    return old


def wait_result(disk, out, timeout=300):
    deadline = time.monotonic() + timeout
    while disk.sh("test -e %s" % out).rc != 0:
        assert time.monotonic() < deadline, "no result in %s within %d s:\n%s" % (out, timeout, disk.logs())
        time.sleep(0.5)
    return json.loads(disk.sh("cat %s" % out).check().stdout)


def test_the_disk_is_an_nbd_device_with_the_disks_geometry(disk):
    dev = disk.device()
    assert re.fullmatch(r"/dev/nbd\d+", dev), dev
    assert int(disk.sh("blockdev --getsize64 %s" % dev).check().stdout) == DISK_MB * MIB
    assert int(disk.sh("blockdev --getss %s" % dev).check().stdout) == 512
    drv, fe = disk.status("disk0"), disk.status("disk0-blk")
    assert drv["uid"] != 0 and fe["uid"] != 0 and drv["dma_isolated"] is True, (drv, fe)
    name = os.path.basename(dev)
    assert int(disk.sh("cat /sys/block/%s/queue/discard_max_bytes" % name).check().stdout) > 0
    assert "write back" in disk.sh("cat /sys/block/%s/queue/write_cache" % name).check().stdout


def test_direct_io_reaches_the_raw_image(disk):
    dev = disk.device()
    put_pattern(disk, 11, 4 * MIB, "/tmp/p11")
    disk.sh("dd if=/tmp/p11 of=%s bs=1M seek=1 oflag=direct conv=fsync status=none" % dev).check()
    disk.sh("dd if=%s of=/tmp/r11 bs=1M skip=1 count=4 iflag=direct status=none && cmp /tmp/p11 /tmp/r11"
            % dev).check()
    assert image_bytes(disk, MIB, 4 * MIB) == pattern(11, 4 * MIB)


def test_flushed_data_is_in_the_image_while_the_driver_is_dead(disk):
    dev = disk.device()
    put_pattern(disk, 12, 2 * MIB, "/tmp/p12")
    disk.sh("dd if=/tmp/p12 of=%s bs=1M seek=8 oflag=direct conv=fsync status=none" % dev).check()
    old = kill_driver(disk)
    # conv=fsync returned after the FLUSH completed: the data is on the (emulated) medium now,
    # before any new incarnation runs.
    assert image_bytes(disk, 8 * MIB, 2 * MIB) == pattern(12, 2 * MIB)
    disk.wait_up("disk0", old["generation"])
    disk.sh("dd if=%s of=/tmp/r12 bs=1M skip=8 count=2 iflag=direct status=none && cmp /tmp/p12 /tmp/r12"
            % dev).check()


def test_a_file_system_carries_on_across_driver_crashes(disk):
    dev = disk.device()
    disk.sh("mkfs.ext4 -q -F %s && mkdir -p %s && mount %s %s && mkdir -p %s/data"
            % (dev, MNT, dev, MNT, MNT), timeout=120).check()
    out = "/tmp/fs-write.json"
    disk.sh("rm -f %s; setsid %s %s write %s/data 160 256 7 %s > /tmp/fs-write.log 2>&1 < /dev/null &"
            % (out, PYTHON, FS_LOAD, MNT, out)).check()
    time.sleep(3)
    crashes = 0
    for how in ("kill", "crash", "hang", "kill"):
        old = disk.status("disk0")
        if how == "kill":
            kill_driver(disk)
        else:
            disk.rsctl("fi", "disk0", "--" + how).check()
        disk.wait_up("disk0", old["generation"], timeout=60)
        crashes += 1
        time.sleep(1.5)
    result = wait_result(disk, out)
    assert result["errors"] == [], result
    assert disk.status("disk0")["restarts_total"] >= crashes
    # read back from the disk, not the page cache
    disk.sh("sync && echo 3 > /proc/sys/vm/drop_caches").check()
    check = "/tmp/fs-check.json"
    disk.sh("rm -f %s; %s %s check %s/data 160 256 7 %s" % (check, PYTHON, FS_LOAD, MNT, check),
            timeout=300).check()
    result = wait_result(disk, check)
    assert result == dict(result, errors=[], bad=[]), result
    disk.sh("umount %s" % MNT).check()
    fsck = disk.sh("e2fsck -fn %s" % dev, timeout=120)
    assert fsck.rc == 0, fsck.stdout + fsck.stderr
    st = disk.frontend_status()
    assert st["driver_deaths"] >= crashes and st["failed"] == 0, st


def test_ncq_keeps_the_queue_full_under_load(disk):
    dev = disk.device()
    r = disk.sh("fio --name=q32 --filename=%s --direct=1 --rw=randread --bs=4k --iodepth=32 "
                "--ioengine=libaio --runtime=4 --time_based --output-format=json" % dev, timeout=120)
    r.check()
    job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
    assert job["error"] == 0 and job["read"]["io_bytes"] > 0, job
    stats = driver_stats(disk)
    assert stats["max_issued"] >= 8, stats


def test_the_front_end_killed_under_load_fails_no_io(disk):
    dev = disk.device()
    out = "/tmp/fe-kill.json"
    r = disk.sh("rm -f %s; setsid fio --name=w --filename=%s --direct=1 --rw=randwrite --bs=64k --iodepth=8 "
                "--ioengine=libaio --size=64M --offset=128M --verify=crc32c --runtime=12 --time_based "
                "--output-format=json --output=%s > /dev/null 2>&1 < /dev/null &" % (out, dev, out))
    r.check()
    time.sleep(3)
    old = disk.status("disk0-blk")
    disk.sh("kill -9 %d" % old["pid"]).check()
    disk.wait_up("disk0-blk", old["generation"], timeout=60)
    deadline = time.monotonic() + 120
    while True:
        text = disk.sh("cat %s 2>/dev/null" % out).stdout
        if '"jobs"' in text and text.rstrip().endswith("}"):
            break
        assert time.monotonic() < deadline, disk.logs()
        time.sleep(1)
    job = json.loads(text[text.index("{"):])["jobs"][0]
    assert job["error"] == 0 and job["write"]["io_bytes"] > 0, job
    assert "nbd" not in disk.sh("dmesg | grep -i 'I/O error' | tail -3").stdout, disk.sh("dmesg | tail -20").stdout
