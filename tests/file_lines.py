"""A line per test file as soon as its last test ends, with or without pytest-xdist workers.

``make test`` prints this instead of pytest's dots; it also works on pytest-xdist workers (``-n``),
where pytest alone would print dots with no file names. Once a file's tests are all done::

    tests/test_keyed.py                         31 passed                  4.2 s

(the seconds are the file's own test time, setup and teardown included, summed over its tests).
The default dots are left out for passed, skipped and expected-to-fail tests; failures keep their ``F``
and the usual report at the end.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import pytest

_RANK = {"passed": 0, "skipped": 1, "xfailed": 1, "xpassed": 1, "failed": 2, "error": 3}


def _file(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


class FileLines:
    def __init__(self, config: pytest.Config):
        self.config = config
        self.expected: Counter[str] = Counter()
        self.outcome: dict[str, str] = {}
        self.seconds: Counter[str] = Counter()
        self.ended: dict[str, Counter[str]] = defaultdict(Counter)

    def _expect(self, nodeids) -> None:
        if nodeids and not self.expected:
            self.expected.update(_file(n) for n in nodeids)

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        self._expect([item.nodeid for item in session.items])

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node, ids) -> None:
        self._expect(ids)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        f = _file(report.nodeid)
        self.seconds[f] += report.duration
        if hasattr(report, "wasxfail"):
            now = "xpassed" if report.passed else "xfailed"
        elif report.failed:
            now = "failed" if report.when == "call" else "error"
        else:
            now = report.outcome
        before = self.outcome.get(report.nodeid, "passed")
        self.outcome[report.nodeid] = max(before, now, key=_RANK.__getitem__)
        if report.when != "teardown":
            return
        self.ended[f][self.outcome.pop(report.nodeid)] += 1
        if sum(self.ended[f].values()) == self.expected.get(f, -1):
            counts = ", ".join(f"{n} {k}" for k, n in sorted(self.ended[f].items(), key=lambda kv: _RANK[kv[0]]))
            tr = self.config.pluginmanager.get_plugin("terminalreporter")
            if tr is not None:
                tr.ensure_newline()
                tr.write_line(f"{f:<48} {counts:<28} {self.seconds[f]:6.1f} s")

    @pytest.hookimpl(tryfirst=True)
    def pytest_report_teststatus(self, report: pytest.TestReport, config: pytest.Config):
        if config.option.verbose > 0:
            return None
        if hasattr(report, "wasxfail"):
            return ("xfailed", "", "XFAIL") if report.skipped else None
        if report.passed and report.when == "call":
            return "passed", "", "PASSED"
        if report.skipped:
            return "skipped", "", "SKIPPED"
        return None
