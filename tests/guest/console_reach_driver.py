"""A misbehaving display driver for tests/vm/test_console.py: it owns the VGA's
second text page and the graphics controller's ports, and reaches for the text
page and the CRT controller that vga0 owns.  It reports what the module said
and stays up."""

from libdrv.physmem import PhysMem
from libdrv.portio import PortIO
from libdrv.rsdrv import Endpoint
from libdrv.sef import SEF


def report(what, fn):
    try:
        fn()
        print("%s: ALLOWED (isolation broken)" % what, flush=True)
    except OSError as exc:
        print("%s: refused: %s" % (what, exc), flush=True)


def main():
    sef = SEF()

    @sef.on_init_fresh
    def probe(sef):
        ep = Endpoint.inherited()
        pio = PortIO(ep)
        pio.inb(0x3cf)
        print("inb(0x3cf) inside the entry: ok", flush=True)
        PhysMem(ep, 0xB9000, 0x1000).close()
        print("map 0xb9000 inside the entry: ok", flush=True)
        report("inb(0x3d5) outside the entry", lambda: pio.inb(0x3d5))
        report("outb(0x3d4) outside the entry", lambda: pio.outb(0x3d4, 0x0E))
        report("map 0xb8000 outside the entry", lambda: PhysMem(ep, 0xB8000, 0x1000))
        report("map 0xb9000+0x2000 past the entry", lambda: PhysMem(ep, 0xB9000, 0x2000))
        print("done", flush=True)

    return sef.run()


if __name__ == "__main__":
    main()
