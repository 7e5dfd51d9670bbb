"""A framed message channel over a stream socket (libdrv.wire frames).

Used on both ends of rsd's control channel to a service and of rsd's own
control socket.  Non-blocking reads; writes are small and rare, so a full
send buffer is treated as the peer not keeping up.
"""

import socket

from libdrv.wire import FrameError, FrameReader, encode

# Control messages are tiny; a peer announcing more is broken or hostile.
MAX_CONTROL_FRAME = 64 << 10


class ChannelClosed(Exception):
    """The peer closed the channel (or it broke)."""


class Channel:
    def __init__(self, sock, max_frame=MAX_CONTROL_FRAME):
        self.sock = sock
        self.reader = FrameReader(max_frame)

    def fileno(self):
        return self.sock.fileno()

    def send(self, msg, fds=()):
        """Send one message (fds, if any, ride on its first byte, SCM_RIGHTS);
        raises ChannelClosed if the peer is gone."""
        data = encode(msg)
        try:
            if fds:
                sent = socket.send_fds(self.sock, [data], list(fds))
                data = data[sent:]
            if data:
                self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError, OSError) as exc:
            raise ChannelClosed(str(exc)) from None

    def try_send(self, msg):
        """Send without blocking; False if the peer's buffer is full or it is gone."""
        try:
            n = self.sock.send(encode(msg), socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return False
        return n > 0

    def read_available(self):
        """Read what is there now; return complete messages.

        Raises ChannelClosed on EOF and FrameError on a malformed frame.
        """
        try:
            data = self.sock.recv(65536, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return []
        except OSError as exc:
            raise ChannelClosed(str(exc)) from None
        if not data:
            raise ChannelClosed("peer closed the channel")
        return self.reader.feed(data)

    def recv_blocking(self, timeout=None, fds_out=None):
        """Block until one message arrives; return it (extra ones are kept).

        With a list as fds_out, file descriptors that come with the data
        (SCM_RIGHTS) are appended to it; otherwise none are accepted."""
        pending = getattr(self, "_pending", None)
        if pending:
            return pending.pop(0)
        self.sock.settimeout(timeout)
        try:
            while True:
                try:
                    if fds_out is None:
                        data = self.sock.recv(65536)
                    else:
                        data, fds, _, _ = socket.recv_fds(self.sock, 65536, 16, socket.MSG_CMSG_CLOEXEC)
                        fds_out.extend(fds)
                except socket.timeout:
                    raise TimeoutError("no message within %.1f s" % timeout) from None
                if not data:
                    raise ChannelClosed("peer closed the channel")
                msgs = self.reader.feed(data)
                if msgs:
                    self._pending = msgs[1:]
                    return msgs[0]
        finally:
            self.sock.settimeout(None)

    def take_pending(self):
        out = getattr(self, "_pending", None) or []
        self._pending = []
        return out

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


__all__ = ["Channel", "ChannelClosed", "FrameError", "MAX_CONTROL_FRAME"]
