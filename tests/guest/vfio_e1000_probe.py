"""A minimal e1000 (82540EM) user on VFIO, run by rsd as an unprivileged service.

Not the e1000 driver: just enough of one to prove the VFIO layer in the
testbed.  At init it resets the MAC (CTRL.RST), reads STATUS and the MAC
address from RAL/RAH and from the EEPROM (EERD), builds one TX and one RX
descriptor ring in DMA memory it maps at IOVAs of its choice, and waits
for INTx on an eventfd in its SEF loop.  Commands, one line each on its
listening socket, one JSON line back:

    info          registers, MAC, DMA layout, how many interrupts came
    arp           transmit an ARP request for QEMU's user-net gateway (10.0.2.2)
    pin SIZE      map SIZE more bytes for the device, then unmap them
    poll          TDH, the TX descriptor's DD bit, the frames received so far
    wild-dma ADDR the next RX buffer is ADDR (outside every mapping of this
                  process); transmit the ARP request so that the reply is
                  written there by the device; report what the device did,
                  then stop answering rsd (a driver gone wrong: rsd's
                  heartbeat replaces it)

Register offsets and bits: Intel 8254x developer's manual (rev. 4.0), 13.4.
"""

import json
import os
import resource
import struct
import time

from libdrv.sef import SEF
from libdrv.vfio import VfioDevice

CTRL, STATUS, EERD, ICR, IMS, IMC = 0x0000, 0x0008, 0x0014, 0x00C0, 0x00D0, 0x00D8
RCTL, TCTL, TIPG = 0x0100, 0x0400, 0x0410
RDBAL, RDBAH, RDLEN, RDH, RDT = 0x2800, 0x2804, 0x2808, 0x2810, 0x2818
TDBAL, TDBAH, TDLEN, TDH, TDT = 0x3800, 0x3804, 0x3808, 0x3810, 0x3818
MTA, RAL0, RAH0 = 0x5200, 0x5400, 0x5404
CTRL_RST, CTRL_SLU, CTRL_ASDE = 1 << 26, 1 << 6, 1 << 5
STATUS_LU = 1 << 1
EERD_START, EERD_DONE = 1 << 0, 1 << 4
RCTL_EN, RCTL_BAM, RCTL_SECRC = 1 << 1, 1 << 15, 1 << 26
TCTL_EN, TCTL_PSP = 1 << 1, 1 << 3
ICR_TXDW, ICR_RXT0 = 1 << 0, 1 << 7
TXD_CMD_EOP, TXD_CMD_IFCS, TXD_CMD_RS = 1 << 0, 1 << 1, 1 << 3
DD = 1 << 0

IOVA_BASE = 0x1_0000_0000      # above the guest's RAM: a wild IOVA equal to a RAM address is unmapped
RING = 8                       # descriptors per ring (TDLEN/RDLEN: multiples of 128 bytes)
BUF = 2048
# DMA layout, one buffer: TX ring | RX ring | TX buffers | RX buffers
TX_RING, RX_RING = 0x0, 0x1000
TX_BUFS, RX_BUFS = 0x2000, 0x2000 + RING * BUF
DMA_SIZE = RX_BUFS + RING * BUF

GUEST_IP, GATEWAY_IP = bytes([10, 0, 2, 15]), bytes([10, 0, 2, 2])


class Probe:
    def __init__(self):
        self.dev = VfioDevice.inherited()
        self.cfg = self.dev.config
        # What the device looks like before this incarnation touches it (bus mastering must be off).
        self.command_at_start = self.cfg.read16(0x04)
        self.cfg.enable(master=True, memory=True, intx=True)
        self.bar = self.dev.bar(0)
        self.mem = self.dev.dma(DMA_SIZE, IOVA_BASE)
        self.irq = self.dev.irq()
        self.irqs = 0
        self.tx_next = 0
        self.rx_next = 0
        self.received = []
        self.reset()

    # -- registers ---------------------------------------------------------------------
    def rd(self, reg):
        return self.bar.read32(reg)

    def wr(self, reg, value):
        self.bar.write32(reg, value)

    def reset(self):
        self.wr(IMC, 0xFFFFFFFF)
        self.wr(CTRL, self.rd(CTRL) | CTRL_RST)
        deadline = time.monotonic() + 1.0
        while self.rd(CTRL) & CTRL_RST:          # self-clearing once the reset is done
            if time.monotonic() > deadline:
                raise RuntimeError("CTRL.RST did not clear")
        time.sleep(0.001)
        self.wr(IMC, 0xFFFFFFFF)
        self.rd(ICR)
        # Leave the PHY alone (no autonegotiation restart): set link up on the MAC side.
        self.wr(CTRL, (self.rd(CTRL) | CTRL_SLU | CTRL_ASDE))
        self.mac_eeprom = self.eeprom_mac()
        ral, rah = self.rd(RAL0), self.rd(RAH0)
        self.mac_ral = struct.pack("<IH", ral, rah & 0xFFFF)
        # Our receive address is the EEPROM's (what the kernel driver does), valid bit set.
        m = self.mac_eeprom
        self.wr(RAL0, struct.unpack("<I", m[:4])[0])
        self.wr(RAH0, struct.unpack("<H", m[4:])[0] | (1 << 31))
        for i in range(128):
            self.wr(MTA + 4 * i, 0)
        self.setup_rings()

    def eeprom_mac(self):
        words = []
        for addr in range(3):
            self.wr(EERD, EERD_START | (addr << 8))
            deadline = time.monotonic() + 1.0
            while not (v := self.rd(EERD)) & EERD_DONE:
                if time.monotonic() > deadline:
                    raise RuntimeError("EERD: the EEPROM did not answer")
            words.append(v >> 16)
        return struct.pack("<HHH", *words)

    def desc(self, ring, i):
        return ring + 16 * i

    def setup_rings(self):
        v = self.mem.view
        v[:DMA_SIZE] = bytes(DMA_SIZE)
        for i in range(RING):  # RX descriptors point at our buffers
            struct.pack_into("<Q", v, self.desc(RX_RING, i), self.mem.iova_of(RX_BUFS + i * BUF))
        for base, lo, hi, ln in ((TX_RING, TDBAL, TDBAH, TDLEN), (RX_RING, RDBAL, RDBAH, RDLEN)):
            iova = self.mem.iova_of(base)
            self.wr(lo, iova & 0xFFFFFFFF)
            self.wr(hi, iova >> 32)
            self.wr(ln, RING * 16)
        self.wr(TDH, 0)
        self.wr(TDT, 0)
        self.wr(RDH, 0)
        self.wr(RDT, RING - 1)   # all but one descriptor are the device's
        self.wr(TIPG, 10 | (10 << 10) | (10 << 20))
        self.wr(TCTL, TCTL_EN | TCTL_PSP | (0x10 << 4) | (0x40 << 12))
        self.wr(RCTL, RCTL_EN | RCTL_BAM | RCTL_SECRC)
        self.wr(IMS, ICR_TXDW | ICR_RXT0)

    # -- interrupts ----------------------------------------------------------------------
    def on_irq(self):
        n = self.irq.take()
        if n:
            self.irqs += n
            self.rd(ICR)          # reading ICR clears the cause: the line drops
            self.collect_rx()
            self.irq.unmask()

    def collect_rx(self):
        v = self.mem.view
        while True:
            off = self.desc(RX_RING, self.rx_next)
            addr, length, _, status, errors, _ = struct.unpack_from("<QHHBBH", v, off)
            if not status & DD:
                return
            entry = {"length": length, "errors": errors, "addr": addr}
            if self.mem.contains(addr, max(length, 1)):
                start = addr - self.mem.iova
                entry["frame"] = bytes(v[start:start + length]).hex()
            self.received.append(entry)
            # Give the descriptor back, pointing at our own buffer again.
            struct.pack_into("<QHHBBH", v, off, self.mem.iova_of(RX_BUFS + self.rx_next * BUF), 0, 0, 0, 0, 0)
            self.wr(RDT, self.rx_next)
            self.rx_next = (self.rx_next + 1) % RING

    # -- transmit ----------------------------------------------------------------------
    def arp_request(self):
        mac = self.mac_eeprom
        return (b"\xff" * 6 + mac + b"\x08\x06"
                + struct.pack(">HHBBH", 1, 0x0800, 6, 4, 1) + mac + GUEST_IP + b"\x00" * 6 + GATEWAY_IP)

    def transmit(self, frame):
        i = self.tx_next
        buf = TX_BUFS + i * BUF
        self.mem.view[buf:buf + len(frame)] = frame
        struct.pack_into("<QHBBBBH", self.mem.view, self.desc(TX_RING, i), self.mem.iova_of(buf),
                         len(frame), 0, TXD_CMD_EOP | TXD_CMD_IFCS | TXD_CMD_RS, 0, 0, 0)
        self.tx_next = (i + 1) % RING
        self.wr(TDT, self.tx_next)
        return i

    def tx_done(self, i):
        return bool(self.mem.view[self.desc(TX_RING, i) + 12] & DD)

    def wild_dma(self, addr):
        """Point the next RX descriptor at addr, which no mapping of ours covers, and make the
        device write a frame there (the gateway's ARP reply)."""
        off = self.desc(RX_RING, self.rx_next)
        struct.pack_into("<QHHBBH", self.mem.view, off, addr, 0, 0, 0, 0, 0)
        before = len(self.received)
        i = self.transmit(self.arp_request())
        deadline = time.monotonic() + 5
        v = self.mem.view
        while time.monotonic() < deadline:
            status = v[off + 12]
            if status & DD:
                break
            time.sleep(0.01)
        _, length, _, status, errors, _ = struct.unpack_from("<QHHBBH", v, off)
        return {"tx_done": self.tx_done(i), "rx_dd": bool(status & DD), "rx_length": length,
                "received_before": before, "addr": addr}

    def info(self):
        return {"status": self.rd(STATUS), "link_up": bool(self.rd(STATUS) & STATUS_LU),
                "ctrl": self.rd(CTRL), "mac_eeprom": self.mac_eeprom.hex(":"),
                "mac_ral": self.mac_ral.hex(":"), "ids": "%04x:%04x" % self.cfg.ids,
                "iova": self.mem.iova, "dma_size": self.mem.size, "irqs": self.irqs,
                "can_reset": self.dev.can_reset, "pid": os.getpid(), "uid": os.getuid(),
                "command_at_start": self.command_at_start,
                "memlock": resource.getrlimit(resource.RLIMIT_MEMLOCK)[0],
                "fds": sorted(os.listdir("/proc/self/fd"), key=int),
                "resource_fds": os.environ.get("RSD_RESOURCE_FDS")}

    def pin(self, size):
        """Try to map size more bytes for the device (they would be pinned)."""
        try:
            buf = self.dev.dma(size, IOVA_BASE + (1 << 32))
        except OSError as exc:
            return {"ok": False, "error": str(exc)}
        buf.close()
        return {"ok": True}

    def poll(self):
        self.on_irq()   # an interrupt may wait behind this very request in the loop
        self.collect_rx()
        return {"tdh": self.rd(TDH), "tdt": self.rd(TDT), "tx0_dd": self.tx_done(0),
                "irqs": self.irqs, "received": self.received, "ims": self.rd(IMS),
                "pci_status": self.cfg.read16(0x06), "pci_command": self.cfg.read16(0x04)}


def main():
    sef = SEF()
    state = {}

    @sef.on_init_fresh
    def fresh(sef):
        state["probe"] = probe = Probe()
        sef.add_reader(probe.irq, probe.on_irq)

    sef.on_init_restart(lambda sef, reason, restarts: fresh(sef))

    @sef.on_accept
    def client(conn):
        conn.setblocking(True)
        conn.settimeout(10)
        with conn:
            line = conn.makefile().readline().split()
            probe = state["probe"]
            hang = False
            if not line:
                return
            if line[0] == "info":
                reply = probe.info()
            elif line[0] == "arp":
                reply = {"slot": probe.transmit(probe.arp_request())}
            elif line[0] == "pin" and len(line) == 2:
                reply = probe.pin(int(line[1], 0))
            elif line[0] == "poll":
                reply = probe.poll()
            elif line[0] == "wild-dma" and len(line) == 2:
                reply = probe.wild_dma(int(line[1], 0))
                hang = True
            else:
                reply = {"error": "unknown command %r" % line}
            conn.sendall((json.dumps(reply) + "\n").encode())
        if hang:
            while True:   # a driver gone wrong: it stops answering rsd
                pass

    return sef.run()
