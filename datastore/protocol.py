"""The DS wire protocol: operations, value types, flags, errors, and the
checks every value gets once, where it enters (docs/datastore.md).

Frames are libdrv.wire messages.  A request is {"op", "id", ...}; its reply
is {"id", "ok": True, ...} or {"id", "ok": False, "err": CODE, "msg": TEXT}.
A notification has no "id": {"ev": "set"|"delete"|"overflow", ...}.
"""

import re2

# The constants are the client's (libdrv.dsclient), so both sides agree by
# construction; the daemon re-exports them for its own modules.
from libdrv.dsclient import (  # noqa: F401
    ALL_FLAGS, E_BADREQ, E_BUSY, E_EXIST, E_IO, E_NOENT, E_OVERFLOW, E_PERM, E_QUOTA, E_TOOBIG,
    PRIVATE, PRIVATE_OVERWRITE, PRIVATE_RETRIEVE, PRIVATE_SUBSCRIBE, TYPES,
)
from libdrv.svcstate import is_label

__all__ = [
    "ALL_FLAGS", "E_BADREQ", "E_BUSY", "E_EXIST", "E_IO", "E_NOENT", "E_OVERFLOW", "E_PERM", "E_QUOTA",
    "E_TOOBIG", "PRIVATE", "PRIVATE_OVERWRITE", "PRIVATE_RETRIEVE", "PRIVATE_SUBSCRIBE", "TYPES",
    "MAX_KEY", "MAX_REGEX", "MAX_SUBS_PER_CLIENT", "DEFAULT_MAX_VALUE", "U32_MAX", "RequestError",
    "check_key", "check_label", "infer_type", "check_value", "check_flags", "compile_regex",
]

MAX_KEY = 255
MAX_REGEX = 1024
MAX_SUBS_PER_CLIENT = 64
DEFAULT_MAX_VALUE = 1 << 20
U32_MAX = 0xFFFFFFFF


class RequestError(Exception):
    """A request refused with a protocol error code and a message for a person."""

    def __init__(self, code, msg):
        super().__init__(msg)
        self.code = code
        self.msg = msg


def check_key(key):
    if not isinstance(key, str):
        raise RequestError(E_BADREQ, "key must be a string")
    if not key:
        raise RequestError(E_BADREQ, "key is empty")
    if len(key) > MAX_KEY:
        raise RequestError(E_TOOBIG, "key is %d bytes; the limit is %d" % (len(key), MAX_KEY))
    # Printable ASCII without space: keys are shown and matched in shells.
    if not all("!" <= ch <= "~" for ch in key):
        raise RequestError(E_BADREQ, "key %r must be printable ASCII without spaces" % key[:40])
    return key


def check_label(label):
    if not is_label(label):
        raise RequestError(
            E_BADREQ,
            "label %r is not valid: use a letter then up to 62 letters, digits, '_' or '-'"
            % (label if isinstance(label, str) else type(label).__name__))
    return label


def infer_type(value):
    if isinstance(value, bool):
        raise RequestError(E_BADREQ, "booleans are not a DS type; publish a u32 0 or 1")
    if isinstance(value, int):
        return "u32"
    if isinstance(value, str):
        return "str"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "bytes"
    raise RequestError(E_BADREQ, "cannot store a %s; DS types are %s" % (type(value).__name__, ", ".join(TYPES)))


def check_value(vtype, value, max_value):
    """Return value normalised for storage, or raise RequestError."""
    if vtype not in TYPES:
        raise RequestError(E_BADREQ, "unknown type %r; use one of %s" % (vtype, ", ".join(TYPES)))
    if vtype == "u32":
        if isinstance(value, bool) or not isinstance(value, int):
            raise RequestError(E_BADREQ, "a u32 value must be an integer")
        if not 0 <= value <= U32_MAX:
            raise RequestError(E_BADREQ, "u32 value %d is out of range 0..%d" % (value, U32_MAX))
        return value
    if vtype == "bytes":
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise RequestError(E_BADREQ, "a bytes value must be bytes")
        value = bytes(value)
        size = len(value)
    else:
        if not isinstance(value, str):
            raise RequestError(E_BADREQ, "a %s value must be a string" % vtype)
        if vtype == "label":
            return check_label(value)
        size = len(value.encode("utf-8"))
    if size > max_value:
        raise RequestError(E_TOOBIG, "value is %d bytes; the limit is %d (datastore --max-value)"
                           % (size, max_value))
    return value


def check_flags(flags):
    if isinstance(flags, bool) or not isinstance(flags, int) or flags & ~ALL_FLAGS:
        raise RequestError(E_BADREQ, "flags must be a combination of PRIVATE_RETRIEVE (1), "
                                     "PRIVATE_SUBSCRIBE (2) and PRIVATE_OVERWRITE (4)")
    return flags


_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False


def compile_regex(pattern):
    """Compile a subscription pattern, anchored at both ends.

    RE2 (linear time, no backtracking) so that no pattern a client sends can
    stall the daemon; its syntax is POSIX ERE plus Perl classes like \\d.
    """
    if not isinstance(pattern, str):
        raise RequestError(E_BADREQ, "regex must be a string")
    if len(pattern) > MAX_REGEX:
        raise RequestError(E_TOOBIG, "regex is longer than %d characters" % MAX_REGEX)
    try:
        return re2.compile(pattern, _RE2_OPTIONS)
    except re2.error as exc:
        msg = exc.args[0] if exc.args else str(exc)
        if isinstance(msg, bytes):
            msg = msg.decode("utf-8", "replace")
        raise RequestError(E_BADREQ, "bad regex %r: %s" % (pattern[:80], msg)) from None
