"""Ethernet benchmark: the user-mode e1000 driver + TAP front end vs the
kernel's e1000 driver, on the same emulated 82540EM in the same guest.

    sudo .venv/bin/python bench/bench_net.py [--runs 3] [--seconds 10] [--crashes 30]
        [--table-seconds 25] [--record]

One guest boots with the e1000 on a TAP in a private host namespace
(testbed/hostnet.py; user-mode networking would halve the throughput).  The
paths run one after the other: first the kernel's (modprobe e1000, the
guest's eth0 is the device's), then rsd's (the kernel driver unbound and
unloaded, rsd binds the device to vfio-pci; the guest's eth0 is the front
end's TAP).  Both get GUEST_NET_IP, both with their default offloads.

Figures, each the median of --runs runs:
  TCP host->guest and guest->host   iperf3 (Debian's) -t --seconds, Mbit/s
  UDP 64-byte packets host->guest   iperf3 -u -l 64 at 200 Mbit/s offered, packets/s received
  ping round trip                   host -> guest, 100 pings 20 ms apart, mean
Recovery (rsd only): a paced TCP stream host->guest (4 MB/s in 4 KiB
writes); bench/crash_loop.py in the guest asks rsd's control socket for
`fi eth0 --crash` --crashes times and notes the wall clock of each; the
receiving end lists every stall of the stream longer than 10 ms; recovery
is the end of the stall that spans a crash minus the crash's time: crash ->
TCP traffic flowing again, as the application sees it.
The seed's table: iperf3 TCP host->guest for --table-seconds with a crash
every 1 s, 4 s, 25 s and never, as loss against never.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

TRANSFER = os.path.join(REPO, "tests", "guest", "net_transfer.py")
PYTHON = os.path.join(REPO, ".venv", "bin", "python")
E1000_DEV = "/sys/bus/pci/devices/0000:00:02.0"


# ======================================================================== host side
def median(xs):
    return statistics.median(xs) if xs else float("nan")


class Bench:
    def __init__(self, tb, args):
        from testbed.hostnet import GUEST_NET_IP, HOST_IP
        self.tb, self.args = tb, args
        self.host, self.guest_ip, self.host_ip = tb.host_net, GUEST_NET_IP, HOST_IP

    def sh(self, line, timeout=120, env=None):
        r = self.tb.run(["sh", "-c", line], timeout=timeout, env=env)
        if r.rc != 0:
            raise RuntimeError("guest: %s: rc %d\n%s%s" % (line, r.rc, r.stdout, r.stderr))
        return r.stdout

    def iperf(self, *extra, seconds=None):
        seconds = seconds or self.args.seconds
        for attempt in range(3):
            r = self.host.run(["iperf3", "-c", self.guest_ip, "-t", str(seconds), "-J", *extra],
                              timeout=seconds + 60)
            try:
                result = json.loads(r.stdout)
            except ValueError:
                result = {"error": r.stdout[-2000:] + r.stderr}
            if r.returncode == 0 and "error" not in result:
                return result["end"]
            time.sleep(2)   # the server still finishing the last test ("busy") is the usual cause
        raise RuntimeError("iperf3 %s: %s" % (" ".join(extra), result.get("error")))

    def measure(self):
        out = {"tcp_h2g": [], "tcp_g2h": [], "udp64_pps": [], "ping_ms": []}
        self.sh("pkill iperf3; iperf3 -s -D")
        time.sleep(1.0)
        for _ in range(self.args.runs):
            out["tcp_h2g"].append(self.iperf()["sum_received"]["bits_per_second"] / 1e6)
            out["tcp_g2h"].append(self.iperf("-R")["sum_received"]["bits_per_second"] / 1e6)
            udp = self.iperf("-u", "-l", "64", "-b", "200M")["sum"]
            out["udp64_pps"].append((udp["packets"] - udp["lost_packets"]) / udp["seconds"])
            r = self.host.run(["ping", "-q", "-c", "100", "-i", "0.02", self.guest_ip], timeout=60)
            out["ping_ms"].append(float(r.stdout.rsplit("=", 1)[1].split("/")[1]))
        self.sh("pkill iperf3; true")
        return out

    def kernel_path(self):
        from testbed.hostnet import PREFIX
        self.sh("modprobe e1000 && for i in $(seq 50); do [ -e /sys/class/net/eth0 ] && break; sleep 0.1; done; "
                "ip addr add %s/%d dev eth0 && ip link set eth0 up" % (self.guest_ip, PREFIX))
        self.sh("for i in $(seq 100); do ping -c1 -W1 %s >/dev/null && exit 0; sleep 0.2; done; exit 1"
                % self.host_ip)
        figures = self.measure()
        self.sh("ip link set eth0 down; echo 0000:00:02.0 > %s/driver/unbind; rmmod e1000" % E1000_DEV)
        return figures

    def recovery(self, stack):
        from testbed.netstack import RUNTIME
        n = self.args.crashes
        seconds = n * 1.0 + 8
        rate = 4 << 20
        proc = self.host.popen([PYTHON, TRANSFER, "serve-send", "5301", str(int(seconds * rate)), "3",
                                str(rate)], stdout=subprocess.PIPE, text=True)
        assert "listening" in proc.stdout.readline()
        stack.sh("setsid %s %s recv %s 5301 > /tmp/rec.json 2>&1 < /dev/null &" % (PYTHON, TRANSFER, self.host_ip))
        time.sleep(3)
        crashes = json.loads(self.sh("cd %s && %s bench/crash_loop.py %s/rsd.sock eth0 %d 1.0"
                                     % (REPO, PYTHON, RUNTIME, n), timeout=n * 30 + 60,
                                     env=stack.env).splitlines()[-1])["crashes"]
        proc.communicate(timeout=seconds + 120)
        deadline = time.monotonic() + 120
        while True:
            text = stack.sh("cat /tmp/rec.json").stdout
            if '"sha256"' in text:
                rec = json.loads(text.splitlines()[-1])
                break
            if time.monotonic() > deadline:
                raise RuntimeError("no result from the receiver: %s" % text)
            time.sleep(1)
        from tests.guest.net_transfer import stream  # noqa: E402 (the same generator)
        import hashlib
        intact = rec["sha256"] == hashlib.sha256(stream(rec["bytes"], 3)).hexdigest()
        recoveries = []
        for t in crashes:
            spans = [start + dur - t for start, dur in rec["gaps"] if start <= t + 0.05 and start + dur > t]
            # A crash the stream did not notice (no stall over 10 ms) recovered within 10 ms.
            recoveries.append(max(spans) if spans else 0.010)
        return {"recovery_ms": [r * 1000 for r in recoveries], "intact": intact,
                "bytes": rec["bytes"]}

    def crash_table(self, stack):
        from testbed.netstack import RUNTIME
        secs = self.args.table_seconds
        out = {}
        self.sh("pkill iperf3; iperf3 -s -D")
        time.sleep(1.0)
        for interval in (None, 25, 4, 1):
            crashing = bool(interval)
            if crashing:
                count = int(secs // interval) if interval < secs else 1
                first = min(interval, secs / 2)
                line = ("sleep %s; cd %s && %s bench/crash_loop.py %s/rsd.sock eth0 %d %s"
                        % (first, REPO, PYTHON, RUNTIME, count, interval))
                # In the background: the agent runs one request at a time.
                stack.sh("setsid sh -c '%s' > /tmp/crash.json 2>&1 < /dev/null &" % line)
            bps = self.iperf(seconds=secs)["sum_received"]["bits_per_second"] / 1e6
            out["never" if interval is None else "%ds" % interval] = bps
            if crashing:
                stack.wait_for("grep -q crashes /tmp/crash.json", "the crash injector to finish", 120)
        self.sh("pkill iperf3; true")
        return out


def table(kernel, ours, rec, crash_table):
    rows = []
    for key, name, unit in (("tcp_h2g", "TCP host->guest", "Mbit/s"), ("tcp_g2h", "TCP guest->host", "Mbit/s"),
                            ("udp64_pps", "UDP 64 B host->guest", "packets/s"),
                            ("ping_ms", "ping host->guest", "ms")):
        k, o = median(kernel[key]), median(ours[key])
        rows.append("| %s (%s) | %.1f | %.1f | %.2f |" % (name, unit, k, o, o / k if k else float("nan")))
    out = ["| median of runs | kernel e1000 | rsd e1000 + front end | ratio |", "|---|---|---|---|"] + rows
    r = rec["recovery_ms"]
    out += ["", "| recovery, crash -> TCP flowing again (ms, %d crashes) | mean | median | stdev | min | max |"
            % len(r), "|---|---|---|---|---|---|",
            "| paced stream host->guest, stalls seen by the receiver | %.1f | %.1f | %.1f | %.1f | %.1f |"
            % (statistics.mean(r), statistics.median(r), statistics.pstdev(r), min(r), max(r)),
            "", "stream content intact: %s (%d bytes)" % (rec["intact"], rec["bytes"])]
    never = crash_table["never"]
    out += ["", "| crash every | TCP host->guest (Mbit/s) | loss vs never |", "|---|---|---|"]
    for key in ("never", "25s", "4s", "1s"):
        out.append("| %s | %.1f | %.1f %% |" % (key, crash_table[key], 100 * (1 - crash_table[key] / never)))
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--crashes", type=int, default=30)
    ap.add_argument("--table-seconds", type=int, default=25)
    ap.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    args = ap.parse_args()
    from testbed import Testbed
    from testbed.netstack import NetStack
    with Testbed(host_net=True) as tb:
        bench = Bench(tb, args)
        kernel = bench.kernel_path()
        stack = NetStack(tb).start()
        try:
            ours = bench.measure()
            rec = bench.recovery(stack)
            crashes = bench.crash_table(stack)
        finally:
            print(stack.logs()[-3000:], file=sys.stderr)
            stack.stop()
    text = table(kernel, ours, rec, crashes)
    print(text)
    print(json.dumps({"kernel": kernel, "ours": ours, "recovery": rec, "crash_table": crashes}))
    if args.record:
        cmd = "sudo .venv/bin/python bench/bench_net.py " + " ".join(sys.argv[1:])
        with open(os.path.join(REPO, "bench", "RESULTS.md"), "a") as f:
            f.write("\n### Ethernet (%s)\n\n    %s\n\n%s\n" % (time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                                          cmd, text))


if __name__ == "__main__":
    main()
