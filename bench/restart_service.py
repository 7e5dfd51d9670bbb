"""The small Python service every supervisor restarts in bench_restart.py.

Run as a program (the peers: s6, runit, supervisord, systemd):

    restart_service.py TAG SOCKET [--notify-fd N] [--sd-notify]

When it is ready it takes one CLOCK_MONOTONIC timestamp and sends one
datagram "TAG PID MONOTONIC_NS" to the unix datagram socket SOCKET (the
bench listens there); then it tells its supervisor, if asked to: a newline
on fd N (s6's notification-fd) or READY=1 to $NOTIFY_SOCKET (systemd).
Then it waits to be killed.

Under rsd (rsd sets $RSD_CONTROL_FD) the same service runs as a libdrv SEF
driver: rsd's spawner imports this file once and forks a child that calls
main() for every incarnation, so no interpreter start; see sef_main().

Only the standard library is imported on the program path, so every
supervisor pays the same interpreter start and nothing else.
"""
import os
import signal
import socket
import sys
import time

USAGE = "usage: restart_service.py TAG SOCKET [--notify-fd N] [--sd-notify]"


def announce(tag, socket_path):
    """Tell the bench we are ready; returns the timestamp sent."""
    now_ns = time.monotonic_ns()
    message = f"{tag} {os.getpid()} {now_ns}".encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(message, socket_path)
    return now_ns


def notify_fd(fd):
    """s6 readiness protocol: one newline on the notification fd, then close it."""
    os.write(fd, b"\n")
    os.close(fd)


def sd_notify_ready():
    """systemd readiness protocol: one datagram READY=1 to $NOTIFY_SOCKET."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        raise SystemExit("--sd-notify given but $NOTIFY_SOCKET is not set")
    if address.startswith("@"):  # abstract socket namespace
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(b"READY=1", address)


def wait_forever():
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        signal.pause()


def parse_args(argv):
    if len(argv) < 2:
        raise SystemExit(USAGE)
    tag, socket_path, rest = argv[0], argv[1], argv[2:]
    options = {"notify_fd": None, "sd_notify": False}
    while rest:
        flag = rest.pop(0)
        if flag == "--notify-fd" and rest and rest[0].isdigit():
            options["notify_fd"] = int(rest.pop(0))
        elif flag == "--sd-notify":
            options["sd_notify"] = True
        else:
            raise SystemExit(f"unknown argument {flag!r}\n{USAGE}")
    if not tag or " " in tag:
        raise SystemExit(f"TAG must be one word, got {tag!r}\n{USAGE}")
    return tag, socket_path, options


def sef_main(tag, socket_path):
    """Under rsd: a libdrv SEF driver. rsd's spawner imported this module once
    and forks a child that calls main(); the readiness announcement is made in
    the init callback, then SEF tells rsd "ready" on its control channel."""
    from libdrv.sef import SEF  # already imported by the spawner: no cost here
    sef = SEF()
    sef.on_init_fresh(lambda sef: announce(tag, socket_path))
    sef.on_init_restart(lambda sef, reason, restarts: announce(tag, socket_path))
    return sef.run()


def main(argv=None):
    tag, socket_path, options = parse_args(sys.argv[1:] if argv is None else argv)
    if os.environ.get("RSD_CONTROL_FD"):  # started by rsd: be a SEF driver
        return sef_main(tag, socket_path)
    announce(tag, socket_path)
    if options["notify_fd"] is not None:
        notify_fd(options["notify_fd"])
    if options["sd_notify"]:
        sd_notify_ready()
    wait_forever()


if __name__ == "__main__":
    sys.exit(main())
