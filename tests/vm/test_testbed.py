"""The testbed itself: the machine, the agent, the host-side handles, failure handling.

Most tests use the session guest (`testbed` fixture) and leave it as they found it; the
failure tests boot their own guests (two at once, beside the session one).
"""

import os
import pty
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from testbed import (AHCI_BDF, E1000_BDF, CommandTimeout, Testbed, TestbedError)
from testbed.kernel import find_kernel

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Guest-side helper for the UART: port I/O through /dev/port (root), no driver involved.
COM2_SCRIPT = r"""
import os, sys, time
fd = os.open("/dev/port", os.O_RDWR)
inb = lambda p: os.pread(fd, 1, p)[0]
outb = lambda p, v: os.pwrite(fd, bytes([v]), p)
BASE = 0x2f8
if sys.argv[1] == "reset":  # whatever an earlier test left: no loopback, 8N1, FIFOs cleared
    outb(BASE + 1, 0); outb(BASE + 3, 0x03); outb(BASE + 4, 0); outb(BASE + 2, 0x07)
    outb(BASE + 2, 0)
    while inb(BASE + 5) & 1: inb(BASE)
    sys.exit(0)
outb(BASE + 7, 0x5a); a = inb(BASE + 7); outb(BASE + 7, 0xa5); b = inb(BASE + 7)
print("scratch %02x %02x lsr %02x" % (a, b, inb(BASE + 5)))
deadline = time.monotonic() + 10
while not inb(BASE + 5) & 1:
    if time.monotonic() > deadline:
        sys.exit("no byte arrived on COM2")
    time.sleep(0.01)
print("received %02x" % inb(BASE))
outb(BASE, int(sys.argv[1], 16))
"""

# i8042: enable the keyboard interface with scancode translation (the kernel was told to
# leave it alone), drain, then (second call) wait for bytes.
PS2_SCRIPT = r"""
import os, sys, time
fd = os.open("/dev/port", os.O_RDWR)
inb = lambda p: os.pread(fd, 1, p)[0]
outb = lambda p, v: os.pwrite(fd, bytes([v]), p)
def wait_input_empty():
    while inb(0x64) & 2: time.sleep(0.001)
if sys.argv[1] == "enable":
    wait_input_empty(); outb(0x64, 0x20)
    deadline = time.monotonic() + 2
    while not inb(0x64) & 1 and time.monotonic() < deadline: time.sleep(0.001)
    ctr = inb(0x60)
    ctr = (ctr & ~0x10 & ~0x01) | 0x40   # keyboard clock on, no IRQ, translate to set 1
    wait_input_empty(); outb(0x64, 0x60); wait_input_empty(); outb(0x60, ctr)
    wait_input_empty(); outb(0x64, 0xae)
    time.sleep(0.05)
    while inb(0x64) & 1: inb(0x60)
else:
    got, deadline = [], time.monotonic() + 5
    while time.monotonic() < deadline and len(got) < 2:
        if inb(0x64) & 1: got.append(inb(0x60))
        else: time.sleep(0.005)
    print(" ".join("%02x" % b for b in got))
"""

HTTP_ONE_SHOT = r"""
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8080)); s.listen(1); s.settimeout(30)
print("listening", flush=True)
while True:
    c, _ = s.accept()
    data = c.recv(100)
    if data:
        c.sendall(b"pong:" + data); c.close(); break
    c.close()
"""


def sh(tb, line, timeout=60):
    return tb.run(["sh", "-c", line], timeout=timeout).check()


# ----- the guest and the agent --------------------------------------------------------

def test_guest_runs_the_found_kernel_with_the_agreed_command_line(testbed):
    assert testbed.run(["uname", "-r"]).check().stdout.strip() == find_kernel().version
    cmdline = testbed.run(["cat", "/proc/cmdline"]).check().stdout.split()
    for word in ("intel_iommu=on", "iommu=pt", "8250.nr_uarts=1", "console=ttyS0"):
        assert word in cmdline


def test_agent_returns_exit_status_and_both_streams_and_honours_env_cwd_input(testbed):
    r = testbed.run(["sh", "-c", 'echo "out $FOO $(pwd)"; cat; echo err >&2; exit 3'],
                    env={"FOO": "bar"}, cwd="/tmp", input=b"from-stdin\n")
    assert (r.rc, r.stdout, r.stderr) == (3, "out bar /tmp\nfrom-stdin\n", "err\n")
    assert testbed.run(["pwd"]).stdout == REPO_ROOT + "\n"  # default cwd: the checkout
    missing = testbed.run(["no-such-command-xyz"])
    assert missing.rc == 127 and "no-such-command-xyz" in missing.stderr


def test_streamed_output_arrives_while_the_command_runs(testbed):
    chunks = []
    started = time.monotonic()
    r = testbed.run(["sh", "-c", "echo first; echo warn >&2; sleep 1.5; echo second"],
                    on_output=lambda fd, data: chunks.append((time.monotonic(), fd, data)))
    finished = time.monotonic()
    assert (r.rc, r.stdout, r.stderr) == (0, "first\nsecond\n", "warn\n")
    first = next(t for t, fd, data in chunks if fd == 1 and data.startswith(b"first"))
    assert finished - first > 1.0, "the first line came only with the result"
    assert first - started < 1.0


def test_agent_serves_concurrent_commands(testbed):
    results = [None, None]

    def slow(i):
        results[i] = testbed.run(["sh", "-c", f"sleep 1; echo {i}"])
    threads = [threading.Thread(target=slow, args=(i,)) for i in range(2)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.stdout.strip() for r in results] == ["0", "1"]
    assert time.monotonic() - started < 1.9  # they overlapped


def test_command_timeout_kills_the_command_and_the_guest_lives_on(testbed):
    with pytest.raises(CommandTimeout) as info:
        testbed.run(["sh", "-c", "echo started; sleep 60"], timeout=1)
    assert info.value.result.timed_out and info.value.result.stdout == "started\n"
    with pytest.raises(CommandTimeout) as info:  # the same with streamed output
        testbed.run(["sh", "-c", "echo started; sleep 60"], timeout=1, on_output=lambda *_: None)
    assert info.value.result.timed_out and info.value.result.stdout == "started\n"
    processes = testbed.run(["sh", "-c", "cat /proc/[0-9]*/cmdline | tr '\\0' ' '"]).stdout
    assert "guest_init.py" in processes and "sleep 60" not in processes
    assert testbed.alive and testbed.run(["true"]).rc == 0


def test_bad_arguments_are_refused_before_reaching_the_guest(testbed):
    with pytest.raises(ValueError, match="list of str"):
        testbed.run("uname -r")
    with pytest.raises(ValueError, match="timeout"):
        testbed.run(["true"], timeout=0)
    with pytest.raises(ValueError, match="guest_port"):
        testbed.hostfwd(0)
    with pytest.raises(ValueError, match="disk_size_mb"):
        Testbed(disk_size_mb=0)
    with pytest.raises(ValueError, match="kernel_args"):
        Testbed(kernel_args=["two words"])
    with pytest.raises(ValueError, match="root_cache"):
        Testbed(root_cache="sometimes")
    with pytest.raises(ValueError, match="netdev"):
        Testbed(netdev="user,id=other")


def test_push_and_drop_caches_bring_host_rewrites_into_the_guest(testbed):
    host_dir = tempfile.mkdtemp(dir="/var/tmp")  # not /tmp: the guest's /tmp is its own tmpfs
    host_file = os.path.join(host_dir, "probe")
    try:
        with open(host_file, "w") as f:
            f.write("first\n")
        assert testbed.run(["cat", host_file]).check().stdout == "first\n"
        with open(host_file, "w") as f:
            f.write("second, longer\n")
        os.chmod(host_file, 0o750)
        assert testbed.push(host_file) == host_file
        r = testbed.run(["sh", "-c", f"cat {host_file}; stat -c %a {host_file}"]).check()
        assert r.stdout == "second, longer\n750\n"
        assert testbed.read_file(host_file) == b"second, longer\n"
        with open(os.path.join(host_dir, "other"), "w") as f:
            f.write("one\n")
        assert testbed.run(["cat", f"{host_dir}/other"]).stdout == "one\n"
        with open(os.path.join(host_dir, "other"), "w") as f:
            f.write("two, rewritten\n")
        testbed.drop_caches()
        assert testbed.run(["cat", f"{host_dir}/other"]).stdout == "two, rewritten\n"
    finally:
        shutil.rmtree(host_dir)


def test_guest_writes_to_the_shared_root_never_reach_the_host(testbed):
    probe = os.path.join(REPO_ROOT, ".testbed-host-write-probe")
    sh(testbed, f"echo guest > {probe} && cat {probe}")
    assert not os.path.exists(probe)


def test_guest_side_checks_pass(testbed):
    """tests/guest/test_testbed_guest.py in one guest pytest process: root, mounts, venv,
    nobody, modprobe, IOMMU + IRQ remapping, e1000 -> vfio-pci (TYPE1v2) and uio_pci_generic."""
    result = testbed.run_pytest(["tests/guest/test_testbed_guest.py"], timeout=300)
    outcomes = result.assert_passed("tests/guest/test_testbed_guest.py::")
    assert len(outcomes) >= 10 and result.rc == 0


# ----- devices and host-side handles --------------------------------------------------

def test_ahci_disk_is_visible_with_the_host_written_contents(testbed):
    signature = b"rsd-testbed-ahci-%d" % os.getpid()
    with open(testbed.disk_image, "r+b") as f:
        f.write(signature)
    script = f"""
        modprobe sd_mod && echo ahci > /sys/bus/pci/devices/{AHCI_BDF}/driver_override &&
        modprobe ahci || exit 1
        for i in $(seq 100); do
            dev=$(ls -d /sys/bus/pci/devices/{AHCI_BDF}/ata*/host*/target*/*/block/sd* 2>/dev/null)
            [ -n "$dev" ] && [ -b /dev/${{dev##*/}} ] && break; sleep 0.1
        done
        echo "size $(cat $dev/size)"
        dd if=/dev/${{dev##*/}} bs=512 count=1 2>/dev/null | head -c {len(signature)}; echo
        rmmod ahci; echo > /sys/bus/pci/devices/{AHCI_BDF}/driver_override
    """
    out = sh(testbed, script).stdout.splitlines()
    assert out[0] == f"size {64 * 1024 * 1024 // 512}"
    assert out[1] == signature.decode()
    assert testbed.run(["test", "-e", f"/sys/bus/pci/devices/{AHCI_BDF}/driver"]).rc == 1


def test_com2_is_unclaimed_and_bytes_cross_the_serial_line_both_ways(testbed):
    assert "02f8" not in testbed.run(["cat", "/proc/ioports"]).stdout
    testbed.run(["python", "-c", COM2_SCRIPT, "reset"]).check()
    testbed.com2.settimeout(0.2)
    try:  # drop what earlier tests sent through the line
        while testbed.com2.recv(4096):
            pass
    except socket.timeout:
        pass
    testbed.com2.settimeout(10)
    testbed.com2.sendall(b"\x5a")
    lines = testbed.run(["python", "-c", COM2_SCRIPT, "c3"], timeout=60).check().stdout.splitlines()
    assert lines[0].startswith("scratch 5a a5")  # a UART with a scratch register at 0x2f8
    assert lines[1] == "received 5a"
    assert testbed.com2.recv(1) == b"\xc3"


def test_screendump_is_a_png_of_the_vga_text_screen(testbed, tmp_path):
    path = testbed.qmp.screendump(tmp_path / "screen.png")
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    assert struct.unpack(">II", head[16:24]) == (720, 400)  # 80x25 text, 9x16 cells


def test_sendkey_reaches_the_ps2_controller(testbed):
    testbed.run(["python", "-c", PS2_SCRIPT, "enable"]).check()
    testbed.qmp.sendkey("a")
    r = testbed.run(["python", "-c", PS2_SCRIPT, "read"]).check()
    assert r.stdout.split() == ["1e", "9e"], r.describe()  # set-1 make and break of "a"


def test_qmp_reports_device_status(testbed):
    assert testbed.qmp.query("status")["status"] == "running"
    devices = {(d["id"]["vendor"], d["id"]["device"])
               for bus in testbed.qmp.query("pci") for d in bus["devices"]}
    assert {(0x8086, 0x100E), (0x8086, 0x2922), (0x1234, 0x1111)} <= devices


def test_hostfwd_port_reaches_a_guest_listener_on_the_e1000(testbed):
    ip = "$(command -v ip || echo busybox ip)"
    sh(testbed, f"""modprobe e1000 && sleep 0.5 && dev=$(ls /sys/bus/pci/devices/{E1000_BDF}/net) &&
        {ip} addr add 10.0.2.15/24 dev $dev && {ip} link set $dev up""")
    try:
        host_port = testbed.hostfwd(8080)
        assert testbed.hostfwd(8080) == host_port
        server = {}
        thread = threading.Thread(target=lambda: server.update(
            r=testbed.run(["python", "-c", HTTP_ONE_SHOT], timeout=40)))
        thread.start()
        reply, deadline = b"", time.monotonic() + 30
        while not reply and time.monotonic() < deadline:  # slirp accepts before the guest does
            try:
                with socket.create_connection(("127.0.0.1", host_port), timeout=5) as c:
                    c.sendall(b"ping")
                    reply = c.recv(100)
            except OSError:
                pass
            if not reply:
                time.sleep(0.3)
        thread.join(45)
        assert reply == b"pong:ping"
        assert server["r"].rc == 0
    finally:
        sh(testbed, f"rmmod e1000; echo > /sys/bus/pci/devices/{E1000_BDF}/driver_override")
    assert testbed.run(["test", "-e", f"/sys/bus/pci/devices/{E1000_BDF}/driver"]).rc == 1


# ----- failures: each of these boots its own guests ------------------------------------

@pytest.fixture(scope="module")
def spare_testbeds(testbed):
    """Two more guests booted at once, beside the session guest (three QEMUs running)."""
    spares = [Testbed(disk_size_mb=8, reply_grace=3) for _ in range(2)]
    try:
        for tb in spares:
            tb.start()
        for tb in spares:
            tb.wait_ready()
    except TestbedError as e:
        for tb in spares:
            tb.close()
        pytest.fail(f"a second testbed cannot boot beside the first:\n{e}", pytrace=False)
    yield spares
    for tb in spares:
        tb.close()


def test_three_testbeds_run_at_once_with_distinct_sockets_and_ports(testbed, spare_testbeds):
    beds = [testbed] + spare_testbeds
    assert len({tb.tmpdir for tb in beds}) == 3
    assert len({tb.hostfwd(22) for tb in beds}) == 3
    for tb in beds:
        assert tb.run(["true"]).rc == 0


def test_guest_panic_is_detected_and_reported_with_the_console(spare_testbeds):
    tb = spare_testbeds[0]
    started = time.monotonic()
    with pytest.raises(TestbedError) as info:
        tb.run(["sh", "-c", "echo c > /proc/sysrq-trigger"], timeout=30)
    message = str(info.value)
    assert "Kernel panic" in message and "guest console" in message, message
    assert time.monotonic() - started < 20
    assert tb.proc.returncode is not None and not tb.alive
    assert not os.path.exists(tb.tmpdir)
    assert "Kernel panic" in tb.failure
    old_tmpdir = tb.tmpdir
    tb.restart()  # what the session fixture does for the next test
    assert tb.alive and tb.failure is None and tb.tmpdir != old_tmpdir
    assert tb.run(["true"]).rc == 0


def test_hung_guest_is_killed_and_reported(spare_testbeds):
    tb = spare_testbeds[1]
    tb.qmp.execute("stop")  # freeze the vCPU: nothing in the guest answers any more
    started = time.monotonic()
    with pytest.raises(TestbedError, match="the guest hung") as info:
        tb.run(["true"], timeout=2)
    assert time.monotonic() - started < 2 + 3 + 5
    assert "guest console" in str(info.value)
    assert tb.proc.returncode == -signal.SIGKILL
    assert not os.path.exists(tb.tmpdir)


def test_boot_timeout_kills_qemu_and_reports_the_console():
    tb = Testbed(disk_size_mb=8, boot_timeout=4, kernel_args=["loglevel=7"])
    tb.start()
    deadline = time.monotonic() + 10
    while "Linux version" not in tb.console_log and time.monotonic() < deadline:
        time.sleep(0.05)
    tb.qmp.execute("stop")  # a guest stuck in boot
    last_line = tb.console_tail(1)
    with pytest.raises(TestbedError, match="boot timeout") as info:
        tb.wait_ready()
    assert "guest console" in str(info.value) and last_line in str(info.value)
    assert last_line.startswith("[")  # a kernel message
    assert tb.proc.returncode is not None and not os.path.exists(tb.tmpdir)


def test_qemu_dies_with_its_owner_even_on_sigkill(tmp_path):
    script = ("import sys, time; from testbed import Testbed\n"
              "tb = Testbed(disk_size_mb=8); tb.start()\n"
              "print(tb.proc.pid, tb.tmpdir, flush=True); time.sleep(60)\n")
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                             cwd=REPO_ROOT)
    try:
        pid, tmpdir = owner.stdout.readline().split()
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait()
        deadline = time.monotonic() + 10
        while _running(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _running(pid), "QEMU outlived its owner"
        assert os.path.isdir(tmpdir)  # a SIGKILLed owner cannot clean up its temp dir...
        Testbed(disk_size_mb=8).start().close()
        assert not os.path.exists(tmpdir)  # ...so the next testbed to start sweeps it
    finally:
        owner.kill()
        owner.wait()
        shutil.rmtree(tmpdir, ignore_errors=True)


def _running(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead
    except FileNotFoundError:
        return False


# ----- the command line ---------------------------------------------------------------

def test_cli_run_prints_the_guest_kernel_and_returns_the_command_status():
    # --kernel 6.12: the session guest shows the default kernel boots, this the other one.
    r = subprocess.run([sys.executable, "-m", "testbed", "run", "--kernel", "6.12", "--",
                        "sh", "-c", "uname -r; echo to-stderr >&2; exit 3"],
                       capture_output=True, text=True, timeout=180, cwd=REPO_ROOT)
    assert (r.returncode, r.stdout, r.stderr) == (3, find_kernel("6.12").version + "\n",
                                                  "to-stderr\n")


def test_kernel_is_chosen_by_series_or_version_and_defaults_to_6_1(monkeypatch):
    monkeypatch.delenv("RSD_TESTBED_KERNEL", raising=False)
    default, k612 = find_kernel(), find_kernel("6.12")
    assert (default.series, k612.series) == ("6.1", "6.12")
    assert find_kernel(k612.version) == k612
    monkeypatch.setenv("RSD_TESTBED_KERNEL", "6.12")
    assert find_kernel() == k612
    assert find_kernel("6.1") == default  # an explicit choice beats the environment
    with pytest.raises(TestbedError, match="no usable 5.4 guest kernel"):
        find_kernel("5.4")
    with pytest.raises(TestbedError, match="linux-headers-"):
        find_kernel("6.1.0-1-amd64")


def test_cli_shell_gives_a_root_prompt_and_exit_powers_off():
    pid, fd = pty.fork()
    if pid == 0:
        os.chdir(REPO_ROOT)
        os.execv(sys.executable, [sys.executable, "-m", "testbed", "shell"])
    seen = b""

    def read_until(token, timeout):
        nonlocal seen
        deadline = time.monotonic() + timeout
        while token not in seen and time.monotonic() < deadline:
            if select.select([fd], [], [], 0.2)[0]:
                try:
                    seen += os.read(fd, 4096)
                except OSError:  # the pty closed: the CLI exited
                    break
        return token in seen

    try:
        assert read_until(b"# ", 120), seen.decode(errors="replace")[-2000:]
        os.write(fd, b"echo uid=$(id -u) host=$(hostname)\r")
        assert read_until(b"uid=0 host=rsd-testbed", 30), seen.decode(errors="replace")[-2000:]
        os.write(fd, b"exit\r")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            read_until(b"\0", 0.5)  # keep draining so the guest can write
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
        assert done and os.waitstatus_to_exitcode(status) == 0
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(fd)
