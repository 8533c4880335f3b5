"""The jobs' user errors at launch: one line on stderr, exit code 2, nothing written, no pipeline run (issue 14).

Bad numbers, a model of the other job's task, an unknown runner or flag, ``--replay`` off the
DirectRunner and an unwritable ``--plot`` are all refused before any pipeline is built.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys

import pytest

from beam_jobs import market_forecast, next_token
from streamrnn.beam.job import launcher

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def events(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("events") / "events.jsonl"
    path.write_text(json.dumps({"key": "a", "ts": 1.0, "seq": 0, "text": "hi"}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def bars(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("bars") / "AAA_data.csv"
    path.write_text("Date,Open,High,Low,Close,Volume,Name\n2016-01-04,10.0,10.5,9.5,10.2,1000,AAA\n"
                    "2016-01-05,10.2,10.6,9.9,10.4,1200,AAA\n")
    return str(path)


def _one_line(capsys, rc: int, job: str, *words: str) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert rc == 2, (rc, err)
    assert len(err) == 1 and err[0].startswith(f"{job}: "), err
    assert all(w in err[0] for w in words), err
    return err[0]


NEXT_TOKEN = [
    (["--replay", "--step", "0"], "--step: expected a number > 0.0, got '0'"),
    (["--replay", "--step", "-5"], "--step: expected a number > 0.0, got '-5'"),
    (["--topk", "0"], "--topk: expected an int >= 1, got '0'"),
    (["--topk", "300"], "--topk: expected an int in 1..256 (the model's vocabulary size), got 300"),
    (["--speedup", "-1"], "--speedup: expected a number >= 0.0, got '-1'"),
    (["--speedup", "nan"], "--speedup: expected a finite number, got 'nan'"),
    (["--speedup", "inf"], "--speedup: expected a finite number, got 'inf'"),
    (["--window", "0"], "--window: expected a number >= 0.001 and < 1e+08, got '0'"),
    (["--window", "1e11"], "--window: expected a number >= 0.001 and < 1e+08, got '1e11'"),
    (["--window=-inf"], "--window: expected a finite number, got '-inf'"),
    (["--allowed-lateness", "-100"], "--allowed-lateness: expected a number >= 0.0, got '-100'"),
    (["--ttl", "-1"], "--ttl: expected a number >= 0.0"),
    (["--shards", "0"], "--shards: expected an int >= 1, got '0'"),
    (["--shards", "two"], "--shards: expected an int, got 'two'"),
    (["--log-every", "nan"], "--log-every: expected a finite number"),
    (["--metrics-linger", "-1"], "--metrics-linger: expected a number >= 0.0"),
    (["--model", "shipped:market"], "--model: expected a language model (task 'lm'), got task 'forecast' in "
                                    "'shipped:market'"),
    (["--runner=NoSuchRunner"], "--runner: expected one of "),
    (["--replay", "--runner=PortableRunner"], "--replay: expected the DirectRunner (a replay needs its TestStream "
                                              "support), got --runner=PortableRunner"),
    (["--demo", "--runner=PortableRunner"], "--demo: expected the DirectRunner"),
    (["--windw", "5"], "unrecognized arguments: --windw 5 (did you mean --window?)"),
    (["--windw=5"], "unrecognized arguments: --windw=5"),
    (["stray"], "unrecognized arguments: stray"),
    (["--direct_num_workers", "two"], "--direct_num_workers: invalid int value: 'two'"),
    *[  # the heal tuning flags (streamrnn.cli.args.add_health_args), as market_forecast's below
        (["--health", "heal", "--health-reset-window", "0"], "--health-reset-window: expected an int >= 1, got '0'"),
        (["--health", "heal", "--health-reset-window", "2.5"], "--health-reset-window: expected an int, got '2.5'"),
        (["--health", "heal", "--health-stay-margin", "nan"], "--health-stay-margin: expected a finite number, "
                                                              "got 'nan'"),
        (["--health", "heal", "--health-stay-margin", "x"], "--health-stay-margin: expected a number, got 'x'"),
        (["--health", "heal", "--health-max-watch", "0"], "--health-max-watch: expected an int >= 1, got '0'"),
        (["--health-max-watch", "4"], "--health-max-watch: expected --health heal (it tunes heal), got no --health "
                                      "(the default policy)"),
        (["--health", "flag", "--health-stay-margin", "0.1"], "--health-stay-margin: expected --health heal (it tunes "
                                                              "heal), got --health flag"),
        (["--health", "maybe"], "--health: invalid choice: 'maybe'"),
    ],
]


@pytest.mark.parametrize("extra, message", NEXT_TOKEN, ids=[" ".join(c[0]) for c in NEXT_TOKEN])
def test_next_token_refuses_at_launch(events, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    rc = next_token.main(["--input", events, "--output", str(out), "--model", "shipped:charlm", "--quiet",
                          "--metrics-port", "0", "--providers", "cpu", *extra])
    line = _one_line(capsys, rc, "next_token", message)
    assert "Traceback" not in line
    assert not out.exists()  # nothing written: no pipeline ran


def test_no_input_is_one_line_too(tmp_path, capsys):
    rc = next_token.main(["--output", str(tmp_path / "out")])
    _one_line(capsys, rc, "next_token", "--input: expected an events file (or --demo), got neither")


def _plot_dir(tmp_path: pathlib.Path) -> str:
    (tmp_path / "dir.png").mkdir()
    return str(tmp_path / "dir.png")


def _plot_under_file(tmp_path: pathlib.Path) -> str:
    (tmp_path / "a-file").write_text("x")
    return str(tmp_path / "a-file" / "sub" / "f.png")


MARKET = [
    (["--window", "inf"], "--window: expected a finite number, got 'inf'"),
    (["--window", "0"], "--window: expected a number >= 0.001"),
    (["--window", "1e11"], "--window: expected a number >= 0.001 and < 1e+08, got '1e11'"),
    (["--allowed-lateness", "-100"], "--allowed-lateness: expected a number >= 0.0, got '-100'"),
    (["--step", "-1"], "--step: expected a number >= 0.0"),
    (["--ttl", "nan"], "--ttl: expected a finite number"),
    (["--shards", "-3"], "--shards: expected an int >= 1"),
    (["--model", "shipped:charlm"], "--model: expected a forecast model (task 'forecast'), got task 'lm' in "
                                    "'shipped:charlm'"),
    (["--replay", "--runner=PortableRunner"], "--replay: expected the DirectRunner"),
    (["--runner=NoSuchRunner"], "--runner: expected one of "),
    (["--windw", "5"], "unrecognized arguments: --windw 5"),
    ([_plot_dir], "--plot: expected a file path, got the directory"),
    ([_plot_under_file], "--plot: expected a writable file path"),
    (["--plot", "/proc/streamrnn-no-such-dir/f.png"], "--plot: expected a writable file path"),
    (["--plot", "gs://bucket/f.png"], "--plot: expected a local file path"),
    (["--health", "heal", "--health-reset-window", "-1"], "--health-reset-window: expected an int >= 1, got '-1'"),
    (["--health", "off", "--health-reset-window", "8"], "--health-reset-window: expected --health heal (it tunes "
                                                        "heal), got --health off"),
    (["--health", "heal", "--health-stay-margin=-inf"], "--health-stay-margin: expected a finite number"),
]


@pytest.mark.parametrize("extra, message", MARKET,
                         ids=[" ".join(x if isinstance(x, str) else x.__name__ for x in c[0]) for c in MARKET])
def test_market_forecast_refuses_at_launch(bars, tmp_path, capsys, extra, message):
    if extra and callable(extra[0]):
        pytest.importorskip("matplotlib", reason="--plot checks the path after matplotlib")
        extra = ["--plot", extra[0](tmp_path)]
    if "--plot" in extra:
        pytest.importorskip("matplotlib", reason="--plot checks the path after matplotlib")
    if "/proc/" in " ".join(extra) and not os.path.isdir("/proc"):
        pytest.skip("needs /proc, a folder no file can be made in")
    out = tmp_path / "out"
    rc = market_forecast.main(["--input", bars, "--output", str(out), "--quiet", "--metrics-port", "0", *extra])
    _one_line(capsys, rc, "market_forecast", message)
    assert not out.exists()
    if "--plot" in extra:
        assert not os.path.isfile(extra[extra.index("--plot") + 1])


@pytest.mark.parametrize("flags", [
    ["--runner=DirectRunner", "--direct_num_workers", "2", "--direct_running_mode", "multi_processing",
     "--streaming"],
    ["--direct_num_workers=1", "--default_sdk_harness_log_level=WARNING"],
    ["--runner=PortableRunner", "--job_endpoint=embed", "--environment_type=LOOPBACK", "--sdk_location",
     "container"],
    ["--runner", "FlinkRunner", "--flink_master", "localhost:8081", "--environment_type", "DOCKER"],
    ["--runner=direct", "--experiments=a", "--experiments", "b", "--save_main_session"],
])
def test_beam_flags_pass_through(flags):
    """Flags of Beam's registered options (and of the runner named) go to Beam unchanged."""
    assert launcher.beam_flags(argparse.ArgumentParser(), flags) == flags


@pytest.mark.parametrize("runner", ["DirectRunner", "BundleBasedDirectRunner", "direct"])
def test_replay_on_the_direct_runner(runner):
    assert launcher.beam_flags(argparse.ArgumentParser(), [f"--runner={runner}"], replay="--replay")


def test_existing_plot_file_is_kept(tmp_path):
    png = tmp_path / "f.png"
    png.write_bytes(b"old")
    launcher.require_writable_file("--plot", str(png))
    launcher.require_writable_file("--plot", str(tmp_path / "new" / "deeper" / "f.png"))
    assert png.read_bytes() == b"old" and not (tmp_path / "new").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["f.png"]  # no probe file left behind


def test_unknown_flag_as_users_run_it(events, tmp_path):
    """python -m beam_jobs.next_token --windw 5: one line, exit 2, not Beam's warning and a run with the default."""
    r = subprocess.run([sys.executable, "-m", "beam_jobs.next_token", "--input", events, "--output",
                        str(tmp_path / "out"), "--windw", "5"], capture_output=True, text=True, timeout=120,
                       cwd=str(ROOT))
    assert (r.returncode, r.stderr) == (2, "next_token: unrecognized arguments: --windw 5 (did you mean --window?)\n")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("root", "want"), [("out", "out/x"), ("out/", "out/x"), ("out//", "out/x"),
                                            ("gs://b/o/", "gs://b/o/x"), ("/", "/x")])
def test_output_paths_have_one_separator(root, want):
    """The jobs' 'wrote out//predictions-*.parquet' (issue 16): one separator, however --output ends."""
    from streamrnn.beam.job.launcher import join

    assert join(root, "x") == want


def test_a_summary_of_one_key_says_1_key():
    import io

    from streamrnn.beam.job.summary import MeanMetric, print_summary

    out = io.StringIO()
    summary = {"keys": {"a": {"bytes": 2, "scored": 1, "bits_per_char": 3.0}}, "events": 2, "bits_per_char": 3.0,
               "dead_letters": {"late": 1}, "dead_letter_rows": {"late": 1}}
    metric = MeanMetric("bits_per_char", "logprob_next", scale=-1.0, count_name="bytes")
    print_summary(summary, metric, title="loss", unit="bits/char", out=out)
    text = out.getvalue()
    assert "loss, 1 key\n" in text and "dead letters: 1 row (late 1 row)" in text and "1 keys" not in text


@pytest.mark.parametrize("job, model, default", [(next_token, "shipped:charlm", "flag"),
                                                  (market_forecast, "shipped:market", "off")])
def test_health_flags_reach_the_transform(job, model, default, events, bars, tmp_path):
    """The health flags as the transform takes them: no --health is the model's default policy (charlm has a
    reference loss: flag; a forecaster: off), and the heal tuning flags make the HealthConfig the shards run."""
    from streamrnn.keyed.health import HealthConfig

    base = ["--input", events if job is next_token else bars, "--output", str(tmp_path / "out"), "--model", model,
            "--providers", "cpu", "--quiet"]
    args, _ = job._parse(base)
    assert args.health is None and args.health_arg is None

    def inference(a):
        got = job._inference(a)
        return got[0] if isinstance(got, tuple) else got

    assert inference(args).health == default and args.health == default  # what the job's schema follows
    args, _ = job._parse([*base, "--health", "heal", "--health-reset-window", "8", "--health-stay-margin", "-0.5",
                          "--health-max-watch", "3"])
    want = HealthConfig("heal", reset_window=8, stay_margin=-0.5, max_watch=3)
    assert args.health_arg == want and inference(args).health == want and args.health == "heal"
    args, _ = job._parse([*base, "--health", "flag"])
    assert args.health_arg == "flag" and inference(args).health == "flag"
    assert not (tmp_path / "out").exists()
