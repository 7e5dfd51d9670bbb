"""The sd_notify datagram protocol (READY=1, WATCHDOG=1, STATUS=...),
spoken directly so no libsystemd is needed."""

import os
import socket


def notify(*fields):
    """Send fields like "READY=1" to $NOTIFY_SOCKET; False if there is none."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):  # abstract namespace
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        s.connect(path)
        s.sendall("\n".join(fields).encode())
    return True


def watchdog_interval():
    """Seconds between WATCHDOG=1 pings systemd expects (half its timeout), or None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(int(usec) / 2e6, 0.01)
    except ValueError:
        return None
