"""The console end to end in the testbed: rsd spawns the VGA text-mode driver
unprivileged with the text buffer and the CRT controller's ports granted by
/dev/rsdrv, and the i8042 keyboard driver with ports 0x60/0x64 and IRQ 1; the
console front end runs a pyte terminal on a pty; the screen is read from
outside the guest (QEMU's monitor on the VGA text buffer) and compared with
what a terminal fed the same bytes shows; keys are typed with QMP sendkey.

/dev/rsdrv takes the kernel's unowned "keyboard" placeholders for 0x60/0x64
out of the port tree while kbd0 holds the ports and puts them back after
(docs/kmod.md).
"""

import time

import pyte
import pytest

from frontends.console import COLS, ROWS, cursor_of, render_row
from testbed.consolestack import ConsoleStack
from testbed.stack import build_rsdrv

RESET = b"\x1bc"      # RIS: the terminal as it started, screen cleared, cursor home


@pytest.fixture(scope="module")
def rsdrv_ko(tmp_path_factory):
    return build_rsdrv(str(tmp_path_factory.mktemp("rsdrv")))


@pytest.fixture(scope="module")
def stack(testbed, rsdrv_ko):
    s = ConsoleStack(testbed, rsdrv_ko)
    s.start()
    yield s
    s.stop()


class Model:
    """What the screen must show: a terminal fed what the tty's output side passes
    on (ONLCR: each \\n is \\r\\n), from the last reset."""

    def __init__(self):
        self.screen = pyte.Screen(COLS, ROWS)
        self.stream = pyte.ByteStream(self.screen)

    def feed(self, data):
        self.stream.feed(data.replace(b"\n", b"\r\n"))

    def cells(self):
        out = []
        for y in range(ROWS):
            row = render_row(self.screen, y)
            out.append([(row[2 * x], row[2 * x + 1]) for x in range(COLS)])
        return out

    def cursor(self):
        return cursor_of(self.screen)


def write_tty(stack, data, name="out", tty=None):
    """Write data to the console's tty from a program in the guest; return how many
    bytes the front end has read in total once it has these."""
    before = stack.frontend_status()["bytes_in"]
    path = "/tmp/console-%s.bin" % name
    stack.testbed.write_file(path, data)
    stack.sh("cat %s > %s" % (path, tty or stack.tty)).check()
    return before + len(data) + data.count(b"\n")


def assert_screen_is(stack, model):
    """The screen as it is after the last wait_settled."""
    got = stack.vga_cells()
    want = model.cells()
    diff = [(y, x, got[y][x], want[y][x]) for y in range(ROWS) for x in range(COLS) if got[y][x] != want[y][x]]
    assert not diff, "%d cells differ, first: %s\nscreen:\n%s" % (len(diff), diff[:8], "\n".join(stack.vga_text()))
    assert stack.settled_display["cursor"] == model.cursor()


def show(stack, data, name="out"):
    model = Model()
    model.feed(RESET + data)
    stack.wait_settled(bytes_in=write_tty(stack, RESET + data, name))
    return model


def test_display_driver_runs_unprivileged_with_only_its_ranges(stack):
    st = stack.status("vga0")
    assert st["state"] == "up"
    proc = stack.sh("cat /proc/%d/status" % st["pid"]).stdout
    fields = dict(line.split(":\t", 1) for line in proc.splitlines() if ":\t" in line)
    assert "0" not in fields["Uid"].split(), fields["Uid"]
    for cap in ("CapEff", "CapPrm", "CapBnd"):
        assert fields[cap].strip() == "0000000000000000", (cap, fields[cap])
    assert fields["NoNewPrivs"].strip() == "1"
    ep = stack.endpoint_info("vga0")
    assert "sealed" in ep and "io 0x3d4-0x3d5" in ep and "mem 0xb8000-0xb8fff" in ep, ep
    assert "irq" not in ep.replace("irqs 0", ""), ep
    fe = stack.status("console0")
    fe_proc = stack.sh("cat /proc/%d/status" % fe["pid"]).stdout
    assert "Uid:\t65534" in fe_proc


def test_text_appears_in_the_vga_buffer_with_the_cursor_where_pyte_says(stack):
    model = show(stack, b"hello, console\nsecond line\n\tafter a tab", "text")
    text = stack.vga_text()
    assert text[0] == "hello, console" and text[1] == "second line", text[:3]
    assert_screen_is(stack, model)
    assert model.cursor() == [2, 19]
    # what the driver reads back from the buffer is what QEMU holds
    read = stack.sh("python -c 'import sys; from libdrv.drvlink import DriverLink; "
                    "sys.stdout.buffer.write(DriverLink(sys.argv[1]).call(\"read\")[\"cells\"])' %s/svc/vga0.sock"
                    % stack.env["RSD_RUNTIME_DIR"]).stdout_bytes
    assert [tuple(read[i:i + 2]) for i in range(0, 160, 2)] == stack.vga_cells()[0]
    # a cursor move alone reaches the CRT controller
    moved = b"\x1b[10;40H"
    model.feed(moved)
    stack.wait_settled(bytes_in=write_tty(stack, moved, "move"))
    assert stack.settled_display["cursor"] == [9, 39]


def test_sgr_colours_give_the_attribute_bytes(stack):
    model = show(stack, b"\x1b[31mred\x1b[0m \x1b[1;32mbright green\x1b[0m \x1b[44;33mbrown on blue\x1b[0m "
                        b"\x1b[7mreverse\x1b[0m \x1b[5mblink\x1b[0m \x1b[38;5;196mx256\x1b[0m", "sgr")
    row = stack.vga_cells()[0]
    assert row[0] == (ord("r"), 0x04)            # red on black
    assert row[4] == (ord("b"), 0x0A)            # bold: bright green
    assert row[17] == (ord("b"), 0x16)           # brown (VGA 6) on blue (1)
    assert row[31] == (ord("r"), 0x70)           # reverse: black on light grey
    assert row[39] == (ord("b"), 0x87)           # blink bit
    assert row[45] == (ord("x"), 0x04)           # 256-colour ff0000: the nearest of the 16 is red
    assert_screen_is(stack, model)


def test_scrolling_and_only_changed_cells_are_written(stack):
    lines = b"".join(b"line %03d %s\n" % (i, b"=" * (i % 50)) for i in range(60))
    model = show(stack, lines, "scroll")
    assert_screen_is(stack, model)
    before = stack.settled_display
    # the same screen again: every row is sent, no cell differs, none is written
    same = b"\x1b[H" + b"".join(model.screen.display[y].rstrip().encode() + b"\x1b[K\r\n"
                                for y in range(ROWS - 1)) + model.screen.display[ROWS - 1].rstrip().encode()
    model.feed(same)
    stack.wait_settled(bytes_in=write_tty(stack, same, "same"))
    after = stack.settled_display
    assert after["updates"] > before["updates"]
    assert after["cells_written"] - before["cells_written"] <= 1, (before, after)
    assert_screen_is(stack, model)


def writer_script(path, chunks, pause):
    return ("import os, time\n"
            "fd = os.open(%r, os.O_WRONLY)\n"
            "for c in %r:\n"
            "    os.write(fd, c)\n"
            "    time.sleep(%r)\n"
            "open('/tmp/console-writer.done', 'w').close()\n") % (path, chunks, pause)


def test_display_driver_crashed_mid_output_repaints_the_exact_screen(stack):
    chunks = [RESET] + [b"\x1b[3%dmrow %03d \x1b[1mbold\x1b[0m %s\n" % (i % 8, i, b"#" * (i % 40))
                        for i in range(120)] + [b"\x1b[12;30H\x1b[45mfinal\x1b[0m"]
    model = Model()
    for c in chunks:
        model.feed(c)
    total = stack.frontend_status()["bytes_in"] + sum(len(c) + c.count(b"\n") for c in chunks)
    stack.testbed.write_file("/tmp/console-writer.py", writer_script(stack.tty, chunks, 0.03).encode())
    before = stack.status("vga0")
    fe_before = stack.frontend_status()
    stack.sh("rm -f /tmp/console-writer.done; setsid python /tmp/console-writer.py "
             "< /dev/null > /tmp/console-writer.log 2>&1 &").check()
    time.sleep(1.5)
    stack.rsctl("fi", "vga0", "--crash").check()
    stack.wait_for("[ -e /tmp/console-writer.done ]", "the writer to finish", timeout=60)
    after = stack.wait_up("vga0", before["generation"])
    assert after["last_failure"]["reason"] == "signal"
    fe = stack.wait_settled(bytes_in=total, timeout=60)
    assert fe["display_restarts"] == fe_before["display_restarts"] + 1
    assert fe["repaints"] >= fe_before["repaints"] + 1
    assert_screen_is(stack, model)


def test_display_driver_hung_is_replaced_and_the_screen_repainted(stack):
    model = show(stack, b"\x1b[33mbefore the hang\x1b[0m\n", "hang1")
    before = stack.status("vga0")
    stack.rsctl("fi", "vga0", "--hang").check()
    more = b"\x1b[36mwritten while it hung\x1b[0m\n"
    model.feed(more)
    total = write_tty(stack, more, "hang2")
    after = stack.wait_up("vga0", before["generation"], timeout=30)
    assert after["last_failure"]["reason"] == "no-heartbeat"
    stack.wait_settled(bytes_in=total)
    assert_screen_is(stack, model)


BAD_CLIENT = r"""
import sys
from libdrv.drvlink import DriverLink, DriverRefused
d = DriverLink(sys.argv[1])
def attempt(op, **fields):
    try:
        d.call(op, **fields); print("ALLOWED", op, fields)
    except DriverRefused as e:
        print("refused:", e)
attempt("open")
attempt("update", cells=[[0, 0, b"A\x07"]])
"""

BAD_OWNER = r"""
import sys
from libdrv.drvlink import DriverLink, DriverRefused
d = DriverLink(sys.argv[1])
d.call("open")
for fields in ({"cells": [[25, 0, b"A\x07"]]}, {"cells": [[0, 79, b"A\x07B\x07"]]},
               {"cells": [[0, 0, b"A"]]}, {"cells": [[0, 0, "text"]]}, {"cells": "x"},
               {"cells": [], "cursor": [0, 80]}, {"cells": [], "cursor": [True, 0]},
               {"cells": [[0, 0, b"Z\x4f"], [99, 0, b"A\x07"]]}):
    try:
        d.call("update", **fields); print("ALLOWED", fields)
    except DriverRefused as e:
        print("refused:", e)
"""


def test_hostile_clients_are_refused_whole_and_the_driver_carries_on(stack):
    show(stack, b"untouched", "hostile")
    before = stack.status("vga0")
    sock = "%s/svc/vga0.sock" % stack.env["RSD_RUNTIME_DIR"]
    stack.testbed.write_file("/tmp/console-bad-client.py", BAD_CLIENT.encode())
    stack.testbed.write_file("/tmp/console-bad-owner.py", BAD_OWNER.encode())
    # While the front end draws, nobody else may.
    lines = stack.sh("python /tmp/console-bad-client.py %s" % sock).stdout.splitlines()
    assert len(lines) == 2 and "drawn by another connection" in lines[0] and "send open first" in lines[1], lines
    # With the front end stopped, a hostile owner's malformed updates are refused whole.
    stack.rsctl("down", "console0").check()
    try:
        lines = stack.sh("python /tmp/console-bad-owner.py %s" % sock).stdout.splitlines()
        assert len(lines) == 8 and all(line.startswith("refused:") for line in lines), lines
        assert "off the 80x25 screen" in lines[0] and "within the row" in lines[1], lines
        assert "cursor must be" in lines[5] and "cursor must be" in lines[6], lines
        # the last request's first run was valid: nothing of it was written
        assert stack.vga_cells()[0][0] == (ord("u"), 0x07)
    finally:
        stack.rsctl("reload").check()
    after = stack.status("vga0")
    assert (after["pid"], after["generation"]) == (before["pid"], before["generation"])
    stack.wait_for("rsctl status console0 --json | grep -q '\"up\"'", "the front end to be back")
    stack.wait_settled()
    model = show(stack, b"mine again", "hostile2")
    assert_screen_is(stack, model)


def test_a_driver_reaching_outside_its_ranges_is_refused(stack):
    try:
        out = stack.run_reach_outside()
        assert "inb(0x3cf) inside the entry: ok" in out and "map 0xb9000 inside the entry: ok" in out, out
        for what in ("inb(0x3d5) outside the entry", "outb(0x3d4) outside the entry",
                     "map 0xb8000 outside the entry", "map 0xb9000+0x2000 past the entry"):
            assert "%s: refused" % what in out, out
        assert "ALLOWED" not in out, out
    finally:
        stack.rsctl("down", "reach")


# -- the keyboard ------------------------------------------------------------------------------------

def type_keys(stack, *keys):
    """Each item a qcode or a list of qcodes pressed together; one after the other,
    each released before the next is pressed."""
    for k in keys:
        stack.testbed.qmp.sendkey(k if isinstance(k, list) else [k], hold_time_ms=40)
        time.sleep(0.15)


def start_line_reader(stack, name):
    out = "/tmp/console-keys-%s" % name
    stack.sh("rm -f %s; setsid sh -c 'head -n 1 %s > %s.part && mv %s.part %s' < /dev/null > /dev/null 2>&1 &"
             % (out, stack.tty, out, out, out)).check()
    time.sleep(0.5)
    return out


def read_line(stack, out, timeout=30):
    stack.wait_for("[ -e %s ]" % out, "a line typed on the keyboard", timeout=timeout)
    return stack.testbed.read_file(out)


def test_keyboard_driver_runs_unprivileged_with_only_its_ports_and_irq(stack):
    st = stack.status("kbd0")
    proc = stack.sh("cat /proc/%d/status" % st["pid"]).stdout
    fields = dict(line.split(":\t", 1) for line in proc.splitlines() if ":\t" in line)
    assert "0" not in fields["Uid"].split(), fields["Uid"]
    assert fields["CapEff"].strip() == "0000000000000000"
    ep = stack.endpoint_info("kbd0")
    assert "sealed" in ep and "0x60" in ep and "0x64" in ep and "irq 1" in ep, ep
    # the module took the kernel's ownerless "keyboard" placeholders for the grant
    assert "took-placeholder keyboard 0x60-0x60" in ep and "took-placeholder keyboard 0x64-0x64" in ep, ep
    ioports = stack.sh("cat /proc/ioports").stdout
    assert "0060-0060 : rsdrv:kbd0" in ioports and "0064-0064 : rsdrv:kbd0" in ioports, ioports
    assert "keyboard" not in ioports, ioports
    assert "mem" not in ep.replace("mem 0", "").replace("mems 0", ""), ep
    kbd = stack.driver_status("kbd0")
    assert kbd["scancode_set"] in (1, 2) and kbd["counters"]["leds_set"] >= 1, kbd


def test_keys_sent_with_sendkey_reach_a_program_reading_the_tty(stack):
    show(stack, b"", "keys")
    out = start_line_reader(stack, "hello")
    type_keys(stack, ["shift", "h"], "e", "l", "l", "o", "spc", "4", "2", ["shift", "1"],
              "spc", ["shift", "minus"], "ret")
    assert read_line(stack, out) == b"Hello 42! _\n"
    # the tty echoed it: the screen shows what was typed
    stack.wait_settled()
    assert "Hello 42! _" in stack.vga_text()
    fe = stack.frontend_status()
    assert not any(fe["mods"].values()), fe["mods"]


def test_keyboard_driver_crashed_leaves_no_modifier_stuck_and_keeps_the_locks(stack):
    before = stack.status("kbd0")
    fe_before = stack.frontend_status()
    type_keys(stack, "caps_lock")
    out = start_line_reader(stack, "caps")
    type_keys(stack, "a", "ret")
    assert read_line(stack, out) == b"A\n"
    assert stack.driver_status("kbd0")["locks"]["caps"] is True
    # Shift goes down, the driver dies while it is held, the release comes after.
    stack.testbed.qmp.sendkey(["shift"], hold_time_ms=4000)
    time.sleep(0.8)
    stack.rsctl("fi", "kbd0", "--crash").check()
    after = stack.wait_up("kbd0", before["generation"])
    assert after["last_failure"]["reason"] == "signal"
    time.sleep(4.0)
    deadline = time.monotonic() + 30
    while stack.frontend_status()["keyboard_restarts"] != fe_before["keyboard_restarts"] + 1:
        assert time.monotonic() < deadline, "the front end did not see the keyboard driver restart"
        time.sleep(0.5)
    kbd = stack.driver_status("kbd0")
    assert kbd["locks"]["caps"] is True, kbd          # restored from DS by the new incarnation
    assert not any(kbd["mods"].values()), kbd
    out = start_line_reader(stack, "after")
    type_keys(stack, "a", "b", "ret")                  # shift stuck with caps on would give "ab"
    assert read_line(stack, out) == b"AB\n"
    type_keys(stack, "caps_lock")
    out = start_line_reader(stack, "nocaps")
    type_keys(stack, "c", ["shift", "d"], "ret")
    assert read_line(stack, out) == b"cD\n"
    fe = stack.frontend_status()
    assert not any(fe["mods"].values()) and fe["locks"]["caps"] is False, fe


def test_alt_f2_shows_the_second_console_and_alt_f1_the_first_as_it_was(stack):
    first = show(stack, b"\x1b[32mconsole zero\x1b[0m\nstays", "vc0")
    second = Model()
    second.feed(RESET + b"\x1b[35mconsole one\x1b[0m\n\x1b[5;5Hhere")
    stack.wait_settled(bytes_in=write_tty(stack, RESET + b"\x1b[35mconsole one\x1b[0m\n\x1b[5;5Hhere",
                                          "vc1", tty=stack.tty1))
    assert_screen_is(stack, first)                  # written while hidden: not on the screen
    try:
        type_keys(stack, ["alt", "f2"])
        deadline = time.monotonic() + 20
        while stack.frontend_status()["active"] != 1:
            assert time.monotonic() < deadline, "Alt-F2 did not switch consoles"
            time.sleep(0.3)
        stack.wait_settled()
        assert_screen_is(stack, second)
        # typing goes to the console on the screen
        out = "/tmp/console-keys-vc1"
        stack.sh("rm -f %s; setsid sh -c 'head -n 1 %s > %s.part && mv %s.part %s' < /dev/null > /dev/null 2>&1 &"
                 % (out, stack.tty1, out, out, out)).check()
        time.sleep(0.5)
        type_keys(stack, "o", "k", "ret")
        assert read_line(stack, out) == b"ok\n"
    finally:
        type_keys(stack, ["alt", "f1"])
    deadline = time.monotonic() + 20
    while stack.frontend_status()["active"] != 0:
        assert time.monotonic() < deadline, "Alt-F1 did not switch back"
        time.sleep(0.3)
    stack.wait_settled()
    assert_screen_is(stack, first)


def test_a_full_screen_program_draws_and_exits_cleanly(stack):
    show(stack, b"", "less")
    stack.sh("rm -f /tmp/console-less.rc; setsid sh -c 'TERM=linux LESSHISTFILE=- less -c /etc/passwd "
             "< %s > %s 2>&1; echo $? > /tmp/console-less.rc' < /dev/null > /dev/null 2>&1 &"
             % (stack.tty, stack.tty)).check()
    first = stack.testbed.read_file("/etc/passwd").decode().splitlines()[0][:COLS]
    deadline = time.monotonic() + 30
    while first not in stack.vga_text()[0]:
        assert time.monotonic() < deadline, "less did not draw:\n%s" % "\n".join(stack.vga_text())
        time.sleep(0.5)
    type_keys(stack, "spc")                 # a page down redraws the whole screen
    deadline = time.monotonic() + 30
    while first in stack.vga_text()[0]:
        assert time.monotonic() < deadline, "less did not page:\n%s" % "\n".join(stack.vga_text())
        time.sleep(0.5)
    type_keys(stack, "q")
    stack.wait_for("[ -s /tmp/console-less.rc ]", "less to exit", timeout=30)
    assert stack.testbed.read_file("/tmp/console-less.rc").strip() == b"0"
    st = stack.wait_settled()
    assert st["refused"] == 0



def wait_until(what, predicate, timeout=30):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("not within %d s: %s" % (timeout, what))
        time.sleep(0.3)


def test_the_kernel_console_keeps_off_while_vga0_runs_and_gets_the_display_back_when_it_goes(stack):
    """policy.d/vtcon-follow: the kernel's VT in graphics mode while vga0 runs, still after a
    crash, back in text mode (and drawing) after `rsctl down vga0`, taken again when vga0 is back."""
    assert not stack.kernel_draws(), "the kernel's console is in text mode while vga0 draws"
    before = stack.status("vga0")
    stack.rsctl("fi", "vga0", "--crash").check()
    up = stack.wait_up("vga0", before["generation"])
    assert not stack.kernel_draws(), "a crash gave the display back to the kernel"
    stack.rsctl("down", "vga0").check()
    wait_until("the kernel's console in text mode after rsctl down vga0", stack.kernel_draws)
    # the kernel draws on the display again: what its VT prints is in the text buffer
    stack.sh("printf '\\033[H\\033[2Jthe-kernel-has-the-screen\\n' > /dev/tty1").check()
    wait_until("the kernel's text in the VGA buffer", lambda: "the-kernel-has-the-screen" in stack.vga_text())
    stack.rsctl("reload").check()
    wait_until("vga0 up again", lambda: stack.status("vga0")["generation"] > up["generation"]
               and stack.status("vga0")["state"] == "up", timeout=60)
    assert not stack.kernel_draws(), "vga0 is back and the kernel's console is in text mode"
    wait_until("the front end on the new vga0", lambda: stack.frontend_status()["display"] is not None)
    model = show(stack, b"the display is ours again\n", "vtcon")
    assert_screen_is(stack, model)
    log = stack.vtcon_log()
    assert "gave the display back" in log and log.count("took the display") >= 2, log

# -- the keyboard's decoding and keymap, without the device ---------------------------------------

def test_scancode_sets_1_and_2_decode_to_the_same_keys():
    from drivers.i8042.scancodes import Decoder
    set1 = [0x2A, 0x1E, 0x9E, 0xAA, 0xE0, 0x48, 0xE0, 0xC8, 0xE0, 0x2A, 0xE0, 0x37,
            0xE1, 0x1D, 0x45, 0xE1, 0x9D, 0xC5, 0x3A, 0x7F]
    set2 = [0x12, 0x1C, 0xF0, 0x1C, 0xF0, 0x12, 0xE0, 0x75, 0xE0, 0xF0, 0x75, 0xE0, 0x12, 0xE0, 0x7C,
            0xE1, 0x14, 0x77, 0xE1, 0xF0, 0x14, 0xF0, 0x77, 0x58, 0x7F]
    want = [("shift", True), ("a", True), ("a", False), ("shift", False), ("up", True), ("up", False),
            ("print", True), ("pause", True), ("caps_lock", True), (None, True)]
    for scancode_set, data in ((1, set1), (2, set2)):
        d = Decoder(scancode_set)
        got = [ev for ev in (d.feed(b) for b in data) if ev is not None]
        assert got == want, (scancode_set, got)
        assert d.unknown == 1 and not d.mid_sequence
    with pytest.raises(ValueError):
        Decoder(3)


def test_the_us_keymap_with_modifiers_and_locks():
    from frontends.console import US_KEYS, key_bytes
    none = {}
    assert key_bytes(US_KEYS, "a", none, none) == b"a"
    assert key_bytes(US_KEYS, "a", {"shift": True}, none) == b"A"
    assert key_bytes(US_KEYS, "a", none, {"caps": True}) == b"A"
    assert key_bytes(US_KEYS, "a", {"shift": True}, {"caps": True}) == b"a"
    assert key_bytes(US_KEYS, "1", none, {"caps": True}) == b"1"        # caps is for letters
    assert key_bytes(US_KEYS, "1", {"shift": True}, none) == b"!"
    assert key_bytes(US_KEYS, "c", {"ctrl": True}, none) == b"\x03"
    assert key_bytes(US_KEYS, "x", {"alt": True}, none) == b"\x1bx"
    assert key_bytes(US_KEYS, "ret", none, none) == b"\r"
    assert key_bytes(US_KEYS, "up", none, none) == b"\x1b[A"
    assert key_bytes(US_KEYS, "kp_7", none, {"num": True}) == b"7"
    assert key_bytes(US_KEYS, "kp_7", none, none) == b"\x1b[1~"
    assert key_bytes(US_KEYS, "shift", {"shift": True}, none) == b""


# Escape sequences, controls, UTF-8 (wide, combining, invalid), DEC graphics, insert mode,
# autowrap off, scrolling regions: pieces of what programs write.
FEED_PIECES = [b"hello", b"x" * 90, b"\r\n", b"\n", b"\r", b"\t", b"\x08", b"\x07", b"\x0b", b"\x0c",
               b"\x1b[31m", b"\x1b[1;44m", b"\x1b[0m", b"\x1b[7m", b"\x1b[4h", b"\x1b[4l", b"\x1b[?7l",
               b"\x1b[?7h", b"\x1b[5;10H", b"\x1b[2J", b"\x1b[K", b"\x1b[3@", b"\x1b[2P", b"\x1b[5;20r",
               b"\x1b[r", b"\x1bM", b"\x1b(0lqqk\x1b(B", b"\x0e", b"\x0f", "\u00e9".encode(),
               "\u6f22\u5b57".encode(), "e\u0301".encode(), b"\xff\xfe", b"\x00", b"\x7f",
               b"\x1b]0;title\x07", b"\x1b[38;5;196m", b"\x1b[?25l", b"\x1b[?25h", b"\x1b[6n", b"\x1bc",
               b"\x1b[80G", b"\x1b%@", b"\x1b%G", "\u200b".encode(), "\u0301".encode(), b"\x1b[10;1H"]


def test_the_compiled_feed_draws_exactly_what_pyte_draws():
    """frontends/_console_feed: 2000 random streams, cut into random chunks, give the
    same cells, cursor, dirty lines, modes and parser state as pyte's own feed and draw."""
    import random
    from frontends import _console_feed
    from frontends.console import ConsoleScreen, cell_of

    def run(compiled, chunks):
        screen = ConsoleScreen(COLS, ROWS, lambda data: None) if compiled else pyte.Screen(COLS, ROWS)
        screen.write_process_input = lambda data: None
        stream = pyte.ByteStream(screen)
        dirty = []
        for chunk in chunks:
            _console_feed.feed(stream, chunk) if compiled else stream.feed(chunk)
            dirty.append(sorted(screen.dirty))
            screen.dirty.clear()
        cells = [[screen.buffer[y][x] for x in range(COLS)] for y in range(ROWS)]
        for y in range(ROWS):
            assert render_row(screen, y) == b"".join(cell_of(screen.buffer[y][x]) for x in range(COLS))
        return (cells, (screen.cursor.x, screen.cursor.y, screen.cursor.hidden), screen.cursor.attrs,
                dirty, set(screen.mode), stream._taking_plain_text)

    rnd = random.Random(7)
    for trial in range(2000):
        data = b"".join(rnd.choice(FEED_PIECES) for _ in range(rnd.randint(1, 60)))
        cuts = sorted(rnd.sample(range(len(data) + 1), min(len(data) + 1, rnd.randint(0, 6))))
        chunks = [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]
        assert run(True, chunks) == run(False, chunks), (trial, chunks)


def test_the_display_driver_finds_the_runs_of_differing_cells():
    """drivers/vga/_cells: the runs of whole cells that differ, as a cell-by-cell look finds them."""
    import random
    from drivers.vga._cells import differing_runs

    def by_cell(copy, data):
        runs, i = [], 0
        while i < len(data):
            if copy[i:i + 2] == data[i:i + 2]:
                i += 2
                continue
            j = i + 2
            while j < len(data) and copy[j:j + 2] != data[j:j + 2]:
                j += 2
            runs.append((i, j))
            i = j
        return runs

    rnd = random.Random(3)
    for trial in range(3000):
        n = 2 * rnd.randint(0, 100)
        copy = bytes(rnd.choice(b"ab") for _ in range(n))
        data = bytes(rnd.choice(b"ab") for _ in range(n))
        assert differing_runs(copy, data, 2) == by_cell(copy, data), (copy, data)
    with pytest.raises(ValueError):
        differing_runs(b"ab", b"abc", 2)
