"""serial16550-ctl: talk to a running 16550 driver (status, modem lines).

    python -m drivers.serial16550.ctl [--label serial0] status
    python -m drivers.serial16550.ctl set-modem [--dtr 0|1] [--rts 0|1] [--loop 0|1]
    python -m drivers.serial16550.ctl set-line [--bits 7] [--parity even] [--stop 2] [--ixon 1] ...
    python -m drivers.serial16550.ctl break on|off
    python -m drivers.serial16550.ctl flush [--rx] [--tx]
    python -m drivers.serial16550.ctl drain
    python -m drivers.serial16550.ctl regs          # LCR MCR IER MSR LSR DLL DLM read from the UART

Prints the driver's JSON reply.  Modem lines, data bits and parity live
here because a pty (the tty front end) cannot carry them: it has no
TIOCMSET, and Linux ptys refuse CS5-CS7 and PARENB.
"""

import argparse
import json
import os
import socket
import sys

from libdrv.wire import FrameReader, encode


def call(path, msg, timeout=5.0):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(encode(dict(msg, id=1)))
        reader = FrameReader()
        while True:
            data = s.recv(65536)
            if not data:
                raise ConnectionError("the driver closed the connection")
            for m in reader.feed(data):
                if m.get("id") == 1:
                    return m


def _bool01(text):
    if text not in ("0", "1"):
        raise argparse.ArgumentTypeError("use 0 or 1")
    return text == "1"


def main(argv=None):
    runtime = os.environ.get("RSD_RUNTIME_DIR", "/run/rsd")
    p = argparse.ArgumentParser(prog="serial16550-ctl")
    p.add_argument("--label", default="serial0")
    p.add_argument("--socket", help="driver socket (default RUNTIME/svc/LABEL.sock)")
    sub = p.add_subparsers(dest="verb", required=True)
    sub.add_parser("status")
    m = sub.add_parser("set-modem")
    for line in ("dtr", "rts", "loop"):
        m.add_argument("--" + line, type=_bool01)
    line = sub.add_parser("set-line", help="bits and parity (a pty cannot carry them), or any line field")
    line.add_argument("--baud", type=int)
    line.add_argument("--bits", type=int, choices=(5, 6, 7, 8))
    line.add_argument("--parity", choices=("none", "odd", "even", "mark", "space"))
    line.add_argument("--stop", type=int, choices=(1, 2))
    line.add_argument("--rtscts", type=_bool01)
    line.add_argument("--ixon", type=_bool01)
    line.add_argument("--ixoff", type=_bool01)
    line.add_argument("--vstart", type=int, help="the XON character's code (default 17)")
    line.add_argument("--vstop", type=int, help="the XOFF character's code (default 19)")
    b = sub.add_parser("break")
    b.add_argument("state", choices=("on", "off"))
    f = sub.add_parser("flush")
    f.add_argument("--rx", action="store_true")
    f.add_argument("--tx", action="store_true")
    sub.add_parser("drain")
    sub.add_parser("regs")
    a = p.parse_args(argv)
    path = a.socket or os.path.join(runtime, "svc", a.label + ".sock")
    if a.verb == "status":
        msg = {"op": "status"}
    elif a.verb == "set-modem":
        msg = {"op": "set_modem", **{k: getattr(a, k) for k in ("dtr", "rts", "loop") if getattr(a, k) is not None}}
    elif a.verb == "set-line":
        msg = {"op": "set_line", **{k: getattr(a, k) for k in ("baud", "bits", "parity", "stop", "rtscts",
                                                                "ixon", "ixoff", "vstart", "vstop")
                                    if getattr(a, k) is not None}}
    elif a.verb == "break":
        msg = {"op": "break", "on": a.state == "on"}
    elif a.verb == "flush":
        msg = {"op": "flush", "rx": a.rx, "tx": a.tx}
    else:
        msg = {"op": a.verb}
    try:
        reply = call(path, msg, timeout=30 if a.verb == "drain" else 5.0)
    except OSError as exc:
        print("serial16550-ctl: cannot reach the driver at %s: %s (is it up? rsctl status %s)"
              % (path, exc, a.label), file=sys.stderr)
        return 1
    print(json.dumps(reply, sort_keys=True))
    return 0 if reply.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
