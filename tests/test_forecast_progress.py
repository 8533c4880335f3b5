"""Progress lines of train forecast (plain stderr lines once a run passes 10 s) and the compare tool's flag checks."""

from __future__ import annotations

import itertools

import pytest

import streamrnn.train.forecast as tf
from streamrnn.forecast.dataset import Split, prepare
from streamrnn.forecast.features import FeatureConfig, offline_features
from streamrnn.forecast.progress import Progress
from streamrnn.forecast.synthetic import simulate
from streamrnn.train import compare


def test_train_forecast_prints_plain_progress_lines_on_stderr(tmp_path, monkeypatch, capsys):
    clock = itertools.count(0.0, 3.0)  # every reading of the clock is 3 s later: no sleeping

    class Fast(Progress):
        def __init__(self, name, **kw):
            super().__init__(name, **{**kw, "clock": lambda: next(clock)})

    monkeypatch.setattr(tf, "Progress", Fast)
    bars = simulate(["PA", "PB", "PC"], start="2015-01-01", end="2016-06-01", seed=2)
    data = [prepare(offline_features(b, FeatureConfig()), 2) for b in bars]
    split = Split(fit_end="2015-11-01", val_end="2016-03-01", test_start="2016-03-01", holdout_mod=1000)
    cfg = tf.ForecastTrainConfig(hidden=4, layers=1, horizons=2, batch=3, steps=12, eval_every=100, split=split)
    tf.train_forecast(data, cfg, checkpoint=tmp_path / "c.pt", resume=False, log=lambda m: None)
    err = capsys.readouterr().err.splitlines()
    lines = [x for x in err if x.startswith("train forecast:")]
    # the clock is read at start and once per step: a line once 10 s have passed, then at most every 10 s
    assert lines[0].startswith("train forecast: 4/12 steps (train NLL ") and lines[0].endswith(", 12 s")
    assert [int(x.split()[2].split("/")[0]) for x in lines] == [4, 8, 12]
    assert not any("\r" in x for x in err)


@pytest.mark.parametrize("argv, message", [
    (["cost", "--hidden", "0"], "argument --hidden: expected an int >= 1, got '0'"),
    (["cost", "--steps", "abc"], "argument --steps: expected an int, got 'abc'"),
    (["cost", "--seed", "-1"], "argument --seed: expected an int in 0..4294967295, got '-1'"),
])
def test_compare_flags_are_checked_in_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        compare.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
