"""The tty front end: a serial port as a real tty that survives its driver.

    python -m frontends.tty --label serial0 [--link PATH] [--mode 0660] [--group dialout]

Applications open a pty slave through a stable symlink (default
$RSD_RUNTIME_DIR/tty/<label>) and use it as any serial tty: read, write,
stty/tcsetattr, a getty.  The front end moves bytes between the pty master
and the driver's socket ($RSD_RUNTIME_DIR/svc/<label>.sock) and applies the
tty's termios to the UART.

Recovery (MINIX character-device semantics, docs/serial.md): when the
driver dies, the current pty is hung up, so calls in flight and open files
get EIO (or EOF on read) and the application decides; a new pty with the
same settings replaces it behind the symlink at once, and its data waits
until DS says drv.chr.<label> is up again.  Bytes handed to the dead driver
but not confirmed transmitted are counted as lost (tx_lost), never resent:
part of them may already be on the wire, and a duplicate is worse than a
gap for most serial protocols.
"""

import argparse
import errno
import fcntl
import grp
import json
import logging
import os
import struct
import sys
import termios
import time

from libdrv.drvlink import DriverLink, DriverRefused, driver_news
from libdrv.dsclient import DSClient, DSError
from libdrv.sef import SEF

log = logging.getLogger("tty")

TICK = 0.05                 # housekeeping period: termios compare (stty reaches the UART), flushes
STATUS_INTERVAL = 1.0
MAX_UNCONFIRMED = 32 << 10  # bytes handed to the driver and not yet transmitted
MAX_HELD = 64 << 10         # bytes an application wrote while the driver was away

# termios speed constants -> baud
SPEEDS = {getattr(termios, "B%d" % b): b for b in (
    50, 75, 110, 134, 150, 200, 300, 600, 1200, 1800, 2400, 4800, 9600, 19200, 38400, 57600, 115200)}
BAUDS = {b: s for s, b in SPEEDS.items()}


# What a pty can carry: Linux ptys refuse (or drop) data bits and parity, so
# those are set on the driver directly (serial16550-ctl set-line) and kept.
TERMIOS_FIELDS = ("baud", "stop", "rtscts")


def termios_to_line(attrs):
    """The line settings a tty's termios expresses: speed, stop bits, RTS/CTS."""
    cflag, speed = attrs[2], attrs[5]
    return {"baud": SPEEDS.get(speed, 0), "stop": 2 if cflag & termios.CSTOPB else 1,
            "rtscts": bool(cflag & termios.CRTSCTS)}


def line_to_termios(attrs, line):
    """Return attrs changed to carry the driver's line settings."""
    attrs = list(attrs)
    cflag = attrs[2] & ~(termios.CSTOPB | termios.CRTSCTS)
    if line["stop"] == 2:
        cflag |= termios.CSTOPB
    if line["rtscts"]:
        cflag |= termios.CRTSCTS
    attrs[2] = cflag
    speed = BAUDS.get(line["baud"], termios.B115200)
    attrs[4] = attrs[5] = speed
    return attrs


class Pty:
    """One pty pair: the master we serve, the slave applications open."""

    def __init__(self, link, mode, gid, attrs=None):
        self.master, self.slave = os.openpty()
        os.set_blocking(self.master, False)
        # Packet mode tells us of flushes and flow control on the master side.
        fcntl.ioctl(self.master, termios.TIOCPKT, struct.pack("i", 1))
        self.path = os.ttyname(self.slave)
        os.chmod(self.path, mode)
        if gid is not None:
            os.chown(self.path, -1, gid)
        if attrs is not None:
            termios.tcsetattr(self.slave, termios.TCSANOW, attrs)
        else:
            # A serial line starts raw (as the kernel's 8250 does not, but as stty
            # users expect of a fresh pty behind a device): no echo, no CR/LF games.
            a = termios.tcgetattr(self.slave)
            a[0] = 0
            a[1] = 0
            a[3] = 0
            a[2] |= termios.CREAD | termios.CLOCAL
            termios.tcsetattr(self.slave, termios.TCSANOW, a)
        tmp = link + ".new"
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.symlink(self.path, tmp)
        os.rename(tmp, link)  # atomically: an open sees the old or the new pty

    def attrs(self):
        return termios.tcgetattr(self.master)  # the slave's termios, as the kernel keeps it

    def hang_up(self):
        """Close the master: the slave side is hung up, its users get EIO."""
        for fd in (self.master, self.slave):
            try:
                os.close(fd)
            except OSError:
                pass
        self.master = self.slave = -1


class TtyFrontend:
    def __init__(self, label, link, runtime_dir, mode=0o660, group=None, ds_socket=None):
        self.label = label
        self.link = link
        self.driver_path = os.path.join(runtime_dir, "svc", "%s.sock" % label)
        self.mode = mode
        self.gid = grp.getgrnam(group).gr_gid if group else None
        self.ds = DSClient(ds_socket, reconnect=True)
        self.pty = None
        self.drv = None
        self.generation = None
        self.line = None
        self.last_attrs = None
        self.unconfirmed = 0
        self.held = bytearray()      # written by the application, not yet given to the driver
        self.to_app = bytearray()    # received, not yet taken by the pty
        self.counters = {"rx_bytes": 0, "tx_accepted": 0, "tx_bytes": 0, "tx_lost": 0, "rx_dropped": 0,
                         "recoveries": 0, "hangups": 0, "termios_applied": 0, "termios_refused": 0}
        self.state = "waiting"
        self._status_due = 0.0
        self.sef = None
        self.pending_up = None       # generation announced up that we could not open yet
        self._watching = None        # the pty master fd we are reading, if any
        self._status_key = "tty.%s.status" % label

    # -- driver up / down ----------------------------------------------------------
    def driver_up(self, generation):
        if self.drv is not None and generation == self.generation:
            return
        if self.drv is not None:
            self.driver_down("replaced by generation %s" % generation)
        try:
            drv = DriverLink(self.driver_path)
            info = drv.call("open")
        except (OSError, ConnectionError, DriverRefused) as exc:
            log.warning("driver %s up but not usable yet (will retry): %s", self.label, exc)
            self.pending_up = generation
            return
        self.pending_up = None
        self.drv, self.generation = drv, generation
        self.sef.add_reader(drv.sock, self._on_driver_ready)
        if self.line is None:
            self.line = info["line"]
        else:
            # The driver restored its own backup; the tty's settings win if they differ.
            mine = {k: self.line[k] for k in TERMIOS_FIELDS}
            self.line = info["line"]
            if any(info["line"][k] != mine[k] for k in TERMIOS_FIELDS):
                self._apply_line(mine)
        if self.pty is None:
            self.pty = Pty(self.link, self.mode, self.gid, line_to_termios(self._base_attrs(), self.line))
        self.last_attrs = self.pty.attrs()
        self.state = "up"
        if self.counters["hangups"]:
            self.counters["recoveries"] += 1
        log.info("driver %s generation %s up; tty %s -> %s", self.label, generation, self.link, self.pty.path)
        self._feed_driver()

    def driver_down(self, why):
        self.pending_up = None
        if self.drv is None and self.state != "up":
            return
        log.warning("driver %s went away (%s): hanging up %s", self.label, why,
                    self.pty.path if self.pty else "-")
        if self.drv is not None:
            # What the dead driver said before it died still counts (txdone).
            try:
                while True:
                    events = self.drv.read_events()
                    if not events:
                        break
                    self._take_events(events)
            except (OSError, ConnectionError):
                pass
            self.sef.remove_reader(self.drv.sock)
            self.drv.close()
            self.drv = None
        self.counters["tx_lost"] += self.unconfirmed
        self.unconfirmed = 0
        self.state = "recovering"
        if self.pty is not None:
            attrs = self.pty.attrs()
            if self._watching is not None:
                self.sef.remove_reader(self._watching)
                self._watching = None
            # What applications already wrote is ours to account for: take it
            # out of the pty before the hang-up discards it; it goes to the
            # next incarnation.
            while len(self.held) < MAX_HELD and self._read_master():
                pass  # bounded by MAX_HELD: a writer may still be writing
            # New opens get a fresh tty with the same settings right away: the
            # link moves to it before the old one is hung up, so an open never
            # finds the link missing or pointing at a dead tty.
            old, self.pty = self.pty, Pty(self.link, self.mode, self.gid, attrs)
            old.hang_up()
            self.counters["hangups"] += 1
            self.last_attrs = attrs
        # Received for applications of the hung-up tty: they can no longer read it.
        self.counters["rx_dropped"] += len(self.to_app)
        self.to_app.clear()

    def _base_attrs(self):
        m, s = os.openpty()
        try:
            a = termios.tcgetattr(s)
        finally:
            os.close(m)
            os.close(s)
        a[0] = a[1] = a[3] = 0
        a[2] |= termios.CREAD | termios.CLOCAL
        return a

    # -- data ----------------------------------------------------------------------------
    def on_master(self):
        self._read_master()
        self._check_termios()
        self._feed_driver()

    def _read_master(self):
        """Move what applications wrote into `held`; False when nothing was there."""
        try:
            data = os.read(self.pty.master, 65536)
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno == errno.EIO:  # no slave open right now: nothing to read
                return False
            raise
        if not data:
            return False
        if data[0] == termios.TIOCPKT_DATA:
            self.counters["tx_accepted"] += len(data) - 1
            self.held += data[1:]
            if len(self.held) > MAX_HELD:
                # Only reachable while the driver is away; the pty's own buffer
                # pushes back on writers otherwise (we stop reading it).
                self.counters["tx_lost"] += len(self.held) - MAX_HELD
                del self.held[:len(self.held) - MAX_HELD]
        return True

    def _feed_driver(self):
        if self.drv is None:
            return
        while self.held and self.unconfirmed < MAX_UNCONFIRMED:
            chunk = bytes(self.held[:min(len(self.held), MAX_UNCONFIRMED - self.unconfirmed, 16384)])
            try:
                n = self.drv.call("write", data=chunk)["n"]
            except DriverRefused:
                break  # queue full: txdone events will make room
            except (OSError, ConnectionError) as exc:
                self.driver_down(str(exc))
                return
            del self.held[:n]
            self.unconfirmed += n

    def _on_driver_ready(self):
        if self.drv is not None:
            self.on_driver()
            self._watch_fds()

    def on_driver(self):
        try:
            events = self.drv.read_events()
        except (OSError, ConnectionError) as exc:
            self.driver_down(str(exc))
            return
        self._take_events(events)
        self._flush_to_app()
        self._feed_driver()

    def _take_events(self, events):
        for ev in events:
            kind = ev.get("ev")
            if kind == "rx":
                self.counters["rx_bytes"] += len(ev["data"])
                self.to_app += ev["data"]
            elif kind == "txdone":
                self.unconfirmed = max(0, self.unconfirmed - ev["n"])
                self.counters["tx_bytes"] += ev["n"]

    def _flush_to_app(self):
        if not self.to_app or self.pty is None:
            return
        try:
            n = os.write(self.pty.master, self.to_app)
        except BlockingIOError:
            n = 0
        except OSError:
            n = 0
        del self.to_app[:n]
        if len(self.to_app) > MAX_HELD:
            self.counters["rx_dropped"] += len(self.to_app) - MAX_HELD
            del self.to_app[:len(self.to_app) - MAX_HELD]

    # -- termios ----------------------------------------------------------------------------
    def _check_termios(self):
        if self.pty is None:
            return
        attrs = self.pty.attrs()
        if attrs == self.last_attrs:
            return
        self.last_attrs = attrs
        wanted = termios_to_line(attrs)
        if all(self.line.get(k) == wanted[k] for k in TERMIOS_FIELDS):
            return
        if wanted["baud"] == 0:
            self.counters["termios_refused"] += 1
            log.warning("tty speed not supported by the UART; keeping %s", self.line)
            return
        self.line = dict(self.line, **wanted)
        if self.drv is not None:
            self._apply_line(wanted)

    def _apply_line(self, fields):
        try:
            self.line = self.drv.call("set_line", **fields)["line"]
            self.counters["termios_applied"] += 1
        except DriverRefused as exc:
            self.counters["termios_refused"] += 1
            log.warning("driver refused %s: %s", fields, exc)
        except (OSError, ConnectionError) as exc:
            self.driver_down(str(exc))

    # -- DS --------------------------------------------------------------------------------
    def on_ds(self):
        for what, detail in driver_news(self.ds, "chr", self.label, log):
            if what == "up":
                self.driver_up(detail)
            else:
                self.driver_down(detail)

    def publish_status(self):
        status = dict(self.counters, state=self.state, tty=self.pty.path if self.pty else None,
                      link=self.link, generation=self.generation, line=self.line,
                      unconfirmed=self.unconfirmed, held=len(self.held))
        try:
            self.ds.publish(self._status_key, json.dumps(status, sort_keys=True), overwrite=True)
        except DSError as exc:
            log.debug("status not published: %s", exc)

    # -- event loop (libdrv SEF: rsd supervises the front end too) -----------------
    def start(self, sef):
        """Init callback: subscribe to the driver's state and open the tty."""
        self.sef = sef
        os.makedirs(os.path.dirname(self.link), exist_ok=True)
        self.ds.subscribe(r"drv\.chr\.%s" % self.label.replace("-", r"\-"), initial=True)
        sef.add_reader(self.ds, self.on_ds)
        self.on_ds()
        if self.pty is None:
            # Until the driver is first up, the tty exists with default settings.
            self.line = self.line or {"baud": 115200, "bits": 8, "parity": "none", "stop": 1, "rtscts": False}
            self.pty = Pty(self.link, self.mode, self.gid, line_to_termios(self._base_attrs(), self.line))
            self.last_attrs = self.pty.attrs()
        self.tick()

    def tick(self):
        """Every TICK: keep fd interest right, push pending bytes, look at termios."""
        now = time.monotonic()
        if self.drv is None and self.pending_up is not None:
            self.driver_up(self.pending_up)
        self._flush_to_app()
        self._check_termios()
        self._watch_fds()
        if now >= self._status_due:
            self.publish_status()
            self._status_due = now + STATUS_INTERVAL
        if self.ds.has_notifications():
            self.on_ds()  # read along with a reply: the socket will not wake us for them
        if self.drv is not None and self.drv.events:
            self.on_driver()  # likewise for driver events read while awaiting a reply
        self.sef.loop.call_later(TICK, self.tick)

    def _watch_fds(self):
        """Read the pty only while the driver side can take more (back-pressure)."""
        want = (self.pty.master if self.pty is not None and self.unconfirmed < MAX_UNCONFIRMED
                and len(self.held) < MAX_HELD else None)
        if want != self._watching:
            if self._watching is not None:
                self.sef.remove_reader(self._watching)
            if want is not None:
                self.sef.add_reader(want, self._on_master_ready)
            self._watching = want

    def _on_master_ready(self):
        self.on_master()
        self._watch_fds()
        if self.drv is not None and self.drv.events:
            self.on_driver()  # events that arrived while we awaited a reply


def main(argv=None):
    runtime = os.environ.get("RSD_RUNTIME_DIR", "/run/rsd")
    p = argparse.ArgumentParser(prog="tty-frontend", description="tty front end for a serial driver")
    p.add_argument("--label", required=True, help="the serial driver's label (drv.chr.<label>)")
    p.add_argument("--link", help="stable path of the tty (default RUNTIME/tty/<label>)")
    p.add_argument("--runtime-dir", default=runtime)
    p.add_argument("--mode", type=lambda s: int(s, 8), default=0o660, help="tty permissions (octal, default 0660)")
    p.add_argument("--group", help="group owning the tty (e.g. dialout)")
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO,
                        format="tty-frontend[%s]: %%(message)s" % a.label, stream=sys.stderr)
    link = a.link or os.path.join(a.runtime_dir, "tty", a.label)
    try:
        fe = TtyFrontend(a.label, link, a.runtime_dir, a.mode, a.group)
    except (DSError, KeyError) as exc:
        print("tty-frontend: cannot start: %s" % exc, file=sys.stderr)
        return 1
    sef = SEF()
    sef.on_init_fresh(fe.start)
    sef.on_init_restart(lambda sef, reason, restarts: fe.start(sef))
    return sef.run()


if __name__ == "__main__":
    sys.exit(main())
