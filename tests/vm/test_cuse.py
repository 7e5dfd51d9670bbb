"""The CUSE front end end to end in the testbed: rsd registers /dev/ttyRSD1 for the
unprivileged front end (frontends/cuse.py), which serves it on the 16550 driver's rings;
applications use it as /dev/ttyS1, and what they set is read back from the UART itself
(the driver's `regs`: divisor latch, LCR, MCR).  The host holds COM2's far end.

One boot for the module (the session testbed), one stack (testbed/cusestack.py); the
guest side of each test is one run of tests/guest/cuse_probe.py.
"""

import json
import threading
import time

import pytest

from testbed import REPO_ROOT
from testbed.cusestack import CuseStack
from testbed.stack import build_rsdrv, read_exactly

LCR_7E1, LCR_8N2, LCR_8N1 = 0x1A, 0x07, 0x03
MCR_DTR, MCR_RTS, MCR_OUT2, MCR_LOOP = 0x01, 0x02, 0x08, 0x10
TIOCM_DTR, TIOCM_RTS, TIOCM_CTS, TIOCM_DSR, TIOCM_LOOP = 0x002, 0x004, 0x020, 0x100, 0x8000
B19200, CS7, PARENB = 0o16, 0o40, 0o400


@pytest.fixture(scope="module")
def rsdrv_ko(tmp_path_factory):
    return build_rsdrv(str(tmp_path_factory.mktemp("rsdrv")))


@pytest.fixture(scope="module")
def stack(testbed, rsdrv_ko):
    s = CuseStack(testbed, rsdrv_ko)
    s.start()
    yield s
    s.stop()


def test_rsd_registers_the_node_for_an_unprivileged_front_end(stack):
    ls = stack.sh("stat -c '%F %U %G %a' /dev/ttyRSD1; cat /sys/class/cuse/ttyRSD1/dev").check().stdout.split("\n")
    assert ls[0] == "character special file root dialout 660", ls
    st = stack.status("serial0-cuse")
    fields = dict(line.split(":\t", 1) for line in stack.sh("cat /proc/%d/status" % st["pid"]).stdout.splitlines()
                  if ":\t" in line)
    assert "0" not in fields["Uid"].split(), fields["Uid"]
    assert fields["CapEff"].strip() == fields["CapBnd"].strip() == "0000000000000000"
    assert fields["NoNewPrivs"].strip() == "1"
    # the front end holds /dev/cuse (rsd handed it over and kept no copy)
    holders = {path.split("/")[2] for path in stack.sh("find /proc/[0-9]*/fd -lname /dev/cuse 2>/dev/null").stdout.split()}
    assert holders == {str(st["pid"])}, (holders, st["pid"])


def test_termios_reaches_the_uart(stack):
    r = stack.probe("termios")
    want = {"9600 8N1": (12, 0x03), "19200 7E1": (6, 0x1A), "38400 8N2": (3, 0x07), "1200 5O1": (96, 0x08),
            "2400 6M1": (48, 0x29), "4800 7S2": (24, 0x3E), "115200 8N1": (1, 0x03)}
    got = {c["name"]: (c["divisor"], c["lcr"]) for c in r["cases"]}
    assert got == want, r["cases"]
    flow, noflow = r["flow"], r["noflow"]
    assert (flow["rtscts"], flow["ixon"], flow["ixoff"]) == (True, True, True), flow
    assert (noflow["rtscts"], noflow["ixon"], noflow["ixoff"]) == (False, False, False), noflow
    # termios2 (BOTHER): 57600 as a number, divisor 2, read back as BOTHER with the number
    assert r["termios2"] == {"divisor": 2, "ospeed": 57600, "cbaud": 0o010000}, r["termios2"]
    # closed and opened again: the same 7E1 at 19200, in termios and in the UART
    re = r["reopened"]
    assert (re["ospeed"], re["cflag"] & 0o60, bool(re["cflag"] & PARENB)) == (B19200, CS7, True), re
    assert (re["lcr"], re["divisor"]) == (LCR_7E1, 6), re


def test_stty_sets_the_line(stack):
    # coreutils' stty (TCGETS, TCSETS, then TCGETS again to check that everything was taken)
    stack.sh("stty -F /dev/ttyRSD1 2400 cs7 parenb parodd cstopb").check()
    out = stack.sh("stty -F /dev/ttyRSD1 -a").check().stdout
    assert "speed 2400 baud" in out and " cs7 " in out and " parodd " in out and " cstopb " in out, out
    regs = stack.probe("regs")
    assert (regs["lcr"], regs["divisor"]) == (0x0E, 48), regs
    stack.sh("stty -F /dev/ttyRSD1 115200 cs8 -parenb -cstopb").check()


def test_modem_lines_in_loopback(stack):
    r = stack.probe("modem")
    assert r["loop_mcr"] & MCR_LOOP, r
    assert r["dtr_only_mcr"] & (MCR_DTR | MCR_RTS | MCR_LOOP) == MCR_DTR | MCR_LOOP, r
    assert r["rts_only_mcr"] & (MCR_DTR | MCR_RTS | MCR_LOOP) == MCR_RTS | MCR_LOOP, r
    # loopback wires DTR -> DSR and RTS -> CTS
    assert r["dtr_only"] & (TIOCM_DSR | TIOCM_CTS) == TIOCM_DSR, hex(r["dtr_only"])
    assert r["dtr_rts"] & (TIOCM_DSR | TIOCM_CTS) == TIOCM_DSR | TIOCM_CTS, hex(r["dtr_rts"])
    assert r["rts_only"] & (TIOCM_DSR | TIOCM_CTS) == TIOCM_CTS, hex(r["rts_only"])
    assert r["rts_only"] & TIOCM_LOOP and r["rts_only"] & TIOCM_RTS, hex(r["rts_only"])
    # TIOCMIWAIT returned when CTS dropped, 0.5 s after it started; a signal ended the second
    assert 0.4 < r["miwait_s"] < 5, r["miwait_s"]
    assert r["miwait_signal"] == "interrupted" and r["miwait_signal_s"] < 5, r
    assert r["looped"] == "looped back!\n", r["looped"]
    assert r["final_mcr"] & (MCR_DTR | MCR_RTS | MCR_LOOP) == MCR_DTR | MCR_RTS, r["final_mcr"]
    # TIOCGICOUNT: the UART's counting as the driver keeps it (rx, tx: the looped bytes)
    before, end = r["icount_before"], r["icount_end"]
    assert end[4] - before[4] >= 13 and end[5] - before[5] >= 13, (before, end)
    assert stack.probe("regs")["mcr"] & MCR_LOOP == 0


def test_7e1_and_8n2_transfers_with_the_far_end(stack):
    stack.drain_host()
    text = "".join("7E1 %02d the quick brown fox jumps over the lazy dog\n" % i for i in range(8))
    # The far end reads while the guest sends: QEMU writes COM2's socket a byte at a time, and
    # unread, ~280 of them fill it (each is a buffer of its own) and stop the UART.
    got = {}
    far_end = threading.Thread(target=lambda: got.update(data=read_exactly(stack.com2, len(text), 60)))
    far_end.start()
    r = stack.probe("send", "19200", "7E1", text)
    far_end.join()
    assert (r["lcr"], r["divisor"], r["outq_after_drain"]) == (LCR_7E1, 6, 0), r
    assert got["data"].decode() == text
    # the other way at 8N2, with O_NONBLOCK, poll and FIONREAD on the way
    stack.sh("rm -f /tmp/cuse.ready /tmp/cuse.recv; setsid python %s recv 38400 8N2 400 /tmp/cuse.ready "
             "> /tmp/cuse.recv 2>&1 < /dev/null &" % (REPO_ROOT + "/tests/guest/cuse_probe.py")).check()
    stack.wait_for("[ -e /tmp/cuse.ready ]", "the reader to be ready")
    text = "".join("8N2 %03d pack my box with five dozen liquor jugs\n" % i for i in range(9))[:400]
    for i in range(0, len(text), 50):
        stack.com2.sendall(text[i:i + 50].encode())
        time.sleep(0.05)
    stack.wait_for("[ -s /tmp/cuse.recv ]", "the reader to finish", timeout=90)
    r = json.loads(stack.testbed.read_file("/tmp/cuse.recv").decode().strip().splitlines()[-1])
    assert r["data"] == text
    assert r["lcr"] == LCR_8N2, r
    assert r["eagain"] == "EAGAIN" and r["poll_idle"] == [], r
    assert r["fionread_seen"] > 0, r


def test_pyserial_drives_the_modem_lines(stack):
    stack.drain_host()
    r = stack.sh("timeout 90 /usr/bin/python3 %s/tests/guest/cuse_pyserial.py /dev/ttyRSD1" % REPO_ROOT,
                 timeout=120)
    assert r.rc == 0, r.describe() + stack.logs()
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert (got["rts_on_cts"], got["dtr_off_dsr"], got["rts_off_cts"], got["dtr_on_dsr"]) == (True, False, False, True), got
    assert got["read"] == "pyserial 7E1\n" and got["in_waiting"] == 13 and got["read_timeout_empty"] == "", got
    regs = stack.probe("regs")
    assert (regs["lcr"], regs["divisor"]) == (LCR_7E1, 6), regs
    assert regs["mcr"] & (MCR_DTR | MCR_RTS) == 0, regs   # HUPCL: the last close dropped them


def test_exclusive_break_flush_and_garbage(stack):
    pid = stack.status("serial0-cuse")["pid"]
    r = stack.probe("misc")
    assert r["excl_second_open"] == "EBUSY" and r["nxcl_second_open"] == "ok", r
    assert r["lcr_break_on"] & 0x40 and not r["lcr_break_off"] & 0x40, r
    assert 0.2 < r["sendbreak_s"] < 3 and 0.25 < r["tcsbrkp3_s"] < 3 and not r["lcr_after_breaks"] & 0x40, r
    assert r["tcflush_bad"] == "EINVAL" and r["miwait_nothing"] == "EINVAL", r
    assert set(r["unknown"].values()) == {"ENOTTY"}, r["unknown"]
    assert r["tiocsctty"] == "ENOTTY", r       # a CUSE device cannot be a controlling terminal
    assert r["bad_speed"] == "EINVAL" and r["speed_kept"], r
    assert r["bad_pointer"] == "EFAULT", r
    assert r["after_garbage"] and r["isatty"], r
    assert r["nonblock_error"] == "EAGAIN" and 64 << 10 <= r["nonblock_written"] < 1 << 20, r
    # POLLOUT means room in the TX ring (a pipe's rule): what QEMU let out since the EAGAIN
    assert r["outq_full"] >= 60 << 10, r
    assert bool(r["poll_out_full"]) == (r["outq_full"] < 64 << 10), r
    assert r["outq_flushed"] == 0 and r["poll_out_flushed"] and r["poll_out_flushed"][0] & 0x4, r
    stack.drain_host()
    st = stack.status("serial0-cuse")
    assert (st["state"], st["pid"]) == ("up", pid), st
    assert stack.frontend_status()["ioctl_refused"] >= 8


def test_driver_crash_gives_eio_and_new_opens_keep_the_settings(stack):
    stack.probe("setline", "19200", "7E1")
    stack.drain_host()
    stop = threading.Event()

    def far_end():          # keep reading COM2 so the writer is never held up by the host
        stack.com2.settimeout(0.2)
        while not stop.is_set():
            try:
                stack.com2.recv(65536)
            except OSError:
                pass
    reader = threading.Thread(target=far_end, daemon=True)
    reader.start()
    try:
        stack.sh("rm -f /tmp/crash.*").check()
        assert stack.probe("crash_clients", "/tmp/crash")["started"]
        time.sleep(2)
        gen = stack.status("serial0")["generation"]
        stack.rsctl("fi", "serial0", "--crash").check()
        t0 = time.monotonic()
        stack.wait_for("[ -e /tmp/crash.writer ] && [ -e /tmp/crash.reader ] && [ -e /tmp/crash.miwait ]",
                       "the callers to fail", timeout=30)
        failed_after = time.monotonic() - t0
        writer = json.loads(stack.testbed.read_file("/tmp/crash.writer"))
        rdr = json.loads(stack.testbed.read_file("/tmp/crash.reader"))
        assert writer["errno"] == "EIO" and writer["n"] > 0, writer
        assert rdr["errno"] == "EIO", rdr
        assert json.loads(stack.testbed.read_file("/tmp/crash.miwait"))["errno"] == "EIO"    # TIOCMIWAIT too
        # a new open right away: it waits for the next generation, then has the settings of before
        r = stack.probe("reopen")
        recovered_after = time.monotonic() - t0
        assert stack.status("serial0")["generation"] > gen
        assert (r["ospeed"], r["cflag"] & 0o60, bool(r["cflag"] & PARENB)) == (B19200, CS7, True), r
        assert (r["lcr"], r["divisor"]) == (LCR_7E1, 6), r
    finally:
        stop.set()
        reader.join()
    fe = stack.frontend_status()
    assert fe["driver_deaths"] >= 1 and fe["eio_files"] >= 2 and fe["state"] == "up", fe
    logged = [l for l in stack.sh("cat /run/rsdtest/state/log/serial0-cuse.log").stdout.splitlines()
              if "after the previous one went away" in l]
    assert logged, stack.logs()
    print("crash: callers failed within %.1f s, a new open wrote and drained %.1f s after the crash "
          "(guest commands included); front end: %s" % (failed_after, recovered_after, logged[-1]))


def test_front_end_death_takes_the_device_and_rsd_registers_it_again(stack):
    stack.sh("rm -f /tmp/fe.*; setsid python %s/tests/guest/cuse_probe.py hold /tmp/fe > /dev/null 2>&1 "
             "< /dev/null &" % REPO_ROOT).check()
    stack.wait_for("[ -e /tmp/fe.ready ]", "the holder to open the device")
    st = stack.status("serial0-cuse")
    stack.sh("kill -9 %d" % st["pid"]).check()
    stack.wait_for("[ -s /tmp/fe.result ]", "the holder's read to fail", timeout=30)
    assert json.loads(stack.testbed.read_file("/tmp/fe.result"))["errno"] in ("ECONNABORTED", "ENODEV", "ENOTCONN")
    stack.wait_up("serial0-cuse", st["generation"], timeout=60)
    stack.wait_ready()
    assert stack.sh("stat -c '%U %G %a' /dev/ttyRSD1").check().stdout.strip() == "root dialout 660"
    r = stack.probe("reopen")
    assert (r["lcr"], r["divisor"]) == (LCR_7E1, 6), r     # the driver kept the line


def test_a_name_its_service_file_does_not_give_is_refused(stack):
    stack.write_frontend("squat", "ttyRSD1", "ttyRSD2")     # the file gives ttyRSD2; it asks for ttyRSD1
    stack.write_frontend("clash", "null", "null")           # /dev/null is no CUSE device
    try:
        stack.rsctl("reload").check()
        for label in ("squat", "clash"):
            deadline = time.monotonic() + 90
            while stack.status(label)["state"] != "failed":
                assert time.monotonic() < deadline, stack.status(label)
                time.sleep(0.5)
        log = stack.sh("cat /run/rsdtest/state/log/squat.log /run/rsdtest/state/log/clash.log").stdout
        assert "its service file gives 'ttyRSD2'" in log, log
        assert "/dev/null exists and is not a CUSE device" in log, log
        assert stack.sh("[ ! -e /dev/ttyRSD2 ] && stat -c '%U %G %a' /dev/null").check().stdout.strip() == "root root 666"
        assert stack.status("serial0-cuse")["state"] == "up"
    finally:
        stack.sh("rm -f /run/rsdtest/etc/services.d/squat.toml /run/rsdtest/etc/services.d/clash.toml")
        stack.rsctl("reload")
