"""hostile.py, attacking already when the spawner imports it: the result of an
unshare(CLONE_NEWUSER) attempt at import time goes to the service log."""

import hostile

main = hostile.main  # the service is hostile.py's
hostile.import_time_probe()
