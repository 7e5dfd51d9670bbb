"""The test tree itself: pytest's default import mode keys test modules by basename, so two
test files with the same name in tests/host, tests/vm and tests/guest fail collection."""

import collections
import os

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_no_two_test_files_share_a_basename():
    seen = collections.defaultdict(list)
    for suite in ("host", "vm", "guest"):
        for name in os.listdir(os.path.join(TESTS, suite)):
            if name.startswith("test_") and name.endswith(".py"):
                seen[name].append(suite)
    clashes = {name: suites for name, suites in seen.items() if len(suites) > 1}
    assert not clashes, (f"test files sharing a basename: {clashes}; rename one "
                         "(guest-side files end in _guest.py)")


def test_guest_test_files_end_in_guest():
    names = [n for n in os.listdir(os.path.join(TESTS, "guest"))
             if n.startswith("test_") and n.endswith(".py")]
    assert names and all(n.endswith("_guest.py") for n in names), names
