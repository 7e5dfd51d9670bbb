"""The TAP interface a network front end serves, created by rsd as root.

    [resources]
    tap = "eth0"

A front end runs unprivileged, and making a network interface takes
CAP_NET_ADMIN; attaching to a persistent TAP that one's own uid owns does
not.  So before every incarnation of a service with `tap`, rsd makes sure
the TAP exists: persistent, owned by the service's uid and gid, with
IFF_VNET_HDR (offloads pass through).  It stays across the front end's
restarts (addresses, routes and TCP connections on it survive) and goes
when the service goes (`rsctl down`, a removed file, shutdown).

An interface of that name that is not a TAP, or a TAP another uid owns, is
refused: rsd never takes over an interface it did not make for the service.
"""

import errno
import logging
import os

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

log = logging.getLogger("rsd")

SYS_NET = "/sys/class/net"
IFF_TAP = 0x0002


def _read(name, attr):
    try:
        with open(os.path.join(SYS_NET, name, attr)) as f:
            return f.read().strip()
    except FileNotFoundError:
        return None


def owner(name):
    """(uid, gid, tun flags) of an existing tun/tap, None if name is not one,
    or raises FileNotFoundError if there is no such interface."""
    if not os.path.exists(os.path.join(SYS_NET, name)):
        raise FileNotFoundError(name)
    flags = _read(name, "tun_flags")
    if flags is None:
        return None
    return int(_read(name, "owner")), int(_read(name, "group")), int(flags, 16)


def ensure(label, name, uid, gid):
    """Make name a persistent TAP owned by uid:gid unless it already is one."""
    try:
        found = owner(name)
    except FileNotFoundError:
        found = False
    if found:
        o_uid, o_gid, flags = found
        if not flags & IFF_TAP:
            raise ValueError("%s: %s is a TUN (layer 3) device, not a TAP; delete it "
                             "(ip link del %s) or name another [resources] tap" % (label, name, name))
        if (o_uid, o_gid) != (uid, gid):
            raise ValueError("%s: the TAP %s belongs to uid %d gid %d, not this service's %d:%d; "
                             "rsd takes over no interface it did not make: delete it "
                             "(ip link del %s) or name another [resources] tap"
                             % (label, name, o_uid, o_gid, uid, gid, name))
        return False
    if found is None:
        raise ValueError("%s: %s exists and is not a TAP (a kernel driver's interface?); rename it "
                         "or name another [resources] tap" % (label, name))
    with IPRoute() as ipr:
        try:
            ipr.link("add", ifname=name, kind="tuntap", mode="tap", uid=uid, gid=gid,
                     ifr={"no_pi": True, "vnet_hdr": True, "one_queue": False, "multi_queue": False})
        except (NetlinkError, OSError) as exc:
            code = getattr(exc, "code", None) or getattr(exc, "errno", None) or 0
            raise OSError(code, "%s: cannot create the TAP %s: %s%s" % (
                label, name, os.strerror(code) if code else exc,
                " (rsd needs CAP_NET_ADMIN: rsd.service's CapabilityBoundingSet)"
                if code == errno.EPERM else "")) from None
    log.info("%s: created the TAP %s for uid %d gid %d", label, name, uid, gid)
    return True


def remove(label, name, uid):
    """Delete the TAP the service had, if it is still the one rsd made for it."""
    try:
        found = owner(name)
    except FileNotFoundError:
        return
    if not found or found[0] != uid:
        log.warning("%s: %s is no longer its TAP; left alone", label, name)
        return
    with IPRoute() as ipr:
        try:
            ipr.link("del", ifname=name)
        except NetlinkError as exc:
            log.error("%s: cannot delete the TAP %s: %s", label, name, exc)
            return
    log.info("%s: deleted the TAP %s", label, name)
