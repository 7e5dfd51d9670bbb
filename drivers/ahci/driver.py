"""The AHCI SATA driver service (ICH9 AHCI, 8086:2922, and other AHCI 1.x HBAs), run by rsd
as an unprivileged process.

    program = "drivers.ahci"     class = "blk"     [resources] pci = ["8086:2922"]
    args = ["--port", "0"]       # optional: the port whose disk it serves (default: the first disk)

It reaches the HBA only through the VFIO fds rsd handed it (docs/vfio.md),
serves one block front end at a time on its service socket (docs/block.md:
attach / stats) and moves requests between the front end's shared memory
(libdrv/blkshm.h) and the port's command slots in drivers/ahci/_port.pyx,
one call per wakeup.

A fresh start resets the HBA (GHC.HR); a restart does not: it stops the
port's command engine (which drops whatever the dead incarnation had
issued: the front end re-sends it), points the port at this incarnation's
command list, reads IDENTIFY again and is ready.  A port error (a task-file
error, a host bus error, an interface error) fails one request, not the
driver: the port is stopped and started (with a command-list override or
a COMRESET if the device is stuck busy); after an NCQ error the NCQ error
log names the failed tag, and the others are issued again, one at a time,
so a command that fails again fails alone.
"""

import argparse
import ctypes
import os
import sys
import time

from libdrv import blkshm
from libdrv import dma as _dma, irq as _irq, pci as _pci  # noqa: F401  VfioDevice's lazy imports,
# here so that rsd's standby incarnation has them loaded before a restart needs them
from libdrv import vfio_abi
from libdrv.drvserve import DriverServer, Refused, close_fds, is_eventfd
from libdrv.sef import SEF
from libdrv.vfio import VfioDevice

from . import regs as R
from ._port import CTRL_BYTES, DISCARD_MAX_BLOCKS, Port

IOVA_CTRL = 0x1_0000_0000       # the driver's command list, FIS area and tables (above the guest's RAM)
IOVA_SHARED = 0x2_0000_0000     # the front end's memfd, all of it
HBA_RESET_TIMEOUT = 1.0         # AHCI 10.4.3: the HBA clears GHC.HR within 1 s
ENGINE_TIMEOUT = 0.5            # AHCI 10.1.2: PxCMD.CR and FR clear within 500 ms
READY_TIMEOUT = 5.0             # the device's BSY clearing after a (COM)reset
POLL_INTERVAL = 0.5             # safety net for a lost interrupt
RETRY_LIMIT = 2                 # port errors one request may be caught in before it fails
ATTACH_FDS = 3


class AhciError(RuntimeError):
    pass


def ata_string(words, first, count):
    raw = b"".join(words[i].to_bytes(2, "big") for i in range(first, first + count))
    return raw.decode("ascii", "replace").strip()


def parse_identify(data):
    """The geometry and features the front end and the data path need, from IDENTIFY DEVICE."""
    w = [int.from_bytes(data[i:i + 2], "little") for i in range(0, 512, 2)]
    if w[R.ID_CMDSET_83] & R.ID_LBA48_SUPPORTED:
        blocks = w[100] | (w[101] << 16) | (w[102] << 32) | (w[103] << 48)
    else:
        blocks = w[60] | (w[61] << 16)
    logical = 512
    physical_shift = 0
    sector = w[R.ID_SECTOR_SIZE]
    if sector & 0xC000 == R.ID_SECTOR_VALID:
        if sector & R.ID_SECTOR_LONG:
            logical = 2 * (w[117] | (w[118] << 16))
        if sector & R.ID_SECTOR_MULTI:
            physical_shift = sector & 0xF
    if logical not in (512, 4096):
        raise AhciError("the disk's logical sector is %d bytes; this driver handles 512 and 4096" % logical)
    ncq = bool(w[R.ID_SATA_CAP] & R.ID_SATA_CAP_NCQ)
    return {
        "blocks": blocks, "block_size": logical, "physical_block_size": logical << physical_shift,
        "ncq": ncq, "queue_depth": (w[R.ID_QUEUE_DEPTH] & 0x1F) + 1 if ncq else 1,
        "write_cache": bool(w[R.ID_CMDSET_82] & R.ID_WCACHE_SUPPORTED and w[R.ID_CMDSET_85] & R.ID_WCACHE_ENABLED),
        "fua_ext": bool(w[R.ID_CMDSET_84] & R.ID_FUA_EXT),
        "trim": bool(w[R.ID_DSM] & R.ID_DSM_TRIM),
        "rotational": w[R.ID_ROTATION] != 1,
        "model": ata_string(w, *R.ID_MODEL), "serial": ata_string(w, *R.ID_SERIAL),
        "firmware": ata_string(w, *R.ID_FIRMWARE),
    }


class Attachment:
    def __init__(self, conn, memfd, doorbell, notify, shm):
        self.conn, self.memfd, self.doorbell, self.notify, self.shm = conn, memfd, doorbell, notify, shm


class AhciDriver:
    def __init__(self, sef, port=None):
        self.sef = sef
        self.want_port = port
        self.dev = self.abar = self.ctrl = self.port = self.irq = None
        self.port_index = None
        self.identity = None
        self.cap = 0
        self.att = None
        self.errors = {"port_errors": 0, "port_resets": 0, "refused_front_ends": 0}
        self.server = DriverServer(sef, "ahci", {"attach": self.do_attach, "stats": self.do_stats},
                                   max_fds=ATTACH_FDS, on_drop=self._dropped)

    # -- life cycle --------------------------------------------------------------------------------------
    def init_fresh(self, sef):
        self._bring_up(fresh=True)

    def init_restart(self, sef, reason, restarts):
        t0 = time.monotonic()
        self._bring_up(fresh=False)
        print("ahci: restarted after %s (restart %d) in %.1f ms (%s)" % (
            reason, restarts, (time.monotonic() - t0) * 1e3, self.phases), file=sys.stderr, flush=True)

    def _bring_up(self, fresh):
        marks = [("start", time.monotonic())]
        self.dev = VfioDevice.inherited()
        self.abar = self.dev.bar(R.ABAR_INDEX)
        anchor = ctypes.c_char.from_buffer(self.abar.map)
        abar_addr = ctypes.addressof(anchor)
        del anchor
        self.ctrl = self.dev.dma(CTRL_BYTES, IOVA_CTRL)
        marks.append(("vfio", time.monotonic()))
        # Bus mastering on before the HBA touches memory; everything it reaches is ours.
        self.dev.config.enable(master=True, memory=True, intx=True)
        self.cap = self.rd(R.CAP)
        if fresh:
            self._reset_hba()
        self.wr(R.GHC, self.rd(R.GHC) | R.GHC_AE)
        marks.append(("hba", time.monotonic()))
        self.port_index = self._find_port()
        self.port = Port(abar_addr, self.port_index, self.ctrl.vaddr, self.ctrl.iova)
        self._stop_engines()
        self._start_port()
        marks.append(("port", time.monotonic()))
        self.identity = self._identify()
        ident = self.identity
        slots = ((self.cap >> R.CAP_NCS_SHIFT) & R.CAP_NCS_MASK) + 1
        ncq = ident["ncq"] and bool(self.cap & R.CAP_SNCQ)
        self.port.configure(ident["blocks"], ident["block_size"], min(ident["queue_depth"], slots) if ncq else 1,
                            ncq, ncq, ident["fua_ext"], ident["trim"])
        marks.append(("identify", time.monotonic()))
        self._setup_interrupt()
        marks.append(("irq", time.monotonic()))
        self.phases = " ".join("%s %.1f" % (n, (t - marks[i][1]) * 1e3) for i, (n, t) in enumerate(marks[1:]))
        print("ahci: port %d: %s (serial %s, firmware %s): %d blocks of %d bytes (physical %d), %s, "
              "write cache %s, FUA %s, TRIM %s" % (
                  self.port_index, ident["model"], ident["serial"], ident["firmware"], ident["blocks"],
                  ident["block_size"], ident["physical_block_size"],
                  "NCQ depth %d" % self.port.depth if ncq else "no NCQ", ident["write_cache"],
                  self.port.fua_ncq or self.port.fua_ext, ident["trim"]), file=sys.stderr, flush=True)

    def _setup_interrupt(self):
        _, msi_vectors = self.dev.irq_info(vfio_abi.VFIO_PCI_MSI_IRQ_INDEX)
        # MSI where the HBA has it (ICH9 does): no unmask ioctl per interrupt, as INTx needs.
        index = vfio_abi.VFIO_PCI_MSI_IRQ_INDEX if msi_vectors >= 1 else vfio_abi.VFIO_PCI_INTX_IRQ_INDEX
        self.irq = self.dev.irq(index)
        self.port.set_interrupt(self.irq.fileno(), self.dev.fd,
                                self.irq.maskable and index == vfio_abi.VFIO_PCI_INTX_IRQ_INDEX,
                                self.on_port_error, self.on_violation)
        self.sef.add_reader(self.irq, self.port.on_interrupt)
        self.wr(R.GHC, self.rd(R.GHC) | R.GHC_IE)
        self.port.on_interrupt()        # what was pending before the reader was there
        self.sef.loop.call_later(POLL_INTERVAL, self._poll)

    # -- registers -----------------------------------------------------------------------------------------
    def rd(self, reg):
        return self.abar.read32(reg)

    def wr(self, reg, value):
        self.abar.write32(reg, value)

    def prd(self, reg):
        return self.abar.read32(R.PORT_BASE + self.port_index * R.PORT_SIZE + reg)

    def pwr(self, reg, value):
        self.abar.write32(R.PORT_BASE + self.port_index * R.PORT_SIZE + reg, value)

    def _wait(self, test, timeout, what):
        deadline = time.monotonic() + timeout
        while not test():
            if time.monotonic() > deadline:
                raise AhciError("%s within %.0f ms" % (what, timeout * 1e3))
            time.sleep(0.0005)

    # -- the HBA and the port ----------------------------------------------------------------------------------
    def _reset_hba(self):
        self.wr(R.GHC, R.GHC_AE)
        self.wr(R.GHC, R.GHC_AE | R.GHC_HR)
        self._wait(lambda: not self.rd(R.GHC) & R.GHC_HR, HBA_RESET_TIMEOUT,
                   "the HBA did not finish its reset (GHC.HR still set); is 8086:2922 an AHCI HBA?")

    def _find_port(self):
        implemented = self.rd(R.PI)
        candidates = [self.want_port] if self.want_port is not None else [
            p for p in range(32) if implemented & (1 << p)]
        for p in candidates:
            if not implemented & (1 << p):
                raise AhciError("port %d is not implemented by this HBA (PI %#x)" % (p, implemented))
            base = R.PORT_BASE + p * R.PORT_SIZE
            if self.rd(base + R.PxSSTS) & R.SSTS_DET_MASK == R.SSTS_DET_PRESENT:
                sig = self.rd(base + R.PxSIG)
                if sig in (R.SIG_ATA, 0xFFFFFFFF):      # 0xffffffff: not yet received after a reset
                    return p
                if self.want_port is not None:
                    raise AhciError("port %d has a device with signature %#x, not an ATA disk" % (p, sig))
        raise AhciError("no ATA disk on %s (PI %#x): check the VM's or the server's cabling"
                        % ("port %d" % self.want_port if self.want_port is not None else "any port", implemented))

    def _stop_engines(self):
        """PxCMD.ST and FRE off and the engines stopped: the HBA has dropped whatever was issued."""
        cmd = self.prd(R.PxCMD)
        if cmd & R.CMD_ST:
            self.pwr(R.PxCMD, cmd & ~R.CMD_ST)
        try:
            self._wait(lambda: not self.prd(R.PxCMD) & R.CMD_CR, ENGINE_TIMEOUT,
                       "port %d's command list engine did not stop" % self.port_index)
        except AhciError:
            self._comreset()
        cmd = self.prd(R.PxCMD)
        if cmd & R.CMD_FRE:
            self.pwr(R.PxCMD, cmd & ~R.CMD_FRE)
        self._wait(lambda: not self.prd(R.PxCMD) & R.CMD_FR, ENGINE_TIMEOUT,
                   "port %d's FIS receive engine did not stop" % self.port_index)

    def _start_port(self):
        self.pwr(R.PxCLB, self.port.cmd_list_iova & 0xFFFFFFFF)
        self.pwr(R.PxCLBU, self.port.cmd_list_iova >> 32)
        self.pwr(R.PxFB, self.port.rfis_iova & 0xFFFFFFFF)
        self.pwr(R.PxFBU, self.port.rfis_iova >> 32)
        self.pwr(R.PxSERR, 0xFFFFFFFF)
        self.pwr(R.PxIS, 0xFFFFFFFF)
        self.pwr(R.PxCMD, self.prd(R.PxCMD) | R.CMD_FRE | R.CMD_SUD | R.CMD_POD)
        self._wait_not_busy()
        self.pwr(R.PxSERR, 0xFFFFFFFF)
        self.pwr(R.PxIS, 0xFFFFFFFF)
        self.wr(R.IS, 1 << self.port_index)
        self.pwr(R.PxIE, R.IE_ENABLED)
        self.pwr(R.PxCMD, self.prd(R.PxCMD) | R.CMD_ST)

    def _wait_not_busy(self):
        def ready():
            return not self.prd(R.PxTFD) & (R.TFD_STS_BSY | R.TFD_STS_DRQ)
        try:
            self._wait(ready, 0.05, "")
            return
        except AhciError:
            pass
        if self.cap & R.CAP_SCLO:       # the device is stuck: override first, reset if that fails
            self.pwr(R.PxCMD, self.prd(R.PxCMD) | R.CMD_CLO)
            try:
                self._wait(lambda: not self.prd(R.PxCMD) & R.CMD_CLO and ready(), 0.05, "")
                return
            except AhciError:
                pass
        self._comreset()
        self._wait(ready, READY_TIMEOUT, "port %d's device stayed busy after a COMRESET" % self.port_index)

    def _comreset(self):
        self.errors["port_resets"] += 1
        print("ahci: port %d: COMRESET" % self.port_index, file=sys.stderr, flush=True)
        sctl = self.prd(R.PxSCTL) & ~R.SCTL_DET_MASK
        self.pwr(R.PxSCTL, sctl | R.SCTL_DET_COMRESET | R.SCTL_IPM_NO_PARTIAL_SLUMBER)
        time.sleep(0.002)               # SATA: COMRESET asserted for at least 1 ms
        self.pwr(R.PxSCTL, sctl | R.SCTL_IPM_NO_PARTIAL_SLUMBER)
        self._wait(lambda: self.prd(R.PxSSTS) & R.SSTS_DET_MASK == R.SSTS_DET_PRESENT, READY_TIMEOUT,
                   "port %d's link did not come back after a COMRESET" % self.port_index)
        self.pwr(R.PxSERR, 0xFFFFFFFF)

    def _identify(self):
        ok, tfd, pxis = self.port.polled(R.ATA_IDENTIFY_DEVICE, nbytes=512)
        if not ok:
            raise AhciError("IDENTIFY DEVICE failed on port %d (PxTFD %#x, PxIS %#x): is it an ATA disk?"
                            % (self.port_index, tfd, pxis))
        return parse_identify(self.port.buffer())

    # -- the data path's rare events -------------------------------------------------------------------------
    def on_port_error(self, pxis):
        """From the data path: PxIS has an error bit; the port is halted with what it had issued."""
        issued = self.port.issued_tags()
        tfd, serr = self.prd(R.PxTFD), self.prd(R.PxSERR)
        self.errors["port_errors"] += 1
        self._stop_engines()
        self._start_port()
        fail = set()
        named = self._ncq_error_log(issued) if self.port.ncq else None
        if pxis & R.IS_TFES:
            if named is not None:
                fail = {named}
            elif len(issued) == 1:
                fail = set(issued)      # alone, it is the one the device refused
        print("ahci: port %d error: PxIS %#x PxTFD %#x (error %#x) PxSERR %#x with %d command(s) issued; "
              "failing %s, issuing the rest again" % (
                  self.port_index, pxis, tfd, tfd >> R.TFD_ERR_SHIFT, serr, len(issued),
                  ", ".join("tag %d" % issued[s][0] for s in sorted(fail)) or "none"),
              file=sys.stderr, flush=True)
        self.port.recovered(fail, RETRY_LIMIT)

    def _ncq_error_log(self, issued):
        """Read the NCQ command error log (READ LOG EXT page 10h): a device leaves its NCQ error
        state when it is read.  Returns the failed slot if the log names an issued one.  A device
        without the log gets an IDENTIFY instead: some (QEMU's) keep the error status of the
        failed command for every later NCQ completion until a non-queued command succeeds."""
        ok, _, _ = self.port.polled(R.ATA_READ_LOG_EXT, count=1, lba=R.ATA_LOG_NCQ_ERROR, nbytes=512,
                                    while_halted=True)
        if not ok:
            self.port.polled(R.ATA_IDENTIFY_DEVICE, nbytes=512, while_halted=True)
            return None
        log = self.port.buffer()
        if log[0] & 0x80:               # NQ: the error was not in a queued command
            return None
        slot = log[0] & 0x1F            # the NCQ tag is the command slot (_port.pyx)
        return slot if slot in issued else None

    def media_error(self):
        """`rsctl fi --media-error`: the next read or write fails in the device, as a bad sector would."""
        self.port.poison_next = True
        print("ahci: fault injection: the next read or write goes to an LBA past the end of the disk",
              file=sys.stderr, flush=True)

    def on_violation(self, why):
        if self.att is not None:
            print("ahci: refusing the front end: %s" % why, file=sys.stderr, flush=True)
            self.errors["refused_front_ends"] += 1
            self.server.push(self.att.conn, {"ev": "refused", "msg": why})
            self.server.drop(self.att.conn)

    def _poll(self):
        self.port.service()
        self.sef.loop.call_later(POLL_INTERVAL, self._poll)

    # -- the front end ---------------------------------------------------------------------------------------
    def do_attach(self, conn, msg):
        fds = self.server.take_fds(conn)
        try:
            if self.att is not None and self.att.conn is not conn and self.att.conn.hung_up():
                self.server.drop(self.att.conn)     # its front end is gone; we had not read the EOF yet
            if self.att is not None:
                raise Refused("EBUSY", "a front end is attached already (one at a time)")
            if len(fds) != ATTACH_FDS:
                raise Refused("EINVAL", "attach carries 3 fds (shared memory, driver doorbell, front end "
                              "doorbell) in the sendmsg of the frame's first byte; got %d" % len(fds))
            memfd, doorbell, notify = fds
            try:
                blkshm.check_fd(memfd)
            except blkshm.BlkshmError as exc:
                raise Refused("EINVAL", str(exc)) from None
            for what, fd in (("driver doorbell", doorbell), ("front end doorbell", notify)):
                if not is_eventfd(fd):
                    raise Refused("EINVAL", "the %s (fd %d of the attach) is not an eventfd" % (what, fd))
                os.set_blocking(fd, False)
            head = os.pread(memfd, 72, 0)
            sq_posted, cq_consumed = int.from_bytes(head[64:68], "little"), int.from_bytes(head[68:72], "little")
            if sq_posted or cq_consumed:
                raise Refused("EINVAL", "sq_posted %d and cq_consumed %d at attach: each attach starts with "
                              "fresh shared memory, counters 0 (blkshm.create)" % (sq_posted, cq_consumed))
            try:
                shm = self.dev.dma(blkshm.SIZE, IOVA_SHARED, fd=memfd)
            except (OSError, ValueError) as exc:
                raise Refused("ENOMEM", "cannot map the shared memory for the device: %s" % exc) from None
        except Refused:
            close_fds(fds)
            if self.att is None or self.att.conn is not conn:
                conn.closing = True     # an error reply, then the connection is closed
            raise
        self.att = Attachment(conn, memfd, doorbell, notify, shm)
        self.port.attach(shm.vaddr, shm.iova, notify, doorbell)
        self.sef.add_reader(doorbell, self.port.on_doorbell)
        self.port.service()
        ident, port = self.identity, self.port
        return {"blocks": ident["blocks"], "block_size": ident["block_size"],
                "physical_block_size": ident["physical_block_size"], "write_cache": ident["write_cache"],
                "fua": bool(port.fua_ncq if port.ncq else port.fua_ext), "discard": ident["trim"],
                "discard_max_blocks": DISCARD_MAX_BLOCKS if ident["trim"] else 0,
                "queue_depth": port.depth, "rotational": ident["rotational"], "model": ident["model"],
                "serial": ident["serial"], "generation": self.sef.generation}

    def do_stats(self, conn, msg):
        out = dict(self.port.counters())
        out.update(self.errors)
        return {"stats": out}

    def _dropped(self, conn):
        if self.att is None or self.att.conn is not conn:
            return
        att, self.att = self.att, None
        self.sef.remove_reader(att.doorbell)
        # The HBA drops what it had issued for that front end before its memory is unmapped.
        self._stop_engines()
        self.port.detach()
        self._start_port()
        att.shm.close()
        close_fds([att.memfd, att.doorbell, att.notify])

    def exit(self, sef):
        if self.abar is not None:
            self.pwr(R.PxIE, 0)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="drivers.ahci", description=__doc__.split("\n")[0])
    ap.add_argument("--port", type=int, choices=range(32), metavar="N",
                    help="the HBA port whose disk to serve (default: the first with a disk)")
    args = ap.parse_args(argv)
    sef = SEF()
    drv = AhciDriver(sef, args.port)
    sef.on_init_fresh(drv.init_fresh)
    sef.on_init_restart(drv.init_restart)
    sef.on_accept(drv.server.accept)
    sef.on_exit(drv.exit)
    sef.on_fault("media-error")(drv.media_error)
    return sef.run()


if __name__ == "__main__":
    sys.exit(main())
