"""The network front end: a TAP the Linux stack sees, kept across driver restarts.

    python -m frontends.net --label eth0 [--ifname eth0]

The TAP (persistent, owned by our uid: rsd creates it from `[resources]
tap`) is the interface applications and routes use.  Frames move between
it and the driver through shared memory (libdrv/netshm.h, docs/net.md);
the data path is frontends/_netio.pyx.  We follow the driver through DS
(drv.net.<label>): at each new generation we connect to its socket and
attach; when it dies we keep reading the TAP into the TX area (until it is
full) and hand the next incarnation everything it had not confirmed, so it
resends those frames (MINIX INET's "resend lost data"): TCP sees at worst a
duplicate, which it handles, instead of a loss it would wait out.

Each attach gets a fresh memfd: a driver we refused may still be alive and
mapping the memory it was given, and a dead one may have passed the fd on;
only new memory keeps a new incarnation's rings out of their reach.  The
unconfirmed TX frames are copied over (at most the 4 MiB TX area, once per
incarnation), at the same offsets with the same entries.

The carrier follows the driver's link events.  While no driver runs the
last carrier state is kept for CARRIER_GRACE seconds, so a short restart
does not make the stack flush routes and neighbours; then carrier off.
MTU, PROMISC/ALLMULTI and the MAC address follow the TAP (netlink), the
multicast list follows /proc/net/dev_mcast; changes go to the driver with
`set`, and every attach carries them all.

The driver is hostile by assumption.  Nothing we wait for blocks the loop
(attach and set replies are events; an attach unanswered within
ATTACH_TIMEOUT is refused), so rsd's heartbeats are answered whatever it
does.  An incarnation that breaks the ring rules or answers nonsense is
refused: its connection closed, its memory no longer looked at, the TAP
and the queued TX frames kept for the next generation DS announces.  An
attach answered with an error (EBUSY while it has not yet seen our last
connection close, after our own restart) is asked again.  Status:
DS net.<label>.status (counters, generation, carrier, the driver's link).
"""

import argparse
import fcntl
import json
import logging
import os
import re
import struct
import sys
import time

from pyroute2 import IPRoute
from pyroute2.netlink.rtnl import RTMGRP_LINK

from frontends._netio import DataPath
from libdrv import netshm
from libdrv.drvlink import DriverLink, driver_news
from libdrv.dsclient import DSClient, DSError
from libdrv.sef import SEF

log = logging.getLogger("net")

TICK = 0.1              # poll the rings even without a doorbell (a driver may skip one), retry attach
MC_POLL = 1.0           # /proc/net/dev_mcast has no notification
STATUS_INTERVAL = 1.0
CARRIER_GRACE = 5.0     # seconds the carrier outlives its driver
ATTACH_TIMEOUT = 5.0
SPARE_DELAY = 2.0       # seconds after an attach before the next one's memory is made (not in a recovery)
ATTACH_RETRY = 1.0      # after the driver answered an attach with an error
MAX_MC = 256            # the driver's multicast list limit (docs/net.md)

# <linux/if_tun.h>
TUNSETIFF = 0x400454ca
TUNSETOFFLOAD = 0x400454d0
TUNSETVNETHDRSZ = 0x400454d8
TUNSETCARRIER = 0x400454e2
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6 = 0x01, 0x02, 0x04
OFFLOAD_FLAGS = {"csum": TUN_F_CSUM, "tso4": TUN_F_TSO4, "tso6": TUN_F_TSO6}
# <linux/if.h>
IFF_PROMISC = 0x100
IFF_ALLMULTI = 0x200

MAC_RE = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")


def open_tap(ifname):
    """Attach to the persistent TAP ifname: vnet headers, non-blocking."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", ifname.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", netshm.VNET_HDR_LEN))
    except OSError as exc:
        os.close(fd)
        raise OSError(exc.errno, "cannot attach to TAP %s (%s): it must exist, persistent, owned by uid %d "
                      "(rsd creates it from the service's [resources] tap; by hand: ip tuntap add %s mode tap "
                      "user %d vnet_hdr)" % (ifname, exc.strerror, os.getuid(), ifname, os.getuid())) from None
    return fd


def read_multicast(ifname, path="/proc/net/dev_mcast"):
    """The interface's multicast list: "idx name users global hexaddr" lines."""
    out = []
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) == 5 and parts[1] == ifname and len(parts[4]) == 12:
                out.append(":".join(parts[4][i:i + 2] for i in range(0, 12, 2)))
    return sorted(set(out))[:MAX_MC]


def check_attach_reply(reply):
    """What is wrong with the driver's attach reply, or None."""
    if reply.get("ok") is not True:
        return "ok is %r, neither true nor false" % (reply.get("ok"),)
    mac, link, offloads, max_mtu = (reply.get(k) for k in ("mac", "link", "offloads", "max_mtu"))
    if not isinstance(mac, str) or not MAC_RE.fullmatch(mac.lower()):
        return "mac %r is not a MAC address" % (mac,)
    if not isinstance(link, bool):
        return "link %r is not a bool" % (link,)
    if not isinstance(offloads, list) or not all(isinstance(o, str) and o in OFFLOAD_FLAGS for o in offloads):
        return "offloads %r is not a list drawn from %s" % (offloads, sorted(OFFLOAD_FLAGS))
    if type(max_mtu) is not int or not 68 <= max_mtu <= 65535:
        return "max_mtu %r is not an MTU" % (max_mtu,)
    if type(reply.get("speed", 0)) is not int or not isinstance(reply.get("duplex", ""), str):
        return "speed %r / duplex %r malformed" % (reply.get("speed"), reply.get("duplex"))
    if not isinstance(reply.get("settings", {}), dict):
        return "settings %r is not a map" % (reply.get("settings"),)
    return None


class NetFrontend:
    def __init__(self, label, ifname, runtime_dir, ds_socket=None, carrier_grace=CARRIER_GRACE):
        self.label = label
        self.carrier_grace = carrier_grace
        self.ifname = ifname
        self.driver_path = os.path.join(runtime_dir, "svc", "%s.sock" % label)
        self.ds = DSClient(ds_socket, reconnect=True)
        self.sef = None
        self.tap = None
        self.dp = None
        self.ipr = None
        self.monitor = None
        self.drv = None
        self.bells = ()             # (the driver's, ours) eventfds of the attached driver
        self.generation = None
        self.pending_up = None      # announced up, not attached yet (socket not there): retried
        self.refused_generation = None
        self.attaches = 0
        self.spare_memfd = None     # the next attach's shared memory, made ahead of time
        self.spare_due = 0.0
        self.carrier = False
        self.carrier_off_at = None
        self.offloads = 0
        self.sent_settings = None   # what the driver has (or was last sent)
        self.pending_sets = {}      # request id -> the changes sent
        self.attach_id = None       # the attach request awaiting its reply
        self.attach_deadline = 0.0
        self.retry_at = 0.0         # when to ask pending_up again
        self.driver_info = {}
        self.counters = {"attaches": 0, "refusals": 0, "driver_deaths": 0, "refused_by_driver": 0,
                         "set_sent": 0, "set_refused": 0}
        self.state = "waiting"
        self.last_fault = None
        self._mc = []
        self._mc_due = self._status_due = 0.0
        self._status_key = "net.%s.status" % label

    # -- the TAP and its attributes -------------------------------------------------
    def set_carrier(self, up):
        self.carrier_off_at = None
        if up != self.carrier:
            fcntl.ioctl(self.tap, TUNSETCARRIER, struct.pack("i", int(up)))
            self.carrier = up
            log.info("%s carrier %s", self.ifname, "on" if up else "off")

    def set_offloads(self, names):
        flags = 0
        if "csum" in names:  # segmentation offloads need checksum offload
            flags = TUN_F_CSUM | sum(OFFLOAD_FLAGS[n] for n in names if n in ("tso4", "tso6"))
        if flags != self.offloads:
            fcntl.ioctl(self.tap, TUNSETOFFLOAD, flags)
            self.offloads = flags

    def settings(self):
        """The TAP's settings as the driver should apply them."""
        link = self.ipr.get_links(ifname=self.ifname)[0]
        flags = link["flags"]
        return {"mac": link.get("IFLA_ADDRESS"), "mtu": link.get("IFLA_MTU"),
                "promisc": bool(flags & IFF_PROMISC), "allmulti": bool(flags & IFF_ALLMULTI), "mc": self._mc}

    def follow_settings(self):
        """Send the driver what changed on the TAP since it last heard."""
        if self.drv is None or self.attach_id is not None:
            return  # attaching: the attach carries them all, then we look again
        now = self.settings()
        changed = {k: v for k, v in now.items() if self.sent_settings.get(k) != v}
        if not changed:
            return
        self.sent_settings = now  # sent once: a refused value is not retried until it changes again
        try:
            # Not awaited: the reply comes as an event (a driver that never answers stalls nothing).
            self.pending_sets[self.drv.send("set", **changed)] = changed
            self.counters["set_sent"] += 1
        except (OSError, ConnectionError) as exc:
            self.driver_down(str(exc))

    def _set_answered(self, reply):
        rid = reply.get("id")
        changed = self.pending_sets.pop(rid, None) if type(rid) is int else None
        if changed is None:
            return  # not a reply to a set of ours: nothing to do with it
        if reply.get("ok") is True:
            log.info("driver %s applied %s", self.label, changed)
        else:
            self.counters["set_refused"] += 1
            log.warning("driver %s refused %s: %s (the TAP keeps it; the driver allows an MTU up to %s)",
                        self.label, changed, str(reply.get("msg"))[:200], self.driver_info.get("max_mtu"))

    def on_netlink(self):
        try:
            self.monitor.get()  # the news itself is re-read whole below
        except Exception as exc:  # pyroute2 parsing: the periodic re-read still follows the TAP
            log.warning("netlink monitor: %s", exc)
        self.follow_settings()

    # -- driver up / down ---------------------------------------------------------------
    def driver_up(self, generation):
        if self.drv is not None and generation == self.generation:
            return
        if generation == self.refused_generation:
            return  # refused incarnations stay unfed
        if self.drv is not None:
            self.driver_down("replaced by generation %s" % generation)
        try:
            drv = DriverLink(self.driver_path)
        except OSError as exc:
            if self.pending_up != generation:  # retried every tick: said once
                log.info("driver %s generation %s up but its socket is not usable yet (will retry): %s",
                         self.label, generation, exc)
            self.pending_up = generation
            return
        self.pending_up = None
        self.generation = generation
        self.attaches += 1
        # A spare made in a quiet moment: creating and allocating 5 MiB is not free under load.
        memfd, self.spare_memfd = self.spare_memfd, None
        if memfd is None:
            memfd = netshm.create(self.attaches)
        else:
            netshm.stamp(memfd, self.attaches)
        self.spare_due = time.monotonic() + SPARE_DELAY
        self.drv = drv
        self.bells = (os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK),   # the driver's
                      os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))   # ours
        self.state = "attaching"
        try:
            self.dp.remap(memfd)
            self.sent_settings, self.pending_sets = self.settings(), {}
            if self.driver_info.get("max_mtu"):  # what the last incarnation said it takes
                self.sent_settings["mtu"] = min(self.sent_settings["mtu"], self.driver_info["max_mtu"])
            # Not awaited (the reply comes to on_driver_socket): a driver that never
            # answers must not stall the loop that answers rsd's heartbeats.
            self.attach_id = drv.send("attach", [memfd, *self.bells], tx_done=self.dp.tx_resend_from,
                                      settings=self.sent_settings)
        except (OSError, ConnectionError) as exc:
            self._refuse("attach not sent: %s" % exc)
            return
        finally:
            os.close(memfd)  # our mapping stays; the driver has its own copy of the fd
        self.attach_deadline = time.monotonic() + ATTACH_TIMEOUT
        self.sef.add_reader(drv.sock, self.on_driver_socket)

    def _attach_answered(self, reply):
        self.attach_id = None
        if reply.get("ok") is False:
            # A refusal, not a lie (EBUSY: it has not yet seen our previous connection close,
            # as after our own restart): the same incarnation is asked again shortly.
            log.warning("driver %s generation %s refused the attach: %s %s (will retry in %.0f s)",
                        self.label, self.generation, reply.get("err"), str(reply.get("msg"))[:200],
                        ATTACH_RETRY)
            self._attach_again(drain=False)
            return
        problem = check_attach_reply(reply)
        if problem:
            self._refuse(problem)
            return
        self.driver_info = {k: reply.get(k) for k in ("mac", "link", "speed", "duplex", "max_mtu", "offloads")}
        resent = self.dp.tx_backlog
        self.dp.attach(*self.bells)
        self.set_offloads(reply["offloads"])
        self.set_carrier(reply["link"])
        self.state = "up"
        self.counters["attaches"] += 1
        log.info("driver %s generation %s attached (memory %d): EEPROM MAC %s, link %s %s Mbit/s %s, "
                 "offloads %s; %d TX frames for it to send", self.label, self.generation, self.attaches,
                 reply["mac"], "up" if reply["link"] else "down", reply.get("speed"), reply.get("duplex"),
                 ",".join(reply["offloads"]) or "none", resent)
        self.sef.add_reader(self.bells[1], self.dp.service)  # no Python per wake-up: see on_rare
        self.follow_settings()  # what changed while we waited for the reply
        self.dp.service()

    def _attach_again(self, drain):
        """Drop the connection, keep the incarnation: it is asked again in ATTACH_RETRY s."""
        generation = self.generation
        self._teardown(drain)
        self.state = "waiting"
        self.pending_up, self.retry_at = generation, time.monotonic() + ATTACH_RETRY

    def _refuse(self, why):
        log.error("refusing driver %s generation %s: %s; its frames are kept for the next generation",
                  self.label, self.generation, why)
        self.counters["refusals"] += 1
        self.last_fault = why
        self.refused_generation = self.generation
        self._teardown(drain=False)
        self.state = "refused"

    def driver_down(self, why):
        self.pending_up = None
        if self.drv is None:
            return
        lost_before = self.dp.counters()["rx_lost_bufs"]
        self.counters["driver_deaths"] += 1
        self._teardown()  # takes what it completed first
        self.state = "waiting"
        log.warning("driver %s generation %s went away (%s); %d TX frames wait for the next one to send, "
                    "%d RX buffers of a frame it had not finished are lost", self.label, self.generation, why,
                    self.dp.tx_backlog, self.dp.counters()["rx_lost_bufs"] - lost_before)

    def _teardown(self, drain=True):
        self.attach_id = None
        if self.drv is not None:
            fault = self.dp.detach(drain) if self.dp.attached else None
            if fault:
                log.error("driver %s left its rings inconsistent: %s", self.label, fault)
                self.last_fault = fault
            self.sef.remove_reader(self.drv.sock)
            self.drv.close()
            self.drv = None
        for fd in self.bells:
            self.sef.remove_reader(fd)
            os.close(fd)
        self.bells = ()
        if self.carrier:
            self.carrier_off_at = time.monotonic() + self.carrier_grace
        self._watch_tap()

    # -- data ------------------------------------------------------------------------------
    # The loop calls dp.service (C) straight from our doorbell and the TAP; it calls
    # on_rare only for what needs Python.
    def on_rare(self, what, detail):
        if what == "fault":
            self._refuse(detail)
        elif what == "tap_error":
            log.error("%s; stopping", detail)
            self.sef.stop(1)
            self.sef.remove_reader(self.tap)
            self.dp.tap_watched = False
        else:
            self._watch_tap()

    def _watch_tap(self):
        """Read the TAP only while a frame fits: otherwise the kernel queues (and drops)."""
        want = self.dp.tx_room
        if want != self.dp.tap_watched:
            if want:
                self.sef.add_reader(self.tap, self.dp.service)
            else:
                self.sef.remove_reader(self.tap)
            self.dp.tap_watched = want

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
                return  # refused on the way
            if self.attach_id is not None and ev.get("id") == self.attach_id:
                self._attach_answered(ev)
            elif "id" in ev:
                self._set_answered(ev)
            elif ev.get("ev") == "refused":
                # The driver says we broke a rule of netshm.h; it waits for a new attach,
                # which gets fresh memory (whatever went wrong in the old one stays there).
                log.error("driver %s generation %s refused our memory: %s; attaching again in %.0f s",
                          self.label, self.generation, str(ev.get("msg"))[:200], ATTACH_RETRY)
                self.counters["refused_by_driver"] += 1
                self._attach_again(drain=True)
                return
            elif ev.get("ev") == "link":
                up, speed, duplex = ev.get("up"), ev.get("speed"), ev.get("duplex")
                if not isinstance(up, bool) or type(speed) is not int or not isinstance(duplex, str):
                    log.warning("ignoring a malformed link event (up: bool, speed: int, duplex: str): %.200r", ev)
                    continue
                self.driver_info.update(link=up, speed=speed, duplex=duplex[:16])
                log.info("driver %s link %s %s Mbit/s %s", self.label, "up" if up else "down",
                         ev.get("speed"), ev.get("duplex"))
                self.set_carrier(up)

    # -- DS ------------------------------------------------------------------------------------
    def on_ds(self):
        for what, detail in driver_news(self.ds, "net", self.label, log):
            if what == "up":
                self.driver_up(detail)
            else:
                self.driver_down(detail)

    def status(self):
        return dict(self.counters, **self.dp.counters(), state=self.state, generation=self.generation,
                    carrier=self.carrier, ifname=self.ifname, driver=self.driver_info, last_fault=self.last_fault,
                    updated=round(time.time(), 1))  # a reader sees the front end is alive

    def publish_status(self):
        try:
            self.ds.publish(self._status_key, json.dumps(self.status(), sort_keys=True), overwrite=True)
        except DSError as exc:
            log.debug("status not published: %s", exc)

    # -- event loop ----------------------------------------------------------------------------
    def start(self, sef):
        self.sef = sef
        self.tap = open_tap(self.ifname)
        self.carrier = True  # attaching turned it on; off until a driver reports its link
        self.set_carrier(False)
        memfd = netshm.create(0)
        try:
            self.dp = DataPath(self.tap, memfd)
        finally:
            os.close(memfd)
        self.dp.on_rare(self.on_rare)
        self.ipr = IPRoute()
        self.monitor = IPRoute()
        self.monitor.bind(groups=RTMGRP_LINK)
        sef.add_reader(self.monitor, self.on_netlink)
        self._mc = read_multicast(self.ifname)
        self.ds.subscribe(r"drv\.net\.%s" % re.escape(self.label), initial=True)
        sef.add_reader(self.ds, self.on_ds)
        self.on_ds()
        self._watch_tap()
        self.tick()

    def tick(self):
        now = time.monotonic()
        if self.drv is None and self.pending_up is not None and now >= self.retry_at:
            self.driver_up(self.pending_up)
        if self.carrier_off_at is not None and now >= self.carrier_off_at and self.drv is None:
            log.info("no driver for %.1f s", self.carrier_grace)
            self.set_carrier(False)
        self.dp.service()  # a driver may skip a doorbell
        if self.spare_memfd is None and now >= self.spare_due:
            self.spare_memfd = netshm.create(0)
        if now >= self._mc_due:
            self._mc_due = now + MC_POLL
            self._mc = read_multicast(self.ifname)
            self.follow_settings()  # also catches what the netlink monitor may have coalesced
        if now >= self._status_due:
            self._status_due = now + STATUS_INTERVAL
            self.publish_status()
        if self.ds.has_notifications():
            self.on_ds()  # read along with a reply: the socket will not wake us for them
        if self.attach_id is not None and now > self.attach_deadline:
            self._refuse("no reply to attach within %.0f s" % ATTACH_TIMEOUT)
        self.sef.loop.call_later(TICK, self.tick)


def main(argv=None):
    runtime = os.environ.get("RSD_RUNTIME_DIR", "/run/rsd")
    p = argparse.ArgumentParser(prog="net-frontend", description="network front end for an Ethernet driver")
    p.add_argument("--label", required=True, help="the network driver's label (drv.net.<label>)")
    p.add_argument("--ifname", help="the TAP to serve (default: the label)")
    p.add_argument("--runtime-dir", default=runtime)
    p.add_argument("--carrier-grace", type=float, default=CARRIER_GRACE,
                   help="seconds the carrier stays up without a driver (default %(default)s)")
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO,
                        format="net-frontend[%s]: %%(message)s" % a.label, stream=sys.stderr)
    try:
        fe = NetFrontend(a.label, a.ifname or a.label, a.runtime_dir, carrier_grace=a.carrier_grace)
    except DSError as exc:
        print("net-frontend: cannot start: %s" % exc, file=sys.stderr)
        return 1
    sef = SEF()
    sef.on_init_fresh(fe.start)
    sef.on_init_restart(lambda sef, reason, restarts: fe.start(sef))
    return sef.run()


if __name__ == "__main__":
    sys.exit(main())
