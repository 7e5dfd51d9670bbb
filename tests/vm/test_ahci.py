"""The AHCI driver in the testbed guest: rsd runs drivers/ahci as an unprivileged service on the
VFIO ICH9 AHCI, the test plays its block front end through the shared memory (docs/block.md):
reads and writes with NCQ, FLUSH ordering, FUA, TRIM, refused requests, restarts and kill -9
with requests in flight, hostile front ends.  Afterwards every block the guest test wrote is
checked in the raw disk image on the host.

One pytest process in the session guest (tests/guest/test_ahci_guest.py).
"""

import json
import os
import random
import re

GUEST_TESTS = "tests/guest/test_ahci_guest.py"
BAD_LOG = re.compile(r"BUG:|WARNING:|Oops|Call Trace|general protection|kernel BUG|DMAR")
EXPECTED = (
    "test_the_driver_is_up_unprivileged_with_only_its_device",
    "test_attach_replies_the_disks_geometry",
    "test_writes_and_reads_at_full_queue_depth",
    "test_flush_and_fua",
    "test_trim",
    "test_bad_requests_are_refused_and_the_driver_carries_on",
    "test_a_media_error_fails_one_request_and_the_rest_complete",
    "test_rsctl_restart_with_requests_in_flight",
    "test_kill_9_with_requests_in_flight",
    "test_hostile_front_ends_are_refused_and_the_driver_carries_on",
    "test_down_gives_the_hba_back",
)
BS = 512


def test_ahci_driver_in_the_guest(testbed):
    before = len(testbed.run(["dmesg"], timeout=30).check().stdout.splitlines())
    size = os.path.getsize(testbed.disk_image)
    result = testbed.run_pytest([GUEST_TESTS, "-x"], timeout=900, env={"RSD_TEST_DISK_BYTES": str(size)})
    print(testbed.run(["sh", "-c", "cat /tmp/ahci-debug.txt; true"]).stdout)
    outcomes = result.assert_passed(GUEST_TESTS + "::")
    ran = {nodeid.split("::")[-1] for nodeid in outcomes}
    assert set(EXPECTED) <= ran, sorted(set(EXPECTED) - ran)
    figures = json.loads(testbed.run(["cat", "/tmp/ahci-figures.json"], timeout=30).check().stdout)
    print("ahci figures:", json.dumps(figures, sort_keys=True))
    written = json.loads(testbed.run(["cat", "/tmp/ahci-written.json"], timeout=30).check().stdout)
    assert len(written) > 100, written
    # What the driver acknowledged is in the image the emulated disk writes to (flushed: the
    # guest test ends with a FLUSH, and the driver's `down` leaves QEMU's file as it is).
    # What the driver acknowledged is in the image the emulated disk writes to (the guest test
    # ends with a FLUSH).  Later writes to a block supersede earlier ones.
    latest = {}
    for n, (lba, seed, blocks) in enumerate(written):
        for i in range(blocks):
            latest[lba + i] = (n, i)
    patterns = {}
    with open(testbed.disk_image, "rb") as f:
        for block, (n, i) in sorted(latest.items()):
            lba, seed, blocks = written[n]
            if n not in patterns:
                patterns[n] = random.Random(seed).randbytes(blocks * BS)
            f.seek(block * BS)
            assert f.read(BS) == patterns[n][i * BS:(i + 1) * BS], \
                "block %d in the image is not what the driver acknowledged (write %d)" % (block, n)
    log = testbed.run(["dmesg"], timeout=30).check().stdout.splitlines()[before:]
    bad = [line for line in log if BAD_LOG.search(line)]
    assert not bad, "\n".join(log[-60:])
    # The guest is left as found: the HBA unbound, no rsd.
    assert testbed.run(["test", "-e", "/sys/bus/pci/devices/0000:00:03.0/driver"]).rc == 1
    assert testbed.run(["sh", "-c", "pgrep -f '^rsd --config-dir /run/rsdahci' && exit 1; exit 0"]).rc == 0
