"""libdrv's driver life cycle (SEF) and event loop, driven over a real control channel."""

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from libdrv.channel import Channel
from libdrv.loop import Loop

DRIVER = textwrap.dedent('''
    import os, sys, time
    from libdrv.sef import SEF
    sef = SEF()
    mode = sys.argv[1]

    @sef.on_init_fresh
    def fresh(s):
        print("fresh", flush=True)
        if mode == "fail":
            raise ValueError("no device")

    @sef.on_init_restart
    def restart(s, reason, restarts):
        print("restart", reason, restarts, s.generation, flush=True)

    @sef.on_exit
    def bye(s):
        print("exit callback", flush=True)

    if mode == "stuck":
        sef.loop.call_later(0.2, lambda: time.sleep(3600))
    sys.exit(sef.run())
''')


class Driver:
    def __init__(self, mode="ok"):
        mine, theirs = socket.socketpair()
        env = dict(os.environ, RSD_CONTROL_FD=str(theirs.fileno()), RSD_LABEL="t")
        self.proc = subprocess.Popen([sys.executable, "-c", DRIVER, mode], env=env, pass_fds=[theirs.fileno()],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        theirs.close()
        self.ch = Channel(mine)

    def recv(self, timeout=5):
        return self.ch.recv_blocking(timeout)

    def finish(self, timeout=5):
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out, err


def test_fresh_init_then_ready_then_pings_answered_from_the_loop():
    d = Driver()
    d.ch.send({"op": "init", "type": "fresh", "reason": None, "restarts": 0, "generation": 1})
    assert d.recv() == {"op": "ready"}
    for seq in range(3):
        d.ch.send({"op": "ping", "seq": seq})
        assert d.recv() == {"op": "pong", "seq": seq}
    d.proc.send_signal(signal.SIGTERM)
    code, out, _ = d.finish()
    assert code == 0 and out.split("\n")[:2] == ["fresh", "exit callback"]


def test_sigterm_right_after_ready_still_runs_the_exit_callback():
    for _ in range(5):
        d = Driver()
        d.ch.send({"op": "init", "type": "fresh", "reason": None, "restarts": 0, "generation": 1})
        assert d.recv() == {"op": "ready"}
        d.proc.send_signal(signal.SIGTERM)
        code, out, _ = d.finish()
        assert code == 0 and "exit callback" in out.split("\n")


def test_restart_init_gets_reason_and_count():
    d = Driver()
    d.ch.send({"op": "init", "type": "restart", "reason": "no-heartbeat", "restarts": 4, "generation": 9})
    assert d.recv() == {"op": "ready"}
    d.ch.close()  # rsd gone: the driver stops
    code, out, _ = d.finish()
    assert code == 0 and out.splitlines()[0] == "restart no-heartbeat 4 9"


def test_init_exception_is_reported_and_exits_nonzero():
    d = Driver("fail")
    d.ch.send({"op": "init", "type": "fresh", "reason": None, "restarts": 0, "generation": 1})
    assert d.recv() == {"op": "init_failed", "error": "ValueError: no device"}
    code, _, err = d.finish()
    assert code == 1 and "ValueError: no device" in err


def test_sigterm_before_init_exits_cleanly():
    d = Driver()
    time.sleep(0.3)  # waiting for its init message
    d.proc.send_signal(signal.SIGTERM)
    code, _, _ = d.finish()
    assert code == 0


def test_stuck_loop_stops_answering_pings():
    d = Driver("stuck")
    d.ch.send({"op": "init", "type": "fresh", "reason": None, "restarts": 0, "generation": 1})
    assert d.recv() == {"op": "ready"}
    time.sleep(0.4)
    d.ch.send({"op": "ping", "seq": 1})
    with pytest.raises(TimeoutError):
        d.recv(timeout=0.5)
    d.proc.kill()
    d.finish()


@pytest.mark.parametrize("kind, check", [
    ("exit", lambda code: code == 1),
    ("crash", lambda code: code == -signal.SIGSEGV),
])
def test_fault_injection_messages(kind, check):
    d = Driver()
    d.ch.send({"op": "init", "type": "fresh", "reason": None, "restarts": 0, "generation": 1})
    assert d.recv() == {"op": "ready"}
    d.ch.send({"op": "fi", "kind": kind})
    code, _, _ = d.finish()
    assert check(code), code


def test_standalone_without_rsd_runs_fresh_init():
    p = subprocess.Popen([sys.executable, "-c", DRIVER, "ok"], stdout=subprocess.PIPE, text=True,
                         env={k: v for k, v in os.environ.items() if not k.startswith("RSD_")})
    assert p.stdout.readline().strip() == "fresh"
    p.send_signal(signal.SIGTERM)
    assert p.wait(5) == 0


def test_loop_timers_run_in_order_and_cancel():
    loop = Loop()
    seen = []
    loop.call_later(0.03, seen.append, "b")
    loop.call_later(0.01, seen.append, "a")
    t = loop.call_later(0.02, seen.append, "cancelled")
    t.cancel()
    loop.call_later(0.05, loop.stop)
    loop.run()
    assert seen == ["a", "b"]


def test_loop_readers_and_removal_during_a_batch():
    loop = Loop()
    a, b = socket.socketpair()
    c, d = socket.socketpair()
    seen = []

    def on_a():
        seen.append(a.recv(10))
        loop.remove_reader(c)  # c is readable in the same batch: must not be called

    loop.add_reader(a, on_a)
    loop.add_reader(c, lambda: seen.append("c called"))
    b.send(b"x")  # a becomes ready first, so epoll reports it first
    d.send(b"y")
    time.sleep(0.01)
    loop.run_once(0.1)
    loop.run_once(0.05)
    assert seen == [b"x"]
    loop.close()
