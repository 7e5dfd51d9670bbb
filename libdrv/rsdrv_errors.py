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


class LineBusy(RsdrvError):
    """EBUSY: the IRQ line is already in use; rsdrv never shares a line."""


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
    errno.ENOENT: (NoSuchGrant, "no such grant: it was revoked or never made"),
    errno.EPERM: (WrongGrantee, "this grant was made for another label"),
    errno.EACCES: (GrantAccessDenied, "the grant does not allow this direction (check "
                   "GRANT_READ / GRANT_WRITE)"),
    errno.ERANGE: (GrantRangeError, "offset + length fall outside the granted region"),
}


def rsdrv_error(err, op, copy=False):
    """The exception for errno `err` from operation `op` (a short verb phrase)."""
    table = _COPY if copy and err in _COPY else _COMMON
    if not copy and err == errno.ENOENT and op.startswith("revoke"):
        table = _COPY
    cls, why = table.get(err, (RsdrvError, None))
    return cls(err, f"rsdrv: {op}: {why or os.strerror(err)}")
