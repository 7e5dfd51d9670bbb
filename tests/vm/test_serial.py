"""The 16550 driver end to end in the testbed: rsd spawns it unprivileged
with COM2's ports and IRQ granted by /dev/rsdrv; the tty front end gives
applications a tty; the host holds the far end of the serial line.
"""

import hashlib
import json
import re
import threading
import socket
import time

import pytest

from testbed.stack import SerialStack, build_rsdrv, read_exactly


# Bytes a Linux pty buffers between writer and reader (n_tty 4 KiB + tty
# buffers up to 64 KiB).
PTY_BUFFER_BOUND = 72 * 1024


@pytest.fixture(scope="module")
def rsdrv_ko(tmp_path_factory):
    return build_rsdrv(str(tmp_path_factory.mktemp("rsdrv")))


@pytest.fixture(scope="module")
def stack(testbed, rsdrv_ko):
    s = SerialStack(testbed, rsdrv_ko)
    s.start()
    yield s
    s.stop()


def test_driver_runs_unprivileged_with_only_its_ports(stack):
    st = stack.status("serial0")
    assert st["state"] == "up"
    proc = stack.sh("cat /proc/%d/status" % st["pid"]).stdout
    fields = dict(line.split(":\t", 1) for line in proc.splitlines() if ":\t" in line)
    uids = fields["Uid"].split()
    assert "0" not in uids, fields["Uid"]
    assert fields["CapEff"].strip() == "0000000000000000"
    assert fields["CapPrm"].strip() == "0000000000000000"
    assert fields["CapBnd"].strip() == "0000000000000000"
    assert fields["NoNewPrivs"].strip() == "1"
    assert fields["Groups"].strip() == ""
    ep = stack.endpoint_info("serial0")
    assert "0x2f8" in ep and "sealed" in ep, ep


@pytest.mark.parametrize("baud", [9600, 38400, 115200])
def test_bytes_both_ways(stack, baud):
    stack.sh("stty -F %s %d" % (stack.tty, baud)).check()
    stack.wait_divisor(115200 // baud)
    payload = ("baud %d: the quick brown fox jumps over the lazy dog\n" % baud).encode()
    # host -> guest application
    reader = stack.start_reader(len(payload), "/tmp/in-%d" % baud)
    stack.com2.sendall(payload)
    assert stack.finish_reader(reader) == payload
    # guest application -> host
    stack.sh("printf '%s' > %s" % (payload.decode().replace("\n", "\\n"), stack.tty)).check()
    assert read_exactly(stack.com2, len(payload), 10) == payload


def test_large_transfers_arrive_intact(stack):
    stack.sh("stty -F %s 115200" % stack.tty).check()
    stack.wait_divisor(1)
    data = bytes((i * 7 + (i >> 8)) & 0xFF for i in range(32 * 1024))
    reader = stack.start_reader(len(data), "/tmp/big-in")
    for i in range(0, len(data), 1024):
        stack.com2.sendall(data[i:i + 1024])
    got = stack.finish_reader(reader, timeout=120)
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(data).hexdigest()
    # and the other way, from a file through cat
    stack.testbed.write_file("/tmp/big-out", data)
    stack.sh("cat /tmp/big-out > %s" % stack.tty, timeout=120).check()
    assert hashlib.sha256(read_exactly(stack.com2, len(data), 60)).hexdigest() == hashlib.sha256(data).hexdigest()
    counters = stack.driver_status()["counters"]
    assert counters["overrun"] == 0


def test_stty_changes_reach_the_uart_divisor(stack):
    for baud, divisor in ((1200, 96), (19200, 6), (57600, 2)):
        stack.sh("stty -F %s %d" % (stack.tty, baud)).check()
        stack.wait_divisor(divisor)
    stack.sh("stty -F %s 115200 cstopb crtscts" % stack.tty).check()
    line = stack.wait_line(lambda l: l["stop"] == 2 and l["rtscts"])
    stack.sh("stty -F %s -cstopb -crtscts" % stack.tty).check()
    stack.wait_line(lambda l: l["stop"] == 1 and not l["rtscts"])
    # A pty cannot carry data bits and parity; the driver's control tool sets them,
    # and later stty changes leave them alone.
    stack.ctl("set-line", "--bits", "7", "--parity", "odd")
    stack.sh("stty -F %s 57600" % stack.tty).check()
    line = stack.wait_line(lambda l: l["baud"] == 57600)
    assert (line["bits"], line["parity"]) == (7, "odd")
    stack.ctl("set-line", "--bits", "8", "--parity", "none")


def test_modem_lines_in_loopback(stack):
    try:
        st = stack.ctl("set-modem", "--loop", "1", "--rts", "0", "--dtr", "1")
        assert st["modem"]["loop"] and not st["modem"]["cts"] and st["modem"]["dsr"]
        st = stack.ctl("set-modem", "--rts", "1", "--dtr", "0")
        assert st["modem"]["cts"] and not st["modem"]["dsr"]
        # In loopback what the application writes comes straight back to it.
        reader = stack.start_reader(6, "/tmp/loop-in")
        stack.sh("printf 'echo!\\n' > %s" % stack.tty).check()
        assert stack.finish_reader(reader) == b"echo!\n"
    finally:
        stack.ctl("set-modem", "--loop", "0", "--rts", "1", "--dtr", "1")


def test_crash_mid_transfer_gives_eio_then_recovers_with_settings(stack):
    stack.sh("stty -F %s 38400" % stack.tty).check()
    stack.wait_divisor(3)
    drain(stack.com2)
    fe_before = stack.frontend_status()
    received = bytearray()
    host = threading.Thread(target=lambda: received.extend(drain(stack.com2, 8.0)))
    host.start()
    before = stack.status("serial0")
    writer = stack.start_writer("/tmp/writer.out")
    time.sleep(1.0)
    stack.rsctl("fi", "serial0", "--crash").check()
    result = stack.finish_writer(writer)
    assert "errno=5" in result, result                          # EIO pushed to the application
    written = int(result.split("written=")[1])
    after = stack.wait_up("serial0", before["generation"])
    assert after["restarts_total"] == before["restarts_total"] + 1
    assert after["last_failure"]["reason"] == "signal"
    # New opens work, with the settings the application had made.
    assert "38400" in stack.sh("stty -F %s speed" % stack.tty).stdout
    stack.wait_divisor(3)
    host.join(60)
    fe = stack.frontend_status()
    assert fe["hangups"] >= 1 and fe["recoveries"] >= 1
    assert fe["unconfirmed"] == 0 and fe["held"] == 0
    # Every byte the front end accepted was either sent (before or after the
    # recovery) or counted as lost (given to the dead driver: never resent).
    accepted = fe["tx_accepted"] - fe_before["tx_accepted"]
    lost = fe["tx_lost"] - fe_before["tx_lost"]
    assert set(received) <= {ord("x")}
    confirmed = fe["tx_bytes"] - fe_before["tx_bytes"]
    assert len(received) + lost == accepted, dict(received=len(received), lost=lost, accepted=accepted,
                                                  confirmed=confirmed, fe=fe)
    # What the application wrote and the front end never read was still in the
    # kernel's pty buffer: the hang-up flushes it, as on any tty hang-up.
    assert 0 <= written - accepted <= PTY_BUFFER_BOUND, (written, accepted)
    stack.sh("printf 'after crash\\n' > %s" % stack.tty).check()
    assert read_exactly(stack.com2, 12, 10) == b"after crash\n"


def test_hang_is_detected_by_heartbeat_and_recovered(stack):
    before = stack.status("serial0")
    t0 = time.monotonic()
    stack.rsctl("fi", "serial0", "--hang").check()
    after = stack.wait_up("serial0", before["generation"], timeout=30)
    elapsed = time.monotonic() - t0
    assert after["last_failure"]["reason"] == "no-heartbeat"
    assert elapsed < 2 * stack.period + 10
    stack.sh("printf 'after hang\\n' > %s" % stack.tty).check()
    assert read_exactly(stack.com2, 11, 10) == b"after hang\n"


def test_a_port_outside_the_entry_is_refused_and_visible(stack):
    try:
        out = stack.run_probe_outside_entry()
        assert "inb(0x3f8) outside the entry: refused" in out, out
        assert "inb(0x2ef) inside the entry: ok" in out, out
        ep = stack.endpoint_info("badport")
        assert re.search(r"refused [1-9]", ep), ep
    finally:
        stack.rsctl("down", "badport")


def test_regs_read_back_what_the_settings_programmed(stack):
    stack.sh("stty -F %s 9600" % stack.tty).check()
    stack.wait_divisor(12)
    stack.ctl("set-line", "--bits", "7", "--parity", "even", "--stop", "2")
    try:
        regs = stack.ctl("regs")["regs"]
        assert (regs["dll"], regs["dlm"]) == (12, 0), regs
        assert regs["lcr"] & 0x7F == 0x02 | 0x04 | 0x08 | 0x10, regs    # 7 bits, 2 stop, parity, even
        assert regs["mcr"] & 0x0B == 0x0B, regs                         # DTR, RTS, OUT2 (the IRQ gate)
        assert regs["ier"] & 0x0D == 0x0D, regs    # RX data (a front end is attached), line and modem status
        assert regs["lsr"] & 0x60 == 0x60, regs    # transmitter idle
    finally:
        stack.ctl("set-line", "--bits", "8", "--parity", "none", "--stop", "1")
        stack.sh("stty -F %s 115200" % stack.tty).check()
        stack.wait_divisor(1)
    regs = stack.ctl("regs")["regs"]
    assert (regs["dll"], regs["dlm"], regs["lcr"] & 0x7F) == (1, 0, 0x03), regs


def test_ixon_an_xoff_from_the_line_stops_the_transmitter_until_xon(stack):
    drain(stack.com2)
    stack.sh("stty -F %s ixon" % stack.tty).check()
    stack.wait_line(lambda l: l["ixon"])
    try:
        reader = stack.start_reader(4, "/tmp/ixon-in")
        stack.com2.sendall(b"\x13")                     # XOFF: neither it nor XON reaches the application
        time.sleep(0.5)
        stack.sh("printf 'held' > %s" % stack.tty).check()
        wait_unsent(stack, 4)                           # in the TX ring, not on the line
        assert drain(stack.com2, 1.0) == b"", "bytes went out after XOFF"
        stack.com2.sendall(b"\x11")                     # XON
        assert read_exactly(stack.com2, 4, 10) == b"held"
        stack.com2.sendall(b"data")
        try:
            assert stack.finish_reader(reader, timeout=15) == b"data"
        except RuntimeError:
            raise AssertionError("the reader got %r; front end %s; driver %s" % (
                stack.sh("cat /tmp/ixon-in.part").stdout, stack.frontend_status(), stack.driver_status()))
    finally:
        stack.sh("pkill -x head; true")
        stack.com2.sendall(b"\x11")
        stack.sh("stty -F %s -ixon" % stack.tty).check()
        stack.wait_line(lambda l: not l["ixon"])
        drain(stack.com2)


def test_ixoff_xoff_goes_out_when_the_ring_fills_and_xon_once_drained(stack):
    """The front end stopped (SIGSTOP) consumes nothing: the RX ring fills and the driver sends
    XOFF; the front end going on drains it and XON follows.  (A pty's own buffer takes
    ~640 KiB before it pushes back: stopping the front end reaches the ring's limit at once.)"""
    drain(stack.com2)
    stack.sh("stty -F %s ixoff" % stack.tty).check()
    stack.wait_line(lambda l: l["ixoff"])
    data = bytes((i * 5 + (i >> 9)) & 0xFF for i in range(192 * 1024)).replace(b"\x11", b"\x12").replace(b"\x13", b"\x12")
    fe_pid = stack.status("tty0")["pid"]
    sent = 0
    got = bytearray()
    reader = stack.start_reader(len(data), "/tmp/ixoff-in")
    stack.sh("kill -STOP %d" % fe_pid).check()
    try:
        while b"\x13" not in got:
            assert sent < len(data), "no XOFF after %d bytes with the front end stopped" % sent
            stack.com2.settimeout(10)
            stack.com2.sendall(data[sent:sent + 1024])
            sent += 1024
            stack.com2.settimeout(0.05)
            try:
                got += stack.com2.recv(4096)
            except socket.timeout:
                pass
        assert got == b"\x13", got
        # The RX ring nearly full (7/8 of 64 KiB), not before; QEMU and the socket hold some more.
        assert 48 * 1024 <= sent <= 128 * 1024, sent
        stack.sh("kill -CONT %d" % fe_pid).check()
        got += read_exactly(stack.com2, 1, 60)
        assert got == b"\x13\x11", got
        stack.com2.settimeout(30)
        stack.com2.sendall(data[sent:])
        assert hashlib.sha256(stack.finish_reader(reader, timeout=120)).digest() == hashlib.sha256(data).digest()
        assert stack.driver_status()["counters"]["overrun"] == 0
    finally:
        stack.sh("kill -CONT %d; pkill -x head; true" % fe_pid)
        stack.sh("stty -F %s -ixoff" % stack.tty).check()
        stack.wait_line(lambda l: not l["ixoff"])
        stack.quiesce()


def test_flush_and_drain_of_bytes_held_by_cts(stack):
    """With rtscts and CTS low (loopback, RTS off) bytes wait in the TX ring: drain waits for them
    (ETIMEDOUT at its bound), tcflush(TCOFLUSH) on the tty drops them at the driver."""
    stack.quiesce()
    stack.sh("stty -F %s crtscts" % stack.tty).check()
    stack.wait_line(lambda l: l["rtscts"])
    stack.ctl("set-modem", "--loop", "1", "--rts", "0")
    try:
        stack.sh("printf 'dropped' > %s" % stack.tty).check()
        wait_unsent(stack, 7)
        r = stack.sh("python -m drivers.serial16550.ctl drain")
        reply = json.loads(r.stdout)
        assert reply["ok"] is False and reply["err"] == "ETIMEDOUT", reply
        fe_before = stack.frontend_status()
        stack.sh("python -c \"import os, termios; fd = os.open('%s', os.O_WRONLY | os.O_NOCTTY); "
                 "termios.tcflush(fd, termios.TCOFLUSH)\"" % stack.tty).check()
        wait_unsent(stack, 0)
        assert stack.frontend_status()["tx_flushed"] - fe_before["tx_flushed"] == 7
        # CTS up again: the flushed bytes never go out; what follows does (in loopback: back to us).
        reader = stack.start_reader(3, "/tmp/flush-in")
        stack.ctl("set-modem", "--rts", "1")
        stack.sh("printf 'ok\\n' > %s" % stack.tty).check()
        assert stack.finish_reader(reader) == b"ok\n"
        assert stack.ctl("drain")["ok"]
        # An explicit flush of both FIFOs through the control tool.
        stack.ctl("flush", "--rx", "--tx")
    finally:
        stack.sh("pkill -x head; true")
        stack.ctl("set-modem", "--loop", "0", "--rts", "1")
        stack.sh("stty -F %s -crtscts" % stack.tty).check()
        stack.wait_line(lambda l: not l["rtscts"])
        drain(stack.com2)


HOSTILE_FRONTEND = r"""
import mmap, os, select, socket, struct, sys
from libdrv import chrshm
from libdrv.drvlink import DriverLink, DriverRefused
from libdrv.wire import FrameReader, encode
path = sys.argv[1]
TX_POSTED, RX_CONSUMED = 64, 68

def refused_attach(memfd):
    # An attach the driver should refuse: its error reply (it closes the connection after it).
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    bells = [os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)]
    socket.send_fds(s, [encode({"op": "attach", "id": 1})], [memfd, *bells])
    r, out = FrameReader(), []
    while not out:
        chunk = s.recv(65536)
        if not chunk:
            return "closed without a reply"
        out = r.feed(chunk)
    return "%s %s" % (out[0].get("err"), out[0].get("msg")) if not out[0].get("ok") else "accepted"

def attach(memfd=None):
    drv = DriverLink(path)
    memfd = chrshm.create(1) if memfd is None else memfd
    bells = [os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)]
    reply = drv.call("attach", fds=[memfd, *bells])
    return drv, mmap.mmap(memfd, chrshm.SIZE), bells

def refused_then_closed(drv):
    events = []
    while True:
        select.select([drv.sock], [], [], 10)
        try:
            events += drv.read_events()
        except ConnectionError:
            return [e.get("msg") for e in events if e.get("ev") == "refused"]

for what, off, value in (("tx_posted beyond the ring", TX_POSTED, chrshm.TX_SIZE + 1),
                         ("rx_consumed past rx_produced", RX_CONSUMED, 5)):
    drv, m, bells = attach()
    struct.pack_into("<I", m, off, value)
    os.eventfd_write(bells[0], 1)
    print(what, "->", refused_then_closed(drv))

# counters not 0 at attach
memfd = chrshm.create(1)
m = mmap.mmap(memfd, chrshm.SIZE)
struct.pack_into("<I", m, TX_POSTED, 3)
print("nonzero counters ->", refused_attach(memfd))
# memory that is not a sealed chrshm memfd
print("unsealed ->", refused_attach(os.memfd_create("x")))
# and a well-behaved attach still works: bytes on the rings
drv, m, bells = attach()
m[chrshm.TX_OFF:chrshm.TX_OFF + 6] = b"rings\n"
struct.pack_into("<I", m, TX_POSTED, 6)
os.eventfd_write(bells[0], 1)
print("good attach ok")
select.select([], [], [], 2)
"""


def test_a_hostile_frontend_on_the_rings_is_refused_and_the_driver_carries_on(stack):
    before = stack.status("serial0")
    stack.rsctl("down", "tty0").check()
    try:
        stack.wait_for("! pgrep -f 'frontends[.]tty'", "the tty front end to stop")
        drain(stack.com2)
        stack.testbed.write_file("/tmp/hostile_fe.py", HOSTILE_FRONTEND.encode())
        r = stack.sh("python /tmp/hostile_fe.py %s/svc/serial0.sock" % stack.env["RSD_RUNTIME_DIR"], timeout=120)
        out = r.stdout
        lines = out.splitlines()
        assert len(lines) == 5, out + r.stderr
        assert lines[0].startswith("tx_posted beyond the ring -> [") and "tx_posted" in lines[0], out
        assert lines[1].startswith("rx_consumed past rx_produced -> [") and "rx_consumed" in lines[1], out
        assert "must be 0" in lines[2] or "0 at attach" in lines[2], out
        assert lines[3].startswith("unsealed ->") and "accepted" not in lines[3], out
        assert lines[4] == "good attach ok", out
        assert read_exactly(stack.com2, 6, 10) == b"rings\n"
        after = stack.status("serial0")
        assert (after["pid"], after["generation"]) == (before["pid"], before["generation"])
        assert stack.driver_status()["counters"]["refused"] >= 2
    finally:
        stack.rsctl("reload").check()
        deadline = time.monotonic() + 120
        while True:
            try:
                if stack.status("tty0")["state"] == "up" and stack.frontend_status()["state"] == "up":
                    break
            except (AssertionError, ValueError, KeyError, RuntimeError):
                pass
            assert time.monotonic() < deadline, stack.logs()
            time.sleep(0.5)
    stack.sh("printf 'front end back\\n' > %s" % stack.tty).check()
    assert read_exactly(stack.com2, 15, 10) == b"front end back\n"


def wait_unsent(stack, n, timeout=10):
    """Until the driver holds exactly n bytes posted and not yet handed to the UART."""
    deadline = time.monotonic() + timeout
    while True:
        pos = stack.driver_status()["position"]
        if (pos["tx_posted"] - pos["tx_done"]) & 0xFFFFFFFF == n:
            return
        assert time.monotonic() < deadline, pos
        time.sleep(0.2)


def drain(sock, wait=0.3):
    out = b""
    sock.settimeout(wait)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                break
            out += data
    except socket.timeout:
        pass
    return out


BAD_CLIENT = r"""
import socket, sys
from libdrv.wire import encode, FrameReader
path = sys.argv[1]
def ask(data):
    s = socket.socket(socket.AF_UNIX); s.settimeout(5); s.connect(path); s.sendall(data)
    r, out = FrameReader(), []
    while not out:
        chunk = s.recv(65536)
        if not chunk:
            break
        out = r.feed(chunk)
    s.close()
    return out[0] if out else None
for req in (b"\x05\x00\x00\x00garbage",
            encode({"op": "set_modem", "id": 1, "dtr": "no"}),
            encode({"op": "set_line", "id": 2, "baud": 12345678}),
            encode({"op": "attach", "id": 3}),
            encode({"op": "explode", "id": 4})):
    print(ask(req))
"""


def test_garbage_from_a_client_gets_errors_and_the_driver_carries_on(stack):
    before = stack.status("serial0")
    stack.testbed.write_file("/tmp/bad_client.py", BAD_CLIENT.encode())
    out = stack.sh("python /tmp/bad_client.py %s/svc/serial0.sock" % stack.env["RSD_RUNTIME_DIR"]).stdout
    replies = out.splitlines()
    assert len(replies) == 5, out
    assert "malformed frame" in replies[0]
    assert "dtr must be true or false" in replies[1]
    assert "baud 12345678 out of range" in replies[2]
    assert "EBUSY" in replies[3] and "attached already" in replies[3]   # one front end at a time
    assert "unknown operation" in replies[4]
    after = stack.status("serial0")
    assert (after["pid"], after["generation"]) == (before["pid"], before["generation"])
    stack.sh("stty -F %s raw -echo; printf 'still fine\\n' > %s" % (stack.tty, stack.tty)).check()
    assert read_exactly(stack.com2, 11, 10) == b"still fine\n"


def test_a_real_getty_serves_a_shell_over_the_line(stack):
    # Last in the module: what getty and its shell leave on the pty (termios, and once a shell
    # that kept reading it) must not reach the tests of the line's bytes.
    drain(stack.com2)
    stack.start_getty()
    try:
        deadline = time.monotonic() + 30
        seen = b""
        while b"getty-ok-42" not in seen and time.monotonic() < deadline:
            stack.com2.sendall(b"echo getty-ok-$((6*7))\n")
            seen += drain(stack.com2, 2.0)
        assert b"getty-ok-42" in seen, seen[-500:]
    finally:
        stack.stop_getty()
