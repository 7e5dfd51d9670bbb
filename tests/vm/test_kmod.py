"""rsdrv kernel module: builds (Kbuild and DKMS) against the testbed kernel's headers, then
runs tests/guest/test_kmod*_guest.py in the session guest (as root, using each endpoint from
`nobody`) and checks the guest's kernel log.

The testbed kernel is $RSD_TESTBED_KERNEL's (6.1 by default; `make test` runs this file on
6.12 too). Missing image or headers fail these tests, with the package to install.
"""
import os
import re
import shutil
import subprocess

import pytest

from testbed import REPO_ROOT, Testbed
from testbed.vm import guest_python
from testbed.kernel import find_kernel

KMOD = os.path.join(REPO_ROOT, "kmod")
UAPI = os.path.join(KMOD, "include", "uapi")
FUZZ_SRC = os.path.join(KMOD, "rsdrv_fuzz.c")
BAD_LOG = re.compile(r"BUG:|WARNING:|Oops|Call Trace|general protection|kernel BUG|"
                     r"list_(add|del) corruption|refcount_t|soft lockup")
FUZZ_CALLS = int(os.environ.get("RSDRV_FUZZ_CALLS", "200000"))
SMP_TESTS = ("test_16550_thr_empty_interrupt_arrives_on_eventfd_twice",
             "test_grant_copy_between_two_unprivileged_processes",
             "test_copies_racing_revokes_and_granter_exit",
             "test_revoke_waits_for_copies_in_flight_and_nothing_lands_after_it")


def _dkms_version():
    with open(os.path.join(KMOD, "dkms.conf")) as f:
        return re.search(r'^PACKAGE_VERSION="([^"]+)"', f.read(), re.M).group(1)


@pytest.fixture(scope="module")
def kernel():
    """The kernel the session guest boots, so the module built here is the one it loads."""
    return find_kernel()


@pytest.fixture(scope="module")
def built(tmp_path_factory, kernel):
    """rsdrv.ko and rsdrv_fuzz, built in a temp copy (the checkout stays clean)."""
    work = tmp_path_factory.mktemp("rsdrv-build")
    src = work / "kmod"
    shutil.copytree(KMOD, src)
    r = subprocess.run(["make", "-C", kernel.build_dir, f"M={src}", "modules"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"module build failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    warnings = [line for line in r.stderr.splitlines() if "warning:" in line]
    assert not warnings, "compiler warnings:\n" + "\n".join(warnings)
    fuzz = work / "rsdrv_fuzz"
    r = subprocess.run(["gcc", "-O2", "-Wall", "-Werror", f"-I{UAPI}", "-o", str(fuzz), FUZZ_SRC],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"fuzzer build failed:\n{r.stderr}"
    return {"ko": str(src / "rsdrv.ko"), "fuzz": str(fuzz)}


def test_module_builds_against_the_guest_kernel_headers(built, kernel):
    r = subprocess.run(["modinfo", "-F", "vermagic", built["ko"]], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == kernel.version


def test_module_builds_with_dkms(tmp_path, kernel):
    dkms = shutil.which("dkms")
    assert dkms, "dkms not installed: `apt-get install dkms` (make setup)"
    version = _dkms_version()
    source_tree, dkms_tree = tmp_path / "src", tmp_path / "tree"
    shutil.copytree(KMOD, source_tree / f"rsdrv-{version}")
    dkms_tree.mkdir()
    r = subprocess.run([dkms, "build", "-m", "rsdrv", "-v", version, "-k", kernel.version,
                        "--sourcetree", str(source_tree), "--dkmstree", str(dkms_tree)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    kos = list(dkms_tree.glob(f"rsdrv/{version}/{kernel.version}/*/module/rsdrv.ko*"))
    assert kos, f"dkms build produced no rsdrv.ko:\n{r.stdout[-2000:]}"


def test_kmod_in_guest(testbed, built, kernel):
    assert testbed.kernel.version == kernel.version, "the guest boots another kernel than built for"
    ko = testbed.push(built["ko"], "/tmp/test_kmod-rsdrv.ko")
    fuzz = testbed.push(built["fuzz"], "/tmp/test_kmod-rsdrv_fuzz")
    before = testbed.run(["dmesg"], timeout=30).stdout
    result = testbed.run_pytest(
        ["tests/guest/test_kmod_guest.py", "tests/guest/test_kmod_fuzz_guest.py"], timeout=240,
        env={"RSDRV_KO": ko, "RSDRV_FUZZ": fuzz, "RSDRV_FUZZ_CALLS": str(FUZZ_CALLS)})
    try:
        result.assert_passed("tests/guest/test_kmod")
        assert len([t for t in result.tests if "test_kmod" in t]) >= 16, sorted(result.tests)
    finally:
        # Leave the guest as we found it: module unloaded.
        testbed.run(["sh", "-c", "rmmod rsdrv 2>/dev/null; true"], timeout=30)
    log = testbed.run(["dmesg"], timeout=30).stdout
    new = log[len(before):] if log.startswith(before) else log
    bad = [line for line in new.splitlines() if BAD_LOG.search(line)]
    assert not bad, "guest kernel log:\n" + "\n".join(bad[:40])
    assert "rsdrv: /dev/rsdrv ready" in new


def test_kmod_races_on_two_cpus(built, kernel):
    """The same endpoints hit from processes on two CPUs at once (a guest of its own):
    the 4-process fuzz, copies racing revokes and the granter's exit, IRQ delivery."""
    with Testbed(cpus=2, kernel=kernel.version) as tb:
        ko = tb.push(built["ko"], "/tmp/test_kmod-rsdrv.ko")
        fuzz = tb.push(built["fuzz"], "/tmp/test_kmod-rsdrv_fuzz")
        assert tb.run(["nproc"], timeout=30).stdout.strip() == "2"
        result = tb.run_pytest(
            [f"tests/guest/test_kmod_guest.py::{name}" for name in SMP_TESTS]
            + ["tests/guest/test_kmod_fuzz_guest.py"], timeout=240,
            env={"RSDRV_KO": ko, "RSDRV_FUZZ": fuzz, "RSDRV_FUZZ_CALLS": str(FUZZ_CALLS)})
        result.assert_passed("tests/guest/test_kmod")
        assert len(result.tests) == len(SMP_TESTS) + 3, sorted(result.tests)
        log = tb.run(["dmesg"], timeout=30).stdout
        bad = [line for line in log.splitlines() if BAD_LOG.search(line)]
        assert not bad, "guest kernel log:\n" + "\n".join(bad[:40])


LEGACY_PLACEHOLDERS_GUEST = r'''
import errno, json, re
from libdrv.irq import IrqLine
from libdrv.rsdrv import Endpoint
from libdrv import rsdrv_errors as E


def leaves():
    """/proc/ioports as (first, last, name) of every entry."""
    out = []
    for line in open("/proc/ioports"):
        m = re.match(r"\s*([0-9a-f]+)-([0-9a-f]+) : (.*)", line)
        out.append((int(m.group(1), 16), int(m.group(2), 16), m.group(3)))
    return out


def grant(label, base, count, irqs=()):
    ep = Endpoint.open()
    try:
        ep.set_label(label)
        ep.allow_io(base, count)
        for irq in irqs:
            ep.allow_irq(irq)
        ep.seal()
    except BaseException:
        ep.close()
        raise
    return ep


def refused(label, base, count):
    try:
        grant(label, base, count).close()
    except E.RangeBusy as e:
        assert e.errno == errno.EBUSY
        return True
    return False


report = {"before": leaves()}
# A range over the 0x64 placeholder and the RTC's ports, which rtc_cmos holds.
report["over_rtc_refused"] = refused("lp-rtc", 0x64, 0x70 - 0x64 + 1)
report["after_rtc"] = leaves()
# 0x3f8: the 8250 driver's "serial", no placeholder at all.
report["serial_refused"] = refused("lp-serial", 0x3f8, 1)
# The placeholder alone is taken while granted and back after.
ep = grant("lp-kbd", 0x64, 1)
report["while_granted"] = leaves()
ep.close()
report["after_close"] = leaves()
# A handler on IRQ 1 (as the kernel's i8042 driver would hold) keeps the placeholder in place.
holder = grant("lp-irq1", 0x3f0, 1, irqs=[1])
line = IrqLine(holder, 1)
report["irq1_refused"] = refused("lp-kbd2", 0x60, 1)
report["after_irq1"] = leaves()
line.close()
holder.close()
print(json.dumps(report))
'''


def test_legacy_placeholder_taken_only_alone_and_never_over_a_driver(testbed, built):
    """/dev/rsdrv takes x86's unowned "keyboard" placeholders for a grant that collides only
    with them (puts them back on close), and still refuses a grant that also overlaps a port
    a kernel driver holds (rtc_cmos's rtc0, the 8250's serial), or while IRQ 1 has a handler."""
    import json
    ko = testbed.push(built["ko"], "/tmp/test_kmod-rsdrv.ko")
    loaded = testbed.run(["sh", "-c", "[ -e /sys/module/rsdrv ] || insmod " + ko], timeout=60)
    assert loaded.rc == 0, loaded.stderr
    try:
        testbed.write_file("/tmp/test_kmod-placeholders.py", LEGACY_PLACEHOLDERS_GUEST.encode())
        before_log = testbed.run(["dmesg"], timeout=30).stdout
        r = testbed.run([guest_python(), "/tmp/test_kmod-placeholders.py"], timeout=120, cwd=REPO_ROOT)
        assert r.rc == 0, r.stdout + r.stderr
        report = json.loads(r.stdout.strip().splitlines()[-1])
        log = testbed.run(["dmesg"], timeout=30).stdout[len(before_log):]
    finally:
        testbed.run(["sh", "-c", "rmmod rsdrv 2>/dev/null; true"], timeout=30)
    before = [tuple(e) for e in report["before"]]
    keyboard = [(0x60, 0x60, "keyboard"), (0x64, 0x64, "keyboard")]
    assert all(k in before for k in keyboard), before
    assert (0x70, 0x77, "rtc0") in before and (0x3f8, 0x3ff, "serial") in before, before
    assert report["over_rtc_refused"], "0x64-0x70 was granted over rtc0"
    assert report["serial_refused"], "0x3f8 was granted over the 8250 driver's serial"
    assert [tuple(e) for e in report["after_rtc"]] == before, "a refused grant changed /proc/ioports"
    granted = [tuple(e) for e in report["while_granted"]]
    assert (0x64, 0x64, "rsdrv:lp-kbd") in granted and (0x64, 0x64, "keyboard") not in granted, granted
    assert [tuple(e) for e in report["after_close"]] == before, "the placeholder was not put back"
    assert report["irq1_refused"], "0x60 was taken while IRQ 1 had a handler"
    assert (0x60, 0x60, "keyboard") in [tuple(e) for e in report["after_irq1"]]
    assert re.search(r'rsdrv: lp-kbd/\d+: io 0x64-0x64: took the unowned legacy placeholder .*"keyboard"', log), log
    assert re.search(r'rsdrv: lp-kbd/\d+: put back the legacy placeholder .*"keyboard"', log), log
    assert re.search(r"rsdrv: lp-kbd2/\d+: .*IRQ 1 has a handler", log), log
    bad = [line for line in log.splitlines() if BAD_LOG.search(line)]
    assert not bad, "guest kernel log:\n" + "\n".join(bad[:40])
