"""`make demo`: the whole system on a real kernel with an emulated 16550 and e1000.

Boots the testbed, starts datastore and rsd in it with the serial driver
(COM2) and its tty front end, sends text both ways between this host (the
far end of COM2) and a program in the guest, crashes the driver with
`rsctl fi`, shows rsd's status and the data store, and shows traffic
flowing again.  Then the same for Ethernet: the e1000 driver on VFIO and
the TAP eth0 its front end serves, a TCP stream from this host's end of the
link (a TAP in a private namespace) with the driver crashed in the middle
of it, and the stream arriving intact.  Then the disk: the AHCI driver on
VFIO and the NBD block device its front end serves, an ext4 file system
written while the driver is crashed and killed, every file read back and a
clean fsck.  Then the console: the VGA text display and the PS/2 keyboard
drivers with the console front end, a getty on console0, a command typed with
QMP sendkey, the display driver crashed while the shell prints, the screen
repainted whole, and a PNG screendump of it after the crash.  Last, the
serial port again as a character device (the CUSE front end, /dev/ttyRSD1):
7E1 set with stty and read back from the UART's registers, a line from
this host read from the device, and a driver crash giving the reading
application EIO while a new open finds the same settings.  Every guest
command is printed as it runs.
"""

import argparse
import os
import sys
import tempfile
import time

from . import REPO_ROOT, Testbed, TestbedError
from .blockstack import BlockStack
from .consolestack import ConsoleStack
from .cusestack import CuseStack
from .hostnet import GUEST_NET_IP, HOST_IP
from .netstack import NetStack
from .stack import SerialStack, build_rsdrv, read_exactly

BOLD, DIM, OFF = "\033[1m", "\033[2m", "\033[0m"


def step(n, text):
    print("\n%s[%d] %s%s" % (BOLD, n, text, OFF), flush=True)


def show_cmd(line):
    print("%s  guest# %s%s" % (DIM, line, OFF), flush=True)


def show(text):
    for line in text.rstrip("\n").splitlines():
        print("    " + line)
    sys.stdout.flush()


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m testbed.demo")
    ap.add_argument("--quiet", action="store_true", help="do not print each guest command")
    ap.add_argument("--screendump", default=os.path.join(REPO_ROOT, "build", "demo-console-after-crash.png"),
                    help="where the console's picture after the display driver's crash goes (PNG)")
    a = ap.parse_args(argv)
    step(1, "Build the rsdrv kernel module against the guest kernel's headers")
    with tempfile.TemporaryDirectory(prefix="rsd-demo-") as work:
        ko = build_rsdrv(work)
        print("    built %s" % ko)
        step(2, "Boot a stock Debian kernel in QEMU (q35, IOMMU, e1000, AHCI, 16550 on COM2)")
        t0 = time.monotonic()
        try:
            with Testbed(host_net=True) as tb:
                print("    guest up in %.1f s: %s" % (time.monotonic() - t0, tb.run(["uname", "-sr"]).stdout.strip()))
                run_demo(tb, ko, None if a.quiet else show_cmd)
                run_net_demo(tb, None if a.quiet else show_cmd)
                run_disk_demo(tb, None if a.quiet else show_cmd)
                run_console_demo(tb, ko, a.screendump, None if a.quiet else show_cmd)
                run_cuse_demo(tb, ko, None if a.quiet else show_cmd)
        except TestbedError as exc:
            print("\nThe testbed failed: %s" % exc, file=sys.stderr)
            return 1
    print("\n%sDone.%s Try it yourself: python -m testbed shell, then see README.md." % (BOLD, OFF))
    return 0


def run_demo(tb, ko, echo):
    stack = SerialStack(tb, ko, period=1, backoff=True, echo=echo)
    step(3, "Load rsdrv, start datastore and rsd; rsd spawns serial0 (the 16550 driver) and tty0 (its front end)")
    stack.start()
    show(stack.rsctl("status").stdout)
    st = stack.status("serial0")
    show(stack.sh("grep -E '^(Uid|CapEff|NoNewPrivs)' /proc/%d/status" % st["pid"]).stdout)
    print("    serial0 runs unprivileged; the module lets it touch only this:")
    show(stack.endpoint_info("serial0"))

    step(4, "The guest opens the tty; this host is the other end of the serial cable")
    show(stack.sh("ls -l %s; stty -F %s" % (stack.tty, stack.tty)).stdout)
    reader = stack.start_reader(len(b"hello guest, this is the host\n"), "/tmp/demo-in")
    stack.com2.sendall(b"hello guest, this is the host\n")
    print("    host sent:      'hello guest, this is the host'")
    print("    guest received: %r" % stack.finish_reader(reader).decode().strip())
    stack.sh("echo 'hello host, this is the guest' > %s" % stack.tty).check()
    print("    host received:  %r" % read_exactly(stack.com2, 30, 10).decode().strip())

    step(5, "An application sets the line to 9600 baud with stty; the driver programs the UART")
    stack.sh("stty -F %s 9600" % stack.tty).check()
    stack.wait_divisor(12)
    ds = stack.driver_status()
    print("    UART divisor latch now %d (115200 / 9600); driver counters: %s" % (ds["divisor"], ds["counters"]))

    step(6, "Inject a crash into the driver: rsctl fi serial0 --crash")
    before = stack.status("serial0")
    t0 = time.monotonic()
    show(stack.rsctl("fi", "serial0", "--crash").stdout)
    after = stack.wait_up("serial0", before["generation"])
    print("    rsd replaced it: pid %d -> %d, generation %d -> %d (seen up %.2f s after the crash, "
          "polling from the host)" % (before["pid"], after["pid"], before["generation"], after["generation"],
                                      time.monotonic() - t0))
    show(stack.rsctl("status").stdout)
    print("    what the data store says:")
    show(stack.rsctl("ds", "ls", "'(drv|label)\\..*'").stdout)

    step(7, "The tty came back with the application's settings; traffic flows again")
    show(stack.sh("stty -F %s speed" % stack.tty).stdout)
    stack.sh("echo 'still here after the crash' > %s" % stack.tty).check()
    print("    host received:  %r" % read_exactly(stack.com2, 27, 10).decode().strip())
    fe = stack.frontend_status()
    print("    front end: %d hang-up(s) pushed to applications, %d recovery(ies), %d byte(s) lost in flight"
          % (fe["hangups"], fe["recoveries"], fe["tx_lost"]))
    stack.stop()


def run_net_demo(tb, echo):
    import hashlib
    import json
    import os
    import random
    import subprocess
    transfer = os.path.join(REPO_ROOT, "tests", "guest", "net_transfer.py")
    python = os.path.join(REPO_ROOT, ".venv", "bin", "python")
    stack = NetStack(tb, echo=echo)
    step(8, "Ethernet: rsd binds the e1000 to vfio-pci for eth0 (the driver) and makes the TAP eth0 "
         "for eth0-net (its front end)")
    stack.start()
    show(stack.rsctl("status").stdout)
    st = stack.status("eth0")
    show(stack.sh("grep -E '^(Uid|CapEff|NoNewPrivs)' /proc/%d/status; ls -l /proc/%d/fd | grep -E 'vfio|memfd'"
                  % (st["pid"], st["pid"])).stdout)
    show(stack.sh("ip addr show eth0").stdout)

    step(9, "Traffic both ways: ping this host, and this host pings the guest")
    show(stack.sh("ping -c 3 %s" % HOST_IP).stdout)
    show(tb.host_net.run(["ping", "-c", "3", GUEST_NET_IP]).stdout)

    step(10, "A 16 MiB TCP stream from this host to the guest; the driver is crashed in the middle of it")
    nbytes, seed = 16 << 20, 7
    sender = tb.host_net.popen([python, transfer, "serve-send", "5310", str(nbytes), str(seed), str(2 << 20)],
                               stdout=subprocess.PIPE, text=True)
    sender.stdout.readline()
    stack.sh("setsid %s %s recv %s 5310 > /tmp/demo-net.json 2>&1 < /dev/null &" % (python, transfer, HOST_IP))
    time.sleep(3)
    before = stack.status("eth0")
    show(stack.rsctl("fi", "eth0", "--crash").stdout)
    after = stack.wait_up("eth0", before["generation"])
    print("    rsd replaced it: pid %d -> %d, generation %d -> %d"
          % (before["pid"], after["pid"], before["generation"], after["generation"]))
    sender.communicate(timeout=120)
    stack.wait_for("grep -q sha256 /tmp/demo-net.json", "the stream to end", 120)
    got = json.loads(stack.sh("tail -n 1 /tmp/demo-net.json").stdout)
    want = hashlib.sha256(random.Random(seed).randbytes(nbytes)).hexdigest()
    print("    the guest received %d bytes, content %s; the longest stall was %.0f ms"
          % (got["bytes"], "intact" if got["sha256"] == want else "CORRUPT", got["max_gap"] * 1000))

    step(11, "Traffic again, and the interface's counters")
    show(tb.host_net.run(["ping", "-c", "3", GUEST_NET_IP]).stdout)
    show(stack.sh("ip -s link show eth0").stdout)
    stack.stop()


def run_disk_demo(tb, echo):
    import os
    python = os.path.join(REPO_ROOT, ".venv", "bin", "python")
    load = os.path.join(REPO_ROOT, "tests", "guest", "fs_load.py")
    mnt = "/mnt/demo"
    stack = BlockStack(tb, echo=echo)
    step(12, "Disk: rsd binds the AHCI to vfio-pci for disk0 (the driver); rsd connects an NBD device "
         "for disk0-blk (its front end)")
    stack.start()
    show(stack.rsctl("status").stdout)
    dev = stack.device()
    show(stack.sh("ls -l %s; blockdev --getsize64 %s" % ("/run/rsdblock/run/blk/disk0", dev)).stdout)

    step(13, "An ext4 file system on it; 160 files of 256 KiB written (each fsync'ed) while the driver is "
         "crashed and then killed")
    stack.sh("mkfs.ext4 -q -F %s && mkdir -p %s && mount %s %s && mkdir -p %s/data" % (dev, mnt, dev, mnt, mnt),
             timeout=120).check()
    stack.sh("rm -f /tmp/demo-fs.json; setsid %s %s write %s/data 160 256 5 /tmp/demo-fs.json "
             "> /dev/null 2>&1 < /dev/null &" % (python, load, mnt)).check()
    time.sleep(2)
    for how in ("--crash", "kill"):
        before = stack.status("disk0")
        if how == "kill":
            stack.sh("kill -9 %d" % before["pid"]).check()
        else:
            show(stack.rsctl("fi", "disk0", how).stdout)
        after = stack.wait_up("disk0", before["generation"])
        print("    rsd replaced it: pid %d -> %d, generation %d -> %d"
              % (before["pid"], after["pid"], before["generation"], after["generation"]))
        time.sleep(1.5)
    stack.wait_for("test -e /tmp/demo-fs.json", "the writer to finish", 300)
    show(stack.sh("cat /tmp/demo-fs.json").stdout)

    step(14, "Every file read back from the disk (page cache dropped), then umount and fsck")
    stack.sh("sync && echo 3 > /proc/sys/vm/drop_caches && %s %s check %s/data 160 256 5 /tmp/demo-check.json"
             % (python, load, mnt), timeout=300).check()
    show(stack.sh("cat /tmp/demo-check.json; echo; umount %s && e2fsck -fn %s" % (mnt, dev), timeout=120).stdout)
    show(stack.rsctl("ds", "get", "blk.disk0.status").stdout)
    stack.stop()


# QEMU qcodes for the characters the console demo types (US layout).
QCODES = {" ": ["spc"], "-": ["minus"], ";": ["semicolon"], "/": ["slash"], ".": ["dot"],
          "'": ["apostrophe"], "|": ["shift", "backslash"], "\n": ["ret"], "_": ["shift", "minus"],
          "=": ["equal"], "$": ["shift", "4"], "(": ["shift", "9"], ")": ["shift", "0"]}


def type_text(tb, text):
    """Type text on the guest's PS/2 keyboard with QMP sendkey, key by key."""
    for ch in text:
        keys = QCODES.get(ch) or (["shift", ch.lower()] if ch.isupper() else [ch])
        tb.qmp.sendkey(keys, hold_time_ms=40)
        time.sleep(0.12)


def wait_for_prompt(stack, timeout=120):
    """Until the shell's prompt (root's '#') ends the screen's last line and the display has it all."""
    deadline = time.monotonic() + timeout
    echo, stack.echo = stack.echo, None      # the polling is not worth showing
    try:
        while True:
            stack.wait_settled()
            rows = [row for row in stack.vga_text() if row]
            if rows and rows[-1].endswith("#"):
                return
            if time.monotonic() > deadline:
                raise TestbedError("no shell prompt on console0 within %d s:\n%s" % (timeout, "\n".join(rows)))
            time.sleep(0.5)
    finally:
        stack.echo = echo


def show_screen(stack, title):
    """The VGA text buffer as QEMU's monitor reads it (what the device shows)."""
    rows = stack.vga_text()
    while rows and not rows[-1]:
        rows.pop()
    print("    %s (read from the VGA text buffer at 0xb8000 by QEMU's monitor):" % title)
    print("    +" + "-" * 80 + "+")
    for row in rows:
        print("    |%-80s|" % row)
    print("    +" + "-" * 80 + "+")
    sys.stdout.flush()


def run_console_demo(tb, ko, png, echo):
    stack = ConsoleStack(tb, ko)
    step(15, "Console: rsd spawns vga0 (VGA text display), kbd0 (i8042 keyboard) and console0 (the terminal)")
    stack.start()
    stack.echo = echo
    show(stack.rsctl("status").stdout)
    print("    the module granted kbd0 the keyboard ports in place of the kernel's ownerless placeholders:")
    show(stack.sh("grep -E '^ *00(60|64)-' /proc/ioports").stdout)

    step(16, "A getty on console0; a command typed on the PS/2 keyboard with QMP sendkey")
    # agetty wants the tty's name under /dev: the link's target, pts/N
    stack.sh("tty=$(readlink -f %s); setsid agetty --noclear --local-line --autologin root ${tty#/dev/} linux "
             "< /dev/null > /dev/null 2>&1 &" % stack.tty).check()
    wait_for_prompt(stack)
    type_text(tb, "uname -sr; ls -l %s\n" % os.path.dirname(stack.tty))
    wait_for_prompt(stack)
    show_screen(stack, "the console")

    step(17, "Crash the display driver while the shell prints: rsctl fi vga0 --crash")
    type_text(tb, "ls -l /usr/bin | tail -n 30")
    before = stack.status("vga0")
    show(stack.rsctl("fi", "vga0", "--crash").stdout)
    type_text(tb, "\n")         # the shell prints while the display driver is being replaced
    after = stack.wait_up("vga0", before["generation"])
    print("    rsd replaced it: pid %d -> %d, generation %d -> %d"
          % (before["pid"], after["pid"], before["generation"], after["generation"]))
    wait_for_prompt(stack)
    type_text(tb, "echo the screen survived\n")
    wait_for_prompt(stack)
    fe = stack.frontend_status()
    show_screen(stack, "the console after the crash, repainted by the new incarnation")
    print("    front end: %d display restart(s), %d repaint(s), %d key(s) typed, %d refused"
          % (fe["display_restarts"], fe["repaints"], fe["keys"], fe["refused"]))
    os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
    tb.qmp.screendump(os.path.abspath(png), format="png")
    print("    %sscreendump after the crash: %s%s" % (BOLD, os.path.abspath(png), OFF))
    stack.sh("pkill -x agetty; pkill -t $(readlink -f %s | sed s,/dev/,,); true" % stack.tty)
    stack.stop()


if __name__ == "__main__":
    sys.exit(main())


def run_cuse_demo(tb, ko, echo):
    stack = CuseStack(tb, ko, echo=echo)
    step(18, "Serial as a character device: serial0's other front end, CUSE; rsd registers /dev/ttyRSD1 "
             "and an application sets 7E1 at 19200 with stty (a pty cannot carry data bits or parity)")
    stack.start()
    show(stack.rsctl("status").stdout)
    show(stack.sh("ls -l %s" % stack.device).stdout)
    stack.sh("stty -F %s 19200 cs7 parenb -parodd" % stack.device).check()
    regs = stack.ctl("regs")["regs"]
    print("    the UART's registers, read back by the driver: LCR %#04x (7 data bits, even parity), "
          "divisor %d (115200 / 19200)" % (regs["lcr"], regs["dll"] | regs["dlm"] << 8))
    line = b"7E1 from the host\n"
    reader = stack.start_reader(len(line), "/tmp/demo-cuse-in")
    stack.com2.sendall(line)
    print("    guest read from %s: %r" % (stack.device, stack.finish_reader(reader).decode().strip()))

    step(19, "Crash the driver while an application reads the device: it gets EIO; a new open finds 7E1 again")
    stack.sh("setsid sh -c 'cat %s > /tmp/demo-cuse-cat 2>&1; echo exit $? >> /tmp/demo-cuse-cat' "
             "< /dev/null > /dev/null 2>&1 &" % stack.device).check()
    time.sleep(1)
    before = stack.status("serial0")
    show(stack.rsctl("fi", "serial0", "--crash").stdout)
    stack.wait_up("serial0", before["generation"])
    stack.wait_for("grep -q exit /tmp/demo-cuse-cat", "the reader to see the crash", timeout=30)
    show(stack.sh("cat /tmp/demo-cuse-cat").stdout)
    show(stack.sh("stty -F %s" % stack.device).stdout)
    stack.stop()

