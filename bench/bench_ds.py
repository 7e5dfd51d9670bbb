#!/usr/bin/env python3
"""Data store benchmark: publish -> subscriber-notified latency and durable
publish throughput, with Redis (unix socket, appendfsync always) measured in
the same run as the reference.

    .venv/bin/python bench/bench_ds.py [--samples 2000] [--rounds 5]

Prints a table; --record appends it to bench/RESULTS.md with this command.
"""

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from libdrv.dsclient import DSClient  # noqa: E402

STATE_BASE = "/var/tmp"  # a real disk (not tmpfs), so fsync costs what it costs


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100.0 * (len(xs) - 1))))]


def run_latency(subscriber, publish, n):
    """Subscriber in its own process (no GIL sharing), publisher here."""
    import multiprocessing
    ctx = multiprocessing.get_context("fork")
    ready_r, ready_w = ctx.Pipe(False)
    res_r, res_w = ctx.Pipe(False)
    proc = ctx.Process(target=subscriber, args=(ready_w, res_w))
    proc.start()
    ready_r.recv()
    for _ in range(n):
        publish()
        time.sleep(0.0002)
    out = res_r.recv()
    proc.join(10)
    return [x / 1e6 for x in out]


# -- our data store -----------------------------------------------------------

class OurDS:
    name = "rsd datastore"
    extra = []

    def __init__(self, base):
        self.base = base
        self.sock = os.path.join(base, "run", "ds.sock")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "datastore.server", "--runtime-dir", os.path.join(base, "run"),
             "--state-dir", os.path.join(base, "state")] + self.extra,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not os.path.exists(self.sock):
            if time.monotonic() > deadline:
                raise RuntimeError("datastore did not start")
            time.sleep(0.02)
        os.sched_setaffinity(self.proc.pid, {0})  # one core for the daemon

    def latency(self, n):
        def subscriber(ready, results):
            sub = DSClient(self.sock)
            sub.subscribe(r"lat\..*")
            ready.send(1)
            out = []
            while len(out) < n:
                for note in sub.get_notifications(5):
                    out.append(time.perf_counter_ns() - int(note.value))
            results.send(out)

        pub = DSClient(self.sock)
        return run_latency(subscriber, lambda: pub.publish("lat.k", str(time.perf_counter_ns()), overwrite=True), n)

    def throughput(self, seconds, batch):
        c = DSClient(self.sock)
        n, i = 0, 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            c.publish_many([("tp.%d" % ((i + j) % 10000), i + j) for j in range(batch)], overwrite=True)
            i += batch
            n += batch
        elapsed = time.perf_counter() - t0
        syncs = c.stats()["syncs"]
        c.close()
        return n / elapsed, syncs

    def close(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(10)


# -- Redis reference ------------------------------------------------------------

class OurDSNoSync(OurDS):
    name = "rsd datastore --no-fsync (not durable)"
    extra = ["--no-fsync"]


class RedisRef:
    name = "redis (appendfsync always)"
    fsync = "always"

    def __init__(self, base):
        import redis
        self.sock = os.path.join(base, "redis.sock")
        exe = shutil.which("redis-server")
        if not exe:
            raise RuntimeError("redis-server not installed (apt-get install redis-server)")
        self.proc = subprocess.Popen(
            [exe, "--port", "0", "--unixsocket", self.sock, "--dir", base, "--appendonly", "yes",
             "--appendfsync", self.fsync, "--save", ""], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not os.path.exists(self.sock):
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.02)
        os.sched_setaffinity(self.proc.pid, {0})
        self.redis = redis

    def latency(self, n):
        def subscriber(ready, results):
            ps = self.redis.Redis(unix_socket_path=self.sock).pubsub()
            ps.subscribe("lat")
            ps.get_message(timeout=1)
            ready.send(1)
            out = []
            while len(out) < n:
                m = ps.get_message(timeout=5)
                if m is not None and m["type"] == "message":
                    out.append(time.perf_counter_ns() - int(m["data"]))
            results.send(out)

        pub = self.redis.Redis(unix_socket_path=self.sock)

        def publish():
            # SET (durable) then PUBLISH: the closest Redis analogue of a DS publish.
            ts = str(time.perf_counter_ns())
            pub.set("lat.k", ts)
            pub.publish("lat", ts)

        return run_latency(subscriber, publish, n)

    def throughput(self, seconds, batch):
        r = self.redis.Redis(unix_socket_path=self.sock)
        n, i = 0, 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            p = r.pipeline(transaction=False)
            for j in range(batch):
                p.set("tp.%d" % ((i + j) % 10000), i + j)
            p.execute()
            i += batch
            n += batch
        return n / (time.perf_counter() - t0), None

    def close(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(10)


class RedisNoSync(RedisRef):
    name = "redis (appendfsync no, not durable)"
    fsync = "no"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    a = ap.parse_args()
    os.sched_setaffinity(0, {1})  # clients on the other core
    results = {}
    for cls in (OurDS, RedisRef, OurDSNoSync, RedisNoSync):
        lat, ops, seq_ops = [], [], []
        for _ in range(a.rounds):
            base = tempfile.mkdtemp(prefix="rsd-bench-ds-", dir=STATE_BASE)
            try:
                target = cls(base)
                try:
                    samples = target.latency(a.samples)
                    lat.append((statistics.median(samples), pct(samples, 99)))
                    ops.append(target.throughput(a.seconds, a.batch)[0])
                    seq_ops.append(target.throughput(a.seconds / 2, 1)[0])
                finally:
                    target.close()
            finally:
                shutil.rmtree(base, ignore_errors=True)
        results[cls.name] = (statistics.median(x[0] for x in lat), statistics.median(x[1] for x in lat),
                             statistics.median(ops), statistics.median(seq_ops))
    head = ("| system | publish->notified p50 | p99 | durable ops/s (pipelined x%d) | durable ops/s (one at a time) |"
            % a.batch)
    lines = [head, "|---|---|---|---|---|"]
    for name, (p50, p99, tp, seq) in results.items():
        lines.append("| %s | %.3f ms | %.3f ms | %.0f | %.0f |" % (name, p50, p99, tp, seq))
    ours, ref = results["rsd datastore"], results["redis (appendfsync always)"]
    lines.append("")
    lines.append("Ratios (rsd / redis): p50 latency %.2fx, pipelined ops/s %.2fx, one-at-a-time ops/s %.2fx. "
                 "Medians of %d rounds; %d latency samples per round; daemon pinned to CPU 0, clients to CPU 1; "
                 "state on %s (ext4, fsync)." % (ours[0] / ref[0], ours[2] / ref[2], ours[3] / ref[3],
                                                 a.rounds, a.samples, STATE_BASE))
    table = "\n".join(lines)
    print(table)
    if a.record:
        cmd = "python bench/bench_ds.py " + " ".join(sys.argv[1:])
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md"), "a") as f:
            f.write("\n## Data store: latency and durable throughput (%s)\n\nCommand: `%s`\n\n%s\n"
                    % (time.strftime("%Y-%m-%d"), cmd.replace(" --record", ""), table))


if __name__ == "__main__":
    main()
