"""The e1000 driver in the testbed guest: rsd runs drivers/e1000 as an unprivileged service on
the VFIO e1000, the test plays its network front end through the shared memory (docs/net.md):
ARP and ping to QEMU's user-net gateway, checksum offload, TSO, settings and statistics kept
across `rsctl restart` and kill -9, a wild DMA stopped by the IOMMU and the driver replaced,
hostile front ends refused while the driver carries on.

One pytest process in the session guest (tests/guest/test_e1000_guest.py).
"""

import json
import re

GUEST_TESTS = "tests/guest/test_e1000_guest.py"
BAD_LOG = re.compile(r"BUG:|WARNING:|Oops|Call Trace|general protection|kernel BUG")
EXPECTED = (
    "test_the_driver_is_up_unprivileged_with_only_its_device",
    "test_attach_replies_the_eeprom_mac_link_and_limits",
    "test_an_arp_request_is_answered_through_the_shared_memory",
    "test_ping_with_and_without_checksum_offload",
    "test_a_posted_frame_is_sent_at_once_not_at_a_timer",
    "test_a_tso_frame_leaves_as_segments",
    "test_set_and_stats",
    "test_rsctl_restart_keeps_settings_and_frames_flow_again_quickly",
    "test_kill_9_the_driver_and_it_is_back",
    "test_wild_dma_is_a_dmar_fault_and_a_restart",
    "test_hostile_front_ends_are_refused_and_the_driver_carries_on",
    "test_link_changes_are_events",
)
LINK_REQUEST = re.compile(rb"E1000-TESTBED set_link (up|down)\n")


def test_e1000_driver_in_the_guest(testbed):
    before = len(testbed.run(["dmesg"], timeout=30).check().stdout.splitlines())
    seen = bytearray()

    def link_requests(fd, data):
        # The guest test asks for QEMU's link to change (only the host can do that: QMP).
        seen.extend(data)
        for m in LINK_REQUEST.finditer(bytes(seen)):
            testbed.qmp.execute("set_link", name="net0", up=m.group(1) == b"up")
        tail = seen.rfind(b"\n")
        if tail >= 0:
            del seen[:tail + 1]

    try:
        result = testbed.run_pytest([GUEST_TESTS, "-x"], timeout=900, on_output=link_requests)
    finally:
        testbed.qmp.execute("set_link", name="net0", up=True)
    outcomes = result.assert_passed(GUEST_TESTS + "::")
    ran = {nodeid.split("::")[-1] for nodeid in outcomes}
    assert set(EXPECTED) <= ran, sorted(set(EXPECTED) - ran)
    figures = json.loads(testbed.run(["cat", "/tmp/e1000-figures.json"], timeout=30).check().stdout)
    print("e1000 figures:", json.dumps(figures, sort_keys=True))
    log = testbed.run(["dmesg"], timeout=30).check().stdout.splitlines()[before:]
    bad = [line for line in log if BAD_LOG.search(line)]
    assert not bad, "\n".join(log[-60:])
    assert any("DMAR" in line and "fault addr 0x10000000" in line for line in log), "\n".join(log[-60:])
    # The guest is left as found: the e1000 unbound, no rsd, no vfio-pci.
    assert testbed.run(["test", "-e", "/sys/bus/pci/devices/0000:00:02.0/driver"]).rc == 1
    assert testbed.run(["sh", "-c", "pgrep -f '^rsd --config-dir /run/rsde1000' && exit 1; exit 0"]).rc == 0
