"""The NBD block device a block front end serves, connected by rsd as root.

    [resources]
    nbd = "disk0"          # the stable path: $RSD_RUNTIME_DIR/blk/disk0 -> /dev/nbdN

The front end (frontends/blk.py) runs unprivileged, and NBD's generic
netlink commands need CAP_SYS_ADMIN.  So during its init it asks rsd, on
its control channel, `{"op": "nbd_connect", "id", "size", "block_size",
"flags"}` (the geometry it learnt from its driver); rsd checks the values
and that the service's file names `[resources] nbd`, makes a socketpair,
hands one end to the kernel and replies with the other end (SCM_RIGHTS).

- The first time: NBD_CMD_CONNECT (any free index), with a dead-connection
  timeout: while no front end serves the socket, the kernel keeps the I/O
  queued instead of failing it.  rsd then sets the queue's io_timeout (how
  often the kernel looks at a request in flight: one sent on a socket that
  has since been replaced is re-sent on the new one) and max_sectors_kb
  (requests no larger than the shared memory's largest transfer).
- A later incarnation of the front end: NBD_CMD_RECONFIGURE with the new
  socket on the same index.  The kernel takes it only in place of a socket
  it has marked dead (its receive thread saw the old front end's end close);
  until it has, RECONFIGURE fails with ENOSPC and rsd asks again from its
  event loop (never blocking it) for RECONFIGURE_WAIT seconds.  A device
  that is no longer connected at all (disconnected by hand) is connected
  afresh on the same index.

The index is kept in RUNTIME/nbd/<name>.json so that a restarted rsd
reconfigures the same device; RUNTIME/blk/<name> is a symlink to
/dev/nbdN.  When the service goes (rsctl down, its file removed, shutdown,
given up) rsd disconnects the device and removes both.  rsd loads no
modules (ProtectKernelModules=yes): `modprobe nbd` at boot
(/etc/modules-load.d/nbd.conf).  What the kernel does, 6.1 and 6.12:
docs/block.md, "The block front end".
"""

import errno
import json
import logging
import os
import socket

from pyroute2.netlink import NLA_F_NESTED, NLM_F_ACK, NLM_F_REQUEST, genlmsg, nla
from pyroute2.netlink.exceptions import NetlinkError

log = logging.getLogger("rsd")

# <linux/nbd-netlink.h>
NBD_GENL_FAMILY = "nbd"
NBD_GENL_VERSION = 1
NBD_CMD_CONNECT = 1
NBD_CMD_DISCONNECT = 2
NBD_CMD_RECONFIGURE = 3
# <linux/nbd.h>: the server flags a front end may ask for
SERVER_FLAGS = {"HAS_FLAGS": 1 << 0, "SEND_FLUSH": 1 << 2, "SEND_FUA": 1 << 3, "ROTATIONAL": 1 << 4,
                "SEND_TRIM": 1 << 5}
BLOCK_SIZES = (512, 4096)
MAX_SIZE = 1 << 60               # bytes; a bigger "disk" is a broken geometry

DEAD_CONN_TIMEOUT = 120          # s the kernel queues I/O while no front end serves the socket
CMD_TIMEOUT = 0                  # never fail a request for being slow (a driver restart holds it)
IO_TIMEOUT_MS = 3000             # how often the kernel looks at requests in flight (re-sends after a RECONFIGURE)
MAX_SECTORS_KB = 1024            # = BLKSHM_IO_MAX: the kernel's requests fit one transfer
RECONFIGURE_WAIT = 10.0          # s rsd asks again while the kernel has not noticed the old socket dead
RECONFIGURE_RETRY = 0.05
SYS_BLOCK = "/sys/block"


class nbdmsg(genlmsg):
    prefix = "NBD_ATTR_"
    nla_map = (
        ("NBD_ATTR_UNSPEC", "none"),
        ("NBD_ATTR_INDEX", "uint32"),
        ("NBD_ATTR_SIZE_BYTES", "uint64"),
        ("NBD_ATTR_BLOCK_SIZE_BYTES", "uint64"),
        ("NBD_ATTR_TIMEOUT", "uint64"),
        ("NBD_ATTR_SERVER_FLAGS", "uint64"),
        ("NBD_ATTR_CLIENT_FLAGS", "uint64"),
        ("NBD_ATTR_SOCKETS", "sockets"),
        ("NBD_ATTR_DEAD_CONN_TIMEOUT", "uint64"),
        ("NBD_ATTR_DEVICE_LIST", "hex"),
        ("NBD_ATTR_BACKEND_IDENTIFIER", "asciiz"),
    )

    class sockets(nla):
        nla_flags = NLA_F_NESTED
        nla_map = (("NBD_SOCK_ITEM_UNSPEC", "none"), ("NBD_SOCK_ITEM", "sock_item"))

        class sock_item(nla):
            nla_flags = NLA_F_NESTED
            nla_map = (("NBD_SOCK_UNSPEC", "none"), ("NBD_SOCK_FD", "uint32"))


class NbdError(Exception):
    """A request rsd refuses, or a kernel that refused: the text says what to do."""


class NotDeadYet(NbdError):
    """RECONFIGURE found no dead socket: the kernel has not yet seen the old front end's end close."""


def check_request(spec, msg):
    """(size, block_size, flag bits) of a front end's nbd_connect, or NbdError saying what is wrong."""
    if not spec.resources.nbd:
        raise NbdError("%s: its service file has no [resources] nbd; rsd connects an NBD device only for "
                       "a service that names one (nbd = \"NAME\")" % spec.label)
    size, block_size, flags = msg.get("size"), msg.get("block_size"), msg.get("flags")
    if block_size not in BLOCK_SIZES or type(block_size) is not int:
        raise NbdError("block_size %r is not one of %s" % (block_size, BLOCK_SIZES))
    if type(size) is not int or not 0 < size <= MAX_SIZE or size % block_size:
        raise NbdError("size %r is not a positive multiple of the block size (at most 2^60 bytes)" % (size,))
    if not isinstance(flags, list) or not all(isinstance(f, str) and f in SERVER_FLAGS for f in flags):
        raise NbdError("flags %r is not a list drawn from %s" % (flags, sorted(SERVER_FLAGS)))
    bits = SERVER_FLAGS["HAS_FLAGS"]
    for f in flags:
        bits |= SERVER_FLAGS[f]
    return size, block_size, bits


def record_path(runtime_dir, name):
    return os.path.join(runtime_dir, "nbd", name + ".json")


def link_path(runtime_dir, name):
    return os.path.join(runtime_dir, "blk", name)


def read_record(runtime_dir, name):
    """{"label", "index"} rsd (or its predecessor) connected for name, or None."""
    try:
        with open(record_path(runtime_dir, name)) as f:
            rec = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict) or type(rec.get("index")) is not int or not isinstance(rec.get("label"), str):
        return None
    return rec


def _write_record(runtime_dir, name, label, index):
    path = record_path(runtime_dir, name)
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump({"label": label, "index": index}, f)
    os.replace(path + ".tmp", path)
    link = link_path(runtime_dir, name)
    os.makedirs(os.path.dirname(link), mode=0o755, exist_ok=True)
    try:
        os.unlink(link + ".tmp")
    except FileNotFoundError:
        pass
    os.symlink("/dev/nbd%d" % index, link + ".tmp")
    os.replace(link + ".tmp", link)


def _genl():
    from pyroute2.netlink.generic import GenericNetlinkSocket
    s = GenericNetlinkSocket()
    try:
        s.bind(NBD_GENL_FAMILY, nbdmsg)
    except NetlinkError as exc:
        s.close()
        if exc.code in (errno.ENOENT, errno.ENOTSUP):
            raise NbdError("the kernel has no NBD (generic netlink family \"nbd\" not found): load the module "
                           "(modprobe nbd; at boot: echo nbd > /etc/modules-load.d/nbd.conf); rsd loads no "
                           "modules itself") from None
        raise
    return s


def _command(cmd, attrs):
    """Send one nbd command; its replies (the kernel's answer to CONNECT carries the index)."""
    msg = nbdmsg()
    msg["cmd"] = cmd
    msg["version"] = NBD_GENL_VERSION
    msg["attrs"] = attrs
    s = _genl()
    try:
        return s.nlm_request(msg, msg_type=s.prid, msg_flags=NLM_F_REQUEST | NLM_F_ACK)
    finally:
        s.close()


def _sockets_attr(fd):
    return ["NBD_ATTR_SOCKETS", {"attrs": [["NBD_SOCK_ITEM", {"attrs": [["NBD_SOCK_FD", fd]]}]]}]


def _tune(index):
    """The queue settings NBD has no attribute for (root-only sysfs)."""
    for attr, value in (("io_timeout", IO_TIMEOUT_MS), ("max_sectors_kb", MAX_SECTORS_KB)):
        path = os.path.join(SYS_BLOCK, "nbd%d" % index, "queue", attr)
        try:
            with open(path, "w") as f:
                f.write(str(value))
        except OSError as exc:
            log.warning("nbd%d: cannot set %s to %s (%s): re-sending requests after a front-end restart "
                        "may wait for the kernel's 30 s request timer", index, attr, value, exc.strerror)


def connect(runtime_dir, label, name, size, block_size, flags):
    """Connect (or reconfigure) name's device for label; returns (index, fd for the front end, how).

    Raises NotDeadYet while the kernel still counts the old socket alive (ask again shortly)."""
    rec = read_record(runtime_dir, name)
    if rec is not None and rec["label"] != label:
        raise NbdError("%s: the block device %s is %s's (%s); two services cannot serve one name: rename "
                       "[resources] nbd in one of them" % (label, name, rec["label"], record_path(runtime_dir, name)))
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        if rec is not None:
            try:
                # The identifier CONNECT gave it: the kernel refuses a reconfigure without it (EINVAL).
                _command(NBD_CMD_RECONFIGURE, [["NBD_ATTR_INDEX", rec["index"]],
                                               ["NBD_ATTR_BACKEND_IDENTIFIER", "rsd:%s" % label],
                                               _sockets_attr(mine.fileno())])
                how = "reconfigured"
                index = rec["index"]
            except NetlinkError as exc:
                if exc.code == errno.ENOSPC:
                    raise NotDeadYet("nbd%d still has a live socket" % rec["index"]) from None
                if exc.code not in (errno.EINVAL, errno.ENOENT, errno.ENODEV):
                    raise NbdError("%s: NBD_CMD_RECONFIGURE of nbd%d failed: %s" % (
                        label, rec["index"], os.strerror(exc.code))) from None
                # Not connected any more (disconnected by hand, the module reloaded): afresh, same index.
                log.warning("%s: nbd%d is no longer connected (%s); connecting it afresh",
                            label, rec["index"], os.strerror(exc.code))
                rec = None
        if rec is None:
            attrs = [["NBD_ATTR_SIZE_BYTES", size], ["NBD_ATTR_BLOCK_SIZE_BYTES", block_size],
                     ["NBD_ATTR_SERVER_FLAGS", flags], ["NBD_ATTR_TIMEOUT", CMD_TIMEOUT],
                     ["NBD_ATTR_DEAD_CONN_TIMEOUT", DEAD_CONN_TIMEOUT],
                     ["NBD_ATTR_BACKEND_IDENTIFIER", "rsd:%s" % label], _sockets_attr(mine.fileno())]
            old = read_record(runtime_dir, name)
            if old is not None:
                attrs.insert(0, ["NBD_ATTR_INDEX", old["index"]])
            try:
                replies = _command(NBD_CMD_CONNECT, attrs)
            except NetlinkError as exc:
                raise NbdError("%s: NBD_CMD_CONNECT failed: %s%s" % (
                    label, os.strerror(exc.code),
                    " (rsd needs CAP_SYS_ADMIN: rsd.service's CapabilityBoundingSet)" if exc.code == errno.EPERM
                    else " (every /dev/nbdN is in use: modprobe nbd nbds_max=...)" if exc.code == errno.EBUSY
                    else "")) from None
            index = None
            for r in replies:
                if r.get_attr("NBD_ATTR_INDEX") is not None:
                    index = r.get_attr("NBD_ATTR_INDEX")
            if type(index) is not int:
                raise NbdError("%s: the kernel's answer to NBD_CMD_CONNECT names no device" % label)
            how = "connected"
            _write_record(runtime_dir, name, label, index)
            _tune(index)
    except BaseException:
        theirs.close()
        raise
    finally:
        mine.close()  # the kernel holds its own reference; ours would keep the socket alive after the front end
    return index, theirs, how


def disconnect(runtime_dir, label, name):
    """The service went: disconnect its device, remove its record and link."""
    rec = read_record(runtime_dir, name)
    if rec is None or rec["label"] != label:
        return
    try:
        _command(NBD_CMD_DISCONNECT, [["NBD_ATTR_INDEX", rec["index"]]])
        log.info("%s: disconnected nbd%d (%s)", label, rec["index"], name)
    except (NetlinkError, NbdError, OSError) as exc:
        log.error("%s: cannot disconnect nbd%d: %s", label, rec["index"], exc)
    for path in (link_path(runtime_dir, name), record_path(runtime_dir, name)):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


class Connector:
    """rsd's side of nbd_connect requests: answers from the event loop, never blocking it."""

    def __init__(self, loop, runtime_dir, now):
        self.loop = loop
        self.runtime_dir = runtime_dir
        self.now = now

    def request(self, spec, ctl, msg, channel_current):
        """Take a service's nbd_connect; the reply goes to ctl (with the socket) now or after retries.

        channel_current() says whether ctl is still the incarnation's channel (a retry
        after it died must not connect anything)."""
        rid = msg.get("id")
        try:
            geometry = check_request(spec, msg)
        except NbdError as exc:
            log.warning("%s: nbd_connect refused: %s", spec.label, exc)
            self._reply(ctl, rid, {"ok": False, "error": str(exc)})
            return
        self._attempt(spec, ctl, rid, geometry, channel_current, self.now() + RECONFIGURE_WAIT)

    def _attempt(self, spec, ctl, rid, geometry, channel_current, deadline):
        if not channel_current():
            return
        name = spec.resources.nbd
        try:
            index, theirs, how = connect(self.runtime_dir, spec.label, name, *geometry)
        except NotDeadYet as exc:
            if self.now() < deadline:
                self.loop.call_later(RECONFIGURE_RETRY, self._attempt, spec, ctl, rid, geometry,
                                     channel_current, deadline)
                return
            self._reply(ctl, rid, {"ok": False, "error": "%s: %s after %.0f s: its previous front end's socket "
                                   "is still open (is an old incarnation alive?)" % (spec.label, exc,
                                                                                     RECONFIGURE_WAIT)})
            return
        except (NbdError, NetlinkError, OSError) as exc:
            log.error("%s: %s", spec.label, exc)
            self._reply(ctl, rid, {"ok": False, "error": str(exc)})
            return
        try:
            link = link_path(self.runtime_dir, name)
            log.info("%s: %s nbd%d (%s -> /dev/nbd%d), %d bytes in blocks of %d", spec.label, how, index,
                     link, index, geometry[0], geometry[1])
            self._reply(ctl, rid, {"ok": True, "index": index, "device": "/dev/nbd%d" % index, "path": link,
                                   "how": how}, [theirs.fileno()])
        finally:
            theirs.close()

    @staticmethod
    def _reply(ctl, rid, fields, fds=()):
        from libdrv.channel import ChannelClosed
        try:
            ctl.send(dict(fields, op="reply", id=rid), fds)
        except ChannelClosed:
            pass  # it is gone: its exit is handled elsewhere
