"""rsctl, as an operator runs it, against a real rsd: every verb and bad input."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "services"))
from rsdharness import PROBE, RSCTL, RsdDaemon, wait_for  # noqa: E402


def ok(r):
    assert r.returncode == 0, "rsctl failed (%d): %s%s" % (r.returncode, r.stdout, r.stderr)
    return r


def test_up_status_fi_restart_down(rsd):
    r = ok(rsd.rsctl("up", PROBE, "--label", "p1", "--period", "0.5", "--no-backoff", "--class", "chr",
                     "--args", "--init-sleep 0.01"))
    assert r.stdout.startswith("p1 up (pid ")
    st = json.loads(ok(rsd.rsctl("status", "p1", "--json")).stdout)
    assert (st["label"], st["state"], st["class"], st["period"]) == ("p1", "up", "chr", 0.5)
    assert rsd.ask("p1", "info")["argv"][1:] == ["--init-sleep", "0.01"]
    table = ok(rsd.rsctl("status")).stdout.splitlines()
    assert table[0].split()[:5] == ["LABEL", "PID", "STATE", "GEN", "RESTARTS"]
    assert table[1].split()[:3] == ["p1", str(st["pid"]), "up"]
    r = ok(rsd.rsctl("fi", "p1", "--crash"))
    assert "injected crash into p1" in r.stdout
    st2 = rsd.wait_generation("p1", st["generation"])
    assert st2["last_failure"]["reason"] == "signal"
    line = ok(rsd.rsctl("status")).stdout.splitlines()[1]
    assert "signal," in line and line.split()[4] == "1"
    r = ok(rsd.rsctl("restart", "p1"))
    assert r.stdout.startswith("p1 restarted (pid ")
    assert rsd.status("p1")["generation"] == st2["generation"] + 1
    r = ok(rsd.rsctl("down", "p1"))
    assert r.stdout.strip() == "p1 down"
    assert json.loads(ok(rsd.rsctl("status", "--json")).stdout) == []


def test_fi_hang_and_exit(rsd):
    st = rsd.up(period=0.2, backoff=False)
    ok(rsd.rsctl("fi", "probe", "--hang"))
    st = rsd.wait_generation("probe", st["generation"], timeout=3)
    assert st["last_failure"]["reason"] == "no-heartbeat"
    ok(rsd.rsctl("fi", "probe", "--exit"))
    st = rsd.wait_generation("probe", st["generation"], timeout=3)
    assert st["last_failure"]["reason"] == "exit" and st["last_failure"]["exit_status"] == 1


def test_service_arguments_after_a_double_dash(rsd):
    ok(rsd.rsctl("up", PROBE, "--label", "dd", "--args", "first", "--", "--init-sleep", "0.01", "-x"))
    assert rsd.ask("dd", "info")["argv"][1:] == ["first", "--init-sleep", "0.01", "-x"]


def test_label_defaults_to_the_program_name(rsd):
    r = ok(rsd.rsctl("up", PROBE))
    assert r.stdout.startswith("probe up")


@pytest.mark.parametrize("args, words", [
    (("down", "ghost"), "no service labelled 'ghost' (see `rsctl status`)"),
    (("restart", "ghost"), "no service labelled 'ghost'"),
    (("status", "ghost"), "no service labelled 'ghost'"),
    (("fi", "ghost"), "no service labelled 'ghost'"),
    (("up", "/no/such/driver.py"), "/no/such/driver.py does not exist"),
    (("up", PROBE, "--class", "gpu"), "key 'class': must be one of net, blk, chr, server"),
    (("up", PROBE, "--period", "-1"), "key 'period': must be >= 0"),
    (("up", PROBE, "--label", "9lives"), "is not a valid label"),
    (("up", PROBE, "--args", "'unclosed"), "--args is not valid shell quoting"),
    (("up", "no_such_module_xyz"), "cannot load no_such_module_xyz: ModuleNotFoundError"),
    (("up", PROBE, "--args=--init-fail"), "probe failed to start: init-failed"),
    (("up", PROBE, "--depends-on", "nothere"), "depends on nothere, which is not running"),
])
def test_bad_input_says_what_to_do(rsd, args, words):
    r = rsd.rsctl(*args)
    assert r.returncode != 0
    assert words in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_up_twice_and_fi_on_a_service_that_is_not_up(rsd):
    rsd.up(script=None)
    r = rsd.rsctl("up", PROBE)
    assert r.returncode == 1 and "already running; use `rsctl restart probe`" in r.stderr
    rsd.rsctl("up", PROBE, "--label", "sleepy", "--args", "--init-sleep 1")  # waits for ready
    rsd.ask("sleepy", "exit 1")
    wait_for(lambda: rsd.status("sleepy")["state"] != "up", 2, what="not up")
    r = rsd.rsctl("fi", "sleepy")
    assert r.returncode == 1 and "not up" in r.stderr
    r = rsd.rsctl("fi", "probe", "--hang")
    assert r.returncode == 1 and "has no heartbeat (period 0)" in r.stderr


def test_rsd_not_running(tmp_path):
    env = dict(os.environ, RSD_RUNTIME_DIR=str(tmp_path))
    import subprocess
    r = subprocess.run([RSCTL, "status"], capture_output=True, text=True, env=env, timeout=20)
    assert r.returncode == 1
    assert "rsd is not running (no socket at %s/rsd.sock)" % tmp_path in r.stderr
    assert "systemctl start rsd" in r.stderr


def test_control_socket_refuses_non_root(rsd):
    r = rsd.rsctl("status", user=65534)
    assert r.returncode == 1 and "rsctl must run as root" in r.stderr


def test_reload_starts_changes_and_stops_file_services(rsd):
    def write(name, text):
        with open(os.path.join(rsd.services_dir, name), "w") as f:
            f.write(text)
    write("alpha.toml", 'program = "%s"\nperiod = 1\n' % PROBE)
    write("beta.toml", 'program = "%s"\ndepends_on = ["alpha"]\n' % PROBE)
    write("broken.toml", 'program = "%s"\nperiod = "often"\n' % PROBE)
    r = rsd.rsctl("reload")
    assert r.returncode == 1  # an error to report, but the good files were applied
    assert "started: alpha, beta" in r.stdout
    assert "broken.toml:2: key 'period': must be a number of seconds" in r.stderr
    wait_for(lambda: rsd.status("beta")["state"] == "up", 5, what="beta up after alpha")
    alpha = rsd.status("alpha")
    assert alpha["state"] == "up"
    write("alpha.toml", 'program = "%s"\nperiod = 2\n' % PROBE)
    os.unlink(os.path.join(rsd.services_dir, "beta.toml"))
    os.unlink(os.path.join(rsd.services_dir, "broken.toml"))
    reply = json.loads(ok(rsd.rsctl("reload", "--json")).stdout)
    assert (reply["changed"], reply["stopped"], reply["errors"]) == (["alpha"], ["beta"], [])
    st = rsd.wait_generation("alpha", alpha["generation"])
    assert st["period"] == 2.0
    wait_for(lambda: [s["label"] for s in rsd.request({"op": "status"})["services"]] == ["alpha"], 5,
             what="beta stopped")


def test_services_d_is_read_at_start(ds):
    d = RsdDaemon(ds)
    with open(os.path.join(d.services_dir, "early.toml"), "w") as f:
        f.write('program = "%s"\n' % PROBE)
    with open(os.path.join(d.services_dir, "wrong.toml"), "w") as f:
        f.write('program = 42\n')
    d.start()
    try:
        wait_for(lambda: d.status("early")["state"] == "up", 5, what="early up")
        assert "wrong.toml:1: key 'program': must be a non-empty string" in d.log()
    finally:
        d.cleanup()


def test_shutdown_stops_every_service_then_rsd(rsd):
    a = rsd.up(label="a")
    b = rsd.up(label="b")
    r = ok(rsd.rsctl("shutdown"))
    assert r.stdout.strip() == "rsd shut down"
    assert rsd.proc.wait(5) == 0
    for pid in (a["pid"], b["pid"]):
        wait_for(lambda: not os.path.exists("/proc/%d" % pid), 2, what="service %d gone" % pid)
    c = rsd.ds.client()
    assert c.get("drv.server.a") == "down %d" % a["generation"]
    c.close()


def test_ds_verbs_are_registered(rsd):
    rsd.up()
    r = ok(rsd.rsctl("ds", "get", "drv.server.probe"))
    assert r.stdout.startswith("drv.server.probe = up ")


def test_reload_with_a_new_program_replaces_the_spawner(rsd):
    copy = os.path.join(rsd.base, "probe_copy.py")
    with open(PROBE) as src, open(copy, "w") as dst:
        dst.write(src.read())
    path = os.path.join(rsd.services_dir, "gamma.toml")
    with open(path, "w") as f:
        f.write('program = "%s"\n' % PROBE)
    ok(rsd.rsctl("reload"))
    wait_for(lambda: rsd.status("gamma")["state"] == "up", 5, what="gamma up")
    first = rsd.ask("gamma", "info")
    with open(path, "w") as f:
        f.write('program = "%s"\nargs = ["--new"]\n' % copy)
    assert "changed: gamma" in ok(rsd.rsctl("reload")).stdout
    info = wait_for(lambda: (lambda i: i if i["pid"] != first["pid"] else None)(rsd.ask("gamma", "info")), 5,
                    what="new incarnation")
    assert info["argv"] == [copy, "--new"] and info["ppid"] != first["ppid"]
    assert (info["init_type"], info["reason"]) == ("restart", "refresh")


def test_malformed_requests_never_hurt_rsd(rsd):
    import socket
    from libdrv.wire import encode
    for payload in (b"\xff" * 64,                                   # not a frame
                    (1 << 30).to_bytes(4, "little") + b"x",         # a frame far over the limit
                    encode({"json": "[1, 2]"}),                     # JSON, but not an object
                    encode({"json": "{not json"}),
                    encode({"no_json": 1}),
                    encode({"json": '{"op": "explode"}'}),
                    encode({"json": '{"op": "up", "spec": 7}'}),
                    encode({"json": '{"op": "fi", "label": "x", "kind": 3}'})):
        s = socket.socket(socket.AF_UNIX)
        s.connect(rsd.socket_path)
        s.sendall(payload)
        s.settimeout(5)
        try:
            s.recv(65536)
        except OSError:
            pass
        s.close()
    assert rsd.proc.poll() is None
    reply = rsd.request({"op": "explode"})
    assert not reply["ok"] and "unknown request 'explode'" in reply["error"]
    assert rsd.request({"op": "status"})["ok"]


def test_reload_keeps_a_service_whose_file_became_invalid(rsd):
    path = os.path.join(rsd.services_dir, "keep.toml")
    with open(path, "w") as f:
        f.write('program = "%s"\n' % PROBE)
    ok(rsd.rsctl("reload"))
    st = wait_for(lambda: (lambda s: s if s["state"] == "up" else None)(rsd.status("keep")), 5, what="keep up")
    with open(path, "w") as f:
        f.write('program = "%s"\nbackoff = "maybe"\n' % PROBE)
    r = rsd.rsctl("reload")
    assert r.returncode == 1 and "keep.toml:2: key 'backoff': must be true or false" in r.stderr
    assert "stopped" not in r.stdout
    after = rsd.status("keep")
    assert (after["state"], after["pid"], after["generation"]) == ("up", st["pid"], st["generation"])
