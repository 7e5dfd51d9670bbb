"""A service attacks its containment, and rsd's defences refuse it.

The service is tests/host/services/hostile.py: run by a real rsd, as an
unprivileged dynamic uid, under the seccomp filter its spawner loads before
importing it, in the cgroup rsd gives it.
"""

import errno
import os
import signal
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "services"))
from rsdharness import HERE, alive, wait_for  # noqa: E402

HOSTILE = os.path.join(HERE, "hostile.py")
HOSTILE_AT_IMPORT = os.path.join(HERE, "hostile_at_import.py")


def cgroup_of(pid):
    with open("/proc/%d/cgroup" % pid) as f:
        return [ln[3:].strip() for ln in f if ln.startswith("0::")][0]


@pytest.fixture
def hostile(rsd):
    rsd.up(HOSTILE, label="hostile", period=0)
    return rsd


def test_each_service_runs_in_its_own_cgroup(hostile):
    rsd = hostile
    st = rsd.status("hostile")
    cg = rsd.service_cgroup("hostile")
    mount_rel = cgroup_of(st["pid"])
    assert os.path.join(cg, "run").endswith(mount_rel), (cg, mount_rel)
    assert mount_rel.endswith("/services/hostile/run")
    with open(os.path.join(cg, "run", "cgroup.procs")) as f:
        assert st["pid"] in [int(p) for p in f.read().split()]
    with open(os.path.join(cg, "spawner", "cgroup.procs")) as f:
        spawner_side = [int(p) for p in f.read().split()]
    assert os.getppid() not in spawner_side and len(spawner_side) >= 1  # the spawner (and its standby)
    assert rsd.ask("hostile", "cgroup")["cgroup"] == mount_rel


def test_a_double_forked_helper_dies_with_a_restart(hostile):
    rsd = hostile
    old = rsd.status("hostile")
    esc = rsd.ask("hostile", "escape")
    helper = esc["helper"]
    assert alive(helper)
    assert esc["helper_sid"] != esc["my_sid"], "the helper left the service's session and process group"
    r = rsd.rsctl("restart", "hostile")
    assert r.returncode == 0, r.stderr
    wait_for(lambda: not alive(helper), 5, what="the escaped helper to die with its incarnation")
    new = rsd.wait_generation("hostile", old["generation"])
    assert new["pid"] != old["pid"]


def test_a_double_forked_helper_dies_when_the_incarnation_crashes(hostile):
    rsd = hostile
    old = rsd.status("hostile")
    helper = rsd.ask("hostile", "escape")["helper"]
    os.kill(old["pid"], signal.SIGSEGV)
    rsd.wait_generation("hostile", old["generation"])
    assert not alive(helper), "the escaped helper outlived the incarnation that forked it"


def test_a_double_forked_helper_dies_with_rsctl_down(hostile):
    rsd = hostile
    st = rsd.status("hostile")
    helper = rsd.ask("hostile", "escape")["helper"]
    r = rsd.rsctl("down", "hostile")
    assert r.returncode == 0, r.stderr
    wait_for(lambda: not alive(helper), 5, what="the escaped helper to die with its service")
    assert not alive(st["pid"])
    wait_for(lambda: not os.path.exists(rsd.service_cgroup("hostile")), 5,
             what="the service's cgroup to be removed")


def test_the_standby_and_the_spawner_are_out_of_the_incarnations_reach(hostile):
    rsd = hostile
    uid = rsd.status("hostile")["uid"]
    # The spawner forks the standby when idle.
    wait_for(lambda: rsd.ask("hostile", "siblings")["standby"], 5, what="a standby child")
    out = rsd.ask("hostile", "siblings")
    assert out["standby"], out
    for pid, res in out["results"].items():
        # seccomp refuses ptrace outright ...
        assert res["ptrace"] == errno.EPERM, (pid, res)
        # ... and neither process is dumpable, so its memory file is root's and closed to the service.
        assert res["mem"] == errno.EACCES, (pid, res)
        assert os.stat("/proc/%s/mem" % pid).st_uid == 0
        assert os.stat("/proc/%s" % pid).st_uid == uid  # it is the service's uid all the same


def test_the_next_incarnation_is_the_standby_unaltered(hostile):
    rsd = hostile
    wait_for(lambda: rsd.ask("hostile", "siblings")["standby"], 5, what="a standby child")
    standby = rsd.ask("hostile", "siblings")["standby"][0]
    old = rsd.status("hostile")
    rsd.rsctl("restart", "hostile")
    new = rsd.wait_generation("hostile", old["generation"])
    assert new["pid"] == standby
    assert rsd.ask("hostile", "dumpable")["dumpable"] == 0


def test_seccomp_refuses_what_no_driver_needs(hostile):
    rsd = hostile
    out = rsd.ask("hostile", "syscalls")
    refused = {name: err for name, err in out.items()}
    for name, err in refused.items():
        assert err == errno.EPERM, "%s: errno %s, expected EPERM from the filter" % (name, err)
    # what drivers do need still works
    for name in ("fork", "thread", "socketpair"):
        assert rsd.ask("hostile", "call " + name) == {"errno": 0}, name


def test_seccomp_is_in_force_from_import_time(rsd):
    rsd.up(HOSTILE_AT_IMPORT, label="hostile", period=0)
    wait_for(lambda: "hostile import:" in rsd.service_log("hostile"), 5, what="the import-time report")
    line = [ln for ln in rsd.service_log("hostile").splitlines() if "hostile import:" in ln][0]
    assert line.endswith("EPERM"), line
    with open("/proc/%d/status" % rsd.status("hostile")["pid"]) as f:
        status = dict(ln.split(":\t", 1) for ln in f.read().splitlines() if ":\t" in ln)
    assert status["Seccomp"].strip() == "2"


@pytest.mark.parametrize("name", ["mount", "bpf", "init_module", "kexec_load", "ptrace", "unshare",
                                  "process_vm_writev", "perf_event_open", "keyctl"])
def test_each_denied_call_is_the_filters_doing(rsd, name):
    """With action = "kill" a denied call kills the caller with SIGSYS: proof that the refusal
    is the filter's, also for calls an unprivileged process would be refused anyway."""
    rsd.up(HOSTILE, label="hostile", period=0, sandbox={"action": "kill"})
    old = rsd.status("hostile")
    if name == "ptrace":  # made in a child (see hostile.py), which is killed instead
        assert rsd.ask("hostile", "syscall ptrace", timeout=5) == {"errno": -signal.SIGSYS}
        assert alive(old["pid"])
        return
    try:
        rsd.ask("hostile", "syscall " + name, timeout=5)
    except ValueError:
        pass  # no answer: it died
    st = rsd.wait_generation("hostile", old["generation"])
    assert st["last_failure"]["signal"] == signal.SIGSYS, st


def test_a_service_file_can_tighten_the_filter(rsd):
    rsd.up(HOSTILE, label="plain", period=0)
    assert rsd.ask("plain", "priority") == {"errno": 0}
    rsd.up(HOSTILE, label="hostile", period=0, sandbox={"deny": ["getpriority"]})
    assert rsd.ask("hostile", "priority") == {"errno": errno.EPERM}
    assert rsd.ask("hostile", "call fork") == {"errno": 0}


def test_an_unknown_syscall_name_is_refused_at_load(rsd):
    reply = rsd.request({"op": "up", "spec": {"label": "hostile", "program": HOSTILE,
                                              "sandbox": {"deny": ["no_such_call"]}}})
    assert not reply["ok"] and "no_such_call" in reply["error"] and "system call" in reply["error"]


def test_incarnations_are_not_dumpable_unless_asked(rsd):
    rsd.up(HOSTILE, label="hostile", period=0)
    assert rsd.ask("hostile", "dumpable")["dumpable"] == 0
    rsd.up(HOSTILE, label="dumps", period=0, dumpable=True)
    assert rsd.ask("dumps", "dumpable")["dumpable"] == 1


def test_two_services_may_not_share_a_uid_unless_both_say_so(rsd):
    rsd.up(HOSTILE, label="one", period=0, user="nobody")
    reply = rsd.request({"op": "up", "spec": {"label": "two", "program": HOSTILE, "user": "nobody"}})
    assert not reply["ok"]
    assert "like service one" in reply["error"] and "shared_user" in reply["error"]
    assert rsd.status("one")["state"] == "up"
    rsd.rsctl("down", "one")
    rsd.up(HOSTILE, label="one", period=0, user="nobody", shared_user=True)
    rsd.up(HOSTILE, label="two", period=0, user="nobody", shared_user=True)
    assert rsd.status("two")["uid"] == rsd.status("one")["uid"] == 65534


def test_a_dumpable_service_may_not_share_its_uid(rsd):
    reply = rsd.request({"op": "up", "spec": {"label": "d", "program": HOSTILE, "user": "nobody",
                                              "shared_user": True, "dumpable": True}})
    assert not reply["ok"] and "dumpable" in reply["error"]


def test_a_limit_that_cannot_be_enforced_is_an_error_not_a_silence(rsd):
    """On this host cgroup v2 has no memory controller (it is in v1): asking for memory_max must
    fail clearly.  (The limits themselves are enforced in the testbed guest: tests/vm.)"""
    with open(os.path.join(rsd.cgroup_root, "services", "cgroup.controllers")) as f:
        controllers = f.read().split()
    reply = rsd.request({"op": "up", "spec": {"label": "big", "program": HOSTILE,
                                              "limits": {"memory_max": "64M"}}})
    if "memory" in controllers:
        assert reply["ok"], reply
        with open(os.path.join(rsd.service_cgroup("big"), "memory.max")) as f:
            assert f.read().strip() == str(64 << 20)
    else:
        assert not reply["ok"] and "memory controller" in reply["error"], reply


def test_a_restarted_rsd_still_kills_the_whole_cgroup_of_what_it_adopted(hostile):
    rsd = hostile
    old = rsd.status("hostile")
    helper = rsd.ask("hostile", "escape")["helper"]
    rsd.proc.kill()
    rsd.proc.wait()
    rsd.start()
    st = wait_for(lambda: rsd.status("hostile")["state"] == "up" and rsd.status("hostile"), 10,
                  what="the service adopted")
    assert st["pid"] == old["pid"] and alive(helper)
    r = rsd.rsctl("restart", "hostile")
    assert r.returncode == 0, r.stderr
    wait_for(lambda: not alive(helper), 5, what="the escaped helper to die with the adopted incarnation")


def test_without_cgroup_v2_rsd_says_so_and_falls_back_to_process_groups(ds):
    """rsd in a mount namespace with no cgroup2 mounted: a loud warning at start, and services
    still run and restart (contained by process group only)."""
    from rsdharness import RsdDaemon
    from rsd.cgroup import cgroup2_mount
    hide = "umount -l %s && exec \"$@\"" % cgroup2_mount()
    d = RsdDaemon(ds, argv_prefix=["unshare", "--mount", "--propagation", "private", "sh", "-c", hide, "sh"],
                  cgroups=False).start()
    try:
        assert "NO CGROUP CONTAINMENT" in d.log() and "no cgroup v2 hierarchy is mounted" in d.log(), d.log()
        d.up(HOSTILE, label="hostile", period=0)
        old = d.status("hostile")
        os.kill(old["pid"], signal.SIGKILL)
        d.wait_generation("hostile", old["generation"])
    finally:
        d.cleanup()


def test_a_cgroup_root_that_is_no_cgroup_is_an_error(ds, tmp_path):
    from rsdharness import RsdDaemon
    d = RsdDaemon(ds, extra_env={"RSD_CGROUP_ROOT": str(tmp_path)})
    try:
        with pytest.raises(AssertionError) as err:
            d.start(timeout=5)
        assert "is not in a cgroup v2 hierarchy" in str(err.value), str(err.value)
    finally:
        d.cleanup()


def test_an_incarnation_found_outside_its_cgroup_at_adoption_is_replaced(hostile):
    """As if the predecessor died between the spawn and the placement: the adopting rsd must
    not take over an incarnation that runs (or would run) outside the cgroup it kills."""
    rsd = hostile
    old = rsd.status("hostile")
    rsd.proc.kill()
    rsd.proc.wait()
    with open(os.path.join(rsd.service_cgroup("hostile"), "spawner", "cgroup.procs"), "w") as f:
        f.write(str(old["pid"]))  # out of run/
    rsd.start()
    wait_for(lambda: not alive(old["pid"]), 5, what="the unplaced incarnation killed")
    new = rsd.wait_generation("hostile", old["generation"], timeout=10)
    assert new["pid"] != old["pid"]
    with open(os.path.join(rsd.service_cgroup("hostile"), "run", "cgroup.procs")) as f:
        assert new["pid"] in [int(p) for p in f.read().split()]
    assert "was never placed in its cgroup" in rsd.log()
