"""The 16550A itself: probe and line settings, through port I/O granted by
/dev/rsdrv.  The interrupt-time work (drain RX, fill TX) and the register
bursts of configuration are the C data path's (_path.pyx).
"""

from . import regs as R

BAUD_MIN, BAUD_MAX = 50, R.BAUD_BASE
PARITIES = {"none": 0, "odd": R.LCR_PEN, "even": R.LCR_PEN | R.LCR_EPS,
            "mark": R.LCR_PEN | R.LCR_STICK, "space": R.LCR_PEN | R.LCR_EPS | R.LCR_STICK}


# The RX FIFO interrupts at 8 bytes: half full, room for 8 more while we answer.
RX_TRIGGER_FCR = R.FCR_TRIGGER_8
RX_TRIGGER_BYTES = 8


class UartError(Exception):
    pass


FIELDS = ("baud", "bits", "parity", "stop", "rtscts", "ixon", "ixoff", "vstart", "vstop")


class LineSettings:
    """The line as a termios would say it (a plain class: a restart does not pay for dataclasses)."""
    __slots__ = FIELDS

    def __init__(self, baud=115200, bits=8, parity="none", stop=1, rtscts=False, ixon=False, ixoff=False,
                 vstart=0x11, vstop=0x13):
        self.baud, self.bits, self.parity, self.stop = baud, bits, parity, stop
        self.rtscts = rtscts
        self.ixon = ixon        # software flow control on TX: an XOFF received stops it until XON
        self.ixoff = ixoff      # on RX: XOFF sent when the RX ring is nearly full, XON once drained
        self.vstart = vstart    # XON (DC1)
        self.vstop = vstop      # XOFF (DC3)

    def __eq__(self, other):
        return isinstance(other, LineSettings) and self.to_dict() == other.to_dict()

    def check(self):
        """Refuse what the UART cannot do, saying what it can (the first wrong field)."""
        if not isinstance(self.baud, int) or isinstance(self.baud, bool) or not BAUD_MIN <= self.baud <= BAUD_MAX:
            raise UartError("baud %r out of range %d..%d" % (self.baud, BAUD_MIN, BAUD_MAX))
        if R.BAUD_BASE % self.baud and abs(R.BAUD_BASE / round(R.BAUD_BASE / self.baud) - self.baud) > self.baud * 0.03:
            raise UartError("baud %d is more than 3%% off any divisor of %d" % (self.baud, R.BAUD_BASE))
        if self.bits not in (5, 6, 7, 8) or isinstance(self.bits, bool):
            raise UartError("data bits must be 5, 6, 7 or 8")
        if self.parity not in PARITIES:
            raise UartError("parity must be one of %s" % ", ".join(PARITIES))
        if self.stop not in (1, 2) or isinstance(self.stop, bool):
            raise UartError("stop bits must be 1 or 2")
        for name in ("rtscts", "ixon", "ixoff"):
            if not isinstance(getattr(self, name), bool):
                raise UartError("%s must be true or false" % name)
        for name in ("vstart", "vstop"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= 255:
                raise UartError("%s must be a character code 0..255, not %r" % (name, v))
        return self

    @property
    def divisor(self):
        return max(1, round(R.BAUD_BASE / self.baud))

    @property
    def lcr(self):
        return ((self.bits - 5) | (R.LCR_STB if self.stop == 2 else 0) | PARITIES[self.parity])

    def to_dict(self):
        return {k: getattr(self, k) for k in FIELDS}

    @classmethod
    def from_dict(cls, d):
        known = {k: d[k] for k in FIELDS if k in d}
        return cls(**known).check()


class ModemLines:
    __slots__ = ("dtr", "rts", "loop")

    def __init__(self, dtr=True, rts=True, loop=False):
        self.dtr, self.rts, self.loop = dtr, rts, loop


class Uart:
    """One 16550A at `base`, reached through a libdrv PortIO."""

    def __init__(self, pio, base):
        self.pio = pio
        self.base = base
        self.fifo = False

    # -- helpers ---------------------------------------------------------------
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

    def read_back(self):
        """(LineSettings, ModemLines) as LCR, the divisor latch and MCR hold them: what the previous
        incarnation programmed (software flow control is not in the UART: defaults).  UartError if
        the registers do not describe a line this driver would have set."""
        (lcr,) = self._run([("in", R.LCR)])
        lcr &= ~R.LCR_DLAB & 0xFF
        dll, dlm, mcr = self._run([("out", R.LCR, lcr | R.LCR_DLAB), ("in", R.DLL), ("in", R.DLM),
                                   ("out", R.LCR, lcr), ("in", R.MCR)])
        divisor = dll | dlm << 8
        if not divisor or not mcr & R.MCR_OUT2 or lcr & (R.LCR_BREAK | R.LCR_DLAB):
            raise UartError("the UART does not hold a line this driver set (LCR %#x, divisor %d, MCR %#x)"
                            % (lcr, divisor, mcr))
        parity = {v: k for k, v in PARITIES.items()}.get(lcr & (R.LCR_PEN | R.LCR_EPS | R.LCR_STICK))
        if parity is None:
            raise UartError("LCR %#x has stick parity without parity" % lcr)
        line = LineSettings(baud=round(R.BAUD_BASE / divisor), bits=(lcr & R.LCR_WLS_MASK) + 5, parity=parity,
                            stop=2 if lcr & R.LCR_STB else 1).check()
        return line, ModemLines(bool(mcr & R.MCR_DTR), bool(mcr & R.MCR_RTS), bool(mcr & R.MCR_LOOP))

    @property
    def fcr(self):
        return R.FCR_ENABLE | RX_TRIGGER_FCR if self.fifo else 0

    def mcr(self, modem):
        return (R.MCR_OUT2 | (R.MCR_DTR if modem.dtr else 0) | (R.MCR_RTS if modem.rts else 0)
                | (R.MCR_LOOP if modem.loop else 0))   # OUT2 gates the IRQ line on a PC
