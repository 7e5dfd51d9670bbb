"""Exceptions for /dev/rsdrv: one class per refusal, each saying what to do.

The module's errno values have fixed meanings (kmod/include/uapi/rsdrv.h);
EPERM means "not yours" in a copy and "not in the privilege entry" elsewhere,
so the mapping depends on the operation.
"""
import errno
import os


class RsdrvError(OSError):
    """Any refusal from /dev/rsdrv (an OSError with the kernel's errno)."""


class ModuleNotLoaded(RsdrvError):
    """No /dev/rsdrv: the kernel module is not loaded (or no endpoint was passed)."""


class NotPermitted(RsdrvError):
    """EPERM: the caller lacks CAP_SYS_RAWIO, the entry is sealed, or the resource
    (port, IRQ, memory range, grant peer, PCI device) is not in the entry."""


class NotSealed(RsdrvError):
    """EBADFD: the endpoint has not been sealed, so it grants nothing yet."""


class ResourceBusy(RsdrvError):
    """EBUSY: someone else (a kernel driver or another endpoint) holds the resource."""


class LineBusy(ResourceBusy):
    """EBUSY: the IRQ line is already in use; rsdrv never shares a line."""


class RangeBusy(ResourceBusy):
    """EBUSY (set-up): the port or memory range is reserved by a kernel driver or another
    endpoint (see /proc/ioports, /proc/iomem); .holders lists who, as those files show it."""


class DeviceBound(ResourceBusy):
    """EBUSY (set-up): the PCI device is bound to a kernel driver (.driver) or held by
    another rsdrv endpoint (.driver is None)."""


class TableFull(RsdrvError):
    """ENOSPC: a per-endpoint table or budget is full."""


class GrantError(RsdrvError):
    """A safecopy or revoke failed; the subclass says why."""


class GranterDead(GrantError):
    """ESRCH: the granter exited or closed its endpoint."""


class GranterRestarted(GrantError):
    """ESTALE: the granter's label lives on with a newer generation (it was restarted)."""


class NoSuchGrant(GrantError):
    """ENOENT: the grant was revoked (or never existed)."""


class WrongGrantee(GrantError):
    """EPERM (safecopy): the grant was made for another label."""


class GrantAccessDenied(GrantError):
    """EACCES: the grant does not allow this direction (read vs write)."""


class GrantRangeError(GrantError):
    """ERANGE: offset + length fall outside the granted region."""


_COMMON = {
    errno.EPERM: (NotPermitted, "not permitted: the caller needs CAP_SYS_RAWIO for set-up, "
                  "set-up is refused once sealed, and use is limited to what the entry allows"),
    errno.EBADFD: (NotSealed, "endpoint not sealed: its owner (rsd) must set the label and "
                   "privileges and seal it before passing it on"),
    errno.EBUSY: (LineBusy, "IRQ line already in use by another handler; rsdrv does not "
                  "share lines: free the line or give this driver another one"),
    errno.ENOSPC: (TableFull, "a table or budget of this endpoint is full (see the limits in "
                   "docs/kmod.md)"),
}

_COPY = {
    errno.ESRCH: (GranterDead, "the granter is gone (exited or closed its endpoint); ask its "
                  "successor for a new grant"),
    errno.ESTALE: (GranterRestarted, "the granter was restarted (its label has a newer "
                   "generation); old grants are void, ask for a new one"),
    errno.ENOENT: (NoSuchGrant, "no such grant: it was revoked (a copy cut by the revoke "
                   "stops there) or never made"),
    errno.EPERM: (WrongGrantee, "this grant was made for another label"),
    errno.EACCES: (GrantAccessDenied, "the grant does not allow this direction (check "
                   "GRANT_READ / GRANT_WRITE)"),
    errno.ERANGE: (GrantRangeError, "offset + length fall outside the granted region"),
}


PROC_FILES = {"io": "/proc/ioports", "mem": "/proc/iomem"}
PCI_DEVICES = "/sys/bus/pci/devices"


def range_holders(kind, first, last, path=None):
    """Who holds ports/memory in first..last, as /proc/ioports or /proc/iomem shows it:
    [(first, last, name)] of the deepest entries that overlap (a bus window is not a
    holder, what is inside it is).  Needs root to see addresses; [] if unreadable."""
    try:
        with open(path or PROC_FILES[kind]) as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    entries = []                 # (depth, first, last, name)
    for line in lines:
        span, sep, name = line.partition(" : ")
        if not sep:
            continue
        depth = (len(span) - len(span.lstrip(" "))) // 2
        lo, dash, hi = span.strip().partition("-")
        try:
            lo, hi = int(lo, 16), int(hi, 16)
        except ValueError:
            continue
        entries.append((depth, lo, hi, name))
    if entries and all(lo == hi == 0 for _, lo, hi, _ in entries):
        return []                # addresses hidden from this user
    found = []
    for i, (depth, lo, hi, name) in enumerate(entries):
        if hi < first or lo > last:
            continue
        deeper = any(d > depth and not (h < first or l > last)
                     for d, l, h, _ in _children(entries, i))
        if not deeper:
            found.append((lo, hi, name))
    return found


def _children(entries, i):
    depth = entries[i][0]
    for e in entries[i + 1:]:
        if e[0] <= depth:
            return
        yield e


def pci_driver(bdf, devices_dir=PCI_DEVICES):
    """The kernel driver bound to a PCI device, or None."""
    try:
        return os.path.basename(os.readlink(os.path.join(devices_dir, bdf, "driver")))
    except OSError:
        return None


def _busy_error(err, op, resource):
    kind = resource[0]
    if kind == "pci":
        bdf = resource[1]
        drv = pci_driver(bdf)
        if drv:
            msg = (f"rsdrv: {op}: PCI device {bdf} is bound to the kernel driver {drv!r}; a "
                   "user-mode driver never shares a device with a kernel one: unbind it "
                   f"(echo {bdf} > /sys/bus/pci/drivers/{drv}/unbind) or keep {drv} from "
                   "loading, then start the service again")
        else:
            msg = (f"rsdrv: {op}: PCI device {bdf} is held by another rsdrv endpoint (its "
                   "driver_override is \"rsdrv\"): stop the service that has it first")
        e = DeviceBound(err, msg)
        e.driver = drv
        return e
    first, last = resource[1], resource[2]
    what = "ports" if kind == "io" else "memory"
    holders = range_holders(kind, first, last)
    if holders:
        who = ", ".join(f"{name!r} ({lo:#x}-{hi:#x})" for lo, hi, name in holders)
        held = f"held by {who} in {PROC_FILES[kind]}"
    else:
        held = f"held by someone (read {PROC_FILES[kind]} as root to see whom)"
    mine = [n for _, _, n in holders if n.startswith("rsdrv:")]
    if mine:
        todo = (f"another service's endpoint ({', '.join(mine)}) has them: stop it first, or "
                "fix the overlapping [resources] ranges")
    elif kind == "io":
        todo = ("a kernel driver has them: unbind or unload it (for the 8250 serial driver: "
                "8250.nr_uarts on the kernel command line, or setserial /dev/ttySN uart none) "
                "so only the user-mode driver drives the device")
    else:
        todo = ("a kernel driver has it: unbind or unload it (`lspci -k` shows which driver "
                "has which device) so only the user-mode driver drives the device")
    e = RangeBusy(err, f"rsdrv: {op}: {what} {first:#x}-{last:#x} busy, {held}; {todo}")
    e.holders = holders
    return e


def rsdrv_error(err, op, copy=False, resource=None):
    """The exception for errno `err` from operation `op` (a short verb phrase).
    resource: ("io"|"mem", first, last) or ("pci", bdf) for a set-up call that reserves it."""
    if resource is not None and err == errno.EBUSY:
        return _busy_error(err, op, resource)
    if resource is not None and err == errno.EINVAL and resource[0] in PROC_FILES:
        return RsdrvError(err, f"rsdrv: {op}: invalid range (System RAM is never given out), "
                               "or no label yet: set_label comes first (the reservation in "
                               f"{PROC_FILES[resource[0]]} is named after it)")
    table = _COPY if copy and err in _COPY else _COMMON
    if not copy and err == errno.ENOENT and op.startswith("revoke"):
        table = _COPY
    cls, why = table.get(err, (RsdrvError, None))
    return cls(err, f"rsdrv: {op}: {why or os.strerror(err)}")
