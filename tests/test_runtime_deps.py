"""The jobs run on a runtime install: streamrnn's declared dependencies (no extras) and what they pull in.

The test environment has the 'train', 'eval', 'test' and 'plot' extras (torch, scipy, pandas, ...),
so an import of one of them on the serving path would pass every other test and fail on a
worker, or in the README's quickstart. Here both demo jobs run, in a subprocess where every
installed module outside the runtime dependency closure cannot be imported."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution, packages_distributions
from pathlib import Path

import background
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent

RUN_BLOCKED = """
import importlib.abc, json, runpy, sys
BLOCKED = set(json.loads(sys.argv[1]))

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (not a runtime dependency)", name=name)
        return None

sys.meta_path.insert(0, Block())
module, sys.argv = sys.argv[2], [sys.argv[2], *sys.argv[3:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def runtime_closure(name: str = "streamrnn") -> set[str]:
    """Canonical names of ``name`` and every distribution its requirements (no extras) pull in, here."""
    seen: set[str] = set()
    todo = [name]
    while todo:
        n = canonicalize_name(todo.pop())
        if n in seen:
            continue
        seen.add(n)
        try:
            reqs = distribution(n).requires or []
        except PackageNotFoundError:  # a marker-selected requirement for another platform
            continue
        for r in map(Requirement, reqs):
            if r.marker is None or r.marker.evaluate({"extra": ""}):
                todo.append(r.name)
    return seen


def blocked_modules() -> list[str]:
    allowed = runtime_closure()
    return sorted(mod for mod, dists in packages_distributions().items()
                  if not any(canonicalize_name(d) in allowed for d in dists))


def test_the_closure_is_the_runtime_one():
    blocked = set(blocked_modules())
    assert {"torch", "scipy", "pandas", "arch", "matplotlib", "pytest", "hypothesis"} <= blocked
    assert not {"numpy", "pyarrow", "apache_beam", "onnxruntime", "prometheus_client", "streamrnn"} & blocked


JOBS = ("next_token", "market_forecast")


def _demo_on_runtime_dependencies(job: str):
    def run(folder: Path) -> tuple[subprocess.CompletedProcess, Path]:
        out = folder / "out"
        r = subprocess.run([sys.executable, "-c", RUN_BLOCKED, json.dumps(blocked_modules()), f"beam_jobs.{job}",
                            "--demo", "--output", str(out), "--quiet", "--metrics-port", "0"],
                           capture_output=True, text=True, timeout=300, cwd=ROOT, env=background.ENV)
        return r, out

    return run


for _job in JOBS:  # subprocesses: they run beside the other tests (tests/background.py)
    background.job(f"demo {_job} on runtime dependencies", file=__file__)(_demo_on_runtime_dependencies(_job))


@pytest.mark.slow
@pytest.mark.parametrize("job", JOBS)
def test_demo_job_runs_on_runtime_dependencies_only(job):
    r, out = background.result(f"demo {job} on runtime dependencies")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())
    assert list(out.glob("*.parquet"))
