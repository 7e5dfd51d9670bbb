"""The data store's state and its rules: who may do what to which key.

Pure logic, no sockets: the server hands each request here with the
caller's identity (a label learned from the kernel, never from the
message).  Every change is returned as a journal record so the server can
make it durable before anyone hears of it.
"""

from dataclasses import dataclass

from .protocol import (
    E_BADREQ, E_EXIST, E_NOENT, E_PERM, PRIVATE_OVERWRITE, PRIVATE_RETRIEVE,
    PRIVATE_SUBSCRIBE, RequestError, check_flags, check_key, check_label, check_value,
)


@dataclass
class Entry:
    key: str
    type: str
    value: object
    owner: str
    flags: int

    def size(self):
        v = self.value
        return len(self.key) + (len(v) if isinstance(v, (bytes, str)) else 4) + 32

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
    def __init__(self, max_value):
        self.max_value = max_value
        self.entries = {}
        self.registry = {}      # pid -> Registration
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
        rec = entry.record()
        self.apply(rec)
        return entry, rec

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
                self.live_bytes -= old.size()
            e = Entry(rec["k"], rec["t"], rec["v"], rec["w"], rec["f"])
            self.entries[e.key] = e
            self.live_bytes += e.size()
        elif op == "del":
            old = self.entries.pop(rec["k"], None)
            if old is not None:
                self.live_bytes -= old.size()
        elif op == "reg":
            self.registry[rec["p"]] = Registration(rec["p"], rec["s"], rec["l"])
        elif op == "unreg":
            self.registry.pop(rec["p"], None)
        else:
            raise RequestError(E_BADREQ, "unknown journal record %r" % (op,))

    def live_records(self):
        for e in self.entries.values():
            yield e.record()
        for r in self.registry.values():
            yield {"o": "reg", "p": r.pid, "s": r.starttime, "l": r.label}


def check_pid(pid):
    if isinstance(pid, bool) or not isinstance(pid, int) or not 0 < pid < (1 << 22) + 1:
        raise RequestError(E_BADREQ, "pid must be a positive integer")
    return pid
