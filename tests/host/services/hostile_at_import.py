"""hostile.py, attacking already when the spawner imports it: the result of an
unshare(CLONE_NEWUSER) attempt at import time goes to the service log."""

from hostile import import_time_probe, main  # noqa: F401  (main: the service)

import_time_probe()
