"""rsd supervising real processes: privilege, crashes, exits, hangs, policy, DS."""

import os
import signal
import socket
import stat
import sys
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "services"))
from rsdharness import PROBE, RsdDaemon, wait_for  # noqa: E402

from libdrv.svcstate import parse_drv, parse_label  # noqa: E402


def test_service_runs_unprivileged_with_only_what_rsd_hands_it(rsd):
    up = rsd.up(period=1)
    info = rsd.ask("probe", "info")
    assert info["pid"] == up["pid"]
    uid = info["uid"][0]
    assert uid >= rsd.uid_base and info["uid"] == [uid] * 3 and info["gid"] == [uid] * 3
    assert info["groups"] == []
    st = info["status"]
    for field in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(st[field], 16) == 0, (field, st[field])
    assert st["NoNewPrivs"] == "1"
    assert info["pdeathsig"] == signal.SIGKILL
    assert info["pgid"] == info["pid"] == info["sid"]
    # Clean environment: only what rsd sets.
    assert set(info["env"]) <= {"PATH", "LANG", "HOME", "RSD_LABEL", "PYTHONDONTWRITEBYTECODE",
                                "RSD_DS_SOCKET", "RSD_CONTROL_FD", "RSD_LISTEN_FD", "RSD_GENERATION",
                                "RSD_LISTEN_PATH", "RSD_RESOURCE_FDS", "RSD_RUNTIME_DIR"}
    assert info["env"]["RSD_LABEL"] == "probe" and info["env"]["RSD_CONTROL_FD"] == "3"
    # Only stdin/out/err, the control channel and the listening socket (plus the
    # directory fd the listing itself uses).
    extra = set(info["fds_at_start"]) - {0, 1, 2, 3, 4}
    assert len(extra) <= 1, info["fds_at_start"]
    assert {0, 1, 2, 3, 4} <= set(info["fds_at_start"])
    # The listening socket is rsd's: root-owned, group = the service's gid, 0660.
    s = os.stat(rsd.sock_path("probe"))
    assert stat.S_ISSOCK(s.st_mode) and stat.S_IMODE(s.st_mode) == 0o660
    assert (s.st_uid, s.st_gid) == (0, uid)
    # rsd's control socket is root-only.
    assert stat.S_IMODE(os.stat(rsd.socket_path).st_mode) == 0o600


def test_two_services_get_distinct_dynamic_uids(rsd):
    rsd.up(label="one")
    rsd.up(label="two")
    assert rsd.ask("one", "info")["uid"][0] != rsd.ask("two", "info")["uid"][0]


@pytest.mark.parametrize("sig", [signal.SIGSEGV, signal.SIGABRT, signal.SIGKILL, signal.SIGBUS,
                                 signal.SIGFPE, signal.SIGILL, signal.SIGUSR1])
def test_crash_by_signal_restarts_at_once_with_new_generation(rsd, sig):
    first = rsd.up(backoff=False)
    rsd.ask("probe", "crash %d" % sig)
    st = rsd.wait_generation("probe", first["generation"])
    assert st["pid"] != first["pid"]
    assert st["generation"] == first["generation"] + 1
    assert st["last_failure"]["reason"] == "signal"
    assert st["last_failure"]["signal"] == sig
    info = rsd.ask("probe", "info")
    assert (info["init_type"], info["reason"], info["generation"]) == ("restart", "signal", st["generation"])


@pytest.mark.parametrize("code", [0, 1, 3, 255])
def test_exit_status_is_a_failure_named_exit(rsd, code):
    first = rsd.up(backoff=False)
    rsd.ask("probe", "exit %d" % code)
    st = rsd.wait_generation("probe", first["generation"])
    assert st["last_failure"]["reason"] == "exit"
    assert st["last_failure"]["exit_status"] == code
    assert st["last_failure"]["signal"] is None


@pytest.mark.parametrize("how", ["spin", "block"])
def test_hang_is_detected_within_two_periods(rsd, how):
    period = 0.2
    first = rsd.up(period=period, backoff=False)
    time.sleep(period * 1.5)  # a few heartbeats answered first
    assert rsd.status("probe")["generation"] == first["generation"]
    t0 = time.monotonic()
    rsd.ask("probe", how)
    st = rsd.wait_generation("probe", first["generation"], timeout=5)
    detected = time.monotonic() - t0
    assert st["last_failure"]["reason"] == "no-heartbeat"
    assert st["last_failure"]["signal"] == signal.SIGKILL
    assert detected <= 2 * period + 0.15, "hang noticed after %.3f s" % detected


def test_backoff_first_restart_at_once_then_two_seconds(rsd):
    first = rsd.up()  # backoff on by default
    rsd.ask("probe", "crash 11")
    t0 = time.monotonic()
    second = rsd.wait_generation("probe", first["generation"], timeout=2)
    assert time.monotonic() - t0 < 0.5
    assert second["restarts"] == 1
    rsd.ask("probe", "crash 11")
    t1 = time.monotonic()
    wait_for(lambda: rsd.status("probe")["state"] == "restarting", 2, what="restarting")
    time.sleep(1.5)
    assert rsd.status("probe")["state"] == "restarting", "restarted before its 2 s backoff"
    third = rsd.wait_generation("probe", second["generation"], timeout=3)
    waited = time.monotonic() - t1
    assert 1.9 <= waited <= 2.6, waited
    assert third["restarts"] == 2


def test_no_backoff_restarts_at_once_every_time(rsd):
    st = rsd.up(backoff=False)
    for i in range(5):
        rsd.ask("probe", "crash 11")
        t0 = time.monotonic()
        st = rsd.wait_generation("probe", st["generation"], timeout=2)
        assert time.monotonic() - t0 < 0.5
    assert st["restarts"] == 5 and st["restarts_total"] == 5


def test_restart_count_decays_after_stable_uptime(rsd):
    first = rsd.up(stable_uptime=0.3)
    rsd.ask("probe", "crash 11")
    second = rsd.wait_generation("probe", first["generation"], timeout=2)
    assert second["restarts"] == 1
    time.sleep(0.5)  # stable: forgiven
    rsd.ask("probe", "crash 11")
    t0 = time.monotonic()
    third = rsd.wait_generation("probe", second["generation"], timeout=2)
    assert time.monotonic() - t0 < 0.5, "backoff applied although the service had been stable"
    assert third["restarts"] == 1


def _script(rsd, name, body):
    path = os.path.join(rsd.policy_dir, name)
    with open(path, "w") as f:
        f.write("#!/bin/sh\n" + body)
    os.chmod(path, 0o755)
    return path


def test_policy_script_gets_args_and_env_and_rsd_does_not_restart(rsd):
    out = os.path.join(rsd.base, "script.out")
    _script(rsd, "record", 'echo "$@|$RS_LABEL|$RS_REASON|$RS_RESTARTS|$RS_EXIT_STATUS|$RS_SIGNAL|$RS_PID" > %s.tmp\n'
            'mv %s.tmp %s\necho policy says hello\n' % (out, out, out))
    first = rsd.up(script="record")
    rsd.ask("probe", "exit 7")
    line = wait_for(lambda: os.path.exists(out) and open(out).read().strip(), 5, what="script output")
    assert line == "probe exit 0|probe|exit|0|7||%d" % first["pid"]
    time.sleep(0.5)
    st = rsd.status("probe")
    assert st["state"] == "deciding" and st["pid"] is None, "rsd restarted on its own"
    wait_for(lambda: "policy script: policy says hello" in rsd.log(), 3, what="script output in rsd's log")


def test_policy_script_restarts_with_rsctl_and_count_grows(rsd):
    log = os.path.join(rsd.base, "calls")
    _script(rsd, "again", 'echo "$3" >> %s\nexec rsctl restart "$1"\n' % log)
    first = rsd.up(script="again")
    rsd.ask("probe", "crash 6")
    second = rsd.wait_generation("probe", first["generation"], timeout=5)
    assert second["last_failure"]["reason"] == "signal" and second["last_failure"]["signal"] == 6
    rsd.ask("probe", "crash 6")
    third = rsd.wait_generation("probe", second["generation"], timeout=5)
    assert third["restarts"] == 2
    assert open(log).read().split() == ["0", "1"]


def test_policy_script_timeout_kills_it(rsd):
    _script(rsd, "slow", "sleep 30\n")
    rsd.up(script="slow", script_timeout=0.3)
    rsd.ask("probe", "exit 1")
    wait_for(lambda: "policy script still running after its timeout" in rsd.log(), 3, what="timeout")
    wait_for(lambda: "policy script exited with status -9" in rsd.log(), 3, what="script reaped")


def test_init_failure_at_first_start_is_reported_and_service_is_failed(rsd):
    reply = rsd.request({"op": "up", "spec": {"label": "bad", "program": PROBE, "args": ["--init-fail"]}})
    assert not reply["ok"]
    assert "bad failed to start: init-failed" in reply["error"]
    assert "RuntimeError: init failure requested" in rsd.service_log("bad")
    st = rsd.status("bad")
    assert (st["state"], st["pid"]) == ("failed", None) and "bad failed to start" in st["gave_up"]["why"]
    assert not os.path.exists(rsd.sock_path("bad"))


def test_init_timeout_kills_a_service_that_never_says_ready(rsd):
    t0 = time.monotonic()
    reply = rsd.request({"op": "up", "spec": {"label": "slow", "program": PROBE, "args": ["--init-hang"],
                                              "init_timeout": 0.4}})
    assert not reply["ok"] and "init-timeout" in reply["error"]
    assert time.monotonic() - t0 < 2.0


def test_init_failure_after_a_crash_goes_through_the_policy(rsd):
    first = rsd.up(args=["--fail-restart-init"])
    rsd.ask("probe", "crash 11")
    st = wait_for(lambda: (lambda s: s if s["last_failure"] and s["last_failure"]["reason"] == "init-failed"
                           else None)(rsd.status("probe")), 3, what="init-failed")
    assert st["state"] == "restarting" and st["generation"] == first["generation"] + 1


def test_ready_published_only_after_init(rsd):
    c = rsd.ds.client()
    sub = c.subscribe(r"drv\.server\.slowinit")
    reply_box = {}
    import threading
    t = threading.Thread(target=lambda: reply_box.update(
        r=rsd.request({"op": "up", "spec": {"label": "slowinit", "program": PROBE, "args": ["--init-sleep", "0.5"]}})))
    t.start()
    wait_for(lambda: rsd.request({"op": "status"})["services"], 3, what="service listed")
    st = rsd.status("slowinit")
    assert st["state"] in ("starting", "initialising")
    assert c.get("drv.server.slowinit") is None  # not up while initialising
    t.join(10)
    assert reply_box["r"]["ok"]
    notes = c.get_notifications(2)
    assert [n.value for n in notes if n.sub == sub] == ["up %d" % reply_box["r"]["generation"]]
    c.close()


def test_ds_keys_generation_and_state_kept_on_crash_purged_on_down(rsd):
    c = rsd.ds.client()
    first = rsd.up(backoff=False, **{"class": "net"})
    lab = parse_label(c.get("label.probe"))
    assert lab["pid"] == first["pid"] and lab["generation"] == first["generation"]
    assert lab["uid"] == rsd.ask("probe", "info")["uid"][0]
    assert parse_drv(c.get("drv.net.probe")) == ("up", first["generation"])
    rsd.ask("probe", "save color blue")
    sub = c.subscribe(r"drv\.net\.probe")
    rsd.ask("probe", "crash 11")
    second = rsd.wait_generation("probe", first["generation"])
    values = []
    wait_for(lambda: values.extend(n.value for n in c.get_notifications(0.1)) or
             ("up %d" % second["generation"]) in values, 3, what="up notification")
    assert values == ["restarting %d" % first["generation"], "up %d" % second["generation"]]
    # The new incarnation reads its backed-up state (and DS knows it by its label).
    assert rsd.ask("probe", "load color")["value"] == "blue"
    assert parse_label(c.get("label.probe"))["pid"] == second["pid"]
    assert rsd.request({"op": "down", "label": "probe"})["ok"]
    assert parse_drv(c.get("drv.net.probe")) == ("down", second["generation"])
    assert c.get("label.probe") is None
    assert [e.key for e in c.list(r"state\.probe\..*")] == []
    # A later `up` continues the generation sequence.
    again = rsd.up(**{"class": "net"})
    assert again["generation"] == second["generation"] + 1
    c.close()


def test_rsd_keeps_serving_others_while_one_crash_loops(rsd):
    loop = rsd.up(label="looper", args=["--crash-after", "0.01"], backoff=False)
    steady = rsd.up(label="steady", period=0.1)
    t_end = time.monotonic() + 1.5
    answers = 0
    while time.monotonic() < t_end:
        assert rsd.ask("steady", "info")["pid"] == steady["pid"]
        answers += 1
        time.sleep(0.02)
    assert rsd.status("steady")["generation"] == steady["generation"]
    assert rsd.status("steady")["last_failure"] is None
    assert rsd.status("looper")["generation"] > loop["generation"] + 10
    assert answers > 20


def test_listening_socket_survives_restarts_and_clients_wait_in_backlog(rsd):
    first = rsd.up(backoff=False)
    ino = os.stat(rsd.sock_path("probe")).st_ino
    os.kill(first["pid"], signal.SIGKILL)
    # Connect immediately: the client waits in the backlog and the new incarnation answers.
    info = rsd.ask("probe", "info")
    assert info["pid"] != first["pid"] and info["init_type"] == "restart"
    assert os.stat(rsd.sock_path("probe")).st_ino == ino


def test_down_sends_sigterm_then_sigkill_after_two_seconds(rsd):
    rsd.up(label="polite")
    t0 = time.monotonic()
    assert rsd.request({"op": "down", "label": "polite"})["ok"]
    assert time.monotonic() - t0 < 1.0  # SEF exits cleanly on SIGTERM
    rsd.up(label="stubborn", args=["--ignore-term"])
    t0 = time.monotonic()
    assert rsd.request({"op": "down", "label": "stubborn"})["ok"]
    assert 1.9 <= time.monotonic() - t0 <= 3.0


def test_operator_restart_is_a_refresh_not_a_failure(rsd):
    first = rsd.up()
    reply = rsd.request({"op": "restart", "label": "probe"})
    assert reply["ok"] and reply["generation"] == first["generation"] + 1 and reply["pid"] != first["pid"]
    assert reply["restarts"] == 0 and reply["last_failure"] is None
    info = rsd.ask("probe", "info")
    assert (info["init_type"], info["reason"]) == ("restart", "refresh")


def test_fault_injection_through_the_control_channel(rsd):
    st = rsd.up(period=0.2, backoff=False)
    for kind, reason in (("crash", "signal"), ("exit", "exit"), ("hang", "no-heartbeat")):
        assert rsd.request({"op": "fi", "label": "probe", "kind": kind})["ok"]
        st = rsd.wait_generation("probe", st["generation"], timeout=3)
        assert st["last_failure"]["reason"] == reason


def test_spawner_death_is_survived(rsd):
    first = rsd.up(backoff=False)
    spawner = rsd.ask("probe", "info")["ppid"]
    os.kill(spawner, signal.SIGKILL)
    st = rsd.wait_generation("probe", first["generation"], timeout=5)
    info = rsd.ask("probe", "info")
    assert info["ppid"] != spawner and info["pid"] == st["pid"]


def test_executable_program_speaking_the_protocol(rsd):
    exe = os.path.join(rsd.base, "probe-exe")
    with open(exe, "w") as f:
        f.write("#!%s\nimport sys\nsys.path.insert(0, %r)\nimport probe\nsys.exit(probe.main())\n"
                % (sys.executable, os.path.dirname(PROBE)))
    os.chmod(exe, 0o755)
    first = rsd.up(program=exe, label="exe", backoff=False)
    info = rsd.ask("exe", "info")
    assert info["argv"][0] == exe and info["status"]["NoNewPrivs"] == "1"
    rsd.ask("exe", "crash 11")
    rsd.wait_generation("exe", first["generation"])


def test_watchdog_pings_when_systemd_asks(ds):
    d = RsdDaemon(ds, extra_env={"WATCHDOG_USEC": "200000"}).start()
    try:
        got = []
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            try:
                got.append(d.notify.recv(4096).decode())
            except socket.timeout:
                pass
        assert sum("WATCHDOG=1" in g for g in d.notifications + got) >= 5
    finally:
        d.cleanup()


def test_ds_restart_is_survived_and_keys_republished(rsd):
    first = rsd.up(backoff=False)
    rsd.ds.kill9()
    rsd.ask("probe", "crash 11")  # supervision goes on without DS
    second = rsd.wait_generation("probe", first["generation"])
    rsd.ds.start()
    c = rsd.ds.client()
    wait_for(lambda: c.get("drv.server.probe") == "up %d" % second["generation"], 5, what="resync")
    assert parse_label(c.get("label.probe"))["pid"] == second["pid"]
    c.close()


def test_a_dependent_waits_until_its_dependency_is_up(rsd):
    with open(os.path.join(rsd.services_dir, "base.toml"), "w") as f:
        f.write('program = "%s"\nargs = ["--init-sleep", "0.5"]\n' % PROBE)
    with open(os.path.join(rsd.services_dir, "top.toml"), "w") as f:
        f.write('program = "%s"\ndepends_on = ["base"]\n' % PROBE)
    reply = rsd.request({"op": "reload"})
    assert reply["started"] == ["base", "top"] and reply["errors"] == []
    assert rsd.status("base")["state"] in ("starting", "initialising")
    assert rsd.status("top")["state"] == "waiting" and rsd.status("top")["pid"] is None
    wait_for(lambda: rsd.status("top")["state"] == "up", 5, what="top up")
    assert rsd.status("base")["state"] == "up"
    assert rsd.ask("top", "info")["pid"] == rsd.status("top")["pid"]


def _kill_rsd(rsd):
    rsd.proc.kill()
    rsd.proc.wait()
    rsd.notify.close()


def test_services_outlive_a_killed_rsd_and_a_new_rsd_adopts_them(rsd):
    with open(os.path.join(rsd.services_dir, "filed.toml"), "w") as f:
        f.write('program = "%s"\nperiod = 0.2\nclass = "blk"\n' % PROBE)
    rsd.request({"op": "reload"})
    filed = rsd.wait_generation("filed", 0)
    adhoc = rsd.up(label="adhoc", backoff=False, args=["--init-sleep", "0.01"])
    rsd.ask("adhoc", "save k v")
    _kill_rsd(rsd)
    time.sleep(0.3)
    # Still serving without rsd (same processes).
    assert rsd.ask("filed", "info")["pid"] == filed["pid"]
    assert rsd.ask("adhoc", "info")["pid"] == adhoc["pid"]
    rsd.start()
    for old in (filed, adhoc):
        st = rsd.status(old["label"])
        assert (st["pid"], st["generation"], st["state"]) == (old["pid"], old["generation"], "up")
    assert rsd.status("adhoc")["source"] == "rsctl up" and rsd.status("filed")["period"] == 0.2
    assert "adopted (pid %d, generation %d)" % (adhoc["pid"], adhoc["generation"]) in rsd.log()
    c = rsd.ds.client()
    wait_for(lambda: c.get("drv.blk.filed") == "up %d" % filed["generation"], 3, what="drv key")
    c.close()
    # Heartbeats resume: a hang is still caught; crashes still restart.
    t0 = time.monotonic()
    rsd.ask("filed", "spin")
    st = rsd.wait_generation("filed", filed["generation"], timeout=3)
    assert st["last_failure"]["reason"] == "no-heartbeat" and time.monotonic() - t0 < 0.6
    rsd.ask("adhoc", "crash 11")
    st = rsd.wait_generation("adhoc", adhoc["generation"])
    info = rsd.ask("adhoc", "info")
    assert info["argv"][1:] == ["--init-sleep", "0.01"] and info["reason"] == "signal"
    assert rsd.ask("adhoc", "load k")["value"] == "v"


def test_orphans_die_after_the_timeout_and_a_new_rsd_starts_again_and_cleans_up(ds):
    rsd = RsdDaemon(ds, orphan_timeout=0.5).start()
    try:
        with open(os.path.join(rsd.services_dir, "filed.toml"), "w") as f:
            f.write('program = "%s"\n' % PROBE)
        rsd.request({"op": "reload"})
        filed = rsd.wait_generation("filed", 0)
        adhoc = rsd.up(label="adhoc")
        spawner = rsd.ask("adhoc", "info")["ppid"]
        c = rsd.ds.client()
        c.publish("drv.net.ghost", "up 7")  # as a long-gone rsd would have left it
        c.publish("label.ghost", "pid=1 generation=7 uid=1")
        _kill_rsd(rsd)
        for pid in (filed["pid"], adhoc["pid"], spawner):
            wait_for(lambda: not os.path.exists("/proc/%d" % pid), 3, what="pid %d gone" % pid)
        rsd.start()
        # services.d and `rsctl up` services start again, with the next generation.
        for old in (filed, adhoc):
            again = rsd.wait_generation(old["label"], old["generation"])
            assert again["pid"] != old["pid"]
            wait_for(lambda: c.get("drv.server.%s" % old["label"]) == "up %d" % again["generation"], 3,
                     what="drv key")
        wait_for(lambda: c.get("drv.net.ghost") == "down 7", 3, what="stale key down")
        assert c.get("label.ghost") is None
        c.close()
    finally:
        rsd.cleanup()


def test_no_adoption_socket_is_open_while_rsd_runs(rsd):
    """A new rsd opens one only for each spawner it waits for (tests/host/test_rsd_trust.py)."""
    rsd.up()
    d = os.path.join(rsd.runtime_dir, "adopt")
    st = os.stat(d)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o755) and os.listdir(d) == []
    assert not os.path.exists(os.path.join(rsd.runtime_dir, "adopt.sock"))
    assert rsd.request({"op": "status"})["ok"]


def test_rsctl_up_services_between_incarnations_come_back_under_a_new_rsd(rsd):
    st = rsd.up(label="between")  # backoff: the second crash waits 2 s
    rsd.ask("between", "crash 11")
    st = rsd.wait_generation("between", st["generation"])
    rsd.ask("between", "crash 11")
    wait_for(lambda: rsd.status("between")["state"] == "restarting", 3, what="backoff")
    _kill_rsd(rsd)
    rsd.start()
    again = rsd.wait_generation("between", st["generation"], timeout=5)
    assert rsd.ask("between", "info")["reason"] == "rsd-restart"
    # A deliberate shutdown forgets `rsctl up` services.
    assert rsd.request({"op": "shutdown"})["ok"]
    rsd.proc.wait(5)
    rsd.notify.close()
    rsd.start()
    assert rsd.request({"op": "status"})["services"] == []
    assert again["generation"] > st["generation"]


def test_configured_user_instead_of_a_dynamic_uid(rsd):
    rsd.up(label="asnobody", user="nobody")
    info = rsd.ask("asnobody", "info")
    assert info["uid"] == [65534] * 3 and info["groups"] == []
    assert rsd.status("asnobody")["uid"] == 65534


def test_restart_during_backoff_starts_now_and_counts_it(rsd):
    st = rsd.up()
    rsd.ask("probe", "crash 11")
    st = rsd.wait_generation("probe", st["generation"])
    rsd.ask("probe", "crash 11")
    wait_for(lambda: rsd.status("probe")["state"] == "restarting", 3, what="backoff")
    t0 = time.monotonic()
    reply = rsd.request({"op": "restart", "label": "probe"})
    assert reply["ok"] and time.monotonic() - t0 < 1.0
    assert reply["generation"] == st["generation"] + 1 and reply["restarts"] == 2


def test_status_reports_uptime_and_last_failure_time(rsd):
    st = rsd.up(backoff=False)
    time.sleep(0.3)
    assert rsd.status("probe")["uptime"] >= 0.3
    before = time.time()
    rsd.ask("probe", "exit 4")
    st = rsd.wait_generation("probe", st["generation"])
    f = st["last_failure"]
    assert before - 0.1 <= f["time"] <= time.time() and f["pid"] is not None
    assert st["uptime"] < 0.5


def test_a_new_rsd_clears_stale_keys_past_the_first_list_page(ds):
    """DS answers list in pages of ~256 KiB: every page of stale keys is cleaned, not the first."""
    c = ds.client()
    ghosts = ["label.ghost%02d" % i for i in range(16)]
    for key in ghosts:  # ~32 KiB each: about two pages in all
        c.publish(key, "pid=1 generation=7 uid=1 " + "x" * (32 << 10))
    rsd = RsdDaemon(ds).start()
    try:
        for key in ghosts:
            wait_for(lambda: c.get(key) is None, 5, what="%s deleted" % key)
    finally:
        rsd.cleanup()
        c.close()
