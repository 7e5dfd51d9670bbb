"""AHCI SATA driver (see docs/block.md): `program = "drivers.ahci"` runs main()."""

from .driver import main  # noqa: F401
