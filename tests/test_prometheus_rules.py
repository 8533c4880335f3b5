"""The alert and recording rules' unit tests (deploy/prometheus/rules_test*.yml), run by ``promtool test rules``.

Every rule must be tested there: each recording rule is evaluated by a test, and each alert both fires
in one case and stays silent in another. A mutation check shows the tests have teeth: the dead-letter
share as it was (``dead / clamp_min(events_in, 1e-9)``) fails them on the batch-shaped input.
CI installs promtool (Debian's ``prometheus``, see ``.ci/run``); without it these tests skip.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import background
import pytest
import yaml

RULES_DIR = Path(__file__).resolve().parents[1] / "deploy" / "prometheus"
TESTS = ("rules_test.yml", "rules_test_daily.yml")
PROMTOOL = shutil.which("promtool")

pytestmark = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (apt-get install prometheus; "
                                                          ".ci/run installs it)")


def _rules() -> list[dict]:
    return [r for g in yaml.safe_load((RULES_DIR / "rules.yml").read_text())["groups"] for r in g["rules"]]


def _tests() -> list[dict]:
    return [t for f in TESTS for t in yaml.safe_load((RULES_DIR / f).read_text())["tests"]]


def _promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


@background.job("promtool check and test rules", file=__file__)
def _promtool_runs(folder: Path) -> dict[str, subprocess.CompletedProcess]:
    """The rules checked and tested as shipped, and the batch-shaped test on the old dead-letter share (below):
    promtool processes, beside the other tests (tests/background.py)."""
    if PROMTOOL is None:
        return {}
    rules = yaml.safe_load((RULES_DIR / "rules.yml").read_text())
    for g in rules["groups"]:
        for r in g["rules"]:
            if r.get("record") == "job:streamrnn_dead_letter_share:rate5m":
                r["expr"] = ("sum by (job) (rate(streamrnn_dead_letters_total[5m])) / "
                             "clamp_min(sum by (job) (rate(streamrnn_events_in_total[5m])), 1e-9)")
    (folder / "rules.yml").write_text(yaml.safe_dump(rules))
    shutil.copy(RULES_DIR / "rules_test.yml", folder)
    return {"check": _promtool("check", "rules", "rules.yml", cwd=RULES_DIR),
            "test": _promtool("test", "rules", *TESTS, cwd=RULES_DIR),
            "old share": _promtool("test", "rules", "rules_test.yml", cwd=folder)}


def test_rules_pass_promtool_check_and_their_unit_tests():
    runs = background.result("promtool check and test rules")
    check = runs["check"]
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in check.stdout
    run = runs["test"]
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("SUCCESS") == len(TESTS), run.stdout


def test_every_rule_has_a_test():
    tests = _tests()
    exprs = " ".join(e["expr"] for t in tests for e in t.get("promql_expr_test", []))
    for r in _rules():
        if "record" in r:
            assert r["record"] in exprs, f"recording rule {r['record']} has no promql_expr_test"
    cases = [a for t in tests for a in t.get("alert_rule_test", [])]
    for r in _rules():
        if "alert" in r:
            mine = [a for a in cases if a["alertname"] == r["alert"]]
            assert any(a["exp_alerts"] for a in mine), f"alert {r['alert']} never fires in a test"
            assert any(not a["exp_alerts"] for a in mine), f"alert {r['alert']} is never shown silent"


def test_the_batch_shaped_test_fails_the_old_dead_letter_share():
    """The old share, dead letters over input events, explodes on a batch run (input counted before the first
    scrape, dead letters at flush time): the tests must catch it."""
    run = background.result("promtool check and test rules")["old share"]
    out = run.stdout + run.stderr
    assert run.returncode != 0
    assert "batch-shaped input" in out or 'job="batch"' in out, out
