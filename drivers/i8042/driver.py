"""The i8042 PS/2 keyboard driver, run by rsd unprivileged.

    program = "drivers.i8042.driver"
    [resources]  io = ["0x60-0x60", "0x64-0x64"]  irq = [1]

It reaches the controller only through the /dev/rsdrv endpoint rsd passed it
(the data and status/command ports, IRQ 1), turns scancodes (set 1 as the
controller's translation gives it, or set 2 without translation) into key
events with the modifiers held and the lock states, and keeps the keyboard's
LEDs in step with Caps/Num/Scroll Lock.  The controller's self-test and the
keyboard's reset run on a fresh start only: a restarted driver finds them
configured, reads the lock states back from DS and sets the LEDs again, and
starts with no modifier held (a release it missed must not leave one stuck).

Client protocol (libdrv.wire frames on the service socket; docs/console.md):
  requests  open | status
  events    {"ev": "key", "key", "down", "mods": {shift, ctrl, alt}, "locks": {caps, num, scroll}}
The connection that sent `open` receives the keys (one at a time).
"""

import argparse
import json
import sys
import time

from libdrv.drvserve import DriverServer, Refused
from libdrv.irq import IrqLine
from libdrv.portio import PortIO
from libdrv.rsdrv import Endpoint
from libdrv.sef import SEF

from . import regs as R
from .scancodes import LOCK_KEYS, MODIFIER_KEYS, Decoder

POLL_INTERVAL = 0.05         # a byte whose edge was lost while the line was masked
WAIT_LIMIT = 0.5             # seconds the controller may take to take or give a byte
MAX_BYTES_PER_IRQ = 32       # bytes read per wake-up: a stuck OBF cannot hold the loop
LOCK_LEDS = {"caps": R.LED_CAPS, "num": R.LED_NUM, "scroll": R.LED_SCROLL}


class ControllerError(Exception):
    pass


class Controller:
    """The 8042 through the endpoint's two ports."""

    def __init__(self, pio):
        self.pio = pio

    def status(self):
        return self.pio.inb(R.STATUS)

    def _wait(self, ready):
        deadline = time.monotonic() + WAIT_LIMIT
        while not ready(self.status()):
            if time.monotonic() > deadline:
                raise ControllerError("the 8042 did not answer within %.1f s (status %#x)"
                                      % (WAIT_LIMIT, self.status()))
            time.sleep(0.0005)

    def command(self, cmd, arg=None):
        self._wait(lambda s: not s & R.STATUS_IBF)
        self.pio.outb(R.COMMAND, cmd)
        if arg is not None:
            self.write_data(arg)

    def write_data(self, value):
        self._wait(lambda s: not s & R.STATUS_IBF)
        self.pio.outb(R.DATA, value)

    def read_data(self):
        self._wait(lambda s: s & R.STATUS_OBF)
        return self.pio.inb(R.DATA)

    def query(self, cmd):
        self.command(cmd)
        return self.read_data()

    def flush(self, limit=64):
        """Drop what waits in the output buffer; the number of bytes dropped."""
        n = 0
        while n < limit and self.status() & R.STATUS_OBF:
            self.pio.inb(R.DATA)
            n += 1
        return n

    def keyboard_command(self, value, answers=1):
        """A command to the keyboard, awaiting its ACK (and `answers - 1` more bytes)."""
        self.write_data(value)
        got = [self.read_data() for _ in range(answers)]
        if got[0] != R.KBD_ACK:
            raise ControllerError("keyboard answered %#x to command %#x, not ACK" % (got[0], value))
        return got


class KeyboardDriver:
    def __init__(self, sef, irq):
        self.sef = sef
        self.irq_no = irq
        self.ctl = None
        self.irq = None
        self.decoder = None
        self.translate = True
        self.held = set()              # modifier keys down (shift, shift_r, ...)
        self.locks = {"caps": False, "num": False, "scroll": False}
        self.leds_pending = None       # LED bits waiting for the keyboard's ACK of 0xED
        self.owner = None
        self.counters = {"bytes": 0, "keys": 0, "dropped_no_client": 0,
                         "lost_at_start": 0, "overruns": 0, "leds_set": 0, "aux_bytes": 0}
        self.server = DriverServer(sef, "i8042", {"open": self.do_open, "status": self.do_status},
                                   on_drop=self._dropped)

    # -- life cycle --------------------------------------------------------------------------
    def _attach(self):
        ep = Endpoint.inherited()
        self.ctl = Controller(PortIO(ep))
        self.irq = IrqLine(ep, self.irq_no)

    def init_fresh(self, sef):
        self._attach()
        c = self.ctl
        c.command(R.CMD_DISABLE_KBD)
        c.command(R.CMD_DISABLE_AUX)
        c.flush()
        config = c.query(R.CMD_READ_CONFIG)
        result = c.query(R.CMD_SELF_TEST)
        if result != R.SELF_TEST_PASSED:
            raise ControllerError("8042 self-test gave %#x, not %#x: the controller is broken"
                                  % (result, R.SELF_TEST_PASSED))
        result = c.query(R.CMD_KBD_TEST)
        if result != R.KBD_TEST_PASSED:
            raise ControllerError("8042 keyboard interface test gave %#x: check the keyboard's cable" % result)
        # The self-test may reset the configuration: write ours, keyboard IRQ on, aux off.
        self.translate = bool(config & R.CONFIG_TRANSLATE)
        config = (config | R.CONFIG_KBD_INT | R.CONFIG_AUX_DISABLE) & ~(R.CONFIG_AUX_INT | R.CONFIG_KBD_DISABLE)
        c.command(R.CMD_WRITE_CONFIG, config)
        c.command(R.CMD_ENABLE_KBD)
        got = c.keyboard_command(R.KBD_RESET, answers=2)
        if got[1] != R.KBD_BAT_OK:
            raise ControllerError("keyboard reset answered %#x, not BAT passed" % got[1])
        c.keyboard_command(R.KBD_ENABLE)
        self._set_leds_now()
        self._start()
        self._backup()

    def init_restart(self, sef, reason, restarts):
        self._attach()
        saved = sef.restore_state("locks")
        if saved:
            try:
                d = json.loads(saved)
                self.locks = {k: bool(d.get(k)) for k in LOCK_LEDS}
            except (ValueError, AttributeError):
                print("i8042: ignoring a malformed lock backup %r" % (saved,), file=sys.stderr)
        config = self.ctl.query(R.CMD_READ_CONFIG)
        self.translate = bool(config & R.CONFIG_TRANSLATE)
        # Bytes of a sequence the dead incarnation had begun cannot be decoded: drop them.
        self.counters["lost_at_start"] += self.ctl.flush()
        if not config & R.CONFIG_KBD_INT or config & R.CONFIG_KBD_DISABLE:
            self.ctl.command(R.CMD_WRITE_CONFIG, (config | R.CONFIG_KBD_INT) & ~R.CONFIG_KBD_DISABLE)
        self._set_leds_now()
        self._start()
        print("i8042: restarted after %s (restart %d); locks %s" % (reason, restarts, self.locks),
              file=sys.stderr, flush=True)

    def _start(self):
        self.decoder = Decoder(1 if self.translate else 2)
        self.sef.add_reader(self.irq, self.on_irq)
        self.sef.loop.call_later(POLL_INTERVAL, self.poll)

    def _backup(self):
        self.sef.save_state("locks", json.dumps(self.locks, sort_keys=True))

    def _led_bits(self):
        return sum(bit for name, bit in LOCK_LEDS.items() if self.locks[name])

    def _set_leds_now(self):
        """During init, before the loop: wait for each ACK."""
        self.ctl.keyboard_command(R.KBD_SET_LEDS)
        self.ctl.keyboard_command(self._led_bits())
        self.counters["leds_set"] += 1

    # -- the device ----------------------------------------------------------------------------
    def on_irq(self):
        self.irq.take()
        self.service()
        self.irq.reenable()

    def poll(self):
        self.service()
        self.sef.loop.call_later(POLL_INTERVAL, self.poll)

    def service(self):
        for _ in range(MAX_BYTES_PER_IRQ):
            status = self.ctl.status()
            if not status & R.STATUS_OBF:
                return
            byte = self.ctl.pio.inb(R.DATA)
            if status & R.STATUS_AUX_OBF:
                self.counters["aux_bytes"] += 1      # the aux port is disabled; a stray byte
                continue
            self.counters["bytes"] += 1
            self.take_byte(byte)

    def take_byte(self, byte):
        if self.leds_pending is not None and byte in (R.KBD_ACK, R.KBD_RESEND):
            # The keyboard acknowledged 0xED: now its argument.
            bits, self.leds_pending = self.leds_pending, None
            if byte == R.KBD_ACK:
                self.ctl.write_data(bits)
                self.counters["leds_set"] += 1
            return
        if byte == R.KBD_ACK:
            return                                   # the ACK of the LED argument
        if byte in R.KBD_OVERRUN and not self.decoder.mid_sequence:
            self.counters["overruns"] += 1
            return
        ev = self.decoder.feed(byte)
        if ev is None:
            return
        key, down = ev
        if key is None:
            return                                   # counted by the decoder
        self.key_event(key, down)

    def key_event(self, key, down):
        if key in MODIFIER_KEYS:
            (self.held.add if down else self.held.discard)(key)
        elif key in LOCK_KEYS and down:
            name = LOCK_KEYS[key]
            self.locks[name] = not self.locks[name]
            self._backup()
            self.leds_pending = self._led_bits()
            self.ctl.write_data(R.KBD_SET_LEDS)
        self.counters["keys"] += down
        if self.owner is None:
            self.counters["dropped_no_client"] += down
            return
        self.server.push(self.owner, {"ev": "key", "key": key, "down": down, "mods": self.mods(),
                                      "locks": dict(self.locks)})

    def mods(self):
        held = {MODIFIER_KEYS[k] for k in self.held}
        return {m: m in held for m in ("shift", "ctrl", "alt")}

    # -- requests ----------------------------------------------------------------------------------
    def _dropped(self, conn):
        if self.owner is conn:
            self.owner = None

    def do_open(self, conn, msg):
        if self.owner is not None and self.owner is not conn and not self.owner.hung_up():
            raise Refused("EBUSY", "the keyboard is read by another connection (the console front end); "
                                   "stop it first")
        self.owner = conn
        return {"locks": dict(self.locks), "mods": self.mods(), "generation": self.sef.generation,
                "scancode_set": self.decoder.set}

    def do_status(self, conn, msg):
        return {"locks": dict(self.locks), "mods": self.mods(), "generation": self.sef.generation,
                "scancode_set": self.decoder.set, "translate": self.translate,
                "counters": dict(self.counters, unknown=self.decoder.unknown)}

    def exit(self, sef):
        if self.ctl is not None:
            try:
                self.ctl.command(R.CMD_DISABLE_KBD)   # nobody reads keys: no interrupts for them
            except (OSError, ControllerError):
                pass


def parse_args(argv):
    p = argparse.ArgumentParser(prog="i8042", description="i8042 PS/2 keyboard driver")
    p.add_argument("--irq", type=int, default=1, help="the keyboard's IRQ line (default 1)")
    a = p.parse_args(argv)
    if not 0 <= a.irq < 256:
        p.error("--irq must be 0..255")
    return a


def main(argv=None):
    a = parse_args(sys.argv[1:] if argv is None else argv)
    sef = SEF()
    drv = KeyboardDriver(sef, a.irq)
    sef.on_init_fresh(drv.init_fresh)
    sef.on_init_restart(drv.init_restart)
    sef.on_accept(drv.server.accept)
    sef.on_exit(drv.exit)
    return sef.run()


if __name__ == "__main__":
    sys.exit(main())
