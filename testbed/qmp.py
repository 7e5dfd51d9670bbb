"""A small QMP client (QEMU Machine Protocol, JSON over a unix socket) for the host side."""

import json
import socket
import threading

from .errors import TestbedError


class QMPError(TestbedError):
    """QEMU answered a command with an error."""


class QMP:
    """Host handle on the machine: screendump, sendkey, queries, any QMP command.

    The socket is already connected (QEMU connects to the testbed's listener at start).
    Commands are serialised; asynchronous events are kept in .events.
    """

    def __init__(self, sock, timeout=30.0):
        self.sock = sock
        self.sock.settimeout(timeout)
        self.file = sock.makefile("rb")
        self.lock = threading.Lock()
        self.events = []
        self.next_id = 0
        greeting = self._read_message()
        if "QMP" not in greeting:
            raise TestbedError(f"QMP: unexpected greeting {greeting!r}")
        self.execute("qmp_capabilities")

    def _read_message(self):
        try:
            line = self.file.readline()
        except (OSError, socket.timeout) as e:
            raise TestbedError(f"QMP: no answer from QEMU ({e})") from None
        if not line:
            raise TestbedError("QMP: QEMU closed the monitor connection (it exited)")
        return json.loads(line)

    def execute(self, command, **arguments):
        """Run one QMP command; returns its "return" value, raises QMPError on "error"."""
        with self.lock:
            self.next_id += 1
            request = {"execute": command, "id": self.next_id}
            if arguments:
                request["arguments"] = arguments
            try:
                self.sock.sendall(json.dumps(request).encode() + b"\n")
            except OSError as e:
                raise TestbedError(f"QMP: cannot send {command} ({e}); QEMU has exited") from None
            while True:
                message = self._read_message()
                if "event" in message:
                    self.events.append(message)
                elif message.get("id") == self.next_id:
                    break
        if "error" in message:
            error = message["error"]
            raise QMPError(f"QMP {command} failed: {error.get('class')}: {error.get('desc')}")
        return message.get("return")

    def query(self, what):
        """query("status") runs query-status; also "pci", "block", "chardev", ..."""
        return self.execute(what if what.startswith("query-") else f"query-{what}")

    def hmp(self, command_line):
        """A human-monitor command (e.g. "hostfwd_add ..."); returns its text output."""
        return self.execute("human-monitor-command", **{"command-line": command_line})

    def screendump(self, path, format="png"):
        """Write the VGA screen to `path` (a PNG by default) and return the path."""
        self.execute("screendump", filename=str(path), format=format)
        return str(path)

    def sendkey(self, keys, hold_time_ms=None):
        """Press keys together, then release: "ctrl-alt-f1", "a" or ["shift", "a"].

        Names are QEMU qcodes (a, 1, ret, spc, shift, ctrl, alt, f1, up, ...).
        """
        if isinstance(keys, str):
            keys = keys.split("-") if keys != "-" else ["minus"]
        if not keys or not all(isinstance(k, str) and k for k in keys):
            raise ValueError(f"sendkey: expected qcode names, got {keys!r}")
        arguments = {"keys": [{"type": "qcode", "data": k} for k in keys]}
        if hold_time_ms is not None:
            arguments["hold-time"] = int(hold_time_ms)
        self.execute("send-key", **arguments)

    def close(self):
        for obj in (self.file, self.sock):
            try:
                obj.close()
            except OSError:
                pass
