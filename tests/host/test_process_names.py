"""rsd and the data store are Python programs, yet `pidof rsd` and `pidof datastore` (no -x)
find them: each sets its command line and process name at start-up."""

import subprocess


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
    assert command_line(pid).startswith("rsd --config-dir %s " % rsd.config_dir)


def test_pidof_finds_the_data_store(ds):
    pid = ds.proc.pid
    assert pid in pidof("datastore")
    assert process_name(pid) == "datastore"
    assert command_line(pid).startswith("datastore --runtime-dir %s " % ds.runtime_dir)
