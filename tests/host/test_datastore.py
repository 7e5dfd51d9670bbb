"""The data store, against a real daemon over real sockets, with clients in
separate processes whose labels come from SO_PEERCRED registration."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from libdrv import dsclient as dsc
from libdrv.dsclient import (
    BadRequest, Busy, DSClient, DSUnavailable, NotFound, PermissionDenied, TooLarge,
)
from libdrv.wire import encode


# -- identity and ownership ---------------------------------------------------

def test_unlabelled_process_reads_public_keys_but_cannot_publish(ds, agents):
    with ds.client() as rs:
        rs.publish("drv.chr.tty0", "up")
    anon = agents()
    assert anon.retrieve("drv.chr.tty0")["value"]["value"] == "up"
    r = anon.publish("state.anon.x", 1)
    assert r["error"] == "PermissionDenied" and "no label" in r["msg"]
    assert anon.whoami()["value"]["label"] is None


def test_owner_is_the_label_and_only_the_owner_deletes(ds, agents):
    # Outside the owned namespaces (label., drv., state.): the general rules.
    a, b = agents("drva"), agents("drvb")
    assert a.whoami()["value"]["label"] == "drva"
    assert a.publish("shared.speed", 9600)["ok"]
    assert b.publish("shared.speed", 1)["error"] == "Exists"
    r = b.delete("shared.speed")
    assert r["error"] == "PermissionDenied" and "drva" in r["msg"]
    # Overwrite is allowed by default, and ownership stays with the first publisher.
    assert b.publish("shared.speed", 1200, overwrite=True)["ok"]
    e = a.retrieve("shared.speed")["value"]
    assert (e["value"], e["owner"]) == (1200, "drva")
    assert a.delete("shared.speed")["ok"]
    assert a.retrieve("shared.speed")["error"] == "NotFound"


def test_private_flags_restrict_retrieve_subscribe_and_overwrite(ds, agents):
    a, b = agents("drva"), agents("drvb")
    anon = agents()
    assert a.publish("state.drva.secret", b"\x01\x02", flags=dsc.PRIVATE)["ok"]
    assert a.retrieve("state.drva.secret")["value"]["value"] == {"b64": "AQI="}
    assert b.retrieve("state.drva.secret")["error"] == "NotFound"
    assert anon.retrieve("state.drva.secret")["error"] == "NotFound"
    assert b.publish("state.drva.secret", b"x", overwrite=True)["error"] == "PermissionDenied"
    # Subscribers other than the owner never hear of it, not even by INITIAL.
    with ds.client() as rs:
        rs.subscribe(r"state\..*", initial=True)
        assert rs.get_notifications(0.3) == []
        assert [e.key for e in rs.list()] == []
        a.publish("state.drva.secret", b"y", overwrite=True, flags=dsc.PRIVATE)
        assert rs.get_notifications(0.3) == []
    # The owner sees it in list.
    assert [e["key"] for e in a.list()["value"]] == ["state.drva.secret"]


def test_ownership_survives_a_restart_of_the_owner(ds, agents):
    first = agents("drva")
    assert first.publish("state.drva.cfg", "8N1", flags=dsc.PRIVATE)["ok"]
    first.close()
    with ds.client() as rs:
        rs.unregister(first.pid)
    again = agents("drva")  # a new process, same label: the next incarnation
    assert again.pid != first.pid
    assert again.retrieve("state.drva.cfg")["value"]["value"] == "8N1"
    assert again.delete("state.drva.cfg")["ok"]


def test_only_the_registrar_registers_purges_and_publishes_labels(ds, agents):
    a = agents("drva")
    assert a.register(os.getpid(), "evil")["error"] == "PermissionDenied"
    assert a.purge("drvb")["error"] == "PermissionDenied"
    assert a.publish("label.drva", "drva", type="label")["error"] == "PermissionDenied"
    with ds.client() as rs:
        rs.publish("label.drva", "drva", type="label")
        assert rs.retrieve("label.drva").type == "label"
        with pytest.raises(BadRequest, match="label"):
            rs.register(a.pid, "bad label!")
        with pytest.raises(NotFound):
            rs.register(4194304, "ghost")


def test_registrar_uid_is_configurable(ds_factory, agents):
    d = ds_factory(["--registrar-uid", "4242"]).start()
    with d.client() as c:
        assert c.whoami()["registrar"] is False
        with pytest.raises(PermissionDenied, match="registrar"):
            c.register(os.getpid(), "x")
        with pytest.raises(PermissionDenied):
            c.publish("k", 1)


def test_purge_deletes_everything_a_label_owns_and_notifies(ds, agents):
    a, b = agents("drva"), agents("drvb")
    for i in range(5):
        assert a.publish("state.drva.k%d" % i, i)["ok"]
    assert b.publish("state.drvb.k", 1)["ok"]
    with ds.client() as rs:
        rs.subscribe(r"state\..*")
        assert rs.purge("drva") == 5
        notes = rs.get_notifications(2)
        while len(notes) < 5:
            more = rs.get_notifications(2)
            assert more, "missing delete notifications after purge"
            notes += more
        assert {(n.event, n.key) for n in notes} == {("delete", "state.drva.k%d" % i) for i in range(5)}
        assert [e.key for e in rs.list(r"state\..*")] == ["state.drvb.k"]


# -- subscriptions -------------------------------------------------------------

def test_notifications_arrive_in_commit_order_across_writers(ds, agents):
    writers = [agents("w%d" % i) for i in range(3)]
    with ds.client() as sub:
        sid = sub.subscribe(r"seq\..*")
        expected = []
        for i in range(60):
            w = writers[i % 3]
            key = "seq.%03d" % i
            assert w.publish(key, i)["ok"]
            expected.append((key, i, "w%d" % (i % 3)))
        got = []
        while len(got) < len(expected):
            notes = sub.get_notifications(5)
            assert notes, "notifications stopped after %d" % len(got)
            got += [(n.key, n.value, n.owner) for n in notes if n.sub == sid]
        assert got == expected


def test_initial_reports_existing_keys_then_live_changes(ds):
    with ds.client() as w, ds.client() as sub:
        w.publish("drv.net.eth0", "up")
        w.publish("drv.blk.sda", "up")
        w.publish("other", 1)
        sid = sub.subscribe(r"drv\..*", initial=True)
        notes = sub.get_notifications(2)
        while len(notes) < 2:
            more = sub.get_notifications(2)
            assert more, "INITIAL notifications missing"
            notes += more
        assert [(n.key, n.initial, n.sub) for n in notes] == [
            ("drv.blk.sda", True, sid), ("drv.net.eth0", True, sid)]
        w.delete("drv.net.eth0")
        notes = sub.get_notifications(2)
        assert [(n.event, n.key, n.initial, n.has_value) for n in notes] == [
            ("delete", "drv.net.eth0", False, False)]


def test_regex_is_anchored_and_several_subscriptions_coexist(ds):
    with ds.client() as w, ds.client() as sub:
        s1 = sub.subscribe(r"drv\.net\..*")
        s2 = sub.subscribe(r"label\.[a-z]+[0-9]")
        w.publish("xdrv.net.a", 1)          # not anchored at the start
        w.publish("label.eth0.pid", 1)     # not anchored at the end
        w.publish("drv.net.a", 1)
        w.publish("label.eth0", "x")
        notes = sub.get_notifications(2)
        time.sleep(0.1)
        notes += sub.get_notifications(0)
        assert [(n.sub, n.key) for n in notes] == [(s1, "drv.net.a"), (s2, "label.eth0")]
        sub.unsubscribe(s1)
        w.publish("drv.net.b", 1)
        assert sub.get_notifications(0.3) == []
        with pytest.raises(NotFound):
            sub.unsubscribe(s1)


def test_large_values_are_announced_without_their_bytes(ds):
    with ds.client() as w, ds.client() as sub:
        sub.subscribe("blob")
        w.publish("blob", b"z" * 200000)
        (n,) = sub.get_notifications(2)
        assert n.event == "set" and not n.has_value
        assert sub.retrieve("blob").value == b"z" * 200000


def test_slow_subscriber_does_not_stall_others_and_is_told_of_overflow(ds_factory):
    d = ds_factory(["--max-queue", "65536"]).start()
    slow = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    slow.connect(d.socket_path)
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.sendall(encode({"op": "subscribe", "id": 1, "regex": ".*"}))
    with d.client() as w, d.client() as other:
        other.subscribe("k.*")
        got = []

        def keep_reading():
            while len(got) < 300:
                notes = other.get_notifications(5)
                if not notes:
                    return
                got.extend(notes)

        reader_thread = threading.Thread(target=keep_reading)
        reader_thread.start()
        t0 = time.monotonic()
        for i in range(300):
            w.publish("k%d" % i, "v" * 4000, overwrite=True)
        elapsed = time.monotonic() - t0
        reader_thread.join(20)
        assert len(got) == 300 and all(n.event == "set" for n in got), "a reading subscriber lost notifications"
        assert elapsed < 20
    # The slow one now reads: it finds the reply, some notifications, then an overflow notice.
    slow.setblocking(True)
    slow.settimeout(5)
    from libdrv.wire import FrameReader
    reader, msgs = FrameReader(), []
    while True:
        try:
            data = slow.recv(65536)
        except socket.timeout:
            break
        assert data, "connection closed by the daemon"
        msgs += reader.feed(data)
        slow.settimeout(0.5)
    assert msgs[0]["ok"] is True
    overflows = [m for m in msgs if m.get("ev") == "overflow"]
    assert overflows and all("resynchronise" in m["msg"] for m in overflows)
    sets = [m for m in msgs if m.get("ev") == "set"]
    # Every change is either delivered or counted as dropped, never silently lost.
    assert len(sets) + sum(m["dropped"] for m in overflows) == 300
    assert len(sets) < 300
    slow.close()
    assert d.alive()


# -- durability ------------------------------------------------------------------

WRITER = r"""
import sys
from libdrv.dsclient import DSClient
c = DSClient(sys.argv[1])
i = 0
while True:
    c.publish("dur.%06d" % i, i)
    c.publish("dur.last", i, overwrite=True)
    print(i, flush=True)
    i += 1
"""


def test_no_acknowledged_write_is_lost_when_the_daemon_is_killed(ds):
    w = subprocess.Popen([sys.executable, "-c", WRITER, ds.socket_path], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    acked = []
    deadline = time.monotonic() + 20
    while len(acked) < 300 and time.monotonic() < deadline:
        acked.append(int(w.stdout.readline()))
    ds.kill9()  # mid-stream: the writer is blocked on an unanswered request
    rest, err = w.communicate(timeout=10)
    acked += [int(x) for x in rest.split()]
    assert "DSUnavailable" in err  # the writer saw the crash as an error, not a success
    assert len(acked) >= 300
    ds.start()
    with ds.client() as c:
        for i in acked:
            assert c.retrieve("dur.%06d" % i).value == i
        assert c.retrieve("dur.last").value >= acked[-1]


def test_state_and_registrations_survive_a_restart(ds, agents):
    a = agents("drva")
    assert a.publish("state.drva.x", "keep", flags=dsc.PRIVATE)["ok"]
    with ds.client() as rs:
        rs.publish("gone", 1)
        rs.delete("gone")
    ds.kill9()
    ds.start()
    # The same process is still known as drva: its private key is readable by it.
    a.connect()
    assert a.whoami()["value"]["label"] == "drva"
    assert a.retrieve("state.drva.x")["value"]["value"] == "keep"
    with ds.client() as rs:
        with pytest.raises(NotFound):
            rs.retrieve("gone")


def test_torn_journal_tail_is_cut_and_service_continues(ds):
    with ds.client() as c:
        c.publish("a", 1)
    ds.stop()
    with open(os.path.join(ds.state_dir, "ds", "ds.journal"), "ab") as f:
        f.write(b"\x40\x00\x00\x00garbage")  # a half-written record
    ds.start()
    with ds.client() as c:
        assert c.retrieve("a").value == 1
        c.publish("b", 2)
    ds.kill9()
    ds.start()
    with ds.client() as c:
        assert [e.key for e in c.list()] == ["a", "b"]


def test_compaction_keeps_the_live_state(ds):
    with ds.client() as c:
        for i in range(1200):  # ~5 MB of overwrites triggers compaction
            c.publish("big", b"%d" % i + b"x" * 4096, overwrite=True)
        c.publish("small", 7)
        size = c.stats()["journal_bytes"]
    assert size < 4 << 20
    ds.kill9()
    ds.start()
    with ds.client() as c:
        assert c.retrieve("big").value.startswith(b"1199x")
        assert c.retrieve("small").value == 7


# -- bad input ---------------------------------------------------------------------

def raw(ds):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(ds.socket_path)
    s.settimeout(5)
    return s


def read_frames(s):
    from libdrv.wire import FrameReader
    reader, out = FrameReader(), []
    while True:
        try:
            data = s.recv(65536)
        except socket.timeout:
            return out
        if not data:
            return out
        out += reader.feed(data)
        if out:
            s.settimeout(0.3)


@pytest.mark.parametrize("garbage", [
    b"\x05\x00\x00\x00\x09\x00\x00\x00\x00",         # unknown version
    b"\xff\xff\xff\x7f",                             # 2 GiB frame announced
    b"\x08\x00\x00\x00\x01\x01\x00\x03abc\x00",      # truncated field
    b"\x0c\x00\x00\x00\x01\x01\x00\x02op\x09\x00\x00\x00\x00\x00",  # unknown kind
])
def test_malformed_frames_get_an_error_and_a_closed_connection(ds, garbage):
    with ds.client() as bystander:
        bystander.publish("k", 1)
        s = raw(ds)
        s.sendall(garbage)
        frames = read_frames(s)
        assert frames and frames[0]["ok"] is False and frames[0]["err"] == "EINVAL"
        assert "malformed frame" in frames[0]["msg"]
        s.close()
        assert bystander.retrieve("k").value == 1
    assert ds.alive()


def test_unknown_operation_and_wrong_fields(ds):
    s = raw(ds)
    s.sendall(encode({"op": "explode", "id": 1}) + encode({"id": 2}) +
              encode({"op": "publish", "id": 3, "key": 5, "value": 1}) +
              encode({"op": "publish", "id": 4, "key": "k", "value": "x", "type": "u32"}) +
              encode({"op": "publish", "id": 5, "key": "k", "value": [1]}) +
              encode({"op": "subscribe", "id": 6, "regex": "(unclosed"}) +
              encode({"op": "publish", "id": 7, "key": "k", "value": 1, "flags": 64}) +
              encode({"op": "retrieve", "id": 8}) +
              encode({"op": "publish", "id": 9, "key": "ok", "value": 1}))
    frames = read_frames(s)
    by_id = {f["id"]: f for f in frames}
    assert "unknown operation" in by_id[1]["msg"] and "publish" in by_id[1]["msg"]
    assert by_id[2]["err"] == "EINVAL"
    assert "key must be a string" in by_id[3]["msg"]
    assert "u32 value must be an integer" in by_id[4]["msg"]
    assert "cannot store a list" in by_id[5]["msg"]
    assert "bad regex" in by_id[6]["msg"]
    assert "flags must be" in by_id[7]["msg"]
    assert "missing field 'key'" in by_id[8]["msg"]
    assert by_id[9]["ok"] is True  # the connection keeps working after refusals
    s.close()


def test_oversize_and_unprintable_keys_and_values_are_refused(ds_factory):
    d = ds_factory(["--max-value", "1000"]).start()
    with d.client() as c:
        with pytest.raises(TooLarge, match="limit is 255"):
            c.publish("k" * 256, 1)
        c.publish("k" * 255, 1)
        with pytest.raises(BadRequest, match="printable ASCII"):
            c.publish("has space", 1)
        with pytest.raises(BadRequest, match="printable ASCII"):
            c.publish("caf\u00e9", 1)
        with pytest.raises(TooLarge, match="limit is 1000"):
            c.publish("v", b"x" * 1001)
        with pytest.raises(TooLarge):
            c.publish("v", "\u00e9" * 501)  # 1002 bytes of UTF-8
        c.publish("v", b"x" * 1000)


def test_default_value_limit_is_one_mebibyte(ds):
    with ds.client() as c:
        c.publish("max", b"m" * (1 << 20))
        with pytest.raises(TooLarge, match="--max-value"):
            c.publish("over", b"m" * ((1 << 20) + 1))
        assert len(c.retrieve("max").value) == 1 << 20


def test_client_disconnecting_mid_message_harms_nobody(ds):
    frame = encode({"op": "publish", "id": 1, "key": "half", "value": b"x" * 50000})
    for cut in (2, 10, len(frame) // 2, len(frame) - 1):
        s = raw(ds)
        s.sendall(frame[:cut])
        s.close()
    with ds.client() as c:
        with pytest.raises(NotFound):
            c.retrieve("half")
        c.publish("after", 1)
    assert ds.alive()


def test_a_hostile_regex_cannot_stall_the_daemon(ds):
    with ds.client() as c, ds.client() as w:
        c.subscribe("(a+)+$")
        c.subscribe(".*" * 40 + "x")
        t0 = time.monotonic()
        w.publish("a" * 255, 1)
        w.publish("b" * 255, 1)
        assert time.monotonic() - t0 < 1.0
        with pytest.raises(BadRequest, match="bad regex"):
            c.subscribe(r"(a)\1")


def test_connection_flood_is_refused_clearly_and_others_carry_on(ds_factory):
    d = ds_factory(["--max-clients", "8"]).start()
    held = [d.client() for _ in range(8)]
    with pytest.raises(Busy, match="too many clients"):
        extra = d.client()
        extra.whoami()
    held[0].publish("still", 1)
    assert held[7].retrieve("still").value == 1
    for c in held:
        c.close()
    with d.client() as c:  # slots are freed when clients leave
        assert c.retrieve("still").value == 1


def test_client_reports_a_missing_daemon_with_what_to_do(tmp_path):
    with pytest.raises(DSUnavailable, match="is `datastore` running"):
        DSClient(str(tmp_path / "nope.sock"))


def test_second_daemon_on_the_same_state_is_refused(ds):
    p = subprocess.run([sys.executable, "-m", "datastore.server", "--runtime-dir", ds.runtime_dir + "2",
                        "--state-dir", ds.state_dir], capture_output=True, text=True, timeout=20)
    assert p.returncode != 0 and "another datastore" in p.stderr
    assert ds.alive()


# -- concurrency --------------------------------------------------------------------

def test_many_concurrent_clients(ds):
    errors = []

    def worker(n):
        try:
            with ds.client() as c:
                for i in range(50):
                    c.publish("c.%02d.%02d" % (n, i), n * 100 + i)
                for i in range(50):
                    assert c.retrieve("c.%02d.%02d" % (n, i)).value == n * 100 + i
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    with ds.client() as c:
        assert len(c.list(r"c\..*")) == 32 * 50
        assert c.stats()["syncs"] < 32 * 50  # group commit shared syncs between clients


def test_sigterm_stops_the_daemon_cleanly(ds):
    ds.proc.send_signal(signal.SIGTERM)
    assert ds.proc.wait(5) == 0
    assert not os.path.exists(ds.socket_path)


def test_reconnecting_client_survives_a_daemon_restart(ds):
    sub = ds.client(reconnect=True)
    mine = sub.subscribe(r"drv\..*")
    with ds.client() as w:
        w.publish("drv.net.eth0", "up 1")
    assert [n.key for n in sub.get_notifications(2)] == ["drv.net.eth0"]
    ds.kill9()
    ds.start()
    with ds.client() as w:
        w.publish("drv.net.eth0", "up 2", overwrite=True)
    notes = sub.get_notifications(5)
    deadline = time.monotonic() + 5
    while not any(n.event == "set" for n in notes) and time.monotonic() < deadline:
        notes += sub.get_notifications(1)
    # First the notice that changes may have been missed, then the state as it is now.
    assert notes[0].event == "reconnected"
    assert [(n.sub, n.key, n.value) for n in notes[1:]] == [(mine, "drv.net.eth0", "up 2")]
    assert sub.retrieve("drv.net.eth0").value == "up 2"
    sub.close()
