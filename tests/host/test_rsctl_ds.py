"""`rsctl ds ls|get|watch` against a real data store, as a user runs them."""

import json
import os
import subprocess
import sys

RSCTL = os.path.join(os.path.dirname(sys.executable), "rsctl")


def rsctl(ds, *args, timeout=20):
    env = dict(os.environ, RSD_RUNTIME_DIR=ds.runtime_dir)
    env.pop("RSD_DS_SOCKET", None)
    return subprocess.run([RSCTL, *args], capture_output=True, text=True, env=env, timeout=timeout)


def test_ls_and_get_show_keys_types_and_owners(ds):
    with ds.client() as c:
        c.publish("drv.net.eth0", "up 3")
        c.publish("label.eth0", "eth0", type="label")
        c.publish("state.rs.blob", b"\x00" * 40)
    r = rsctl(ds, "ds", "ls")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert [l.split()[0] for l in lines] == ["drv.net.eth0", "label.eth0", "state.rs.blob"]
    assert "up 3" in lines[0] and "rs" in lines[0] and "<40 bytes>" in lines[2]
    r = rsctl(ds, "ds", "ls", r"drv\..*", "--json")
    assert json.loads(r.stdout) == [{"key": "drv.net.eth0", "type": "str", "owner": "rs", "flags": 0,
                                     "value": "up 3"}]
    r = rsctl(ds, "ds", "get", "label.eth0", "--json")
    assert json.loads(r.stdout)["type"] == "label"
    r = rsctl(ds, "ds", "get", "drv.net.eth0")
    assert r.stdout.startswith("drv.net.eth0 = up 3")


def test_watch_prints_existing_then_new_changes(ds):
    with ds.client() as c:
        c.publish("drv.blk.sda", "up 1")
        env = dict(os.environ, RSD_RUNTIME_DIR=ds.runtime_dir)
        p = subprocess.Popen([RSCTL, "ds", "watch", r"drv\..*", "--json", "--count", "3"],
                             stdout=subprocess.PIPE, text=True, env=env)
        first = json.loads(p.stdout.readline())
        assert (first["event"], first["key"], first["initial"]) == ("set", "drv.blk.sda", True)
        c.publish("drv.blk.sda", "restarting 1", overwrite=True)
        c.delete("drv.blk.sda")
        out, _ = p.communicate(timeout=20)
    events = [json.loads(l) for l in out.splitlines()]
    assert [(e["event"], e["value"]) for e in events] == [("set", "restarting 1"), ("delete", None)]
    assert p.returncode == 0


def test_errors_say_what_to_do(ds, tmp_path):
    r = rsctl(ds, "ds", "get", "no.such.key")
    assert r.returncode == 1 and "no key 'no.such.key'" in r.stderr
    r = rsctl(ds, "ds", "ls", "(bad")
    assert r.returncode == 1 and "bad regex" in r.stderr
    r = rsctl(ds, "ds", "--socket", str(tmp_path / "none.sock"), "ls")
    assert r.returncode == 1 and "is `datastore` running" in r.stderr
    r = rsctl(ds, "ds")
    assert r.returncode == 2 and "VERB" in r.stderr


def test_ls_follows_list_pages_to_the_end(ds):
    # ~1.2 MiB of keys: several pages of the daemon's bounded list replies.
    with ds.client() as c:
        c.publish_many([("page.%05d" % i, "v" * 400) for i in range(3000)])
        s = c.call("list", regex=r"page\..*")
        assert "next" in s and len(s["entries"]) < 3000  # the daemon does paginate
    r = rsctl(ds, "ds", "ls", r"page\..*")
    assert r.returncode == 0, r.stderr
    assert [l.split()[0] for l in r.stdout.splitlines()] == ["page.%05d" % i for i in range(3000)]
    r = rsctl(ds, "ds", "ls", "--json")
    assert [e["key"] for e in json.loads(r.stdout)] == ["page.%05d" % i for i in range(3000)]
