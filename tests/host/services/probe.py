"""A small SEF service for the rsd tests, steered through its listening socket.

Commands (one line per connection; it answers, then acts):
  info            JSON: pid, ids, capabilities, no_new_privs, env, fds, init info
  crash SIGNUM    kill itself with that signal
  exit CODE       exit with that status
  spin            busy-loop forever (heartbeats stop)
  block           block in sleep forever (heartbeats stop)
  save KEY VALUE  back a value up in DS;  load KEY: read it back
Arguments: --init-fail, --init-hang, --crash-after SECONDS, --init-sleep SECONDS,
  --fail-restart-init (init fails in every restarted incarnation),
  --ignore-term (the exit callback never returns: rsd must SIGKILL)
"""

import ctypes
import json
import os
import signal
import sys
import time

from libdrv.sef import SEF

PR_GET_PDEATHSIG = 2


def _pdeathsig():
    libc = ctypes.CDLL(None, use_errno=True)
    sig = ctypes.c_int(0)
    libc.prctl(PR_GET_PDEATHSIG, ctypes.byref(sig), 0, 0, 0)
    return sig.value


def _status_fields():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs", "Groups"):
                out[name] = value.strip()
    return out


def main():
    fds_at_start = sorted(int(x) for x in os.listdir("/proc/self/fd"))
    args = sys.argv[1:]
    sef = SEF()

    def opt(name, default=None):
        return float(args[args.index(name) + 1]) if name in args else default

    def init(s, reason=None, restarts=0):
        if "--init-sleep" in args:
            time.sleep(opt("--init-sleep"))
        if "--init-fail" in args or (reason is not None and "--fail-restart-init" in args):
            raise RuntimeError("init failure requested by --init-fail")
        if "--init-hang" in args:
            time.sleep(3600)
        after = opt("--crash-after")
        if after is not None:
            s.loop.call_later(after, os.kill, os.getpid(), signal.SIGSEGV)

    sef.on_init_fresh(lambda s: init(s))
    sef.on_init_restart(init)
    if "--ignore-term" in args:
        sef.on_exit(lambda s: time.sleep(3600))

    @sef.on_accept
    def accept(conn):
        conn.setblocking(True)
        conn.settimeout(5)
        words = conn.recv(4096).decode().split()
        cmd = words[0] if words else ""
        reply = {"ok": True}
        act = None
        if cmd == "info":
            reply.update(pid=os.getpid(), ppid=os.getppid(), uid=os.getresuid(), gid=os.getresgid(),
                         groups=os.getgroups(), status=_status_fields(), pdeathsig=_pdeathsig(),
                         env=dict(os.environ), fds_at_start=fds_at_start,
                         generation=sef.generation, init_type=sef.init_type,
                         reason=sef.restart_reason, restarts=sef.restarts, argv=sys.argv,
                         pgid=os.getpgid(0), sid=os.getsid(0))
        elif cmd == "crash":
            act = lambda: os.kill(os.getpid(), int(words[1]))
        elif cmd == "exit":
            act = lambda: os._exit(int(words[1]))
        elif cmd == "spin":
            def act():
                while True:
                    pass
        elif cmd == "block":
            act = lambda: time.sleep(3600)
        elif cmd == "save":
            sef.save_state(words[1], words[2])
        elif cmd == "load":
            reply["value"] = sef.restore_state(words[1])
        else:
            reply = {"ok": False, "error": "unknown command %r" % cmd}
        conn.sendall(json.dumps(reply).encode() + b"\n")
        conn.close()
        if act is not None:
            act()

    return sef.run()


if __name__ == "__main__":
    sys.exit(main())
