"""Copy grants (MINIX safecopy): give a peer label access to a region of my memory.

With an rsdrv Endpoint the module enforces everything: only the named grantee can
copy, only in the granted directions and range, and only while the granter lives
(same incarnation) and has not revoked the grant.

Without the module (endpoint=None, e.g. host tests), grants fall back to
process_vm_readv/writev: the GrantRef is marked unenforced=True, the checks are
advisory and done by the copier itself, and the kernel only applies its ptrace
rules.  Never rely on a fallback grant for isolation.

A Grant pins its buffer while it exists: it holds a buffer export (a memoryview), so a
granted bytearray cannot be resized or moved under the grant (BufferError), and the export
is released only once revoke() has returned, which the module guarantees is after the last
byte any copy moves into or out of the region.  A Grant dropped without revoke() is revoked
when it is collected.
"""
import os
from dataclasses import asdict, dataclass

from libdrv._rsdrv import (COPY_FROM_GRANT, COPY_TO_GRANT, GRANT_READ, GRANT_WRITE,
                           buffer_address, process_vm_copy)
from libdrv.rsdrv_errors import GrantAccessDenied, GrantRangeError, GranterDead, NoSuchGrant

__all__ = ["GRANT_READ", "GRANT_WRITE", "Grant", "GrantRef", "safecopy_from", "safecopy_to",
           "vsafecopy"]


@dataclass(frozen=True)
class GrantRef:
    """What a granter sends its peer (as a dict through libdrv.wire)."""
    granter: str
    gen: int
    id: int
    size: int
    access: int
    unenforced: bool = False
    pid: int = 0             # fallback only
    addr: int = 0            # fallback only

    def to_wire(self):
        return asdict(self)

    @classmethod
    def from_wire(cls, d):
        try:
            return cls(granter=str(d["granter"]), gen=int(d["gen"]), id=int(d["id"]),
                       size=int(d["size"]), access=int(d["access"]),
                       unenforced=bool(d.get("unenforced", False)),
                       pid=int(d.get("pid", 0)), addr=int(d.get("addr", 0)))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"malformed grant reference {d!r}: {e}") from None


class Grant:
    """A region of my memory (buf, pinned here) granted to the label `grantee`."""

    _view = None

    def __init__(self, buf, grantee, access, endpoint=None):
        if access not in (GRANT_READ, GRANT_WRITE, GRANT_READ | GRANT_WRITE):
            raise ValueError("access must be GRANT_READ, GRANT_WRITE or both")
        # The export is the pin: while it lives, buf's memory cannot move or shrink.
        view = memoryview(buf)
        try:
            addr, size = buffer_address(view, bool(access & GRANT_WRITE))
            if size == 0:
                raise ValueError("cannot grant an empty buffer")
            self.endpoint = endpoint
            self.grantee = grantee
            if endpoint is None:
                self.ref = GrantRef(granter=f"pid{os.getpid()}", gen=0, id=0, size=size,
                                    access=access, unenforced=True, pid=os.getpid(), addr=addr)
            else:
                gid = endpoint.grant(addr, size, access, grantee)
                info = endpoint.info()
                self.ref = GrantRef(granter=info["label"], gen=info["generation"], id=gid,
                                    size=size, access=access)
        except BaseException:
            view.release()
            raise
        self._view = view

    @property
    def unenforced(self):
        return self.ref.unenforced

    @property
    def active(self):
        return self._view is not None

    def revoke(self):
        """End the grant.  When this returns no copy touches the buffer any more (the module
        waits for copies in flight), and the buffer is free to be resized again."""
        if self._view is None:
            raise NoSuchGrant(2, f"rsdrv: revoke grant {self.ref.id}: already revoked")
        if self.endpoint is not None:
            try:
                self.endpoint.revoke(self.ref.id)
            except NoSuchGrant:
                pass             # it died with its endpoint: nothing can reach the buffer
        self._view.release()
        self._view = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._view is not None:
            self.revoke()

    def __del__(self):
        # Unpinning without revoking would let a peer write into memory that has moved on.
        if self._view is not None:
            try:
                self.revoke()
            except Exception:    # noqa: BLE001 - never raise from a finaliser
                pass             # endpoint closed: its grants went with it


def _fallback_check(ref, offset, length, need):
    if not ref.unenforced:
        raise ValueError("an enforced grant (from the module) needs an rsdrv Endpoint to copy")
    if not ref.access & need:
        raise GrantAccessDenied(13, "rsdrv fallback: the grant does not allow this direction")
    if offset < 0 or length > ref.size or offset > ref.size - length:
        raise GrantRangeError(34, "rsdrv fallback: offset + length fall outside the grant")


def _copy(ref, offset, buf, endpoint, direction):
    to_granter = direction == COPY_TO_GRANT
    addr, length = buffer_address(buf, not to_granter)
    if length == 0:
        return 0
    if endpoint is None:
        _fallback_check(ref, offset, length, GRANT_WRITE if to_granter else GRANT_READ)
        try:
            return process_vm_copy(ref.pid, ref.addr + offset, buf, to_granter)
        except ProcessLookupError:
            raise GranterDead(3, f"rsdrv fallback: granter pid {ref.pid} is gone") from None
    if ref.unenforced:
        raise ValueError("an unenforced (fallback) grant cannot be used through the module")
    endpoint.safecopy(ref.granter, ref.gen, ref.id, direction, offset, addr, length)
    return length


def safecopy_from(ref, offset, buf, endpoint=None):
    """Copy len(buf) bytes at `offset` of the grant into buf (writable)."""
    return _copy(ref, offset, buf, endpoint, COPY_FROM_GRANT)


def safecopy_to(ref, offset, data, endpoint=None):
    """Copy data into the grant at `offset`."""
    return _copy(ref, offset, data, endpoint, COPY_TO_GRANT)


def vsafecopy(endpoint, copies):
    """Several copies in one system call: copies = [(ref, offset, buf, to_granter)].
    Returns the count done; on failure the exception's .done says how many succeeded."""
    items = []
    for ref, offset, buf, to_granter in copies:
        addr, length = buffer_address(buf, not to_granter)
        items.append((ref.granter, ref.gen, ref.id,
                      COPY_TO_GRANT if to_granter else COPY_FROM_GRANT, offset, addr, length))
    return endpoint.vsafecopy(items)
