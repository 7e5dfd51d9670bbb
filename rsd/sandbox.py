"""The seccomp filter every service runs under.

Loaded by the spawner before it imports the driver, so a driver hostile at
import time is already inside it, and inherited by every incarnation (a
seccomp filter survives fork and exec and can only be tightened).  It
denies the system calls that no driver needs and that reach beyond the
process: other processes' memory, the kernel's configuration, namespaces,
mounts, modules, BPF and perf.  Built with libseccomp (through pyseccomp)
rather than a hand-assembled BPF program: libseccomp knows each
architecture's numbering, and its filter kills any system call made
through a foreign ABI (i386 `int 0x80`, x32), the classic way round a
filter written for one.

The list is in docs/security.md; a service file tightens it with
`[sandbox] deny = [...]` and may choose `action = "kill"`.
"""

import errno

# What no driver needs.  EPERM, so that a driver sees a clear error (or is
# killed, with action = "kill").
DENIED = (
    # other processes' memory and descriptors
    "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd", "kcmp",
    "process_madvise", "move_pages", "migrate_pages",
    # namespaces, mounts, the root
    "unshare", "setns", "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree",
    "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
    # the kernel itself
    "bpf", "perf_event_open", "kexec_load", "kexec_file_load", "init_module", "finit_module",
    "delete_module", "reboot", "swapon", "swapoff", "acct", "syslog", "quotactl", "quotactl_fd",
    "lookup_dcookie", "iopl", "ioperm", "uselib", "vhangup",
    # keys, clocks, names
    "keyctl", "add_key", "request_key", "settimeofday", "clock_settime", "clock_adjtime",
    "adjtimex", "sethostname", "setdomainname",
    # ways around path-based permissions and around this filter
    "open_by_handle_at", "name_to_handle_at", "userfaultfd", "fanotify_init",
    "io_uring_setup", "io_uring_enter", "io_uring_register", "personality",
)
# clone() flags that create namespaces: clone() is allowed (fork), these are not.
_CLONE_NAMESPACES = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000,
                     0x40000000, 0x00000080)  # NEWNS UTS IPC USER PID NET CGROUP TIME
ACTIONS = ("errno", "kill")


def _seccomp():
    import pyseccomp
    return pyseccomp


def known_syscall(name):
    """True if libseccomp knows this system call on this machine's architecture."""
    seccomp = _seccomp()
    try:
        return seccomp.resolve_syscall(seccomp.system_arch(), name) >= 0
    except (OSError, ValueError, TypeError):
        return False


def build(extra_deny=(), action="errno", base=True):
    """The filter for a service: DENIED (if base) plus extra_deny."""
    seccomp = _seccomp()
    deny = seccomp.ERRNO(errno.EPERM) if action == "errno" else seccomp.KILL_PROCESS
    f = seccomp.SyscallFilter(seccomp.ALLOW)
    for name in (tuple(DENIED) if base else ()) + tuple(extra_deny):
        if known_syscall(name):
            f.add_rule(deny, name)
    if base:
        for flag in _CLONE_NAMESPACES:
            f.add_rule(deny, "clone", seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag))
        # clone3 passes its flags in memory, which a filter cannot read: make the
        # C library fall back to clone() (glibc does on ENOSYS), where it can.
        f.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
    return f


def apply(extra_deny=(), action="errno", base=True):
    """Load the filter into this process (needs no_new_privs, set by rsd)."""
    build(extra_deny, action, base).load()
