"""Intel e1000 (82540EM) driver (see docs/net.md): `program = "drivers.e1000"` runs main()."""

from .driver import main  # noqa: F401
