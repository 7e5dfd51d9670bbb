"""Dropping privilege before a service runs, through python-prctl (prctl(2), and capset(2)
via libcap, so no system call number is hard-coded and any architecture works).

Order matters: the capability bounding set can only be cleared while we
still hold CAP_SETPCAP (before setuid), and the parent-death signal must be
set after setuid because a credential change resets it.
"""

import ctypes
import os

import prctl

# python-prctl has no PR_CAP_AMBIENT, and refuses capability numbers missing from the libcap
# headers it was built against: those two go through libc's prctl() (a libc function, not a
# raw system call, so still architecture-neutral).
_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_libc.prctl.restype = ctypes.c_int

PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_CAP_SETS = (prctl.CAP_EFFECTIVE, prctl.CAP_PERMITTED, prctl.CAP_INHERITABLE)


def _libc_prctl(option, a2=0, a3=0, a4=0, a5=0):
    if _libc.prctl(option, a2, a3, a4, a5) != 0:
        err = ctypes.get_errno()
        raise OSError(err, "prctl(%d): %s" % (option, os.strerror(err)))


def cap_last_cap():
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except OSError:
        return 63


def clear_bounding_set():
    known = set(prctl.ALL_CAPS)
    for cap in range(cap_last_cap() + 1):
        if cap in known:
            prctl.capbset_drop(cap)
        else:
            _libc_prctl(PR_CAPBSET_DROP, cap)


def _capability_sets():
    """{"CapInh": int, "CapPrm": ..., "CapEff": ..., "CapAmb": ...} of this process."""
    sets = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
                sets[name] = int(value, 16)
    return sets


def clear_capabilities():
    """Empty the effective, permitted and inheritable sets (and ambient)."""
    _libc_prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    # One capset: effective must never exceed permitted in between.
    prctl.set_caps(*((prctl.ALL_CAPS, flag, False) for flag in _CAP_SETS))
    # The binding clears only the capabilities it knows; a newer kernel may have more.
    left = {name: bits for name, bits in _capability_sets().items() if bits}
    if left:
        raise OSError("capabilities left after clearing them: %s; python-prctl does not know "
                      "this kernel's newest capabilities: rebuild it against a newer libcap-dev"
                      % ", ".join("%s=%x" % kv for kv in sorted(left.items())))


def set_no_new_privs():
    prctl.set_no_new_privs(1)


def set_parent_death_signal(sig):
    prctl.set_pdeathsig(sig)


def set_dumpable(on):
    prctl.set_dumpable(bool(on))


def become(uid, gid):
    """Drop everything and become uid:gid with no supplementary groups.

    Call in a freshly forked child, as root, before exec.
    """
    clear_bounding_set()
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    clear_capabilities()
    set_no_new_privs()


def set_name(name):
    """The process name ps and top show (the kernel keeps 15 bytes)."""
    prctl.set_name(name.encode("utf-8", "replace")[:15].decode("utf-8", "ignore"))


MADV_POPULATE_WRITE = 23  # Linux 5.14+
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.madvise.restype = ctypes.c_int


def prefault_private_memory(limit=256 << 20):
    """Break copy-on-write sharing of our private writable memory now.

    A child forked ahead of need calls this while idle, so that when it
    becomes an incarnation it does not take a page fault per page it writes.
    Costs a private copy of those pages.  Returns the bytes populated.
    """
    done = 0
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            if fields[1] != "rw-p":
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if done + (end - start) > limit:
                continue
            if _libc.madvise(start, end - start, MADV_POPULATE_WRITE) == 0:
                done += end - start
    return done
