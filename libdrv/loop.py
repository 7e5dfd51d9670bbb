"""A small single-threaded event loop: file descriptors and timers.

Drivers wait on their control channel, their listening socket and (later)
IRQ eventfds together; rsd itself runs on the same loop.  One thread, no
asyncio: a callback that never returns stops the whole loop, which is
exactly what makes a stuck driver miss its heartbeat.
"""

import heapq
import itertools
import selectors
import time

monotonic = time.monotonic


class Timer:
    """Handle returned by call_at/call_later; cancel() is idempotent."""

    __slots__ = ("when", "callback", "args", "cancelled")

    def __init__(self, when, callback, args):
        self.when = when
        self.callback = callback
        self.args = args
        self.cancelled = False

    def cancel(self):
        self.cancelled = True


class Loop:
    def __init__(self):
        self._sel = selectors.DefaultSelector()
        self._timers = []
        self._seq = itertools.count()
        self._running = False

    # -- file descriptors -------------------------------------------------
    def add_reader(self, fileobj, callback, *args):
        """Call callback(*args) whenever fileobj is readable (replaces any previous)."""
        try:
            self._sel.modify(fileobj, selectors.EVENT_READ, (callback, args))
        except KeyError:
            self._sel.register(fileobj, selectors.EVENT_READ, (callback, args))

    def remove_reader(self, fileobj):
        try:
            self._sel.unregister(fileobj)
        except (KeyError, ValueError):
            pass

    # -- timers -------------------------------------------------------------
    def call_at(self, when, callback, *args):
        t = Timer(when, callback, args)
        heapq.heappush(self._timers, (when, next(self._seq), t))
        return t

    def call_later(self, delay, callback, *args):
        return self.call_at(monotonic() + delay, callback, *args)

    # -- running -------------------------------------------------------------
    def stop(self):
        self._running = False

    def run_once(self, max_wait=None):
        """Wait for at most max_wait seconds (None: until something happens)."""
        timeout = max_wait
        while self._timers and self._timers[0][2].cancelled:
            heapq.heappop(self._timers)
        if self._timers:
            wait = max(0.0, self._timers[0][0] - monotonic())
            timeout = wait if timeout is None else min(timeout, wait)
        ready = self._sel.select(timeout)
        fdmap = self._sel.get_map()
        for key, _ in ready:
            # A callback earlier in this batch may have removed this one.
            if fdmap.get(key.fd) is not key:
                continue
            callback, args = key.data
            callback(*args)
        now = monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, t = heapq.heappop(self._timers)
            if not t.cancelled:
                t.cancelled = True
                t.callback(*t.args)

    def run(self):
        self._running = True
        while self._running:
            self.run_once()

    def close(self):
        self._sel.close()
