"""The console front end: a terminal on the VGA text screen and the PS/2 keyboard,
that owns the screen and survives both drivers.

    python -m frontends.console --label console0 --display vga0 [--keyboard kbd0] [--consoles 4]
                                [--link PATH] [--mode 0620] [--group tty] [--keymap FILE]

Programs open a pty slave through a stable symlink (default
$RSD_RUNTIME_DIR/tty/<label>) with TERM=linux-class expectations (see TERM
below).  What they write is fed to a pyte terminal emulator; the lines it marks
dirty are sent to the display driver ($RSD_RUNTIME_DIR/svc/<display>.sock) as
runs of VGA cells (character in CP437, attribute byte), with the cursor.  Key
events from the keyboard driver become bytes for the pty through a US keymap.
With --consoles N there are N virtual consoles, each its own pty and terminal
(console0, console1, ...), and Alt-F1..Alt-FN shows one of them.

The screen state is ours: when the display driver dies nothing is lost, updates
wait, and when DS says drv.chr.<display> is up again the new incarnation is sent
the whole screen (cells, colours, cursor).  When the keyboard driver dies, keys
it had not reported are lost; the modifiers it held are forgotten, so none
stays stuck.
"""

import argparse
import errno
import fcntl
import functools
import grp
import json
import logging
import os
import struct
import sys
import termios
import time

import pyte

from frontends import _console_feed
from libdrv.drvlink import DriverLink, DriverRefused
from libdrv.dsclient import DSClient, DSError
from libdrv.sef import SEF
from libdrv.svcstate import parse_drv

log = logging.getLogger("console")

# pyte emulates a VT220-class terminal with the Linux console's SGR colours;
# TERM=linux draws correctly with it except for what pyte does not model
# (docs/console.md).
TERM = "linux"
COLS, ROWS = 80, 25
TICK = 0.05
STATUS_INTERVAL = 0.5
MAX_IN_FLIGHT = 2          # updates sent and not answered: beyond, dirty lines wait and merge
READ_CHUNK = 64 << 10
READ_BUDGET = 1 << 20      # bytes read and fed to the terminal before the screen is sent
IUTF8 = getattr(termios, "IUTF8", 0o40000)   # Linux's value; Python's termios lacks the name

# pyte colour names -> VGA palette index (the default palette's order)
VGA_COLOURS = {"black": 0, "blue": 1, "green": 2, "cyan": 3, "red": 4, "magenta": 5,
               "brown": 6, "white": 7}
VGA_RGB = [(0, 0, 0), (0, 0, 170), (0, 170, 0), (0, 170, 170), (170, 0, 0), (170, 0, 170),
           (170, 85, 0), (170, 170, 170), (85, 85, 85), (85, 85, 255), (85, 255, 85),
           (85, 255, 255), (255, 85, 85), (255, 85, 255), (255, 255, 85), (255, 255, 255)]
DEFAULT_FG, DEFAULT_BG = 7, 0


def _cp437_table():
    table = {}
    for b in range(0x20, 0x100):
        table.setdefault(bytes([b]).decode("cp437"), b)
    return table


CP437 = _cp437_table()
UNKNOWN_GLYPH = ord("?")


def colour_index(name, default):
    """A pyte colour (a name, 'brightNAME', or 'rrggbb' from 256/true colour) -> 0..15."""
    if name == "default":
        return default
    bright = name.startswith("bright")
    base = name[6:] if bright else name
    if base in VGA_COLOURS:
        return VGA_COLOURS[base] | (8 if bright else 0)
    try:
        r, g, b = int(name[0:2], 16), int(name[2:4], 16), int(name[4:6], 16)
    except ValueError:
        return default
    return min(range(16), key=lambda i: sum((x - y) ** 2 for x, y in zip(VGA_RGB[i], (r, g, b))))


def attribute(ch):
    """The VGA attribute byte for a pyte Char: as the Linux console does it, reverse
    swaps the colours and bold brightens the foreground; blink sets bit 7."""
    fg = colour_index(ch.fg, DEFAULT_FG)
    bg = colour_index(ch.bg, DEFAULT_BG)
    if ch.reverse:
        fg, bg = bg, fg
    if ch.bold:
        fg |= 8
    return fg | (bg & 7) << 4 | (0x80 if ch.blink else 0)


def glyph(ch):
    return CP437.get(ch.data, UNKNOWN_GLYPH) if ch.data else 0x20


@functools.lru_cache(maxsize=8192)
def cell_of(ch):
    """A pyte Char as one VGA cell; cached: a screen has few distinct ones."""
    return bytes((glyph(ch), attribute(ch)))


def render_row(screen, y):
    """One screen line as VGA cells (character, attribute pairs), compiled."""
    return _console_feed.render_row(screen, y, cell_of)


def cursor_of(screen):
    c = screen.cursor
    if c.hidden:
        return None
    return [min(c.y, screen.lines - 1), min(c.x, screen.columns - 1)]


# -- the keymap: key names the keyboard driver reports -> bytes --------------------------
US_KEYS = {   # name: (plain, shifted)
    "1": ("1", "!"), "2": ("2", "@"), "3": ("3", "#"), "4": ("4", "$"), "5": ("5", "%"),
    "6": ("6", "^"), "7": ("7", "&"), "8": ("8", "*"), "9": ("9", "("), "0": ("0", ")"),
    "minus": ("-", "_"), "equal": ("=", "+"), "bracket_left": ("[", "{"), "bracket_right": ("]", "}"),
    "semicolon": (";", ":"), "apostrophe": ("'", '"'), "grave_accent": ("`", "~"),
    "backslash": ("\\", "|"), "comma": (",", "<"), "dot": (".", ">"), "slash": ("/", "?"),
    "spc": (" ", " "), "tab": ("\t", "\t"), "ret": ("\r", "\r"), "backspace": ("\x7f", "\x7f"),
    "esc": ("\x1b", "\x1b"),
}
for _c in "abcdefghijklmnopqrstuvwxyz":
    US_KEYS[_c] = (_c, _c.upper())
SPECIAL_KEYS = {   # the Linux console's sequences (TERM=linux)
    "up": "\x1b[A", "down": "\x1b[B", "right": "\x1b[C", "left": "\x1b[D",
    "home": "\x1b[1~", "insert": "\x1b[2~", "delete": "\x1b[3~", "end": "\x1b[4~",
    "pgup": "\x1b[5~", "pgdn": "\x1b[6~",
    "f1": "\x1b[[A", "f2": "\x1b[[B", "f3": "\x1b[[C", "f4": "\x1b[[D", "f5": "\x1b[[E",
    "f6": "\x1b[17~", "f7": "\x1b[18~", "f8": "\x1b[19~", "f9": "\x1b[20~", "f10": "\x1b[21~",
    "f11": "\x1b[23~", "f12": "\x1b[24~",
    "kp_enter": "\r", "kp_divide": "/", "kp_multiply": "*", "kp_subtract": "-", "kp_add": "+",
}
KEYPAD_NUM = {"kp_0": ("0", "\x1b[2~"), "kp_1": ("1", "\x1b[4~"), "kp_2": ("2", "\x1b[B"),
              "kp_3": ("3", "\x1b[6~"), "kp_4": ("4", "\x1b[D"), "kp_5": ("5", "\x1b[G"),
              "kp_6": ("6", "\x1b[C"), "kp_7": ("7", "\x1b[1~"), "kp_8": ("8", "\x1b[A"),
              "kp_9": ("9", "\x1b[5~"), "kp_decimal": (".", "\x1b[3~")}
SWITCH_KEYS = {"f%d" % (i + 1): i for i in range(12)}   # Alt-F1.. switch consoles
MAX_CONSOLES = 12
MODIFIERS = ("shift", "ctrl", "alt")
LOCKS = ("caps", "num", "scroll")


def load_keymap(path):
    """A keymap file: JSON {"keys": {name: [plain, shifted]}}; replaces US_KEYS entries."""
    with open(path) as f:
        doc = json.load(f)
    keys = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(keys, dict):
        raise ValueError("%s: expected {\"keys\": {name: [plain, shifted]}}" % path)
    out = dict(US_KEYS)
    for name, pair in keys.items():
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(s, str) and len(s) <= 8
                                                                  for s in pair)):
            raise ValueError("%s: key %r must map to [plain, shifted] strings" % (path, name))
        out[name] = tuple(pair)
    return out


def key_bytes(keymap, key, mods, locks):
    """What a key press sends to the pty, or b"" for none."""
    shift = mods.get("shift", False)
    if key in keymap:
        plain, shifted = keymap[key]
        letter = len(plain) == 1 and plain.isalpha()
        s = shifted if shift != (letter and locks.get("caps", False)) else plain
        if mods.get("ctrl") and len(s) == 1:
            c = s.upper()
            if "@" <= c <= "_":
                s = chr(ord(c) - 0x40)
            elif c == " ":
                s = "\x00"
            elif c == "?":
                s = "\x7f"
    elif key in KEYPAD_NUM:
        num, nav = KEYPAD_NUM[key]
        s = num if locks.get("num", False) != shift else nav
    elif key in SPECIAL_KEYS:
        s = SPECIAL_KEYS[key]
    else:
        return b""
    data = s.encode()
    if mods.get("alt") and data:
        data = b"\x1b" + data     # meta sends escape, as the Linux console does by default
    return data


class ConsoleScreen(pyte.Screen):
    """pyte's screen, its text drawn by the compiled path (frontends/_console_feed.pyx);
    its answers (device attributes, cursor reports) go to the program."""

    def __init__(self, cols, rows, reply):
        super().__init__(cols, rows)
        self._reply = reply

    def draw(self, data):
        _console_feed.draw(self, data)

    def write_process_input(self, data):
        self._reply(data.encode())


class Pty:
    def __init__(self, link, mode, gid, cols, rows):
        self.master, self.slave = os.openpty()   # we keep the slave open: no EIO between users
        os.set_blocking(self.master, False)
        self.path = os.ttyname(self.slave)
        os.chmod(self.path, mode)
        if gid is not None:
            os.chown(self.path, -1, gid)
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        a = termios.tcgetattr(self.slave)
        a[0] |= IUTF8
        termios.tcsetattr(self.slave, termios.TCSANOW, a)
        tmp = link + ".new"
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.symlink(self.path, tmp)
        os.rename(tmp, link)


class VirtualConsole:
    """One console: its pty, its terminal, what was typed for it and not yet taken."""

    def __init__(self, link, on_reply):
        self.link = link
        self.screen = ConsoleScreen(COLS, ROWS, on_reply)
        self.stream = pyte.ByteStream(self.screen)
        self.pty = None
        self.to_program = bytearray()
        self.bytes_in = 0

    def open(self, mode, gid):
        self.pty = Pty(self.link, mode, gid, COLS, ROWS)


def console_links(link, count):
    """The tty links of `count` consoles: link, then the same name numbered on
    (console0 -> console1, console2 ...; tty -> tty1, tty2 ...)."""
    head, name = os.path.split(link)
    stem = name.rstrip("0123456789")
    first = int(name[len(stem):]) if name != stem else 0
    return [link] + [os.path.join(head, "%s%d" % (stem, first + i)) for i in range(1, count)]


class ConsoleFrontend:
    def __init__(self, label, display, keyboard, link, runtime_dir, mode=0o620, group=None,
                 keymap=None, ds_socket=None, consoles=1):
        self.label = label
        self.display = display
        self.keyboard = keyboard
        self.link = link
        self.vcs = []
        for i, path in enumerate(console_links(link, consoles)):
            self.vcs.append(VirtualConsole(path, lambda data, i=i: self._to_program(i, data)))
        self.active = 0
        self.runtime_dir = runtime_dir
        self.mode = mode
        self.gid = grp.getgrnam(group).gr_gid if group else None
        self.keymap = keymap or US_KEYS
        self.ds = DSClient(ds_socket, reconnect=True)
        self.sef = None
        self.links = {}              # "display" | "keyboard" -> DriverLink
        self.generations = {}
        self.pending_up = {}         # role -> generation announced up, not connected yet
        self.in_flight = 0
        self.sent_cursor = "unsent"
        self.mods = {m: False for m in MODIFIERS}
        self.locks = {k: False for k in LOCKS}
        self.counters = {"switches": 0, "updates": 0, "rows_sent": 0, "repaints": 0, "refused": 0,
                         "keys": 0, "key_bytes": 0, "display_restarts": 0, "keyboard_restarts": 0,
                         "dropped_input": 0}
        self._status_due = 0.0
        self._status_key = "console.%s.status" % label
        self._roles = {"drv.chr.%s" % display: "display"}
        if keyboard:
            self._roles["drv.chr.%s" % keyboard] = "keyboard"

    @property
    def screen(self):
        """The terminal on the display: the active console's."""
        return self.vcs[self.active].screen

    def switch_to(self, index):
        if index == self.active or not 0 <= index < len(self.vcs):
            return
        self.active = index
        self.counters["switches"] += 1
        self.repaint()

    # -- drivers up / down -----------------------------------------------------------------
    def _label_of(self, role):
        return self.display if role == "display" else self.keyboard

    def driver_up(self, role, generation):
        if role in self.links and self.generations.get(role) == generation:
            return
        if role in self.links:
            self.driver_down(role, "replaced by generation %s" % generation)
        path = os.path.join(self.runtime_dir, "svc", "%s.sock" % self._label_of(role))
        try:
            link = DriverLink(path)
            info = link.call("open")
        except (OSError, ConnectionError, DriverRefused) as exc:
            log.warning("%s driver up but not usable yet (will retry): %s", role, exc)
            self.pending_up[role] = generation
            return
        self.pending_up.pop(role, None)
        if role == "display" and (info.get("cols"), info.get("rows")) != (COLS, ROWS):
            log.error("display is %rx%r, not %dx%d: not using it", info.get("cols"), info.get("rows"), COLS, ROWS)
            link.close()
            return
        self.links[role], self.generations[role] = link, generation
        self.sef.add_reader(link.sock, self._on_driver_ready, role)
        log.info("%s driver %s generation %s up", role, self._label_of(role), generation)
        if role == "display":
            self.in_flight = 0
            self.repaint()
        else:
            self._take_key_events(info.get("locks"), None)

    def driver_down(self, role, why):
        self.pending_up.pop(role, None)
        link = self.links.pop(role, None)
        if link is None:
            return
        log.warning("%s driver %s went away (%s)", role, self._label_of(role), why)
        self.sef.remove_reader(link.sock)
        link.close()
        self.counters["%s_restarts" % role] += 1
        if role == "keyboard":
            # Releases it would have reported are gone with it: no modifier stays held.
            self.mods = {m: False for m in MODIFIERS}
        else:
            self.in_flight = 0

    def repaint(self):
        """Send the whole screen, as if every line had changed, and the cursor."""
        self.screen.dirty.update(range(self.screen.lines))
        self.sent_cursor = "unsent"
        self.counters["repaints"] += 1
        self.flush()

    # -- the screen ----------------------------------------------------------------------------
    def flush(self):
        """Send the dirty lines and the cursor if the display can take an update now."""
        link = self.links.get("display")
        if link is None or self.in_flight >= MAX_IN_FLIGHT:
            return
        cursor = cursor_of(self.screen)
        if not self.screen.dirty and cursor == self.sent_cursor:
            return
        rows = sorted(y for y in self.screen.dirty if 0 <= y < self.screen.lines)
        cells = [[y, 0, render_row(self.screen, y)] for y in rows]
        try:
            link.send("update", cells=cells, cursor=cursor)
        except OSError as exc:
            self.driver_down("display", str(exc))
            return
        self.screen.dirty.clear()
        self.sent_cursor = cursor
        self.in_flight += 1
        self.counters["updates"] += 1
        self.counters["rows_sent"] += len(rows)

    def on_master(self, index):
        """Take what the programs wrote (all of it, up to READ_BUDGET), then send the
        screen once: a flood of output costs one update, not one per write."""
        vc = self.vcs[index]
        taken = 0
        while taken < READ_BUDGET:
            try:
                data = os.read(vc.pty.master, READ_CHUNK)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.EIO:
                    break
                raise
            if not data:
                break
            taken += len(data)
            vc.bytes_in += len(data)
            _console_feed.feed(vc.stream, data)
        if taken:
            if index == self.active:
                self.flush()
            else:
                vc.screen.dirty.clear()   # drawn whole when it is switched to

    def _to_program(self, index, data):
        self.vcs[index].to_program += data
        self._flush_to_program(index)

    def _flush_to_program(self, index):
        vc = self.vcs[index]
        if not vc.to_program or vc.pty is None:
            return
        try:
            n = os.write(vc.pty.master, vc.to_program)
        except (BlockingIOError, OSError):
            n = 0
        del vc.to_program[:n]
        if len(vc.to_program) > 4096:       # nobody reads the tty: typing into the void
            self.counters["dropped_input"] += len(vc.to_program) - 4096
            del vc.to_program[:len(vc.to_program) - 4096]

    # -- driver events ---------------------------------------------------------------------------
    def _on_driver_ready(self, role):
        link = self.links.get(role)
        if link is None:
            return
        try:
            events = link.read_events()
        except (OSError, ConnectionError) as exc:
            self.driver_down(role, str(exc))
            return
        if role == "display":
            for ev in events:
                if "id" in ev and "ev" not in ev:
                    self.in_flight = max(0, self.in_flight - 1)
                    if not ev.get("ok"):
                        self.counters["refused"] += 1
                        log.warning("display refused an update: %s", ev.get("msg"))
            self.flush()
        else:
            for ev in events:
                if ev.get("ev") == "key":
                    self._take_key_events(ev.get("locks"), ev)

    def _take_key_events(self, locks, ev):
        if isinstance(locks, dict):
            self.locks = {k: bool(locks.get(k)) for k in LOCKS}
        if ev is None:
            return
        key, down, mods = ev.get("key"), ev.get("down"), ev.get("mods")
        if not isinstance(key, str) or not isinstance(down, bool) or not isinstance(mods, dict):
            log.warning("ignoring a malformed key event %r", ev)
            return
        self.mods = {m: bool(mods.get(m)) for m in MODIFIERS}
        if not down:
            return
        self.counters["keys"] += 1
        target = SWITCH_KEYS.get(key)
        if target is not None and self.mods["alt"] and not self.mods["ctrl"] and target < len(self.vcs):
            self.switch_to(target)            # Alt-Fn: the console's own, not the program's
            return
        data = key_bytes(self.keymap, key, self.mods, self.locks)
        if data:
            self.counters["key_bytes"] += len(data)
            self._to_program(self.active, data)

    # -- DS ------------------------------------------------------------------------------------------
    def on_ds(self):
        try:
            notes = self.ds.get_notifications(0)
        except DSError as exc:
            log.warning("data store: %s", exc)
            return
        for n in notes:
            role = self._roles.get(n.key)
            if role is None:
                continue
            if n.event == "set":
                try:
                    state, gen = parse_drv(n.value)
                except ValueError:
                    log.warning("ignoring %s = %r", n.key, n.value)
                    continue
                if state == "up":
                    self.driver_up(role, gen)
                else:
                    self.driver_down(role, "%s = %s" % (n.key, n.value))
            elif n.event == "delete":
                self.driver_down(role, "%s deleted" % n.key)

    def status(self):
        return dict(self.counters, bytes_in=sum(vc.bytes_in for vc in self.vcs), active=self.active,
                    consoles=[{"link": vc.link, "tty": vc.pty.path if vc.pty else None, "bytes_in": vc.bytes_in}
                              for vc in self.vcs], term=TERM,
                    display=self.generations.get("display") if "display" in self.links else None,
                    keyboard=self.generations.get("keyboard") if "keyboard" in self.links else None,
                    cursor=cursor_of(self.screen), mods=self.mods, locks=self.locks,
                    in_flight=self.in_flight, dirty=len(self.screen.dirty))

    def publish_status(self):
        try:
            self.ds.publish(self._status_key, json.dumps(self.status(), sort_keys=True), overwrite=True)
        except DSError as exc:
            log.debug("status not published: %s", exc)

    # -- event loop ------------------------------------------------------------------------------------
    def start(self, sef):
        self.sef = sef
        os.makedirs(os.path.dirname(self.link), exist_ok=True)
        for i, vc in enumerate(self.vcs):
            vc.open(self.mode, self.gid)
            sef.add_reader(vc.pty.master, self.on_master, i)
        for key in self._roles:
            self.ds.subscribe(key.replace(".", r"\.").replace("-", r"\-"), initial=True)
        sef.add_reader(self.ds, self.on_ds)
        self.on_ds()
        self.tick()

    def tick(self):
        now = time.monotonic()
        for role, gen in list(self.pending_up.items()):
            self.driver_up(role, gen)
        for i in range(len(self.vcs)):
            self._flush_to_program(i)
        self.flush()
        if now >= self._status_due:
            self.publish_status()
            self._status_due = now + STATUS_INTERVAL
        if self.ds.has_notifications():
            self.on_ds()
        for role, link in list(self.links.items()):
            if link.events:
                self._on_driver_ready(role)
        self.sef.loop.call_later(TICK, self.tick)


def main(argv=None):
    runtime = os.environ.get("RSD_RUNTIME_DIR", "/run/rsd")
    p = argparse.ArgumentParser(prog="console-frontend", description="console front end (VGA text + PS/2 keyboard)")
    p.add_argument("--label", default="console0", help="the console's name: the tty link and DS status key")
    p.add_argument("--display", required=True, help="the display driver's label (drv.chr.<label>)")
    p.add_argument("--keyboard", help="the keyboard driver's label (drv.chr.<label>); none: output only")
    p.add_argument("--link", help="stable path of the tty (default RUNTIME/tty/<label>)")
    p.add_argument("--runtime-dir", default=runtime)
    p.add_argument("--mode", type=lambda s: int(s, 8), default=0o620, help="tty permissions (octal, default 0620)")
    p.add_argument("--group", help="group owning the tty (e.g. tty)")
    p.add_argument("--consoles", type=int, default=1,
                   help="virtual consoles, switched with Alt-F1..; their ttys are the link numbered on "
                        "(console0, console1, ...); default 1")
    p.add_argument("--keymap", help="a JSON keymap replacing US keys ({\"keys\": {name: [plain, shifted]}})")
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO,
                        format="console-frontend[%s]: %%(message)s" % a.label, stream=sys.stderr)
    link = a.link or os.path.join(a.runtime_dir, "tty", a.label)
    if not 1 <= a.consoles <= MAX_CONSOLES:
        p.error("--consoles must be 1..%d" % MAX_CONSOLES)
    try:
        keymap = load_keymap(a.keymap) if a.keymap else None
        fe = ConsoleFrontend(a.label, a.display, a.keyboard, link, a.runtime_dir, a.mode, a.group, keymap,
                             consoles=a.consoles)
    except (DSError, KeyError, OSError, ValueError) as exc:
        print("console-frontend: cannot start: %s" % exc, file=sys.stderr)
        return 1
    sef = SEF()
    sef.on_init_fresh(fe.start)
    sef.on_init_restart(lambda sef, reason, restarts: fe.start(sef))
    return sef.run()


if __name__ == "__main__":
    sys.exit(main())
