"""The VGA text-mode display driver: one 80x25 colour text screen, run by rsd unprivileged.

    program = "drivers.vga.driver"   args = ["--mem", "0xb8000"]
    [resources]  mem = ["0xb8000-0xb8fff"]  io = ["0x3d4-0x3d5"]

It reaches the screen only through the /dev/rsdrv endpoint rsd passed it: the
text buffer through a memory grant (libdrv.physmem), the CRT controller's
index/data pair for the cursor and the start address (libdrv.portio).  It
holds no screen state of its own that matters: the console front end owns it
and repaints the whole screen after this driver restarts.  Of what it is sent,
only the cells that differ from what the buffer holds are written.

Client protocol (libdrv.wire frames on the service socket; docs/console.md):
  requests  open | update cells=[[row, col, bytes], ...] cursor=[row, col] | None
            | read | status
  replies   {"id", "ok": true, ...} or {"id", "ok": false, "err", "msg"}
The connection that sent `open` draws (one at a time); the others may only read the
screen back (`read`: the text buffer as the device holds it) and ask status.
"""

import argparse
import sys

from libdrv.drvserve import DriverServer, Refused
from libdrv.physmem import PhysMem
from libdrv.portio import PortIO
from libdrv.rsdrv import Endpoint
from libdrv.sef import SEF

from . import regs as R
from ._cells import differing_runs

MAX_RUNS = 4 * R.ROWS        # runs of cells one update may carry


class TextScreen:
    """The text buffer and the CRT controller, with a copy of what the buffer holds
    (read from it at start: after a restart it is what the last incarnation left)."""

    def __init__(self, endpoint, base, cols=R.COLS, rows=R.ROWS):
        self.cols, self.rows = cols, rows
        self.size = cols * rows * R.CELL
        self.mem = PhysMem(endpoint, base, R.TEXT_PAGE)
        self.view = self.mem.view
        self.pio = PortIO(endpoint)
        self.shadow = bytearray(self.view[:self.size])
        self.cursor = None
        self.cells_written = 0
        self.cells_unchanged = 0

    def resync(self):
        """Read the copy again from the buffer: someone else may have written it (the
        kernel's console blanks it as it goes into graphics mode, policy.d/vtcon-follow)."""
        self.shadow[:] = self.view[:self.size]

    def reset(self):
        """A fresh start: a blank screen shown from its first cell, the cursor at home."""
        self.write(0, bytes([0x20, R.ATTR_DEFAULT]) * (self.cols * self.rows))
        self.set_start(0)
        self.set_cursor((0, 0))

    def write(self, offset, data):
        """Write data (character, attribute pairs) at byte offset, only the cells that
        differ from what the buffer holds, each run of differing cells in one copy."""
        shadow, view = self.shadow, self.view
        n = len(data)
        if shadow[offset:offset + n] == data:
            self.cells_unchanged += n // R.CELL
            return
        before = self.cells_written
        for i, j in differing_runs(memoryview(shadow)[offset:offset + n], data, R.CELL):
            view[offset + i:offset + j] = data[i:j]
            shadow[offset + i:offset + j] = data[i:j]
            self.cells_written += (j - i) // R.CELL
        self.cells_unchanged += n // R.CELL - (self.cells_written - before)

    def _crtc_out(self, pairs):
        b = self.pio.batch(2 * len(pairs))
        for index, value in pairs:
            b.add_out(R.CRTC_INDEX, index)
            b.add_out(R.CRTC_DATA, value)
        self.pio.run(b)

    def _crtc_in(self, indexes):
        b = self.pio.batch(2 * len(indexes))
        slots = []
        for index in indexes:
            b.add_out(R.CRTC_INDEX, index)
            slots.append(b.add_in(R.CRTC_DATA))
        self.pio.run(b)
        return [b.value(s) for s in slots]

    def set_start(self, cell):
        self._crtc_out([(R.CRTC_START_HIGH, cell >> 8), (R.CRTC_START_LOW, cell & 0xFF)])

    def set_cursor(self, pos):
        """pos (row, col), or None for no cursor."""
        if pos == self.cursor:
            return
        if pos is None:
            self._crtc_out([(R.CRTC_CURSOR_START, R.CURSOR_DISABLE | R.CURSOR_FIRST_LINE)])
        else:
            cell = pos[0] * self.cols + pos[1]
            self._crtc_out([(R.CRTC_CURSOR_HIGH, cell >> 8), (R.CRTC_CURSOR_LOW, cell & 0xFF),
                            (R.CRTC_CURSOR_START, R.CURSOR_FIRST_LINE),
                            (R.CRTC_CURSOR_END, R.CURSOR_LAST_LINE)])
        self.cursor = pos

    def hardware_state(self):
        """What the CRT controller holds now: cursor (row, col) or None, start cell."""
        start_line, hi, lo, shi, slo = self._crtc_in([R.CRTC_CURSOR_START, R.CRTC_CURSOR_HIGH,
                                                      R.CRTC_CURSOR_LOW, R.CRTC_START_HIGH,
                                                      R.CRTC_START_LOW])
        cell = hi << 8 | lo
        cursor = None if start_line & R.CURSOR_DISABLE else list(divmod(cell, self.cols))
        return cursor, shi << 8 | slo


class VgaDriver:
    def __init__(self, sef, base):
        self.sef = sef
        self.base = base
        self.screen = None
        self.owner = None
        self.updates = 0
        self.refused = 0
        self.server = DriverServer(sef, "vga", {"open": self.do_open, "update": self.do_update,
                                                "read": self.do_read, "status": self.do_status},
                                   on_drop=self._dropped)

    # -- life cycle -------------------------------------------------------------------
    def init_fresh(self, sef):
        self.screen = TextScreen(Endpoint.inherited(), self.base)
        self.screen.reset()

    def init_restart(self, sef, reason, restarts):
        # The buffer still shows what the last incarnation drew: keep it until the
        # front end repaints (writing only what differs), rather than flash a blank.
        self.screen = TextScreen(Endpoint.inherited(), self.base)
        self.screen.set_start(0)
        self.screen.cursor, _ = self.screen.hardware_state()
        print("vga: restarted after %s (restart %d)" % (reason, restarts), file=sys.stderr, flush=True)

    # -- requests -------------------------------------------------------------------------
    def _dropped(self, conn):
        if self.owner is conn:
            self.owner = None

    def do_open(self, conn, msg):
        if self.owner is not None and self.owner is not conn and not self.owner.hung_up():
            self.refused += 1
            raise Refused("EBUSY", "the screen is drawn by another connection (the console front end); "
                                   "stop it first")
        self.owner = conn
        # A front end that opens repaints: what differs from the buffer as it is now is written.
        self.screen.resync()
        return {"cols": self.screen.cols, "rows": self.screen.rows, "generation": self.sef.generation}

    def do_update(self, conn, msg):
        if conn is not self.owner:
            self.refused += 1
            raise Refused("EPERM", "only the connection that sent open draws; send open first")
        runs = self._checked_runs(msg.get("cells", []))
        cursor = self._checked_cursor(msg.get("cursor"))
        cols = self.screen.cols
        for row, col, data in runs:          # all checked before the first is written
            self.screen.write((row * cols + col) * R.CELL, data)
        self.screen.set_cursor(cursor)
        self.updates += 1
        return {"n": len(runs)}

    def _checked_runs(self, cells):
        if not isinstance(cells, list) or len(cells) > MAX_RUNS:
            raise Refused("EINVAL", "cells must be a list of at most %d [row, col, bytes] runs" % MAX_RUNS)
        runs = []
        for run in cells:
            if not (isinstance(run, list) and len(run) == 3 and _is_int(run[0]) and _is_int(run[1])
                    and isinstance(run[2], bytes)):
                raise Refused("EINVAL", "a run is [row, col, bytes], not %r" % (run,))
            row, col, data = run
            if not (0 <= row < self.screen.rows and 0 <= col < self.screen.cols):
                raise Refused("EINVAL", "run at row %d col %d is off the %dx%d screen"
                              % (row, col, self.screen.cols, self.screen.rows))
            if len(data) % R.CELL or col + len(data) // R.CELL > self.screen.cols:
                raise Refused("EINVAL", "run at row %d col %d: %d bytes is not whole cells within the row"
                              % (row, col, len(data)))
            runs.append((row, col, data))
        return runs

    def _checked_cursor(self, cursor):
        if cursor is None:
            return None
        if not (isinstance(cursor, list) and len(cursor) == 2 and all(_is_int(v) for v in cursor)
                and 0 <= cursor[0] < self.screen.rows and 0 <= cursor[1] < self.screen.cols):
            raise Refused("EINVAL", "cursor must be [row, col] on the screen or none, not %r" % (cursor,))
        return tuple(cursor)

    def do_read(self, conn, msg):
        return {"cells": bytes(self.screen.view[:self.screen.size]), "cols": self.screen.cols,
                "rows": self.screen.rows}

    def do_status(self, conn, msg):
        cursor, start = self.screen.hardware_state()
        return {"cols": self.screen.cols, "rows": self.screen.rows, "cursor": cursor, "start": start,
                "generation": self.sef.generation, "updates": self.updates, "refused": self.refused,
                "cells_written": self.screen.cells_written, "cells_unchanged": self.screen.cells_unchanged}


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="vga", description="VGA text-mode display driver")
    p.add_argument("--mem", type=lambda s: int(s, 0), default=R.TEXT_BASE,
                   help="physical address of the text buffer (default 0xb8000)")
    a = p.parse_args(argv)
    if a.mem != R.TEXT_BASE:
        p.error("--mem must be 0xb8000: the colour text buffer (CRTC at 0x3d4; monochrome is not built)")
    return a


def main(argv=None):
    a = parse_args(sys.argv[1:] if argv is None else argv)
    sef = SEF()
    drv = VgaDriver(sef, a.mem)
    sef.on_init_fresh(drv.init_fresh)
    sef.on_init_restart(drv.init_restart)
    sef.on_accept(drv.server.accept)
    return sef.run()


if __name__ == "__main__":
    sys.exit(main())
