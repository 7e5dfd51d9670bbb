"""A disk driver for tests: speaks the block driver protocol (docs/block.md,
libdrv/blkshm.h) with a plain file as the disk.  A real SEF service run by
rsd (class "blk"); the block front end cannot tell it from the AHCI driver.

    program = "/work/main/tests/guest/file_blk_driver.py"
    args = ["--file", "/run/x/disk.img", "--behaviour-file", "/run/x/behaviour"]

Faults: `rsctl fi --crash/--hang/--exit` (SEF).  Hostile behaviours, read
from --behaviour (or, at each attach, from the first word of
--behaviour-file), start after HOSTILE_AFTER good completions:
  unknown-tag   complete a tag never sent
  twice         complete one request twice
  bad-status    a status outside blkshm.STATUSES
  jump          cq_posted jumps past what is outstanding
  garbage       random bytes over the completion ring and cq_posted
  poison:LBA    crash (SIGSEGV) on taking any request that touches block LBA
  slow:MS       wait MS milliseconds before each completion batch (stays responsive)
"""

import argparse
import errno
import mmap
import os
import random
import signal
import socket
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from libdrv import blkshm  # noqa: E402
from libdrv.sef import SEF  # noqa: E402
from libdrv.wire import FrameError, FrameReader, encode  # noqa: E402

HOSTILE_AFTER = 8
REQ = struct.Struct("<QIIIBBHQ")     # struct blkshm_req
CPL = struct.Struct("<Ii")           # struct blkshm_cpl
HDR_FE = 64                          # sq_posted, cq_consumed, frontend_idle
HDR_DRV = 128                        # sq_taken, cq_posted, driver_idle
SLOTS = blkshm.SLOTS


def log(*a):
    print("file-blk:", *a, file=sys.stderr, flush=True)


class Attach:
    def __init__(self, conn, memfd, bell, wake, behaviour):
        self.conn, self.memfd, self.bell, self.wake = conn, memfd, bell, wake
        self.shm = mmap.mmap(memfd, blkshm.SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.data = memoryview(self.shm)[blkshm.DATA_OFF:]
        self.sq_taken = self.cq_posted = 0
        self.good = 0
        self.last_tag = 0
        self.behaviour = behaviour
        self.misbehaved = False

    def close(self):
        self.data.release()
        self.shm.close()
        for fd in (self.memfd, self.bell, self.wake):
            os.close(fd)


class FileDisk:
    def __init__(self, sef, args):
        self.sef = sef
        self.a = args
        self.fd = os.open(args.file, os.O_RDWR | os.O_CLOEXEC)
        self.size = os.fstat(self.fd).st_size
        self.bs = args.block_size
        self.blocks = self.size // self.bs
        self.att = None
        self.conns = {}            # sock -> FrameReader

    # -- the service socket ---------------------------------------------------------
    def accept(self, conn):
        conn.setblocking(False)
        self.conns[conn] = FrameReader(1 << 16)
        self.sef.add_reader(conn, self.on_conn, conn)

    def drop(self, conn):
        if self.att is not None and self.att.conn is conn:
            self.att.close()
            self.sef.remove_reader(self.att.bell)
            self.att = None
            log("front end gone; attach dropped")
        self.sef.remove_reader(conn)
        self.conns.pop(conn, None)
        conn.close()

    def on_conn(self, conn):
        try:
            data, fds, _, _ = socket.recv_fds(conn, 65536, 4, socket.MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data, fds = b"", []
        if not data:
            for fd in fds:
                os.close(fd)
            self.drop(conn)
            return
        try:
            msgs = self.conns[conn].feed(data)
        except FrameError:
            self.drop(conn)
            return
        for msg in msgs:
            reply = self.handle(conn, msg, fds)
            fds = []
            reply["id"] = msg.get("id")
            try:
                conn.send(encode(reply))
            except OSError:
                self.drop(conn)
                return
        for fd in fds:
            os.close(fd)

    def behaviour(self):
        if self.a.behaviour_file:
            try:
                with open(self.a.behaviour_file) as f:
                    return (f.read().split() or ["none"])[0]
            except OSError:
                return "none"
        return self.a.behaviour

    def handle(self, conn, msg, fds):
        if msg.get("op") != "attach":
            return {"ok": False, "err": "EINVAL", "msg": "unknown operation %r" % msg.get("op")}
        if len(fds) != 3:
            for fd in fds:
                os.close(fd)
            return {"ok": False, "err": "EINVAL", "msg": "attach takes 3 fds"}
        if self.att is not None:
            for fd in fds:
                os.close(fd)
            return {"ok": False, "err": "EBUSY", "msg": "still attached to the previous front end"}
        try:
            blkshm.check_fd(fds[0])
        except blkshm.BlkshmError as exc:
            for fd in fds:
                os.close(fd)
            return {"ok": False, "err": "EINVAL", "msg": str(exc)}
        self.att = Attach(conn, fds[0], fds[1], fds[2], self.behaviour())
        os.set_blocking(fds[1], False)
        self.sef.add_reader(fds[1], self.service)
        log("attached generation %s, behaviour %s, at monotonic %.3f" % (msg.get("generation"), self.att.behaviour,
                                                                       time.monotonic()))
        self.sef.loop.call_later(0, self.service)
        return {"ok": True, "blocks": self.blocks, "block_size": self.bs, "physical_block_size": 4096,
                "write_cache": True, "fua": True, "discard": True, "discard_max_blocks": (4 << 20) // self.bs,
                "queue_depth": 32, "rotational": False, "model": "file-blk test disk",
                "serial": os.path.basename(self.a.file)}

    # -- the rings -------------------------------------------------------------------
    def service(self):
        att = self.att
        if att is None:
            return
        try:
            os.read(att.bell, 8)
        except BlockingIOError:
            pass
        shm = att.shm
        struct.pack_into("<I", shm, HDR_DRV + 8, 0)          # driver_idle = 0: awake, the front end may skip ringing
        posted_any = False
        while True:
            sq_posted, = struct.unpack_from("<I", shm, HDR_FE)
            if (sq_posted - att.sq_taken) & 0xffffffff == 0:
                # about to sleep: say so, then look once more (blkshm.h: a ring skipped
                # while we were awake must not be lost)
                struct.pack_into("<I", shm, HDR_DRV + 8, 1)
                sq_posted, = struct.unpack_from("<I", shm, HDR_FE)
                if (sq_posted - att.sq_taken) & 0xffffffff == 0:
                    break
                struct.pack_into("<I", shm, HDR_DRV + 8, 0)
            if (sq_posted - att.sq_taken) & 0xffffffff > SLOTS:
                log("front end broke sq_posted; dropping it")
                self.drop(att.conn)
                return
            lba, count, data_off, tag, op, flags, _, _ = REQ.unpack_from(
                shm, blkshm.SQ_OFF + (att.sq_taken % SLOTS) * REQ.size)
            att.sq_taken = (att.sq_taken + 1) & 0xffffffff
            struct.pack_into("<I", shm, HDR_DRV, att.sq_taken)
            b = att.behaviour
            if b.startswith("poison:") and op in (1, 2, 4) and lba <= int(b[7:]) < lba + count:
                log("poison block %s touched: crashing" % b[7:])
                signal.signal(signal.SIGSEGV, signal.SIG_DFL)
                os.kill(os.getpid(), signal.SIGSEGV)
            status = self.execute(att, lba, count, data_off, op, flags)
            self.complete(att, tag, status)
            posted_any = True
        if posted_any:
            if att.behaviour.startswith("slow:"):
                time.sleep(int(att.behaviour[5:]) / 1000.0)
            struct.pack_into("<I", shm, HDR_DRV + 4, att.cq_posted)
            os.write(att.wake, struct.pack("<Q", 1))

    def execute(self, att, lba, count, data_off, op, flags):
        bs = self.bs
        if op == blkshm.OP_FLUSH:
            os.fsync(self.fd)
            return 0
        if op not in (blkshm.OP_READ, blkshm.OP_WRITE, blkshm.OP_DISCARD) or lba + count > self.blocks:
            return -errno.EINVAL
        if op == blkshm.OP_DISCARD:
            os.pwrite(self.fd, bytes(count * bs), lba * bs)  # discarded blocks read as zeros here
            return 0
        n = count * bs
        if not 1 <= count or n > blkshm.IO_MAX or data_off % blkshm.DATA_ALIGN or data_off + n > blkshm.DATA_SIZE:
            return -errno.EINVAL
        if op == blkshm.OP_READ:
            got = os.preadv(self.fd, [att.data[data_off:data_off + n]], lba * bs)
            if got != n:
                return -errno.EIO
        else:
            os.pwrite(self.fd, att.data[data_off:data_off + n], lba * bs)
            if flags & blkshm.F_FUA:
                os.fdatasync(self.fd)
        return 0

    def complete(self, att, tag, status):
        shm = att.shm
        hostile = att.behaviour if (att.good >= HOSTILE_AFTER and not att.misbehaved) else "none"
        if hostile in ("unknown-tag", "twice", "bad-status", "jump", "garbage"):
            att.misbehaved = True
            log("misbehaving: %s" % hostile)
        if hostile == "bad-status":
            status = -4242
        if hostile == "unknown-tag":
            self.post(att, 0x7ead0000 + tag, 0)     # in place of its own: the count stays plausible
        elif hostile == "twice":
            self.post(att, att.last_tag, 0)        # one completed already, in place of this one
        else:
            self.post(att, tag, status)
        if hostile == "jump":
            att.cq_posted = (att.cq_posted + 1000) & 0xffffffff
        if hostile == "garbage":
            shm[blkshm.CQ_OFF:blkshm.CQ_OFF + SLOTS * CPL.size] = random.randbytes(SLOTS * CPL.size)
            att.cq_posted = random.getrandbits(32)
        struct.pack_into("<I", shm, HDR_DRV + 4, att.cq_posted)
        att.good += 1

    def post(self, att, tag, status):
        CPL.pack_into(att.shm, blkshm.CQ_OFF + (att.cq_posted % SLOTS) * CPL.size, tag & 0xffffffff, status)
        att.cq_posted = (att.cq_posted + 1) & 0xffffffff
        att.last_tag = tag
        # published at once: a crash on the next request loses no completion of this batch
        struct.pack_into("<I", att.shm, HDR_DRV + 4, att.cq_posted)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--file", required=True)
    p.add_argument("--block-size", type=int, default=512)
    p.add_argument("--behaviour", default="none")
    p.add_argument("--behaviour-file")
    a = p.parse_args()
    sef = SEF()
    disk = {}

    def init(sef, *_):
        disk["d"] = FileDisk(sef, a)
        log("disk %s: %d blocks of %d" % (a.file, disk["d"].blocks, a.block_size))

    sef.on_init_fresh(init)
    sef.on_init_restart(init)
    sef.on_accept(lambda conn: disk["d"].accept(conn))
    return sef.run()


if __name__ == "__main__":
    sys.exit(main())
