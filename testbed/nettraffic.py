"""Traffic between the guest and the host's end of the e1000 link, for the network VM tests:
tests/guest/net_transfer.py run on both sides (a seeded pattern, its SHA-256 checked), pings."""

import hashlib
import json
import os
import random
import subprocess
import time

from . import REPO_ROOT
from .hostnet import GUEST_NET_IP, HOST_IP

TRANSFER = os.path.join(REPO_ROOT, "tests", "guest", "net_transfer.py")
PYTHON = os.path.join(REPO_ROOT, ".venv", "bin", "python")


def expected_sha(nbytes, seed):
    return hashlib.sha256(random.Random(seed).randbytes(nbytes)).hexdigest()


def guest_background(net, argv, out):
    net.sh("setsid %s %s %s > %s 2>&1 < /dev/null &" % (PYTHON, TRANSFER, " ".join(map(str, argv)), out)).check()


def guest_result(net, out, timeout=120):
    deadline = time.monotonic() + timeout
    while True:
        text = net.sh("cat %s" % out).stdout
        lines = [json.loads(l) for l in text.splitlines() if l.startswith("{")]
        done = [l for l in lines if "sha256" in l]
        if done:
            return done[-1]
        assert "Traceback" not in text, text
        assert time.monotonic() < deadline, "no result in %s after %d s: %r\n%s" % (out, timeout, text, net.logs())
        time.sleep(0.5)


def host_popen(net, argv):
    return net.host.popen([PYTHON, TRANSFER] + [str(a) for a in argv], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def host_result(proc, timeout=120):
    out, _ = proc.communicate(timeout=timeout)
    lines = [json.loads(l) for l in out.splitlines() if l.startswith("{") and "sha256" in l]
    assert lines, out
    return lines[-1]


def wait_listening(proc):
    line = proc.stdout.readline()
    assert "listening" in line, line


def ping_from_guest(net, count=3):
    r = net.sh("ping -c %d -W 2 %s" % (count, HOST_IP))
    assert r.rc == 0, r.stdout + r.stderr + net.logs()
    return r.stdout


def ping_from_host(net, count=3, size=56, extra=()):
    r = net.host.run(["ping", "-c", str(count), "-W", "2", "-s", str(size), *extra, GUEST_NET_IP])
    assert r.returncode == 0, r.stdout + r.stderr + net.logs()
    return r.stdout


def tcp_transfer(net, direction, nbytes, seed, port):
    """nbytes of a seeded stream host -> guest or guest -> host; the receiver's result
    ({"bytes", "sha256", "max_gap"}), both ends finished."""
    if direction == "host-to-guest":
        proc = host_popen(net, ["serve-send", port, nbytes, seed])
        wait_listening(proc)
        guest_background(net, ["recv", HOST_IP, port], "/tmp/recv.json")
        got = guest_result(net, "/tmp/recv.json")
        host_result(proc)
    else:
        proc = host_popen(net, ["serve-recv", port])
        wait_listening(proc)
        guest_background(net, ["send", HOST_IP, port, nbytes, seed], "/tmp/send.json")
        got = host_result(proc)
        guest_result(net, "/tmp/send.json")
    return got


def stream_through(net, fault, nbytes, seed, port, rate=1 << 20, lead=1.5):
    """A paced host -> guest stream with fault() called lead s into it (it returns the driver's
    generation before the fault); the receiver's result once the driver is back and all arrived."""
    proc = host_popen(net, ["serve-send", port, nbytes, seed, rate])
    wait_listening(proc)
    guest_background(net, ["recv", HOST_IP, port], "/tmp/fault.json")
    time.sleep(lead)
    old = fault()
    net.wait_up("eth0", old, timeout=30)
    got = guest_result(net, "/tmp/fault.json", timeout=120)
    host_result(proc)
    return got

