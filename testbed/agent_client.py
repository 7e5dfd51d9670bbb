"""Host end of the agent channel: send requests, match replies by id, many at once."""

import base64
import json
import threading

from .errors import TestbedError


class _Pending:
    def __init__(self, on_output=None):
        self.done = threading.Event()
        self.reply = None
        self.on_output = on_output   # on_output(fd, data) for streamed output
        self.output = {1: [], 2: []}


class AgentClient:
    """Speaks agent.py's JSON-lines protocol over the connected virtio-serial socket.

    A reader thread files replies; request() waits with a deadline and reports
    "gone" (EOF: QEMU exited) or "silent" (deadline passed) to the caller.
    """

    def __init__(self, sock):
        self.sock = sock
        self.lock = threading.Lock()
        self.pending = {}
        self.next_id = 0
        self.ready = threading.Event()
        self.ready_info = None
        self.closed_reason = None
        self.reader = threading.Thread(target=self._read_loop, name="testbed-agent-reader",
                                       daemon=True)
        self.reader.start()

    def _read_loop(self):
        buffered = bytearray()  # amortised appends: a file read back can be megabytes
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    break
                buffered += chunk
                if b"\n" not in chunk:
                    continue
                *lines, rest = bytes(buffered).split(b"\n")
                buffered = bytearray(rest)
                for line in lines:
                    if line.strip():
                        self._file(json.loads(line))
        except (OSError, ValueError) as e:
            self.closed_reason = f"agent channel broke: {e}"
        with self.lock:
            self.closed_reason = self.closed_reason or "agent channel closed (QEMU exited)"
            waiting = list(self.pending.values())
            self.pending.clear()
        for p in waiting:
            p.done.set()
        self.ready.set()

    def _file(self, message):
        if message.get("event") == "ready":
            self.ready_info = message
            self.ready.set()
            return
        if "stream" in message:  # a chunk of a streamed command's output, not the reply
            with self.lock:
                p = self.pending.get(message.get("id"))
            if p is not None and message["stream"] in p.output:
                data = b64decode(message.get("data"))
                p.output[message["stream"]].append(data)
                if p.on_output is not None:
                    try:
                        p.on_output(message["stream"], data)
                    except Exception:  # a caller's callback must not kill the reader
                        pass
            return
        with self.lock:
            p = self.pending.pop(message.get("id"), None)
        if p is not None:
            p.reply = message
            p.done.set()

    @property
    def alive(self):
        return self.closed_reason is None

    def send(self, op, on_output=None, **fields):
        """Send one request; returns the pending slot to wait on."""
        with self.lock:
            if self.closed_reason:
                raise TestbedError(self.closed_reason)
            self.next_id += 1
            request_id = self.next_id
            p = self.pending[request_id] = _Pending(on_output)
        data = json.dumps(dict(fields, id=request_id, op=op)).encode() + b"\n"
        try:
            self.sock.sendall(data)
        except OSError as e:
            raise TestbedError(f"cannot send to the agent: {e}") from None
        return p

    def wait(self, pending, timeout, still_alive):
        """The reply, or None if the deadline passed; raises TestbedError if the channel died.

        still_alive() is polled so a dead QEMU is noticed at once, not at the deadline.
        """
        remaining = timeout
        while remaining > 0:
            step = min(0.5, remaining)
            if pending.done.wait(step):
                if pending.reply is None:
                    raise TestbedError(self.closed_reason or "agent channel closed")
                return pending.reply
            remaining -= step
            if not still_alive():
                pending.done.wait(0.5)  # let the reader deliver a reply already in flight
                if pending.reply is not None:
                    return pending.reply
                raise TestbedError("QEMU exited while a request was in flight")
        return None

    def close(self):
        try:
            self.sock.shutdown(2)  # wakes the reader thread blocked in recv
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass


def b64decode(text):
    return base64.b64decode(text or "")


def b64encode(data):
    return base64.b64encode(data).decode("ascii")
