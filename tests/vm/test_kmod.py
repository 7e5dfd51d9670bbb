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
