"""The CUSE character device a character front end serves, registered by rsd as root.

    [resources]
    cuse = "ttyRSD1"                                          # /dev/ttyRSD1, root:dialout 0660
    cuse = { name = "ttyRSD1", group = "uucp", mode = 0o640 }   # or with the node's group and mode

The front end (frontends/cuse.py) runs unprivileged, and /dev/cuse is
root's.  More than that: whoever answers CUSE_INIT names the device, so a
front end that did the handshake itself could register any name (squat
/dev/sdb before the kernel's disk appears).  So during its init it asks
rsd, on its control channel, `{"op": "cuse_open", "id", "name"}`; rsd
checks that the name is the one its service file gives, opens /dev/cuse,
answers CUSE_INIT itself (DEVNAME from the file, CUSE_UNRESTRICTED_IOCTL:
tty ioctls are not _IOC-encoded, so the kernel cannot know their argument
sizes), sets the node's owner and mode, and replies with the fd
(SCM_RIGHTS), keeping no copy.

The device goes with that fd: when the front end dies, the kernel aborts
the connection (every call in flight and every later call on an open file
fails at once, ENOTCONN/ENODEV) and removes the node; the next incarnation
asks again and gets the same name, owner and mode.  A copy kept by rsd would
keep the node, but the requests the dead front end had read would never be
answered (the kernel waits for them; no successor knows their ids), so
their callers would hang: worse than an error.

rsd loads no modules (ProtectKernelModules=yes): `modprobe cuse` at boot
(/etc/modules-load.d/cuse.conf).  docs/serial.md, "The character device
front end (CUSE)".
"""

import errno
import logging
import os
import re
import select
import stat
import struct

log = logging.getLogger("rsd")

CUSE_DEVICE = "/dev/cuse"
DEV_DIR = "/dev"
SYS_CLASS = "/sys/class/cuse"
# A node name rsd may register: no "/", nothing hidden, short (tty names are).
NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,31}")
DEFAULT_GROUP = "dialout"
DEFAULT_MODE = 0o660

# <linux/fuse.h>
FUSE_KERNEL_VERSION = 7
FUSE_MINOR_MIN = 23         # what frontends/_cuseio.pyx's structures need (they are unchanged since)
FUSE_MINOR_MAX = 38         # the <linux/fuse.h> the front end is built with
CUSE_INIT = 4096
CUSE_UNRESTRICTED_IOCTL = 1 << 0
IN_HEADER = struct.Struct("<IIQQIIIHH")        # fuse_in_header
OUT_HEADER = struct.Struct("<IiQ")             # fuse_out_header
INIT_IN = struct.Struct("<IIII")               # cuse_init_in
INIT_OUT = struct.Struct("<IIIIIIII40x")       # cuse_init_out
# Requests and replies the front end handles: a WRITE of MAX_WRITE bytes must fit in one
# read of /dev/cuse (its buffer is MAX_WRITE + 4 KiB), a READ returns up to MAX_READ.
MAX_READ = 64 << 10
MAX_WRITE = 64 << 10

BUSY_WAIT = 3.0             # s rsd asks again while the previous front end's device is still there
BUSY_RETRY = 0.02


class CuseError(Exception):
    """A request rsd refuses, or a kernel that refused: the text says what to do."""


class StillThere(CuseError):
    """The name is a CUSE device still registered (the previous front end not released yet)."""


def check_request(spec, msg):
    """The (name, gid, mode) a front end's cuse_open may have, or CuseError saying what is wrong."""
    res = spec.resources
    if not res.cuse:
        raise CuseError("%s: its service file has no [resources] cuse; rsd registers a CUSE device only for "
                        "a service that names one (cuse = \"NAME\")" % spec.label)
    name = msg.get("name")
    if name != res.cuse:
        raise CuseError("%s: asked for the device %r; its service file gives %r (a front end serves the name "
                        "its file names, no other)" % (spec.label, name, res.cuse))
    return res.cuse, res.cuse_gid, res.cuse_mode


def _sys_dev(name):
    """(major, minor) of the CUSE device called name, or None if there is none."""
    try:
        with open(os.path.join(SYS_CLASS, name, "dev")) as f:
            major, minor = f.read().strip().split(":")
        return int(major), int(minor)
    except (OSError, ValueError):
        return None


def _check_free(name):
    """Refuse a name whose /dev node exists and is not a CUSE device; StillThere if it is one."""
    path = os.path.join(DEV_DIR, name)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    dev = _sys_dev(name)
    if dev is not None and stat.S_ISCHR(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == dev:
        raise StillThere("%s is still registered by a CUSE front end" % path)
    raise CuseError("%s exists and is not a CUSE device (%s): rsd registers a device only under a free "
                    "name; rename [resources] cuse" % (path, stat.filemode(st.st_mode)))


def _read_init(fd):
    """The kernel's CUSE_INIT request: (unique, minor)."""
    r, _, _ = select.select([fd], [], [], 2.0)
    if not r:
        raise CuseError("/dev/cuse sent no CUSE_INIT within 2 s")
    data = os.read(fd, 8192)
    if len(data) < IN_HEADER.size + INIT_IN.size:
        raise CuseError("/dev/cuse's first request is %d bytes, too short for CUSE_INIT" % len(data))
    length, opcode, unique = IN_HEADER.unpack_from(data)[:3]
    major, minor = INIT_IN.unpack_from(data, IN_HEADER.size)[:2]
    if opcode != CUSE_INIT:
        raise CuseError("/dev/cuse's first request is opcode %d, not CUSE_INIT" % opcode)
    if major != FUSE_KERNEL_VERSION or minor < FUSE_MINOR_MIN:
        raise CuseError("the kernel speaks FUSE %d.%d; the front end needs %d.%d or later"
                        % (major, minor, FUSE_KERNEL_VERSION, FUSE_MINOR_MIN))
    return unique, min(minor, FUSE_MINOR_MAX)


def _own_node(name, gid, mode):
    """Give /dev/name (the node the kernel just made for our device) its owner and mode."""
    dev = _sys_dev(name)
    if dev is None:
        raise CuseError("the kernel did not register %s (is the name taken by another CUSE device?)" % name)
    path = os.path.join(DEV_DIR, name)
    try:
        fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise CuseError("%s was registered but %s did not appear: rsd needs devtmpfs on /dev" % (name, path)) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISCHR(st.st_mode) or (os.major(st.st_rdev), os.minor(st.st_rdev)) != dev:
            raise CuseError("%s is not the device the kernel registered (%d:%d); left alone" % (path, *dev))
        # Through the O_PATH fd: the node checked is the node changed.
        os.chown("/proc/self/fd/%d" % fd, 0, gid)
        os.chmod("/proc/self/fd/%d" % fd, mode)
    finally:
        os.close(fd)
    return dev


def register(name, gid, mode):
    """Open /dev/cuse, register name, set its node's owner and mode: (fd, (major, minor), minor version).

    Raises StillThere while a previous front end's device holds the name (ask again shortly)."""
    _check_free(name)
    try:
        fd = os.open(CUSE_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise CuseError("the kernel has no CUSE (%s missing): load the module (modprobe cuse; at boot: echo cuse > "
                        "/etc/modules-load.d/cuse.conf); rsd loads no modules itself" % CUSE_DEVICE) from None
    except OSError as exc:
        raise CuseError("cannot open %s: %s" % (CUSE_DEVICE, exc.strerror)) from None
    try:
        unique, minor = _read_init(fd)
        info = b"DEVNAME=" + name.encode() + b"\0"
        body = INIT_OUT.pack(FUSE_KERNEL_VERSION, minor, 0, CUSE_UNRESTRICTED_IOCTL, MAX_READ, MAX_WRITE, 0, 0) + info
        os.write(fd, OUT_HEADER.pack(OUT_HEADER.size + len(body), 0, unique) + body)
        # The kernel registers the device while it takes our reply; a refusal (the name taken
        # meanwhile) aborts the connection, which poll shows as an error.
        p = select.poll()
        p.register(fd, select.POLLIN)
        if any(ev & (select.POLLERR | select.POLLHUP) for _, ev in p.poll(0)):
            if _sys_dev(name) is not None:
                raise StillThere("the kernel refused %s: a CUSE device of that name is registered" % name)
            raise CuseError("the kernel refused to register %s (see dmesg)" % name)
        dev = _own_node(name, gid, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd, dev, minor


class Registrar:
    """rsd's side of cuse_open requests: answers from the event loop, never blocking it."""

    def __init__(self, loop, now, owners):
        self.loop = loop
        self.now = now
        self.owners = owners    # owners(name) -> labels of the services whose file names that device

    def request(self, spec, ctl, msg, channel_current):
        rid = msg.get("id")
        try:
            wanted = check_request(spec, msg)
            others = [label for label in self.owners(wanted[0]) if label != spec.label]
            if others:
                raise CuseError("%s: the device %s is also named by %s; two services cannot serve one name"
                                % (spec.label, wanted[0], ", ".join(sorted(others))))
        except CuseError as exc:
            log.warning("%s: cuse_open refused: %s", spec.label, exc)
            self._reply(ctl, rid, {"ok": False, "error": str(exc)})
            return
        self._attempt(spec, ctl, rid, wanted, channel_current, self.now() + BUSY_WAIT)

    def _attempt(self, spec, ctl, rid, wanted, channel_current, deadline):
        if not channel_current():
            return
        name, gid, mode = wanted
        try:
            fd, dev, minor = register(name, gid, mode)
        except StillThere as exc:
            if self.now() < deadline:
                self.loop.call_later(BUSY_RETRY, self._attempt, spec, ctl, rid, wanted, channel_current, deadline)
                return
            self._reply(ctl, rid, {"ok": False, "error": "%s: %s after %.0f s (is an old front end alive?)"
                                   % (spec.label, exc, BUSY_WAIT)})
            return
        except (CuseError, OSError) as exc:
            log.error("%s: %s", spec.label, exc)
            self._reply(ctl, rid, {"ok": False, "error": str(exc)})
            return
        try:
            log.info("%s: registered /dev/%s (%d:%d, gid %d, mode %o)", spec.label, name, dev[0], dev[1], gid, mode)
            self._reply(ctl, rid, {"ok": True, "name": name, "path": os.path.join(DEV_DIR, name),
                                   "major": dev[0], "minor": dev[1], "fuse_minor": minor,
                                   "max_read": MAX_READ, "max_write": MAX_WRITE}, [fd])
        finally:
            os.close(fd)   # the front end's copy is the device's only one (see above)

    @staticmethod
    def _reply(ctl, rid, fields, fds=()):
        from libdrv.channel import ChannelClosed
        try:
            ctl.send(dict(fields, op="reply", id=rid), fds)
        except ChannelClosed:
            pass


def check_name(name):
    """True if name may be a CUSE device rsd registers (syntax only; the node is checked at registration)."""
    return isinstance(name, str) and NAME_RE.fullmatch(name) is not None and name not in ("cuse", "fuse")
