"""Load on a mounted file system for the block tests, with everything it saw counted.

    fs_load.py write DIR COUNT KIB SEED OUT     # COUNT files of KIB KiB, seeded, each fsync'ed
    fs_load.py check DIR COUNT KIB SEED OUT     # read them all back and compare

OUT gets one JSON object when done: {"errors": [...], "bad": [...], "seconds": s}.  A file that
reads back different is "bad"; a failed system call is an "error" (the tests want none).
"""

import json
import os
import random
import sys
import time


def content(seed, i, kib):
    return random.Random(seed * 100003 + i).randbytes(kib * 1024)


def main():
    mode, top, count, kib, seed, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), \
        int(sys.argv[5]), sys.argv[6]
    errors, bad = [], []
    t0 = time.monotonic()
    for i in range(count):
        path = os.path.join(top, "f%04d" % i)
        want = content(seed, i, kib)
        try:
            if mode == "write":
                with open(path, "wb") as f:
                    f.write(want)
                    f.flush()
                    os.fsync(f.fileno())
            else:
                with open(path, "rb") as f:
                    if f.read() != want:
                        bad.append(path)
        except OSError as exc:
            errors.append("%s %s: %s" % (mode, path, exc))
    if mode == "write":
        try:
            fd = os.open(top, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        except OSError as exc:
            errors.append("fsync %s: %s" % (top, exc))
    with open(out + ".part", "w") as f:
        json.dump({"errors": errors, "bad": bad, "seconds": round(time.monotonic() - t0, 2)}, f)
    os.rename(out + ".part", out)


if __name__ == "__main__":
    main()
