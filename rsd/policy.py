"""When to restart a failed service (MINIX RS's policy).

The first failure restarts at once; after that a service waits
min(2^n, 30) s where n is how many times it has been restarted in a row.
backoff=false restarts at once every time.  A service that stays up for its
stable_uptime is forgiven: its count starts again at 0.
"""

MAX_BACKOFF = 30.0

# Why an incarnation ended (what a policy script gets as REASON).
REASONS = ("exit", "signal", "no-heartbeat", "init-failed", "init-timeout")


def restart_delay(restarts, backoff=True):
    """Seconds to wait before the next incarnation, given restarts so far."""
    if not backoff or restarts <= 0:
        return 0.0
    return min(float(2 ** min(restarts, 16)), MAX_BACKOFF)


def decayed_restarts(restarts, uptime, stable_uptime):
    """The restart count after an incarnation that lived uptime seconds."""
    return 0 if uptime >= stable_uptime else restarts


def failure_reason(pending, initialising, status):
    """Name why a process ended.

    pending: a reason rsd chose when it killed the process (no-heartbeat,
    init-timeout, init-failed), else None; initialising: it had not said
    ready yet; status: the raw wait status.
    """
    import os
    if pending is not None:
        return pending
    if initialising:
        return "init-failed"
    if os.WIFSIGNALED(status):
        return "signal"
    return "exit"
