"""rsdrv robustness in the guest: >= 100k random ioctls/mmaps from an unprivileged process
leave no oops or warning in the kernel log, and the module unloads afterwards.

Needs $RSDRV_FUZZ (the rsdrv_fuzz binary built from kmod/rsdrv_fuzz.c by
tests/vm/test_kmod.py); $RSDRV_FUZZ_CALLS sets the count (default 100000).
"""
import os
import re
import subprocess

import pytest

from libdrv.rsdrv import Endpoint

NOBODY = 65534
BAD_LOG = re.compile(r"BUG:|WARNING:|Oops|Call Trace|general protection|kernel BUG|"
                     r"UBSAN|KASAN|refcount_t|list_(add|del) corruption|soft lockup")


@pytest.fixture(scope="module", autouse=True)
def rsdrv_module():
    if not os.path.exists("/sys/module/rsdrv"):
        ko = os.environ.get("RSDRV_KO")
        assert ko, "rsdrv is not loaded and $RSDRV_KO does not name a built rsdrv.ko"
        subprocess.run(["insmod", ko], check=True)


def kernel_log():
    """dmesg, without the reports of OOM kills: a memory cgroup reaching its memory.max
    (other tests in the same guest do that on purpose) prints a call trace that is no fault."""
    lines, in_oom_report = [], False
    for line in subprocess.run(["dmesg"], capture_output=True, text=True, check=True).stdout.splitlines():
        if "invoked oom-killer:" in line:
            in_oom_report = True
        if not in_oom_report:
            lines.append(line)
        if in_oom_report and "Killed process" in line:
            in_oom_report = False
    return "\n".join(lines) + "\n"


def _drop_to_nobody():
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


def test_fuzz_random_ioctls_unprivileged_leaves_no_oops():
    fuzz = os.environ.get("RSDRV_FUZZ")
    assert fuzz and os.access(fuzz, os.X_OK), \
        "$RSDRV_FUZZ must name the built rsdrv_fuzz binary (tests/vm/test_kmod.py builds it)"
    calls = int(os.environ.get("RSDRV_FUZZ_CALLS", "100000"))
    assert calls >= 100000 or os.environ.get("RSDRV_FUZZ_SHORT") == "1"
    log_before = kernel_log()

    a = Endpoint.open()
    a.set_label("fuzzA")
    a.allow_io(0x2F8, 8)
    a.allow_irq(3)
    a.allow_mem(0xB8000, 0x8000)
    a.allow_pci("0000:00:02.0")
    a.allow_grant_to("fuzzA")
    a.allow_grant_to("fuzzB")
    a.seal()
    b = Endpoint.open()
    b.set_label("fuzzB")
    b.allow_grant_to("fuzzA")
    b.seal()
    unsealed = Endpoint.open()
    fds = [a.fileno(), b.fileno(), unsealed.fileno()]
    try:
        r = subprocess.run([fuzz, "0x5eed", str(calls)] + [str(fd) for fd in fds],
                           pass_fds=fds, preexec_fn=_drop_to_nobody, capture_output=True,
                           text=True, timeout=600)
    finally:
        for ep in (a, b, unsealed):
            ep.close()
    assert r.returncode == 0, r.stderr
    m = re.search(r"calls (\d+) ok (\d+) failed (\d+)", r.stdout)
    assert m and int(m.group(1)) == calls, r.stdout
    assert int(m.group(2)) > 0 and int(m.group(3)) > 0, r.stdout   # both paths exercised
    after = kernel_log()
    new = after[len(log_before):] if after.startswith(log_before) else after
    bad = [line for line in new.splitlines() if BAD_LOG.search(line)]
    assert not bad, "kernel log after fuzzing:\n" + "\n".join(bad[:40])
    print(r.stdout)


def test_fuzz_from_four_processes_sharing_endpoints_leaves_no_oops():
    """The fuzzer sets up its endpoints as root, drops to nobody and forks: four processes
    hit the same endpoints at once (grants revoked while copied, IRQ bound while unbound)."""
    fuzz = os.environ.get("RSDRV_FUZZ")
    assert fuzz and os.access(fuzz, os.X_OK), "$RSDRV_FUZZ must name the built rsdrv_fuzz binary"
    calls = int(os.environ.get("RSDRV_FUZZ_CALLS", "100000"))
    log_before = kernel_log()
    r = subprocess.run([fuzz, "0xc0ffee", str(calls), "--setup", "4"], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "fuzzing as root" not in r.stderr
    m = re.search(r"procs 4 calls (\d+) ok (\d+) failed (\d+)", r.stdout)
    assert m and int(m.group(1)) == calls // 4, r.stdout
    after = kernel_log()
    new = after[len(log_before):] if after.startswith(log_before) else after
    bad = [line for line in new.splitlines() if BAD_LOG.search(line)]
    assert not bad, "kernel log after fuzzing:\n" + "\n".join(bad[:40])


def test_module_unloads_after_all_endpoints_are_closed_and_log_is_clean():
    log = kernel_log()
    bad = [line for line in log.splitlines() if BAD_LOG.search(line)]
    assert not bad, "kernel log:\n" + "\n".join(bad[:40])
    # Nothing left behind: no endpoint listed, no reference on the module.
    with open("/sys/kernel/debug/rsdrv/endpoints") as f:
        listing = f.read()
    assert "endpoint " not in listing, listing
    with open("/sys/module/rsdrv/refcnt") as f:
        assert f.read().strip() == "0"
    r = subprocess.run(["rmmod", "rsdrv"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert not os.path.exists("/sys/module/rsdrv")
    assert not os.path.exists("/dev/rsdrv")
