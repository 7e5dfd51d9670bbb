"""Console benchmark: scrolling throughput and keystroke-to-echo latency of our
VGA and i8042 drivers + console front end against the kernel's (vgacon, atkbd)
on the same VGA and keyboard, and the display driver's recovery.

    .venv/bin/python bench/bench_console.py [--runs 3] [--lines 2000] [--crashes 20] [--keys 40] [--markdown]

One guest. First the kernel's path: vgacon draws VT 1 (the testbed's idle VGA
console) and a program writes the text to /dev/tty1; vgacon draws as it is
written, so the write's time is the drawing's. Then the rsd stack (vga0 and
console0, testbed/consolestack.py) takes the screen and the same program
writes the same text to /run/.../tty/console0; the time runs until the last
line is in the VGA text buffer (the driver's `read` gives the buffer back).
The text: `--lines` lines of 79 characters, then a marker line.

Keystroke-to-echo latency (timed from the host, the same way for both): QMP
sendkey presses a letter; the time runs until the tty's echo of it is in row 0
of the VGA text buffer (read by QEMU's monitor, polled).  A reader holds the
tty open (cat), the screen is cleared first.  The kernel's path needs its own
i8042 driver, which the testbed's kernel command line turns off
(i8042.nokbd): it is measured in a second guest booted with it on.

Recovery (`guest-recover`, timed in the guest): inject a crash into vga0
through rsd's control socket, write a marker line to the console at once, and
poll the text buffer (through the driver's socket: the next incarnation
answers it) until the marker is on the screen: crash -> the screen showing
what was written while no driver ran.
"""

import argparse
import json
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def text(lines, nonce):
    body = b"".join(b"%06d %s\n" % (i, (b"scroll-%d " % (i % 97)) * 6)[:79] for i in range(lines))
    return body + b"END-" + nonce.encode() + b"\n"


# ======================================================================= guest side
def screen_has(sock_path, needle):
    from libdrv.drvlink import DriverLink
    try:
        link = DriverLink(sock_path)
        try:
            cells = link.call("read")["cells"]
        finally:
            link.close()
    except (OSError, ConnectionError):
        return False
    return needle in bytes(cells[0::2])


def guest_write(path, lines, nonce, sock_path):
    data = text(lines, nonce)
    needle = b"END-" + nonce.encode()
    t0 = time.monotonic()
    fd = os.open(path, os.O_WRONLY | os.O_NOCTTY)
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
    os.close(fd)
    if sock_path:
        deadline = t0 + 600
        while not screen_has(sock_path, needle):
            if time.monotonic() > deadline:
                raise SystemExit("the last line never reached the screen")
            time.sleep(0.002)
    print(json.dumps({"seconds": time.monotonic() - t0, "bytes": len(data)}))


def guest_recover(tty, sock_path, crashes, gap):
    from rsd.control import request
    fd = os.open(tty, os.O_WRONLY | os.O_NOCTTY)
    samples = []
    for i in range(crashes):
        time.sleep(gap)
        needle = b"RECOVERED-%03d-%d" % (i, os.getpid())
        t0 = time.monotonic()
        reply = request({"op": "fi", "label": "vga0", "kind": "crash"}, timeout=10)
        if not reply.get("ok"):
            raise SystemExit("rsd refused the fault injection: %s" % reply)
        os.write(fd, needle + b"\n")
        deadline = t0 + 30
        while not screen_has(sock_path, needle):
            if time.monotonic() > deadline:
                raise SystemExit("crash %d: the marker never reached the screen" % i)
            time.sleep(0.002)
        samples.append(time.monotonic() - t0)
    print(json.dumps({"samples": samples}))


# ======================================================================= host side
ECHO_KEYS = "abcdefghijklmnopqrstuvwxyz"


def row0_length(tb):
    """How many cells of the screen's first row are not blank, read by QEMU's monitor."""
    text = tb.qmp.hmp("xp /80hx 0xb8000")
    cells = [int(w, 16) & 0xFF for line in text.splitlines() for w in line.partition(":")[2].split()]
    return len(bytes(cells).decode("latin-1").rstrip(" \0"))


def echo_latency(tb, keys, clear):
    """Seconds from each sendkey to its echo on the screen; `clear` empties row 0
    (and puts the cursor there) every 40 keys."""
    samples = []
    for i in range(keys):
        if i % 40 == 0:
            clear()
            deadline = time.monotonic() + 30
            while row0_length(tb) != 0:
                if time.monotonic() > deadline:
                    raise SystemExit("the screen was not cleared")
                time.sleep(0.05)
        before = row0_length(tb)
        t0 = time.monotonic()
        tb.qmp.sendkey([ECHO_KEYS[i % len(ECHO_KEYS)]], hold_time_ms=20)
        while row0_length(tb) <= before:
            if time.monotonic() - t0 > 10:
                raise SystemExit("key %d was never echoed" % i)
        samples.append(time.monotonic() - t0)
        time.sleep(0.1)
    return samples


def kernel_echo_latency(keys):
    """The kernel's keyboard -> tty -> vgacon path, in a guest whose i8042 driver runs."""
    from testbed import Testbed
    with Testbed(disk_size_mb=16, kernel_args=["i8042.nokbd=0", "i8042.noaux=0"]) as tb:
        tb.run(["sh", "-c", "setsid sh -c 'cat > /dev/null' < /dev/tty1 > /dev/null 2>&1 &"]).check()
        clear = lambda: tb.run(["sh", "-c", "printf '\\033[H\\033[2J' > /dev/tty1"]).check()
        return echo_latency(tb, keys, clear)


def run_bench(a):
    from testbed import Testbed
    from testbed.consolestack import ConsoleStack
    from testbed.stack import RUNTIME, build_rsdrv
    import tempfile
    me = os.path.abspath(__file__)
    out = {"lines": a.lines, "kernel": [], "ours": [], "recovery": [], "echo_kernel": [], "echo_ours": []}
    if a.keys:
        out["echo_kernel"] = kernel_echo_latency(a.keys)
    with tempfile.TemporaryDirectory() as tmp, Testbed(disk_size_mb=16) as tb:
        ko = build_rsdrv(tmp)
        for i in range(a.runs):
            r = tb.run(["python", me, "guest-write", "/dev/tty1", str(a.lines), "k%d" % i], timeout=900)
            r.check()
            out["kernel"].append(json.loads(r.stdout.splitlines()[-1]))
        stack = ConsoleStack(tb, ko).start()
        try:
            sock = RUNTIME + "/svc/vga0.sock"
            for i in range(a.runs):
                r = stack.sh("python %s guest-write %s %d o%d %s" % (me, stack.tty, a.lines, i, sock), timeout=900)
                r.check()
                out["ours"].append(json.loads(r.stdout.splitlines()[-1]))
            if a.keys:
                stack.sh("setsid sh -c 'cat > /dev/null' < %s > /dev/null 2>&1 &" % stack.tty).check()
                clear = lambda: stack.sh("printf '\\033[H\\033[2J' > %s" % stack.tty).check()
                out["echo_ours"] = echo_latency(tb, a.keys, clear)
            r = stack.sh("python %s guest-recover %s %s %d %s" % (me, stack.tty, sock, a.crashes, a.gap),
                         timeout=60 + a.crashes * 30)
            r.check()
            out["recovery"] = json.loads(r.stdout.splitlines()[-1])["samples"]
        finally:
            stack.stop()
    return out


def report(out, markdown):
    def rate(runs):
        return statistics.median(r["bytes"] / r["seconds"] for r in runs) / 1024
    k, o = rate(out["kernel"]), rate(out["ours"])
    rec = [s * 1000 for s in out["recovery"]]
    rows = [("scrolling, vgacon (KiB/s, median)", "%.1f" % k),
            ("scrolling, vga0 + console0 (KiB/s, median)", "%.1f" % o),
            ("ours / kernel", "%.0f %%" % (100 * o / k)),
            ("recovery crash -> marker on screen, mean (ms)", "%.0f" % statistics.mean(rec)),
            ("recovery median / max (ms)", "%.0f / %.0f" % (statistics.median(rec), max(rec))),
            ("crashes", "%d" % len(rec))]
    if out["echo_kernel"] and out["echo_ours"]:
        ek = statistics.median(out["echo_kernel"]) * 1000
        eo = statistics.median(out["echo_ours"]) * 1000
        rows += [("keystroke -> echo on screen, kernel (ms, median)", "%.1f" % ek),
                 ("keystroke -> echo on screen, kbd0 + console0 + vga0 (ms, median)", "%.1f" % eo),
                 ("ours / kernel (latency)", "%.1fx" % (eo / ek)),
                 ("keys", "%d each" % len(out["echo_ours"]))]
    if markdown:
        print("| %d lines of 79 characters | |\n|---|---|" % out["lines"])
        for name, v in rows:
            print("| %s | %s |" % (name, v))
    else:
        for name, v in rows:
            print("%-48s %s" % (name, v))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "guest-write":
        return guest_write(argv[1], int(argv[2]), argv[3], argv[4] if len(argv) > 4 else None)
    if argv and argv[0] == "guest-recover":
        return guest_recover(argv[1], argv[2], int(argv[3]), float(argv[4]))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--lines", type=int, default=2000)
    p.add_argument("--crashes", type=int, default=20)
    p.add_argument("--gap", type=float, default=1.0, help="seconds between crashes")
    p.add_argument("--keys", type=int, default=40, help="keys typed for the echo latency (0: not measured)")
    p.add_argument("--markdown", action="store_true")
    a = p.parse_args(argv)
    if a.runs < 1 or a.lines < 1 or a.crashes < 1:
        p.error("--runs, --lines and --crashes must be at least 1")
    report(run_bench(a), a.markdown)


if __name__ == "__main__":
    sys.exit(main())
