"""Tests in tests/guest/ run INSIDE the testbed guest, started by a tests/vm test through
Testbed.run_pytest (one pytest process per call). On the host they would poke at the host's
devices, so there each of them fails at once with a message that says what to do.
"""

import os

import pytest



def _in_a_qemu_guest():
    # RSD_TESTBED_GUEST=1 is set by the testbed's agent; any QEMU guest is also accepted so a
    # hand-made VM can run these tests too.
    if os.environ.get("RSD_TESTBED_GUEST") == "1":
        return True
    try:
        with open("/sys/class/dmi/id/sys_vendor") as f:
            return f.read().strip() == "QEMU"
    except OSError:
        return False


IN_GUEST = _in_a_qemu_guest()


@pytest.fixture(autouse=True)
def _inside_the_testbed_guest():
    if not IN_GUEST:
        pytest.fail("tests/guest/ runs inside the testbed guest only: run `make test` "
                    "(tests/vm starts it) or `python -m testbed run -- python -m pytest "
                    "tests/guest/...`", pytrace=False)
