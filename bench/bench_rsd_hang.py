#!/usr/bin/env python3
"""rsd: hang-detection latency vs heartbeat period, rsd's CPU use with 100
services pinged every second, and rsd's own crash -> ready latency.  Prints
three tables (medians of runs).

    sudo .venv/bin/python bench/bench_rsd_hang.py [--runs 3] [--trials 8]
         [--periods 0.05,0.1,0.25,0.5,1] [--services 100] [--window 20]

Hang latency: the probe service (tests/host/services/probe.py) answers
"spin" and then busy-loops in its main loop; latency = rsd's failure record
time (reason no-heartbeat) minus the time the probe's answer arrived.  rsd
pings every period and kills after 2 x period of silence, so the latency
must lie in [period, 2 x period] plus the kill and report time.

CPU: N probe services with period 1 s; rsd's own user+system CPU time
(/proc/PID/stat) over a window, as % of one core and per heartbeat.

Crash -> ready: SIGKILL to the probe, then (a) a client connected right
after the kill is answered by the new incarnation (it waited in the
listening socket's backlog), (b) DS notifies drv.server.<label> = "up g+1".
The side-by-side comparison with systemd, s6, runit and supervisord is
bench/bench_restart.py.
"""

import argparse
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "host", "services"))
from rsdharness import RsdDaemon  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")


class DS:
    """A datastore daemon in its own temp directory (what RsdDaemon needs)."""

    def __init__(self):
        self.base = tempfile.mkdtemp(prefix="rsd-bench-ds-")
        os.chmod(self.base, 0o755)
        self.runtime_dir = os.path.join(self.base, "run")
        os.makedirs(self.runtime_dir, mode=0o755)
        self.socket_path = os.path.join(self.runtime_dir, "ds.sock")
        notify = os.path.join(self.base, "notify.sock")
        ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        ns.bind(notify)
        ns.settimeout(10)
        self.log = open(os.path.join(self.base, "ds.log"), "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "datastore.server", "--runtime-dir", self.runtime_dir,
                                      "--state-dir", os.path.join(self.base, "state")],
                                     env=dict(os.environ, NOTIFY_SOCKET=notify), stdout=self.log, stderr=self.log)
        while b"READY=1" not in ns.recv(4096):
            pass
        ns.close()

    def client(self):
        from libdrv.dsclient import DSClient
        return DSClient(self.socket_path)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()
        shutil.rmtree(self.base, ignore_errors=True)


def cpu_seconds(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def hang_latency(rsd, period, trials):
    """Seconds from hang start to rsd's no-heartbeat kill, one per trial."""
    label = "hang%d" % int(period * 1000)
    st = rsd.up(label=label, period=period, backoff=False)
    out = []
    for _ in range(trials):
        time.sleep(period * (2 + random.random()))  # settle; hang at a random ping phase
        rsd.ask(label, "spin")
        t_hang = time.time()
        st = rsd.wait_generation(label, st["generation"], timeout=10 + 4 * period)
        failure = st["last_failure"]
        assert failure["reason"] == "no-heartbeat", failure
        out.append(failure["time"] - t_hang)
    rsd.request({"op": "down", "label": label})
    return out


def cpu_with_services(rsd, count, window):
    labels = ["svc%03d" % i for i in range(count)]
    for label in labels:
        rsd.up(label=label, period=1.0)
    time.sleep(3)  # past start-up
    pid = rsd.proc.pid
    c0, t0 = cpu_seconds(pid), time.monotonic()
    time.sleep(window)
    c1, t1 = cpu_seconds(pid), time.monotonic()
    alive = [s for s in rsd.request({"op": "status"})["services"] if s["state"] == "up"]
    failures = [s["label"] for s in alive if s["last_failure"]]
    for label in labels:
        rsd.request({"op": "down", "label": label})
    pct = 100.0 * (c1 - c0) / (t1 - t0)
    per_beat_us = 1e6 * (c1 - c0) / ((t1 - t0) * count)
    return pct, per_beat_us, len(alive), failures


def crash_ready(rsd, kills, gap):
    """(ms until served, ms until DS says up) per SIGKILL."""
    st = rsd.up(label="crash", backoff=False)
    c = rsd.ds.client()
    c.subscribe(r"drv\.server\.crash")
    served, announced = [], []
    for _ in range(kills):
        time.sleep(gap)
        c.get_notifications(0)
        pid, gen = st["pid"], st["generation"]
        t0 = time.perf_counter()
        os.kill(pid, signal.SIGKILL)
        info = rsd.ask("crash", "info")
        t1 = time.perf_counter()
        assert info["pid"] != pid
        want = "up %d" % (gen + 1)
        while not any(n.value == want for n in c.get_notifications(5)):
            pass
        t2 = time.perf_counter()
        served.append((t1 - t0) * 1e3)
        announced.append((t2 - t0) * 1e3)
        st = {"pid": info["pid"], "generation": gen + 1}
    c.close()
    rsd.request({"op": "down", "label": "crash"})
    return served, announced


def p90(xs):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(0.9 * (len(xs) - 1))))]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--trials", type=int, default=8, help="hangs per period per run")
    ap.add_argument("--periods", default="0.05,0.1,0.25,0.5,1")
    ap.add_argument("--services", type=int, default=100)
    ap.add_argument("--window", type=float, default=20.0, help="CPU measurement window, seconds")
    ap.add_argument("--kills", type=int, default=30, help="SIGKILLs per run for crash -> ready")
    ap.add_argument("--gap", type=float, default=0.2, help="seconds between kills")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: rsd drops privilege per service itself")
    periods = [float(p) for p in a.periods.split(",")]
    lat = {p: [] for p in periods}
    worst = {p: [] for p in periods}
    cpu = []
    served, announced = [], []
    for run in range(a.runs):
        ds = DS()
        rsd = RsdDaemon(ds, uid_base=620000).start()
        try:
            for p in periods:
                got = hang_latency(rsd, p, a.trials)
                lat[p].append(statistics.median(got))
                worst[p].append(max(got))
            cpu.append(cpu_with_services(rsd, a.services, a.window))
            sv, an = crash_ready(rsd, a.kills, a.gap)
            served.append(sv)
            announced.append(an)
        finally:
            rsd.cleanup()
            ds.stop()
        print("run %d done" % (run + 1), file=sys.stderr)

    print("\nHang detection (busy loop) vs heartbeat period: medians of %d runs x %d hangs" % (a.runs, a.trials))
    print("| period (s) | detection median (ms) | median / period | worst (ms) | worst / (2 x period) | run medians (ms) |")
    print("|---|---|---|---|---|---|")
    for p in periods:
        m = statistics.median(lat[p])
        w = max(worst[p])
        print("| %.2f | %.1f | %.2f | %.1f | %.3f | %s |" % (p, m * 1e3, m / p, w * 1e3, w / (2 * p),
                                                             ", ".join("%.1f" % (x * 1e3) for x in lat[p])))
    print("\nrsd CPU with %d services, heartbeat period 1 s, %.0f s window: medians of %d runs"
          % (a.services, a.window, a.runs))
    print("| services up | rsd CPU (% of one core) | rsd CPU per heartbeat (us) | run values (%) | unexpected failures |")
    print("|---|---|---|---|---|")
    print("| %d | %.2f | %.0f | %s | %d |" % (
        min(c[2] for c in cpu), statistics.median(c[0] for c in cpu), statistics.median(c[1] for c in cpu),
        ", ".join("%.2f" % c[0] for c in cpu), sum(len(c[3]) for c in cpu)))
    print("\nrsd crash (SIGKILL) -> ready, Python SEF service, %d runs x %d kills, %.1f s apart (ms)"
          % (a.runs, a.kills, a.gap))
    print("| ready as seen by | median | p90 | run medians |")
    print("|---|---|---|---|")
    for name, runs in (("a client waiting on the service socket", served),
                       ("a DS subscriber (drv key = up)", announced)):
        print("| %s | %.2f | %.2f | %s |" % (name, statistics.median(statistics.median(r) for r in runs),
                                             statistics.median(p90(r) for r in runs),
                                             ", ".join("%.2f" % statistics.median(r) for r in runs)))


if __name__ == "__main__":
    main()
