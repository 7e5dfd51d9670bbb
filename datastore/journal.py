"""Durable state: an append-only journal plus a snapshot, both fsync'ed.

Every change is appended as one record; the server groups all changes of one
event-loop pass into one write + fdatasync before it acknowledges any of
them (group commit), so an acknowledged write survives kill -9 and power
loss, and a burst of writers pays one sync.  A record is

    u32 length | u32 crc32(payload) | payload (a libdrv.wire message body)

Replay stops at the first short or corrupt record (a write torn by a crash,
never acknowledged) and cuts the file there.  When the journal outgrows the
live data it is compacted: the live state is written to a new snapshot
(write, fsync, rename, fsync dir) and the journal is emptied.
"""

import os
import zlib

from libdrv.wire import FrameError, decode_body, encode

SNAPSHOT = "ds.snapshot"
JOURNAL = "ds.journal"
COMPACT_MIN_BYTES = 4 << 20


def _record(msg):
    frame = encode(msg)
    payload = frame[4:]
    return len(payload).to_bytes(4, "little") + zlib.crc32(payload).to_bytes(4, "little") + payload


def _read_records(path):
    """Yield (message, end_offset) for each intact record; stop at damage."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return
    pos = 0
    while pos + 8 <= len(data):
        n = int.from_bytes(data[pos:pos + 4], "little")
        crc = int.from_bytes(data[pos + 4:pos + 8], "little")
        payload = data[pos + 8:pos + 8 + n]
        if len(payload) != n or zlib.crc32(payload) != crc:
            return
        try:
            msg = decode_body(payload)
        except FrameError:
            return
        pos += 8 + n
        yield msg, pos


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Journal:
    def __init__(self, state_dir, fsync=True):
        self.state_dir = state_dir
        self.fsync = fsync
        self.path = os.path.join(state_dir, JOURNAL)
        self.snapshot_path = os.path.join(state_dir, SNAPSHOT)
        self._pending = []
        self.pending_bytes = 0   # appended, not yet committed: the server bounds a pass by it
        self._fd = None
        self.size = 0
        self.syncs = 0

    def load(self):
        """Return the records to replay (snapshot first) and open for append."""
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        records = [m for m, _ in _read_records(self.snapshot_path)]
        good_end = 0
        for msg, end in _read_records(self.path):
            records.append(msg)
            good_end = end
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if os.fstat(self._fd).st_size != good_end:
            # A torn tail from a crash: it was never acknowledged; drop it.
            os.ftruncate(self._fd, good_end)
            os.fsync(self._fd)
        os.lseek(self._fd, good_end, os.SEEK_SET)
        self.size = good_end
        return records

    def append(self, msg):
        rec = _record(msg)
        self._pending.append(rec)
        self.pending_bytes += len(rec)

    @property
    def dirty(self):
        return bool(self._pending)

    def commit(self):
        """Write and sync everything appended since the last commit.

        On failure the file is cut back to its last good size and OSError
        propagates: the caller must treat the pending changes as not made.
        """
        if not self._pending:
            return
        data = b"".join(self._pending)
        self._pending.clear()
        self.pending_bytes = 0
        try:
            view = memoryview(data)
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
            if self.fsync:
                os.fdatasync(self._fd)
                self.syncs += 1
        except OSError:
            try:
                os.ftruncate(self._fd, self.size)
                os.lseek(self._fd, self.size, os.SEEK_SET)
            except OSError:
                pass
            raise
        self.size += len(data)

    def want_compaction(self, live_bytes):
        return self.size > max(COMPACT_MIN_BYTES, 2 * live_bytes)

    def compact(self, live_records):
        """Replace snapshot + journal by a snapshot of live_records."""
        tmp = self.snapshot_path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            buf = []
            for msg in live_records:
                buf.append(_record(msg))
                if len(buf) >= 1024:
                    os.write(fd, b"".join(buf))
                    buf.clear()
            if buf:
                os.write(fd, b"".join(buf))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, self.snapshot_path)
        _fsync_dir(self.state_dir)
        # The journal holds only changes already in the snapshot; replaying
        # them over it would end in the same state, so a crash here is safe.
        os.ftruncate(self._fd, 0)
        os.lseek(self._fd, 0, os.SEEK_SET)
        os.fsync(self._fd)
        self.size = 0

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
