"""pytest plugin loaded in the guest (-p testbed.guest_pytest_plugin) by Testbed.run_pytest.

Writes one JSON line per test phase to $RSD_TESTBED_PYTEST_REPORT so the host gets exact
node ids and failure text without parsing pytest's console output.
"""

import json
import os

_path = os.environ.get("RSD_TESTBED_PYTEST_REPORT")


def pytest_runtest_logreport(report):
    if not _path:
        return
    record = {"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
              "duration": report.duration}
    if report.outcome != "passed":
        record["longrepr"] = report.longreprtext[-20000:]
    with open(_path, "a") as f:
        f.write(json.dumps(record) + "\n")


def pytest_collectreport(report):
    if _path and report.outcome == "failed":  # an import error must not vanish
        with open(_path, "a") as f:
            f.write(json.dumps({"nodeid": report.nodeid or "<collection>", "when": "collect",
                                "outcome": "failed", "duration": 0.0,
                                "longrepr": report.longreprtext[-20000:]}) + "\n")
