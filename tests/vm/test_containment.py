"""Containment in the testbed guest, where cgroup v2 has every controller.

rsd runs under exactly the capability bounding set systemd/rsd.service
gives it (setpriv), starts the serial driver with its /dev/rsdrv endpoint,
and a hostile service's [limits] are enforced by its cgroup.
"""

import json
import os
import time

import pytest

from testbed import REPO_ROOT
from testbed.stack import RUNTIME, SerialStack, build_rsdrv, unit_capabilities

HOSTILE = os.path.join(REPO_ROOT, "tests", "host", "services", "hostile.py")
SERVICES_CGROUP = "/sys/fs/cgroup/rsd/services"
# linux/capability.h
CAP_NUMBERS = {"chown": 0, "dac_override": 1, "dac_read_search": 2, "fowner": 3, "fsetid": 4,
               "kill": 5, "setgid": 6, "setuid": 7, "setpcap": 8, "net_admin": 12,
               "ipc_lock": 14, "sys_rawio": 17, "sys_ptrace": 19, "sys_admin": 21,
               "sys_resource": 24}
HOSTILE_TOML = """\
program = "{program}"
init_timeout = 60

[limits]
pids_max = 24
memory_max = "96M"
"""


@pytest.fixture(scope="module")
def stack(testbed, tmp_path_factory):
    s = SerialStack(testbed, build_rsdrv(str(tmp_path_factory.mktemp("rsdrv"))), unit_bounding_set=True)
    s.start()
    yield s
    s.stop()


def ask(stack, label, command, timeout=60):
    script = ("import socket,sys; s=socket.socket(socket.AF_UNIX); s.settimeout(50); "
              "s.connect(sys.argv[1]); s.sendall(sys.argv[2].encode()); "
              "print(s.makefile().readline().strip() or '{}')")
    r = stack.sh("python -c %s %s/svc/%s.sock '%s'" % (json.dumps(script), RUNTIME, label, command),
                 timeout=timeout)
    r.check()
    return json.loads(r.stdout)


def test_rsd_runs_with_exactly_the_units_bounding_set(stack):
    pid = int(stack.sh("pidof rsd | cut -d' ' -f1").stdout)
    status = stack.sh("cat /proc/%d/status" % pid).stdout
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    expected = sum(1 << CAP_NUMBERS[c] for c in unit_capabilities())
    assert int(fields["CapBnd"], 16) == expected, (fields["CapBnd"], unit_capabilities())
    assert int(fields["CapEff"], 16) == expected
    # ... and under it, the serial driver got its endpoint and moves bytes.
    st = stack.status("serial0")
    assert st["state"] == "up"
    ep = stack.endpoint_info("serial0")
    assert "0x2f8" in ep and "sealed" in ep, ep
    payload = b"under the unit's bounding set\n"
    reader = stack.start_reader(len(payload), "/tmp/in-bounding")
    stack.com2.sendall(payload)
    assert stack.finish_reader(reader) == payload


def test_each_service_has_its_cgroup(stack):
    st = stack.status("serial0")
    cg = stack.sh("cat /proc/%d/cgroup" % st["pid"]).stdout.strip()
    assert cg == "0::/rsd/services/serial0/run", cg
    ctl = stack.sh("cat /sys/fs/cgroup/rsd/services/cgroup.subtree_control").stdout.split()
    assert {"memory", "pids", "cpu"} <= set(ctl), ctl


@pytest.fixture(scope="module")
def hostile(stack):
    stack.testbed.write_file("/run/rsdtest/etc/services.d/hostile.toml",
                             HOSTILE_TOML.format(program=HOSTILE).encode())
    r = stack.rsctl("reload")
    assert r.rc == 0, r.describe()
    deadline = time.monotonic() + 90
    while stack.status("hostile")["state"] != "up":
        assert time.monotonic() < deadline, stack.logs()
        time.sleep(0.5)
    yield stack
    stack.sh("rm -f /run/rsdtest/etc/services.d/hostile.toml; rsctl reload")


def test_limits_are_written_to_the_services_cgroup(hostile):
    cg = SERVICES_CGROUP + "/hostile"
    assert hostile.sh("cat %s/pids.max" % cg).stdout.strip() == "24"
    assert hostile.sh("cat %s/memory.max" % cg).stdout.strip() == str(96 << 20)
    # a service that sets none gets the documented defaults
    assert hostile.sh("cat %s/serial0/pids.max" % SERVICES_CGROUP).stdout.strip() == "256"
    assert hostile.sh("cat %s/serial0/memory.max" % SERVICES_CGROUP).stdout.strip() == str(1 << 30)


def test_a_fork_bomb_stops_at_pids_max(hostile):
    out = ask(hostile, "hostile", "fork 100")
    assert out["forked"] < 24 and out["errno"] == 11, out  # EAGAIN from the pids controller
    events = hostile.sh("cat %s/hostile/pids.events" % SERVICES_CGROUP).stdout
    assert int(events.split()[1]) > 0, events
    # rsd and the serial driver were not touched
    assert hostile.status("serial0")["state"] == "up"


def test_memory_past_memory_max_kills_the_incarnation_and_rsd_restarts_it(hostile):
    old = hostile.status("hostile")
    try:
        ask(hostile, "hostile", "alloc 200", timeout=120)
    except (AssertionError, ValueError, RuntimeError):
        pass  # it was killed before it could answer
    deadline = time.monotonic() + 90
    while True:
        st = hostile.status("hostile")
        if st["generation"] > old["generation"] and st["state"] == "up":
            break
        assert time.monotonic() < deadline, (st, hostile.logs())
        time.sleep(0.5)
    assert st["last_failure"]["signal"] == 9, st
    events = hostile.sh("cat %s/hostile/memory.events" % SERVICES_CGROUP).stdout
    oom_kills = dict(line.split() for line in events.splitlines())["oom_kill"]
    assert int(oom_kills) >= 1, events
