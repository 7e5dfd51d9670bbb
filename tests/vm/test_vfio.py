"""VFIO in the testbed guest: rsd binds the e1000 to vfio-pci, hands an unprivileged
service only its container and device fds, the service drives the device (BAR reads, a
transmitted frame answered by QEMU's user-net, the reply written by DMA, INTx through an
eventfd), a wild DMA it programs is stopped by the IOMMU (a DMAR fault in the guest's kernel
log, a sentinel page unchanged) and the service is replaced; a device a kernel driver owns is
taken only with take_from_kernel, and `rsctl down` gives it back.

One pytest process in the session guest (tests/guest/test_vfio_guest.py); rsd runs there
under exactly rsd.service's capability bounding set.
"""

import re

GUEST_TESTS = "tests/guest/test_vfio_guest.py"
BAD_LOG = re.compile(r"BUG:|WARNING:|Oops|Call Trace|general protection|kernel BUG")
EXPECTED = (
    "test_rsd_refuses_a_device_bound_to_a_kernel_driver_without_take_from_kernel",
    "test_take_from_kernel_binds_vfio_and_down_gives_the_device_back_to_its_driver",
    "test_rsd_leaves_a_device_claimed_through_driver_override_alone",
    "test_the_service_is_unprivileged_and_holds_only_its_device_fds",
    "test_bar_reads_work",
    "test_a_transmitted_frame_is_answered_and_the_reply_lands_by_dma_with_an_interrupt",
    "test_pinned_dma_memory_is_bounded_by_the_memlock_limit",
    "test_wild_dma_is_blocked_by_the_iommu_memory_is_intact_and_the_driver_is_replaced",
    "test_refresh_is_fast_and_keeps_the_device",
    "test_down_unbinds_the_device_from_vfio",
)


def test_vfio_in_the_guest(testbed):
    before = len(testbed.run(["dmesg"], timeout=30).check().stdout.splitlines())
    result = testbed.run_pytest([GUEST_TESTS], timeout=900)
    outcomes = result.assert_passed(GUEST_TESTS + "::")
    ran = {nodeid.split("::")[-1] for nodeid in outcomes}
    assert set(EXPECTED) <= ran, sorted(set(EXPECTED) - ran)
    log = testbed.run(["dmesg"], timeout=30).check().stdout.splitlines()[before:]
    bad = [line for line in log if BAD_LOG.search(line)]
    assert not bad, "\n".join(log[-60:])
    faults = [line for line in log if "DMAR" in line and "[00:02.0] fault addr" in line]
    assert faults, "no DMAR fault of 00:02.0 in the guest's kernel log:\n" + "\n".join(log[-60:])
    print("\n".join(faults))
    # The guest is left as found: the e1000 unbound, no override, no rsd.
    assert testbed.run(["test", "-e", "/sys/bus/pci/devices/0000:00:02.0/driver"]).rc == 1
    assert testbed.run(["sh", "-c", "pgrep -f '^rsd --config-dir /run/rsdvfio' && exit 1; exit 0"]).rc == 0
    assert testbed.run(["test", "-e", "/sys/module/vfio_pci"]).rc == 1
