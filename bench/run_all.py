#!/usr/bin/env python3
"""`make bench`: every benchmark once, with the settings RESULTS.md records.

Each script prints its own table; pass --record to a script yourself to
append a new section to bench/RESULTS.md.  Needs root (rsd, namespaces,
the testbed's kernel).  Takes about 20 minutes.
"""

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

RUNS = [
    ("data store vs Redis", ["bench_ds.py"]),
    ("restart latency vs peers", ["bench_restart.py", "--runs", "3", "--kills", "20"]),
    ("rsd hang detection and CPU", ["bench_rsd_hang.py", "--runs", "3"]),
    ("testbed costs", ["bench_testbed.py", "--boots", "3", "--round-trips", "50", "--starts", "5"]),
    ("rsdrv kernel module", ["bench_kmod.py", "--runs", "5"]),
    ("serial: user-mode 16550 vs kernel 8250", ["bench_serial.py"]),
    ("Ethernet: user-mode e1000 vs kernel e1000", ["bench_net.py", "--runs", "3", "--seconds", "8",
                                                  "--crashes", "30", "--table-seconds", "20"]),
    ("disk: user-mode AHCI vs kernel ahci", ["bench_block.py", "--runs", "3", "--seconds", "5",
                                             "--crashes", "30", "--table-seconds", "20"]),
]


def main():
    failed = []
    for title, argv in RUNS:
        script = os.path.join(HERE, argv[0])
        print("\n== %s: %s" % (title, " ".join(argv)), flush=True)
        if not os.path.exists(script):
            print("   %s is missing" % argv[0])
            failed.append(title)
            continue
        if subprocess.call([sys.executable, script] + argv[1:]) != 0:
            failed.append(title)
    if failed:
        print("\nfailed: %s" % ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
