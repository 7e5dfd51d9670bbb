"""For tests/vm/test_console.py, run in the guest: wait until the console front end
has read at least WANT bytes, has nothing left to draw and the display answered
every update (two looks STATUS_INTERVAL apart agree), then print the front end's
status and the display driver's as one JSON object.  One Python start instead of
one per look.

    python tests/guest/console_settle.py console.console0.status /run/.../svc/vga0.sock WANT TIMEOUT
"""

import json
import sys
import time

from libdrv.drvlink import DriverLink
from libdrv.dsclient import DSClient

LOOK_INTERVAL = 0.6            # the front end publishes every 0.5 s


def settled(st, want):
    return st["display"] is not None and st["in_flight"] == 0 and st["dirty"] == 0 and st["bytes_in"] >= want


def main():
    key, sock, want, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    ds = DSClient()
    deadline = time.monotonic() + timeout
    last = None
    while True:
        value = ds.get(key)
        st = json.loads(value) if value else None
        if st is not None and settled(st, want):
            if last is not None and last["bytes_in"] == st["bytes_in"] and last["updates"] == st["updates"]:
                break
            last = st
        else:
            last = None
        if time.monotonic() > deadline:
            print(json.dumps({"frontend": st, "display": None, "timeout": True}))
            return 1
        time.sleep(LOOK_INTERVAL)
    link = DriverLink(sock)
    display = link.call("status")
    link.close()
    print(json.dumps({"frontend": st, "display": display, "timeout": False}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
