"""The testbed guest as the other tests rely on it (runs inside the guest; started by
tests/vm/test_testbed.py::test_guest_side_checks_pass). Each test leaves the devices as it
found them: unbound, driver_override cleared."""

import ctypes
import fcntl
import os
import pwd
import struct
import subprocess
import sys
import time

E1000_BDF = "0000:00:02.0"
AHCI_BDF = "0000:00:03.0"
PCI = "/sys/bus/pci/devices"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOBODY = 65534

# <linux/vfio.h>: _IO(';', 100 + n)
VFIO_GET_API_VERSION, VFIO_CHECK_EXTENSION, VFIO_SET_IOMMU = 0x3B64, 0x3B65, 0x3B66
VFIO_GROUP_GET_STATUS, VFIO_GROUP_SET_CONTAINER, VFIO_GROUP_GET_DEVICE_FD = 0x3B67, 0x3B68, 0x3B6A
VFIO_TYPE1v2_IOMMU, VFIO_GROUP_FLAGS_VIABLE = 3, 1


def mounts():
    with open("/proc/self/mounts") as f:
        return {fields[1]: fields[2] for fields in (line.split() for line in f)}


def driver_of(bdf):
    link = f"{PCI}/{bdf}/driver"
    return os.path.basename(os.readlink(link)) if os.path.islink(link) else None


def write(path, text):
    with open(path, "w") as f:
        f.write(text)


def modprobe(name):
    subprocess.run(["modprobe", name], check=True, capture_output=True, timeout=60)


def bind(bdf, driver):
    write(f"{PCI}/{bdf}/driver_override", driver)
    write("/sys/bus/pci/drivers_probe", bdf)
    assert driver_of(bdf) == driver, f"{bdf} bound to {driver_of(bdf)}, not {driver}"


def unbind(bdf):
    if driver_of(bdf):
        write(f"{PCI}/{bdf}/driver/unbind", bdf)
    write(f"{PCI}/{bdf}/driver_override", "\n")
    assert driver_of(bdf) is None


def test_runs_as_root_with_its_own_pseudo_filesystems():
    assert os.getuid() == 0 and os.geteuid() == 0
    fs = mounts()
    assert fs["/"] == "overlay"
    assert (fs["/proc"], fs["/sys"], fs["/dev"]) == ("proc", "sysfs", "devtmpfs")
    assert fs["/run"] == "tmpfs" and fs["/dev/pts"] == "devpts"
    # /tmp is a fresh tmpfs, unless the checkout lives there (a CI clone in /tmp):
    # then the guest keeps the host's /tmp through the overlay (testbed/guest_init.py).
    checkout = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if checkout.startswith("/tmp/"):
        assert "/tmp" not in fs
    else:
        assert fs["/tmp"] == "tmpfs"
    with open("/proc/1/cmdline", "rb") as f:
        assert b"guest_init.py" in f.read()  # the guest's own PID 1, not the host's


def test_host_checkout_and_venv_are_at_the_same_paths():
    assert sys.prefix == os.path.join(REPO_ROOT, ".venv")
    assert os.path.isfile(os.path.join(REPO_ROOT, "pyproject.toml"))
    assert os.path.realpath(sys.executable).startswith("/")
    assert os.environ["PATH"].split(":")[0] == os.path.join(REPO_ROOT, ".venv", "bin")
    with open(os.path.join(REPO_ROOT, "testbed", "kernel.py")) as f:
        assert "find_kernel" in f.read()


def test_root_overlay_is_writable():
    path = os.path.join(REPO_ROOT, ".testbed-guest-write-probe")
    write(path, "guest")
    try:
        assert open(path).read() == "guest"  # the tmpfs upper layer takes it
    finally:
        os.unlink(path)


def test_nobody_exists_and_a_child_can_become_it():
    assert pwd.getpwnam("nobody").pw_uid == NOBODY
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            os._exit(0 if os.getuid() == NOBODY and not os.access("/root", os.W_OK) else 1)
        except BaseException:
            os._exit(2)
    assert os.waitpid(pid, 0)[1] == 0


def test_modprobe_loads_modules_of_the_running_kernel_from_the_host():
    assert os.path.isdir(f"/lib/modules/{os.uname().release}/kernel")
    modprobe("tun")
    assert os.path.isdir("/sys/module/tun")
    assert os.path.exists("/dev/net/tun")


def test_kernel_leaves_our_devices_alone():
    assert driver_of(E1000_BDF) is None
    assert driver_of(AHCI_BDF) is None
    with open("/proc/ioports") as f:
        ioports = f.read()
    assert "02f8" not in ioports, "the kernel claimed COM2"
    for irq in (3, 1, 12):  # COM2, PS/2 keyboard and mouse
        # A registered handler shows as a directory named after it (e.g. /proc/irq/4/ttyS0);
        # /proc/interrupts also lists lines that fired once but have no handler any more.
        holders = [e.name for e in os.scandir(f"/proc/irq/{irq}") if e.is_dir()]
        assert holders == [], f"IRQ {irq} is held by {holders}"


def test_iommu_is_on_with_interrupt_remapping():
    assert os.path.isdir("/sys/class/iommu/dmar0")
    group = os.path.basename(os.readlink(f"{PCI}/{E1000_BDF}/iommu_group"))
    members = os.listdir(f"/sys/kernel/iommu_groups/{group}/devices")
    assert members == [E1000_BDF], "the e1000 must have an IOMMU group to itself"
    dmesg = subprocess.run(["dmesg"], capture_output=True, text=True, check=True).stdout
    assert "Enabled IRQ remapping" in dmesg


def test_e1000_binds_to_vfio_pci_and_its_group_takes_a_type1v2_container():
    modprobe("vfio-pci")
    bind(E1000_BDF, "vfio-pci")
    try:
        group = os.path.basename(os.readlink(f"{PCI}/{E1000_BDF}/iommu_group"))
        container = os.open("/dev/vfio/vfio", os.O_RDWR)
        group_fd = os.open(f"/dev/vfio/{group}", os.O_RDWR)
        try:
            assert fcntl.ioctl(container, VFIO_GET_API_VERSION) == 0
            assert fcntl.ioctl(container, VFIO_CHECK_EXTENSION, VFIO_TYPE1v2_IOMMU) == 1
            status = fcntl.ioctl(group_fd, VFIO_GROUP_GET_STATUS, struct.pack("II", 8, 0))
            assert struct.unpack("II", status)[1] & VFIO_GROUP_FLAGS_VIABLE
            fcntl.ioctl(group_fd, VFIO_GROUP_SET_CONTAINER, struct.pack("i", container))
            # EPERM here would mean no interrupt remapping (intremap=off).
            fcntl.ioctl(container, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU)
            libc = ctypes.CDLL(None, use_errno=True)
            device = libc.ioctl(group_fd, VFIO_GROUP_GET_DEVICE_FD, E1000_BDF.encode())
            assert device >= 0, os.strerror(ctypes.get_errno())
            os.close(device)
        finally:
            os.close(group_fd)
            os.close(container)
    finally:
        unbind(E1000_BDF)


def test_e1000_binds_to_uio_pci_generic():
    modprobe("uio_pci_generic")
    bind(E1000_BDF, "uio_pci_generic")
    try:
        (uio,) = os.listdir(f"{PCI}/{E1000_BDF}/uio")
        with open(f"/sys/class/uio/{uio}/name") as f:
            assert f.read().strip() == "uio_pci_generic"
        deadline = time.monotonic() + 5
        while not os.path.exists(f"/dev/{uio}") and time.monotonic() < deadline:
            time.sleep(0.05)
        fd = os.open(f"/dev/{uio}", os.O_RDWR)
        os.close(fd)
    finally:
        unbind(E1000_BDF)


def test_ahci_controller_is_ours_with_the_expected_ids():
    def attr(name):
        with open(f"{PCI}/{AHCI_BDF}/{name}") as f:
            return f.read().strip()
    assert (attr("vendor"), attr("device"), attr("class")) == ("0x8086", "0x2922", "0x010601")
    with open(f"{PCI}/{E1000_BDF}/device") as f:
        assert f.read().strip() == "0x100e"
