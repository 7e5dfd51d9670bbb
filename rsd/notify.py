"""sd_notify without libsystemd: one datagram to $NOTIFY_SOCKET."""

import os
import socket


def sd_notify(text, env=os.environ):
    path = env.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.sendto(text.encode(), path)
        except OSError:
            return False
    return True


def watchdog_interval(env=os.environ):
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec), or None."""
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2e6
    except ValueError:
        return None
