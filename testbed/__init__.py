"""rsd testbed: a stock Debian kernel in QEMU with the project's emulated hardware.

    from testbed import Testbed
    with Testbed(disk_size_mb=64) as tb:
        print(tb.run(["uname", "-r"]).stdout)

See docs/testbed.md.
"""

from .errors import CommandTimeout, TestbedError
from .machine import AHCI_BDF, COM2_IRQ, COM2_PORT, E1000_BDF, GUEST_MAC, VGA_BDF
from .results import PytestResult, RunResult, TestOutcome
from .vm import REPO_ROOT, Testbed, guest_python

__all__ = ["Testbed", "TestbedError", "CommandTimeout", "RunResult", "PytestResult",
           "TestOutcome", "REPO_ROOT", "guest_python", "E1000_BDF", "AHCI_BDF", "VGA_BDF",
           "COM2_PORT", "COM2_IRQ", "GUEST_MAC"]
