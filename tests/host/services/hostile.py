"""A service whose code attacks its containment, for the containment tests.

(hostile_at_import.py is the same service attacking already at import time,
in the spawner.)  At run time it
takes one command per connection on its listening socket and answers JSON:
  escape          setsid + double fork: a helper that outlives the process group
  siblings        try to reach the spawner and the standby child (ptrace, /proc/PID/mem)
  syscalls        try the system calls no driver needs; errno of each
  syscall NAME    try one of them
  call NAME       try one: socketpair | fork | thread
  priority        getpriority(2), for a service file that denies it
  fork N          fork N sleeping children; how many forks succeeded
  alloc MB        allocate and touch MB MiB (the cgroup's memory.max stops it)
  dumpable        prctl(PR_GET_DUMPABLE)
  cgroup          /proc/self/cgroup's v2 path
"""

import ctypes
import errno
import json
import os
import socket
import sys
import threading
import time

from libdrv.sef import SEF

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
CLONE_NEWUSER = 0x10000000
PTRACE_ATTACH = 16
PTRACE_TRACEME = 0
PR_GET_DUMPABLE = 3
# x86_64 numbers: the point is to make the raw call, whatever libc wraps.
# Arguments chosen so that, unfiltered, each call does not fail with EPERM
# (or is the one named), so that a refusal is the filter's.
SYSCALLS = {
    "unshare": (272, lambda: (CLONE_NEWUSER,)),
    "setns": (308, lambda: (0, 0)),                       # unfiltered: EINVAL
    "mount": (165, lambda: (0, 0, 0, 0, 0)),
    "ptrace": (101, lambda: (PTRACE_TRACEME, 0, 0, 0)),   # run in a child: see raw()
    "process_vm_readv": (310, lambda: (os.getpid(), 0, 0, 0, 0, 0)),  # unfiltered: 0
    "process_vm_writev": (311, lambda: (os.getpid(), 0, 0, 0, 0, 0)),
    "pidfd_getfd": (438, lambda: (0, 0, 0)),              # unfiltered: EBADF
    "bpf": (321, lambda: (0, 0, 0)),
    "perf_event_open": (298, lambda: (0, 0, -1, -1, 0)),  # unfiltered: EFAULT
    "keyctl": (250, lambda: (0, 0, 0, 0, 0)),
    "init_module": (175, lambda: (0, 0, 0)),
    "finit_module": (313, lambda: (-1, 0, 0)),
    "kexec_load": (246, lambda: (0, 0, 0, 0)),
    "userfaultfd": (323, lambda: (0,)),
    "io_uring_setup": (425, lambda: (1, 0)),               # unfiltered: EFAULT
    "clone_newuser": (56, lambda: (CLONE_NEWUSER | 17, 0, 0, 0, 0)),
}


def raw(nr, args):
    """errno of the call (0: it worked; -SIGNAL: the process making it was killed)."""
    if nr in (56, 101):  # clone and ptrace(TRACEME): in a child, which reports and leaves
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            ctypes.set_errno(0)
            rc = _libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) for a in args])
            if rc == 0 and nr == 56:
                os._exit(0)  # the clone's child
            os.write(w, str(0 if rc >= 0 else ctypes.get_errno()).encode())
            os._exit(0)
        os.close(w)
        out = os.read(r, 16)
        os.close(r)
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            return -os.WTERMSIG(status)  # the child was killed (SIGSYS: by the filter)
        return int(out or b"-1")
    ctypes.set_errno(0)
    rc = _libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) for a in args])
    return 0 if rc >= 0 else ctypes.get_errno()


def import_time_probe():
    err = raw(SYSCALLS["unshare"][0], SYSCALLS["unshare"][1]())
    print("hostile import: unshare(CLONE_NEWUSER) -> %s" % (errno.errorcode.get(err, err) if err else "ok"),
          flush=True)



def escape():
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.setsid()
        if os.fork() == 0:
            os.write(w, str(os.getpid()).encode())
            os.close(w)
            while True:  # keeps every fd it inherited: control, listen, resources
                time.sleep(1)
        os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    helper = int(os.read(r, 32))
    os.close(r)
    return {"helper": helper, "helper_sid": os.getsid(helper), "my_sid": os.getsid(0)}


def siblings():
    me = os.getpid()
    spawner = os.getppid()
    with open("/proc/%d/task/%d/children" % (spawner, spawner)) as f:
        kids = [int(p) for p in f.read().split() if int(p) != me]
    out = {"spawner": spawner, "standby": kids, "results": {}}
    for pid in [spawner] + kids:
        ctypes.set_errno(0)
        rc = _libc.syscall(ctypes.c_long(101), ctypes.c_long(PTRACE_ATTACH), ctypes.c_long(pid), 0, 0)
        res = {"ptrace": 0 if rc >= 0 else ctypes.get_errno()}
        try:
            fd = os.open("/proc/%d/mem" % pid, os.O_RDWR)
            os.close(fd)
            res["mem"] = 0
        except OSError as exc:
            res["mem"] = exc.errno
        out["results"][str(pid)] = res
    return out


def fork_many(n):
    made = []
    err = 0
    for _ in range(n):
        try:
            pid = os.fork()
        except OSError as exc:
            err = exc.errno
            break
        if pid == 0:
            time.sleep(3600)
            os._exit(0)
        made.append(pid)
    return {"forked": len(made), "errno": err}


def call(name):
    try:
        if name == "socketpair":
            a, b = socket.socketpair()
            a.close()
            b.close()
        elif name == "fork":
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            os.waitpid(pid, 0)
        elif name == "thread":
            t = threading.Thread(target=lambda: None)
            t.start()
            t.join()
        else:
            return {"error": "unknown call %r" % name}
        return {"errno": 0}
    except OSError as exc:
        return {"errno": exc.errno}


def main():
    sef = SEF()
    hoard = []

    @sef.on_accept
    def accept(conn):
        conn.setblocking(True)
        conn.settimeout(10)
        words = conn.recv(4096).decode().split()
        cmd = words[0] if words else ""
        if cmd == "escape":
            reply = escape()
        elif cmd == "siblings":
            reply = siblings()
        elif cmd == "syscalls":
            reply = {name: raw(nr, args()) for name, (nr, args) in SYSCALLS.items()}
        elif cmd == "syscall":
            nr, args = SYSCALLS[words[1]]
            reply = {"errno": raw(nr, args())}
        elif cmd == "call":
            reply = call(words[1])
        elif cmd == "priority":
            try:
                os.getpriority(os.PRIO_PROCESS, 0)
                reply = {"errno": 0}
            except OSError as exc:
                reply = {"errno": exc.errno}
        elif cmd == "fork":
            reply = fork_many(int(words[1]))
        elif cmd == "alloc":
            block = bytearray(int(words[1]) << 20)
            for i in range(0, len(block), 4096):
                block[i] = 1
            hoard.append(block)
            reply = {"allocated": len(hoard)}
        elif cmd == "dumpable":
            reply = {"dumpable": _libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0)}
        elif cmd == "cgroup":
            with open("/proc/self/cgroup") as f:
                reply = {"cgroup": [ln[3:].strip() for ln in f if ln.startswith("0::")][0]}
        else:
            reply = {"error": "unknown command %r" % cmd}
        conn.sendall(json.dumps(reply).encode() + b"\n")
        conn.close()

    return sef.run()


if __name__ == "__main__":
    sys.exit(main())
