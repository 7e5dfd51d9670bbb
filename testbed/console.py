"""The guest's console (COM1 = QEMU's stdout): logged to a file, last lines kept in memory."""

import sys
import threading
from collections import deque

TAIL_LINES = 60


class ConsoleLog:
    """Reads a pipe until EOF in a thread; .tail() is safe to call at any time."""

    def __init__(self, pipe, path, echo=False):
        self.pipe = pipe
        self.path = path
        self.echo = echo
        self.lines = deque(maxlen=TAIL_LINES * 4)
        self.partial = b""
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._read, daemon=True, name="testbed-console")
        self.thread.start()

    def _read(self):
        with open(self.path, "wb") as log:
            while True:
                try:
                    chunk = self.pipe.read1(65536)
                except (OSError, ValueError):
                    break
                if not chunk:
                    break
                log.write(chunk)
                log.flush()
                if self.echo:
                    sys.stderr.buffer.write(chunk)
                    sys.stderr.flush()
                with self.lock:
                    *complete, self.partial = (self.partial + chunk).split(b"\n")
                    self.lines.extend(complete)

    def tail(self, lines=TAIL_LINES, settle_s=0.0):
        """The last `lines` lines; settle_s: first wait that long for the reader to hit EOF."""
        if settle_s:
            self.thread.join(settle_s)
        with self.lock:
            raw = list(self.lines) + ([self.partial] if self.partial else [])
        text = [line.decode("utf-8", "replace").rstrip("\r") for line in raw[-lines:]]
        return "\n".join(text) if text else "(the guest printed nothing)"

    def text(self):
        """Everything logged so far."""
        with open(self.path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def join(self, timeout):
        self.thread.join(timeout)
