"""The data store's state and its rules: who may do what to which key.

Pure logic, no sockets: the server hands each request here with the
caller's identity (a label learned from the kernel, never from the
message).  Every change is returned as a journal record so the server can
make it durable before anyone hears of it.
"""

import bisect
from dataclasses import dataclass, field

from libdrv.svcstate import REGISTRAR_LABEL, key_writer

from .protocol import (
    E_BADREQ, E_EXIST, E_NOENT, E_PERM, E_QUOTA, PRIVATE_OVERWRITE, PRIVATE_RETRIEVE,
    PRIVATE_SUBSCRIBE, RequestError, check_flags, check_key, check_label, check_value,
)

DEFAULT_QUOTA_KEYS = 4096
DEFAULT_QUOTA_BYTES = 8 << 20


def value_size(value):
    """Bytes a value takes on the wire (u32: 4)."""
    if isinstance(value, str):
        return len(value.encode("utf-8"))
    if isinstance(value, bytes):
        return len(value)
    return 4


@dataclass
class Entry:
    key: str
    type: str
    value: object
    owner: str
    flags: int
    vsize: int = field(default=-1, compare=False)

    def __post_init__(self):
        if self.vsize < 0:
            self.vsize = value_size(self.value)

    def size(self):
        return len(self.key) + self.vsize + 32

    def cost(self):
        """What the key counts against its owner's byte quota: key + value."""
        return len(self.key) + self.vsize

    def record(self):
        return {"o": "set", "k": self.key, "t": self.type, "v": self.value,
                "w": self.owner, "f": self.flags}


@dataclass(frozen=True)
class Caller:
    """Who is asking: label None means an unlabelled process."""
    pid: int
    uid: int
    label: object
    registrar: bool


@dataclass(frozen=True)
class Registration:
    pid: int
    starttime: int
    label: str


class Store:
    def __init__(self, max_value, quota_keys=DEFAULT_QUOTA_KEYS, quota_bytes=DEFAULT_QUOTA_BYTES):
        self.max_value = max_value
        self.quota_keys = quota_keys
        self.quota_bytes = quota_bytes
        self.entries = {}
        self.sorted_keys = []   # every key, in order: list pages without sorting
        self._indexed = True    # False while replaying: the order is built once at the end
        self.registry = {}      # pid -> Registration
        self.usage = {}         # owner label -> [keys, bytes of keys and values]
        self.live_bytes = 0

    # -- identity ---------------------------------------------------------
    def label_of(self, pid, starttime):
        reg = self.registry.get(pid)
        if reg is not None and reg.starttime == starttime:
            return reg.label
        return None

    # -- visibility rules -------------------------------------------------
    @staticmethod
    def may_retrieve(caller, entry):
        return not entry.flags & PRIVATE_RETRIEVE or caller.label == entry.owner

    @staticmethod
    def may_subscribe(caller, entry):
        return not entry.flags & PRIVATE_SUBSCRIBE or caller.label == entry.owner

    # -- requests -----------------------------------------------------------
    def publish(self, caller, key, vtype, value, overwrite, flags):
        """Return (entry, record) for the new value."""
        check_key(key)
        check_flags(flags)
        value = check_value(vtype, value, self.max_value)
        if caller.label is None:
            raise RequestError(E_PERM, "this process has no label, so it may not publish; "
                               "only services started by rsd (or rsd itself) publish")
        if vtype == "label" and not caller.registrar:
            raise RequestError(E_PERM, "only the registrar (rsd) publishes label values")
        self._check_namespace(caller, key, "publish")
        old = self.entries.get(key)
        owner = caller.label
        if old is not None:
            if not overwrite:
                raise RequestError(E_EXIST, "key %r exists (owner %s); publish with overwrite to replace it"
                                   % (key, old.owner))
            if old.flags & PRIVATE_OVERWRITE and caller.label != old.owner:
                raise RequestError(E_PERM, "key %r may be overwritten only by its owner %s" % (key, old.owner))
            # Ownership belongs to the first publisher and survives overwrites.
            owner = old.owner
            if caller.label != old.owner:
                flags = old.flags
        entry = Entry(key, vtype, value, owner, flags)
        self._check_quota(entry, old)
        rec = entry.record()
        self.apply(rec)
        return entry, rec

    @staticmethod
    def _check_namespace(caller, key, what):
        """label.*, drv.* are the registrar's; state.<L>.* is L's.  Checked
        before ownership, so a squatter's early write is refused rather than
        making it the owner."""
        writer = key_writer(key)
        if writer is None or caller.label == writer:
            return
        if writer == REGISTRAR_LABEL:
            raise RequestError(E_PERM, "%s %r refused: label.* and drv.* keys are written only by the "
                               "registrar (rsd); this process is labelled %s" % (what, key, caller.label))
        if writer == "":
            raise RequestError(E_PERM, "%s %r refused: state keys are state.<label>.<name> and only "
                               "label <label> writes them" % (what, key))
        raise RequestError(E_PERM, "%s %r refused: state.%s.* keys belong to label %s; this process is "
                           "labelled %s and writes under state.%s." % (what, key, writer, writer,
                                                                      caller.label, caller.label))

    def _check_quota(self, entry, old):
        if entry.owner == REGISTRAR_LABEL:
            return  # rsd writes a few keys per service; bounded by the services it runs
        keys, used = self.usage.get(entry.owner, (0, 0))
        if old is None and keys + 1 > self.quota_keys:
            raise RequestError(E_QUOTA, "label %s is at its quota of %d keys (it has %d); delete keys it "
                               "no longer needs, or raise the quota with datastore --quota-keys N"
                               % (entry.owner, self.quota_keys, keys))
        after = used - (old.cost() if old is not None else 0) + entry.cost()
        if after > self.quota_bytes and after > used:
            raise RequestError(E_QUOTA, "publishing %r (%d bytes) would bring label %s to %d bytes of keys "
                               "and values, over its quota of %d bytes (it uses %d); delete or shrink keys, "
                               "or raise the quota with datastore --quota-bytes N"
                               % (entry.key, entry.cost(), entry.owner, after, self.quota_bytes, used))

    def squatted(self):
        """Keys in an owned namespace held by someone else (from a journal
        written before these rules): the daemon deletes them at start."""
        return [e for e in self.entries.values()
                if key_writer(e.key) is not None and key_writer(e.key) != e.owner]

    def list_page(self, caller, regex, after, limit, max_bytes):
        """Entries visible to caller matching regex, after key `after`, in key
        order; stops before max_bytes (estimated wire size) or limit entries.
        Returns (items, next): next is the last key sent when more remain."""
        keys = self.sorted_keys
        i = 0 if after is None else bisect.bisect_right(keys, after)
        out, size = [], 0
        while i < len(keys):
            e = self.entries[keys[i]]
            i += 1
            if not regex.fullmatch(e.key) or not self.may_subscribe(caller, e):
                continue
            item = {"key": e.key, "type": e.type, "owner": e.owner, "flags": e.flags}
            cost = 80 + len(e.key) + len(e.owner)
            if self.may_retrieve(caller, e):
                item["value"] = e.value
                cost += e.vsize
            if out and (size + cost > max_bytes or len(out) >= limit):
                return out, out[-1]["key"]
            out.append(item)
            size += cost
        return out, None

    def retrieve(self, caller, key):
        check_key(key)
        entry = self.entries.get(key)
        if entry is None or not self.may_retrieve(caller, entry):
            # A private key is indistinguishable from a missing one.
            raise RequestError(E_NOENT, "no key %r" % key)
        return entry

    def delete(self, caller, key):
        """Return (entry, record) of the deleted key."""
        check_key(key)
        entry = self.entries.get(key)
        if entry is None or not self.may_retrieve(caller, entry):
            raise RequestError(E_NOENT, "no key %r" % key)
        self._check_namespace(caller, key, "delete")
        if caller.label != entry.owner:
            raise RequestError(E_PERM, "key %r is owned by %s; only its owner deletes it"
                               % (key, entry.owner))
        rec = {"o": "del", "k": key}
        self.apply(rec)
        return entry, rec

    def purge(self, caller, label):
        """Delete all keys owned by label; return [(entry, record)]."""
        self._need_registrar(caller, "purge")
        check_label(label)
        out = []
        for key in [k for k, e in self.entries.items() if e.owner == label]:
            entry = self.entries[key]
            rec = {"o": "del", "k": key}
            self.apply(rec)
            out.append((entry, rec))
        return out

    def register(self, caller, pid, starttime, label):
        self._need_registrar(caller, "register")
        check_label(label)
        if label == "rs":
            raise RequestError(E_BADREQ, "label 'rs' is reserved for the registrar")
        rec = {"o": "reg", "p": pid, "s": starttime, "l": label}
        self.apply(rec)
        return rec

    def unregister(self, caller, pid):
        self._need_registrar(caller, "unregister")
        if pid not in self.registry:
            raise RequestError(E_NOENT, "pid %d is not registered" % pid)
        rec = {"o": "unreg", "p": pid}
        self.apply(rec)
        return rec

    @staticmethod
    def _need_registrar(caller, what):
        if not caller.registrar:
            raise RequestError(E_PERM, "only the registrar (rsd, running as the registrar uid) may %s" % what)

    # -- replay and mutation ----------------------------------------------
    def apply(self, rec):
        """Apply one journal record (used live and on replay)."""
        op = rec.get("o")
        if op == "set":
            old = self.entries.get(rec["k"])
            if old is not None:
                self._forget(old)
            elif self._indexed:
                bisect.insort(self.sorted_keys, rec["k"])
            e = Entry(rec["k"], rec["t"], rec["v"], rec["w"], rec["f"])
            self.entries[e.key] = e
            self.live_bytes += e.size()
            use = self.usage.setdefault(e.owner, [0, 0])
            use[0] += 1
            use[1] += e.cost()
        elif op == "del":
            old = self.entries.pop(rec["k"], None)
            if old is not None:
                self._forget(old)
                if self._indexed:
                    del self.sorted_keys[bisect.bisect_left(self.sorted_keys, old.key)]
        elif op == "reg":
            self.registry[rec["p"]] = Registration(rec["p"], rec["s"], rec["l"])
        elif op == "unreg":
            self.registry.pop(rec["p"], None)
        else:
            raise RequestError(E_BADREQ, "unknown journal record %r" % (op,))

    def replay(self, records):
        """Apply journal records in bulk (inserting each key in order would
        cost a move of the whole index per key)."""
        self._indexed = False
        n = 0
        try:
            for rec in records:
                self.apply(rec)
                n += 1
        finally:
            self.sorted_keys = sorted(self.entries)
            self._indexed = True
        return n

    def _forget(self, old):
        self.live_bytes -= old.size()
        use = self.usage[old.owner]
        use[0] -= 1
        use[1] -= old.cost()
        if use[0] == 0:
            del self.usage[old.owner]

    def live_records(self):
        for e in self.entries.values():
            yield e.record()
        for r in self.registry.values():
            yield {"o": "reg", "p": r.pid, "s": r.starttime, "l": r.label}


def check_pid(pid):
    if isinstance(pid, bool) or not isinstance(pid, int) or not 0 < pid < (1 << 22) + 1:
        raise RequestError(E_BADREQ, "pid must be a positive integer")
    return pid
