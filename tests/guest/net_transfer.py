"""One TCP transfer with its content checked, run on either end of the testbed's link.

    net_transfer.py serve-send PORT NBYTES SEED [RATE]  accept one connection, send the stream, close
    net_transfer.py serve-recv PORT                     accept one connection, read to EOF
    net_transfer.py send HOST PORT NBYTES SEED [RATE]   connect, send the stream, close
    net_transfer.py recv HOST PORT                      connect, read to EOF

RATE (bytes/s, optional) paces the sender, so a stream lasts long enough
for faults to be injected into it.

The stream is random.Random(SEED).randbytes(NBYTES), so both ends know it;
the receiving end prints one JSON line: bytes, sha256, seconds, and the
largest gap between two reads (how long the stream stalled).
"""

import hashlib
import json
import random
import socket
import sys
import time

CHUNK = 1 << 16
PACED_CHUNK = 4096     # a paced stream moves in small steps, so a stall shows to the millisecond
GAP = 0.010            # stalls longer than this are listed (wall clock start, seconds)


def stream(nbytes, seed):
    return random.Random(seed).randbytes(nbytes)


def send(sock, nbytes, seed, rate=0):
    data = memoryview(stream(nbytes, seed))
    chunk = PACED_CHUNK if rate else CHUNK
    start = time.monotonic()
    for off in range(0, nbytes, chunk):
        if rate:
            ahead = off / rate - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)
        sock.sendall(data[off:off + chunk])
    sock.shutdown(socket.SHUT_WR)
    sock.recv(1)       # the receiver closes when it has all
    return {"sent": nbytes, "seconds": time.monotonic() - start,
            "sha256": hashlib.sha256(data).hexdigest()}


def recv(sock):
    h, n, gap, gaps = hashlib.sha256(), 0, 0.0, []
    start = last = time.time()
    while True:
        data = sock.recv(CHUNK)
        now = time.time()
        if now - last > GAP and data:
            gaps.append((last, now - last))
        gap = max(gap, now - last)
        last = now
        if not data:
            break
        h.update(data)
        n += len(data)
    return {"bytes": n, "sha256": h.hexdigest(), "seconds": last - start, "max_gap": gap, "gaps": gaps}


def accept(port):
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(1)
    print(json.dumps({"listening": port}), flush=True)
    conn, _ = srv.accept()
    srv.close()
    return conn


def main(argv):
    mode = argv[0]
    if mode == "serve-send":
        out = send(accept(int(argv[1])), int(argv[2]), int(argv[3]), float(argv[4]) if argv[4:] else 0)
    elif mode == "serve-recv":
        out = recv(accept(int(argv[1])))
    elif mode == "send":
        out = send(socket.create_connection((argv[1], int(argv[2])), timeout=60), int(argv[3]), int(argv[4]),
                   float(argv[5]) if argv[5:] else 0)
    elif mode == "recv":
        out = recv(socket.create_connection((argv[1], int(argv[2])), timeout=60))
    else:
        raise SystemExit(__doc__)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
