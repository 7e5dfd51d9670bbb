"""A separate process that runs DS client calls for a test: one JSON request
per stdin line, one JSON reply per stdout line.  Tests start it as another
uid and register its pid under a label, so identity comes from the kernel.

Besides the DSClient methods it runs attacks on raw connections of its own
(the `attack_*` calls below), which stay open until `attack_close`."""

import base64
import json
import os
import select
import socket
import sys
import time

from libdrv.dsclient import DSClient, DSError
from libdrv.wire import FrameError, FrameReader, encode


def _enc(v):
    if isinstance(v, bytes):
        return {"b64": base64.b64encode(v).decode()}
    if isinstance(v, list):
        return [_enc(x) for x in v]
    if hasattr(v, "__dataclass_fields__"):
        return {k: _enc(getattr(v, k)) for k in v.__dataclass_fields__}
    return v


def _dec(v):
    if isinstance(v, dict) and "b64" in v:
        return base64.b64decode(v["b64"])
    return v


class Attacks:
    """Hostile use of the socket: what a driver with bad code could do."""

    def __init__(self, path, client):
        self.path = path
        self.client = client
        self.socks = []

    def attack_fill(self, prefix, size, count):
        """Publish count keys of size-byte values, pipelined in batches, until
        the daemon refuses; return the refusals and the label's use."""
        errors = []
        for start in range(0, count, 256):
            items = [("%s%06d" % (prefix, i), b"q" * size) for i in range(start, min(count, start + 256))]
            try:
                self.client.publish_many(items)
            except DSError as exc:
                errors.append([type(exc).__name__, str(exc)])
        who = self.client.whoami()
        return {"errors": errors[:3], "nerrors": len(errors), "keys": who.get("keys"), "bytes": who.get("bytes")}

    def _connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(self.path)
        s.setblocking(False)
        self.socks.append(s)
        return s

    def attack_pipeline(self, request, count, conns=1):
        """Send `count` copies of request on each of `conns` new connections,
        as far as the sockets take them, and never read a reply."""
        frame = encode(request)
        sent = []
        for _ in range(conns):
            s = self._connect()
            data, off = frame * count, 0
            deadline = time.monotonic() + 2
            while off < len(data) and time.monotonic() < deadline:
                try:
                    off += s.send(data[off:off + (1 << 20)])
                except BlockingIOError:
                    select.select([], [s], [], 0.05)
                except OSError:
                    break
            sent.append(off // len(frame))
        return sent

    def attack_half_frames(self, conns, announce, send):
        """Announce a frame of `announce` bytes and send only `send` of them."""
        opened = 0
        for _ in range(conns):
            s = self._connect()
            data = announce.to_bytes(4, "little") + b"\x01" + b"h" * (send - 1)
            off = 0
            while off < len(data):
                try:
                    off += s.send(data[off:])
                except BlockingIOError:
                    select.select([], [s], [], 0.05)
                except OSError:
                    break
            opened += 1
        return opened

    def attack_connect(self, count):
        """Open up to count connections; return how many the daemon kept and
        the refusals it sent (read from those it closed)."""
        refused = []
        for _ in range(count):
            try:
                s = self._connect()
            except OSError as exc:
                refused.append("connect: %s" % exc)
                break
        time.sleep(1.0)  # let the daemon answer the refused ones, even when busy
        kept = []
        for s in self.socks:
            r, _, _ = select.select([s], [], [], 0)
            if not r:
                kept.append(s)
                continue
            frames = self._read_all(s)
            refused.append(frames[0]["err"] + ": " + frames[0]["msg"] if frames else "closed silently")
            s.close()
        self.socks = kept
        return {"kept": len(kept), "refused": refused}

    @staticmethod
    def _read_all(s, timeout=2.0):
        reader, out = FrameReader(), []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r, _, _ = select.select([s], [], [], 0.2)
            if not r:
                if out:
                    break
                continue
            try:
                data = s.recv(1 << 20)
            except BlockingIOError:
                continue
            except OSError:
                break
            if not data:
                break
            try:
                out += reader.feed(data)
            except FrameError:
                break
        return out

    def attack_read(self, timeout=30.0):
        """Read every connection until it goes quiet or closes: per connection,
        [number of replies, [errors without an id]]."""
        out = []
        for s in self.socks:
            frames = self._read_all(s, timeout)
            out.append([len([f for f in frames if f.get("id") is not None and f.get("ok")]),
                        [f["err"] + ": " + f["msg"] for f in frames if f.get("id") is None and "err" in f]])
        return out

    def attack_read_notes(self, timeout=30.0):
        """Read every connection until quiet: per connection, [replies,
        notifications of a set, notifications counted as dropped]."""
        out = []
        for s in self.socks:
            frames = self._read_all(s, timeout)
            out.append([len([f for f in frames if f.get("id") is not None]),
                        len([f for f in frames if f.get("ev") == "set"]),
                        sum(f.get("dropped", 0) for f in frames if f.get("ev") == "overflow")])
        return out

    def attack_close(self):
        n = len(self.socks)
        for s in self.socks:
            s.close()
        self.socks = []
        return n


def main():
    client = DSClient(sys.argv[1])
    attacks = Attacks(sys.argv[1], client)
    print(json.dumps({"ready": os.getpid()}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        target = attacks if req["call"].startswith("attack_") else client
        method = getattr(target, req["call"])
        args = [_dec(a) for a in req.get("args", [])]
        kwargs = {k: _dec(v) for k, v in req.get("kwargs", {}).items()}
        try:
            result = {"ok": True, "value": _enc(method(*args, **kwargs))}
        except DSError as exc:
            result = {"ok": False, "error": type(exc).__name__, "msg": str(exc)}
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
