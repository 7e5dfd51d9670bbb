"""The guest agent: runs commands for the host, JSON lines over a virtio-serial port.

Runs inside the guest (started by guest_init.py); standard library only, and importable
without the testbed package. Protocol, one JSON object per line, bytes as base64:
  host -> guest  {"id": N, "op": "run", "argv": [...], "env": {...}, "cwd": str|null,
                  "timeout": seconds, "stdin": b64|null, "stream": bool}
                 {"id": N, "op": "read", "path": str}
                 {"id": N, "op": "write", "path": str, "data": b64, "mode": int}
                 {"id": N, "op": "ping"}
  guest -> host  {"event": "ready", "kernel": str, "uptime": float}
                 {"id": N, "rc": int, "stdout": b64, "stderr": b64, "timed_out": bool,
                  "duration": float}
                 {"id": N, "data": b64}  |  {"id": N, "written": n}  |  {"id": N, "pong": true}
                 {"id": N, "error": str}
                 {"id": N, "stream": 1|2, "data": b64}  (output of a "stream" run, before its
                  reply; that reply then carries empty stdout/stderr)
Each request runs in its own thread, so a long command does not block the others.
"""

import base64
import json
import os
import selectors
import signal
import subprocess
import threading
import time

KILL_GRACE_S = 5.0  # after a timeout kill, how long to wait for the pipes to drain


def _b64(data):
    return base64.b64encode(data or b"").decode("ascii")


class Agent:
    def __init__(self, fd, base_env):
        self.fd = fd
        self.base_env = dict(base_env)
        self.write_lock = threading.Lock()

    def send(self, message):
        data = (json.dumps(message, separators=(",", ":")) + "\n").encode()
        with self.write_lock:
            view = memoryview(data)
            while view:
                n = os.write(self.fd, view)
                view = view[n:]

    def serve(self):
        self.send({"event": "ready", "kernel": os.uname().release, "uptime": _uptime()})
        buffered = bytearray()  # amortised appends: a pushed file can be megabytes
        while True:
            chunk = os.read(self.fd, 65536)
            if not chunk:  # host end not connected: wait for it to come back
                time.sleep(0.1)
                continue
            buffered += chunk
            if b"\n" not in chunk:
                continue
            *lines, rest = bytes(buffered).split(b"\n")
            buffered = bytearray(rest)
            for line in lines:
                if line.strip():
                    self._dispatch(line)

    def _dispatch(self, line):
        try:
            request = json.loads(line)
            request_id = request["id"]
        except (ValueError, KeyError, TypeError) as e:
            self.send({"id": None, "error": f"bad request line ({e}): {line[:200]!r}"})
            return
        threading.Thread(target=self._handle, args=(request_id, request), daemon=True).start()

    def _handle(self, request_id, request):
        try:
            op = request.get("op")
            if op == "run":
                reply = self._run(request_id, request)
            elif op == "read":
                with open(request["path"], "rb") as f:
                    reply = {"data": _b64(f.read())}
            elif op == "write":
                data = base64.b64decode(request["data"])
                fd = os.open(request["path"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                             request.get("mode", 0o644))
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.chmod(request["path"], request.get("mode", 0o644))
                reply = {"written": len(data)}
            elif op == "ping":
                reply = {"pong": True}
            else:
                reply = {"error": f"unknown op {op!r}"}
        except Exception as e:  # the agent never dies of a request
            reply = {"error": f"{type(e).__name__}: {e}"}
        reply["id"] = request_id
        self.send(reply)

    def _run(self, request_id, request):
        argv = request["argv"]
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            return {"error": "argv must be a non-empty list of strings"}
        env = dict(self.base_env)
        env.update(request.get("env") or {})
        stdin = request.get("stdin")
        timeout = request.get("timeout")
        started = time.monotonic()
        try:
            proc = subprocess.Popen(
                argv, env=env, cwd=request.get("cwd") or "/",
                stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        except OSError as e:
            message = f"testbed agent: {argv[0]}: {e}\n".encode()
            return {"rc": 127, "stdout": "", "stderr": _b64(message), "timed_out": False,
                    "duration": 0.0}
        data = base64.b64decode(stdin) if stdin is not None else None
        if request.get("stream"):
            timed_out = self._stream(request_id, proc, data, timeout)
            return {"rc": proc.returncode, "stdout": "", "stderr": "", "timed_out": timed_out,
                    "duration": time.monotonic() - started}
        timed_out = False
        try:
            out, err = proc.communicate(data, timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc.pid)
            try:
                out, err = proc.communicate(timeout=KILL_GRACE_S)
            except subprocess.TimeoutExpired:  # a child outside the group holds the pipes
                proc.kill()
                out, err = b"", b"testbed agent: output lost, pipes held open after kill\n"
                proc.wait()
        return {"rc": proc.returncode, "stdout": _b64(out), "stderr": _b64(err),
                "timed_out": timed_out, "duration": time.monotonic() - started}


    def _stream(self, request_id, proc, data, timeout):
        """Send output as it comes: {"id": N, "stream": 1|2, "data": b64}. Returns timed_out."""
        if data is not None:
            threading.Thread(target=_feed, args=(proc.stdin, data), daemon=True).start()
        selector = selectors.DefaultSelector()
        selector.register(proc.stdout, selectors.EVENT_READ, 1)
        selector.register(proc.stderr, selectors.EVENT_READ, 2)
        deadline = time.monotonic() + timeout
        timed_out = False
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if timed_out:  # a child outside the group holds the pipes: stop reading
                    break
                timed_out = True
                _kill_group(proc.pid)
                deadline = time.monotonic() + KILL_GRACE_S
                continue
            for key, _ in selector.select(remaining):
                chunk = os.read(key.fileobj.fileno(), 65536)
                if chunk:
                    self.send({"id": request_id, "stream": key.data, "data": _b64(chunk)})
                else:
                    selector.unregister(key.fileobj)
        selector.close()
        proc.stdout.close()
        proc.stderr.close()
        if timed_out:
            proc.kill()
        proc.wait()
        return timed_out


def _feed(pipe, data):
    try:
        pipe.write(data)
        pipe.close()
    except OSError:  # the command exited without reading it all
        pass


def _kill_group(pgid):
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _uptime():
    with open("/proc/uptime") as f:
        return float(f.read().split()[0])
