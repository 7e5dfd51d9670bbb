"""Serial benchmark: the user-mode 16550 driver + tty front end vs the
kernel's 8250 driver, on the same emulated UART (COM2) in the same guest.

    .venv/bin/python bench/bench_serial.py [--runs 5] [--sizes 65536,262144]
        [--round-trips 200] [--crashes 20] [--markdown]

One guest boots with 8250.nr_uarts=2 (the later word wins over the testbed's
nr_uarts=1), so the kernel also registers COM2 as /dev/ttyS1. The two paths
run one after the other, never at once: first the kernel's (the rsd stack is
not started yet; the 8250 holds IRQ 3 only while ttyS1 is open), then the rsd
stack (rsdrv takes IRQ 3 once ttyS1 is closed) on its tty link.

Each path is driven by the same guest program (this file, `guest-serve`),
which opens the tty raw at 115200 and obeys one-letter commands the host
sends over the line itself:
  R n     the guest reads n pattern bytes, checks them, answers K (X if wrong)
  T n     the guest writes n pattern bytes
  E k m   the guest echoes k messages of m bytes
  Q       the guest answers q and exits
Throughput is timed on the host: R from sending the command to the K (one
byte back), T from sending the command to the last byte. Latency: the host
sends m bytes and waits for them to come back, k times.

Recovery (the rsd path only; the kernel driver cannot be crashed and
restarted): `guest-recover` runs in the guest and times everything there
(no agent round trip in the figures): it injects `rsctl fi serial0 --crash`
through rsd's control socket, waits for its open tty to be hung up, then
reopens the tty link and writes a probe until the host (which echoes every
byte it gets on COM2) sends that probe back.
"""

import argparse
import json
import shlex
import os
import re
import select
import socket
import statistics
import struct
import sys
import tempfile
import termios
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

KERNEL_TTY = "/dev/ttyS1"
HEADER = struct.Struct(">cII")     # op, n, m


def pattern(n):
    return (bytes(range(256)) * (n // 256 + 1))[:n]


# ======================================================================= guest side
def open_raw(path):
    """Open a tty the way a serial application does: raw, 8N1, 115200, no flow control."""
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
    a = termios.tcgetattr(fd)
    a[0] = 0                                                     # iflag: no IXON, ICRNL, ISTRIP
    a[1] = 0                                                     # oflag: no OPOST
    a[2] = (a[2] & ~(termios.CSIZE | termios.PARENB | termios.CSTOPB | termios.CRTSCTS)) \
        | termios.CS8 | termios.CREAD | termios.CLOCAL
    a[3] = 0                                                     # lflag: no ECHO, ICANON, ISIG
    a[4] = a[5] = termios.B115200
    a[6][termios.VMIN] = 1
    a[6][termios.VTIME] = 0
    termios.tcsetattr(fd, termios.TCSANOW, a)
    return fd


def read_n(fd, n):
    out = bytearray()
    while len(out) < n:
        data = os.read(fd, min(65536, n - len(out)))
        if not data:
            raise EOFError("tty hung up after %d of %d bytes" % (len(out), n))
        out += data
    return bytes(out)


def write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def guest_serve(tty):
    fd = open_raw(tty)
    termios.tcflush(fd, termios.TCIOFLUSH)
    write_all(fd, b"!")
    while True:
        op, n, m = HEADER.unpack(read_n(fd, HEADER.size))
        if op == b"R":
            write_all(fd, b"K" if read_n(fd, n) == pattern(n) else b"X")
        elif op == b"T":
            write_all(fd, pattern(n))
        elif op == b"E":
            for _ in range(n):
                write_all(fd, read_n(fd, m))
        elif op == b"Q":
            write_all(fd, b"q")
            termios.tcdrain(fd)
            return 0
        else:
            print("unknown command %r" % op, file=sys.stderr)
            return 1


def wait_hangup(fd, timeout):
    """Read until the tty is hung up (EOF or EIO); False if it is not within timeout."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        r, _, _ = select.select([fd], [], [], left)
        if not r:
            continue
        try:
            if not os.read(fd, 4096):
                return True
        except OSError:
            return True


def probe_through(fd, probe, timeout):
    """Write probe and wait for the host to echo it: None, or why not (hang-up, timeout)."""
    try:
        write_all(fd, probe)
    except OSError as exc:
        return "write: %s" % exc.strerror
    got = b""
    deadline = time.monotonic() + timeout
    while probe not in got:
        left = deadline - time.monotonic()
        if left <= 0:
            return "no echo within %.1f s" % timeout
        r, _, _ = select.select([fd], [], [], left)
        if not r:
            continue
        try:
            data = os.read(fd, 4096)
        except OSError as exc:
            return "read: %s" % exc.strerror
        if not data:
            return "read: EOF"
        got = got[-16:] + data
    return None


def guest_recover(tty, crashes, label, gap):
    from rsd.control import request
    fd = open_raw(tty)
    why = probe_through(fd, b"<warmup>", 10)
    if why:
        raise SystemExit("no echo from the host through %s before the first crash: %s" % (tty, why))
    samples = []
    for i in range(crashes):
        time.sleep(gap)
        t0 = time.monotonic()
        reply = request({"op": "fi", "label": label, "kind": "crash"}, timeout=10)
        if not reply.get("ok"):
            raise SystemExit("rsd refused the fault injection: %s" % reply)
        t_sent = time.monotonic()
        if not wait_hangup(fd, 10):
            raise SystemExit("crash %d: the open tty was not hung up within 10 s" % i)
        t_hup = time.monotonic()
        os.close(fd)
        t_open, failed = None, []
        for attempt in range(1000):
            try:
                fd = open_raw(tty)
            except OSError as exc:
                failed.append("%.1f ms open: %s" % ((time.monotonic() - t0) * 1e3, exc.strerror))
                time.sleep(0.005)
                continue
            if t_open is None:
                t_open = time.monotonic()
            why = probe_through(fd, b"<%03d.%03d>" % (i, attempt), 2.0)
            if why is None:
                break
            failed.append("%.1f ms %s (probe <%03d.%03d>)" % ((time.monotonic() - t0) * 1e3, why, i, attempt))
            os.close(fd)
        else:
            raise SystemExit("crash %d: no byte got through within 1000 attempts" % i)
        t1 = time.monotonic()
        samples.append({"recovery": t1 - t0, "fi_reply": t_sent - t0, "hangup": t_hup - t0,
                        "reopen": t_open - t0, "attempts": attempt + 1,
                        "failed": failed})
    print(json.dumps(samples))
    return 0


# ======================================================================= host side
def recv_exactly(sock, n, timeout):
    out = bytearray()
    deadline = time.monotonic() + timeout
    while len(out) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError("got %d of %d bytes within %.0f s" % (len(out), n, timeout))
        sock.settimeout(left)
        try:
            data = sock.recv(min(1 << 20, n - len(out)))
        except socket.timeout:
            continue
        if not data:
            raise RuntimeError("COM2 closed after %d bytes" % len(out))
        out += data
    return bytes(out)


def drain(sock, wait=0.3):
    sock.settimeout(wait)
    try:
        while sock.recv(65536):
            pass
    except socket.timeout:
        pass


class GuestServer:
    """The guest-serve program on one tty, and the host end of the line."""

    def __init__(self, tb, tty, env=None, timeout=3600):
        self.tb, self.sock = tb, tb.com2
        drain(self.sock)
        self.result = None
        argv = ["python", os.path.join(REPO, "bench", "bench_serial.py"), "guest-serve", "--tty", tty]
        self.thread = threading.Thread(target=self._run, args=(argv, env, timeout), daemon=True)
        self.thread.start()
        ready = recv_exactly(self.sock, 1, 60)
        if ready != b"!":
            raise RuntimeError("guest-serve on %s said %r instead of ready" % (tty, ready))

    def _run(self, argv, env, timeout):
        self.result = self.tb.run(argv, timeout=timeout, env=env)

    def send_cmd(self, op, n=0, m=0):
        self.sock.sendall(HEADER.pack(op, n, m))

    def to_guest(self, n, timeout=300):
        data = pattern(n)
        t0 = time.perf_counter()
        self.send_cmd(b"R", n)
        self.sock.sendall(data)
        ack = recv_exactly(self.sock, 1, timeout)
        dt = time.perf_counter() - t0
        if ack != b"K":
            raise RuntimeError("the guest received %d bytes that differ from what was sent (%r)" % (n, ack))
        return n / dt

    def from_guest(self, n, timeout=300):
        t0 = time.perf_counter()
        self.send_cmd(b"T", n)
        got = recv_exactly(self.sock, n, timeout)
        dt = time.perf_counter() - t0
        if got != pattern(n):
            raise RuntimeError("the host received %d bytes that differ from what the guest wrote" % n)
        return n / dt

    def round_trips(self, k, m, timeout=60):
        self.send_cmd(b"E", k, m)
        samples = []
        for i in range(k):
            msg = bytes([(i + j) & 0xFF for j in range(m)])
            t0 = time.perf_counter()
            self.sock.sendall(msg)
            back = recv_exactly(self.sock, m, timeout)
            samples.append(time.perf_counter() - t0)
            if back != msg:
                raise RuntimeError("round trip %d came back as %r, sent %r" % (i, back, msg))
        return samples

    def quit(self):
        self.send_cmd(b"Q")
        if recv_exactly(self.sock, 1, 60) != b"q":
            raise RuntimeError("guest-serve did not acknowledge Q")
        self.thread.join(60)
        if self.result is None or self.result.rc != 0:
            raise RuntimeError("guest-serve failed: %s" % (self.result and self.result.stderr))


def measure_path(tb, tty, args, env=None, log=print):
    srv = GuestServer(tb, tty, env)
    out = {"to_guest": {}, "from_guest": {}}
    try:
        srv.round_trips(10, args.msg_size)     # warm up both directions and the guest's code paths
        for n in args.sizes:
            for direction, fn in (("to_guest", srv.to_guest), ("from_guest", srv.from_guest)):
                runs = [fn(n) for _ in range(args.runs)]
                out[direction][n] = runs
                log("  %-10s %7d B: median %8.1f KiB/s  (runs %s)" % (
                    direction, n, statistics.median(runs) / 1024, " ".join("%.0f" % (r / 1024) for r in runs)))
        out["rtt"] = srv.round_trips(args.round_trips, args.msg_size)
        log("  round trip %d B: median %.2f ms p90 %.2f ms" % (
            args.msg_size, statistics.median(out["rtt"]) * 1e3, p90(out["rtt"]) * 1e3))
    finally:
        try:
            srv.quit()
        except Exception as exc:  # report, but keep what was measured
            log("  (guest-serve quit: %s)" % exc)
    return out


def p90(xs):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(0.9 * (len(xs) - 1))))]


class HostEcho:
    """Echo every byte the guest sends on COM2 back to it (for the recovery probes)."""

    def __init__(self, sock):
        self.sock, self.stop = sock, threading.Event()
        self.seen = bytearray()      # everything the guest sent: did a lost probe reach the host?
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self):
        self.sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            if not data:
                return
            self.seen += data
            self.sock.sendall(data)

    def close(self):
        self.stop.set()
        self.thread.join(5)


def check_kernel_sees_com2(stack_sh):
    serial = stack_sh("cat /proc/tty/driver/serial").stdout
    ioports = stack_sh("grep -i serial /proc/ioports; cat /proc/cmdline").stdout
    line = [l for l in serial.splitlines() if l.startswith("1:")]
    if not line or "port:000002F8" not in line[0] or "irq:3" not in line[0] or "unknown" in line[0]:
        raise RuntimeError("the kernel did not register COM2 as ttyS1:\n%s\n%s" % (serial, ioports))
    return line[0], ioports


def irq3_holders(stack):
    """Who has a handler on IRQ 3 (/proc/interrupts keeps the line, nameless, after free_irq)."""
    line = stack.sh("grep -E '^ *3:' /proc/interrupts || true").stdout.strip()
    words = line.split()
    edge = [i for i, w in enumerate(words) if w.endswith("-edge") or w.endswith("-level")]
    return " ".join(words[edge[0] + 1:]) if edge else ""


def kernel_part(tb, stack, args, report, log):
    holders = irq3_holders(stack)
    if holders:
        raise RuntimeError("IRQ 3 is held by %r: the kernel's 8250 could not open %s" % (holders, KERNEL_TTY))
    log("kernel 8250, %s:" % KERNEL_TTY)
    kernel_com2(stack, on=True)  # (after an rsd part: the ports come back to ttyS1)
    report["kernel"] = measure_path(tb, KERNEL_TTY, args, log=log)
    holders = irq3_holders(stack)
    if holders:
        raise RuntimeError("IRQ 3 still held by %r after %s was closed" % (holders, KERNEL_TTY))


# The kernel's 8250 reserves COM2's ports while ttyS1 exists, and rsdrv never grants a
# range someone holds.  TIOCSSERIAL with port 0 and type "unknown" makes the 8250 release
# them (serial_core releases the old region on a port change); the inverse gives them back.
SERIAL_PORT_SCRIPT = """
import fcntl, struct, sys
TIOCGSERIAL, TIOCSSERIAL = 0x541E, 0x541F
FMT = "iiIiiiiiHcc iHHPHIL"
with open(sys.argv[1], "rb", buffering=0) as tty:
    info = list(struct.unpack(FMT, fcntl.ioctl(tty, TIOCGSERIAL, bytes(struct.calcsize(FMT)))))
    info[0], info[2], info[3] = int(sys.argv[2]), int(sys.argv[3], 0), int(sys.argv[4])
    fcntl.ioctl(tty, TIOCSSERIAL, struct.pack(FMT, *info))
"""


def kernel_com2(stack, on):
    """Give COM2's ports to the kernel's ttyS1 (on) or take them away from it."""
    args = "4 0x2f8 3" if on else "0 0 0"  # PORT_16550A at 0x2f8 IRQ 3, or PORT_UNKNOWN nowhere
    r = stack.sh("python -c %s %s %s" % (shlex.quote(SERIAL_PORT_SCRIPT), KERNEL_TTY, args))
    if r.rc != 0:
        raise RuntimeError("TIOCSSERIAL on %s failed: %s" % (KERNEL_TTY, r.stderr))
    held = "2f8-02ff : serial" in stack.sh("cat /proc/ioports").stdout
    if held != on:
        raise RuntimeError("after TIOCSSERIAL the kernel %s COM2's ports:\n%s"
                           % ("does not hold" if on else "still holds", stack.sh("cat /proc/ioports").stdout))


def rsd_part(tb, stack, args, report, log):
    kernel_com2(stack, on=False)
    stack.start()
    log("user-mode 16550 + tty front end, %s (IRQ 3: %s):" % (stack.tty, irq3_holders(stack)))
    if not args.recovery_only:
        report["rsd"] = measure_path(tb, stack.tty, args, env=stack.env, log=log)
        report["rsd_counters"] = stack.driver_status()["counters"]
    if args.crashes:
        log("recovery: %d crashes, timed in the guest" % args.crashes)
        drain(tb.com2)
        echo = HostEcho(tb.com2)
        try:
            r = stack.sh("python %s/bench/bench_serial.py guest-recover --tty %s --crashes %d --gap %s"
                         % (REPO, stack.tty, args.crashes, args.gap), timeout=60 + 15 * args.crashes)
        finally:
            echo.close()
        if r.rc != 0:
            raise RuntimeError("guest-recover failed (rc %d): %s\n%s" % (r.rc, r.stderr, stack.logs()))
        report["recovery"] = json.loads(r.stdout.strip().splitlines()[-1])
        for sample in report["recovery"]:
            for k, f in enumerate(sample["failed"]):
                if "(probe " in f:
                    probe = f.split("(probe ")[1].rstrip(")").encode()
                    sample["failed"][k] += " reached the host: %s" % ("yes" if probe in echo.seen else "no")
        report["restarts_total"] = stack.status("serial0")["restarts_total"]
        report["frontend"] = stack.frontend_status()
    stack.stop()
    # rsd's shutdown ends the driver, whose endpoint release frees IRQ 3
    deadline = time.monotonic() + 10
    while irq3_holders(stack):
        if time.monotonic() > deadline:
            raise RuntimeError("IRQ 3 still held by %r after the rsd stack stopped" % irq3_holders(stack))
        time.sleep(0.3)


def run(args, log=print):
    from testbed import Testbed
    from testbed.stack import SerialStack, build_rsdrv
    report = {"args": {k: v for k, v in vars(args).items() if k != "func"}}
    with tempfile.TemporaryDirectory(prefix="bench-serial-") as work:
        ko = build_rsdrv(work)
        t0 = time.monotonic()
        with Testbed(kernel_args=["8250.nr_uarts=2"]) as tb:
            stack = SerialStack(tb, ko, period=1, backoff=False)
            # The testbed's /init takes COM2 away from the kernel (it is the user-mode
            # driver's); here the kernel's 8250 gets it back for its half of the run.
            kernel_com2(stack, on=True)
            ttys1, ioports = check_kernel_sees_com2(stack.sh)
            report["kernel_ttyS1"], report["ioports"] = ttys1, ioports
            log("guest up; kernel: %s\n%s" % (ttys1, ioports.strip()))
            parts = [kernel_part, rsd_part] if args.order == "kernel-first" else [rsd_part, kernel_part]
            if args.recovery_only:
                parts = [rsd_part]
            for part in parts:
                part(tb, stack, args, report, log)
        report["wall_s"] = time.monotonic() - t0
    return report


def table(report, args):
    if args.recovery_only:
        return recovery_table(report)
    return throughput_table(report, args) + "\n\n" + recovery_table(report)


def throughput_table(report, args):
    k, u = report["kernel"], report["rsd"]
    rows = ["| what | size | kernel 8250 | user-mode 16550 | user / kernel |", "|---|---|---|---|---|"]
    for direction, name in (("to_guest", "throughput host -> guest app"),
                            ("from_guest", "throughput guest app -> host")):
        for n in args.sizes:
            km, um = statistics.median(k[direction][n]), statistics.median(u[direction][n])
            rows.append("| %s (median of %d, KiB/s) | %d KiB | %.1f | %.1f | %.3f |"
                        % (name, args.runs, n // 1024, km / 1024, um / 1024, um / km))
    for name, f in (("median", statistics.median), ("p90", p90)):
        km, um = f(k["rtt"]), f(u["rtt"])
        rows.append("| round trip, %d B message, %s of %d (ms) | %d B | %.2f | %.2f | %.2f |"
                    % (args.msg_size, name, args.round_trips, args.msg_size, km * 1e3, um * 1e3, um / km))
    return "\n".join(rows)


def recovery_table(report):
    out = ""
    if "recovery" in report:
        rec = report["recovery"]
        out += "| recovery (ms, %d crashes, timed in the guest) | mean | median | stdev | min | max |\n" \
            "|---|---|---|---|---|---|" % len(rec)
        for key, name in (("recovery", "crash command -> probe byte echoed by the host"),
                          ("hangup", "crash command -> open tty hung up (EIO/EOF)"),
                          ("reopen", "crash command -> tty link reopened")):
            xs = [s[key] * 1e3 for s in rec]
            out += "\n| %s | %.1f | %.1f | %.1f | %.1f | %.1f |" % (
                name, statistics.mean(xs), statistics.median(xs), statistics.stdev(xs) if len(xs) > 1 else 0,
                min(xs), max(xs))
        out += "\n\nprobe attempts per recovery: %s; rsd restarts_total %s; front end %s" % (
            sorted(s["attempts"] for s in rec), report.get("restarts_total"),
            {x: report["frontend"].get(x) for x in ("hangups", "recoveries", "tx_lost")})
        reasons = {}
        for sample in rec:
            for f in sample["failed"]:
                why = re.sub(r" \(probe <[0-9.]+>\)", "", f.split(" ms ", 1)[1])
                reasons[why] = reasons.get(why, 0) + 1
        if reasons:
            out += "\nfailed probe attempts after the reopen, by reason: %s; first one each crash at ms: %s" % (
                reasons, [s["failed"][0].split(" ms ")[0] for s in rec if s["failed"]])
    return out


def positive_int(text):
    v = int(text)
    if v <= 0:
        raise argparse.ArgumentTypeError("must be > 0, got %s" % text)
    return v


def main(argv=None):
    ap = argparse.ArgumentParser(prog="bench_serial.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd")
    g = sub.add_parser("guest-serve", help="(runs in the guest) serve the host's commands on a tty")
    g.add_argument("--tty", required=True)
    g = sub.add_parser("guest-recover", help="(runs in the guest) crash serial0 N times, time recovery")
    g.add_argument("--tty", required=True)
    g.add_argument("--crashes", type=positive_int, default=20)
    g.add_argument("--label", default="serial0")
    g.add_argument("--gap", type=float, default=0.3)
    ap.add_argument("--runs", type=positive_int, default=5, help="runs per size and direction (medians)")
    ap.add_argument("--sizes", default="65536,262144", help="bytes per throughput run, comma separated")
    ap.add_argument("--round-trips", type=positive_int, default=200)
    ap.add_argument("--msg-size", type=positive_int, default=16)
    ap.add_argument("--crashes", type=int, default=20, help="0 skips the recovery part")
    ap.add_argument("--gap", type=float, default=0.3, help="seconds between a recovery and the next crash")
    ap.add_argument("--order", choices=("kernel-first", "rsd-first"), default="kernel-first",
                    help="which path runs first in the guest (never both at once)")
    ap.add_argument("--recovery-only", action="store_true", help="only the crash/recovery part (diagnosis)")
    ap.add_argument("--json", help="also write the raw samples here")
    a = ap.parse_args(argv)
    if a.cmd == "guest-serve":
        return guest_serve(a.tty)
    if a.cmd == "guest-recover":
        return guest_recover(a.tty, a.crashes, a.label, a.gap)
    try:
        a.sizes = [positive_int(s) for s in a.sizes.split(",")]
    except (ValueError, argparse.ArgumentTypeError) as exc:
        ap.error("--sizes: comma-separated byte counts > 0 (%s)" % exc)
    if a.crashes < 0:
        ap.error("--crashes must be >= 0")
    report = run(a, log=lambda s: print(s, flush=True))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    print("\nserial: %d runs per size, %d round trips, %d crashes, %s; bench wall time %.0f s\n"
          % (a.runs, a.round_trips, a.crashes, a.order, report["wall_s"]))
    print(table(report, a))
    return 0


if __name__ == "__main__":
    sys.exit(main())
