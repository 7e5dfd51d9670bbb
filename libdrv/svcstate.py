"""The DS keys rsd publishes about a service, and how to read them.

Front ends import this (never rsd) to follow a driver's life:

    drv.<class>.<label> = "up <generation>" | "restarting <generation>"
                          | "down <generation>"
    label.<label>       = "pid=<pid> generation=<g> uid=<uid>"

The generation grows at every incarnation, so a front end that sees a new
generation knows its driver is a fresh process (old grants are void).
"""

CLASSES = ("net", "blk", "chr", "server")
STATES = ("up", "restarting", "down")


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
