"""Shared fixtures: tiny models exported in the test session (fast, independent of the shipped one)."""

from __future__ import annotations

import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from streamrnn.model.loaded import load  # noqa: E402
from streamrnn.model.runtime import CPU  # noqa: E402
from streamrnn.train.export import export  # noqa: E402
from streamrnn.train.nets import NetConfig, RecurrentNet  # noqa: E402

CELLS = ("lstm", "gru", "rnn")


def make_net(cell: str = "lstm", kind: str = "tokens", hidden: int = 16, layers: int = 2, seed: int = 0,
             dropout: float = 0.0) -> RecurrentNet:
    torch.manual_seed(seed)
    cfg = NetConfig(cell=cell, input_kind=kind, hidden=hidden, layers=layers, embed_dim=8, n_features=3,
                    task="lm" if kind == "tokens" else "forecast", n_targets=2, dropout=dropout)
    net = RecurrentNet(cfg).eval()
    # Larger-than-default weights so the recurrence matters (default init is near-linear).
    with torch.no_grad():
        for p in net.rnn.parameters():
            p.mul_(2.0)
    return net


def export_tiny_lm(argv: list[str]) -> int:
    """The Beam tests' "tiny" LSTM LM (``beam_models["tiny"]``) exported to ``argv[0]``, for the job runs that
    tests/run_jobs.py makes in a process of their own."""
    export(make_net("lstm"), argv[0], name="tiny")
    return 0


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def nets_and_paths(model_dir):
    """{(cell, kind): (net, path)} for all cells with tokens, and LSTM/GRU with features."""
    out = {}
    for cell in CELLS:
        for kind in ("tokens", "features"):
            net = make_net(cell, kind)
            path = model_dir / f"{cell}_{kind}.onnx"
            export(net, path, name=f"tiny-{cell}-{kind}")
            out[(cell, kind)] = (net, path)
    return out


@pytest.fixture(scope="session")
def lstm_path(nets_and_paths):
    return nets_and_paths[("lstm", "tokens")][1]


@pytest.fixture()
def lstm(lstm_path):
    return load(lstm_path, providers=[CPU])


@pytest.fixture(scope="session")
def other_lstm_path(model_dir):
    """Same shapes as ``lstm``, different weights."""
    path = model_dir / "other.onnx"
    export(make_net("lstm", seed=1), path, name="tiny-other")
    return path


@pytest.fixture(scope="session")
def wide_lstm_path(model_dir):
    """Different state shapes (hidden 24)."""
    path = model_dir / "wide.onnx"
    export(make_net("lstm", hidden=24), path, name="tiny-wide")
    return path


@pytest.fixture()
def rng():
    return np.random.default_rng(1234)


class FakeClock:
    """A settable clock for TTL tests."""

    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


def pytest_configure(config):
    """A line per test file (tests/file_lines.py); in the process that reports, not in xdist workers."""
    if not hasattr(config, "workerinput"):
        from file_lines import FileLines

        config.pluginmanager.register(FileLines(config), "streamrnn-file-lines")


def pytest_collection_modifyitems(session, config, items):
    """The test files with background jobs run last (in their order), once their jobs are done: the other files
    run meanwhile (tests/background.py)."""
    import background

    late = background.files()
    items[:] = [i for i in items if str(i.path) not in late] + [i for i in items if str(i.path) in late]


_RUN_START = time.monotonic()


def pytest_collection_finish(session):
    """The background jobs of the collected test files start now (tests/background.py)."""
    import background

    if not session.config.option.collectonly:
        background.start({str(item.path) for item in session.items})


_STARTED_FILES: set[str] = set()


def pytest_runtest_setup(item):
    """Background jobs that start with this test file start now (tests/background.py)."""
    if str(item.path) not in _STARTED_FILES:
        import background

        _STARTED_FILES.add(str(item.path))
        background.file_starts(str(item.path))


def pytest_terminal_summary(terminalreporter, config):
    """How the background jobs ran (a line each): to see whether they or the other tests make the run's time."""
    import background

    for line in background.summary(_RUN_START):
        terminalreporter.write_line(line)


def pytest_unconfigure(config):
    import background

    background.stop()
