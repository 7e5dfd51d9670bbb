"""VM test fixtures: one testbed guest booted per test session.

    def test_something(testbed):
        r = testbed.run(["uname", "-r"], timeout=30)
        assert r.rc == 0, r.describe()

When the testbed cannot boot (no QEMU, no kernel, a broken guest), every test that uses it
FAILS (reported as an error) with the reason and the guest console; nothing is skipped.
"""

import pytest

from testbed import Testbed, TestbedError
from testbed.kernel import find_kernel

_boot_failure = None
TESTBED_OWN_TESTS = "tests/vm/test_testbed.py"


def pytest_report_header(config):
    """Which guest kernel this session boots ($RSD_TESTBED_KERNEL, else 6.1): CI runs the VM
    tests on two, and a log must say which one it shows."""
    try:
        return f"testbed kernel: {find_kernel().version}"
    except TestbedError as e:
        return f"testbed kernel: NONE ({e})"


def pytest_collection_modifyitems(config, items):
    """The testbed's own tests first: they check the guest as booted (nothing bound, nothing
    claimed) before other tests use it, and a broken testbed shows up as such, first."""
    items.sort(key=lambda item: 0 if item.nodeid.startswith(TESTBED_OWN_TESTS) else 1)


@pytest.fixture(scope="session")
def testbed():
    """The session's guest (see docs/testbed.md). Leave it as you found it: unbind what you
    bound, unload what you loaded, kill what you started. A test that may crash or hang the
    guest must boot its own Testbed instead."""
    global _boot_failure
    if _boot_failure is not None:
        pytest.fail(f"the testbed could not boot earlier in this session:\n{_boot_failure}",
                    pytrace=False)
    tb = Testbed(disk_size_mb=64)
    try:
        tb.start()
        tb.wait_ready()
    except (TestbedError, ValueError) as e:
        _boot_failure = str(e)
    if _boot_failure is not None:
        pytest.fail(f"the testbed cannot boot:\n{_boot_failure}", pytrace=False)
    try:
        yield tb
    finally:
        tb.close()


@pytest.fixture(autouse=True)
def _revive_the_session_testbed(request):
    """A test that killed the session guest fails by itself; the next one gets a fresh guest
    (same object, rebooted) instead of inheriting the wreck."""
    if "testbed" in request.fixturenames:
        tb = request.getfixturevalue("testbed")
        if not tb.alive:
            reason = tb.failure or "it was closed"
            try:
                tb.restart()
            except TestbedError as e:
                pytest.fail(f"the session testbed died ({reason.splitlines()[0]}) and cannot "
                            f"boot again:\n{e}", pytrace=False)
    yield
