"""The data store against a hostile driver: a real daemon, real sockets, and
attackers in separate processes labelled by the registrar (the test, as
root) so that identity comes from SO_PEERCRED.

Trust: label.* and drv.* are rsd's, state.<L>.* is L's, and nothing in
them can be squatted.  Bounds: each attack is run while the daemon's RSS
(/proc/PID/status VmRSS) is sampled, and must stay within RSS_BOUND of its
idle size while a legitimate client and the registrar are still served.
"""

import os
import socket
import threading
import time

import pytest

from libdrv import dsclient as dsc
from libdrv.dsclient import PermissionDenied
from libdrv.svcstate import drv_key, label_key, state_prefix
from libdrv.wire import DEFAULT_MAX_FRAME, FrameReader, encode

NOBODY = 65534

RSS_BOUND = 64 << 20        # what an attack may add to the daemon's idle RSS (docs/datastore.md)
LEGIT_UID = 65533           # an unprivileged uid other than the attackers'


# -- helpers -------------------------------------------------------------------

def rss(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS for pid %d" % pid)


class RssProbe:
    """Samples the daemon's RSS in a thread while an attack runs."""

    def __init__(self, pid):
        self.pid = pid
        self.idle = rss(pid)
        self.peak = self.idle
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, rss(self.pid))
            except (OSError, AssertionError):
                return
            self._stop.wait(0.01)

    def stop(self, what):
        self.peak = max(self.peak, rss(self.pid))
        self._stop.set()
        self._thread.join(2)
        grown = self.peak - self.idle
        # Recorded in docs/datastore.md; run with -s to see them.
        print("\nRSS %s: idle %.1f MiB, peak %.1f MiB (+%.1f MiB)"
              % (what, self.idle / 2**20, self.peak / 2**20, grown / 2**20))
        assert grown < RSS_BOUND, "%s grew the daemon by %.1f MiB (bound %d MiB)" % (
            what, grown / 2**20, RSS_BOUND >> 20)
        return grown


def warm_up(d):
    """Bring the idle daemon to its steady size before measuring."""
    with d.client() as c:
        c.publish("warm", b"w" * 1000, overwrite=True)
        for _ in range(50):
            c.retrieve("warm")
        c.list()
    time.sleep(0.2)


def still_served(d, legit, big_key=None):
    """The registrar and an unprivileged labelled client get answers now."""
    t0 = time.monotonic()
    with d.client(timeout=10) as rs:
        rs.publish("drv.chr.served", "up 1", overwrite=True)
        assert rs.retrieve("drv.chr.served").value == "up 1"
        if big_key:
            assert len(rs.retrieve(big_key).value) > 0
    r = legit.publish(state_prefix("legit") + "alive", 1, overwrite=True)
    assert r["ok"], r
    assert legit.retrieve(state_prefix("legit") + "alive")["value"]["value"] == 1
    assert time.monotonic() - t0 < 10


@pytest.fixture
def labelled(agent_on):
    """Labelled agent processes on a daemon a test started (with its own flags)."""
    return agent_on


# -- trust: who writes which namespace --------------------------------------------

def test_overwrite_or_delete_of_another_labels_state_key_is_refused(ds, agents):
    a, b = agents("drva"), agents("drvb")
    key = state_prefix("drva") + "speed"
    assert a.publish(key, 9600)["ok"]  # no PRIVATE flags: only the namespace protects it
    r = b.publish(key, 1, overwrite=True)
    assert r["error"] == "PermissionDenied"
    assert "state.drva.* keys belong to label drva" in r["msg"] and "labelled drvb" in r["msg"]
    r = b.delete(key)
    assert r["error"] == "PermissionDenied" and "state.drva.*" in r["msg"]
    e = a.retrieve(key)["value"]
    assert (e["value"], e["owner"]) == (9600, "drva")
    assert a.publish(key, 19200, overwrite=True)["ok"]
    assert a.delete(key)["ok"]


def test_squatting_a_state_key_before_its_owner_writes_is_refused(ds, agents):
    squatter = agents("drvb")
    for key in ("state.other.x", "state.other.deep.key", "state.other"):
        r = squatter.publish(key, "mine")
        assert r["error"] == "PermissionDenied" and "belong to label other" in r["msg"], r
    # Keys whose label part is no label are no one's to write.
    for key in ("state..x", "state.9lives.x"):
        r = squatter.publish(key, 1)
        assert r["error"] == "PermissionDenied" and "state.<label>.<name>" in r["msg"], r
    with ds.client() as rs:
        assert rs.list(r"state\..*") == []
    # The rightful owner arrives later: its first write (no overwrite) succeeds.
    other = agents("other")
    assert other.publish("state.other.x", "real")["ok"]
    e = other.retrieve("state.other.x")["value"]
    assert (e["value"], e["owner"]) == ("real", "other")
    # And the squatter still cannot take it over.
    assert squatter.publish("state.other.x", "mine", overwrite=True)["error"] == "PermissionDenied"


def test_squatting_rsds_namespaces_is_refused(ds, agents):
    drv = agents("drva")
    root_drv = agents("rootdrv", uid=0)  # a service running as root is still only a service
    for agent in (drv, root_drv):
        for key in (drv_key("net", "eth0"), label_key("eth0"), label_key("drva"),
                    drv_key("chr", "drva"), "label.x.y", "drv.anything"):
            r = agent.publish(key, "up 1", type="str")
            assert r["error"] == "PermissionDenied", (key, r)
            assert "only by the registrar (rsd)" in r["msg"]
    assert root_drv.whoami()["value"]["registrar"] is False
    assert root_drv.purge("drva")["error"] == "PermissionDenied"
    assert root_drv.register(drv.pid, "evil")["error"] == "PermissionDenied"
    with ds.client() as rs:
        assert rs.list(r"(label|drv)\..*") == []
        # rsd's later first writes (no overwrite) succeed and rsd owns them.
        rs.publish(drv_key("net", "eth0"), "up 1")
        rs.publish(label_key("eth0"), "pid=1 generation=1 uid=0")
        assert rs.retrieve(drv_key("net", "eth0")).owner == "rs"
    r = drv.publish(drv_key("net", "eth0"), "down 1", overwrite=True)
    assert r["error"] == "PermissionDenied"
    assert drv.delete(label_key("eth0"))["error"] == "PermissionDenied"
    with ds.client() as rs:
        assert rs.retrieve(drv_key("net", "eth0")).value == "up 1"
        # The registrar, in turn, does not write a driver's state.
        with pytest.raises(PermissionDenied, match="belong to label drva"):
            rs.publish(state_prefix("drva") + "x", 1)


def test_purge_removes_the_labels_keys_and_nothing_else(ds, agents):
    l, m = agents("ell"), agents("emm")
    for i in range(3):
        assert l.publish(state_prefix("ell") + "k%d" % i, i, flags=dsc.PRIVATE)["ok"]
    assert l.publish("shared.by-ell", 1)["ok"]          # a key ell owns outside state.ell.*
    assert m.publish(state_prefix("emm") + "k", 1)["ok"]
    assert m.publish("shared.by-emm", 1)["ok"]
    with ds.client() as rs:
        rs.publish(drv_key("chr", "ell"), "up 1")
        rs.publish(label_key("ell"), "pid=1 generation=1 uid=1")
    # A non-registrar cannot purge, not even its own label.
    for agent, label in ((m, "ell"), (l, "ell")):
        r = agent.purge(label)
        assert r["error"] == "PermissionDenied" and "registrar" in r["msg"]
    with ds.client() as rs:
        assert len(rs.list(r"state\.ell\..*|shared\.by-ell")) == 1  # private ones hidden from rs
        assert rs.purge("ell") == 4
        left = sorted((e.key, e.owner) for e in rs.list())
    assert left == [("drv.chr.ell", "rs"), ("label.ell", "rs"), ("shared.by-emm", "emm"),
                    ("state.emm.k", "emm")]
    assert l.list()["value"] == [{"key": k, "type": "str" if k[0] in "dl" else "u32", "owner": o,
                                  "flags": 0, "value": v}
                                 for k, o, v in [("drv.chr.ell", "rs", "up 1"),
                                                 ("label.ell", "rs", "pid=1 generation=1 uid=1"),
                                                 ("shared.by-emm", "emm", 1), ("state.emm.k", "emm", 1)]]
    # The purged label starts afresh.
    assert l.publish(state_prefix("ell") + "k0", 7)["ok"]


def test_squatted_keys_in_an_old_journal_are_removed_at_start(ds_factory):
    from datastore.journal import Journal
    d = ds_factory()
    j = Journal(os.path.join(d.state_dir, "ds"))
    j.load()
    for key, owner in (("state.drva.x", "drvb"), ("drv.net.eth0", "drvb"), ("state.drvb.y", "drvb"),
                       ("label.eth0", "rs")):
        j.append({"o": "set", "k": key, "t": "str", "v": "v", "w": owner, "f": 0})
    j.commit()
    j.close()
    d.start()
    with d.client() as rs:
        assert sorted((e.key, e.owner) for e in rs.list()) == [("label.eth0", "rs"), ("state.drvb.y", "drvb")]
    assert "deleting state.drva.x" in d.log() and "deleting drv.net.eth0" in d.log()


# -- bounds: a client's output budget ------------------------------------------------

def test_pipelined_get_flood_is_paused_not_buffered_and_resumes(ds, agents):
    big = b"B" * (1 << 20)
    with ds.client() as rs:
        rs.publish("big", big)
    warm_up(ds)
    legit = agents("legit", uid=LEGIT_UID)
    attacker = agents("hostile")
    probe = RssProbe(ds.proc.pid)
    # 200 gets of a 1 MiB value (200 MiB of replies), never read.
    sent = attacker.attack_pipeline({"op": "retrieve", "id": 1, "key": "big"}, 200)["value"]
    assert sent == [200]
    time.sleep(1.0)
    still_served(ds, legit, "big")
    with ds.client() as rs:
        assert rs.stats()["output_bytes"] <= (4 << 20) + DEFAULT_MAX_FRAME
    probe.stop("pipelined get flood, 1 connection")
    # It drains: the daemon resumes and every reply arrives, none dropped.
    ((replies, errors),) = attacker.attack_read()["value"]
    assert (replies, errors) == (200, [])
    assert ds.alive()


def test_get_flood_from_many_connections_is_cut_off_with_overflow(ds, agents):
    with ds.client() as rs:
        rs.publish("big", b"B" * (1 << 20))
    warm_up(ds)
    legit = agents("legit", uid=LEGIT_UID)
    attacker = agents("hostile")
    probe = RssProbe(ds.proc.pid)
    attacker.attack_pipeline({"op": "retrieve", "id": 1, "key": "big"}, 200, 40)
    time.sleep(1.0)
    still_served(ds, legit, "big")
    probe.stop("pipelined get flood, 40 connections")
    results = attacker.attack_read(5)["value"]
    cut = [errs for _, errs in results if errs]
    assert cut, "no connection was cut off"
    assert all(e[0].startswith("EOVERFLOW: overflow:") and "read replies" in e[0] for e in cut)
    still_served(ds, legit)


def test_list_flood_gets_bounded_pages(ds, agents):
    with ds.client() as rs:
        rs.publish_many([("bulk.%05d" % i, "v" * 4000) for i in range(3000)])  # ~12 MiB
    warm_up(ds)
    legit = agents("legit", uid=LEGIT_UID)
    attacker = agents("hostile")
    probe = RssProbe(ds.proc.pid)
    attacker.attack_pipeline({"op": "list", "id": 1, "regex": ".*"}, 2000, 20)
    time.sleep(1.0)
    still_served(ds, legit)
    probe.stop("list flood, 20 connections")
    attacker.attack_close()
    # A page is bounded, and the client follows the continuation to the end.
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(ds.socket_path)
    s.sendall(encode({"op": "list", "id": 1, "regex": r"bulk\..*"}))
    reader, frames, size = FrameReader(), [], 0
    while not frames:
        data = s.recv(1 << 20)
        size += len(data)
        frames = reader.feed(data)
    s.close()
    page = frames[0]
    assert page["ok"] and page["next"] == page["entries"][-1]["key"]
    assert len(page["entries"]) < 3000 and size < DEFAULT_MAX_FRAME
    with ds.client() as c:
        keys = [e.key for e in c.list(r"bulk\..*")]
        assert keys == ["bulk.%05d" % i for i in range(3000)]
        assert [e.key for e in c.list(r"bulk\.0000.", page=3)] == ["bulk.%05d" % i for i in range(10)]


def test_subscribe_with_initial_flood_drops_notifications_not_memory(ds, agents):
    with ds.client() as rs:
        rs.publish_many([("bulk.%05d" % i, "v" * 4000) for i in range(3000)])  # ~12 MiB
    warm_up(ds)
    legit = agents("legit", uid=LEGIT_UID)
    attacker = agents("hostile")
    probe = RssProbe(ds.proc.pid)
    # 40 connections each ask for every key at once (480 MiB if all were queued).
    attacker.attack_pipeline({"op": "subscribe", "id": 1, "regex": r"bulk\..*", "initial": True}, 1, 40)
    time.sleep(1.0)
    still_served(ds, legit)
    probe.stop("subscribe-with-initial flood, 40 connections")
    # Each subscriber gets its reply, then every key either delivered or counted.
    for replies, sets, dropped in attacker.attack_read_notes(2)["value"]:
        assert replies == 1 and sets + dropped == 3000 and dropped > 0


def test_label_quotas_refuse_clearly_and_bound_memory(ds, agents):
    warm_up(ds)
    legit = agents("legit", uid=LEGIT_UID)
    hog = agents("hog")
    probe = RssProbe(ds.proc.pid)
    # Bytes: 1 MiB values until the 8 MiB quota refuses.
    r = hog.attack_fill(state_prefix("hog") + "big.", 1 << 20, 40)["value"]
    assert r["nerrors"] >= 1 and r["errors"][0][0] == "QuotaExceeded"
    msg = r["errors"][0][1]
    assert "label hog" in msg and "quota of 8388608 bytes" in msg and "--quota-bytes" in msg
    assert r["bytes"] <= 8 << 20 and r["keys"] == 7
    # Keys: many small ones until the 4096-key quota refuses.
    r = hog.attack_fill("hog.small.", 10, 6000)["value"]
    assert r["keys"] == 4096
    msg = r["errors"][0][1]
    assert r["errors"][0][0] == "QuotaExceeded"
    assert "quota of 4096 keys (it has 4096)" in msg and "--quota-keys" in msg
    still_served(ds, legit)
    probe.stop("quota exhaustion by one label")
    # Another label is not affected; freeing space lets the hog write again.
    assert legit.publish(state_prefix("legit") + "x", "y" * 1000)["ok"]
    assert hog.delete("hog.small.000000")["ok"]
    assert hog.publish("hog.small.again", 1)["ok"]
    assert hog.publish("hog.small.more", 1)["error"] == "QuotaExceeded"


def test_quotas_are_set_by_flags_and_the_registrar_is_exempt(ds_factory, labelled):
    d = ds_factory(["--quota-keys", "3", "--quota-bytes", "100"]).start()
    a = labelled(d, "drva")
    assert a.publish("a.1", "x" * 50)["ok"]
    r = a.publish("a.2", "x" * 60)
    assert r["error"] == "QuotaExceeded" and "quota of 100 bytes" in r["msg"] and "uses 53" in r["msg"]
    assert a.publish("a.1", "x" * 10, overwrite=True)["ok"]   # shrinking is fine
    assert a.publish("a.2", 1)["ok"] and a.publish("a.3", 1)["ok"]
    r = a.publish("a.4", 1)
    assert r["error"] == "QuotaExceeded" and "quota of 3 keys (it has 3)" in r["msg"]
    who = a.whoami()["value"]
    assert (who["keys"], who["quota_keys"], who["quota_bytes"]) == (3, 3, 100)
    with d.client() as rs:
        rs.publish_many([("drv.chr.s%d" % i, "up 1") for i in range(50)])
        assert rs.whoami()["keys"] == 50


# -- bounds: input and connections ------------------------------------------------------

def test_half_sent_huge_frames_do_not_reserve_memory(ds, agents):
    warm_up(ds)
    legit = agents("legit", uid=LEGIT_UID)
    attacker = agents("hostile")
    probe = RssProbe(ds.proc.pid)
    # 120 connections each announce a 1 MiB frame and send 10 bytes of it.
    assert attacker.attack_half_frames(120, 1 << 20, 10)["value"] == 120
    time.sleep(0.5)
    with ds.client() as rs:
        st = rs.stats()
        assert st["clients"] >= 120 and st["input_bytes"] < 120 * 100
    still_served(ds, legit)
    grown = probe.stop("120 connections with 10 bytes of a 1 MiB frame")
    assert grown < 16 << 20  # 120 MiB if announced sizes were reserved
    attacker.attack_close()


def test_nearly_complete_huge_frames_from_many_connections_are_shed(ds, agents):
    warm_up(ds)
    legit = agents("legit", uid=LEGIT_UID)
    attacker = agents("hostile")
    probe = RssProbe(ds.proc.pid)
    # 100 connections each send 900 KiB of a 1 MiB frame: 88 MiB if all were kept.
    attacker.attack_half_frames(100, 1 << 20, 900 << 10)
    time.sleep(0.5)
    still_served(ds, legit)
    probe.stop("100 connections with 900 KiB of a 1 MiB frame")
    with ds.client() as rs:
        assert rs.stats()["input_bytes"] <= 16 << 20
    results = attacker.attack_read(0.3)["value"]
    shed = [errs[0] for _, errs in results if errs]
    assert shed and all("EBUSY: too much unfinished input" in e for e in shed)


def test_connection_flood_leaves_slots_for_rsd_root_and_other_uids(ds, agents):
    warm_up(ds)
    probe = RssProbe(ds.proc.pid)
    # One uid: held to its per-uid limit, so other unprivileged uids still connect.
    one = agents("flood")
    r = one.attack_connect(400)["value"]
    assert r["kept"] == 127  # with its DSClient connection: 128
    assert r["refused"] and all("too many clients from uid %d" % NOBODY in x for x in r["refused"])
    legit = agents("legit", uid=LEGIT_UID)
    still_served(ds, legit)
    # Many uids together: the unreserved slots fill, the reserved ones stay.
    floods = [agents(uid=60000 + i) for i in range(8)]
    refusals = []
    for f in floods:
        refusals += f.attack_connect(128)["value"]["refused"]
    assert any("unreserved connection slots are in use" in x for x in refusals)
    assert all(x.startswith("EBUSY: too many clients") for x in refusals)
    # rsd and root still get a slot and service; a newcomer is told why not.
    with ds.client() as rs:
        rs.publish("drv.chr.during", "up 1")
        assert rs.stats()["clients"] > 1000
    newcomer = agents(uid=LEGIT_UID + 1)
    r = newcomer.whoami()
    assert r["error"] == "Busy" and "unreserved connection slots are in use" in r["msg"]
    probe.stop("connection flood from 9 uids")
    for f in floods + [one]:
        f.attack_close()
    time.sleep(0.3)
    late = agents("late", uid=LEGIT_UID + 2)
    assert late.publish(state_prefix("late") + "x", 1)["ok"]
