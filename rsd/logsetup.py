"""Where rsd's log goes: the systemd journal, with fields, when systemd started rsd; stderr
otherwise.

Under systemd (stderr is the journal stream named by $JOURNAL_STREAM) every record goes
through journald's native protocol (systemd-python's JournalHandler), so that

    journalctl -u rsd RSD_LABEL=serial0          # what rsd did with serial0
    journalctl -u rsd RSD_REASON=signal          # every failure of that kind
    journalctl -u rsd -p warning                 # priorities are the log levels

work.  RSD_LABEL is the service a line is about (rsd's lines about a service read
"LABEL: ..."; a record may also name it with extra={"RSD_LABEL": ...}); RSD_REASON is a
failure's reason (exit, signal, no-heartbeat, init-failed, init-timeout) or "gave-up"
(extra={"RSD_REASON": ...}). JournalHandler sends a record's upper-case attributes as fields.
Each service's own output is not here: it is in STATE_DIR/log/<label>.log (docs/deploy.md).
"""

import logging
import os
import sys

FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


class ServiceFields(logging.Filter):
    """Gives each record about a service its RSD_LABEL field."""

    def filter(self, record):
        if getattr(record, "RSD_LABEL", None) is None:
            msg, args = record.msg, record.args
            if (isinstance(msg, str) and msg.startswith("%s: ") and isinstance(args, tuple)
                    and args and isinstance(args[0], str)):
                record.RSD_LABEL = args[0]
        return True


def journal_is_stderr(env=os.environ, stream=sys.stderr):
    """True if stderr is connected to the journal ($JOURNAL_STREAM is "DEV:INODE" of it)."""
    value = env.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in value.split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def setup(level, identifier="rsd"):
    """Configure the root logger; returns "journal" or "stderr" (where the log goes)."""
    root = logging.getLogger()
    root.setLevel(level)
    handler = None
    where = "stderr"
    if journal_is_stderr():
        try:
            from systemd.journal import JournalHandler
        except ImportError as exc:
            print("rsd: logging to stderr without journal fields: systemd-python is missing "
                  "(%s); reinstall rsd (make install)" % exc, file=sys.stderr)
        else:
            handler = JournalHandler(SYSLOG_IDENTIFIER=identifier)
            handler.setFormatter(logging.Formatter("%(message)s"))  # journald stamps the time
            where = "journal"
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(ServiceFields())
    root.addHandler(handler)
    return where
