"""The name a Python daemon shows to ps, top and pidof.

Started as a console script or with `python -m`, a daemon's argv[0] is the interpreter, so
`pidof rsd` finds nothing (only `pidof -x rsd` does).  This rewrites the command line in
place (python-prctl's set_proctitle) and sets the kernel's process name (PR_SET_NAME).

The command line becomes the name alone.  python-prctl writes one string (it cannot put
the NULs between arguments), and pidof compares the part of argv[0] after its last "/":
"datastore --state-dir /var/lib/rsd" would be found by `pidof rsd`, and `kill $(pidof rsd)`
would kill the data store too.  The arguments are in the unit file and the logs.
"""

import prctl


def set_process_title(name):
    """Make the command line read NAME and the process name NAME (15 bytes kept)."""
    prctl.set_proctitle(name)
    prctl.set_name(name)
