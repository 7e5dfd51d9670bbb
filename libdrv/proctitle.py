"""The name a Python daemon shows to ps, top and pidof.

Started as a console script or with `python -m`, a daemon's argv[0] is the interpreter, so
`pidof rsd` finds nothing (only `pidof -x rsd` does).  This rewrites the command line in
place (python-prctl's set_proctitle) and sets the kernel's process name (PR_SET_NAME).
"""

import prctl


def set_process_title(name, args=()):
    """Make the command line read "NAME ARGS..." and the process name NAME (15 bytes kept)."""
    prctl.set_proctitle(" ".join([name, *args]))
    prctl.set_name(name)
