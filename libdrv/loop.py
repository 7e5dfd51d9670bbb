"""A small single-threaded event loop: file descriptors and timers.

Drivers wait on their control channel, their listening socket and (later)
IRQ eventfds together; rsd itself runs on the same loop.  One thread, no
asyncio: a callback that never returns stops the whole loop, which is
exactly what makes a stuck driver miss its heartbeat.

    loop = Loop()
    loop.add_reader(fileobj, callback, *args)   # level-triggered: while readable
    loop.remove_reader(fileobj)                 # also fine once fileobj is closed
    t = loop.call_later(delay, callback, *args) # or call_at(monotonic() + delay, ...)
    t.cancel()
    loop.run()                                  # until stop(); or run_once(max_wait)

The loop itself is C (libdrv/_loop.pyx, on epoll): a wakeup is one epoll_wait
and a direct call of the callback, so in the guest, where bytecode is slow,
a callback that is a cdef class's method runs with no Python code in between.
In a batch of ready fds, a reader removed (or replaced) by an earlier
callback is not called.  Timers run after the readers, in (when, creation)
order.  An exception from a callback leaves run_once()/run() as it is.
"""

import time

from libdrv._loop import Loop, Timer

# The loop's clock: its C side reads CLOCK_MONOTONIC, as time.monotonic does.
monotonic = time.monotonic

__all__ = ["Loop", "Timer", "monotonic"]
