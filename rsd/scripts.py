"""Running policy scripts: `SCRIPT LABEL REASON RESTARTS`, asynchronously.

The script runs as root (it calls rsctl), in its own session, with a fixed
environment, its output logged line by line, and is killed after its
timeout.  rsd's loop never waits for it.
"""

import logging
import os
import signal
import subprocess
import sys

log = logging.getLogger("rsd.scripts")

SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


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
        try:
            proc = subprocess.Popen(argv, env=full, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, start_new_session=True, cwd="/")
        except OSError as exc:
            log.error("%s: cannot run policy script %s: %s; the service stays down until "
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
