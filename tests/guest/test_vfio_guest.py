"""VFIO under a real rsd, in the testbed guest: the e1000 at 00:02.0 behind the emulated
intel-iommu, driven by an unprivileged service (tests/guest/vfio_e1000_probe.py) that holds
only its device's fds.  Run by tests/vm/test_vfio.py; the tests build on each other in file
order (one rsd for the module).
"""

import ctypes
import json
import mmap
import os
import re
import socket
import struct
import subprocess
import time

import pytest

from testbed import E1000_BDF, GUEST_MAC, REPO_ROOT
from testbed.stack import unit_capabilities

BASE = "/run/rsdvfio"
CONFIG, RUNTIME, STATE = BASE + "/etc", BASE + "/run", BASE + "/state"
CGROUP = "/sys/fs/cgroup/rsdvfio"
DEV = "/sys/bus/pci/devices/" + E1000_BDF
PROBE = os.path.join(REPO_ROOT, "tests", "guest", "vfio_e1000_probe.py")
ENV = dict(os.environ, RSD_RUNTIME_DIR=RUNTIME, RSD_STATE_DIR=STATE, RSD_CONFIG_DIR=CONFIG)

SERVICE = """\
program = "{program}"
class = "net"
period = 1
backoff = false
init_timeout = 60

[resources]
pci = ["{pci}"]
{extra}
"""


def sh(line, check=True, timeout=60):
    r = subprocess.run(["sh", "-c", line], capture_output=True, text=True, env=ENV, timeout=timeout)
    if check:
        assert r.returncode == 0, "%s: rc %d\n%s%s" % (line, r.returncode, r.stdout, r.stderr)
    return r


def rsctl(*args, check=True, timeout=90):
    return sh("rsctl " + " ".join(args), check=check, timeout=timeout)


def status(label):
    r = rsctl("status", label, "--json", check=False)
    if r.returncode != 0:
        return None
    return json.loads(r.stdout)


def rsd_log():
    return sh("tail -n 60 %s/rsd.log; tail -n 40 %s/log/*.log 2>/dev/null" % (BASE, STATE), check=False).stdout


def driver():
    try:
        return os.path.basename(os.readlink(DEV + "/driver"))
    except FileNotFoundError:
        return None


def override():
    with open(DEV + "/driver_override") as f:
        return f.read().strip()


def wait(predicate, what, timeout=60, interval=0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, "timed out waiting for %s\n%s" % (what, rsd_log())
        time.sleep(interval)


def write_service(label, pci="8086:100e", extra=""):
    with open("%s/services.d/%s.toml" % (CONFIG, label), "w") as f:
        f.write(SERVICE.format(program=PROBE, pci=pci, extra=extra))


def remove_service(label):
    try:
        os.unlink("%s/services.d/%s.toml" % (CONFIG, label))
    except FileNotFoundError:
        pass


def ask(label, command, timeout=30):
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect("%s/svc/%s.sock" % (RUNTIME, label))
        s.sendall(command.encode() + b"\n")
        return json.loads(s.makefile().readline())


def up(label):
    return wait(lambda: (status(label) or {}).get("state") == "up" and status(label), label + " up", 120)


@pytest.fixture(scope="module")
def rsd():
    assert driver() is None, "the e1000 must start unbound (docs/testbed.md), it is bound to %s" % driver()
    sh("modprobe vfio-pci")
    sh("rm -rf %s && mkdir -p %s/services.d %s %s" % (BASE, CONFIG, RUNTIME, STATE))
    caps = ",".join("+" + c for c in unit_capabilities())
    # rsd under exactly the unit's capability bounding set, as systemd would run it.
    proc = subprocess.Popen(
        ["setpriv", "--bounding-set=-all," + caps, "--", "rsd", "--config-dir", CONFIG,
         "--runtime-dir", RUNTIME, "--state-dir", STATE, "--cgroup-root", CGROUP],
        stdout=open(BASE + "/rsd.log", "w"), stderr=subprocess.STDOUT, env=ENV, start_new_session=True)
    wait(lambda: os.path.exists(RUNTIME + "/rsd.sock"), "rsd to listen")
    yield proc
    rsctl("shutdown", check=False)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    sh("rmmod e1000 2>/dev/null; echo > %s/driver_override; modprobe -r vfio-pci; true" % DEV, check=False)


# -- a device a kernel driver owns ------------------------------------------------------------

def test_rsd_refuses_a_device_bound_to_a_kernel_driver_without_take_from_kernel(rsd):
    sh("modprobe e1000")
    wait(lambda: driver() == "e1000", "e1000 to bind")
    write_service("kern0")
    try:
        rsctl("reload", check=False)
        wait(lambda: "take_from_kernel" in sh("cat %s/rsd.log" % BASE).stdout, "rsd's refusal")
        st = wait(lambda: (status("kern0") or {}).get("state") == "failed" and status("kern0"),
                  "kern0 to be given up")
        assert "take_from_kernel" in st["gave_up"]["why"], st
        assert driver() == "e1000", "rsd took the device anyway"
        assert override() == "(null)"
    finally:
        remove_service("kern0")
        rsctl("reload", check=False)


def test_take_from_kernel_binds_vfio_and_down_gives_the_device_back_to_its_driver(rsd):
    assert driver() == "e1000"
    write_service("take0", extra="take_from_kernel = true")
    try:
        rsctl("reload", check=False)
        st = up("take0")
        assert driver() == "vfio-pci" and override() == "vfio-pci"
        info = ask("take0", "info")
        assert info["mac_eeprom"] == GUEST_MAC.lower(), info
        assert info["uid"] == st["uid"] != 0
    finally:
        rsctl("down", "take0", check=False)
        remove_service("take0")
    try:
        wait(lambda: driver() == "e1000", "the device back with e1000", 30)
        assert override() == "(null)"
        # rsd's record of what it took is gone once the device is back
        wait(lambda: not os.path.exists(RUNTIME + "/vfio/%s.json" % E1000_BDF), "the record removed", 10)
    finally:
        sh("rmmod e1000", check=False)
    wait(lambda: driver() is None, "e1000 to unbind")


def test_rsd_leaves_a_device_claimed_through_driver_override_alone(rsd):
    assert driver() is None
    with open(DEV + "/driver_override", "w") as f:
        f.write("rsdrv")     # what an rsdrv endpoint that holds the device writes
    write_service("claimed0")
    try:
        rsctl("reload", check=False)
        wait(lambda: "driver_override=rsdrv" in sh("cat %s/rsd.log" % BASE).stdout, "rsd's refusal")
        st = wait(lambda: (status("claimed0") or {}).get("state") == "failed" and status("claimed0"),
                  "claimed0 to be given up")
        assert "driver_override=rsdrv" in st["gave_up"]["why"], st
        assert driver() is None and override() == "rsdrv"
    finally:
        remove_service("claimed0")
        with open(DEV + "/driver_override", "w") as f:
            f.write("\n")


# -- an unbound device, driven through VFIO ------------------------------------------------------

@pytest.fixture(scope="module")
def probe(rsd):
    write_service("vfio0")
    r = rsctl("reload", check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    return up("vfio0")


def test_the_service_is_unprivileged_and_holds_only_its_device_fds(probe):
    info = ask("vfio0", "info")
    assert info["uid"] == probe["uid"] and info["uid"] != 0
    assert status("vfio0")["dma_isolated"] is True
    names = dict(item.split("=") for item in info["resource_fds"].split(","))
    assert set(names) == {"vfio_container", "vfio_device"}, names
    links = {}
    for fd in os.listdir("/proc/%d/fd" % probe["pid"]):
        try:
            links[int(fd)] = os.readlink("/proc/%d/fd/%s" % (probe["pid"], fd))
        except FileNotFoundError:
            pass
    assert links[int(names["vfio_container"])] == "/dev/vfio/vfio", links
    assert links[int(names["vfio_device"])] == "anon_inode:[vfio-device]", links
    assert not [l for l in links.values() if re.fullmatch(r"/dev/vfio/\d+", l) or l == "/dev/rsdrv"], links
    with open("/proc/%d/status" % probe["pid"]) as f:
        caps = dict(line.split(":\t") for line in f if line.startswith("Cap"))
    assert int(caps["CapEff"], 16) == 0 and int(caps["CapBnd"], 16) == 0, caps
    # and the group stays rsd's: nobody else can open it meanwhile
    group = os.path.basename(os.readlink(DEV + "/iommu_group"))
    with pytest.raises(OSError) as e:
        os.open("/dev/vfio/" + group, os.O_RDWR)
    assert e.value.errno == 16  # EBUSY
    assert "DMA-isolated" in sh("cat %s/rsd.log" % BASE).stdout


def test_bar_reads_work(probe):
    info = ask("vfio0", "info")
    assert info["ids"] == "8086:100e"
    assert info["link_up"], info
    assert info["mac_eeprom"] == GUEST_MAC.lower(), info
    assert info["mac_ral"] == GUEST_MAC.lower(), info


def test_a_transmitted_frame_is_answered_and_the_reply_lands_by_dma_with_an_interrupt(probe):
    before = ask("vfio0", "poll")
    slot = ask("vfio0", "arp")["slot"]

    def reply():
        p = ask("vfio0", "poll")
        for entry in p["received"][len(before["received"]):]:
            frame = bytes.fromhex(entry.get("frame", ""))
            # an ARP reply (op 2) from the gateway 10.0.2.2 to our MAC
            if frame[12:14] == b"\x08\x06" and frame[20:22] == b"\x00\x02" and frame[28:32] == bytes([10, 0, 2, 2]):
                return p, frame
        return None
    p, frame = wait(reply, "the gateway's ARP reply", 20)
    assert frame[0:6] == bytes.fromhex(GUEST_MAC.replace(":", ""))
    assert p["tdh"] == (slot + 1) % 8, p        # the device consumed our descriptor ...
    assert p["tx0_dd"] or slot != 0, p          # ... and wrote DD back through the IOMMU
    # INTx came through VFIO's eventfd (and was unmasked: it comes again for the next frame)
    wait(lambda: ask("vfio0", "poll")["irqs"] > before["irqs"], "an interrupt", 10)
    n = ask("vfio0", "poll")["irqs"]
    ask("vfio0", "arp")
    p = wait(lambda: (q := ask("vfio0", "poll"))["irqs"] > n and q, "a second interrupt", 10)
    assert p["pci_command"] & 0x4, p   # bus mastering on, as the driver set it


def test_pinned_dma_memory_is_bounded_by_the_memlock_limit(probe):
    info = ask("vfio0", "info")
    assert 0 < info["memlock"] < 64 << 20, info
    assert ask("vfio0", "pin %d" % (1 << 20)) == {"ok": True}
    refused = ask("vfio0", "pin %d" % (64 << 20))
    assert not refused["ok"] and "RLIMIT_MEMLOCK" in refused["error"], refused
    assert ask("vfio0", "info")["link_up"]   # and it carries on


def _sentinel():
    """A locked page of this (root) process filled with a pattern, and its physical address."""
    page = mmap.mmap(-1, 4096, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    pattern = bytes(range(256)) * 16
    page[:] = pattern
    addr = ctypes.addressof(ctypes.c_char.from_buffer(page))
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.mlock(ctypes.c_void_p(addr), ctypes.c_size_t(4096)) == 0, ctypes.get_errno()
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(addr // 4096 * 8)
        entry = struct.unpack("<Q", f.read(8))[0]
    assert entry >> 63, "the sentinel page is not present"
    return page, pattern, (entry & ((1 << 55) - 1)) * 4096


def test_wild_dma_is_blocked_by_the_iommu_memory_is_intact_and_the_driver_is_replaced(probe):
    page, pattern, phys = _sentinel()
    old = status("vfio0")
    dmesg_before = len(sh("dmesg").stdout.splitlines())
    reply = ask("vfio0", "wild-dma %d" % phys)
    # The device took the descriptor: the frame went towards phys, not into any buffer of ours.
    assert reply["tx_done"] and reply["addr"] == phys, reply
    st = wait(lambda: (s := status("vfio0")) and s["generation"] > old["generation"]
              and s["state"] == "up" and s, "vfio0 replaced", 60)
    assert st["last_failure"]["reason"] == "no-heartbeat", st
    assert page[:] == pattern, "the device wrote into the sentinel page at %#x" % phys
    new = sh("dmesg").stdout.splitlines()[dmesg_before:]
    faults = [l for l in new if "DMAR" in l and "fault addr" in l]
    assert any(re.search(r"\[%s\] fault addr 0x%x\b" % (re.escape(E1000_BDF[5:]), phys), l)
               for l in faults), "no DMAR fault at %#x in:\n%s" % (phys, "\n".join(new[-30:]))
    assert any("Write" in l for l in faults), faults
    # The new incarnation maps the same IOVA again (its container is fresh) and works.
    info = ask("vfio0", "info")
    assert info["pid"] == st["pid"] != old["pid"]
    # vfio-pci stopped the device's DMA when the old incarnation's last fd closed
    assert not info["command_at_start"] & 0x4, info
    before = ask("vfio0", "poll")
    ask("vfio0", "arp")
    wait(lambda: len(ask("vfio0", "poll")["received"]) > len(before["received"]), "a reply after restart", 20)
    page.close()


def test_refresh_is_fast_and_keeps_the_device(probe):
    old = status("vfio0")
    t0 = time.monotonic()
    rsctl("restart", "vfio0")
    st = up("vfio0")
    assert st["generation"] > old["generation"]
    assert driver() == "vfio-pci"
    assert ask("vfio0", "info")["link_up"]
    assert time.monotonic() - t0 < 30


def test_down_unbinds_the_device_from_vfio(probe):
    rsctl("down", "vfio0")
    remove_service("vfio0")
    wait(lambda: driver() is None, "the device unbound from vfio-pci", 30)
    assert override() == "(null)"
