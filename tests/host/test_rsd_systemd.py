"""The systemd units verify, and rsd honours what they rely on (SIGHUP reload, SIGTERM stop)."""

import os
import shutil
import signal
import subprocess
import sys


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "services"))
from rsdharness import PROBE, RsdDaemon, wait_for  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
UNITS = ("datastore.service", "rsd.service", "rsd-cgroup.service")
RUNS_OUR_COMMANDS = ("datastore.service", "rsd.service")


def test_units_pass_systemd_analyze_verify(tmp_path):
    exe = shutil.which("systemd-analyze")
    assert exe, "systemd-analyze is missing: apt-get install systemd"
    # The units name the installed paths; point them at stand-ins so verify
    # checks everything else without `make install` on this host.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name in ("rsd", "datastore", "rsctl"):
        (bindir / name).write_text("#!/bin/sh\n")
        (bindir / name).chmod(0o755)
    paths = []
    for unit in UNITS:
        text = open(os.path.join(ROOT, "systemd", unit)).read()
        assert ("/usr/local/bin/" in text) == (unit in RUNS_OUR_COMMANDS), unit
        (tmp_path / unit).write_text(text.replace("/usr/local/bin/", str(bindir) + "/"))
        paths.append(str(tmp_path / unit))
    r = subprocess.run([exe, "verify", "--man=no"] + paths, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr


def test_units_declare_notify_watchdog_restart_and_ordering():
    rsd = open(os.path.join(ROOT, "systemd", "rsd.service")).read()
    ds = open(os.path.join(ROOT, "systemd", "datastore.service")).read()
    for text in (rsd, ds):
        assert "Type=notify" in text and "Restart=always" in text and "WatchdogSec=" in text
    # Wants=: a Requires= would make systemd stop rsd (and every service) when it restarts
    # a crashed data store.
    assert "Wants=datastore.service" in rsd and "After=datastore.service rsd-cgroup.service" in rsd
    assert "Requires=datastore.service" not in rsd
    assert "ExecReload=/bin/kill -HUP $MAINPID" in rsd


def test_sighup_reloads_and_sigterm_stops_services(ds):
    d = RsdDaemon(ds).start()
    try:
        with open(os.path.join(d.services_dir, "late.toml"), "w") as f:
            f.write('program = "%s"\n' % PROBE)
        d.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: d.request({"op": "status"})["services"], 5, what="reload on SIGHUP")
        pid = wait_for(lambda: d.status("late")["pid"] if d.status("late")["state"] == "up" else None, 5,
                       what="late up")
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(10) == 0
        wait_for(lambda: not os.path.exists("/proc/%d" % pid), 3, what="service stopped with rsd")
    finally:
        d.cleanup()
