"""rsd's control socket: root-only, one framed request at a time per connection.

A request is {"op": VERB, ...}; the reply is {"ok": True, ...} or
{"ok": False, "error": TEXT}.  Each travels as one libdrv.wire frame
{"json": TEXT}: requests and status carry fractional seconds, which the wire
format has no type for.  Some replies come later (up waits for ready,
down for the exit): the handler keeps the Client and calls reply() then.
"""

import json
import logging
import os
import socket
import struct

from libdrv.channel import Channel, ChannelClosed, FrameError

log = logging.getLogger("rsd.control")

DEFAULT_RUNTIME_DIR = "/run/rsd"


def default_socket_path(env=os.environ):
    if env.get("RSD_SOCKET"):
        return env["RSD_SOCKET"]
    return os.path.join(env.get("RSD_RUNTIME_DIR", DEFAULT_RUNTIME_DIR), "rsd.sock")


class Client:
    def __init__(self, sock, uid):
        self.channel = Channel(sock)
        self.uid = uid
        self.closed = False

    def fileno(self):
        return self.channel.fileno()

    def reply(self, msg):
        if self.closed:
            return
        try:
            self.channel.send({"json": json.dumps(msg)})
        except ChannelClosed:
            self.closed = True

    def error(self, text):
        self.reply({"ok": False, "error": text})


class ControlServer:
    """Accepts rsctl connections on the loop and hands requests to handle(client, msg)."""

    def __init__(self, loop, path, handle, allowed_uids=(0,)):
        self.loop = loop
        self.path = path
        self.handle = handle
        self.allowed_uids = set(allowed_uids) | {os.getuid()}
        if _listening(path):
            raise RuntimeError("another rsd already listens on %s; stop it first (rsctl shutdown)" % path)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)  # 0600: root only
        try:
            self.sock.bind(path)
        finally:
            os.umask(old)
        self.inode = os.stat(path).st_ino
        self.sock.listen(64)
        self.sock.setblocking(False)
        loop.add_reader(self.sock, self._accept)

    def _accept(self):
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        _, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        client = Client(conn, uid)
        if uid not in self.allowed_uids:
            client.error("permission denied: only root may control rsd (run rsctl as root)")
            conn.close()
            return
        self.loop.add_reader(client, self._readable, client)

    def _readable(self, client):
        try:
            msgs = client.channel.read_available()
        except (ChannelClosed, FrameError) as exc:
            if isinstance(exc, FrameError):
                client.error("malformed request: %s" % exc)
            self.drop(client)
            return
        for frame in msgs:
            try:
                msg = json.loads(frame["json"])
                if not isinstance(msg, dict):
                    raise ValueError("not an object")
            except (KeyError, TypeError, ValueError) as exc:
                client.error("malformed request (%s): use rsctl" % exc)
                continue
            try:
                self.handle(client, msg)
            except Exception as exc:  # a client's mistake never kills the daemon
                log.exception("request %r failed", msg.get("op"))
                client.error("internal error handling %r: %s (see rsd's log)" % (msg.get("op"), exc))

    def drop(self, client):
        self.loop.remove_reader(client)
        client.closed = True
        client.channel.close()

    def close(self):
        self.loop.remove_reader(self.sock)
        self.sock.close()
        try:
            if os.stat(self.path).st_ino == self.inode:  # never remove a successor's socket
                os.unlink(self.path)
        except OSError:
            pass


def _listening(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def request(msg, path=None, timeout=60.0):
    """One request to rsd, for rsctl; raises ConnectionError with advice when rsd is absent."""
    path = path or default_socket_path()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(path)
    except FileNotFoundError:
        sock.close()
        raise ConnectionError("rsd is not running (no socket at %s): start it with "
                              "`systemctl start rsd`, or set RSD_RUNTIME_DIR/RSD_SOCKET" % path) from None
    except ConnectionRefusedError:
        sock.close()
        raise ConnectionError("rsd is not running (nothing listens on %s): start it with "
                              "`systemctl start rsd`" % path) from None
    except PermissionError:
        sock.close()
        raise ConnectionError("permission denied on %s: rsctl must run as root" % path) from None
    ch = Channel(sock)
    try:
        ch.send({"json": json.dumps(msg)})
        reply = ch.recv_blocking(timeout)
        try:
            return json.loads(reply["json"])
        except (KeyError, TypeError, ValueError):
            raise ConnectionError("rsd sent a reply this rsctl does not understand: is it "
                                  "the same version? (restart rsd)") from None
    except ChannelClosed:
        raise ConnectionError("rsd closed the connection without answering (did it stop?)") from None
    finally:
        ch.close()
