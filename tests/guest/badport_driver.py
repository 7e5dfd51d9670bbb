"""A misbehaving driver for tests/vm/test_serial.py: it owns COM4's ports
and reaches for COM1's.  It reports what the module said and stays up."""

import sys

from libdrv.portio import PortIO
from libdrv.rsdrv import Endpoint
from libdrv.sef import SEF


def main():
    sef = SEF()

    @sef.on_init_fresh
    def probe(sef):
        pio = PortIO(Endpoint.inherited())
        pio.inb(0x2ef)
        print("inb(0x2ef) inside the entry: ok", flush=True)
        try:
            pio.inb(0x3f8)
            print("inb(0x3f8) outside the entry: ALLOWED (isolation broken)", flush=True)
        except OSError as exc:
            print("inb(0x3f8) outside the entry: refused: %s" % exc, flush=True)
        sys.stdout.flush()

    return sef.run()
