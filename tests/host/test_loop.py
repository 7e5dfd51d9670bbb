"""libdrv's event loop (C, on epoll): readers, timers, removal during dispatch, signals."""

import os
import signal
import socket
import time

import pytest

from libdrv.loop import Loop, monotonic


@pytest.fixture
def loop():
    lp = Loop()
    yield lp
    lp.close()


def test_reader_called_with_its_args_while_readable_and_replaced_by_a_new_add(loop):
    a, b = socket.socketpair()
    seen = []
    loop.add_reader(a, seen.append, "first")   # a builtin callback: called from C directly
    b.send(b"x")
    loop.run_once(0.1)
    loop.run_once(0.1)                          # level-triggered: still readable, called again
    loop.add_reader(a, seen.append, "second")
    loop.run_once(0.1)
    assert seen == ["first", "first", "second"]
    loop.remove_reader(a)
    start = time.monotonic()
    loop.run_once(0.05)
    assert seen == ["first", "first", "second"]
    assert time.monotonic() - start >= 0.045


def test_readers_on_plain_fds_and_objects_with_fileno(loop):
    efd = os.eventfd(0)

    class Line:
        def fileno(self):
            return efd

    seen = []
    loop.add_reader(Line(), lambda: seen.append(os.eventfd_read(efd)))
    os.eventfd_write(efd, 3)
    loop.run_once(0.1)
    assert seen == [3]
    loop.remove_reader(efd)          # the same fd, named another way
    os.eventfd_write(efd, 1)
    loop.run_once(0.02)
    assert seen == [3]
    os.close(efd)


def test_timers_run_in_time_order_then_creation_order_and_cancel(loop):
    seen = []
    now = monotonic()
    loop.call_at(now + 0.03, seen.append, "c")
    loop.call_at(now + 0.01, seen.append, "a")
    loop.call_at(now + 0.02, seen.append, "b1")
    loop.call_at(now + 0.02, seen.append, "b2")
    cancelled = loop.call_at(now + 0.015, seen.append, "cancelled")
    cancelled.cancel()
    cancelled.cancel()                # idempotent
    loop.call_later(0.05, loop.stop)
    loop.run()
    assert seen == ["a", "b1", "b2", "c"]
    assert monotonic() - now >= 0.05


def test_many_timers_come_out_sorted(loop):
    import random
    rng = random.Random(7)
    seen = []
    base = monotonic() - 1.0          # all due already
    whens = [base + rng.random() for _ in range(500)]
    for i, when in enumerate(whens):
        loop.call_at(when, seen.append, (when, i))
    loop.run_once(0)
    assert seen == sorted(seen) and len(seen) == 500


def test_a_timer_does_not_hold_back_a_reader_and_wakes_the_wait(loop):
    seen = []
    loop.call_later(0.02, seen.append, "timer")
    start = monotonic()
    loop.run_once()                   # no max_wait: the timer bounds the wait
    assert seen == ["timer"]
    assert 0.019 <= monotonic() - start < 1.0
    loop.run_once(0)                  # a fired timer does not fire again
    assert seen == ["timer"]


def test_call_later_zero_from_a_reader_runs_in_the_same_round_from_a_timer_in_the_next(loop):
    a, b = socket.socketpair()
    seen = []

    def on_readable():
        a.recv(10)
        loop.call_later(0, seen.append, "from reader")

    def timer():
        seen.append("timer")
        loop.call_later(0, seen.append, "from timer")

    loop.add_reader(a, on_readable)
    b.send(b"x")
    loop.run_once(0.1)
    assert seen == ["from reader"]
    loop.call_later(0, timer)
    loop.run_once(0)
    assert seen == ["from reader", "timer"]
    loop.run_once(0)
    assert seen == ["from reader", "timer", "from timer"]


def test_readers_removed_or_replaced_in_a_batch_are_not_called(loop):
    pairs = [socket.socketpair() for _ in range(4)]
    (a, a_peer), (c, c_peer), (d, d_peer), (e, e_peer) = pairs
    seen = []

    def on_a():
        seen.append("a")
        a.recv(10)
        loop.remove_reader(a)                 # itself
        loop.remove_reader(c)                 # another, ready in the same batch
        loop.add_reader(d, seen.append, "d replaced")  # another, replaced: not this round
        loop.remove_reader(e)
        loop.add_reader(e, seen.append, "e re-added")

    loop.add_reader(a, on_a)
    loop.add_reader(c, seen.append, "c")
    loop.add_reader(d, seen.append, "d")
    loop.add_reader(e, seen.append, "e")
    for _, peer in pairs:
        peer.send(b"x")                       # a first: epoll reports in readiness order
    time.sleep(0.01)
    loop.run_once(0.1)
    assert seen == ["a"]
    loop.run_once(0.1)
    assert sorted(seen) == ["a", "d replaced", "e re-added"]


def test_remove_reader_of_closed_or_unknown_fds_does_not_raise(loop):
    a, b = socket.socketpair()
    seen = []
    loop.add_reader(a, seen.append, "a")
    a.close()                                  # closed while registered
    loop.remove_reader(a)                      # found by the object itself
    loop.remove_reader(a)
    loop.remove_reader(b)                      # never registered
    efd = os.eventfd(0)
    loop.add_reader(efd, seen.append, "efd")
    os.close(efd)
    loop.remove_reader(efd)                    # epoll_ctl DEL gives EBADF: ignored
    loop.run_once(0.01)
    assert seen == []
    with pytest.raises(ValueError):
        loop.add_reader(a, seen.append, "closed")


def test_an_fd_number_reused_after_a_close_without_removal_is_watched(loop):
    a, a_peer = socket.socketpair()
    seen = []
    loop.add_reader(a, seen.append, "old")
    fd = a.fileno()
    a.close()
    a_peer.close()
    c, c_peer = socket.socketpair()
    if c.fileno() != fd:
        c, c_peer = c_peer, c
    assert c.fileno() == fd
    loop.add_reader(c, seen.append, "new")
    c_peer.send(b"x")
    loop.run_once(0.1)
    assert seen == ["new"]


def test_stop_from_a_callback_ends_run(loop):
    a, b = socket.socketpair()
    count = []

    def on_readable():
        count.append(a.recv(1))
        if len(count) == 3:
            loop.stop()

    loop.add_reader(a, on_readable)
    b.send(b"xyzw")
    loop.run()
    assert len(count) == 3
    loop.run_once(0.1)                         # the loop is still usable
    assert len(count) == 4


def test_an_exception_from_a_callback_leaves_run_and_the_loop_keeps_working(loop):
    a, b = socket.socketpair()

    def broken():
        raise RuntimeError("boom")

    loop.add_reader(a, broken)
    b.send(b"x")
    with pytest.raises(RuntimeError, match="boom"):
        loop.run()
    loop.remove_reader(a)
    loop.call_later(0, broken)
    with pytest.raises(RuntimeError):
        loop.run_once(0)
    seen = []
    loop.call_later(0, seen.append, "after")
    loop.run_once(0)
    assert seen == ["after"]


def test_a_signal_wakes_the_loop_through_the_wakeup_socket():
    loop = Loop()
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    handled, woken = [], []
    old_fd = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
    old_handler = signal.signal(signal.SIGUSR1, lambda signum, frame: handled.append(signum))
    try:
        def on_wakeup():
            woken.append(wake_r.recv(512))
            loop.stop()

        loop.add_reader(wake_r, on_wakeup)
        loop.call_later(0.02, os.kill, os.getpid(), signal.SIGUSR1)
        loop.run()                              # only the signal ends it
        assert woken == [bytes([signal.SIGUSR1])]
        assert handled == [signal.SIGUSR1]
    finally:
        signal.set_wakeup_fd(old_fd)
        signal.signal(signal.SIGUSR1, old_handler)
        loop.close()
        wake_r.close()
        wake_w.close()


def test_a_signal_during_the_wait_runs_its_handler_and_the_wait_goes_on(loop):
    handled, seen = [], []
    old_handler = signal.signal(signal.SIGALRM, lambda signum, frame: handled.append(signum))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.02)
        loop.call_later(0.08, seen.append, "timer")
        start = monotonic()
        loop.run_once()                         # EINTR at 20 ms: handled, then waits on
        assert handled == [signal.SIGALRM]
        assert seen == ["timer"] and monotonic() - start >= 0.075
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)


def test_a_signal_handler_that_raises_leaves_the_wait(loop):
    def handler(signum, frame):
        raise KeyboardInterrupt

    old_handler = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.02)
        start = monotonic()
        with pytest.raises(KeyboardInterrupt):
            loop.run_once(5.0)
        assert monotonic() - start < 2.0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)


def test_a_nested_run_once_inside_a_callback(loop):
    a, b = socket.socketpair()
    c, d = socket.socketpair()
    seen = []

    def outer():
        a.recv(10)
        d.send(b"y")
        loop.run_once(0.1)                      # as rsd's adoption waits inside a callback
        seen.append("outer done")

    def inner():
        c.recv(10)
        seen.append("inner")

    loop.add_reader(a, outer)
    loop.add_reader(c, inner)
    b.send(b"x")
    loop.run_once(0.1)
    assert seen == ["inner", "outer done"]


def test_close_is_idempotent_and_a_closed_loop_refuses_work():
    loop = Loop()
    a, b = socket.socketpair()
    loop.add_reader(a, lambda: None)
    loop.close()
    loop.close()
    loop.remove_reader(a)                       # harmless
    with pytest.raises(ValueError):
        loop.run_once(0)
    with pytest.raises(ValueError):
        loop.add_reader(a, lambda: None)
