"""The CUSE front end: a serial port as a character device with real termios and modem lines.

    python -m frontends.cuse --label serial0 --name ttyRSD1   # [resources] cuse = "ttyRSD1"

Applications open /dev/<name> as they would /dev/ttyS1: termios (speed, data bits 5-8,
parity none/odd/even/mark/space, stop bits, CRTSCTS, IXON/IXOFF reach the UART), the
modem-line ioctls (TIOCMGET/SET/BIS/BIC, TIOCMIWAIT, TIOCGICOUNT), break, drain, flush,
FIONREAD/TIOCOUTQ, poll, O_NONBLOCK, TIOCEXCL.  There is no line discipline: the port is
raw whatever c_lflag/c_iflag/c_oflag say (they are kept and read back), as cfmakeraw()
leaves a real one; a CUSE device cannot be a controlling terminal (use the pty front end,
frontends/tty.py, for logins).

rsd registers the device (rsd/cuse.py: only rsd answers CUSE_INIT, so the name is the
service file's) and hands us the /dev/cuse fd at init.  READ, WRITE and POLL are served in
C against the driver's shared-memory rings (frontends/_cuseio.pyx); the rest here.

Recovery (MINIX character-device semantics, docs/serial.md): when the driver dies, every
call in flight and every later call on a file opened before fails with EIO; new opens work
and wait for the next generation, which gets the same settings (kept here, applied at each
attach).  Bytes handed to the dead driver and not yet given to the UART are counted as
lost (tx_lost), never resent.  Status: DS cuse.<name>.status.
"""

import argparse
import errno
import json
import logging
import os
import re
import struct
import sys
import termios
import time

from frontends._cuseio import CuseIO
from libdrv import chrshm
from libdrv.drvlink import DriverLink, DriverRefused, driver_news
from libdrv.dsclient import DSClient, DSError
from libdrv.sef import SEF

log = logging.getLogger("cuse")

TICK = 0.1                  # VTIME timers, a doorbell the driver skipped, pending attaches
STATUS_INTERVAL = 1.0
BREAK_DEFAULT = 0.25        # s, tcsendbreak(fd, 0) as Linux does it

# <linux/fuse.h> opcodes served here (READ, WRITE, POLL are _cuseio's)
FUSE_OPEN, FUSE_RELEASE, FUSE_FSYNC, FUSE_FLUSH, FUSE_INTERRUPT, FUSE_IOCTL = 14, 18, 20, 25, 36, 39
FUSE_IOCTL_RETRY = 1 << 2
IN_HEADER = struct.Struct("<IIQQIIIHH")     # fuse_in_header
OPEN_IN = struct.Struct("<II")              # fuse_open_in: flags, open_flags
OPEN_OUT = struct.Struct("<QII")            # fuse_open_out: fh, open_flags, padding
RELEASE_IN = struct.Struct("<QIIQ")         # fuse_release_in: fh, flags, release_flags, lock_owner
IOCTL_IN = struct.Struct("<QIIQII")         # fuse_ioctl_in: fh, flags, cmd, arg, in_size, out_size
IOCTL_OUT = struct.Struct("<iIII")          # fuse_ioctl_out: result, flags, in_iovs, out_iovs
IOVEC = struct.Struct("<QQ")
FH_IN = struct.Struct("<Q")                 # the fh that starts fuse_flush_in / fuse_fsync_in
INTERRUPT_IN = struct.Struct("<Q")

# The kernel's struct termios (36 bytes) and struct termios2 (44): <asm-generic/termbits.h>
TERMIOS = struct.Struct("<IIIIB19s")
TERMIOS2 = struct.Struct("<IIIIB19sII")
NCCS = 19
CBAUD, BOTHER, CIBAUD_SHIFT = 0o010017, 0o010000, 16
CSIZE, CSTOPB, CREAD, PARENB, PARODD, HUPCL, CLOCAL = 0o60, 0o100, 0o200, 0o400, 0o1000, 0o2000, 0o4000
CMSPAR, CRTSCTS = 0o10000000000, 0o20000000000
IXON, IXOFF = 0o2000, 0o10000
VTIME, VMIN, VSTART, VSTOP = 5, 6, 8, 9
SPEEDS = {getattr(termios, "B%d" % b): b for b in (
    50, 75, 110, 134, 150, 200, 300, 600, 1200, 1800, 2400, 4800, 9600, 19200, 38400, 57600, 115200,
    230400, 460800, 500000, 576000, 921600, 1000000, 1152000, 1500000, 2000000, 2500000, 3000000,
    3500000, 4000000)}
BAUDS = {b: s for s, b in SPEEDS.items()}
BITS = {0o00: 5, 0o20: 6, 0o40: 7, 0o60: 8}

# <asm-generic/ioctls.h> (x86-64)
TCGETS, TCSETS, TCSETSW, TCSETSF = 0x5401, 0x5402, 0x5403, 0x5404
TCSBRK, TCXONC, TCFLSH, TIOCEXCL, TIOCNXCL, TIOCSCTTY = 0x5409, 0x540A, 0x540B, 0x540C, 0x540D, 0x540E
TIOCOUTQ, TIOCGWINSZ, TIOCSWINSZ = 0x5411, 0x5413, 0x5414
TIOCMGET, TIOCMBIS, TIOCMBIC, TIOCMSET = 0x5415, 0x5416, 0x5417, 0x5418
FIONREAD, TIOCSETD, TIOCGETD, TCSBRKP = 0x541B, 0x5423, 0x5424, 0x5425
TIOCSBRK, TIOCCBRK = 0x5427, 0x5428
TCGETS2, TCSETS2, TCSETSW2, TCSETSF2 = 0x802C542A, 0x402C542B, 0x402C542C, 0x402C542D
TIOCGEXCL = 0x80045440
TIOCMIWAIT, TIOCGICOUNT = 0x545C, 0x545D
TCIFLUSH, TCOFLUSH, TCIOFLUSH = 0, 1, 2

TIOCM_LE, TIOCM_DTR, TIOCM_RTS = 0x001, 0x002, 0x004
TIOCM_CTS, TIOCM_CD, TIOCM_RI, TIOCM_DSR = 0x020, 0x040, 0x080, 0x100
TIOCM_OUT1, TIOCM_OUT2, TIOCM_LOOP = 0x2000, 0x4000, 0x8000
MSR_CTS, MSR_DSR, MSR_RI, MSR_DCD = 0x10, 0x20, 0x40, 0x80
MCR_DTR, MCR_RTS, MCR_OUT1, MCR_OUT2, MCR_LOOP = 0x01, 0x02, 0x04, 0x08, 0x10
# TIOCMIWAIT's lines -> their icount index (cts, dsr, rng, dcd)
WAIT_LINES = {TIOCM_CTS: 0, TIOCM_DSR: 1, TIOCM_RI: 2, TIOCM_CD: 3}
WAIT_MSR = {TIOCM_CTS: MSR_CTS, TIOCM_DSR: MSR_DSR, TIOCM_RI: MSR_RI, TIOCM_CD: MSR_DCD}
ICOUNT = struct.Struct("<20i")              # struct serial_icounter_struct (11 counters, 9 reserved)
INT = struct.Struct("<i")


def line_from_termios(t):
    """The driver's line settings a termios asks for, or a str saying why the UART cannot do it."""
    cflag, iflag, cc = t["cflag"], t["iflag"], t["cc"]
    speed = cflag & CBAUD
    if speed == BOTHER:
        baud = t["ospeed"]
    elif speed == 0:
        baud = None                 # B0: hang up (drop DTR/RTS), the speed stays
    elif speed in SPEEDS:
        baud = SPEEDS[speed]
    else:
        return "speed code %#o is not a termios speed" % speed
    if cflag & PARENB:
        if cflag & CMSPAR:
            parity = "mark" if cflag & PARODD else "space"
        else:
            parity = "odd" if cflag & PARODD else "even"
    else:
        parity = "none"
    line = {"bits": BITS[cflag & CSIZE], "parity": parity, "stop": 2 if cflag & CSTOPB else 1,
            "rtscts": bool(cflag & CRTSCTS), "ixon": bool(iflag & IXON), "ixoff": bool(iflag & IXOFF),
            "vstart": cc[VSTART], "vstop": cc[VSTOP]}
    if baud is not None:
        line["baud"] = baud
    return line


def termios_from_line(line, base=None):
    """A termios carrying the driver's line settings, raw (what a fresh port of ours reports)."""
    cc = bytearray(base["cc"]) if base else bytearray(NCCS)
    if not base:
        cc[VMIN], cc[VTIME], cc[VSTART], cc[VSTOP] = 1, 0, 0x11, 0x13
    cc[VSTART], cc[VSTOP] = line.get("vstart", 0x11), line.get("vstop", 0x13)
    cflag = (base["cflag"] if base else CREAD | CLOCAL | HUPCL) & ~(
        CBAUD | CSIZE | CSTOPB | PARENB | PARODD | CMSPAR | CRTSCTS | (CBAUD << CIBAUD_SHIFT))
    speed = BAUDS.get(line["baud"], BOTHER)
    cflag |= speed | {5: 0o00, 6: 0o20, 7: 0o40, 8: 0o60}[line["bits"]]
    cflag |= CSTOPB if line["stop"] == 2 else 0
    cflag |= {"none": 0, "odd": PARENB | PARODD, "even": PARENB, "mark": PARENB | CMSPAR | PARODD,
              "space": PARENB | CMSPAR}[line["parity"]]
    cflag |= CRTSCTS if line["rtscts"] else 0
    iflag = (base["iflag"] if base else 0) & ~(IXON | IXOFF)
    iflag |= (IXON if line.get("ixon") else 0) | (IXOFF if line.get("ixoff") else 0)
    return {"iflag": iflag, "oflag": base["oflag"] if base else 0, "cflag": cflag,
            "lflag": base["lflag"] if base else 0, "line": base["line"] if base else 0, "cc": bytes(cc),
            "ispeed": line["baud"], "ospeed": line["baud"]}


def pack_termios(t, two):
    if two:
        return TERMIOS2.pack(t["iflag"], t["oflag"], t["cflag"], t["lflag"], t["line"], t["cc"],
                             t["ispeed"], t["ospeed"])
    return TERMIOS.pack(t["iflag"], t["oflag"], t["cflag"], t["lflag"], t["line"], t["cc"])


def unpack_termios(data, two, old):
    if two:
        iflag, oflag, cflag, lflag, line, cc, ispeed, ospeed = TERMIOS2.unpack(data[:TERMIOS2.size])
    else:
        iflag, oflag, cflag, lflag, line, cc = TERMIOS.unpack(data[:TERMIOS.size])
        ospeed = SPEEDS.get(cflag & CBAUD, old["ospeed"])
        ispeed = ospeed
    return {"iflag": iflag, "oflag": oflag, "cflag": cflag, "lflag": lflag, "line": line, "cc": cc,
            "ispeed": ispeed, "ospeed": ospeed}


class IoctlError(Exception):
    def __init__(self, err):
        super().__init__(os.strerror(err))
        self.err = err


class OpenFile:
    __slots__ = ("fh", "flags", "dead")

    def __init__(self, fh, flags):
        self.fh, self.flags, self.dead = fh, flags, False


class Waiter:
    """An ioctl answered later (TIOCMIWAIT, a drain, a timed break): interruptible, EIO at a driver death."""
    __slots__ = ("unique", "fh", "kind", "mask", "counts", "rid", "then", "timer")

    def __init__(self, unique, fh, kind, **kw):
        self.unique, self.fh, self.kind = unique, fh, kind
        self.mask = kw.get("mask", 0)
        self.counts = kw.get("counts")
        self.rid = kw.get("rid")
        self.then = kw.get("then")
        self.timer = None


class CuseFrontend:
    def __init__(self, label, name, runtime_dir, ds_socket=None):
        self.label = label
        self.name = name
        self.driver_path = os.path.join(runtime_dir, "svc", "%s.sock" % label)
        self.ds = DSClient(ds_socket, reconnect=True)
        self.sef = None
        self.dp = None
        self.fd = None
        self.path = None
        self.drv = None
        self.bells = ()
        self.memfd = None
        self.generation = None
        self.pending_up = None
        self.down_at = None         # when the last generation went away (the recovery time is logged)
        self.attaches = 0
        self.files = {}             # fh -> OpenFile
        self.exclusive = False
        self.termios = None         # the port's settings, kept across opens and driver restarts
        self.modem = {"dtr": False, "rts": False, "loop": False}
        self.winsize = bytes(8)
        self.waiters = []
        self.counters = {"attaches": 0, "driver_deaths": 0, "tx_lost": 0, "opens": 0, "ioctls": 0,
                         "ioctl_refused": 0, "line_applied": 0, "line_refused": 0, "eio_files": 0,
                         "refusals": 0}
        self.state = "waiting"
        self.last_fault = None
        self._status_due = 0.0
        self._status_key = "cuse.%s.status" % name

    # -- init ------------------------------------------------------------------------------------
    def start(self, sef):
        self.sef = sef
        self.ds.subscribe(r"drv\.chr\.%s" % re.escape(self.label), initial=True)
        reply, fds = sef.request("cuse_open", name=self.name)
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise RuntimeError("rsd's cuse_open reply carried %d fds, not 1" % len(fds))
        self.fd = fds[0]
        os.set_blocking(self.fd, False)
        self.path = reply.get("path")
        self.dp = CuseIO(self.fd, int(reply["max_write"]))
        self.dp.handlers(self.on_request, self.on_rare)
        sef.add_reader(self.fd, self.dp.service)
        sef.add_reader(self.ds, self.on_ds)
        log.info("serving %s (%s:%s) for driver %s", self.path, reply.get("major"), reply.get("minor"), self.label)
        self.on_ds()
        self.tick()

    # -- the driver --------------------------------------------------------------------------------
    def driver_up(self, generation):
        if self.drv is not None and generation == self.generation:
            return
        if self.drv is not None:
            self.driver_down("replaced by generation %s" % generation)
        self.generation = generation
        try:
            drv = DriverLink(self.driver_path)
        except OSError as exc:
            self.pending_up = generation
            log.info("driver %s generation %s: socket not usable yet (%s); will retry", self.label, generation, exc)
            return
        self.attaches += 1
        memfd = chrshm.create(self.attaches)
        bells = (os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK), os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
        try:
            info = drv.call("attach", fds=[memfd, *bells])
        except DriverRefused as exc:
            drv.close()
            os.close(memfd)
            for fd in bells:
                os.close(fd)
            log.warning("driver %s generation %s refused the attach: %s (will retry)", self.label, generation, exc)
            self.pending_up = generation
            return
        except (OSError, ConnectionError) as exc:
            drv.close()
            os.close(memfd)
            for fd in bells:
                os.close(fd)
            log.warning("driver %s generation %s: attach failed: %s (will retry)", self.label, generation, exc)
            self.pending_up = generation
            return
        self.pending_up = None
        self.drv, self.bells, self.memfd = drv, bells, memfd
        self.dp.attach(memfd, bells[0], bells[1])
        self.sef.add_reader(bells[1], self.dp.service)
        self.sef.add_reader(drv.sock, self.on_driver_socket)
        self.state = "up"
        self.counters["attaches"] += 1
        line = info.get("line") if isinstance(info.get("line"), dict) else None
        if self.termios is None:
            # The first attach: the port starts as the driver has it (its backup, or its defaults).
            try:
                self.termios = termios_from_line(line)
            except (KeyError, TypeError):
                self.termios = termios_from_line({"baud": 9600, "bits": 8, "parity": "none", "stop": 1,
                                                  "rtscts": False})
        else:
            self._apply_termios(self.termios, reapply=True)
        if self.drv is not None:
            self._apply_modem()
        if self.drv is not None:
            self.dp.set_read_mode(self.termios["cc"][VMIN], self.termios["cc"][VTIME])
            since = " %.1f ms after the previous one went away" % ((time.monotonic() - self.down_at) * 1e3) \
                if self.down_at is not None else ""
            self.down_at = None
            log.info("driver %s generation %s attached (%s)%s; %d files open", self.label, generation,
                     info.get("model"), since, len(self.files))
            self.dp.service()

    def driver_down(self, why):
        self.pending_up = None
        if self.drv is None:
            return
        log.warning("driver %s generation %s went away (%s): calls in flight and open files get EIO",
                    self.label, self.generation, why)
        self.counters["driver_deaths"] += 1
        self.down_at = time.monotonic()
        # Nothing it moved in the rings still matters: its files' calls all fail, and
        # the next generation gets fresh rings.
        self._kill_files()
        self._teardown()
        self.state = "waiting"

    def _kill_files(self):
        for f in self.files.values():
            if not f.dead:
                f.dead = True
                self.counters["eio_files"] += 1
        self.dp.kill_all()
        for w in list(self.waiters):
            self._finish(w, -errno.EIO)

    def _teardown(self):
        self.counters["tx_lost"] += self.dp.detach()
        if self.drv is not None:
            self.sef.remove_reader(self.drv.sock)
            self.drv.close()
            self.drv = None
        for fd in self.bells:
            self.sef.remove_reader(fd)
            os.close(fd)
        self.bells = ()
        if self.memfd is not None:
            os.close(self.memfd)
            self.memfd = None

    def _refuse(self, why):
        log.error("refusing driver %s generation %s: %s", self.label, self.generation, why)
        self.counters["refusals"] += 1
        self.last_fault = why
        self.counters["driver_deaths"] += 1
        self._kill_files()
        self._teardown()
        self.state = "refused"

    def on_driver_socket(self):
        try:
            events = self.drv.read_events()
        except (OSError, ConnectionError) as exc:
            self.driver_down(str(exc))
            return
        self._take_events(events)

    def _take_events(self, events):
        for ev in events:
            rid = ev.get("id")
            for w in list(self.waiters):
                if w.rid is not None and w.rid == rid:
                    w.rid = None
                    if ev.get("ok") is True:
                        w.then()
                    else:
                        log.warning("driver: %s refused: %s", w.kind, ev.get("msg"))
                        self._finish(w, -errno.EIO)
            if ev.get("ev") == "refused":
                log.error("the driver refused us: %s", ev.get("msg"))

    def _call(self, op, **fields):
        """A request the driver answers at once; None (after treating it as dead) if it is gone."""
        try:
            reply = self.drv.call(op, **fields)
        except (OSError, ConnectionError) as exc:
            self.driver_down(str(exc))
            return None
        if self.drv is not None and self.drv.events:
            events, self.drv.events = self.drv.events, []
            self._take_events(events)
        return reply

    # -- the rare, from the data path ----------------------------------------------------------------
    def on_rare(self, what, detail):
        if what == "state":
            self._check_waits()
        elif what == "fault":
            self._refuse(detail)
        elif what == "gone":
            log.info("%s; stopping", detail)
            self.sef.stop(0)
        else:
            log.error("%s; stopping (rsd starts us again)", detail)
            self.sef.remove_reader(self.fd)
            self.sef.stop(1)

    # -- requests Python serves -------------------------------------------------------------------------
    def on_request(self, req):
        length, opcode, unique, nodeid, uid, gid, pid, _, _ = IN_HEADER.unpack_from(req)
        body = req[IN_HEADER.size:]
        try:
            if opcode == FUSE_OPEN:
                self._open(unique, body)
            elif opcode == FUSE_RELEASE:
                self._release(unique, body)
            elif opcode == FUSE_FLUSH:
                self._reply(unique, 0)      # close() of a hung-up file succeeds, as a tty's does
            elif opcode == FUSE_FSYNC:
                self._reply(unique, self._file_error(FH_IN.unpack_from(body)[0]))
            elif opcode == FUSE_INTERRUPT:
                self._interrupt(INTERRUPT_IN.unpack_from(body)[0])
            elif opcode == FUSE_IOCTL:
                self._ioctl(unique, body)
            else:
                self._reply(unique, -errno.ENOSYS)
        except struct.error:
            self._reply(unique, -errno.EINVAL)   # the kernel sent less than the opcode carries

    def _reply(self, unique, error, payload=b""):
        self.dp.reply(unique, error, payload)

    def _file_error(self, fh):
        f = self.files.get(fh)
        if f is None:
            return -errno.EBADF
        return -errno.EIO if f.dead else 0

    def _open(self, unique, body):
        flags, _ = OPEN_IN.unpack_from(body)
        live = [f for f in self.files.values() if not f.dead]
        if self.exclusive and live:
            self._reply(unique, -errno.EBUSY)
            return
        fh = next((i for i in range(1, self.dp.max_fh) if i not in self.files), None)
        if fh is None:
            self._reply(unique, -errno.ENFILE)
            return
        if not live and (self.termios is None or self.termios["cflag"] & CBAUD):
            # The first open raises DTR and RTS, as the serial core does (unless the speed is B0).
            self.modem["dtr"] = self.modem["rts"] = True
            if self.drv is not None:
                self._apply_modem()
        self.files[fh] = OpenFile(fh, flags)
        self.dp.set_fh(fh, 1)
        self.counters["opens"] += 1
        self._reply(unique, 0, OPEN_OUT.pack(fh, 0, 0))

    def _release(self, unique, body):
        fh = RELEASE_IN.unpack_from(body)[0]
        f = self.files.pop(fh, None)
        if f is not None:
            self.dp.set_fh(fh, 0)
            for w in [w for w in self.waiters if w.fh == fh]:
                self._finish(w, -errno.EIO)
            if not any(not g.dead for g in self.files.values()):
                self.exclusive = False
                if not f.dead and self.termios is not None and self.termios["cflag"] & HUPCL:
                    # The last close with HUPCL drops DTR and RTS, as on a real port.
                    self.modem["dtr"] = self.modem["rts"] = False
                    if self.drv is not None:
                        self._apply_modem()
        self._reply(unique, 0)

    def _interrupt(self, target):
        if self.dp.interrupt(target):
            return
        for w in self.waiters:
            if w.unique == target:
                self._finish(w, -errno.EINTR)
                return
        # Answered already: an interrupt needs no reply.

    # -- ioctls ----------------------------------------------------------------------------------------------
    # cmd -> (bytes copied in from *arg, bytes copied out to *arg)
    SIZES = {TCGETS: (0, TERMIOS.size), TCSETS: (TERMIOS.size, 0), TCSETSW: (TERMIOS.size, 0),
             TCSETSF: (TERMIOS.size, 0), TCGETS2: (0, TERMIOS2.size), TCSETS2: (TERMIOS2.size, 0),
             TCSETSW2: (TERMIOS2.size, 0), TCSETSF2: (TERMIOS2.size, 0),
             TIOCMGET: (0, 4), TIOCMSET: (4, 0), TIOCMBIS: (4, 0), TIOCMBIC: (4, 0),
             TIOCGICOUNT: (0, ICOUNT.size), FIONREAD: (0, 4), TIOCOUTQ: (0, 4), TIOCGEXCL: (0, 4),
             TIOCGWINSZ: (0, 8), TIOCSWINSZ: (8, 0), TIOCGETD: (0, 4), TIOCSETD: (4, 0),
             TCSBRK: (0, 0), TCSBRKP: (0, 0), TIOCSBRK: (0, 0), TIOCCBRK: (0, 0), TCFLSH: (0, 0),
             TIOCEXCL: (0, 0), TIOCNXCL: (0, 0), TIOCMIWAIT: (0, 0)}

    def _ioctl(self, unique, body):
        fh, flags, cmd, arg, in_size, out_size = IOCTL_IN.unpack_from(body)
        data = body[IOCTL_IN.size:IOCTL_IN.size + in_size]
        self.counters["ioctls"] += 1
        err = self._file_error(fh)
        if err:
            self._reply(unique, err)
            return
        sizes = self.SIZES.get(cmd)
        if sizes is None:
            self.counters["ioctl_refused"] += 1
            self._reply(unique, -errno.ENOTTY)
            return
        need_in, need_out = sizes
        if in_size < need_in or out_size < need_out:
            # Unrestricted ioctls: the kernel copies nothing until told where and how much.
            iovs = ([IOVEC.pack(arg, need_in)] if need_in else []) + ([IOVEC.pack(arg, need_out)] if need_out else [])
            self._reply(unique, 0, IOCTL_OUT.pack(0, FUSE_IOCTL_RETRY, 1 if need_in else 0, 1 if need_out else 0)
                        + b"".join(iovs))
            return
        try:
            out = self._do_ioctl(unique, fh, cmd, arg, data)
        except IoctlError as exc:
            self.counters["ioctl_refused"] += 1
            self._reply(unique, -exc.err)
            return
        if out is not None:
            self._reply(unique, 0, IOCTL_OUT.pack(0, 0, 0, 0) + out)

    def _ok(self, unique, out=b""):
        self._reply(unique, 0, IOCTL_OUT.pack(0, 0, 0, 0) + out)

    def _do_ioctl(self, unique, fh, cmd, arg, data):
        """The reply's out data, or None when the answer comes later (or was sent)."""
        t = self.termios or termios_from_line({"baud": 9600, "bits": 8, "parity": "none", "stop": 1,
                                               "rtscts": False})
        if cmd in (TCGETS, TCGETS2):
            return pack_termios(t, cmd == TCGETS2)
        if cmd in (TCSETS, TCSETSW, TCSETSF, TCSETS2, TCSETSW2, TCSETSF2):
            two = cmd in (TCSETS2, TCSETSW2, TCSETSF2)
            new = unpack_termios(data, two, t)
            line = line_from_termios(new)
            if isinstance(line, str):
                raise IoctlError(errno.EINVAL)
            if cmd in (TCSETS, TCSETS2):
                self._set_termios(unique, new)
            else:
                flush = cmd in (TCSETSF, TCSETSF2)
                self._after_drain(unique, fh, "tcsetattr", lambda: (
                    self._flush(True, False) if flush else None, self._set_termios(unique, new)))
            return None
        if cmd == TIOCMGET:
            return INT.pack(self._tiocm())
        if cmd in (TIOCMSET, TIOCMBIS, TIOCMBIC):
            bits = INT.unpack(data[:4])[0]
            want = {"dtr": bool(bits & TIOCM_DTR), "rts": bool(bits & TIOCM_RTS), "loop": bool(bits & TIOCM_LOOP)}
            for k, v in want.items():
                if cmd == TIOCMSET:
                    self.modem[k] = v
                elif v:
                    self.modem[k] = cmd == TIOCMBIS
            if self.drv is not None:
                self._apply_modem()
            return b""
        if cmd == TIOCGICOUNT:
            st = self.dp.port_state()
            counts = list(st["icount"]) if st else [0] * 11
            return ICOUNT.pack(*[c & 0x7FFFFFFF for c in counts], *[0] * 9)
        if cmd == FIONREAD:
            return INT.pack(self.dp.inq())
        if cmd == TIOCOUTQ:
            return INT.pack(min(self.dp.outq(), 0x7FFFFFFF))
        if cmd == TIOCEXCL:
            self.exclusive = True
            return b""
        if cmd == TIOCNXCL:
            self.exclusive = False
            return b""
        if cmd == TIOCGEXCL:
            return INT.pack(int(self.exclusive))
        if cmd == TIOCGWINSZ:
            return self.winsize
        if cmd == TIOCSWINSZ:
            self.winsize = bytes(data[:8])
            return b""
        if cmd == TIOCGETD:
            return INT.pack(0)
        if cmd == TIOCSETD:
            if INT.unpack(data[:4])[0] != 0:
                raise IoctlError(errno.EINVAL)    # only N_TTY, which is what there is
            return b""
        if cmd in (TIOCSBRK, TIOCCBRK):
            self._break(cmd == TIOCSBRK)
            return b""
        if cmd == TCSBRK:
            if arg:
                self._after_drain(unique, fh, "tcdrain", lambda: self._ok(unique))
            else:
                self._timed_break(unique, fh, BREAK_DEFAULT)
            return None
        if cmd == TCSBRKP:
            if arg > 100:
                raise IoctlError(errno.EINVAL)    # tenths of a second; a break of over 10 s is a mistake
            self._timed_break(unique, fh, arg * 0.1 if arg else BREAK_DEFAULT)
            return None
        if cmd == TCFLSH:
            if arg not in (TCIFLUSH, TCOFLUSH, TCIOFLUSH):
                raise IoctlError(errno.EINVAL)
            self._flush(arg in (TCIFLUSH, TCIOFLUSH), arg in (TCOFLUSH, TCIOFLUSH))
            return b""
        if cmd == TIOCMIWAIT:
            mask = arg & (TIOCM_CTS | TIOCM_DSR | TIOCM_RI | TIOCM_CD)
            if not mask or arg & ~0xFFFF:
                raise IoctlError(errno.EINVAL)
            st = self.dp.port_state()
            w = Waiter(unique, fh, "TIOCMIWAIT", mask=mask, counts=(st["icount"][:4], st["msr"]) if st else None)
            self.waiters.append(w)
            self.dp.want_state = True
            return None
        raise IoctlError(errno.ENOTTY)

    def _tiocm(self):
        st = self.dp.port_state()
        if st is None:
            # No driver: what we will program, no inputs.
            return ((TIOCM_DTR if self.modem["dtr"] else 0) | (TIOCM_RTS if self.modem["rts"] else 0)
                    | (TIOCM_LOOP if self.modem["loop"] else 0))
        msr, mcr = st["msr"], st["mcr"]
        return ((TIOCM_DTR if mcr & MCR_DTR else 0) | (TIOCM_RTS if mcr & MCR_RTS else 0)
                | (TIOCM_OUT1 if mcr & MCR_OUT1 else 0) | (TIOCM_OUT2 if mcr & MCR_OUT2 else 0)
                | (TIOCM_LOOP if mcr & MCR_LOOP else 0)
                | (TIOCM_CTS if msr & MSR_CTS else 0) | (TIOCM_DSR if msr & MSR_DSR else 0)
                | (TIOCM_RI if msr & MSR_RI else 0) | (TIOCM_CD if msr & MSR_DCD else 0))

    def _set_termios(self, unique, new):
        old = self.termios
        try:
            self._apply_termios(new)
        except IoctlError as exc:
            self._reply(unique, -exc.err)
            return
        # B0 hangs up (DTR and RTS drop); leaving B0 raises them, as the serial core does.
        if old is not None and (new["cflag"] & CBAUD) == 0 and (old["cflag"] & CBAUD):
            self.modem["dtr"] = self.modem["rts"] = False
        elif old is not None and (old["cflag"] & CBAUD) == 0 and (new["cflag"] & CBAUD):
            self.modem["dtr"] = self.modem["rts"] = True
        if self.drv is not None:
            self._apply_modem()
        self._ok(unique)

    def _apply_termios(self, new, reapply=False):
        """Keep new as the port's settings and program the UART with them (EINVAL if it refuses)."""
        line = line_from_termios(new)
        if isinstance(line, str):
            raise IoctlError(errno.EINVAL)
        if (new["cflag"] & CBAUD) == 0 and self.termios is not None:
            new = dict(new, ispeed=self.termios["ispeed"], ospeed=self.termios["ospeed"])
        if self.drv is not None:
            try:
                reply = self._call("set_line", **line)
            except DriverRefused as exc:
                self.counters["line_refused"] += 1
                log.warning("driver refused set_line %s: %s", line, exc)
                if not reapply:
                    raise IoctlError(errno.EINVAL) from None
                reply = True   # at an attach: our settings stay ours, the UART keeps the driver's
            if reply is None and not reapply:
                raise IoctlError(errno.EIO)
        self.termios = new
        self.dp.set_read_mode(new["cc"][VMIN], new["cc"][VTIME])
        self.counters["line_applied"] += 1

    def _apply_modem(self):
        try:
            self._call("set_modem", dtr=self.modem["dtr"], rts=self.modem["rts"], loop=self.modem["loop"])
        except DriverRefused as exc:
            log.warning("driver refused set_modem: %s", exc)

    def _break(self, on):
        if self.drv is None:
            return
        try:
            self._call("break", on=on)
        except DriverRefused as exc:
            log.warning("driver refused break: %s", exc)

    def _flush(self, rx, tx):
        if rx:
            self.dp.flush_input()
        if self.drv is not None:
            try:
                self._call("flush", rx=rx, tx=tx)
            except DriverRefused as exc:
                log.warning("driver refused flush: %s", exc)
            if rx:
                self.dp.flush_input()   # what arrived while the UART's FIFO was being emptied
            if self.drv is not None:
                self.dp.refresh()       # TIOCOUTQ and poll right after see the emptied TX ring

    def _after_drain(self, unique, fh, kind, then):
        """Run then() once the transmitter is empty (the driver's drain), keeping the caller waiting."""
        if self.drv is None:
            then()
            return
        w = Waiter(unique, fh, kind, then=None)

        def done():
            if w in self.waiters:
                self.waiters.remove(w)
                then()
        w.then = done
        try:
            w.rid = self.drv.send("drain")
        except (OSError, ConnectionError) as exc:
            self.driver_down(str(exc))
            self._reply(unique, -errno.EIO)
            return
        self.waiters.append(w)

    def _timed_break(self, unique, fh, seconds):
        self._break(True)
        w = Waiter(unique, fh, "break")
        self.waiters.append(w)

        def end():
            if w in self.waiters:
                self.waiters.remove(w)
                self._break(False)
                self._ok(unique)
        w.timer = self.sef.loop.call_later(seconds, end)

    def _finish(self, w, error):
        """A waiting ioctl ends with error (EINTR, EIO); a break in progress is ended."""
        if w not in self.waiters:
            return
        self.waiters.remove(w)
        if w.timer is not None:
            w.timer.cancel()
            if self.drv is not None:
                self._break(False)
        self._reply(w.unique, error)
        if not any(x.kind == "TIOCMIWAIT" for x in self.waiters):
            self.dp.want_state = False

    def _check_waits(self):
        st = self.dp.port_state()
        if st is None:
            return
        now, msr = st["icount"][:4], st["msr"]
        for w in [w for w in self.waiters if w.kind == "TIOCMIWAIT"]:
            if w.counts is None:
                w.counts = (now, msr)
                continue
            # A transition the driver counted, or a level that differs from the one at the start: the
            # UART's loopback (QEMU's too) changes the levels without setting MSR's delta bits.
            if any(now[i] != w.counts[0][i] or (msr ^ w.counts[1]) & WAIT_MSR[line]
                   for line, i in WAIT_LINES.items() if w.mask & line):
                self.waiters.remove(w)
                self._ok(w.unique)
        if not any(x.kind == "TIOCMIWAIT" for x in self.waiters):
            self.dp.want_state = False

    # -- DS, status, tick -------------------------------------------------------------------------------
    def on_ds(self):
        for what, detail in driver_news(self.ds, "chr", self.label, log):
            if what == "up":
                self.driver_up(detail)
            else:
                self.driver_down(detail)

    def status(self):
        return dict(self.counters, **self.dp.counters(), state=self.state, generation=self.generation,
                    device=self.path, files=len(self.files), exclusive=self.exclusive,
                    modem=self.modem, waiting_ioctls=len(self.waiters), last_fault=self.last_fault,
                    line=line_from_termios(self.termios) if self.termios else None)

    def publish_status(self):
        try:
            self.ds.publish(self._status_key, json.dumps(self.status(), sort_keys=True), overwrite=True)
        except DSError as exc:
            log.debug("status not published: %s", exc)

    def tick(self):
        now = time.monotonic()
        if self.drv is None and self.pending_up is not None:
            self.driver_up(self.pending_up)
        self.dp.service()           # VTIME timers; a doorbell the driver skipped
        self.dp.kick()              # or one of ours it missed
        if self.waiters and self.dp.want_state:
            self._check_waits()
        if self.drv is not None and self.drv.events:
            events, self.drv.events = self.drv.events, []
            self._take_events(events)
        if self.ds.has_notifications():
            self.on_ds()
        if now >= self._status_due:
            self._status_due = now + STATUS_INTERVAL
            self.publish_status()
        self.sef.loop.call_later(TICK, self.tick)


def main(argv=None):
    runtime = os.environ.get("RSD_RUNTIME_DIR", "/run/rsd")
    p = argparse.ArgumentParser(prog="cuse-frontend", description="CUSE character device front end for a serial driver")
    p.add_argument("--label", required=True, help="the serial driver's label (drv.chr.<label>)")
    p.add_argument("--name", required=True, help="the device name its service file gives ([resources] cuse)")
    p.add_argument("--runtime-dir", default=runtime)
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO,
                        format="cuse-frontend[%s]: %%(message)s" % a.name, stream=sys.stderr)
    try:
        fe = CuseFrontend(a.label, a.name, a.runtime_dir)
    except DSError as exc:
        print("cuse-frontend: cannot start: %s" % exc, file=sys.stderr)
        return 1
    sef = SEF()
    sef.on_init_fresh(fe.start)
    sef.on_init_restart(lambda sef, reason, restarts: fe.start(sef))
    return sef.run()


if __name__ == "__main__":
    sys.exit(main())
