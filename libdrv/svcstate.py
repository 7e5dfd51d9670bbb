"""The DS key names, in one place for the daemon, rsd, drivers and front ends.

Three namespaces belong to someone (the daemon enforces it, see
docs/datastore.md "Trust rules"): `label.*` and `drv.*` are written only by
the registrar (rsd, label "rs"); `state.<L>.*` only by label L.  Front ends
import this (never rsd) to follow a driver's life:

    drv.<class>.<label> = "up <generation>" | "restarting <generation>"
                          | "down <generation>"
    label.<label>       = "pid=<pid> generation=<g> uid=<uid>"

The generation grows at every incarnation, so a front end that sees a new
generation knows its driver is a fresh process (old grants are void).
"""

import re

CLASSES = ("net", "blk", "chr", "server")
# What `rsctl fi` can inject; "wild-dma" and "media-error" only into a driver that has a device
# to misprogram (the service's SEF.on_fault handler; others log and ignore it).
FAULT_KINDS = ("crash", "hang", "exit", "wild-dma", "media-error")
STATES = ("up", "restarting", "down")

REGISTRAR_LABEL = "rs"   # rsd's own label in DS
LABEL_PREFIX = "label."
DRV_PREFIX = "drv."
STATE_PREFIX = "state."
REGISTRAR_PREFIXES = (LABEL_PREFIX, DRV_PREFIX)

# A label: a letter, then up to 62 letters, digits, '_' or '-'.
LABEL_RE = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,62}")


def is_label(text):
    return isinstance(text, str) and LABEL_RE.fullmatch(text) is not None


def key_writer(key):
    """The only label that may write key, or None when the key is in no one's
    namespace (then the general rules apply).  A state key whose label part
    is not a label returns "": no one may write it."""
    if key.startswith(REGISTRAR_PREFIXES):
        return REGISTRAR_LABEL
    if key.startswith(STATE_PREFIX):
        label = key[len(STATE_PREFIX):].partition(".")[0]
        return label if is_label(label) else ""
    return None


def drv_key(cls, label):
    return "drv.%s.%s" % (cls, label)


def label_key(label):
    return "label.%s" % label


def state_prefix(label):
    """Keys a driver backs its own state up under (purged by `rsctl down`)."""
    return "state.%s." % label


def format_drv(state, generation):
    if state not in STATES:
        raise ValueError("driver state must be one of %s" % ", ".join(STATES))
    return "%s %d" % (state, generation)


def parse_drv(value):
    """'up 7' -> ('up', 7); raises ValueError on anything else."""
    state, _, gen = str(value).partition(" ")
    if state not in STATES or not gen.isdigit():
        raise ValueError("not a driver state value: %r" % (value,))
    return state, int(gen)


def format_label(pid, generation, uid):
    return "pid=%d generation=%d uid=%d" % (pid, generation, uid)


def parse_label(value):
    """'pid=1 generation=2 uid=3' -> {'pid': 1, 'generation': 2, 'uid': 3}."""
    out = {}
    for part in str(value).split():
        name, sep, num = part.partition("=")
        if not sep or not num.isdigit():
            raise ValueError("not a label value: %r" % (value,))
        out[name] = int(num)
    if set(out) != {"pid", "generation", "uid"}:
        raise ValueError("not a label value: %r" % (value,))
    return out
