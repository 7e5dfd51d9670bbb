"""Crashes injected into a service from inside the guest, for the benchmarks' recovery figures.

    crash_loop.py SOCKET LABEL COUNT INTERVAL

Asks rsd's control socket for `fi LABEL --crash` COUNT times, INTERVAL seconds apart, each
only once the previous crash's incarnation is up; prints {"crashes": [wall clock, ...]}.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    from rsd.control import request
    sock, label, count, interval = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    times = []
    for _ in range(count):
        st = request({"op": "status", "label": label}, sock, 10)["services"][0]
        deadline = time.monotonic() + 30
        while st["state"] != "up":
            if time.monotonic() > deadline:
                raise SystemExit("%s did not come back up: %s" % (label, st))
            time.sleep(0.01)
            st = request({"op": "status", "label": label}, sock, 10)["services"][0]
        times.append(time.time())
        request({"op": "fi", "label": label, "kind": "crash"}, sock, 10)
        time.sleep(interval)
    print(json.dumps({"crashes": times}), flush=True)


if __name__ == "__main__":
    main()
