"""rsd makes the TAP a network front end serves ([resources] tap, rsd/tap.py): persistent,
owned by the service's uid and gid, kept across the service's restarts, deleted when the
service goes; an interface that is not a TAP rsd made for that uid is never taken over.
Real TAPs on this host (root, /dev/net/tun), each with a name of its own."""

import os
import subprocess

import pytest

from rsd import tap
from rsd.service import ConfigError, load_file
from services.rsdharness import PROBE, wait_for


def tap_name():
    return "rsdt%d" % (os.getpid() % 100000)


@pytest.fixture
def name():
    n = tap_name()
    yield n
    subprocess.run(["ip", "link", "del", n], capture_output=True)


def test_the_tap_key_is_an_interface_name(tmp_path):
    path = tmp_path / "fe.toml"
    path.write_text('program = "x.y"\n[resources]\ntap = "eth0"\n')
    assert load_file(str(path)).resources.tap == "eth0"
    for bad in ('"eth0/x"', '"a very long interface name"', '"0eth"', '3', '""'):
        path.write_text('program = "x.y"\n[resources]\ntap = %s\n' % bad)
        with pytest.raises(ConfigError, match="key 'resources.tap'.*network interface name"):
            load_file(str(path))


def test_rsd_creates_the_tap_for_the_service_uid_keeps_it_across_restarts_and_deletes_it_at_down(rsd, name):
    rsd.up(label="fe", resources={"tap": name})
    st = wait_for(lambda: rsd.status("fe")["state"] == "up" and rsd.status("fe"), what="fe up")
    uid, gid, flags = tap.owner(name)
    assert uid == st["uid"] and flags & tap.IFF_TAP
    with open("/sys/class/net/%s/ifindex" % name) as f:
        ifindex = f.read()
    r = rsd.rsctl("restart", "fe")
    assert r.returncode == 0, r.stderr
    rsd.wait_generation("fe", st["generation"])
    with open("/sys/class/net/%s/ifindex" % name) as f:
        assert f.read() == ifindex, "the TAP was made anew across a restart"
    assert rsd.rsctl("down", "fe").returncode == 0
    wait_for(lambda: not os.path.exists("/sys/class/net/" + name), what="the TAP deleted at down")


def test_an_interface_that_is_not_the_services_tap_is_refused(rsd, name):
    subprocess.run(["ip", "tuntap", "add", name, "mode", "tap", "user", "12345"], check=True)
    reply = rsd.request({"op": "up", "spec": {"label": "fe", "program": PROBE, "args": [],
                                              "resources": {"tap": name}}})
    assert not reply["ok"] and "belongs to uid 12345" in reply["error"], reply
    assert "ip link del %s" % name in reply["error"], "the error does not say what to do"
    assert tap.owner(name)[0] == 12345, "rsd changed an interface it did not make"
    assert os.path.exists("/sys/class/net/" + name), "rsd deleted an interface it did not make"


def test_a_kernel_interface_is_refused():
    with pytest.raises(ValueError, match="lo exists and is not a TAP"):
        tap.ensure("fe", "lo", 65534, 65534)
