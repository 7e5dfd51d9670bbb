"""The tty front end: a serial port as a real tty that survives its driver.

    python -m frontends.tty --label serial0 [--link PATH] [--mode 0660] [--group dialout]

Applications open a pty slave through a stable symlink (default
$RSD_RUNTIME_DIR/tty/<label>) and use it as any serial tty: read, write,
stty/tcsetattr, a getty.  The front end attaches to the driver's socket
($RSD_RUNTIME_DIR/svc/<label>.sock) with a fresh shared memory
(libdrv/chrshm.h) and two doorbells; bytes move between the pty master and
the memory's rings in C (frontends/_ttyio.pyx), and the tty's termios is
applied to the UART with set_line requests.

Recovery (MINIX character-device semantics, docs/serial.md): when the
driver dies (its socket closes, or DS says drv.chr.<label> is not up), the
current pty is hung up, so calls in flight and open files get EIO (or EOF
on read) and the application decides; a new pty with the same settings
replaces it behind the symlink at once, and what is written to it waits
until the next driver incarnation accepts our attach (sent at once: the
listening socket outlives the driver, so the attach waits in its backlog).
Bytes posted to the dead driver and not confirmed handed to the UART are
counted as lost (tx_lost), never resent: part of them may already be on the
wire, and a duplicate is worse than a gap for most serial protocols.
"""

import argparse
import fcntl
import grp
import json
import logging
import os
import struct
import sys
import termios
import time

from libdrv import chrshm
from libdrv.drvlink import DriverLink, DriverRefused, driver_news
from libdrv.dsclient import DSClient, DSError
from libdrv.sef import SEF

from frontends._ttyio import Pump

log = logging.getLogger("tty")

TICK = 0.05                 # housekeeping: termios compare (stty without data reaches the UART), retries
STATUS_INTERVAL = 1.0
ATTACH_TIMEOUT = 60.0       # a queued attach not answered: connect again (a driver's init_timeout is shorter)
ATTACH_RETRY = 0.02         # after EBUSY (the driver has not yet read our old connection's EOF) or no socket
ATTACH_RETRY_SLOW = 1.0     # after any other refusal
PTY_RETRY = 0.01            # the pty took less than the RX ring had: look again

# termios speed constants -> baud
SPEEDS = {getattr(termios, "B%d" % b): b for b in (
    50, 75, 110, 134, 150, 200, 300, 600, 1200, 1800, 2400, 4800, 9600, 19200, 38400, 57600, 115200)}
BAUDS = {b: s for s, b in SPEEDS.items()}


# What a pty can carry: Linux ptys refuse (or drop) data bits and parity, so
# those are set on the driver directly (serial16550-ctl set-line) and kept.
TERMIOS_FIELDS = ("baud", "stop", "rtscts", "ixon", "ixoff", "vstart", "vstop")


def termios_to_line(attrs):
    """The line settings a tty's termios expresses: speed, stop bits, RTS/CTS, XON/XOFF."""
    iflag, cflag, speed, cc = attrs[0], attrs[2], attrs[5], attrs[6]
    return {"baud": SPEEDS.get(speed, 0), "stop": 2 if cflag & termios.CSTOPB else 1,
            "rtscts": bool(cflag & termios.CRTSCTS), "ixon": bool(iflag & termios.IXON),
            "ixoff": bool(iflag & termios.IXOFF), "vstart": _cc(cc[termios.VSTART]),
            "vstop": _cc(cc[termios.VSTOP])}


def _cc(value):
    return value[0] if isinstance(value, bytes) else int(value)


def line_to_termios(attrs, line):
    """Return attrs changed to carry the driver's line settings."""
    attrs = list(attrs)
    cflag = attrs[2] & ~(termios.CSTOPB | termios.CRTSCTS)
    if line["stop"] == 2:
        cflag |= termios.CSTOPB
    if line["rtscts"]:
        cflag |= termios.CRTSCTS
    attrs[2] = cflag
    iflag = attrs[0] & ~(termios.IXON | termios.IXOFF)
    if line.get("ixon"):
        iflag |= termios.IXON
    if line.get("ixoff"):
        iflag |= termios.IXOFF
    attrs[0] = iflag
    cc = list(attrs[6])
    for key, index in (("vstart", termios.VSTART), ("vstop", termios.VSTOP)):
        if key in line:
            cc[index] = bytes([line[key]])
    attrs[6] = cc
    speed = BAUDS.get(line["baud"], termios.B115200)
    attrs[4] = attrs[5] = speed
    return attrs


class Pty:
    """One pty pair: the master we serve, the slave applications open."""

    def __init__(self, link, mode, gid, attrs=None):
        self.master, self.slave = os.openpty()
        os.set_blocking(self.master, False)
        # Packet mode tells us of flushes (tcflush on the tty) on the master side.
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


class Attaching:
    """An attach sent and not yet answered: the memory and doorbells it carried."""

    def __init__(self, rid, memfd, driver_bell, our_bell, deadline):
        self.rid, self.memfd, self.driver_bell, self.our_bell = rid, memfd, driver_bell, our_bell
        self.deadline = deadline

    def close(self):
        for fd in (self.memfd, self.driver_bell, self.our_bell):
            if fd >= 0:
                os.close(fd)
        self.memfd = self.driver_bell = self.our_bell = -1


class TtyFrontend:
    def __init__(self, label, link, runtime_dir, mode=0o660, group=None, ds_socket=None):
        self.label = label
        self.link = link
        self.driver_path = os.path.join(runtime_dir, "svc", "%s.sock" % label)
        self.mode = mode
        self.gid = grp.getgrnam(group).gr_gid if group else None
        self.ds = DSClient(ds_socket, reconnect=True)
        self.pty = None
        self.pump = None
        self.drv = None              # the driver's socket: attaching or attached
        self.attaching = None        # an Attaching while the attach is unanswered
        self.bells = None            # (the driver's, ours) of the attached driver
        self.generation = None
        self.line = None
        self.last_attrs = None
        self.attaches = 0
        self.retry_at = None         # when to try attaching again (None: not waiting for that)
        self.pty_timer = None
        self.counters = {"tx_lost": 0, "rx_dropped": 0, "tx_flushed": 0, "recoveries": 0, "hangups": 0,
                         "attaches": 0, "refused_by_driver": 0, "termios_applied": 0, "termios_refused": 0}
        self.state = "waiting"
        self._status_due = 0.0
        self.sef = None
        self._status_key = "tty.%s.status" % label

    # -- attaching ----------------------------------------------------------------------
    def attach(self, why):
        """Connect and send an attach with a fresh memory now (unless one is on its way)."""
        if self.drv is not None:
            return
        self.retry_at = None
        try:
            drv = DriverLink(self.driver_path)
        except OSError as exc:
            log.debug("driver socket %s not accepting (%s): %s", self.driver_path, why, exc)
            self.retry_at = time.monotonic() + ATTACH_RETRY
            return
        self.attaches += 1
        memfd = chrshm.create(self.attaches)
        driver_bell = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        our_bell = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        att = Attaching(0, memfd, driver_bell, our_bell, time.monotonic() + ATTACH_TIMEOUT)
        try:
            att.rid = drv.send("attach", [memfd, driver_bell, our_bell])
        except OSError as exc:
            att.close()
            drv.close()
            log.warning("attach to %s not sent: %s", self.label, exc)
            self.retry_at = time.monotonic() + ATTACH_RETRY_SLOW
            return
        self.drv, self.attaching = drv, att
        if self.state == "waiting":
            self.state = "attaching"
        self.sef.add_reader(drv.sock, self.on_driver_socket)

    def _attach_answered(self, reply):
        att, self.attaching = self.attaching, None
        if not reply.get("ok"):
            att.close()
            self._close_link()
            slow = reply.get("err") != "EBUSY"
            log.warning("driver %s refused the attach: %s %s", self.label, reply.get("err"), reply.get("msg"))
            self.retry_at = time.monotonic() + (ATTACH_RETRY_SLOW if slow else ATTACH_RETRY)
            return
        problem = _check_attach_reply(reply)
        if problem:
            att.close()
            self._close_link()
            log.error("driver %s answered the attach wrongly (%s): trying again", self.label, problem)
            self.retry_at = time.monotonic() + ATTACH_RETRY_SLOW
            return
        self.pump.attach(att.memfd, att.driver_bell, att.our_bell)
        os.close(att.memfd)          # the mapping stays
        self.bells = (att.driver_bell, att.our_bell)
        self.sef.add_reader(att.our_bell, self.pump.on_bell)
        self.generation = reply["generation"]
        self.counters["attaches"] += 1
        if self.line is None:
            self.line = reply["line"]
        else:
            # The driver restored its own backup; the tty's settings win if they differ.
            mine = {k: self.line[k] for k in TERMIOS_FIELDS if k in self.line}
            self.line = reply["line"]
            if any(reply["line"].get(k) != v for k, v in mine.items()):
                self._apply_line(mine)
        self.last_attrs = self.pty.attrs()
        if self.state == "recovering":
            self.counters["recoveries"] += 1
        self.state = "up"
        log.info("driver %s generation %s attached (memory %d, %s); tty %s -> %s; %d held bytes posted",
                 self.label, self.generation, self.attaches, reply.get("model"), self.link, self.pty.path,
                 self.pump.unconfirmed)
        self._check_termios()

    def _close_link(self):
        if self.drv is not None:
            self.sef.remove_reader(self.drv.sock)
            self.drv.close()
            self.drv = None

    # -- driver down ---------------------------------------------------------------------
    def driver_down(self, why):
        if self.attaching is not None and self.state != "up":
            # Our queued attach's driver went away: attach again (nothing to hang up).
            self.attaching.close()
            self.attaching = None
            self._close_link()
            self.retry_at = time.monotonic() + ATTACH_RETRY
            return
        if self.state != "up":
            return
        log.warning("driver %s went away (%s): hanging up %s", self.label, why, self.pty.path)
        if self.attaching is not None:
            self.attaching.close()
            self.attaching = None
        self.sef.remove_reader(self.bells[1])
        lost, dropped = self.pump.detach()
        for fd in self.bells:
            os.close(fd)
        self.bells = None
        self._close_link()
        self.counters["tx_lost"] += lost
        self.counters["rx_dropped"] += dropped   # received for the hung-up tty: nobody can read it now
        self.state = "recovering"
        # What applications already wrote is ours to account for: take it out of the
        # pty before the hang-up discards it; it goes to the next incarnation.
        self.pump.take_pty()
        attrs = self.pty.attrs()
        # New opens get a fresh tty with the same settings right away: the link moves
        # to it before the old one is hung up, so an open never finds the link missing
        # or pointing at a dead tty.
        old, self.pty = self.pty, Pty(self.link, self.mode, self.gid, attrs)
        self.pump.set_master(self.pty.master)
        old.hang_up()
        self.counters["hangups"] += 1
        self.last_attrs = attrs
        self.attach("after %s" % why)   # queued in the listening socket until the next incarnation

    # -- events ---------------------------------------------------------------------------
    def on_driver_socket(self):
        if self.drv is None:
            return
        try:
            events = self.drv.read_events()
        except ConnectionError as exc:
            self.driver_down(str(exc))
            return
        self._take_events(events)

    def _take_events(self, events):
        for ev in events:
            if self.attaching is not None and ev.get("id") == self.attaching.rid:
                self._attach_answered(ev)
            elif ev.get("ev") == "refused":
                self.counters["refused_by_driver"] += 1
                log.error("driver %s refused our memory: %s; attaching again", self.label, ev.get("msg"))
                self.driver_down("refused: %s" % ev.get("msg"))
                return
            if self.drv is None:
                return

    def on_rare(self, what, detail):
        """The pump's calls for what needs Python."""
        if what == "termios":
            self._check_termios()
        elif what == "pty_full":
            if self.pty_timer is None:
                self.pty_timer = self.sef.loop.call_later(PTY_RETRY, self._pty_retry)
        elif what == "packet":
            self._flush(bool(detail & termios.TIOCPKT_FLUSHREAD), bool(detail & termios.TIOCPKT_FLUSHWRITE))
        elif what == "violation":
            log.error("driver %s broke the shared memory's rules: %s", self.label, detail)
            self.driver_down("violation: %s" % detail)

    def _pty_retry(self):
        self.pty_timer = None
        self.pump.service()

    def _flush(self, rx, tx):
        """tcflush on the tty: the UART's FIFOs too; what was not sent yet is dropped."""
        if tx and not self.pump.attached:
            self.counters["tx_flushed"] += self.pump.drop_held()
        if self.state != "up":
            return
        before = self.pump.unconfirmed
        try:
            self.drv.call("flush", rx=rx, tx=tx)
        except DriverRefused as exc:
            log.warning("driver refused flush: %s", exc)
            return
        except (OSError, ConnectionError) as exc:
            self.driver_down(str(exc))
            return
        if tx:
            self.counters["tx_flushed"] += before
        self._after_call()

    def _after_call(self):
        """Events read while a call awaited its reply: the socket will not wake us for them."""
        if self.drv is not None and self.drv.events:
            events, self.drv.events = self.drv.events, []
            self._take_events(events)

    # -- termios ----------------------------------------------------------------------------
    def _check_termios(self):
        if self.pty is None:
            return
        attrs = self.pty.attrs()
        if attrs == self.last_attrs:
            return
        self.last_attrs = attrs
        wanted = termios_to_line(attrs)
        if self.line is not None and all(self.line.get(k) == wanted[k] for k in TERMIOS_FIELDS):
            return
        if wanted["baud"] == 0:
            self.counters["termios_refused"] += 1
            log.warning("tty speed not supported by the UART; keeping %s", self.line)
            return
        self.line = dict(self.line or {}, **wanted)
        if self.state == "up":
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
            return
        self._after_call()

    # -- DS --------------------------------------------------------------------------------
    def on_ds(self):
        for what, detail in driver_news(self.ds, "chr", self.label, log):
            if what == "up":
                if self.state == "up" and self.generation is not None and detail > self.generation:
                    self.driver_down("replaced by generation %s" % detail)
                elif self.drv is None:
                    self.attach("DS says up %s" % detail)
            elif self.state == "up":
                self.driver_down(detail)

    def status(self):
        c = self.pump.counters()
        return dict(self.counters, state=self.state, tty=self.pty.path if self.pty else None,
                    link=self.link, generation=self.generation, line=self.line,
                    rx_bytes=c["rx_bytes"], tx_accepted=c["tx_accepted"], tx_bytes=c["tx_bytes"],
                    unconfirmed=self.pump.unconfirmed, held=self.pump.held, pump=c)

    def publish_status(self):
        try:
            self.ds.publish(self._status_key, json.dumps(self.status(), sort_keys=True), overwrite=True)
        except DSError as exc:
            log.debug("status not published: %s", exc)

    # -- event loop (libdrv SEF: rsd supervises the front end too) -----------------
    def start(self, sef):
        """Init callback: the tty, the pump, DS's news of the driver, the first attach."""
        self.sef = sef
        os.makedirs(os.path.dirname(self.link), exist_ok=True)
        self.pump = Pump(sef.loop, self.on_rare)
        # Until the driver is first attached, the tty exists with default settings.
        self.pty = Pty(self.link, self.mode, self.gid, line_to_termios(_base_attrs(), {
            "baud": 115200, "stop": 1, "rtscts": False}))
        self.last_attrs = self.pty.attrs()
        self.pump.set_master(self.pty.master)
        self.ds.subscribe(r"drv\.chr\.%s" % self.label.replace("-", r"\-"), initial=True)
        sef.add_reader(self.ds, self.on_ds)
        self.on_ds()
        self.attach("start")
        self.tick()

    def tick(self):
        """Every TICK: termios, retries, status."""
        now = time.monotonic()
        self._check_termios()
        if self.drv is None and self.retry_at is not None and now >= self.retry_at:
            self.attach("retry")
        if self.attaching is not None and now > self.attaching.deadline:
            log.warning("driver %s did not answer the attach within %.0f s: connecting again",
                        self.label, ATTACH_TIMEOUT)
            self.driver_down("attach unanswered")
        if self.ds.has_notifications():
            self.on_ds()  # read along with a reply: the socket will not wake us for them
        self._after_call()
        if self.pump.attached:
            self.pump.service()      # a doorbell the driver skipped costs at most a tick
        if now >= self._status_due:
            self.publish_status()
            self._status_due = now + STATUS_INTERVAL
        self.sef.loop.call_later(TICK, self.tick)


def _check_attach_reply(reply):
    line = reply.get("line")
    if not isinstance(line, dict) or not all(k in line for k in ("baud", "stop", "rtscts")):
        return "no line settings"
    if not isinstance(reply.get("generation"), int):
        return "no generation"
    return None


def _base_attrs():
    m, s = os.openpty()
    try:
        a = termios.tcgetattr(s)
    finally:
        os.close(m)
        os.close(s)
    a[0] = a[1] = a[3] = 0
    a[2] |= termios.CREAD | termios.CLOCAL
    return a


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
