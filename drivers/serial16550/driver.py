"""The 16550 driver service: one UART, run by rsd as an unprivileged process.

    program = "drivers.serial16550.driver"   args = ["--base", "0x2f8", "--irq", "3"]

It reaches the UART only through the /dev/rsdrv endpoint rsd passed it
(ports and IRQ line from the service's [resources]), serves its front end
on the listening socket rsd created, and backs up its line settings in DS
so that a restarted copy programs the UART the same way.

Bytes move only through the front end's shared memory (libdrv/chrshm.h),
by the C data path (_path.pyx) called straight from the loop on the IRQ
and on the front end's doorbell.  The socket (libdrv.drvserve frames;
docs/serial.md) carries requests:
  attach (+ memfd, driver doorbell, front end doorbell)
  | set_line baud bits parity stop rtscts ixon ixoff vstart vstop
  | set_modem dtr rts loop | break on | flush rx tx | drain | status | regs
  replies {"id", "ok": true, ...} or {"id", "ok": false, "err", "msg"};
  event {"ev": "refused", "msg"} before a front end that broke the rules is dropped.
"""

import argparse
import json
import os
import struct
import sys
import time

from libdrv import chrshm
from libdrv.drvserve import DriverServer, Refused, close_fds, is_eventfd
from libdrv.irq import IrqLine
from libdrv.portio import PortIO
from libdrv.rsdrv import Endpoint
from libdrv.sef import SEF

from . import regs as R
from ._path import SerialPath
from .uart import FIELDS, LineSettings, ModemLines, Uart, UartError

POLL_INTERVAL = 0.05         # safety net for a lost edge on the ISA IRQ line
RESTORE_WAIT = 0.5           # s after a restart's ready: DS's copy of the software flow control
SOFT_FIELDS = ("rtscts", "ixon", "ixoff", "vstart", "vstop")   # line settings the UART does not hold
DRAIN_CHECK = 0.002          # how often a pending drain looks at the transmitter
ATTACH_FDS = 3
# The front end's counters in the header (chrshm.h): tx_posted, rx_consumed.
_FRONTEND_COUNTERS = struct.Struct("<2I")
_FRONTEND_OFF = 64

DEFERRED = object()          # a handler's reply comes later (drain)


class SerialServer(DriverServer):
    """DriverServer whose handlers may answer later: a handler returning DEFERRED pushes its
    reply itself (the drain request waits for the transmitter without blocking the loop)."""

    def _handle(self, c, msg):
        rid = msg.get("id")
        op = msg.get("op")
        handler = self.handlers.get(op) if isinstance(op, str) else None
        try:
            if handler is None:
                raise Refused("EINVAL", "unknown operation %r; valid: %s" % (op, ", ".join(sorted(self.handlers))))
            reply = handler(c, msg)
            if reply is DEFERRED:
                return None
            reply = reply or {}
            reply["ok"] = True
        except Refused as exc:
            reply = {"ok": False, "err": exc.err, "msg": str(exc)}
        reply["id"] = rid
        return reply

    def push(self, c, msg):
        if msg is not None:
            super().push(c, msg)


class Attachment:
    def __init__(self, conn, memfd, doorbell, notify):
        self.conn, self.memfd, self.doorbell, self.notify = conn, memfd, doorbell, notify


class SerialDriver:
    def __init__(self, sef, base, irq):
        self.sef = sef
        self.base = base
        self.irq_no = irq
        self.ep = self.uart = self.irq = self.path = None
        self.line = LineSettings()
        self.modem = ModemLines()
        self.model = None
        self.att = None
        self.drains = []             # (connection, request id, deadline)
        self.drain_timer = None
        self.refused = 0
        self.restore_timer = None
        self.set_since_restart = set()   # line fields a request set since the restart (DS's copy yields)
        self.server = SerialServer(sef, "serial16550", {
            "attach": self.do_attach, "set_line": self.do_set_line, "set_modem": self.do_set_modem,
            "break": self.do_break, "flush": self.do_flush, "drain": self.do_drain,
            "status": self.do_status, "regs": self.do_regs}, max_fds=ATTACH_FDS, on_drop=self._dropped)

    # -- life cycle ---------------------------------------------------------------------------
    def init_fresh(self, sef):
        self._bring_up(fresh=True)
        self._backup()

    def init_restart(self, sef, reason, restarts):
        # DS stays off the way to ready: the UART itself still holds what the previous incarnation
        # programmed (speed, bits, parity, stop bits, modem lines).  What only software knows
        # (rtscts, ixon, ixoff, their characters) the front end sends again after its attach; DS's
        # copy is read RESTORE_WAIT after ready, for what no request has set by then.
        self.ep = Endpoint.inherited()
        self.uart = Uart(PortIO(self.ep), self.base)
        source = "the UART"
        try:
            self.line, self.modem = self.uart.read_back()
            self.restore_timer = sef.loop.call_later(RESTORE_WAIT, self._restore_from_ds)
        except UartError as exc:
            print("serial16550: %s: the settings come from DS" % exc, file=sys.stderr, flush=True)
            source = "DS"
            self._restore_from_ds(program=False)
        self._bring_up(fresh=False)
        print("serial16550: restarted after %s (restart %d); line %s from %s"
              % (reason, restarts, self.line.to_dict(), source), file=sys.stderr, flush=True)

    def _restore_from_ds(self, program=True):
        """The backed-up settings: all of them (program=False, before the UART is set up), or
        the software flow control that no set_line has given since the restart."""
        self.restore_timer = None
        try:
            saved = self.sef.restore_state("line")
        except Exception as exc:     # DS away: the settings the UART and the front end gave stay
            print("serial16550: DS: %s" % exc, file=sys.stderr, flush=True)
            return
        if not saved:
            return
        d = json.loads(saved)
        try:
            line = LineSettings.from_dict(d.get("line", {}))
        except (UartError, TypeError) as exc:
            print("serial16550: the backed-up line settings are unusable (%s)" % exc, file=sys.stderr, flush=True)
            return
        if not program:
            self.line = line
            self.modem = ModemLines(**{k: bool(v) for k, v in d.get("modem", {}).items()
                                       if k in ("dtr", "rts", "loop")})
            return
        if "modem" not in self.set_since_restart:
            # MCR's RTS may have been down only because the previous incarnation held RX back.
            modem = ModemLines(**{k: bool(v) for k, v in d.get("modem", {}).items() if k in ("dtr", "rts", "loop")})
            if (modem.dtr, modem.rts, modem.loop) != (self.modem.dtr, self.modem.rts, self.modem.loop):
                self.modem = modem
                self.path.set_mcr(self.uart.mcr(modem))
        soft = {k: getattr(line, k) for k in SOFT_FIELDS if k not in self.set_since_restart}
        if any(getattr(self.line, k) != v for k, v in soft.items()):
            merged = dict(self.line.to_dict(), **soft)
            self.line = LineSettings.from_dict(merged)
            self._program()

    def _bring_up(self, fresh):
        if self.ep is None:
            self.ep = Endpoint.inherited()
            self.uart = Uart(PortIO(self.ep), self.base)
        self.model = self.uart.probe()
        self.irq = IrqLine(self.ep, self.irq_no)
        self.path = SerialPath(self.ep.fileno(), self.base, self.uart.fifo, self.irq.fileno(), self.irq_no)
        self.path.set_loop(self.sef.loop)
        self._program(clear_fifos=fresh)
        self.sef.add_reader(self.irq, self.path.on_irq)
        self.sef.loop.call_later(POLL_INTERVAL, self._poll)

    def _program(self, clear_fifos=False):
        ln = self.line
        self.path.configure(ln.lcr, ln.divisor, self.uart.fcr, self.uart.mcr(self.modem), clear_fifos)
        self.path.set_flow(ln.rtscts, ln.ixon, ln.ixoff, ln.vstart, ln.vstop)

    def _backup(self):
        m = self.modem
        state = {"line": self.line.to_dict(), "modem": {"dtr": m.dtr, "rts": m.rts, "loop": m.loop}}
        self.sef.save_state("line", json.dumps(state, sort_keys=True))

    def _poll(self):
        self.path.poll()
        self.sef.loop.call_later(POLL_INTERVAL, self._poll)

    # -- the front end's attachment -------------------------------------------------------------------
    def do_attach(self, c, msg):
        fds = self.server.take_fds(c)
        try:
            if self.att is not None and self.att.conn is not c and self.att.conn.hung_up():
                self.server.drop(self.att.conn)      # its front end is gone; we had not read the EOF yet
            if self.att is not None:
                raise Refused("EBUSY", "a front end is attached already (one at a time)")
            if len(fds) != ATTACH_FDS:
                raise Refused("EINVAL", "attach carries 3 fds (shared memory, driver doorbell, front end "
                              "doorbell) in the sendmsg of the frame's first byte; got %d" % len(fds))
            memfd, doorbell, notify = fds
            try:
                chrshm.check_fd(memfd)
            except chrshm.ChrshmError as exc:
                raise Refused("EINVAL", str(exc)) from None
            for what, fd in (("driver doorbell", doorbell), ("front end doorbell", notify)):
                if not is_eventfd(fd):
                    raise Refused("EINVAL", "the %s (fd %d of the attach) is not an eventfd" % (what, fd))
                os.set_blocking(fd, False)
            posted, consumed = _FRONTEND_COUNTERS.unpack(os.pread(memfd, 8, _FRONTEND_OFF))
            if posted or consumed:
                raise Refused("EINVAL", "tx_posted %d, rx_consumed %d at attach: both must be 0"
                              % (posted, consumed))
        except Refused:
            close_fds(fds)
            if self.att is None or self.att.conn is not c:
                c.closing = True     # the contract: an error reply, then the connection is closed
            raise
        self.att = Attachment(c, memfd, doorbell, notify)
        self.sef.add_reader(doorbell, self.path.on_doorbell)
        self.path.attach(memfd, doorbell, notify, self._violation)
        return {"line": self.line.to_dict(), "modem": self._modem_status(),
                "generation": self.sef.generation, "model": self.model}

    def _violation(self, why):
        """From the data path: the attached front end broke chrshm.h's rules."""
        if self.att is None:
            return
        print("serial16550: refusing the front end: %s" % why, file=sys.stderr, flush=True)
        self.refused += 1
        c = self.att.conn
        self.server.push(c, {"ev": "refused", "msg": why})
        self.server.drop(c)

    def _dropped(self, c):
        self.drains = [d for d in self.drains if d[0] is not c]
        if self.att is not None and self.att.conn is c:
            att, self.att = self.att, None
            self.sef.remove_reader(att.doorbell)
            self.path.detach()
            close_fds([att.memfd, att.doorbell, att.notify])

    # -- requests ---------------------------------------------------------------------------------------
    def do_set_line(self, c, msg):
        d = self.line.to_dict()
        d.update({k: msg[k] for k in FIELDS if k in msg})
        self.set_since_restart.update(k for k in FIELDS if k in msg)
        try:
            line = LineSettings.from_dict(d)
        except (UartError, TypeError) as exc:
            raise Refused("EINVAL", str(exc)) from None
        self.line = line
        self._program()
        self._backup()
        return {"line": line.to_dict(), "divisor": self._divisor()}

    def do_set_modem(self, c, msg):
        dtr, rts, loop = (_flag(msg, name) for name in ("dtr", "rts", "loop"))
        self.set_since_restart.add("modem")
        m = self.modem
        self.modem = ModemLines(m.dtr if dtr is None else dtr, m.rts if rts is None else rts,
                                m.loop if loop is None else loop)
        self.path.set_mcr(self.uart.mcr(self.modem))
        self._backup()
        return {"modem": self._modem_status()}

    def do_break(self, c, msg):
        on = _flag(msg, "on")
        if on is None:
            raise Refused("EINVAL", "break needs on: true or false")
        self.path.set_break(on)

    def do_flush(self, c, msg):
        rx, tx = _flag(msg, "rx"), _flag(msg, "tx")
        if not rx and not tx:
            raise Refused("EINVAL", "flush needs rx: true and/or tx: true")
        self.path.flush(bool(rx), bool(tx))
        return {"position": self.path.position()}

    def do_drain(self, c, msg):
        self.path.read_lsr()
        self.path.service()
        if self.path.drained:
            return {}
        pos = self.path.position()
        pending = (pos["tx_posted"] - pos["tx_done"]) & 0xFFFFFFFF
        # The time the ring and the FIFO take on the line at this baud rate, twice, and a second more.
        bound = 1.0 + 2 * (pending + R.FIFO_SIZE) * 12 / self.line.baud
        self.drains.append((c, msg.get("id"), time.monotonic() + bound))
        if self.drain_timer is None:
            self.drain_timer = self.sef.loop.call_later(DRAIN_CHECK, self._check_drains)
        return DEFERRED

    def _check_drains(self):
        self.drain_timer = None
        self.path.read_lsr()
        self.path.service()
        now = time.monotonic()
        waiting = []
        for c, rid, deadline in self.drains:
            if self.path.drained:
                self.server.push(c, {"id": rid, "ok": True})
            elif now > deadline:
                self.server.push(c, {"id": rid, "ok": False, "err": "ETIMEDOUT",
                                     "msg": "the transmitter did not drain (%s)" % self.path.position()})
            else:
                waiting.append((c, rid, deadline))
        self.drains = waiting
        if waiting:
            self.drain_timer = self.sef.loop.call_later(DRAIN_CHECK, self._check_drains)

    def do_status(self, c, msg):
        counters = dict(self.path.icount(), **self.path.counters(), refused=self.refused)
        # Names the tests and tools have used since the first version of this driver.
        counters.update(rx_bytes=counters["rx"], tx_bytes=counters["tx"], framing=counters["frame"])
        return {"line": self.line.to_dict(), "modem": self._modem_status(), "counters": counters,
                "divisor": self._divisor(), "model": self.model, "generation": self.sef.generation,
                "attached": self.att is not None, "position": self.path.position()}

    def do_regs(self, c, msg):
        return {"regs": self.path.regs()}

    def _divisor(self):
        r = self.path.regs()
        return r["dll"] | r["dlm"] << 8

    def _modem_status(self):
        m = self.path.msr
        return {"cts": bool(m & R.MSR_CTS), "dsr": bool(m & R.MSR_DSR), "ri": bool(m & R.MSR_RI),
                "dcd": bool(m & R.MSR_DCD), "dtr": self.modem.dtr, "rts": self.modem.rts,
                "loop": self.modem.loop}

    def exit(self, sef):
        # Leave the UART quiet: no interrupts from a port nobody serves.
        if self.path is not None:
            self.path.quiet()


def _flag(msg, name):
    """A boolean field of a request, or None when absent; anything else is refused."""
    value = msg.get(name)
    if value is not None and not isinstance(value, bool):
        raise Refused("EINVAL", "%s must be true or false, not %r" % (name, value))
    return value


def parse_args(argv):
    p = argparse.ArgumentParser(prog="serial16550")
    p.add_argument("--base", type=lambda s: int(s, 0), default=0x2F8, help="I/O port base (default 0x2f8, COM2)")
    p.add_argument("--irq", type=int, default=3, help="IRQ line (default 3)")
    a = p.parse_args(argv)
    if not 0 < a.base <= 0xFFF8:
        p.error("--base must be a port address 0x1..0xfff8")
    if not 0 <= a.irq < 256:
        p.error("--irq must be 0..255")
    return a


def main(argv=None):
    a = parse_args(sys.argv[1:] if argv is None else argv)
    sef = SEF()
    drv = SerialDriver(sef, a.base, a.irq)
    sef.on_init_fresh(drv.init_fresh)
    sef.on_init_restart(drv.init_restart)
    sef.on_accept(drv.server.accept)
    sef.on_exit(drv.exit)
    return sef.run()


if __name__ == "__main__":
    sys.exit(main())
