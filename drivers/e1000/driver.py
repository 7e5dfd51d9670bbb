"""The e1000 (Intel 82540EM, 8086:100e) driver service, run by rsd as an unprivileged process.

    program = "drivers.e1000"     class = "net"     [resources] pci = ["8086:100e"]

It reaches the device only through the fds rsd handed it: VFIO's
(docs/vfio.md), or on a machine without an IOMMU uio_pci_generic's with
DMA buffers from the rsdrv module (libdrv/uio.py; frames are then copied
through those buffers, and the device is not DMA-isolated), serves one network front end at a time on its service
socket (docs/net.md: attach / set / stats, link events) and moves frames
between the device and the front end's shared memory (libdrv/netshm.h)
in drivers/e1000/_rings.pyx, one call per wakeup.  Its settings and
accumulated statistics are backed up in DS, so a restarted incarnation
programs the device the same way before any front end is back.

The PHY is never touched: CTRL.RST resets the MAC only (the 82540EM's PHY
keeps its link), and CTRL.SLU with ASDE brings the MAC's side up in
microseconds, where restarting autonegotiation would cost half a second.
"""

import ctypes
import json
import mmap
import os
import re
import sys
import time

from libdrv import dma as _dma, irq as _irq, netshm, pci as _pci  # noqa: F401  VfioDevice's lazy imports,
# here so that rsd's standby incarnation has them loaded before a restart needs them
from libdrv import dsclient  # noqa: F401  SEF's lazy import for DS (dataclasses, inspect: slow to import),
# loaded in the standby so that the restore from DS after a restart does not stall the data path
from libdrv import vfio_abi
from libdrv.sef import SEF
from libdrv.uio import UioDevice
from libdrv.vfio import VfioDevice, resource_fds
from libdrv.drvserve import DriverServer, Refused, close_fds, is_eventfd

from . import regs as R
from ._rings import ContractViolation, DeviceFault, Rings

IOVA_RINGS = 0x1_0000_0000      # the driver's descriptor rings (above the guest's RAM: see docs/vfio.md)
IOVA_SHARED = 0x2_0000_0000     # the front end's memfd, all of it
WILD_DMA_IOVA = 0x1000_0000     # what `rsctl fi --wild-dma` points an RX buffer at: nothing is mapped there
TX_RING_SIZE = 4096
INTERRUPT_RATE = 4000           # ITR: at most one interrupt per 250 us under load (fewer wakeups, more frames each);
                                # the first after a quiet spell is not delayed
RX_DELAY_US = 0                 # RDTR/RADV: a received frame is not held back beyond what ITR does
TX_DELAY_US = 250               # TIDV/TADV: a finished TX only frees shared memory; it waits for company
POLL_INTERVAL = 0.5             # safety net for a lost interrupt
STATS_INTERVAL = 2.0            # the statistics registers are 32 bits and clear on read
BACKUP_INTERVAL = 10.0          # how often the accumulated statistics go to DS
RESTORE_WAIT = 2.0              # s after a restart's ready: after the TCP recovery it would stall (DS round trips)
RESET_TIMEOUT = 0.1
EEPROM_TIMEOUT = 0.1
ATTACH_FDS = 3
MAX_MTU = R.MAX_JUMBO_FRAME - R.ETH_OVERHEAD
MC_MAX = 256
OFFLOADS = ["csum", "tso4"]     # what the 82540EM does in hardware (TSO for IPv6 came with later 8254x)
SETTINGS_FIELDS = {"mac", "mtu", "promisc", "allmulti", "mc"}
_MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")


# -- settings ---------------------------------------------------------------------------------

def _mac(value, what):
    if not isinstance(value, str) or not _MAC.match(value):
        raise Refused("EINVAL", "%s must be a MAC address like 52:54:00:12:34:56, not %r" % (what, value))
    return value.lower()


def checked_settings(changes, current):
    """current updated with changes, every field checked; Refused (EINVAL) changes nothing."""
    if not isinstance(changes, dict):
        raise Refused("EINVAL", "settings must be a map of mac, mtu, promisc, allmulti, mc")
    unknown = set(changes) - SETTINGS_FIELDS
    if unknown:
        raise Refused("EINVAL", "unknown settings %s; the settings are mac, mtu, promisc, allmulti, mc"
                      % ", ".join(sorted(unknown)))
    out = dict(current)
    if "mac" in changes:
        mac = _mac(changes["mac"], "mac")
        if int(mac[:2], 16) & 1:
            raise Refused("EINVAL", "mac %s is a multicast address; the receive address must be unicast" % mac)
        out["mac"] = mac
    if "mtu" in changes:
        mtu = changes["mtu"]
        if not isinstance(mtu, int) or isinstance(mtu, bool) or not 68 <= mtu <= MAX_MTU:
            raise Refused("EINVAL", "mtu must be 68..%d (the 82540EM's longest frame is %d bytes), not %r"
                          % (MAX_MTU, R.MAX_JUMBO_FRAME, mtu))
        out["mtu"] = mtu
    for flag in ("promisc", "allmulti"):
        if flag in changes:
            if not isinstance(changes[flag], bool):
                raise Refused("EINVAL", "%s must be true or false, not %r" % (flag, changes[flag]))
            out[flag] = changes[flag]
    if "mc" in changes:
        mc = changes["mc"]
        if not isinstance(mc, list) or len(mc) > MC_MAX:
            raise Refused("EINVAL", "mc must be a list of at most %d multicast addresses" % MC_MAX)
        out["mc"] = sorted({_mac(m, "an mc entry") for m in mc})
    return out


def mta_hash(mac):
    """(register, bit) of the MTA for mac with RCTL.MO = 0 (address bits 47:36)."""
    b = bytes.fromhex(mac.replace(":", ""))
    h = ((b[4] >> 4) | (b[5] << 4)) & 0xFFF
    return h >> 5, h & 0x1F


# -- the attached front end ------------------------------------------------------------------------

class Attachment:
    """What an attached front end handed us: its memory (mapped for the device) and doorbells."""

    def __init__(self, client, memfd, doorbell, notify, shm):
        self.client, self.memfd, self.doorbell, self.notify, self.shm = client, memfd, doorbell, notify, shm


class SharedMapping:
    """The front end's memory mapped for this process only (no IOMMU: the device gets bounce buffers)."""

    def __init__(self, fd, size):
        self.map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        anchor = ctypes.c_char.from_buffer(self.map)
        self.vaddr = ctypes.addressof(anchor)
        del anchor

    def close(self):
        self.map.close()


def open_device():
    """The device rsd handed over: (VfioDevice, True) behind an IOMMU, else (UioDevice, False)."""
    if "vfio_device" in resource_fds():
        return VfioDevice.inherited(), True
    return UioDevice.inherited(), False


# -- the driver -----------------------------------------------------------------------------------------

class E1000Driver:
    def __init__(self, sef):
        self.sef = sef
        self.dev = self.bar = self.ring_mem = self.rings = self.irq = None
        self.isolated = True        # the device reaches only what the IOMMU maps for it
        self.bounce = None          # without an IOMMU: (RX, TX) buffers the device DMAs into
        self.eeprom_mac = None
        self.settings = None
        self.rctl = None
        self.stats = {}
        self.stats_saved = None
        self.link = (False, 0, "half")
        self.server = DriverServer(sef, "e1000", {"attach": self.do_attach, "set": self.do_set,
                                                  "stats": self.do_stats},
                                   max_fds=ATTACH_FDS, on_drop=self._dropped)
        self.att = None
        self.driver_counters = {"rx_no_buffer": 0, "tx_restarts": 0, "tx_resent": 0, "refused": 0}
        self.last_backup = time.monotonic()
        self.restored = True        # DS's settings and counts are in (a restart reads them after ready)
        self.programmed = True      # the device has self.settings
        self.restore_timer = None

    # -- life cycle ----------------------------------------------------------------------------
    def init_fresh(self, sef):
        self._bring_up(fresh=True)
        self.settings = self._default_settings()
        self._apply_settings(self.settings)
        self._enable()
        self._backup_settings()
        self._backup_stats()

    def init_restart(self, sef, reason, restarts):
        t0 = time.monotonic()
        self._bring_up(fresh=False)
        t_device = time.monotonic()
        # DS stays off the way to ready and to the first frames: the front end's attach brings
        # every setting; the backed-up settings and statistics are read RESTORE_WAIT after ready
        # (sooner for a request that needs them).  Until then the device has no RX buffers.
        self.settings = self._default_settings()
        self.restored = self.programmed = False
        self.restore_timer = sef.loop.call_later(RESTORE_WAIT, self._restore_from_ds)
        self._enable()
        t_end = time.monotonic()
        print("e1000: restarted after %s (restart %d) in %.1f ms (device %.1f, interrupts %.1f); link %s; "
              "device phases (ms): %s" % (reason, restarts, (t_end - t0) * 1e3, (t_device - t0) * 1e3,
                                          (t_end - t_device) * 1e3, "up" if self.link[0] else "down",
                                          self.phases), file=sys.stderr, flush=True)

    def _restore_from_ds(self, settings_too=True):
        """The previous incarnations' settings (unless a front end gave them already) and counts."""
        if self.restored:
            return
        self.restored = True
        self.restore_timer.cancel()
        t0 = time.monotonic()
        saved = self.sef.restore_state("settings")
        saved_stats = self.sef.restore_state("stats")
        source = "the front end's"
        if not self.programmed:
            settings = self._default_settings()
            source = "the defaults"
            if saved:
                try:
                    settings = checked_settings(json.loads(saved), settings)
                    source = "DS's"
                except (Refused, ValueError) as exc:
                    print("e1000: the settings backed up in DS are unusable (%s); using the defaults" % exc,
                          file=sys.stderr, flush=True)
            self.settings = settings
            self._apply_settings(settings)
            self.programmed = True
        elif saved != json.dumps(self.settings, sort_keys=True):
            self._backup_settings()
        if saved_stats:     # counts since this incarnation started add to the saved ones
            try:
                d = json.loads(saved_stats)
                device = {k: int(v) for k, v in d.get("device", {}).items()}
                driver = {k: int(v) for k, v in d.get("driver", {}).items() if k in self.driver_counters}
            except (ValueError, AttributeError, TypeError):
                device, driver = {}, {}
            for k, v in device.items():
                self.stats[k] = self.stats.get(k, 0) + v
            for k, v in driver.items():
                self.driver_counters[k] += v
        self._read_stats()          # what the device counted since the last incarnation read it
        print("e1000: restored from DS in %.1f ms: settings %s %s, %d counters"
              % ((time.monotonic() - t0) * 1e3, source, json.dumps(self.settings, sort_keys=True),
                 len(self.stats)), file=sys.stderr, flush=True)

    def _default_settings(self):
        return {"mac": self.eeprom_mac, "mtu": R.STANDARD_MTU, "promisc": False, "allmulti": False, "mc": []}

    def _bring_up(self, fresh):
        marks = [("start", time.monotonic())]
        self.dev, self.isolated = open_device()
        self.bar = self.dev.bar(0)
        anchor = ctypes.c_char.from_buffer(self.bar.map)
        regs_addr = ctypes.addressof(anchor)
        del anchor
        marks.append(("vfio", time.monotonic()))
        if self.isolated:
            self.dev.container.iova_ranges      # VFIO_IOMMU_GET_INFO, once: the attach's mapping then skips it
            marks.append(("iommu-info", time.monotonic()))
        else:
            # Allocated once per incarnation, not per attach: the module's buffers last as long as it.
            self.bounce = tuple(self.dev.dma(n) for n in Rings.bounce_sizes())
        self.ring_mem = self.dev.dma(Rings.ring_bytes(TX_RING_SIZE), IOVA_RINGS)
        marks.append(("dma", time.monotonic()))
        self.rings = Rings(regs_addr, self.bar.size, self.ring_mem.vaddr, self.ring_mem.iova, TX_RING_SIZE)
        self._reset_device()
        marks.append(("reset", time.monotonic()))
        self.eeprom_mac = self._read_eeprom_mac()
        self._program_rings()
        marks.append(("rings", time.monotonic()))
        if fresh:
            self._read_stats()      # counts of an earlier service's life are not ours
            self.stats = {}
        self.irq = self.dev.irq()
        marks.append(("irq", time.monotonic()))
        self.phases = " ".join("%s %.1f" % (name, (t - marks[i][1]) * 1e3) for i, (name, t) in enumerate(marks[1:]))

    def _enable(self):
        """Interrupts on, bus mastering on: from here the device may DMA (into our mappings only)."""
        self.wr(R.IMS, R.ICR_LSC | R.ICR_RXT0 | R.ICR_RXO | R.ICR_RXDMT0 | R.ICR_TXDW)
        command = self.dev.config.enable(master=True, memory=True, intx=True)
        self.link = self._link_state()
        # The data path's wakeups go to Cython directly: no Python per interrupt or doorbell.
        if self.isolated:
            self.rings.set_interrupt(self.irq.fileno(), self.dev.fd,
                                     self.irq.maskable and self.irq.index == vfio_abi.VFIO_PCI_INTX_IRQ_INDEX,
                                     self.on_link_change, self.on_violation)
        else:
            self.rings.set_interrupt(self.irq.fileno(), self.dev.config.fd, True, self.on_link_change,
                                     self.on_violation, uio=True, command=command)
        self.sef.add_reader(self.irq, self.rings.on_interrupt)
        self.rings.on_interrupt()   # what was pending before the reader was there; unmasks the line
        self.sef.loop.call_later(POLL_INTERVAL, self._poll)
        self.sef.loop.call_later(STATS_INTERVAL, self._stats_tick)

    # -- registers ---------------------------------------------------------------------------------
    def rd(self, reg):
        return self.bar.read32(reg)

    def wr(self, reg, value):
        self.bar.write32(reg, value)

    def _reset_device(self):
        self.wr(R.IMC, R.IRQ_ALL)
        self.wr(R.TCTL, 0)
        self.wr(R.CTRL, self.rd(R.CTRL) | R.CTRL_RST)
        deadline = time.monotonic() + RESET_TIMEOUT
        while self.rd(R.CTRL) & R.CTRL_RST:
            if time.monotonic() > deadline:
                raise RuntimeError("the e1000 did not come out of CTRL.RST within %.0f ms; is 00:02.0 an "
                                   "82540EM (8086:100e)?" % (RESET_TIMEOUT * 1e3))
        self.wr(R.IMC, R.IRQ_ALL)
        self.rd(R.ICR)
        ctrl = self.rd(R.CTRL)
        ctrl &= ~(R.CTRL_LRST | R.CTRL_PHY_RST | R.CTRL_ILOS | R.CTRL_FRCSPD | R.CTRL_FRCDPX | R.CTRL_VME)
        self.wr(R.CTRL, ctrl | R.CTRL_SLU | R.CTRL_ASDE)
        # An emulated reset may leave RCTL as the last incarnation set it; rewriting the same value is
        # not free (QEMU holds received frames back for a second after any RCTL write).
        self.rctl = self.rd(R.RCTL)

    def _read_eeprom_mac(self):
        words = []
        for addr in R.EEPROM_MAC_WORDS:
            self.wr(R.EERD, R.EERD_START | (addr << R.EERD_ADDR_SHIFT))
            deadline = time.monotonic() + EEPROM_TIMEOUT
            while not (v := self.rd(R.EERD)) & R.EERD_DONE:
                if time.monotonic() > deadline:
                    raise RuntimeError("the EEPROM did not answer EERD within %.0f ms" % (EEPROM_TIMEOUT * 1e3))
            words.append(v >> R.EERD_DATA_SHIFT)
        mac = b"".join(w.to_bytes(2, "little") for w in words)
        return mac.hex(":")

    def _program_rings(self):
        """Both rings empty at index 0; TX on; RX as the settings say but with no buffers."""
        self.rings.reset()
        for base, lo, hi, length, head, tail, n in (
                (self.rings.rx_ring_iova, R.RDBAL, R.RDBAH, R.RDLEN, R.RDH, R.RDT, netshm.RX_BUFS),
                (self.rings.tx_ring_iova, R.TDBAL, R.TDBAH, R.TDLEN, R.TDH, R.TDT, TX_RING_SIZE)):
            self.wr(lo, base & 0xFFFFFFFF)
            self.wr(hi, base >> 32)
            self.wr(length, n * R.TXD_SIZE)
            self.wr(head, 0)
            self.wr(tail, 0)
        self.wr(R.TIPG, R.TIPG_IPGT_COPPER | (R.TIPG_IPGR1 << R.TIPG_IPGR1_SHIFT)
                | (R.TIPG_IPGR2 << R.TIPG_IPGR2_SHIFT))
        self.wr(R.TCTL, R.TCTL_EN | R.TCTL_PSP | (R.TCTL_CT_DEFAULT << R.TCTL_CT_SHIFT)
                | (R.TCTL_COLD_FULL_DUPLEX << R.TCTL_COLD_SHIFT) | R.TCTL_RTLC)
        self.wr(R.ITR, 10 ** 9 // (INTERRUPT_RATE * R.ITR_UNIT_NS))
        self.wr(R.RDTR, RX_DELAY_US * 1000 // R.DELAY_UNIT_NS)
        self.wr(R.RADV, RX_DELAY_US * 1000 // R.DELAY_UNIT_NS)
        self.wr(R.TIDV, TX_DELAY_US * 1000 // R.DELAY_UNIT_NS)
        self.wr(R.TADV, TX_DELAY_US * 1000 // R.DELAY_UNIT_NS)
        self.wr(R.RXCSUM, R.RXCSUM_IPOFL | R.RXCSUM_TUOFL)

    def _apply_settings(self, s):
        mac = bytes.fromhex(s["mac"].replace(":", ""))
        self.wr(R.RAL0, int.from_bytes(mac[:4], "little"))
        self.wr(R.RAH0, int.from_bytes(mac[4:], "little") | R.RAH_AV)
        for i in range(1, R.RA_ENTRIES):
            self.wr(R.RAH0 + 8 * i, 0)
        table = [0] * R.MTA_WORDS
        for m in s["mc"]:
            reg, bit = mta_hash(m)
            table[reg] |= 1 << bit
        for i, word in enumerate(table):
            self.wr(R.MTA + 4 * i, word)
        rctl = (R.RCTL_EN | R.RCTL_BAM | R.RCTL_SECRC | R.RCTL_BSIZE_2048 | R.RCTL_RDMTS_HALF
                | (R.RCTL_LPE if s["mtu"] > R.STANDARD_MTU else 0)
                | (R.RCTL_UPE | R.RCTL_MPE if s["promisc"] else 0)
                | (R.RCTL_MPE if s["allmulti"] else 0))
        if rctl != self.rctl:
            self.wr(R.RCTL, rctl)
            self.rctl = rctl

    def _link_state(self):
        st = self.rd(R.STATUS)
        return (bool(st & R.STATUS_LU), R.SPEEDS[(st & R.STATUS_SPEED_MASK) >> R.STATUS_SPEED_SHIFT],
                "full" if st & R.STATUS_FD else "half")

    # -- statistics --------------------------------------------------------------------------------
    def _read_stats(self):
        for name, reg in R.STATS32.items():
            self.stats[name] = self.stats.get(name, 0) + self.rd(reg)
        for name, (lo, hi) in R.STATS64.items():
            low = self.rd(lo)
            self.stats[name] = self.stats.get(name, 0) + (low | (self.rd(hi) << 32))

    def _stats_tick(self):
        self._read_stats()
        self.sef.loop.call_later(STATS_INTERVAL, self._stats_tick)
        if self.restored and time.monotonic() - self.last_backup >= BACKUP_INTERVAL:
            self.last_backup = time.monotonic()
            self._backup_stats()

    def _all_stats(self):
        out = dict(self.stats)
        out.update(self.driver_counters)
        out["rx_no_buffer"] = self.driver_counters["rx_no_buffer"] + self.rings.rx_no_buffer
        for k, v in self.rings.counters().items():
            out["driver_" + k] = v
        return out

    def _backup_stats(self):
        if not self.restored:
            self._restore_from_ds()
        d = {"device": self.stats, "driver": dict(self.driver_counters,
                                                  rx_no_buffer=self.driver_counters["rx_no_buffer"]
                                                  + self.rings.rx_no_buffer)}
        text = json.dumps(d, sort_keys=True)
        if text != self.stats_saved:
            self.sef.save_state("stats", text)
            self.stats_saved = text

    def _backup_settings(self):
        self.sef.save_state("settings", json.dumps(self.settings, sort_keys=True))

    # -- the data path's wakeups ---------------------------------------------------------------------
    def on_link_change(self, icr):
        """From rings.on_interrupt(), for an interrupt with ICR.LSC."""
        link = self._link_state()
        if link != self.link:
            self.link = link
            if self.att is not None:
                self.server.push(self.att.client, {"ev": "link", "up": link[0], "speed": link[1], "duplex": link[2]})

    def on_violation(self, why):
        """From the rings' wakeups: the attached front end broke netshm.h's rules."""
        if self.att is not None:
            self._refuse(self.att.client, why)

    def _poll(self):
        self._service()
        self.sef.loop.call_later(POLL_INTERVAL, self._poll)

    def _service(self):
        if self.att is None:
            return
        try:
            self.rings.service()
        except ContractViolation as exc:
            self._refuse(self.att.client, str(exc))
        # DeviceFault goes up: the process exits with the message, and rsd replaces it.

    def wild_dma(self):
        """`rsctl fi --wild-dma`: the next RX buffer the device fills is at an unmapped IOVA."""
        if not self.isolated:
            # Without an IOMMU nothing would stop it: the device would write into whatever the
            # kernel keeps at that address.
            print("e1000: fault injection refused: --wild-dma needs an IOMMU to confine it, and this "
                  "device has none (DMA NOT ISOLATED)", file=sys.stderr, flush=True)
            return
        self.rings.wild_rx_iova = WILD_DMA_IOVA
        print("e1000: fault injection: the next RX descriptor's buffer is now %#x, outside every mapping%s"
              % (WILD_DMA_IOVA, "" if self.att else " (once a front end attaches)"), file=sys.stderr, flush=True)
        self._service()

    # -- clients ----------------------------------------------------------------------------------------
    def do_attach(self, c, msg):
        fds = self.server.take_fds(c)
        try:
            if self.att is not None and self.att.client is not c and self.att.client.hung_up():
                self.server.drop(self.att.client)     # its front end is gone; we had not read the EOF yet
            if self.att is not None:
                raise Refused("EBUSY", "a front end is attached already (one at a time)")
            if len(fds) != ATTACH_FDS:
                raise Refused("EINVAL", "attach carries 3 fds (shared memory, driver doorbell, front end "
                              "doorbell) in the sendmsg of the frame's first byte; got %d" % len(fds))
            memfd, doorbell, notify = fds
            try:
                netshm.check_fd(memfd)
            except netshm.NetshmError as exc:
                raise Refused("EINVAL", str(exc)) from None
            for what, fd in (("driver doorbell", doorbell), ("front end doorbell", notify)):
                if not is_eventfd(fd):
                    raise Refused("EINVAL", "the %s (fd %d of the attach) is not an eventfd" % (what, fd))
                os.set_blocking(fd, False)
            tx_done = msg.get("tx_done", 0)
            if not isinstance(tx_done, int) or isinstance(tx_done, bool) or not 0 <= tx_done < 1 << 32:
                raise Refused("EINVAL", "tx_done must be a u32, not %r" % (tx_done,))
            given = msg.get("settings") or {}
            if not self.restored and not (isinstance(given, dict) and given.keys() >= SETTINGS_FIELDS):
                self._restore_from_ds()     # what the attach leaves out is as DS has it
            settings = checked_settings(given, self.settings)
            head = os.pread(memfd, netshm.TXQ_OFF, 0)
            rx_consumed = int.from_bytes(head[68:72], "little")
            if rx_consumed != 0:
                raise Refused("EINVAL", "rx_consumed is %d at attach; the front end sets it to 0 first" % rx_consumed)
            t_map = time.monotonic()
            try:
                shm = self.dev.dma(netshm.SIZE, IOVA_SHARED, fd=memfd) if self.isolated \
                    else SharedMapping(memfd, netshm.SIZE)
            except (OSError, ValueError) as exc:
                raise Refused("ENOMEM", "cannot map the shared memory for the device: %s" % exc) from None
            t_mapped = time.monotonic()
        except Refused:
            close_fds(fds)
            if self.att is None or self.att.client is not c:
                c.closing = True    # the contract: an error reply, then the connection is closed
            raise
        self.att = Attachment(c, memfd, doorbell, notify, shm)
        if settings != self.settings or not self.programmed:
            self.settings = settings
            self._apply_settings(settings)
            self.programmed = True
            if self.restored:       # else _restore_from_ds backs them up, after the frames flow
                self._backup_settings()
        if self.isolated:
            self.rings.attach(shm.vaddr, shm.iova, tx_done, notify, doorbell)
        else:
            rx, tx = self.bounce
            self.rings.attach_bounced(shm.vaddr, tx_done, notify, doorbell, rx.vaddr, rx.iova, tx.vaddr, tx.iova)
        posted = int.from_bytes(head[64:68], "little")
        resend = (posted - tx_done) & 0xFFFFFFFF
        if 0 < resend <= netshm.TX_SLOTS:
            self.driver_counters["tx_restarts"] += 1
            self.driver_counters["tx_resent"] += resend
        self.sef.add_reader(doorbell, self.rings.on_doorbell)
        link = self._link_state()
        self.link = link
        self._service()
        print("e1000: a front end attached; its %d KiB mapped %s in %.1f ms, %d frames to resend"
              % (netshm.SIZE >> 10, "for the device" if self.isolated else "(no IOMMU: copied through "
                 "the module's buffers)", (t_mapped - t_map) * 1e3, resend if 0 < resend <= netshm.TX_SLOTS else 0),
              file=sys.stderr, flush=True)
        return {"mac": self.eeprom_mac, "link": link[0], "speed": link[1], "duplex": link[2],
                "max_mtu": MAX_MTU, "offloads": list(OFFLOADS), "settings": dict(self.settings),
                "generation": self.sef.generation}

    def do_set(self, c, msg):
        changes = {k: v for k, v in msg.items() if k not in ("op", "id")}
        if not self.restored:
            self._restore_from_ds()
        settings = checked_settings(changes, self.settings)
        if settings != self.settings:
            self.settings = settings
            self._apply_settings(settings)
            self._backup_settings()
        return {"settings": dict(self.settings)}

    def do_stats(self, c, msg):
        self._read_stats()
        self._backup_stats()
        return {"stats": self._all_stats(), "dma_isolated": self.isolated}

    def _refuse(self, c, why):
        """The attached front end broke the contract: stop using its memory, drop it, carry on."""
        print("e1000: refusing the front end: %s" % why, file=sys.stderr, flush=True)
        self.driver_counters["refused"] += 1
        self.server.push(c, {"ev": "refused", "msg": why})
        self.server.drop(c)

    def _detach(self):
        att, self.att = self.att, None
        if att is None:
            return
        self.sef.remove_reader(att.doorbell)
        # Stop the device's DMA into that memory before it is unmapped, then empty the rings.
        self.wr(R.RCTL, self.rctl & ~R.RCTL_EN)
        self.wr(R.TCTL, self.rd(R.TCTL) & ~R.TCTL_EN)
        self.rd(R.STATUS)
        self.rings.detach()
        self._program_rings()
        self.wr(R.RCTL, self.rctl)
        att.shm.close()
        close_fds([att.memfd, att.doorbell, att.notify])

    def _dropped(self, c):
        """The server closes c: if it is the attached front end, its memory goes first."""
        if self.att is not None and self.att.client is c:
            self._detach()

    def exit(self, sef):
        # No interrupts for a service that is going; vfio-pci turns bus mastering off when our
        # device fd closes.  RCTL stays as it is: the next incarnation then need not write it.
        if self.bar is not None:
            self.wr(R.IMC, R.IRQ_ALL)
            self._read_stats()
            self._backup_stats()
        if self.dev is not None and not self.isolated:
            # No vfio-pci to do it: no DMA into the module's buffers once they are freed (the
            # module clears it too, for an incarnation that dies without this).
            self.dev.config.enable(master=False, memory=True, intx=True)


def main(argv=None):
    sef = SEF()
    drv = E1000Driver(sef)
    sef.on_init_fresh(drv.init_fresh)
    sef.on_init_restart(drv.init_restart)
    sef.on_accept(drv.server.accept)
    sef.on_exit(drv.exit)
    sef.on_fault("wild-dma")(drv.wild_dma)
    return sef.run()


if __name__ == "__main__":
    sys.exit(main())
