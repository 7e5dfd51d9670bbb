"""The 16550 driver service: one UART, run by rsd as an unprivileged process.

    program = "drivers.serial16550"   args = ["--base", "0x2f8", "--irq", "3"]

It reaches the UART only through the /dev/rsdrv endpoint rsd passed it
(ports and IRQ line from the service's [resources]), serves its front end
on the listening socket rsd created, and backs up its line settings in DS
so that a restarted copy programs the UART the same way.

Client protocol (libdrv.wire frames on the service socket; docs/serial.md):
  requests  open | write data | set_line baud bits parity stop rtscts
            | set_modem dtr rts loop | break on | status
  replies   {"id", "ok": true, ...} or {"id", "ok": false, "err", "msg"}
  events    {"ev": "rx", "data"} {"ev": "txdone", "n"} {"ev": "modem", ...}
"""

import argparse
import json
import sys
import time

from libdrv.irq import IrqLine
from libdrv.portio import PortIO
from libdrv.rsdrv import Endpoint
from libdrv.sef import SEF
from libdrv.wire import FrameError, FrameReader, encode

from . import regs as R
from .uart import LineSettings, ModemLines, Uart, UartError

TX_QUEUE_MAX = 64 << 10      # bytes a client may have queued for transmission
CLIENT_OUT_MAX = 256 << 10   # bytes queued towards a client before RX is dropped
POLL_INTERVAL = 0.05         # safety net for a lost edge on the ISA IRQ line
MAX_CLIENT_FRAME = TX_QUEUE_MAX + 4096


class Client:
    def __init__(self, sock):
        self.sock = sock
        self.reader = FrameReader(MAX_CLIENT_FRAME)
        self.out = bytearray()


class SerialDriver:
    def __init__(self, sef, base, irq):
        self.sef = sef
        self.base = base
        self.irq_no = irq
        self.uart = None
        self.irq = None
        self.clients = []
        self.owner = None          # the client that opened the port: gets RX
        self.txq = bytearray()
        self.model = None

    # -- life cycle ---------------------------------------------------------
    def init_fresh(self, sef):
        self._bring_up(LineSettings(), ModemLines(), fresh=True)
        self._backup()

    def init_restart(self, sef, reason, restarts):
        saved = sef.restore_state("line")
        line, modem = LineSettings(), ModemLines()
        if saved:
            d = json.loads(saved)
            line = LineSettings.from_dict(d.get("line", {}))
            modem = ModemLines(**{k: bool(v) for k, v in d.get("modem", {}).items()
                                  if k in ("dtr", "rts", "loop")})
        self._bring_up(line, modem)
        print("serial16550: restarted after %s (restart %d); line %s restored"
              % (reason, restarts, line.to_dict()), file=sys.stderr, flush=True)

    def _bring_up(self, line, modem, fresh=False):
        ep = Endpoint.inherited()
        pio = PortIO(ep)
        self.uart = Uart(pio, self.base)
        self.model = self.uart.probe()
        self.uart.configure(line, modem, clear_fifos=fresh)
        self.irq = IrqLine(ep, self.irq_no)
        self.sef.add_reader(self.irq, self.on_irq)
        self.sef.loop.call_later(POLL_INTERVAL, self.poll)

    def _backup(self):
        m = self.uart.modem
        state = {"line": self.uart.line.to_dict(), "modem": {"dtr": m.dtr, "rts": m.rts, "loop": m.loop}}
        self.sef.save_state("line", json.dumps(state, sort_keys=True))

    # -- the device ---------------------------------------------------------------
    def on_irq(self):
        self.irq.take()
        self.service_device()
        self.irq.reenable()

    def poll(self):
        # An interrupt edge lost while the line was masked would stall us; look.
        self.service_device(polled=True)
        for c in list(self.clients):
            if c.out:
                self._flush(c)
        self.sef.loop.call_later(POLL_INTERVAL, self.poll)

    def service_device(self, polled=False):
        self.uart.counters.interrupts += not polled
        for _ in range(16):
            rx, tx, modem, line = self.uart.pending_causes()
            if not rx and polled:
                rx = self.uart.rx_ready()  # a byte whose timeout interrupt we missed
            if rx:
                data = self.uart.drain_rx(rx)
                if data:
                    self._deliver_rx(data)
            if modem:
                self._broadcast({"ev": "modem", **self.uart.modem_status()})
            sent = self._fill_tx()
            if not (rx or tx or modem or line or sent):
                break

    def _fill_tx(self):
        if not self.txq:
            return 0
        room = self.uart.tx_room()
        if not room:
            return 0
        chunk = bytes(self.txq[:room])
        del self.txq[:room]
        self.uart.transmit(chunk)
        if self.owner is not None:
            self._push(self.owner, {"ev": "txdone", "n": len(chunk)})
        return len(chunk)

    def _deliver_rx(self, data):
        if self.owner is None or len(self.owner.out) > CLIENT_OUT_MAX:
            self.uart.counters.rx_dropped += len(data)
            return
        self._push(self.owner, {"ev": "rx", "data": data})

    # -- clients ---------------------------------------------------------------------
    def accept(self, conn):
        conn.setblocking(False)
        c = Client(conn)
        self.clients.append(c)
        self.sef.add_reader(conn, self.on_client, c)

    def on_client(self, c):
        try:
            data = c.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(c)
            return
        try:
            msgs = c.reader.feed(data)
        except FrameError as exc:
            self._push(c, {"ok": False, "err": "EINVAL", "msg": "malformed frame: %s" % exc})
            self._drop(c)
            return
        for msg in msgs:
            self._push(c, self.handle(c, msg))
        self._fill_tx()

    def handle(self, c, msg):
        rid = msg.get("id")
        op = msg.get("op")
        handler = self.HANDLERS.get(op) if isinstance(op, str) else None
        try:
            if handler is None:
                raise UartError("unknown operation %r; valid: %s" % (op, ", ".join(sorted(self.HANDLERS))))
            reply = handler(self, c, msg) or {}
            reply["ok"] = True
        except (UartError, KeyError, TypeError, ValueError) as exc:
            reply = {"ok": False, "err": "EINVAL", "msg": str(exc)}
        except _Again as exc:
            reply = {"ok": False, "err": "EAGAIN", "msg": str(exc)}
        reply["id"] = rid
        return reply

    def do_open(self, c, msg):
        self.owner = c
        return {"line": self.uart.line.to_dict(), "modem": self.uart.modem_status(),
                "generation": self.sef.generation, "model": self.model}

    def do_write(self, c, msg):
        data = msg["data"]
        if not isinstance(data, bytes):
            raise TypeError("data must be bytes")
        room = TX_QUEUE_MAX - len(self.txq)
        if room <= 0:
            raise _Again("transmit queue full (%d bytes); wait for txdone" % TX_QUEUE_MAX)
        taken = data[:room]
        self.txq += taken
        return {"n": len(taken)}

    def do_set_line(self, c, msg):
        d = dict(self.uart.line.to_dict())
        d.update({k: msg[k] for k in ("baud", "bits", "parity", "stop", "rtscts") if k in msg})
        line = LineSettings.from_dict(d)
        # Let queued bytes leave at the old settings first (tcsetattr TCSADRAIN semantics
        # are the front end's business; here we just do not corrupt a byte in flight).
        self._wait_tx_empty()
        self.uart.configure(line)
        self._backup()
        return {"line": line.to_dict(), "divisor": self.uart.read_divisor()}

    def do_set_modem(self, c, msg):
        self.uart.set_modem(*(_flag(msg, name) for name in ("dtr", "rts", "loop")))
        self._backup()
        return {"modem": self.uart.modem_status()}

    def do_break(self, c, msg):
        on = _flag(msg, "on")
        if on is None:
            raise UartError("break needs on: true or false")
        self.uart.set_break(on)

    def do_status(self, c, msg):
        return {"line": self.uart.line.to_dict(), "modem": self.uart.modem_status(),
                "counters": self.uart.counters.to_dict(), "divisor": self.uart.read_divisor(),
                "tx_queued": len(self.txq), "model": self.model, "generation": self.sef.generation}

    HANDLERS = {"open": do_open, "write": do_write, "set_line": do_set_line,
                "set_modem": do_set_modem, "break": do_break, "status": do_status}

    def _wait_tx_empty(self, limit=2.0):
        deadline = time.monotonic() + limit
        while (self.txq or not self.uart.inb(R.LSR) & R.LSR_TEMT) and time.monotonic() < deadline:
            self._fill_tx()
            time.sleep(0.0005)

    def _push(self, c, msg):
        if c.sock.fileno() < 0:
            return
        c.out += encode(msg)
        self._flush(c)

    def _broadcast(self, msg):
        for c in list(self.clients):
            self._push(c, msg)

    def _flush(self, c):
        try:
            n = c.sock.send(c.out)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError:
            self._drop(c)
            return
        del c.out[:n]  # a remainder goes out on the next push or poll

    def _drop(self, c):
        self.sef.remove_reader(c.sock)
        if c in self.clients:
            self.clients.remove(c)
        if self.owner is c:
            self.owner = None
        c.sock.close()

    def exit(self, sef):
        # Leave the UART quiet: no interrupts from a port nobody serves.
        if self.uart is not None:
            self.uart.outb(R.IER, 0)


def _flag(msg, name):
    """A boolean field of a request, or None when absent; anything else is refused."""
    value = msg.get(name)
    if value is not None and not isinstance(value, bool):
        raise UartError("%s must be true or false, not %r" % (name, value))
    return value


class _Again(Exception):
    pass


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
    sef.on_accept(drv.accept)
    sef.on_exit(drv.exit)
    return sef.run()


if __name__ == "__main__":
    sys.exit(main())
