"""A service that cannot start stays in `rsctl status` as failed, with why, until `rsctl down`
forgets it or `rsctl up`, `rsctl restart` or `rsctl reload` starts it again."""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "services"))
from rsdharness import PROBE, wait_for  # noqa: E402


def _labels(rsd):
    return [s["label"] for s in rsd.request({"op": "status"})["services"]]


def test_refused_resources_leave_a_failed_record_that_up_replaces_and_down_removes(rsd):
    # rsd never takes over an interface it did not make: "lo" is refused.
    reply = rsd.request({"op": "up", "spec": {"label": "nic", "program": PROBE,
                                              "resources": {"tap": "lo"}}})
    assert not reply["ok"] and "lo exists and is not a TAP" in reply["error"], reply
    st = rsd.status("nic")
    assert (st["state"], st["pid"]) == ("failed", None), st
    assert "lo exists and is not a TAP" in st["gave_up"]["why"]
    assert st["last_failure"]["reason"] == "init-failed" and st["gave_up"]["time"] > 0
    assert not os.path.exists(rsd.sock_path("nic"))  # it holds nothing
    c = rsd.ds.client()
    wait_for(lambda: str(c.get("drv.server.nic")).startswith("down "), 3, what="drv.server.nic down")
    table = rsd.rsctl("status")
    assert table.returncode == 0
    row = [line for line in table.stdout.splitlines() if line.startswith("nic ")]
    assert row and " failed " in row[0] and "gave up" in row[0] and "is not a TAP" in row[0], table.stdout

    # The same label, started again (without the TAP): it runs.
    up = rsd.rsctl("up", PROBE, "--label", "nic")
    assert up.returncode == 0, up.stderr
    st = rsd.status("nic")
    assert st["state"] == "up" and st["gave_up"] is None and rsd.ask("nic", "info")["pid"] == st["pid"]
    assert _labels(rsd) == ["nic"]

    # Failed again, then forgotten by `rsctl down`.
    rsd.request({"op": "down", "label": "nic"})
    rsd.request({"op": "up", "spec": {"label": "nic", "program": PROBE, "resources": {"tap": "lo"}}})
    assert rsd.status("nic")["state"] == "failed"
    down = rsd.rsctl("down", "nic")
    assert down.returncode == 0, down.stderr
    assert _labels(rsd) == []


def test_a_program_that_does_not_exist_stays_failed_and_restart_tries_it_again(rsd):
    missing = os.path.join(rsd.base, "later.py")
    r = rsd.rsctl("up", "later_module_that_is_not_there")
    assert r.returncode == 1 and "cannot load later_module_that_is_not_there" in r.stderr, r.stderr
    st = json.loads(rsd.rsctl("status", "later_module_that_is_not_there", "--json").stdout)
    assert st["state"] == "failed" and "ModuleNotFoundError" in st["gave_up"]["why"], st
    # restart tries it again, and reports the failure again.
    r = rsd.rsctl("restart", "later_module_that_is_not_there")
    assert r.returncode == 1 and "ModuleNotFoundError" in r.stderr, r.stderr
    assert rsd.status("later_module_that_is_not_there")["state"] == "failed"

    # A .py program that fails at import until it is fixed: restart starts it once it is.
    with open(missing, "w") as f:
        f.write("raise RuntimeError('not yet')\n")
    os.chmod(missing, 0o644)
    reply = rsd.request({"op": "up", "spec": {"label": "later", "program": missing}})
    assert not reply["ok"] and "not yet" in reply["error"], reply
    first = rsd.status("later")
    assert first["state"] == "failed"
    with open(missing, "w") as f:
        f.write("import sys\nsys.path.insert(0, %r)\nfrom probe import main  # noqa: E402,F401\n"
                % os.path.dirname(PROBE))
    r = rsd.rsctl("restart", "later")
    assert r.returncode == 0, r.stderr
    st = rsd.status("later")
    assert st["state"] == "up" and st["generation"] > first["generation"]


def test_a_service_file_that_fails_is_started_again_by_reload_and_removed_with_its_file(rsd):
    path = os.path.join(rsd.services_dir, "filed.toml")
    with open(path, "w") as f:
        f.write('program = "%s"\n[resources]\ntap = "lo"\n' % PROBE)
    report = rsd.request({"op": "reload"})
    assert report["started"] == ["filed"], report
    st = wait_for(lambda: (lambda s: s if s["state"] == "failed" else None)(rsd.status("filed")), 5,
                  what="filed failed")
    assert "lo exists and is not a TAP" in st["gave_up"]["why"]
    with open(path, "w") as f:
        f.write('program = "%s"\n' % PROBE)
    report = rsd.request({"op": "reload"})
    assert report["started"] == ["filed"] and not report["errors"], report
    wait_for(lambda: rsd.status("filed")["state"] == "up", 5, what="filed up")
    # A file that fails at its first start, then removed: the record goes with it.
    gone = os.path.join(rsd.services_dir, "gone.toml")
    with open(gone, "w") as f:
        f.write('program = "%s"\nargs = ["--init-fail"]\n' % PROBE)
    assert rsd.request({"op": "reload"})["started"] == ["gone"]
    wait_for(lambda: rsd.status("gone")["state"] == "failed", 5, what="gone failed")
    os.unlink(gone)
    report = rsd.request({"op": "reload"})
    assert report["stopped"] == ["gone"], report
    assert _labels(rsd) == ["filed"]


def test_give_up_is_for_a_service_between_incarnations(rsd):
    rsd.up()
    r = rsd.rsctl("give-up", "probe")
    assert r.returncode == 1 and "`rsctl down probe` stops a running one" in r.stderr, r.stderr
    assert rsd.status("probe")["state"] == "up"
