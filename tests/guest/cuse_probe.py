"""What tests/vm/test_cuse.py runs in the guest against /dev/ttyRSD1: each command opens the
device as an application would, does what it names, reads the UART back through the driver's
`regs`/`status` requests, and prints one JSON line.

    python tests/guest/cuse_probe.py COMMAND [ARGS...]
"""

import errno
import fcntl
import json
import os
import select
import signal
import struct
import sys
import termios
import threading
import time

from libdrv.drvlink import DriverLink

DEVICE = "/dev/ttyRSD1"
DRIVER = os.environ.get("RSD_RUNTIME_DIR", "/run/rsd") + "/svc/serial0.sock"

TIOCM_DTR, TIOCM_RTS, TIOCM_CTS, TIOCM_CD, TIOCM_RI, TIOCM_DSR, TIOCM_LOOP = (
    0x002, 0x004, 0x020, 0x040, 0x080, 0x100, 0x8000)
TIOCMIWAIT, TIOCGICOUNT, TIOCSBRK, TIOCCBRK, TCSBRK, TCSBRKP = 0x545C, 0x545D, 0x5427, 0x5428, 0x5409, 0x5425
TCGETS2, TCSETS2 = 0x802C542A, 0x402C542B
TIOCEXCL, TIOCNXCL, TIOCOUTQ, FIONREAD, TCFLSH = 0x540C, 0x540D, 0x5411, 0x541B, 0x540B
CMSPAR, BOTHER = 0o10000000000, 0o010000
INT = struct.Struct("i")
TERMIOS2 = struct.Struct("<IIIIB19sII")


def driver(op, **fields):
    d = DriverLink(DRIVER)
    try:
        return d.call(op, **fields)
    finally:
        d.close()


def regs():
    r = driver("regs")["regs"]
    return dict(r, divisor=r["dll"] | r["dlm"] << 8)


def errno_of(fn, *args):
    try:
        fn(*args)
    except OSError as exc:
        return errno.errorcode.get(exc.errno, exc.errno)
    return None


def tiocm(fd, cmd, bits=0):
    return INT.unpack(fcntl.ioctl(fd, cmd, INT.pack(bits)))[0]


def raw(fd, baud, cflag_extra=0, bits=termios.CS8, parity=0, stop=0, iflag=0, when=termios.TCSANOW):
    a = termios.tcgetattr(fd)
    a[0] = iflag
    a[1] = 0
    a[2] = (a[2] & ~(termios.CSIZE | termios.PARENB | termios.PARODD | CMSPAR | termios.CSTOPB | termios.CRTSCTS
                     | termios.CBAUD)) | bits | parity | stop | cflag_extra | termios.CREAD | termios.CLOCAL
    a[3] = 0
    a[4] = a[5] = getattr(termios, "B%d" % baud)
    a[6][termios.VMIN] = 1
    a[6][termios.VTIME] = 0
    termios.tcsetattr(fd, when, a)
    return termios.tcgetattr(fd)


def cmd_termios():
    """Every line setting through tcsetattr, seen in the UART's divisor latch and LCR."""
    fd = os.open(DEVICE, os.O_RDWR | os.O_NOCTTY)
    out = []
    now, drain, flush = termios.TCSANOW, termios.TCSADRAIN, termios.TCSAFLUSH   # TCSETS, TCSETSW, TCSETSF
    cases = [
        ("9600 8N1", 9600, termios.CS8, 0, 0, now),
        ("19200 7E1", 19200, termios.CS7, termios.PARENB, 0, now),
        ("38400 8N2", 38400, termios.CS8, 0, termios.CSTOPB, drain),
        ("1200 5O1", 1200, termios.CS5, termios.PARENB | termios.PARODD, 0, flush),
        ("2400 6M1", 2400, termios.CS6, termios.PARENB | termios.PARODD | CMSPAR, 0, now),
        ("4800 7S2", 4800, termios.CS7, termios.PARENB | CMSPAR, termios.CSTOPB, drain),
        ("115200 8N1", 115200, termios.CS8, 0, 0, now),
    ]
    for name, baud, bits, parity, stop, when in cases:
        back = raw(fd, baud, bits=bits, parity=parity, stop=stop, when=when)
        r = regs()
        out.append({"name": name, "divisor": r["divisor"], "lcr": r["lcr"], "cflag": back[2], "ospeed": back[5]})
    # CRTSCTS, IXON, IXOFF reach the driver's line (flow control is the driver's, not a register)
    raw(fd, 9600, cflag_extra=termios.CRTSCTS, iflag=termios.IXON | termios.IXOFF)
    flow = driver("status")["line"]
    raw(fd, 9600)
    noflow = driver("status")["line"]
    # termios2: a speed given as a number (BOTHER), read back the same way
    t2 = bytearray(fcntl.ioctl(fd, TCGETS2, bytes(TERMIOS2.size)))
    i, o, c, l, line, cc, isp, osp = TERMIOS2.unpack(bytes(t2))
    c = (c & ~termios.CBAUD) | BOTHER
    fcntl.ioctl(fd, TCSETS2, TERMIOS2.pack(i, o, c, l, line, cc, 57600, 57600))
    r2 = regs()
    got2 = TERMIOS2.unpack(fcntl.ioctl(fd, TCGETS2, bytes(TERMIOS2.size)))
    os.close(fd)
    # the settings survive close and open
    fd = os.open(DEVICE, os.O_RDWR | os.O_NOCTTY)
    raw(fd, 19200, bits=termios.CS7, parity=termios.PARENB)
    os.close(fd)
    fd = os.open(DEVICE, os.O_RDWR | os.O_NOCTTY)
    again = termios.tcgetattr(fd)
    r3 = regs()
    raw(fd, 115200)
    os.close(fd)
    print(json.dumps({"cases": out, "flow": flow, "noflow": noflow, "termios2": {
        "divisor": r2["divisor"], "ospeed": got2[7], "cbaud": got2[2] & termios.CBAUD},
        "reopened": {"cflag": again[2], "ospeed": again[5], "lcr": r3["lcr"], "divisor": r3["divisor"]}}))


def cmd_modem():
    """Modem lines in the UART's loopback: DTR -> DSR, RTS -> CTS; TIOCMIWAIT, TIOCGICOUNT; data looped."""
    fd = os.open(DEVICE, os.O_RDWR | os.O_NOCTTY)
    raw(fd, 115200)
    res = {}
    tiocm(fd, termios.TIOCMBIS, TIOCM_LOOP)
    res["loop_mcr"] = regs()["mcr"]
    tiocm(fd, termios.TIOCMSET, TIOCM_LOOP | TIOCM_DTR)
    time.sleep(0.05)
    res["dtr_only"] = tiocm(fd, termios.TIOCMGET)
    res["dtr_only_mcr"] = regs()["mcr"]
    tiocm(fd, termios.TIOCMBIS, TIOCM_RTS)
    time.sleep(0.05)
    res["dtr_rts"] = tiocm(fd, termios.TIOCMGET)
    tiocm(fd, termios.TIOCMBIC, TIOCM_DTR)
    time.sleep(0.05)
    res["rts_only"] = tiocm(fd, termios.TIOCMGET)
    res["rts_only_mcr"] = regs()["mcr"]
    before = struct.unpack("20i", fcntl.ioctl(fd, TIOCGICOUNT, bytes(80)))
    # TIOCMIWAIT wakes when CTS changes (RTS toggled from another thread)
    t0 = time.monotonic()

    def toggle():
        time.sleep(0.5)
        tiocm(fd, termios.TIOCMBIC, TIOCM_RTS)
    th = threading.Thread(target=toggle)
    th.start()
    fcntl.ioctl(fd, TIOCMIWAIT, TIOCM_CTS)
    res["miwait_s"] = time.monotonic() - t0
    th.join()
    after = struct.unpack("20i", fcntl.ioctl(fd, TIOCGICOUNT, bytes(80)))
    res["icount_before"], res["icount_after"] = before[:11], after[:11]
    # TIOCMIWAIT is interruptible: a signal ends it
    class Alarm(Exception):
        pass

    def alarm(*a):
        raise Alarm()
    signal.signal(signal.SIGALRM, alarm)   # a handler that raises: Python retries an ioctl on EINTR otherwise
    signal.setitimer(signal.ITIMER_REAL, 0.5)
    t0 = time.monotonic()
    try:
        fcntl.ioctl(fd, TIOCMIWAIT, TIOCM_DSR)
        res["miwait_signal"] = "returned"
    except Alarm:
        res["miwait_signal"] = "interrupted"
    res["miwait_signal_s"] = time.monotonic() - t0
    res["waiting_after_signal"] = None
    # data in loopback: what we send comes back
    termios.tcflush(fd, termios.TCIFLUSH)
    msg = b"looped back!\n"   # within the RX FIFO: QEMU loops TX into RX at once, unpaced
    os.write(fd, msg)
    got = b""
    deadline = time.monotonic() + 10
    while len(got) < len(msg) and time.monotonic() < deadline:
        r, _, _ = select.select([fd], [], [], 1)
        if r:
            got += os.read(fd, 100)
    res["looped"] = got.decode(errors="replace")
    res["icount_end"] = struct.unpack("20i", fcntl.ioctl(fd, TIOCGICOUNT, bytes(80)))[:11]
    tiocm(fd, termios.TIOCMSET, TIOCM_DTR | TIOCM_RTS)
    res["final_mcr"] = regs()["mcr"]
    os.close(fd)
    print(json.dumps(res))


def cmd_send(baud, fmt, text):
    """Write text to the far end with the line as fmt ("7E1", "8N2"), drained; the LCR then."""
    bits = {"5": termios.CS5, "6": termios.CS6, "7": termios.CS7, "8": termios.CS8}[fmt[0]]
    parity = {"N": 0, "E": termios.PARENB, "O": termios.PARENB | termios.PARODD}[fmt[1]]
    stop = termios.CSTOPB if fmt[2] == "2" else 0
    fd = os.open(DEVICE, os.O_RDWR | os.O_NOCTTY)
    raw(fd, int(baud), bits=bits, parity=parity, stop=stop)
    os.write(fd, text.encode())
    t0 = time.monotonic()
    termios.tcdrain(fd)
    drained = time.monotonic() - t0
    outq = INT.unpack(fcntl.ioctl(fd, TIOCOUTQ, INT.pack(0)))[0]
    r = regs()
    os.close(fd)
    print(json.dumps({"lcr": r["lcr"], "divisor": r["divisor"], "drain_s": drained, "outq_after_drain": outq}))


def cmd_recv(baud, fmt, n, ready_file):
    """Read n bytes from the far end with the line as fmt; FIONREAD, poll and O_NONBLOCK on the way."""
    bits = {"7": termios.CS7, "8": termios.CS8}[fmt[0]]
    parity = {"N": 0, "E": termios.PARENB}[fmt[1]]
    stop = termios.CSTOPB if fmt[2] == "2" else 0
    n = int(n)
    fd = os.open(DEVICE, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    raw(fd, int(baud), bits=bits, parity=parity, stop=stop)
    termios.tcflush(fd, termios.TCIFLUSH)
    res = {"eagain": errno_of(os.read, fd, 10)}
    p = select.poll()
    p.register(fd, select.POLLIN)
    res["poll_idle"] = p.poll(200)
    open(ready_file, "w").close()
    got = b""
    deadline = time.monotonic() + 60
    inq = []
    while len(got) < n and time.monotonic() < deadline:
        if p.poll(1000):
            inq.append(INT.unpack(fcntl.ioctl(fd, FIONREAD, INT.pack(0)))[0])
            try:
                got += os.read(fd, n - len(got))
            except BlockingIOError:
                pass
    res["data"] = got.decode(errors="replace")
    res["fionread_seen"] = max(inq) if inq else 0
    res["lcr"] = regs()["lcr"]
    os.close(fd)
    print(json.dumps(res))


def cmd_misc():
    """Exclusive opens, break, flush, garbage ioctls refused with the right errno."""
    res = {}
    fd = os.open(DEVICE, os.O_RDWR | os.O_NOCTTY)
    raw(fd, 115200)
    fcntl.ioctl(fd, TIOCEXCL)
    res["excl_second_open"] = errno_of(os.open, DEVICE, os.O_RDWR)
    fcntl.ioctl(fd, TIOCNXCL)
    fd2 = os.open(DEVICE, os.O_RDWR)
    os.close(fd2)
    res["nxcl_second_open"] = "ok"
    fcntl.ioctl(fd, TIOCSBRK)
    res["lcr_break_on"] = regs()["lcr"]
    fcntl.ioctl(fd, TIOCCBRK)
    res["lcr_break_off"] = regs()["lcr"]
    t0 = time.monotonic()
    termios.tcsendbreak(fd, 0)
    res["sendbreak_s"] = time.monotonic() - t0
    t0 = time.monotonic()
    fcntl.ioctl(fd, TCSBRKP, 3)
    res["tcsbrkp3_s"] = time.monotonic() - t0
    res["lcr_after_breaks"] = regs()["lcr"]
    res["tcflush_bad"] = errno_of(fcntl.ioctl, fd, TCFLSH, 7)
    termios.tcflush(fd, termios.TCIOFLUSH)
    res["miwait_nothing"] = errno_of(fcntl.ioctl, fd, TIOCMIWAIT, 0)
    res["unknown"] = {hex(c): errno_of(fcntl.ioctl, fd, c, bytes(64)) for c in
                      (0x5401 + 0x70, 0xdeadbeef, 0x4004_6601, 0x541E, 0x80086601, 0)}
    a = termios.tcgetattr(fd)
    res["tiocsctty"] = errno_of(fcntl.ioctl, fd, termios.TIOCSCTTY, 0)
    # a speed the UART cannot make (12345 baud: divisor 9.3): refused, settings kept
    t2 = TERMIOS2.unpack(fcntl.ioctl(fd, TCGETS2, bytes(TERMIOS2.size)))
    bad = TERMIOS2.pack(t2[0], t2[1], (t2[2] & ~termios.CBAUD) | BOTHER, t2[3], t2[4], t2[5], 12345, 12345)
    res["bad_speed"] = errno_of(fcntl.ioctl, fd, TCSETS2, bad)
    res["speed_kept"] = termios.tcgetattr(fd)[5] == a[5]
    # a bad pointer: the kernel's copy fails, not the front end
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    rc = libc.ioctl(fd, termios.TCGETS, ctypes.c_void_p(16))
    res["bad_pointer"] = errno.errorcode.get(ctypes.get_errno()) if rc < 0 else "no error"
    # the device still works
    res["after_garbage"] = termios.tcgetattr(fd)[5] == a[5]
    res["isatty"] = os.isatty(fd)
    os.close(fd)
    # O_NONBLOCK writes while the far end does not read (QEMU holds the UART once ~280 bytes wait
    # in COM2's socket): the TX ring fills, then EAGAIN; TIOCOUTQ counts it; TCOFLUSH empties it.
    fd = os.open(DEVICE, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    written, err = 0, None
    while written < 1 << 20:
        try:
            written += os.write(fd, b"n" * 4096)
        except OSError as exc:
            err = errno.errorcode.get(exc.errno)
            break
    res["nonblock_written"], res["nonblock_error"] = written, err
    res["outq_full"] = INT.unpack(fcntl.ioctl(fd, TIOCOUTQ, INT.pack(0)))[0]
    p = select.poll()
    p.register(fd, select.POLLOUT)
    res["poll_out_full"] = p.poll(0)
    termios.tcflush(fd, termios.TCOFLUSH)
    res["outq_flushed"] = INT.unpack(fcntl.ioctl(fd, TIOCOUTQ, INT.pack(0)))[0]
    res["poll_out_flushed"] = [ev for _, ev in p.poll(1000)]
    os.close(fd)
    print(json.dumps(res))


def cmd_crash_clients(out_prefix):
    """Start a writer and a reader on the device in the background; each records the errno it ends with."""
    for role in ("writer", "reader", "miwait"):
        if os.fork() == 0:
            os.setsid()
            null = os.open("/dev/null", os.O_RDWR)
            for i in (0, 1, 2):
                os.dup2(null, i)     # the agent waits for our output pipes to close
            fd = os.open(DEVICE, os.O_RDWR | os.O_NOCTTY)
            n = 0
            try:
                if role == "writer":
                    while True:
                        n += os.write(fd, b"w" * 1024)
                elif role == "miwait":
                    while True:
                        fcntl.ioctl(fd, TIOCMIWAIT, TIOCM_CD | TIOCM_RI)
                else:
                    while True:
                        n += len(os.read(fd, 1024))
            except OSError as exc:
                with open("%s.%s.part" % (out_prefix, role), "w") as f:
                    f.write(json.dumps({"errno": errno.errorcode.get(exc.errno), "n": n}))
                os.rename("%s.%s.part" % (out_prefix, role), "%s.%s" % (out_prefix, role))
            os._exit(0)
    print(json.dumps({"started": True}))


def cmd_reopen():
    """After a driver crash: a new open sees the settings of before and moves bytes."""
    t0 = time.monotonic()
    fd = os.open(DEVICE, os.O_RDWR | os.O_NOCTTY)
    a = termios.tcgetattr(fd)
    os.write(fd, b"after the crash\n")
    termios.tcdrain(fd)
    r = regs()
    os.close(fd)
    print(json.dumps({"cflag": a[2], "ospeed": a[5], "lcr": r["lcr"], "divisor": r["divisor"],
                      "write_drain_s": time.monotonic() - t0}))


def cmd_setline(baud, fmt):
    bits = {"7": termios.CS7, "8": termios.CS8}[fmt[0]]
    parity = {"N": 0, "E": termios.PARENB, "O": termios.PARENB | termios.PARODD}[fmt[1]]
    stop = termios.CSTOPB if fmt[2] == "2" else 0
    fd = os.open(DEVICE, os.O_RDWR | os.O_NOCTTY)
    a = raw(fd, int(baud), bits=bits, parity=parity, stop=stop)
    os.close(fd)
    print(json.dumps({"cflag": a[2], "ospeed": a[5]}))


def cmd_hold(prefix):
    """Open the device and read until the read fails; record its errno (the front end's death)."""
    fd = os.open(DEVICE, os.O_RDWR | os.O_NOCTTY)
    open(prefix + ".ready", "w").close()
    try:
        while True:
            os.read(fd, 100)
    except OSError as exc:
        with open(prefix + ".part", "w") as f:
            f.write(json.dumps({"errno": errno.errorcode.get(exc.errno)}))
        os.rename(prefix + ".part", prefix + ".result")


def cmd_regs():
    print(json.dumps(dict(regs(), line=driver("status")["line"])))


if __name__ == "__main__":
    globals()["cmd_" + sys.argv[1]](*sys.argv[2:])
