"""A service that publishes to the data store all the time: the DS load of
tests/vm/test_systemd.py.

Every TICK seconds it publishes a new key load.<label>.<N> (u32 N, N = 1, 2, ...) and
prints "acked N" once DS acknowledged it (N carries on after the keys DS has); a write DS did not acknowledge (DS down, or not
yet knowing this pid's label again) is retried with the same N, so the keys stay
contiguous and every "acked" line in its log (STATE_DIR/log/<label>.log) names a key
that must exist.  Stops adding keys at MAX_KEYS (under DS's per-label quota).
"""

import sys

from libdrv.dsclient import DSClient, DSError
from libdrv.sef import SEF

TICK = 0.1
MAX_KEYS = 3000


def main():
    sef = SEF()
    state = {"n": 1, "ds": None}
    prefix = "load.%s." % sef.label

    def tick():
        n = state["n"]
        if n <= MAX_KEYS:
            try:
                if state["ds"] is None:
                    state["ds"] = DSClient(reconnect=True)
                state["ds"].publish(prefix + str(n), n, type="u32", overwrite=True)
            except (DSError, OSError) as exc:
                print("not acked %d: %s" % (n, exc), flush=True)
            else:
                print("acked %d" % n, flush=True)
                state["n"] = n + 1
        sef.loop.call_later(TICK, tick)

    def carry_on():
        # After the last key DS has: a restart, or a fresh start after a reboot (DS's journal
        # kept the keys), must not rewrite history.
        client = DSClient(reconnect=True)
        state["ds"] = client
        have = [int(e.key.rsplit(".", 1)[1]) for e in client.list(r"load\.%s\.[0-9]+" % sef.label)]
        state["n"] = max(have, default=0) + 1
        sef.loop.call_later(TICK, tick)

    @sef.on_init_fresh
    def fresh(s):
        carry_on()

    @sef.on_init_restart
    def again(s, reason, restarts):
        carry_on()

    return sef.run()


if __name__ == "__main__":
    sys.exit(main())
