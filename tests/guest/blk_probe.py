"""A reader that notices every stall of a block device (the disk benchmark's recovery probe).

    blk_probe.py DEVICE SECONDS

4 KiB O_DIRECT reads at queue depth 1 over the first 64 MiB, for SECONDS; prints one JSON
object: {"reads": n, "errors": [...], "gaps": [[wall clock start, seconds], ...]} with every
gap between two completions longer than GAP, and "end": the wall clock when it stopped.
"""

import json
import mmap
import os
import sys
import time

GAP = 0.002
SPAN = 64 << 20


def main():
    dev, seconds = sys.argv[1], float(sys.argv[2])
    fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, 4096)
    gaps, errors, reads = [], [], 0
    end = time.monotonic() + seconds
    last = time.time()
    off = 0
    while time.monotonic() < end:
        try:
            os.preadv(fd, [buf], off)
            reads += 1
        except OSError as exc:
            errors.append("read at %d: %s" % (off, exc))
        now = time.time()
        if now - last > GAP:
            gaps.append([last, now - last])
        last = now
        off = (off + 4096 * 257) % SPAN
    print(json.dumps({"reads": reads, "errors": errors, "gaps": gaps, "end": time.time()}), flush=True)


if __name__ == "__main__":
    main()
