"""The 16550 driver end to end in the testbed: rsd spawns it unprivileged
with COM2's ports and IRQ granted by /dev/rsdrv; the tty front end gives
applications a tty; the host holds the far end of the serial line.
"""

import hashlib
import threading
import re
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


def test_a_real_getty_serves_a_shell_over_the_line(stack):
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
            encode({"op": "write", "id": 3, "data": "not bytes"}),
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
    assert "data must be bytes" in replies[3]
    assert "unknown operation" in replies[4]
    after = stack.status("serial0")
    assert (after["pid"], after["generation"]) == (before["pid"], before["generation"])
    stack.sh("stty -F %s raw -echo; printf 'still fine\\n' > %s" % (stack.tty, stack.tty)).check()
    assert read_exactly(stack.com2, 11, 10) == b"still fine\n"
