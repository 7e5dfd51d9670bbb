"""The block front end: an NBD block device the kernel sees, kept across disk driver restarts.

    python -m frontends.blk --label disk0          # [resources] nbd = "disk0" in its service file

At init we attach to the driver (its socket, $RSD_RUNTIME_DIR/svc/<label>.sock)
to learn the disk's geometry, then ask rsd for the NBD connection (rsd/nbd.py:
CONNECT the first time, RECONFIGURE for a later incarnation of ours, so the
kernel re-sends what was in flight when we died) and get our end of the
socket.  The data path is frontends/_nbdio.pyx; the shared memory is
libdrv/blkshm.h (docs/block.md).

Every request is kept until the driver completes it.  When the driver dies
(DS drv.blk.<label>, or its connection closes) the unfinished ones wait;
the next generation gets a fresh memfd (made ahead of time) with their data
copied in, and they go again in their original order, FLUSHes in their
place.  A request the driver was working on at more than RETRY_LIMIT deaths
fails with EIO (MINIX's file server does the same), that request only.

The driver is hostile by assumption: a reply or a ring that breaks the
rules refuses it (its connection closed, its memory no longer looked at);
its requests wait for the next generation.  Nothing we wait for blocks the
loop.  Status: DS blk.<label>.status.
"""

import argparse
import json
import logging
import os
import re
import socket
import sys
import time

from frontends._nbdio import DataPath
from libdrv import blkshm
from libdrv.drvlink import DriverLink, driver_news
from libdrv.dsclient import DSClient, DSError
from libdrv.sef import SEF

log = logging.getLogger("blk")

TICK = 0.1
STATUS_INTERVAL = 1.0
ATTACH_TIMEOUT = 5.0
ATTACH_RETRY = 0.5          # after EBUSY (the driver still finishes our previous attach's commands)
INIT_ATTACH_WAIT = 30.0     # s init waits for a driver that answers the first attach
SPARE_DELAY = 2.0
RETRY_LIMIT = 3
NBD_SNDBUF = 4 << 20


def check_attach_reply(reply):
    """The geometry in the driver's attach reply, or a str saying what is wrong with it."""
    if reply.get("ok") is not True:
        return "ok is %r, neither true nor false" % (reply.get("ok"),)
    g = {k: reply.get(k) for k in ("blocks", "block_size", "physical_block_size", "write_cache", "fua", "discard",
                                   "discard_max_blocks", "queue_depth", "rotational", "model", "serial")}
    if type(g["block_size"]) is not int or g["block_size"] not in (512, 4096):
        return "block_size %r is not 512 or 4096" % (g["block_size"],)
    if type(g["blocks"]) is not int or not 0 < g["blocks"] <= (1 << 60) // g["block_size"]:
        return "blocks %r is not a capacity" % (g["blocks"],)
    pbs = g["physical_block_size"]
    if type(pbs) is not int or not g["block_size"] <= pbs <= 65536 or pbs & (pbs - 1):
        return "physical_block_size %r is not a power of two from the block size to 65536" % (pbs,)
    for k in ("write_cache", "fua", "discard", "rotational"):
        if not isinstance(g[k], bool):
            return "%s %r is not a bool" % (k, g[k])
    if type(g["discard_max_blocks"]) is not int or not 0 <= g["discard_max_blocks"] < 1 << 32 \
            or (g["discard"] and not g["discard_max_blocks"]):
        return "discard_max_blocks %r is not a block count" % (g["discard_max_blocks"],)
    if type(g["queue_depth"]) is not int or not 1 <= g["queue_depth"] <= 32:
        return "queue_depth %r is not 1..32" % (g["queue_depth"],)
    for k in ("model", "serial"):
        if not isinstance(g[k], str):
            return "%s %r is not a string" % (k, g[k])
        g[k] = g[k][:64]
    return g


def nbd_flags(g):
    """The NBD server flags the geometry calls for."""
    flags = ["HAS_FLAGS"]
    if g["write_cache"]:
        flags.append("SEND_FLUSH")
    if g["fua"]:
        flags.append("SEND_FUA")
    if g["discard"]:
        flags.append("SEND_TRIM")
    if g["rotational"]:
        flags.append("ROTATIONAL")
    return flags


class BlkFrontend:
    def __init__(self, label, runtime_dir, retry_limit=RETRY_LIMIT, ds_socket=None):
        self.label = label
        self.retry_limit = retry_limit
        self.driver_path = os.path.join(runtime_dir, "svc", "%s.sock" % label)
        self.ds = DSClient(ds_socket, reconnect=True)
        self.sef = None
        self.dp = None
        self.nbd = None             # our end of the NBD socket
        self.device = None
        self.geometry = None        # what the NBD device was set up with
        self.drv = None
        self.bells = ()
        self.generation = None
        self.pending_up = None
        self.refused_generation = None
        self.attaches = 0
        self.spare_memfd = None
        self.spare_due = 0.0
        self.attach_id = None
        self.attach_deadline = 0.0
        self.retry_at = 0.0
        self.memfd = None           # the memory of the attach in progress (the data path maps it once accepted)
        self.counters = {"attaches": 0, "refusals": 0, "driver_deaths": 0}
        self.state = "waiting"
        self.last_fault = None
        self._draining = False
        self._status_due = 0.0
        self._status_key = "blk.%s.status" % label

    # -- init: the geometry, then the NBD socket from rsd -------------------------------------
    def start(self, sef):
        self.sef = sef
        self.ds.subscribe(r"drv\.blk\.%s" % re.escape(self.label), initial=True)
        g, drv, memfd, bells = self._first_attach()
        reply, fds = sef.request("nbd_connect", size=g["blocks"] * g["block_size"], block_size=g["block_size"],
                                 flags=nbd_flags(g))
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise RuntimeError("rsd's nbd_connect reply carried %d fds, not 1" % len(fds))
        self.nbd = fds[0]
        os.set_blocking(self.nbd, False)
        s = socket.socket(fileno=os.dup(self.nbd))
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, NBD_SNDBUF)
        finally:
            s.close()
        self.device = reply.get("path") if isinstance(reply.get("path"), str) else None
        self.geometry = g
        self.dp = DataPath(self.nbd, memfd, g["blocks"] * g["block_size"], g["block_size"],
                           g["discard_max_blocks"], self.retry_limit)
        os.close(memfd)
        self.dp.on_rare(self.on_rare)
        sef.add_reader(self.dp.epoll_fd, self.dp.service)
        sef.add_reader(self.ds, self.on_ds)
        self.drv = drv
        self.bells = bells
        self._attached(g)
        log.info("%s is %s (%s): %d blocks of %d, %s", self.device, reply.get("device"), reply.get("how"),
                 g["blocks"], g["block_size"], ",".join(nbd_flags(g)))
        self.tick()

    def _first_attach(self):
        """Attach during init (blocking, with a deadline): the geometry is needed before NBD."""
        deadline = time.monotonic() + INIT_ATTACH_WAIT
        why = "no driver socket"
        while time.monotonic() < deadline:
            self._news()  # the generation, if DS says
            try:
                drv = DriverLink(self.driver_path)
            except OSError as exc:
                why = "cannot connect to %s: %s" % (self.driver_path, exc)
                time.sleep(0.2)
                continue
            self.attaches += 1
            memfd = blkshm.create(self.attaches)
            bells = (os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK), os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
            try:
                rid = drv.send("attach", [memfd, *bells], generation=self.attaches)
                reply = None
                while reply is None:
                    for m in drv._read(blocking=True):
                        if m.get("id") == rid:
                            reply = m
            except (OSError, ConnectionError) as exc:
                reply = {"ok": False, "msg": str(exc)}
            g = check_attach_reply(reply) if reply.get("ok") is not False else "refused: %s" % reply.get("msg")
            if isinstance(g, dict):
                return g, drv, memfd, bells
            why = g
            drv.close()
            os.close(memfd)
            for fd in bells:
                os.close(fd)
            log.warning("driver %s: %s (asking again)", self.label, str(why)[:200])
            time.sleep(ATTACH_RETRY)
        raise RuntimeError("no usable driver %s within %.0f s: %s" % (self.label, INIT_ATTACH_WAIT, why))

    def _news(self):
        for what, detail in driver_news(self.ds, "blk", self.label, log):
            if what == "up":
                self.generation = detail

    # -- driver up / down --------------------------------------------------------------------
    def driver_up(self, generation):
        if self.drv is not None and self.generation in (None, generation):
            self.generation = generation  # the incarnation init attached to
            return
        if generation == self.refused_generation:
            return
        if self.drv is not None:
            self.driver_down("replaced by generation %s" % generation)
        try:
            drv = DriverLink(self.driver_path)
        except OSError as exc:
            if self.pending_up != generation:
                log.info("driver %s generation %s up but its socket is not usable yet (will retry): %s",
                         self.label, generation, exc)
            self.pending_up = generation
            return
        self.pending_up = None
        self.generation = generation
        self.attaches += 1
        memfd, self.spare_memfd = self.spare_memfd, None
        if memfd is None:
            memfd = blkshm.create(self.attaches)
        else:
            blkshm.stamp(memfd, self.attaches)
        self.spare_due = time.monotonic() + SPARE_DELAY
        self.drv = drv
        self.bells = (os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK), os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
        self.state = "attaching"
        try:
            self.dp.remap(memfd)   # the unfinished requests' data copied into the new memory
            self.attach_id = drv.send("attach", [memfd, *self.bells], generation=self.attaches)
        except (OSError, ConnectionError) as exc:
            self._refuse("attach not sent: %s" % exc)
            return
        finally:
            os.close(memfd)
        self.attach_deadline = time.monotonic() + ATTACH_TIMEOUT
        self.sef.add_reader(drv.sock, self.on_driver_socket)

    def _attach_answered(self, reply):
        self.attach_id = None
        if reply.get("ok") is False:
            log.warning("driver %s generation %s refused the attach: %s %s (will retry in %.1f s)", self.label,
                        self.generation, reply.get("err"), str(reply.get("msg"))[:200], ATTACH_RETRY)
            generation = self.generation
            self._teardown(died=False)
            self.state = "waiting"
            self.pending_up, self.retry_at = generation, time.monotonic() + ATTACH_RETRY
            return
        g = check_attach_reply(reply)
        if not isinstance(g, dict):
            self._refuse(g)
            return
        if (g["blocks"], g["block_size"]) != (self.geometry["blocks"], self.geometry["block_size"]):
            self._refuse("its disk is %d blocks of %d, not the %d of %d the NBD device has: another disk?"
                         % (g["blocks"], g["block_size"], self.geometry["blocks"], self.geometry["block_size"]))
            return
        self._attached(g)

    def _attached(self, g):
        self.dp.attach(*self.bells)
        self.state = "up"
        self.counters["attaches"] += 1
        self.sef.add_reader(self.bells[1], self.dp.service)
        self.sef.add_reader(self.drv.sock, self.on_driver_socket)
        log.info("driver %s generation %s attached (memory %d): %s %s, %d requests waiting for it", self.label,
                 self.generation, self.attaches, g["model"], g["serial"], self.dp.pending)
        self.dp.service()

    def _refuse(self, why):
        log.error("refusing driver %s generation %s: %s; its requests are kept for the next generation",
                  self.label, self.generation, why)
        self.counters["refusals"] += 1
        self.last_fault = why
        self.refused_generation = self.generation
        self._teardown(died=False)
        self.state = "refused"

    def driver_down(self, why):
        self.pending_up = None
        if self.drv is None:
            return
        self.counters["driver_deaths"] += 1
        again = self._teardown(died=True)
        self.state = "waiting"
        log.warning("driver %s generation %s went away (%s); %d requests wait for the next one",
                    self.label, self.generation, why, again)

    def _teardown(self, died):
        self.attach_id = None
        again = 0
        if self.drv is not None:
            if self.dp.attached:
                if died:
                    # What it completed before it went still counts (a refused driver's memory
                    # is not looked at again).  A fault found now changes nothing: it is gone.
                    self._draining = True
                    try:
                        self.dp.service()
                    finally:
                        self._draining = False
                again = self.dp.detach(died)
            self.sef.remove_reader(self.drv.sock)
            self.drv.close()
            self.drv = None
        for fd in self.bells:
            self.sef.remove_reader(fd)
            os.close(fd)
        self.bells = ()
        return again

    # -- the rare, from the data path --------------------------------------------------------
    def on_rare(self, what, detail):
        if what == "fault":
            if self._draining:
                log.error("driver %s generation %s left its rings broken at its death: %s",
                          self.label, self.generation, detail)
                self.last_fault = detail
            else:
                self._refuse(detail)
        elif what == "disc":
            log.info("%s; stopping", detail)
            self.sef.stop(0)
        else:
            log.error("%s: %s; stopping (rsd starts us again, and the kernel re-sends what was in flight)",
                      what, detail)
            self.sef.remove_reader(self.dp.epoll_fd)
            self.sef.stop(1)

    def on_driver_socket(self):
        try:
            events = self.drv.read_events()
        except (OSError, ConnectionError) as exc:
            if self.attach_id is not None:
                self._refuse("attach failed: %s" % exc)
            else:
                self.driver_down(str(exc))
            return
        for ev in events:
            if self.drv is None:
                return
            if self.attach_id is not None and ev.get("id") == self.attach_id:
                self._attach_answered(ev)

    # -- DS ------------------------------------------------------------------------------------
    def on_ds(self):
        for what, detail in driver_news(self.ds, "blk", self.label, log):
            if what == "up":
                self.driver_up(detail)
            else:
                self.driver_down(detail)

    def status(self):
        return dict(self.counters, **self.dp.counters(), state=self.state, generation=self.generation,
                    device=self.device, last_fault=self.last_fault, updated=round(time.time(), 1),
                    geometry=self.geometry)

    def publish_status(self):
        try:
            self.ds.publish(self._status_key, json.dumps(self.status(), sort_keys=True), overwrite=True)
        except DSError as exc:
            log.debug("status not published: %s", exc)

    def tick(self):
        now = time.monotonic()
        if self.drv is None and self.pending_up is not None and now >= self.retry_at:
            self.driver_up(self.pending_up)
        self.dp.service()   # a driver may skip a doorbell
        self.dp.kick()      # or miss ours
        if self.spare_memfd is None and now >= self.spare_due:
            self.spare_memfd = blkshm.create(0)
        if now >= self._status_due:
            self._status_due = now + STATUS_INTERVAL
            self.publish_status()
        if self.ds.has_notifications():
            self.on_ds()
        if self.attach_id is not None and now > self.attach_deadline:
            self._refuse("no reply to attach within %.0f s" % ATTACH_TIMEOUT)
        self.sef.loop.call_later(TICK, self.tick)


def main(argv=None):
    runtime = os.environ.get("RSD_RUNTIME_DIR", "/run/rsd")
    p = argparse.ArgumentParser(prog="blk-frontend", description="NBD block front end for a disk driver")
    p.add_argument("--label", required=True, help="the disk driver's label (drv.blk.<label>)")
    p.add_argument("--runtime-dir", default=runtime)
    p.add_argument("--retry-limit", type=int, default=RETRY_LIMIT,
                   help="driver deaths a request may see before it fails with EIO (default %(default)s)")
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO,
                        format="blk-frontend[%s]: %%(message)s" % a.label, stream=sys.stderr)
    try:
        fe = BlkFrontend(a.label, a.runtime_dir, retry_limit=a.retry_limit)
    except DSError as exc:
        print("blk-frontend: cannot start: %s" % exc, file=sys.stderr)
        return 1
    sef = SEF()
    sef.on_init_fresh(fe.start)
    sef.on_init_restart(lambda sef, reason, restarts: fe.start(sef))
    return sef.run()


if __name__ == "__main__":
    sys.exit(main())
