"""Errors the testbed raises; every message says what went wrong and what to do."""


class TestbedError(RuntimeError):
    """The testbed cannot boot, or the guest died, hung or broke the protocol.

    When a guest was running, the message ends with the tail of its console log.
    """

    __test__ = False  # not a pytest test class despite the name


class CommandTimeout(TestbedError):
    """A command in the guest outran its timeout; the agent killed it.

    .result holds what it printed before it was killed (rc is -9).
    """

    def __init__(self, message, result):
        super().__init__(message)
        self.result = result
