"""Testbed costs, for budgeting VM tests: boot-to-ready, one agent round trip, one Python
start and one pytest process in the guest, each next to the same thing on the host.

    .venv/bin/python bench/bench_testbed.py [--boots 3] [--round-trips 50]

Prints a table of medians (and p90) over all boots; the ratio column is guest / host.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from testbed import Testbed, guest_python  # noqa: E402

TRIVIAL_TESTS = b"""
def test_one():
    assert 1 + 1 == 2

def test_two():
    assert "a" * 2 == "aa"

def test_three():
    assert sorted([3, 1, 2]) == [1, 2, 3]
"""
PYTEST_ENV = {"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}


def timed(fn, n):
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return samples


def host_samples(round_trips, starts):
    python = guest_python()
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "test_trivial.py"), "wb") as f:
            f.write(TRIVIAL_TESTS)
        env = dict(os.environ, **PYTEST_ENV)
        return {
            "command round trip (`true`)": timed(
                lambda: subprocess.run(["true"], check=True), round_trips),
            "python -c pass": timed(
                lambda: subprocess.run([python, "-c", "pass"], check=True), starts),
            "pytest process, 3 trivial tests": timed(lambda: subprocess.run(
                [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_trivial.py"],
                cwd=d, env=env, check=True, capture_output=True), starts),
        }


def guest_samples(boots, round_trips, starts, root_cache):
    samples = {}

    def add(name, values):
        samples.setdefault(name, []).extend(values)

    for _ in range(boots):
        with Testbed(disk_size_mb=8, root_cache=root_cache) as tb:
            add("boot to ready", [tb.boot_seconds])
            add("agent ping (no process)", timed(tb.ping, round_trips))
            add("command round trip (`true`)", timed(lambda: tb.run(["true"]).check(), round_trips))
            add("python -c pass", timed(lambda: tb.run(["python", "-c", "pass"]).check(), starts))
            tb.run(["sh", "-c", "mkdir -p /tmp/bench && cat > /tmp/bench/test_trivial.py"],
                   input=TRIVIAL_TESTS).check()

            def pytest_once():
                result = tb.run_pytest(["-q", "test_trivial.py"], cwd="/tmp/bench", timeout=120)
                assert result.rc == 0 and len(result.tests) == 3, result.report()
            add("pytest process, 3 trivial tests", timed(pytest_once, starts))
    return samples


def p90(values):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--boots", type=int, default=3)
    parser.add_argument("--round-trips", type=int, default=50)
    parser.add_argument("--starts", type=int, default=5, help="python/pytest starts per boot")
    parser.add_argument("--root-cache", default="loose", choices=("loose", "mmap", "none"),
                        help="9p cache mode of the guest's root")
    args = parser.parse_args()
    guest = guest_samples(args.boots, args.round_trips, args.starts, args.root_cache)
    host = host_samples(args.round_trips, args.starts * args.boots)
    print(f"testbed: {args.boots} boots, {args.round_trips} round trips and {args.starts} "
          f"python/pytest starts per boot, root_cache={args.root_cache}; times in ms")
    print(f"| {'what':34} | {'n':>4} | {'guest median':>12} | {'guest p90':>9} | "
          f"{'host median':>11} | {'guest/host':>10} |")
    print(f"|{'-' * 36}|{'-' * 6}|{'-' * 14}|{'-' * 11}|{'-' * 13}|{'-' * 12}|")
    for name, values in guest.items():
        g = statistics.median(values) * 1000
        h = statistics.median(host[name]) * 1000 if name in host else None
        host_text = f"{h:11.2f}" if h is not None else f"{'-':>11}"
        ratio = f"{g / h:9.1f}x" if h else f"{'-':>10}"
        print(f"| {name:34} | {len(values):4} | {g:12.1f} | {p90(values) * 1000:9.1f} | "
              f"{host_text} | {ratio} |")


if __name__ == "__main__":
    main()
