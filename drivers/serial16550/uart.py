"""The 16550A itself: probe, line settings, FIFOs, modem lines, and the
interrupt-time work (drain RX, fill TX), all through port I/O granted by
/dev/rsdrv.  Bursts go out as one batched ioctl (VDEVIO) each.
"""

from dataclasses import asdict, dataclass

from . import regs as R

BAUD_MIN, BAUD_MAX = 50, R.BAUD_BASE
PARITIES = {"none": 0, "odd": R.LCR_PEN, "even": R.LCR_PEN | R.LCR_EPS,
            "mark": R.LCR_PEN | R.LCR_STICK, "space": R.LCR_PEN | R.LCR_EPS | R.LCR_STICK}


# The RX FIFO interrupts at 8 bytes: half full, room for 8 more while we answer.
RX_TRIGGER_FCR = R.FCR_TRIGGER_8
RX_TRIGGER_BYTES = 8


class UartError(Exception):
    pass


@dataclass
class LineSettings:
    baud: int = 115200
    bits: int = 8
    parity: str = "none"
    stop: int = 1
    rtscts: bool = False

    def check(self):
        """Refuse what the UART cannot do, saying what it can."""
        if not isinstance(self.baud, int) or not BAUD_MIN <= self.baud <= BAUD_MAX:
            raise UartError("baud %r out of range %d..%d" % (self.baud, BAUD_MIN, BAUD_MAX))
        if R.BAUD_BASE % self.baud and abs(R.BAUD_BASE / round(R.BAUD_BASE / self.baud) - self.baud) > self.baud * 0.03:
            raise UartError("baud %d is more than 3%% off any divisor of %d" % (self.baud, R.BAUD_BASE))
        if self.bits not in (5, 6, 7, 8):
            raise UartError("data bits must be 5, 6, 7 or 8")
        if self.parity not in PARITIES:
            raise UartError("parity must be one of %s" % ", ".join(PARITIES))
        if self.stop not in (1, 2):
            raise UartError("stop bits must be 1 or 2")
        if not isinstance(self.rtscts, bool):
            raise UartError("rtscts must be true or false")
        return self

    @property
    def divisor(self):
        return max(1, round(R.BAUD_BASE / self.baud))

    @property
    def lcr(self):
        return ((self.bits - 5) | (R.LCR_STB if self.stop == 2 else 0) | PARITIES[self.parity])

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        known = {k: d[k] for k in ("baud", "bits", "parity", "stop", "rtscts") if k in d}
        return cls(**known).check()


@dataclass
class Counters:
    rx_bytes: int = 0
    tx_bytes: int = 0
    overrun: int = 0
    parity: int = 0
    framing: int = 0
    brk: int = 0
    interrupts: int = 0
    modem_changes: int = 0
    rx_dropped: int = 0    # received while no client was attached

    def to_dict(self):
        return asdict(self)


@dataclass
class ModemLines:
    dtr: bool = True
    rts: bool = True
    loop: bool = False


class Uart:
    """One 16550A at `base`, reached through a libdrv PortIO."""

    def __init__(self, pio, base):
        self.pio = pio
        self.base = base
        self.line = LineSettings()
        self.modem = ModemLines()
        self.counters = Counters()
        self.fifo = False
        self.tx_stopped = False     # CTS low with rtscts on
        self.msr = 0
        self._rx = {n: self._rx_batch(n) for n in (1, RX_TRIGGER_BYTES)}

    # -- helpers ---------------------------------------------------------------
    def inb(self, reg):
        return self.pio.inb(self.base + reg)

    def outb(self, reg, value):
        self.pio.outb(self.base + reg, value)

    def _run(self, ops):
        """ops: [("in", reg) | ("out", reg, value)]; returns the values read."""
        b = self.pio.batch(len(ops))
        slots = []
        for op in ops:
            if op[0] == "in":
                slots.append(b.add_in(self.base + op[1]))
            else:
                b.add_out(self.base + op[1], op[2])
        self.pio.run(b)
        return [b.value(i) for i in slots]

    # -- probe -------------------------------------------------------------------
    def probe(self):
        """Check that a UART answers at base and has working 16550A FIFOs."""
        got = self._run([("out", R.SCR, 0x5A), ("in", R.SCR), ("out", R.SCR, 0xA5), ("in", R.SCR)])
        if got != [0x5A, 0xA5]:
            raise UartError("no UART at port 0x%x: scratch register read back %s"
                            % (self.base, ["0x%02x" % v for v in got]))
        (iir,) = self._run([("out", R.FCR, R.FCR_ENABLE), ("in", R.IIR)])
        self.fifo = (iir & R.IIR_FIFO_MASK) == R.IIR_FIFO_MASK
        return "16550A" if self.fifo else "16450 (no working FIFO)"

    # -- configuration -----------------------------------------------------------------
    def configure(self, line=None, modem=None, clear_fifos=False):
        """Program line settings, FIFOs, modem lines and interrupts in one burst.

        Only a fresh start clears the FIFOs: after a driver restart they hold
        bytes already confirmed to the front end (TX) or not yet read (RX).
        """
        if line is not None:
            self.line = line.check()
        if modem is not None:
            self.modem = modem
        lcr = self.line.lcr
        div = self.line.divisor
        fcr = 0
        if self.fifo:
            fcr = R.FCR_ENABLE | RX_TRIGGER_FCR | (R.FCR_CLEAR_RX | R.FCR_CLEAR_TX if clear_fifos else 0)
        ops = [
            ("out", R.IER, 0),
            ("out", R.LCR, lcr | R.LCR_DLAB),
            ("out", R.DLL, div & 0xFF),
            ("out", R.DLM, div >> 8),
            ("out", R.LCR, lcr),
            ("out", R.FCR, fcr),
            ("out", R.MCR, self._mcr()),
            ("in", R.LSR), ("in", R.IIR), ("in", R.MSR),   # clear stale causes (RBR is data: kept)
            ("out", R.IER, R.IER_ERBFI | R.IER_ETBEI | R.IER_ELSI | R.IER_EDSSI),
        ]
        self.msr = self._run(ops)[2]
        self._update_flow()

    def _mcr(self):
        m = R.MCR_OUT2  # gates the IRQ line on a PC
        if self.modem.dtr:
            m |= R.MCR_DTR
        if self.modem.rts:
            m |= R.MCR_RTS
        if self.modem.loop:
            m |= R.MCR_LOOP
        return m

    def set_modem(self, dtr=None, rts=None, loop=None):
        if dtr is not None:
            self.modem.dtr = bool(dtr)
        if rts is not None:
            self.modem.rts = bool(rts)
        if loop is not None:
            self.modem.loop = bool(loop)
        self.outb(R.MCR, self._mcr())
        self.msr = self.inb(R.MSR)
        self._update_flow()

    def set_break(self, on):
        lcr = self.line.lcr | (R.LCR_BREAK if on else 0)
        self.outb(R.LCR, lcr)

    def read_divisor(self):
        """The divisor actually latched in the UART (what a test can observe)."""
        lcr, dll, dlm, _ = self._run([("in", R.LCR), ("out", R.LCR, self.line.lcr | R.LCR_DLAB),
                                      ("in", R.DLL), ("in", R.DLM), ("out", R.LCR, self.line.lcr),
                                      ("in", R.LCR)])
        return dll | (dlm << 8)

    def modem_status(self):
        m = self.msr
        return {"cts": bool(m & R.MSR_CTS), "dsr": bool(m & R.MSR_DSR), "ri": bool(m & R.MSR_RI),
                "dcd": bool(m & R.MSR_DCD), "dtr": self.modem.dtr, "rts": self.modem.rts,
                "loop": self.modem.loop}

    def _update_flow(self):
        self.tx_stopped = self.line.rtscts and not self.msr & R.MSR_CTS

    # -- interrupt-time work ------------------------------------------------------------
    def _count_errors(self, lsr):
        c = self.counters
        if lsr & R.LSR_OE:
            c.overrun += 1
        if lsr & R.LSR_PE:
            c.parity += 1
        if lsr & R.LSR_FE:
            c.framing += 1
        if lsr & R.LSR_BI:
            c.brk += 1

    def _rx_batch(self, n):
        """n (LSR, RBR) pairs, then LSR and IIR: what is left to read."""
        b = self.pio.batch(2 * n + 2)
        for _ in range(n):
            b.add_in(self.base + R.LSR)
            b.add_in(self.base + R.RBR)
        b.add_in(self.base + R.LSR)
        b.add_in(self.base + R.IIR)
        return b

    def drain_rx(self, known):
        """Read the RX FIFO, `known` bytes of which are certainly there.

        RBR is read only for bytes known to be present: a batch cannot stop
        early, and reading RBR after LSR said "empty" would swallow a byte
        that arrived in between.  Each batch ends with LSR and IIR, which
        say how many bytes the next batch may take: a FIFO trigger's worth
        (IIR: data available), one (LSR: data ready), or none.
        """
        out = bytearray()
        n = min(known, RX_TRIGGER_BYTES) if self.fifo else min(known, 1)
        while n:
            b = self._rx[n]
            self.pio.run(b)
            for i in range(n):
                lsr = b.value(2 * i)
                if lsr & R.LSR_ERRORS:
                    self._count_errors(lsr)
                out.append(b.value(2 * i + 1))
            lsr, iir = b.value(2 * n), b.value(2 * n + 1)
            if lsr & R.LSR_ERRORS:
                self._count_errors(lsr)
            if self.fifo and iir & R.IIR_ID_MASK == R.IIR_RX_DATA:
                n = RX_TRIGGER_BYTES
            else:
                n = 1 if lsr & R.LSR_DR else 0
        self.counters.rx_bytes += len(out)
        return bytes(out)

    def rx_ready(self):
        """Bytes certainly waiting (0 or 1), from LSR: for the poll."""
        lsr = self.inb(R.LSR)
        if lsr & R.LSR_ERRORS:
            self._count_errors(lsr)
        return 1 if lsr & R.LSR_DR else 0

    def tx_room(self):
        """Bytes the transmitter takes now (a FIFO's worth when THR is empty)."""
        if self.tx_stopped:
            return 0
        lsr = self.inb(R.LSR)
        if lsr & R.LSR_ERRORS:
            self._count_errors(lsr)
        if not lsr & R.LSR_THRE:
            return 0
        return R.FIFO_SIZE if self.fifo else 1

    def transmit(self, data):
        """Write up to one FIFO's worth (the caller checked tx_room)."""
        b = self.pio.batch(len(data))
        for byte in data:
            b.add_out(self.base + R.THR, byte)
        self.pio.run(b)
        self.counters.tx_bytes += len(data)

    def pending_causes(self):
        """Read IIR until no interrupt is pending.

        Returns (rx_known, tx, modem, line): rx_known is how many received
        bytes are certainly in the FIFO (a trigger's worth, one, or none).
        """
        rx = 0
        tx = modem = line = False
        for _ in range(8):
            iir = self.inb(R.IIR)
            if iir & R.IIR_NO_INT:
                break
            cause = iir & R.IIR_ID_MASK
            if cause == R.IIR_RX_DATA:
                rx = RX_TRIGGER_BYTES if self.fifo else 1
                break  # draining clears it; reading IIR again would just repeat it
            if cause == R.IIR_CHAR_TIMEOUT:
                rx = 1
                break
            if cause == R.IIR_THR_EMPTY:
                tx = True  # cleared by this IIR read
            elif cause == R.IIR_LINE_STATUS:
                line = True
                lsr = self.inb(R.LSR)
                self._count_errors(lsr)
                if lsr & R.LSR_DR:
                    rx = 1
                    break
            elif cause == R.IIR_MODEM_STATUS:
                modem = True
                self.msr = self.inb(R.MSR)
                self.counters.modem_changes += 1
                self._update_flow()
        return rx, tx, modem, line
