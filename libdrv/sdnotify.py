"""The sd_notify datagram protocol (READY=1, WATCHDOG=1, STATUS=...),
spoken directly so no libsystemd is needed.  Used by datastore and rsd."""

import os
import socket


def notify(*fields, env=os.environ):
    """Send fields like "READY=1" to $NOTIFY_SOCKET; False if there is none
    or it cannot be reached (systemd gone: nothing to tell)."""
    path = env.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):  # abstract namespace
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.sendto("\n".join(fields).encode(), path)
        except OSError:
            return False
    return True


def watchdog_interval(env=os.environ):
    """Seconds between WATCHDOG=1 pings systemd expects (half its timeout), or None."""
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(int(usec) / 2e6, 0.01)
    except ValueError:
        return None
