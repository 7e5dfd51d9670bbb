"""What a command or a pytest process in the guest returns."""

import json
from dataclasses import dataclass, field


@dataclass
class RunResult:
    argv: list
    rc: int
    stdout_bytes: bytes
    stderr_bytes: bytes
    duration: float
    timed_out: bool = False

    @property
    def stdout(self):
        return self.stdout_bytes.decode("utf-8", "replace")

    @property
    def stderr(self):
        return self.stderr_bytes.decode("utf-8", "replace")

    def describe(self, limit=4000):
        return (f"guest command {self.argv!r} -> rc {self.rc}"
                f"{' (timed out)' if self.timed_out else ''} in {self.duration:.2f}s\n"
                f"--- stdout ---\n{self.stdout[-limit:]}\n--- stderr ---\n{self.stderr[-limit:]}")

    def check(self):
        """Return self if rc == 0, else raise AssertionError with the output."""
        if self.rc != 0:
            raise AssertionError(self.describe())
        return self


@dataclass
class TestOutcome:
    nodeid: str
    outcome: str          # "passed", "failed", "error" (setup/teardown failed), "skipped"
    duration: float = 0.0
    longrepr: str = ""

    __test__ = False


@dataclass
class PytestResult:
    run: RunResult
    tests: dict = field(default_factory=dict)   # nodeid -> TestOutcome

    @property
    def rc(self):
        return self.run.rc

    @property
    def stdout(self):
        return self.run.stdout

    @property
    def stderr(self):
        return self.run.stderr

    def outcomes(self, prefix=""):
        return {n: t.outcome for n, t in self.tests.items() if n.startswith(prefix)}

    def failures(self, prefix=""):
        return [t for n, t in self.tests.items() if n.startswith(prefix) and t.outcome != "passed"]

    def report(self, prefix="", limit=6000):
        lines = [f"guest pytest rc {self.rc}, {len(self.tests)} tests"]
        for t in self.tests.values():
            if t.nodeid.startswith(prefix):
                lines.append(f"  {t.outcome.upper():7} {t.nodeid} ({t.duration:.2f}s)")
        for t in self.failures(prefix):
            lines.append(f"--- {t.nodeid} ---\n{t.longrepr[-limit:]}")
        if not self.tests or self.rc not in (0, 1):
            lines.append(f"--- pytest output ---\n{self.stdout[-limit:]}\n{self.stderr[-limit:]}")
        return "\n".join(lines)

    def assert_passed(self, prefix=""):
        """Every guest test whose nodeid starts with `prefix` passed, and there was at least one."""
        selected = self.outcomes(prefix)
        if not selected:
            raise AssertionError(f"no guest test matches {prefix!r}\n" + self.report())
        if self.failures(prefix):
            raise AssertionError(self.report(prefix))
        return selected


def parse_report(text):
    """The guest plugin's JSON lines -> {nodeid: TestOutcome}; the worst phase decides."""
    tests = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        t = tests.setdefault(r["nodeid"], TestOutcome(r["nodeid"], "passed"))
        t.duration += r.get("duration", 0.0)
        if r["outcome"] == "failed":
            t.outcome = "failed" if r["when"] == "call" else "error"
            t.longrepr += r.get("longrepr", "")
        elif r["outcome"] == "skipped" and t.outcome == "passed":
            t.outcome = "skipped"
            t.longrepr += r.get("longrepr", "")
    return tests
