"""Disk benchmark: the user-mode AHCI driver + NBD front end vs the kernel's ahci driver, on the
same emulated ICH9 AHCI and the same disk image in the same guest.

    sudo .venv/bin/python bench/bench_block.py [--runs 3] [--seconds 5] [--crashes 30]
        [--table-seconds 20] [--record]

One guest boots with a --disk-mb image.  The paths run one after the other: first the
kernel's (modprobe ahci sd_mod; the disk is /dev/sdX), then rsd's (the kernel driver
unbound, rsd binds the HBA to vfio-pci; the disk is the front end's /dev/nbdN).

Figures, each the median of --runs fio runs (Debian's fio, libaio, O_DIRECT, --seconds each):
  sequential read and write, 1 MiB blocks, queue depth 8        MiB/s
  random read, 4 KiB blocks, queue depth 32 and 1               IOPS
Recovery (rsd only): a 4 KiB O_DIRECT read loop at queue depth 1 (tests/guest/blk_probe.py)
notes every gap between completions over 2 ms; bench/crash_loop.py asks rsd's control socket for
`fi disk0 --crash` --crashes times, 1 s apart, noting the wall clock of each; recovery is the
end of the gap that spans a crash minus the crash's time: crash -> the pending request
completed, as the application sees it.
The seed's table: fio random writes (64 KiB, queue depth 8) on an ext4 file for
--table-seconds with a crash every 1 s, 4 s, 25 s and never, as throughput loss against never,
with fio's error count.
"""

import argparse
import json
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

PYTHON = os.path.join(REPO, ".venv", "bin", "python")
PROBE = os.path.join(REPO, "tests", "guest", "blk_probe.py")
AHCI_DEV = "/sys/bus/pci/devices/0000:00:03.0"
MNT = "/mnt/bench"
JOBS = (("seq_read_mib_s", "read", "1M", 8), ("seq_write_mib_s", "write", "1M", 8),
        ("rand_read_qd32_iops", "randread", "4k", 32), ("rand_read_qd1_iops", "randread", "4k", 1))


# ======================================================================== host side
def median(xs):
    return statistics.median(xs) if xs else float("nan")


class Bench:
    def __init__(self, tb, args):
        self.tb, self.args = tb, args

    def sh(self, line, timeout=300, env=None):
        r = self.tb.run(["sh", "-c", line], timeout=timeout, env=env)
        if r.rc != 0:
            raise RuntimeError("guest: %s: rc %d\n%s%s" % (line, r.rc, r.stdout, r.stderr))
        return r.stdout

    def fio(self, dev, rw, bs, depth, seconds, extra=""):
        out = self.sh("fio --name=b --filename=%s --direct=1 --ioengine=libaio --rw=%s --bs=%s --iodepth=%d "
                      "--size=%dM --runtime=%d --time_based --output-format=json %s"
                      % (dev, rw, bs, depth, self.args.region_mb, seconds, extra), timeout=seconds + 120)
        return json.loads(out[out.index("{"):])["jobs"][0]

    def measure(self, dev):
        out = {key: [] for key, _, _, _ in JOBS}
        for _ in range(self.args.runs):
            for key, rw, bs, depth in JOBS:
                job = self.fio(dev, rw, bs, depth, self.args.seconds)
                side = job["write" if "write" in rw else "read"]
                out[key].append(side["bw_bytes"] / (1 << 20) if key.endswith("mib_s") else side["iops"])
        return out

    def kernel_path(self):
        self.sh("modprobe sd_mod && modprobe ahci")
        dev = self.sh("for i in $(seq 100); do d=$(ls %s/ata*/host*/target*/*/block 2>/dev/null) && "
                      "[ -n \"$d\" ] && echo /dev/$d && exit 0; sleep 0.1; done; exit 1" % AHCI_DEV).strip()
        figures = self.measure(dev)
        self.sh("echo 0000:00:03.0 > %s/driver/unbind && rmmod ahci" % AHCI_DEV)
        return figures

    def recovery(self, stack):
        from testbed.blockstack import RUNTIME
        n = self.args.crashes
        dev = stack.device()
        # The reader outlives the crashes: each waits for the previous incarnation to be up.
        stack.sh("setsid %s %s %s %d > /tmp/probe.json 2>&1 < /dev/null &" % (PYTHON, PROBE, dev, 3 * n + 10)).check()
        time.sleep(3)
        crashes = json.loads(self.sh("cd %s && %s bench/crash_loop.py %s/rsd.sock disk0 %d 1.0"
                                     % (REPO, PYTHON, RUNTIME, n), timeout=n * 30 + 60,
                                     env=stack.env).splitlines()[-1])["crashes"]
        deadline = time.monotonic() + 120
        while True:
            text = stack.sh("cat /tmp/probe.json").stdout
            if '"gaps"' in text:
                rec = json.loads(text.splitlines()[-1])
                break
            if time.monotonic() > deadline:
                raise RuntimeError("no result from the probe: %s" % text)
            time.sleep(1)
        recoveries = []
        if crashes[-1] > rec["end"] - 1:
            raise RuntimeError("the probe ended (%.1f) before the last crash (%.1f): it needs longer"
                               % (rec["end"], crashes[-1]))
        for t in crashes:
            spans = [start + dur - t for start, dur in rec["gaps"] if start <= t + 0.05 and start + dur > t]
            # A crash the probe did not notice (no gap over 2 ms) recovered within 2 ms.
            recoveries.append(max(spans) if spans else 0.002)
        return {"recovery_ms": [r * 1000 for r in recoveries], "errors": rec["errors"], "reads": rec["reads"]}

    def crash_table(self, stack):
        from testbed.blockstack import RUNTIME
        secs = self.args.table_seconds
        dev = stack.device()
        stack.sh("mkfs.ext4 -q -F %s && mkdir -p %s && mount %s %s" % (dev, MNT, dev, MNT), timeout=300).check()
        out = {}
        try:
            for interval in (None, 25, 4, 1):
                if interval:
                    count = int(secs // interval) if interval < secs else 1
                    first = min(interval, secs / 2)
                    line = ("sleep %s; cd %s && %s bench/crash_loop.py %s/rsd.sock disk0 %d %s"
                            % (first, REPO, PYTHON, RUNTIME, count, interval))
                    # In the background: the agent runs one request at a time.
                    stack.sh("rm -f /tmp/crash.json; setsid sh -c '%s' > /tmp/crash.json 2>&1 < /dev/null &"
                             % line).check()
                job = self.fio(MNT + "/fio.dat", "randwrite", "64k", 8, secs)
                out["never" if interval is None else "%ds" % interval] = {
                    "mib_s": job["write"]["bw_bytes"] / (1 << 20), "errors": job["error"]}
                if interval:
                    stack.wait_for("grep -q crashes /tmp/crash.json", "the crash injector to finish", 120)
        finally:
            stack.sh("umount %s; true" % MNT)
        fsck = stack.sh("e2fsck -fn %s" % dev, timeout=300)
        out["fsck_clean"] = fsck.rc == 0
        return out


def table(kernel, ours, rec, crash_table):
    rows = []
    for key, name in (("seq_read_mib_s", "sequential read 1 MiB qd 8 (MiB/s)"),
                      ("seq_write_mib_s", "sequential write 1 MiB qd 8 (MiB/s)"),
                      ("rand_read_qd32_iops", "random read 4 KiB qd 32 (IOPS)"),
                      ("rand_read_qd1_iops", "random read 4 KiB qd 1 (IOPS)")):
        k, o = median(kernel[key]), median(ours[key])
        rows.append("| %s | %.0f | %.0f | %.2f |" % (name, k, o, o / k if k else float("nan")))
    out = ["| median of runs | kernel ahci | rsd ahci + NBD front end | ratio |", "|---|---|---|---|"] + rows
    r = rec["recovery_ms"]
    out += ["", "| recovery, crash -> the pending read completed (ms, %d crashes) | mean | median | stdev | min "
            "| max |" % len(r), "|---|---|---|---|---|---|",
            "| 4 KiB O_DIRECT reads at qd 1, gaps seen by the reader | %.1f | %.1f | %.1f | %.1f | %.1f |"
            % (statistics.mean(r), statistics.median(r), statistics.pstdev(r), min(r), max(r)),
            "", "reader: %d reads, %d errors" % (rec["reads"], len(rec["errors"]))]
    never = crash_table["never"]["mib_s"]
    out += ["", "| crash every | ext4 random write 64 KiB qd 8 (MiB/s) | loss vs never | fio errors |",
            "|---|---|---|---|"]
    for key in ("never", "25s", "4s", "1s"):
        row = crash_table[key]
        out.append("| %s | %.1f | %.1f %% | %d |" % (key, row["mib_s"], 100 * (1 - row["mib_s"] / never),
                                                     row["errors"]))
    out += ["", "e2fsck -fn afterwards: %s" % ("clean" if crash_table["fsck_clean"] else "ERRORS")]
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--crashes", type=int, default=30)
    ap.add_argument("--table-seconds", type=int, default=20)
    ap.add_argument("--disk-mb", type=int, default=1024)
    ap.add_argument("--region-mb", type=int, default=512, help="the part of the disk fio uses")
    ap.add_argument("--cpus", type=int, default=1, help="the guest's vCPUs (both paths run in the same guest)")
    ap.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    args = ap.parse_args()
    from testbed import Testbed
    from testbed.blockstack import BlockStack
    with Testbed(disk_size_mb=args.disk_mb, cpus=args.cpus) as tb:
        bench = Bench(tb, args)
        kernel = bench.kernel_path()
        stack = BlockStack(tb).start()
        try:
            ours = bench.measure(stack.device())
            rec = bench.recovery(stack)
            crashes = bench.crash_table(stack)
        finally:
            print(stack.logs()[-3000:], file=sys.stderr)
            stack.stop()
    text = table(kernel, ours, rec, crashes)
    print(text)
    print(json.dumps({"kernel": kernel, "ours": ours, "recovery": rec, "crash_table": crashes}))
    if args.record:
        cmd = "sudo .venv/bin/python bench/bench_block.py " + " ".join(sys.argv[1:])
        with open(os.path.join(REPO, "bench", "RESULTS.md"), "a") as f:
            f.write("\n### Disk (%s)\n\n    %s\n\n%s\n" % (time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                                      cmd, text))


if __name__ == "__main__":
    main()
