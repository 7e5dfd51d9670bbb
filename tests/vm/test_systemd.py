"""rsd deployed as a server runs it: systemd as PID 1 in the guest (Testbed(init="systemd")),
`make install`, the README's deploy commands, then operations under systemd with the 16550
driver, its tty front end and a DS publisher as the workload (docs/deploy.md).

One guest for the module; the tests run in order and each leaves the system as the next
expects (installed and running, until two stop and uninstall it; the last installs the
Debian packages over the configuration left behind, upgrades and removes them).

The host prepares what the guest cannot make in reasonable time, as a build machine would:
`make venv` (the wheels: pip needs the network, which the guest does not have, and the
Cython build; then the venv make install copies, byte-compiled), `make dkms-tarball` for the
guest's kernel (DKMS compiling the module under TCG takes minutes) and `make deb` with that
tarball in rsdrv-dkms; the guest's `make install DKMS_TARBALL=...` loads the tarball into
DKMS and installs from it, as rsdrv-dkms's postinst does. The guest's root writes to a disk
(Testbed(root_disk_mb=)), so a real reboot keeps what was installed.
"""

import json
import os
import re
import socket
import subprocess
import threading
import time

import pytest

from testbed import REPO_ROOT, Testbed, TestbedError
from testbed.kernel import find_kernel
from testbed.stack import unit_capabilities

DKMS_TARBALL = "build/rsdrv-dkms.tar.gz"
WHEELS_STAMP = "build/wheels/.stamp"
PUBLISHER_SOURCE = os.path.join(REPO_ROOT, "tests", "guest", "ds_publisher_guest.py")
# Where the test installs it in the guest: rsd.service has PrivateTmp=yes, so rsd would not see a
# checkout under /tmp (CI clones there).
PUBLISHER = "/usr/local/lib/rsd-test/ds_publisher.py"
PUBLISHER_TOML = """\
program = "%s"
class = "server"
""" % PUBLISHER
TTY = "/run/rsd/tty/serial0"
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEBS = ("build/deb/rsd_0.1.0_amd64.deb", "build/deb/rsdrv-dkms_0.1.0_all.deb")
LINE = b"%08d\n"     # the client's stream: numbered lines, so a gap or a repeat shows
# Everything `make install` puts outside /etc/rsd and /var/lib/rsd: `make uninstall` removes it.
INSTALLED = ("/opt/rsd", "/usr/local/bin/rsd", "/usr/local/bin/rsctl", "/usr/local/bin/datastore",
             "/etc/systemd/system/rsd.service", "/etc/systemd/system/datastore.service",
             "/etc/systemd/system/rsd-cgroup.service",
             "/usr/lib/tmpfiles.d/rsd.conf", "/usr/lib/modules-load.d/rsd.conf", "/usr/src/rsdrv-0.1.0", "/var/lib/dkms/rsdrv",
             "/usr/local/share/doc/rsd", "/run/rsd")


def _make_on_host(*args, timeout=900):
    r = subprocess.run(["make", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                       timeout=timeout)
    if r.returncode != 0:
        raise AssertionError("make %s failed on the host:\n%s\n%s"
                             % (" ".join(args), r.stdout[-3000:], r.stderr[-3000:]))


# `make deb` on the host, started before the guest boots and waited for by the packages'
# test: lintian and the staging run on the host's other core while the guest works.
_deb_build = {}


@pytest.fixture(scope="module")
def guest(request):
    kernel = find_kernel()
    t0 = time.monotonic()
    _make_on_host("venv")     # the wheels, then the venv make install copies into /opt/rsd
    _make_on_host("dkms-tarball", "KERNEL=" + kernel.version)
    print("make venv dkms-tarball on the host: %.0f s" % (time.monotonic() - t0))
    if any(item.name.startswith("test_debian_packages") for item in request.session.items):
        _deb_build["proc"] = subprocess.Popen(
            ["make", "-o", WHEELS_STAMP, "deb", "DKMS_TARBALL=" + DKMS_TARBALL], cwd=REPO_ROOT,
            text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        _deb_build["started"] = time.monotonic()
    # The root's writes go to a disk: what the guest installed is there after tb.reboot().
    tb = Testbed(init="systemd", memory_mb=1024, kernel=kernel.version, root_disk_mb=1024)
    try:
        tb.start()
        tb.wait_ready()
    except TestbedError as e:
        if "proc" in _deb_build:
            _deb_build["proc"].kill()
        pytest.fail("the systemd guest cannot boot:\n%s" % e, pytrace=False)
    print("systemd guest ready in %.1f s" % tb.boot_seconds)
    yield tb
    tb.close()
    if "proc" in _deb_build and _deb_build["proc"].poll() is None:
        _deb_build["proc"].kill()
        _deb_build["proc"].wait()


class Guest:
    """Commands in the installed guest (root, PATH with /usr/local/bin)."""

    def __init__(self, tb):
        self.tb = tb

    def sh(self, line, timeout=120):
        # The installed commands, not the checkout venv's (first on the agent's PATH).
        return self.tb.run(["bash", "-c", line], timeout=timeout, cwd=REPO_ROOT,
                           env={"PATH": SYSTEM_PATH, "DEBIAN_FRONTEND": "noninteractive"})

    def ok(self, line, timeout=120):
        return self.sh(line, timeout).check().stdout

    def show(self, unit, prop):
        return self.ok("systemctl show -p %s --value %s" % (prop, unit)).strip()

    def status(self):
        return {s["label"]: s for s in json.loads(self.ok("rsctl status --json"))}

    def wait(self, test, what, timeout=60):
        deadline = time.monotonic() + timeout
        while True:
            value = test()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError("timed out (%d s) waiting for %s\n%s" % (timeout, what, self.logs()))
            time.sleep(0.5)

    def all_up(self, labels):
        def up():
            try:
                st = self.status()
            except (AssertionError, ValueError, KeyError):
                return None
            return st if all(st.get(l, {}).get("state") == "up" for l in labels) else None
        return self.wait(up, "%s up" % ", ".join(labels))

    def ds_keys(self, regex=".*"):
        return {e["key"]: e for e in json.loads(self.ok("rsctl ds ls '%s' --json" % regex))}

    def logs(self):
        return self.sh("systemctl status rsd datastore --no-pager -l | tail -30; "
                       "journalctl --no-pager -n 40 -u rsd -u datastore; "
                       "tail -n 5 /var/lib/rsd/log/*.log").stdout


@pytest.fixture(scope="module")
def installed(guest):
    """README's deploy section, word for word (bar the prebuilt module and no sudo: root)."""
    g = Guest(guest)
    t0 = time.monotonic()
    # -o: the wheels are the host's, made before boot; a source another engineer edits in
    # the shared checkout meanwhile must not make the guest (no network) rebuild them.
    out = g.ok("make -o %s install DKMS_TARBALL=%s 2>&1" % (WHEELS_STAMP, DKMS_TARBALL), timeout=600)
    assert "Installed." in out, out[-2000:]
    print("make install in the guest: %.0f s" % (time.monotonic() - t0))
    g.ok("cp /usr/local/share/doc/rsd/examples/{serial0,tty0}.toml /etc/rsd/services.d/")
    g.ok("systemctl enable --now rsd")
    g.all_up(("serial0", "tty0"))
    g.ok("rsctl status")
    return g


def _drain(sock, quiet=0.5):
    sock.settimeout(quiet)
    try:
        while sock.recv(65536):
            pass
    except socket.timeout:
        pass


class Stream:
    """A client in the guest writes `lines` numbered lines through the tty (one every
    `gap` seconds); the host reads them at the far end of COM2."""

    def __init__(self, g, lines=1500, gap=0.004):
        self.g, self.lines, self.gap = g, lines, gap
        self.received = bytearray()
        self.expected = b"".join(LINE % i for i in range(lines))
        self.done = "/var/tmp/rsd-stream.done"

    def start(self):
        com2 = self.g.tb.com2
        _drain(com2)
        self.g.ok("stty -F %s raw -echo 115200" % TTY)
        code = ("import os, time\n"
                "fd = os.open(%r, os.O_WRONLY | os.O_NOCTTY)\n"
                "for i in range(%d):\n"
                "    os.write(fd, b'%%08d\\n' %% i)\n"
                "    time.sleep(%r)\n"
                "os.close(fd)\n"
                "open(%r, 'w').write('ok')\n") % (TTY, self.lines, self.gap, self.done)
        self.g.tb.write_file("/var/tmp/rsd-stream.py", code)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        self.g.ok("rm -f %s; setsid python3 /var/tmp/rsd-stream.py < /dev/null > /var/tmp/rsd-stream.log "
                  "2>&1 &" % self.done)

    def _read(self):
        com2 = self.g.tb.com2
        com2.settimeout(1.0)
        deadline = time.monotonic() + 180
        while len(self.received) < len(self.expected) and time.monotonic() < deadline:
            try:
                data = com2.recv(65536)
            except socket.timeout:
                continue
            if not data:
                break
            self.received += data

    def check(self):
        self.g.wait(lambda: self.g.sh("[ -e %s ]" % self.done).rc == 0, "the client to finish",
                    timeout=180)
        self.thread.join(60)
        got = bytes(self.received)
        if got != self.expected:
            first = next((i for i, (a, b) in enumerate(zip(got, self.expected)) if a != b),
                         min(len(got), len(self.expected)))
            raise AssertionError("the client's stream arrived changed: %d of %d bytes, first "
                                 "difference at byte %d: got %r, expected %r\nclient: %s"
                                 % (len(got), len(self.expected), first, got[first:first + 40],
                                    self.expected[first:first + 40],
                                    self.g.sh("cat /var/tmp/rsd-stream.log").stdout))


def _acked(g, label="publisher"):
    text = g.ok("cat /var/lib/rsd/log/%s.log" % label)
    return [int(n) for n in re.findall(r"^acked (\d+)$", text, re.M)]


# ---------------------------------------------------------------------------------------

def test_enable_now_brings_up_the_module_and_every_service(installed):
    g = installed
    assert g.sh("[ -e /sys/module/rsdrv ] && [ -c /dev/rsdrv ]").rc == 0, g.logs()
    # The front ends' modules (modules-load.d, applied by the install).
    assert g.sh("[ -e /sys/module/nbd ] && [ -e /sys/module/cuse ]").rc == 0, g.ok("lsmod")
    assert g.show("rsd", "ActiveState") == "active"
    assert g.show("datastore", "ActiveState") == "active"
    st = g.status()
    assert st["serial0"]["state"] == "up" and st["tty0"]["state"] == "up", st
    assert g.ok("readlink %s" % TTY).startswith("/dev/pts/")
    # rsd runs with the unit's bounding set, and that is enough for /dev/rsdrv's set-up.
    pid = int(g.show("rsd", "MainPID"))
    assert str(pid) in g.ok("pidof rsd").split()
    bnd = g.ok("grep CapBnd /proc/%d/status" % pid).split()[1]
    names = g.ok("capsh --decode=%s" % bnd).split("=", 1)[1].strip().split(",")
    assert sorted(names) == sorted("cap_" + c for c in unit_capabilities()), names
    # Bytes both ways through the installed stack.
    com2 = g.tb.com2
    _drain(com2)
    g.ok("stty -F %s raw -echo 115200; printf 'hello from systemd\\n' > %s" % (TTY, TTY))
    got = b""
    com2.settimeout(10)
    while not got.endswith(b"\n"):
        got += com2.recv(100)
    assert got == b"hello from systemd\n"


def test_systemctl_status_shows_the_service_count(installed):
    g = installed
    assert g.show("rsd", "StatusText") == "2 services: 2 up"
    assert 'Status: "2 services: 2 up"' in g.sh("systemctl status rsd --no-pager").stdout


def test_rsctl_restart_gives_a_fresh_driver(installed):
    g = installed
    before = g.status()["serial0"]
    g.ok("rsctl restart serial0")
    after = g.wait(lambda: (lambda s: s if s["state"] == "up" and s["generation"] > before["generation"]
                            else None)(g.status()["serial0"]), "serial0 up again")
    assert after["pid"] != before["pid"]
    g.ok("printf 'after restart\\n' > %s" % TTY)
    com2, got = g.tb.com2, b""
    com2.settimeout(10)
    while not got.endswith(b"after restart\n"):
        got += com2.recv(100)


def test_systemctl_reload_rereads_services_d(installed):
    g = installed
    g.ok("install -D -m 755 %s %s" % (PUBLISHER_SOURCE, PUBLISHER))
    g.tb.write_file("/etc/rsd/services.d/publisher.toml", PUBLISHER_TOML)
    g.ok("systemctl reload rsd")
    g.all_up(("serial0", "tty0", "publisher"))
    g.wait(lambda: len(_acked(g)) >= 5, "the publisher's first acknowledged writes")
    g.wait(lambda: g.show("rsd", "StatusText") == "3 services: 3 up", "STATUS= with 3 services")


def test_kill_9_of_rsd_under_load(installed):
    g = installed
    before = g.status()
    old_main, restarts = g.show("rsd", "MainPID"), int(g.show("rsd", "NRestarts"))
    keys_before = g.ds_keys()
    stream = Stream(g)
    stream.start()
    time.sleep(2)
    g.ok("kill -9 %s" % old_main)
    g.wait(lambda: g.show("rsd", "ActiveState") == "active" and g.show("rsd", "MainPID") not in
           ("0", old_main), "systemd to restart rsd")
    assert int(g.show("rsd", "NRestarts")) == restarts + 1
    after = g.all_up(("serial0", "tty0", "publisher"))
    for label in ("serial0", "tty0", "publisher"):   # adopted: the same process, generation
        assert (after[label]["pid"], after[label]["generation"]) == \
            (before[label]["pid"], before[label]["generation"]), (label, before[label], after[label])
    stream.check()
    acked = _acked(g)
    keys_after = g.ds_keys()
    lost = sorted(set(keys_before) - set(keys_after))
    assert not lost, lost
    missing = [n for n in acked if "load.publisher.%d" % n not in keys_after]
    assert not missing, missing[:20]
    assert "adopted" in g.ok("journalctl -u rsd --no-pager -n 50")


def test_kill_9_of_datastore_under_load(installed):
    g = installed
    before = g.status()
    old_main = g.show("datastore", "MainPID")
    rsd_restarts = g.show("rsd", "NRestarts")
    stream = Stream(g)
    stream.start()
    time.sleep(2)
    acked_before_kill = _acked(g)
    g.ok("kill -9 %s" % old_main)
    g.wait(lambda: g.show("datastore", "ActiveState") == "active" and g.show("datastore", "MainPID")
           not in ("0", old_main), "systemd to restart the data store")
    # Every acknowledged write is there (the journal survived), rsd republished its keys,
    # the publisher carries on, the front end publishes its status on the new DS.
    keys = g.wait(lambda: (lambda k: k if "label.serial0" in k and "drv.chr.serial0" in k else None)(
        g.ds_keys()), "rsd to republish on the new data store")
    missing = [n for n in acked_before_kill if "load.publisher.%d" % n not in keys]
    assert not missing, missing[:20]
    n = len(_acked(g))
    g.wait(lambda: len(_acked(g)) > n + 5, "the publisher to write to the new data store")
    g.ok(r"rsctl ds watch 'tty\.serial0\.status' --no-initial --count 1", timeout=60)
    stream.check()
    after = g.status()
    for label in ("serial0", "tty0", "publisher"):   # drivers kept running
        assert after[label]["pid"] == before[label]["pid"], (label, before[label], after[label])
    assert g.show("rsd", "NRestarts") == rsd_restarts   # rsd rode it out: it was not restarted


def test_journal_has_rsd_log_with_fields_and_each_service_its_log(installed):
    g = installed
    g.ok("rsctl fi serial0 --crash")
    g.all_up(("serial0",))
    entries = [json.loads(l) for l in g.tb.journal("-u", "rsd", "RSD_LABEL=serial0", "-o", "json")
               .splitlines() if l.strip()]
    assert entries, g.tb.journal("-u", "rsd", "-n", "30")
    assert all(e["RSD_LABEL"] == "serial0" for e in entries)
    failures = [e for e in entries if e.get("RSD_REASON") == "signal"]
    assert failures, [e["MESSAGE"] for e in entries]
    assert failures[-1]["PRIORITY"] == "4" and failures[-1]["SYSLOG_IDENTIFIER"] == "rsd"
    # Each service's own output, per service.
    assert "acked" in g.ok("cat /var/lib/rsd/log/publisher.log")
    g.ok("[ -s /var/lib/rsd/log/serial0.log ] && [ -e /var/lib/rsd/log/tty0.log ]")


def test_systemctl_stop_stops_every_service_and_leaves_nothing_in_run_rsd(installed):
    g = installed
    pids = [s["pid"] for s in g.status().values() if s["pid"]]
    g.ok("systemctl stop rsd", timeout=60)
    assert g.show("rsd", "ActiveState") == "inactive"
    alive = [p for p in pids if g.sh("[ -e /proc/%d ]" % p).rc == 0]
    assert not alive, g.ok("ps -o pid,user,args -p %s" % ",".join(map(str, alive)))
    left = g.ok("find /run/rsd \\( -type l -o -type s \\) -print").split()
    assert left == ["/run/rsd/ds.sock"], left   # the data store's own, still running
    services_cgroup = "/sys/fs/cgroup/system.slice/rsd-cgroup.service/services"
    left = g.ok("find %s -mindepth 1 -maxdepth 1 -type d 2>/dev/null; true" % services_cgroup).split()
    assert left == [], "services' cgroups left: %s" % left


def test_make_uninstall_leaves_configuration_and_state(installed):
    g = installed
    out = g.ok("make uninstall 2>&1", timeout=300)
    assert "Left in place: /etc/rsd" in out, out
    left = [p for p in INSTALLED if g.sh("[ -e %s ] || [ -L %s ]" % (p, p)).rc == 0]
    assert not left, left
    assert g.sh("[ -e /sys/module/rsdrv ]").rc != 0, "rsdrv still loaded"
    assert g.sh("ls /lib/modules/$(uname -r)/updates/dkms/rsdrv.ko* 2>/dev/null").stdout == ""
    assert g.show("rsd", "LoadState") == "not-found"
    g.ok("[ -e /etc/rsd/services.d/serial0.toml ] && [ -d /var/lib/rsd/ds ]")


def test_debian_packages_give_the_same_system_and_an_upgrade_keeps_drivers_running(installed):
    g = installed
    build = _deb_build["proc"]
    out, _ = build.communicate(timeout=900)
    assert build.returncode == 0, "make deb failed on the host:\n" + out[-4000:]
    print("make deb on the host: done %.0f s after it started" % (time.monotonic() - _deb_build["started"]))
    # The guest's /lib/modules is the host's: two kernels with headers. rsdrv-dkms's postinst
    # builds for the running and the newest one, and the tarball has the running one's only
    # (dkms 3.0.10 cannot carry two); compiling for the other under TCG takes many minutes.
    # A server has its own kernel's headers: the guest is made to look like one.
    g.ok("for d in /lib/modules/*/build; do [ \"$d\" = /lib/modules/$(uname -r)/build ] || rm -f \"$d\"; done")
    t0 = time.monotonic()
    out = g.ok("apt-get install -y %s 2>&1" % " ".join("./" + d for d in DEBS), timeout=600)
    print("apt-get install in the guest: %.0f s" % (time.monotonic() - t0))
    # The packages start rsd at once, with the configuration make uninstall left.
    assert g.show("rsd", "FragmentPath") == "/lib/systemd/system/rsd.service", out[-2000:]
    before = g.all_up(("serial0", "tty0", "publisher"))
    assert g.sh("[ -e /sys/module/rsdrv ] && [ -e /sys/module/nbd ] && [ -e /sys/module/cuse ]").rc == 0, \
        out[-2000:]
    assert "installed" in g.ok("dkms status rsdrv")
    main_pid = g.show("rsd", "MainPID")
    assert g.ok("readlink -f /proc/%s/exe" % main_pid).strip().startswith("/usr/bin/python3")
    assert main_pid in g.ok("pidof rsd").split()
    assert g.show("rsd", "StatusText") == "3 services: 3 up"
    # An upgrade (the same package again: prerm upgrade, postinst configure) under load:
    # rsd hands over to the new one, every service keeps running.
    stream = Stream(g, lines=800)
    stream.start()
    time.sleep(1)
    t0 = time.monotonic()
    g.ok("dpkg -i %s 2>&1" % DEBS[0], timeout=600)
    print("dpkg -i (upgrade) in the guest: %.0f s" % (time.monotonic() - t0))
    g.wait(lambda: g.show("rsd", "ActiveState") == "active" and g.show("rsd", "MainPID") not in
           ("0", main_pid), "the new rsd")
    after = g.all_up(("serial0", "tty0", "publisher"))
    for label in ("serial0", "tty0", "publisher"):
        assert (after[label]["pid"], after[label]["generation"]) == \
            (before[label]["pid"], before[label]["generation"]), (label, before[label], after[label])
    stream.check()
    assert "handing over" in g.ok("journalctl -u rsd --no-pager -n 80")


def test_a_reboot_brings_back_the_units_the_modules_and_every_service(installed):
    g = installed
    # Installed by the packages (on 6.1) or by make install (the 6.12 run stops before those).
    assert g.ok("systemctl is-enabled rsd").strip() == "enabled"
    before = g.status()
    labels = sorted(before)
    assert {"serial0", "tty0", "publisher"} <= set(labels), labels
    acked = _acked(g)
    assert acked, "the publisher has written nothing"
    t0 = time.monotonic()
    g.tb.reboot()
    print("reboot to ready: %.0f s" % (time.monotonic() - t0))
    # Nothing but the boot started them: the enabled unit (multi-user.target), the module
    # (its ExecStartPre), nbd and cuse (modules-load.d), /run/rsd/tty (tmpfiles.d).
    st = g.all_up(labels)
    # Each started once by the boot (rsd's state keeps the generations counting).
    assert {l: st[l]["generation"] for l in labels} == \
        {l: before[l]["generation"] + 1 for l in labels}, (before, st)
    assert g.show("rsd", "ActiveState") == "active" and g.show("datastore", "ActiveState") == "active"
    assert g.sh("[ -e /sys/module/rsdrv ] && [ -e /sys/module/nbd ] && [ -e /sys/module/cuse ]").rc == 0, \
        g.ok("lsmod")
    assert g.show("rsd", "MainPID") in g.ok("pidof rsd").split()
    g.wait(lambda: g.show("rsd", "StatusText") == "%d services: %d up" % (len(labels), len(labels)),
           "STATUS= with every service up")
    # DS's journal kept every acknowledged key; the publisher carries on after them.
    keys = g.ds_keys(r"load\.publisher\..*")
    missing = [n for n in acked if "load.publisher.%d" % n not in keys]
    assert not missing, missing[:20]
    g.wait(lambda: max(_acked(g)) > max(acked), "the publisher to write after the reboot")
    # Bytes cross COM2 through the tty front end's link, made again.
    com2 = g.tb.com2
    _drain(com2)
    g.ok("stty -F %s raw -echo 115200; printf 'after reboot\\n' > %s" % (TTY, TTY))
    got = b""
    com2.settimeout(10)
    while not got.endswith(b"\n"):
        got += com2.recv(100)
    assert got == b"after reboot\n"


def test_removing_the_packages_stops_everything_and_keeps_configuration(installed):
    g = installed
    pids = [s["pid"] for s in g.status().values() if s["pid"]]
    assert pids
    g.ok("dpkg -r rsd rsdrv-dkms 2>&1", timeout=300)
    alive = [p for p in pids if g.sh("[ -e /proc/%d ]" % p).rc == 0]
    assert not alive, alive
    assert g.sh("[ -e /sys/module/rsdrv ]").rc != 0, "rsdrv still loaded after removal"
    g.ok("[ -e /etc/rsd/services.d/serial0.toml ] && [ -d /var/lib/rsd/ds ] && [ ! -e /usr/bin/rsd ]")
