"""Running policy scripts: `SCRIPT LABEL REASON RESTARTS`, asynchronously.

The script runs as root (it calls rsctl), in its own session, with a fixed
environment, its output logged line by line, and is killed after its
timeout.  rsd's loop never waits for it.

Because it runs as root, a script must be root's: the file and every
directory on its resolved path owned by root and not writable by group or
others (what sudo and systemd ask of what they run as root).  This is
checked when a service is read (rsd/service.py) and again just before each
run, and the resolved path is what runs, so nothing can be swapped in
between.
"""

import logging
import os
import pwd
import signal
import stat
import subprocess
import sys

log = logging.getLogger("rsd.scripts")

SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _owner(uid):
    try:
        return "%s (uid %d)" % (pwd.getpwuid(uid).pw_name, uid)
    except KeyError:
        return "uid %d" % uid


def script_trust_problem(path):
    """What makes path unfit to run as root, with what to do about it; None if it is fit.

    A world-writable directory is accepted only if it is root's and sticky
    (like /tmp): then nobody else may rename or remove what root put in it.
    """
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except OSError as exc:
        return "policy script %s cannot be checked: %s" % (path, exc.strerror)
    if st.st_uid != 0 or st.st_mode & 0o022:
        return ("policy script %s is owned by %s with mode %04o, but rsd runs it as root: only root may "
                "be able to change it; run `chown root:root %s; chmod go-w %s`"
                % (real, _owner(st.st_uid), stat.S_IMODE(st.st_mode), real, real))
    d = os.path.dirname(real)
    while True:
        st = os.stat(d)
        sticky_root = st.st_uid == 0 and st.st_mode & stat.S_ISVTX
        if st.st_uid != 0 or (st.st_mode & 0o022 and not sticky_root):
            return ("policy script %s is in directory %s, owned by %s with mode %04o, so others could "
                    "replace it, but rsd runs it as root; run `chown root:root %s; chmod go-w %s`"
                    % (real, d, _owner(st.st_uid), stat.S_IMODE(st.st_mode), d, d))
        if d == "/":
            return None
        d = os.path.dirname(d)


class ScriptRunner:
    def __init__(self, loop):
        self.loop = loop
        self.running = {}  # pidfd -> (Popen, label, timer, pending output)

    def run(self, label, script, reason, restarts, timeout, env):
        """Start script; env adds to the fixed variables.  False if it could not start."""
        full = {"PATH": os.path.dirname(sys.executable) + ":" + SAFE_PATH, "LANG": "C.UTF-8",
                "RS_LABEL": label, "RS_REASON": reason, "RS_RESTARTS": str(restarts)}
        full.update(env)
        argv = [script, label, reason, str(restarts)]
        problem = script_trust_problem(script)
        if problem is not None:
            log.error("%s: refused to run: %s; the service stays failed until `rsctl restart %s`",
                      label, problem, label)
            return False
        try:
            # The path just checked, symbolic links resolved: the one that runs.
            proc = subprocess.Popen(argv, executable=os.path.realpath(script), env=full,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, start_new_session=True, cwd="/")
        except OSError as exc:
            log.error("%s: cannot run policy script %s: %s; the service stays failed until "
                      "`rsctl restart %s`", label, script, exc, label)
            return False
        log.info("%s: running policy script %s", label, " ".join(argv))
        os.set_blocking(proc.stdout.fileno(), False)
        pidfd = os.pidfd_open(proc.pid)
        timer = self.loop.call_later(timeout, self._timeout, proc, label)
        self.running[pidfd] = [proc, label, timer, b""]
        self.loop.add_reader(proc.stdout, self._output, pidfd)
        self.loop.add_reader(pidfd, self._done, pidfd)
        return True

    def _output(self, pidfd, final=False):
        entry = self.running[pidfd]
        proc, label = entry[0], entry[1]
        while True:
            try:
                data = os.read(proc.stdout.fileno(), 65536)
            except BlockingIOError:
                break
            except OSError:
                data = b""
            if not data:
                self.loop.remove_reader(proc.stdout)
                final = True
                break
            entry[3] += data
        *lines, entry[3] = entry[3].split(b"\n")
        if final and entry[3]:
            lines.append(entry[3])
            entry[3] = b""
        for line in lines:
            log.info("%s: policy script: %s", label, line.decode("utf-8", "replace"))

    def _timeout(self, proc, label):
        log.error("%s: policy script still running after its timeout: killed", label)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass

    def _done(self, pidfd):
        self.loop.remove_reader(pidfd)
        self._output(pidfd, final=True)
        proc, label, timer, _ = self.running.pop(pidfd)
        os.close(pidfd)
        timer.cancel()
        self.loop.remove_reader(proc.stdout)
        proc.stdout.close()
        rc = proc.wait()
        log.info("%s: policy script exited with status %d", label, rc)
