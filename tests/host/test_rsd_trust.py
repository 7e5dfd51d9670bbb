"""Adoption is a trust boundary: attacks by a hostile spawner, or by another
process of the service's uid, against a real rsd.

A spawner imports its driver's module, so a driver hostile at import time
owns its spawner (tests/host/services/forger.py does that), and every
process of the service's uid can pose as one.  Each test makes the attack
for real, from an unprivileged process, and checks that rsd refuses it.
"""

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "services"))
from rsdharness import PROBE, RsdDaemon, alive, wait_for  # noqa: E402

REPO = os.path.dirname(os.path.dirname(HERE))

# A process of the service's uid that poses as its spawner: it connects to
# the adoption socket and sends an adoption request with a forged record.
IMPOSTOR = r"""
import json, socket, sys, time
from libdrv.wire import encode
path, wait = sys.argv[1], float(sys.argv[2])
deadline = time.monotonic() + wait
denied = False
while True:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        s.connect(path)
        break
    except OSError as exc:
        s.close()
        denied = denied or isinstance(exc, PermissionError)
        if time.monotonic() > deadline:
            print("permission denied" if denied else "no socket", flush=True)
            sys.exit(0)
        time.sleep(0.01)
record = json.dumps({"spec": {"label": sys.argv[3], "program": "/bin/true", "script": "/bin/true"}})
try:
    s.send(encode({"op": "adopt", "pid": 1, "child": None, "generation": 1, "record": record, "fds": []}))
    s.settimeout(10)
    print("closed" if s.recv(100) == b"" else "answered", flush=True)
except OSError as exc:
    print("closed (%s)" % exc, flush=True)
"""


def _kill_rsd(rsd):
    rsd.proc.kill()
    rsd.proc.wait()
    rsd.notify.close()


def _as_uid(uid, code, *args):
    """Run Python code as uid:uid with no other groups (an unprivileged attacker)."""
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], user=uid, group=uid,
                            extra_groups=[], cwd="/", stdout=subprocess.PIPE, text=True,
                            env={"PYTHONPATH": REPO, "PATH": "/usr/bin:/bin"})


def _forger(rsd, lies):
    """A copy of services/forger.py that tells these lies (label -> lies), and its path."""
    d = os.path.join(rsd.base, "forger")
    os.makedirs(d, mode=0o755, exist_ok=True)
    path = os.path.join(d, "forger.py")
    shutil.copy(os.path.join(HERE, "services", "forger.py"), path)
    with open(os.path.join(d, "lies.json"), "w") as f:
        json.dump(dict(lies, probe_dir=os.path.join(HERE, "services")), f)
    for p in (d, path, os.path.join(d, "lies.json")):
        os.chmod(p, 0o755 if os.path.isdir(p) else 0o644)
    return path


def _script(rsd, name, body):
    path = os.path.join(rsd.policy_dir, name)
    with open(path, "w") as f:
        f.write("#!/bin/sh\n" + body)
    os.chmod(path, 0o755)
    return path


def _adopt_path(rsd, label):
    return os.path.join(rsd.runtime_dir, "adopt", label + ".sock")


def _spawners(rsd):
    with open(os.path.join(rsd.state_dir, "spawners.json")) as f:
        return json.load(f)


# -- rsd's own state --------------------------------------------------------------

def test_state_dir_is_roots_alone_and_a_looser_one_is_tightened(ds):
    rsd = RsdDaemon(ds)
    os.makedirs(rsd.state_dir)
    os.chmod(rsd.state_dir, 0o777)
    with open(os.path.join(rsd.state_dir, "uids.json"), "w") as f:
        f.write("{}")
    os.chmod(os.path.join(rsd.state_dir, "uids.json"), 0o666)
    try:
        rsd.start()
        up = rsd.up()
        assert "made root:root 0700" in rsd.log() and "made root:root 0600" in rsd.log()
        st = os.stat(rsd.state_dir)
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o700)
        for name in ("generations.json", "uids.json", "services.json", "spawners.json"):
            st = os.stat(os.path.join(rsd.state_dir, name))
            assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o600), name
        # The service's own uid can neither read nor replace what a new rsd believes.
        attacker = _as_uid(up["uid"], "import os, sys\n"
                           "for how in (os.O_RDONLY, os.O_WRONLY):\n"
                           "    try:\n"
                           "        os.open(sys.argv[1], how); print('opened')\n"
                           "    except PermissionError:\n"
                           "        print('denied')\n", os.path.join(rsd.state_dir, "spawners.json"))
        assert attacker.communicate(timeout=10)[0].split() == ["denied", "denied"]
    finally:
        rsd.cleanup()


# -- adoption -----------------------------------------------------------------------

def test_a_forged_record_cannot_choose_the_policy_script(rsd):
    """The spawner names a script of its own in its adoption request; rsd runs the service's."""
    legit_out = os.path.join(rsd.base, "legit.out")
    evil_out = os.path.join(rsd.base, "evil.out")
    _script(rsd, "legit", 'echo "$1 $2" >> %s\nexec rsctl restart "$1"\n' % legit_out)
    evil = _script(rsd, "evil", "touch %s\n" % evil_out)
    forged = json.dumps({"spec": {"label": "f", "program": PROBE, "script": evil, "source": "rsctl up"},
                         "from_file": False, "restarts": 0, "restarts_total": 0, "ever_ready": True})
    prog = _forger(rsd, {"f": {"adopt": {"record": forged}}})
    first = rsd.up(program=prog, label="f", script="legit")
    _kill_rsd(rsd)
    rsd.start()
    st = rsd.status("f")
    assert (st["pid"], st["generation"], st["state"]) == (first["pid"], first["generation"], "up"), rsd.log()
    rsd.ask("f", "crash 11")
    rsd.wait_generation("f", first["generation"])
    wait_for(lambda: os.path.exists(legit_out), 5, what="the service's own policy script")
    assert open(legit_out).read().split() == ["f", "signal"]
    assert not os.path.exists(evil_out), "rsd ran the script the spawner named"


def test_a_process_of_the_service_uid_posing_as_its_spawner_is_refused(rsd):
    first = rsd.up(label="victim")
    spawner = rsd.ask("victim", "info")["ppid"]
    _kill_rsd(rsd)
    os.kill(spawner, signal.SIGSTOP)  # the real one stays silent, so the impostor is first
    impostor = _as_uid(first["uid"], IMPOSTOR, _adopt_path(rsd, "victim"), 15, "victim")
    try:
        rsd.start()
        out = impostor.communicate(timeout=10)[0]
        assert out.startswith("closed"), out
        assert "victim: adoption request from pid %d uid %d gid %d, which is not its spawner: refused" % (
            impostor.pid, first["uid"], first["uid"]) in rsd.log()
        # The silent spawner is stopped for good and the service starts afresh.
        wait_for(lambda: not alive(spawner), 5, what="the old spawner killed")
        again = rsd.wait_generation("victim", first["generation"])
        assert again["pid"] != first["pid"] and rsd.ask("victim", "info")["ppid"] != spawner
    finally:
        impostor.kill()
        try:
            os.kill(spawner, signal.SIGCONT)
        except ProcessLookupError:
            pass


def test_the_adoption_socket_is_the_services_alone_and_only_while_rsd_waits(rsd):
    first = rsd.up(label="victim")
    spawner = rsd.ask("victim", "info")["ppid"]
    _kill_rsd(rsd)
    os.kill(spawner, signal.SIGSTOP)  # so that the new rsd waits for it, socket open
    path = _adopt_path(rsd, "victim")
    starting = threading.Thread(target=rsd.start)
    starting.start()
    try:
        wait_for(lambda: os.path.exists(path), 5, what="the adoption socket")
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, first["uid"], 0o660)
        st = os.stat(os.path.dirname(path))
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o755)
        # Another uid (and group) cannot even connect.
        stranger = _as_uid(65534, IMPOSTOR, path, 1, "victim")
        assert stranger.communicate(timeout=10)[0].strip() == "permission denied"
    finally:
        starting.join()
        os.kill(spawner, signal.SIGCONT)
    assert not os.path.exists(path) and os.listdir(os.path.dirname(path)) == []
    wait_for(lambda: not alive(spawner), 5, what="the spawner that did not come back killed")
    assert rsd.wait_generation("victim", first["generation"])["pid"] != first["pid"]


def test_a_reused_pid_is_not_taken_for_the_spawner(rsd):
    """The spawner died and its pid went to another process of the same uid."""
    first = rsd.up(label="victim")
    spawner = rsd.ask("victim", "info")["ppid"]
    _kill_rsd(rsd)
    os.kill(spawner, signal.SIGKILL)
    wait_for(lambda: not alive(first["pid"]), 5, what="the incarnation gone with its spawner")
    impostor = _as_uid(first["uid"], IMPOSTOR, _adopt_path(rsd, "victim"), 3, "victim")
    # What spawners.json would say had the kernel handed the spawner's pid to
    # the impostor (pids are reused): the pid matches, the start time cannot.
    table = _spawners(rsd)
    table["victim"]["pid"] = impostor.pid
    with open(os.path.join(rsd.state_dir, "spawners.json"), "w") as f:
        json.dump(table, f)
    try:
        rsd.start()
        assert "pid %d is no longer its spawner" % impostor.pid in rsd.log()
        out = impostor.communicate(timeout=10)[0]
        assert impostor.returncode == 0, "rsd signalled a process that was not its spawner"
        assert out.startswith(("closed", "no socket")), out
        again = rsd.wait_generation("victim", first["generation"])
        assert "victim: adopted" not in rsd.log() and again["pid"] != first["pid"]
    finally:
        impostor.kill()


SERVICE_UID = 610123  # the forged services run as this uid, and so does the bystander


@pytest.fixture
def bystander(rsd):
    """A process of the service's uid that is not its incarnation (nor its spawner's child)."""
    p = subprocess.Popen(["sleep", "60"], user=SERVICE_UID, group=SERVICE_UID, extra_groups=[])
    yield p
    p.kill()
    p.wait()


@pytest.mark.parametrize("lie", ["child-pid-1", "child-bystander", "generation", "listen", "control"])
def test_a_forged_adoption_request_is_refused(rsd, bystander, lie):
    lies, why = {"child-pid-1": ({"adopt": {"child": 1}}, "which is not its child"),
                 "child-bystander": ({"adopt": {"child": bystander.pid}}, "which is not its child"),
                 "generation": ({"adopt": {"generation": 10 ** 6}}, "it names generation 1000000"),
                 "listen": ({"listen": "forged"}, "the listening socket it sent is not the one rsd bound"),
                 "control": ({"control": "forged"}, "the control channel it sent is not an AF_UNIX "
                             "stream socket rsd made")}[lie]
    prog = _forger(rsd, {"f": lies})
    first = rsd.up(program=prog, label="f", user=SERVICE_UID, period=0.2)
    spawner = rsd.ask("f", "info")["ppid"]
    _kill_rsd(rsd)
    rsd.start()
    log = rsd.log()
    assert "f: cannot adopt its spawner (pid %d)" % spawner in log, log
    assert why in log and "f: adopted" not in log
    wait_for(lambda: not alive(spawner) and not alive(first["pid"]), 5, what="the liar stopped")
    again = rsd.wait_generation("f", first["generation"])
    assert again["pid"] != first["pid"]
    # Nothing was signalled that is not rsd's: the bystander and rsd live on.
    time.sleep(0.5)
    assert bystander.poll() is None and rsd.proc.poll() is None
    assert rsd.ask("f", "info")["pid"] == again["pid"]


# -- what a running spawner reports -----------------------------------------------------

def _cgroup_of(pid):
    with open("/proc/%d/cgroup" % pid) as f:
        return f.read()


@pytest.mark.parametrize("target", ["pid-1", "rsd", "bystander"])
def test_a_spawned_report_naming_another_process_is_ignored(rsd, bystander, target):
    """The spawner names a process that is not its child as the new incarnation."""
    pid = {"pid-1": 1, "rsd": rsd.proc.pid, "bystander": bystander.pid}[target]
    before = _cgroup_of(pid)
    prog = _forger(rsd, {"f": {"spawned_pid": "rsd" if target == "rsd" else pid}})
    # A short init timeout: had rsd taken the pid, it would SIGKILL it within the test.
    reply = rsd.request({"op": "up", "spec": {"label": "f", "program": prog, "user": SERVICE_UID,
                                              "init_timeout": 0.5, "period": 0.2}})
    assert not reply["ok"] and "which is not its child with uid %d" % SERVICE_UID in reply["error"], reply
    assert "f: its spawner reports pid %d as the new incarnation" % pid in rsd.log()
    time.sleep(1.0)
    assert alive(pid) and rsd.proc.poll() is None and bystander.poll() is None
    assert _cgroup_of(pid) == before, "rsd moved a stranger into the service's cgroup"
    assert [(s["label"], s["state"], s["pid"]) for s in rsd.request({"op": "status"})["services"]] \
        == [("f", "failed", None)]
    c = rsd.ds.client()
    assert c.get("label.f") is None  # nor published it as the service
    c.close()


def test_a_false_exited_report_for_a_live_incarnation_is_ignored(rsd):
    prog = _forger(rsd, {"f": {"false_exited": True}})
    first = rsd.up(program=prog, label="f", period=0.2)
    wait_for(lambda: "f: its spawner reports its incarnation (pid %d) exited, but it is still running: "
             "ignored" % first["pid"] in rsd.log(), 3, what="the lie logged")
    time.sleep(0.5)
    st = rsd.status("f")
    assert (st["state"], st["pid"], st["generation"], st["restarts"]) == ("up", first["pid"], first["generation"], 0)
    assert rsd.ask("f", "info")["pid"] == first["pid"]
    # A real exit is still believed.
    rsd.ask("f", "crash 11")
    again = rsd.wait_generation("f", first["generation"])
    assert again["last_failure"]["reason"] == "signal" and again["pid"] != first["pid"]


# -- policy scripts run as root ---------------------------------------------------------

ATTACKER_UID = 610778
ATTACKER_GID = 610777  # a group that is given write access to a script (or its directory)

# Writes, at PATH, a script that touches OUT (its own files it makes executable).
WRITE_SCRIPT = r"""
import os, sys
path, out = sys.argv[1], sys.argv[2]
try:
    with open(path, "w") as f:
        f.write("#!/bin/sh\ntouch %s\n" % out)
    if os.stat(path).st_uid == os.getuid():
        os.chmod(path, 0o755)
    print("written")
except PermissionError:
    print("denied")
"""


def _attacker(code, *args):
    """An unprivileged process in ATTACKER_GID."""
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], user=ATTACKER_UID,
                          group=ATTACKER_GID, extra_groups=[], cwd="/", capture_output=True, text=True,
                          timeout=10, env={"PATH": "/usr/bin:/bin"}).stdout.strip()


def _loosen(rsd, how, script):
    """Give ATTACKER_GID write access to script, or to its directory; returns which.

    The attacker then shows it can use it: it rewrites the script, or writes
    a file of its own into the directory (where it could replace the script).
    """
    target = script if how == "file" else os.path.dirname(script)
    os.chown(target, 0, ATTACKER_GID)
    os.chmod(target, 0o775)
    planted = script if how == "file" else os.path.join(target, "planted")
    assert _attacker(WRITE_SCRIPT, planted, os.path.join(rsd.base, "evil.out")) == "written"
    return target


@pytest.mark.parametrize("how", ["file", "directory"])
def test_a_policy_script_others_can_change_is_refused_when_read(rsd, how):
    script = _script(rsd, "legit", "exit 0\n")
    loose = _loosen(rsd, how, script)
    reply = rsd.request({"op": "up", "spec": {"label": "p", "program": PROBE, "script": "legit"}})
    assert not reply["ok"]
    err = reply["error"]
    assert err.startswith("rsctl up: key 'script': policy script %s " % script), err
    assert "owned by root (uid 0) with mode 0775" in err, err
    assert "chown root:root %s; chmod go-w %s" % (loose, loose) in err, err
    # A service file: the error names the file and the line too.
    with open(os.path.join(rsd.services_dir, "filed.toml"), "w") as f:
        f.write('program = "%s"\nscript = "legit"\n' % PROBE)
    report = rsd.request({"op": "reload"})
    assert report["started"] == [] and len(report["errors"]) == 1, report
    assert report["errors"][0].startswith(os.path.join(rsd.services_dir, "filed.toml") + ":2: key 'script'")
    assert "chown root:root %s; chmod go-w %s" % (loose, loose) in report["errors"][0]
    assert rsd.request({"op": "status"})["services"] == []
    assert not os.path.exists(os.path.join(rsd.base, "evil.out"))


@pytest.mark.parametrize("how", ["file", "directory"])
def test_a_policy_script_others_can_change_is_refused_when_run(rsd, how):
    legit_out = os.path.join(rsd.base, "legit.out")
    evil_out = os.path.join(rsd.base, "evil.out")
    script = _script(rsd, "legit", 'echo "$2" >> %s\nexec rsctl restart "$1"\n' % legit_out)
    original = open(script).read()
    first = rsd.up(script="legit")
    loose = _loosen(rsd, how, script)  # after rsd read the service
    rsd.ask("probe", "crash 11")
    wait_for(lambda: "probe: refused to run: policy script %s" % script in rsd.log(), 5, what="the refusal")
    assert "chown root:root %s; chmod go-w %s" % (loose, loose) in rsd.log()
    assert "the service stays failed until `rsctl restart probe`" in rsd.log()
    time.sleep(0.5)
    st = rsd.status("probe")
    assert (st["state"], st["pid"]) == ("failed", None), st
    assert not os.path.exists(evil_out) and not os.path.exists(legit_out)
    # Fixed as the message says, and restarted by hand: it runs again.
    with open(script, "w") as f:
        f.write(original)
    os.chown(loose, 0, 0)
    os.chmod(loose, 0o755)
    assert rsd.request({"op": "restart", "label": "probe"})["ok"]
    second = rsd.wait_generation("probe", first["generation"])
    rsd.ask("probe", "crash 11")
    rsd.wait_generation("probe", second["generation"])
    wait_for(lambda: os.path.exists(legit_out), 5, what="the script, fixed, runs")
    assert not os.path.exists(evil_out)
