"""rsdrv costs in the testbed guest: DEVIO single and batched vs direct inb after ioperm,
the Python PortIO path, safecopy bandwidth vs memcpy, IRQ delivery latency, and a long
fuzz run.  Prints a markdown table (medians over --runs runs; ratios within the same guest).

    .venv/bin/python bench/bench_kmod.py --runs 5 --fuzz-calls 2000000
"""
import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from testbed import Testbed  # noqa: E402
from testbed.kernel import find_kernel  # noqa: E402

KMOD = os.path.join(REPO, "kmod")
UAPI = os.path.join(KMOD, "include", "uapi")
COPY_SIZES = (64, 512, 4096, 16384, 65536)

PY_PORTIO = """
import time
from libdrv.rsdrv import Endpoint
from libdrv.portio import PortIO
ep = Endpoint.open(); ep.set_label("bpy"); ep.allow_io(0x2f8, 8); ep.seal()
pio = PortIO(ep); n = 20000
t0 = time.perf_counter()
for _ in range(n):
    pio.inb(0x2ff)
t1 = time.perf_counter()
b = pio.batch(64)
for _ in range(64):
    b.add_in(0x2ff)
t2 = time.perf_counter()
for _ in range(n // 64):
    pio.run(b)
t3 = time.perf_counter()
print("pyinb", (t1 - t0) / n * 1e9)
print("pybatch", (t3 - t2) / ((n // 64) * 64) * 1e9)
"""


def build(work):
    kernel = find_kernel()
    src = os.path.join(work, "kmod")
    shutil.copytree(KMOD, src)
    subprocess.run(["make", "-s", "-C", kernel.build_dir, f"M={src}", "modules"], check=True,
                   capture_output=True)
    out = {"ko": os.path.join(src, "rsdrv.ko")}
    for name in ("rsdrv_bench", "rsdrv_fuzz"):
        out[name] = os.path.join(work, name)
        subprocess.run(["gcc", "-O2", f"-I{UAPI}", "-o", out[name],
                        os.path.join(KMOD, name + ".c")], check=True)
    return out


def run(tb, argv, timeout=600):
    r = tb.run(argv, timeout=timeout)
    if r.rc != 0:
        raise RuntimeError(f"{argv} failed ({r.rc}): {r.stdout}{r.stderr}")
    return r.stdout


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--fuzz-calls", type=int, default=1000000)
    args = ap.parse_args()
    if args.runs < 1 or args.fuzz_calls < 0:
        ap.error("--runs >= 1 and --fuzz-calls >= 0")

    samples = {}

    def add(key, value):
        samples.setdefault(key, []).append(float(value))

    with tempfile.TemporaryDirectory() as work:
        files = build(work)
        with Testbed() as tb:
            ko = tb.push(files["ko"], "/tmp/rsdrv.ko")
            bench = tb.push(files["rsdrv_bench"], "/tmp/rsdrv_bench")
            fuzz = tb.push(files["rsdrv_fuzz"], "/tmp/rsdrv_fuzz")
            run(tb, ["insmod", ko])
            try:
                for _ in range(args.runs):
                    for what in ("pio", "vpio", "direct", "pioout", "vpioout", "directout"):
                        add(what, run(tb, [bench, what, "200000"]).split()[1])
                    for size in COPY_SIZES:
                        n = str(max(200, 4000000 // size))
                        _, _, ns, mbs = run(tb, [bench, "copy", str(size), n]).split()
                        add(("copy", size), mbs)
                        add(("copy_ns", size), ns)
                        _, _, ns, mbs = run(tb, [bench, "memcpy", str(size), n]).split()
                        add(("memcpy", size), mbs)
                    p50, p90, p99 = run(tb, [bench, "irq", "200"]).split()[1:]
                    add("irq50", p50)
                    add("irq90", p90)
                    add("irq99", p99)
                    for line in run(tb, ["python", "-c", PY_PORTIO]).splitlines():
                        key, value = line.split()
                        add(key, value)
                fuzz_out = fuzz_s = None
                if args.fuzz_calls:
                    # Root sets up sealed + unsealed endpoints, then 2 processes fuzz as nobody.
                    out = run(tb, ["sh", "-c", "a=$(date +%s.%N); "
                                   f"{fuzz} 0xbe7c {args.fuzz_calls} --setup 2; "
                                   "b=$(date +%s.%N); echo time $a $b; "
                                   "dmesg | grep -cE 'BUG:|WARNING:|Oops|Call Trace' || true"],
                              timeout=3000)
                    fuzz_out = out
                    m = re.search(r"time (\S+) (\S+)", out)
                    fuzz_s = float(m.group(2)) - float(m.group(1))
            finally:
                run(tb, ["rmmod", "rsdrv"])

    med = {k: statistics.median(v) for k, v in samples.items()}
    print(f"rsdrv in the testbed guest (TCG, -smp 1), medians of {args.runs} runs")
    print()
    print("| COM2 scratch register (0x2ff) | inb: ns per access | vs direct | "
          "outb: ns per access | vs direct |")
    print("|---|---|---|---|---|")
    for rd, wr, name in (("direct", "directout", "direct, after ioperm (root, C)"),
                         ("pio", "pioout", "DEVIO, one ioctl per access (C)"),
                         ("vpio", "vpioout", "VDEVIO, batch of 64 per ioctl (C)"),
                         ("pyinb", None, "PortIO.inb from Python"),
                         ("pybatch", None, "PortIO.run(batch of 64 reads) from Python")):
        cells = f"| {name} | {med[rd]:.0f} | {med[rd] / med['direct']:.1f}x |"
        if wr:
            cells += f" {med[wr]:.0f} | {med[wr] / med['directout']:.1f}x |"
        else:
            cells += " - | - |"
        print(cells)
    print()
    print("| safecopy size | safecopy MB/s | ns per copy | memcpy MB/s (same process) | safecopy/memcpy |")
    print("|---|---|---|---|---|")
    for size in COPY_SIZES:
        c, m = med[("copy", size)], med[("memcpy", size)]
        print(f"| {size} B | {c:.1f} | {med[('copy_ns', size)]:.0f} | {m:.1f} | {c / m:.2f} |")
    print()
    print("| IRQ: THR-empty write -> eventfd readable (200 per run) | us |")
    print("|---|---|")
    for key, name in (("irq50", "median"), ("irq90", "p90"), ("irq99", "p99")):
        print(f"| {name} | {med[key] / 1000:.1f} |")
    if fuzz_out is not None:
        print()
        print(f"fuzz: {args.fuzz_calls} calls from 2 processes as nobody on sealed and unsealed endpoints "
              f"in {fuzz_s:.1f} s; kernel log lines matching BUG/WARNING/Oops/Call Trace: "
              f"{fuzz_out.strip().splitlines()[-1]}")


if __name__ == "__main__":
    main()
