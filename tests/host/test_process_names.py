"""rsd and the data store are Python programs, yet `pidof rsd` and `pidof datastore` (no -x)
find them, and only them: each sets its command line and process name at start-up (the
data store runs with paths ending in /rsd, which `pidof rsd` must not take for rsd)."""

import os
import subprocess
import sys
import time


def pidof(name):
    result = subprocess.run(["pidof", name], capture_output=True, text=True)
    return {int(pid) for pid in result.stdout.split()}


def process_name(pid):
    with open("/proc/%d/comm" % pid) as f:
        return f.read().strip()


def command_line(pid):
    with open("/proc/%d/cmdline" % pid, "rb") as f:
        return f.read().rstrip(b"\0").decode()


def test_pidof_finds_rsd(rsd):
    pid = rsd.proc.pid
    assert pid in pidof("rsd")
    assert process_name(pid) == "rsd"
    assert command_line(pid) == "rsd"


def test_pidof_finds_the_data_store(ds):
    pid = ds.proc.pid
    assert pid in pidof("datastore")
    assert process_name(pid) == "datastore"
    assert command_line(pid) == "datastore"


def test_pidof_rsd_does_not_find_a_data_store_whose_paths_end_in_rsd(tmp_path):
    runtime = tmp_path / "rsd"
    runtime.mkdir()
    proc = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "datastore"), "--runtime-dir", str(runtime),
                             "--state-dir", str(runtime)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while proc.pid not in pidof("datastore"):
            assert proc.poll() is None and time.monotonic() < deadline, "the data store did not start"
            time.sleep(0.05)
        assert proc.pid not in pidof("rsd")
    finally:
        proc.kill()
        proc.wait()
