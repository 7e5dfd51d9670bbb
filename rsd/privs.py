"""Dropping privilege before a service runs: ctypes prctl(2) and capset(2).

We use ctypes rather than python-prctl: five calls, no build dependency.
Order matters: the capability bounding set can only be cleared while we
still hold CAP_SETPCAP (before setuid), and the parent-death signal must be
set after setuid because a credential change resets it.
"""

import ctypes
import os
import struct

_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_libc.prctl.restype = ctypes.c_int

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_NAME = 15
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_SYS_capset = 126  # x86_64


def prctl(option, a2=0, a3=0, a4=0, a5=0):
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
    for cap in range(cap_last_cap() + 1):
        prctl(PR_CAPBSET_DROP, cap)


def clear_capabilities():
    """Empty the effective, permitted and inheritable sets (and ambient)."""
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    header = ctypes.create_string_buffer(struct.pack("Ii", _LINUX_CAPABILITY_VERSION_3, 0))
    data = ctypes.create_string_buffer(24)  # two zeroed {effective, permitted, inheritable}
    if _libc.syscall(_SYS_capset, header, data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, "capset: %s" % os.strerror(err))


def set_no_new_privs():
    prctl(PR_SET_NO_NEW_PRIVS, 1)


def set_parent_death_signal(sig):
    prctl(PR_SET_PDEATHSIG, sig)


def set_dumpable(on):
    prctl(PR_SET_DUMPABLE, 1 if on else 0)


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
    """The process name ps and top show (15 bytes)."""
    buf = ctypes.create_string_buffer(name.encode("utf-8", "replace")[:15])
    if _libc.prctl(PR_SET_NAME, ctypes.cast(buf, ctypes.c_void_p).value, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NAME)")


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
