"""The next_token job end to end (batch and replay), against an offline run of the model per key."""

from __future__ import annotations

import gc
import io
import json
import math
import pathlib
import pickle
import subprocess
import sys

import background
import beam_memfs
import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
import test_beam_transform as tbt

from beam_jobs import next_token
from streamrnn import lm
from streamrnn.beam.job.io import read_events
from streamrnn.model.loaded import load
from streamrnn.model.runtime import CPU

beam_models = tbt.beam_models

ROWS = [
    {"key": "u1", "ts": 100.0, "seq": 0, "text": "Hello, "},
    {"key": "u2", "ts": 101.0, "seq": 0, "text": "héllo"},          # multi-byte UTF-8
    {"key": "u1", "ts": 190.0, "seq": 1, "text": "world!"},          # next window
    {"key": "u1", "ts": 150.0, "seq": 2, "text": " big"},            # arrives out of order
    {"key": "u1", "ts": 100.0, "seq": 0, "text": "Hello, "},         # duplicate row
    {"key": "u3", "ts": "1970-01-01T00:01:45Z", "seq": 0, "text": "ISO time"},
    {"key": "u2", "ts": "yesterday", "seq": 1, "text": "bad"},       # unreadable ts
    {"key": "u3", "ts": 1_700_000_000_000, "seq": 1, "text": "ms"},  # epoch milliseconds
]
BAD_TS = ("yesterday", 1_700_000_000_000)


def _reference(model, rows):
    """Per key: bytes in (ts, seq) order run once from the initial state; logprob_next per byte."""
    want = {}
    ok = [r for r in rows if r["ts"] not in BAD_TS]
    seen = set()
    by_key: dict = {}
    for r in ok:
        if (r["key"], r["seq"]) in seen:
            continue
        seen.add((r["key"], r["seq"]))
        ts = 105.0 if isinstance(r["ts"], str) else r["ts"]
        by_key.setdefault(r["key"], []).append((ts, r["seq"], r["text"]))
    for k, parts in by_key.items():
        parts.sort()
        data = b"".join(p[2].encode() for p in parts)
        toks = lm.encode(data)
        out, _ = model.step(toks[None])
        lp = out["logprobs"][0]
        for pos in range(len(toks)):
            want[(k, pos)] = (float(lp[pos, toks[pos + 1]]) if pos + 1 < len(toks) else None, lp[pos])
    return want


FORMATS = [("jsonl", True), ("csv", False), ("parquet", False), ("arrow", True)]
T0S = (1_700_000_000.1234, 12.3456)
TTL_ROWS = [{"key": "t", "ts": 100.0, "seq": 0, "text": "abc"}, {"key": "t", "ts": 3000.0, "seq": 1, "text": "de"}]


def _write_rows(path: pathlib.Path, fmt: str) -> None:
    """ROWS as an events file of this format."""
    if fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
        return
    t = pa.Table.from_pylist([{**r, "ts": str(r["ts"])} for r in ROWS])
    if fmt == "arrow":
        with pa.ipc.new_file(str(path), t.schema) as w:
            w.write_table(t, max_chunksize=3)
    else:
        (pq.write_table if fmt == "parquet" else pcsv.write_csv)(t, str(path))


def _sub_ms_rows(t0: float) -> list[dict]:
    return [{"key": "a", "ts": t0, "seq": 0, "text": "hi"}, {"key": "b", "ts": t0 + 0.0007, "seq": 0, "text": "yo"},
            {"key": "a", "ts": t0 + 45.0001, "seq": 1, "text": "!"}]


@background.job("next_token runs of test_beam_job", file=__file__)
def _job_runs(folder: pathlib.Path) -> dict:
    """The job runs of the format, TTL and replay-start tests below (the tiny model exported first), one after
    another in a process of their own (tests/run_jobs.py), beside the other tests (tests/background.py)."""
    model = str(folder / "tiny.onnx")
    runs: dict = {"model": ("conftest:export_tiny_lm", [model])}
    outs: dict = {}
    for fmt, replay in FORMATS:
        path = folder / f"events.{fmt}"
        _write_rows(path, fmt)
        outs[fmt] = folder / f"out-{fmt}"
        argv = ["--input", str(path), "--output", str(outs[fmt]), "--model", model, "--window", "60",
                "--providers", "cpu", "--quiet", "--shards", "2"]
        runs[fmt] = ("beam_jobs.next_token", [*argv, "--replay", "--step", "40"] if replay else argv)
    # TTL: idle 2900 s, past the TTL (1000 s), within the dedupe horizon (1 h) that remembers the ended stream
    (folder / "ttl.jsonl").write_text("\n".join(json.dumps(r) for r in TTL_ROWS) + "\n")
    outs["ttl"] = folder / "out-ttl"
    runs["ttl"] = ("beam_jobs.next_token", ["--input", str(folder / "ttl.jsonl"), "--output", str(outs["ttl"]),
                                            "--model", model, "--replay", "--ttl", "1000", "--providers", "cpu",
                                            "--quiet", "--shards", "1"])
    for t0 in T0S:
        path = folder / f"sub-ms-{t0}.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in _sub_ms_rows(t0)) + "\n")
        outs[t0] = folder / f"out-sub-ms-{t0}"
        runs[t0] = ("beam_jobs.next_token", ["--input", str(path), "--output", str(outs[t0]), "--model", model,
                                             "--replay", "--providers", "cpu", "--quiet", "--shards", "2", "--step",
                                             "10"])
    for case in MEMFS_CASES:  # on the memfs:// scheme, in the job process (memfs_job)
        outs[case] = folder / f"memfs-{case}.pickle"
        runs[case] = ("test_beam_job:memfs_job", [case, model, str(outs[case]), str(folder / f"{case}.jsonl")])
    ran = background.run_jobs(folder, runs)
    return {"model": model, "runs": {name: {**r, "out": outs.get(name)} for name, r in ran.items()}}


def _ran(name) -> tuple[dict, str]:
    """(the background run ``name``, which succeeded, with its output folder as "out"; the model it ran)."""
    got = background.result("next_token runs of test_beam_job")
    for n in ("model", name):
        assert got["runs"][n]["rc"] == 0, got["runs"][n]["stderr"][-3000:]
    return got["runs"][name], got["model"]


@pytest.mark.parametrize("fmt,replay", FORMATS)
def test_next_token_job(fmt, replay):
    r, model = _ran(fmt)
    out = r["out"]
    pred = pa.concat_tables([pq.read_table(str(f)) for f in sorted(out.glob("predictions-*.parquet"))]).to_pylist()
    want = _reference(load(model, providers=[CPU]), ROWS)
    _assert_offline(pred, want)
    dead = pa.concat_tables([pq.read_table(str(f)) for f in out.glob("dead_letters-*.parquet")]).to_pylist()
    kinds = sorted((d["kind"], d["reason"].split(":")[0]) for d in dead)
    assert kinds == [("duplicate", "duplicate")] * len("Hello, ") + [("invalid", "ts")] * 2
    assert sorted(str(json.loads(d["event"])["ts"]) for d in dead if d["kind"] == "invalid") == sorted(
        str(t) for t in BAD_TS)  # the rows as they were
    summary = json.loads((out / "summary.json").read_text())
    u1 = [v[0] for (k, _), v in want.items() if k == "u1" and v[0] is not None]
    assert math.isclose(summary["keys"]["u1"]["bits_per_char"], -np.mean(u1) / math.log(2), rel_tol=1e-5)
    every = [v[0] for v in want.values() if v[0] is not None]
    assert math.isclose(summary["bits_per_char"], -np.mean(every) / math.log(2), rel_tol=1e-5)
    assert summary["events"] == len(want) and summary["keys"]["u2"]["bytes"] == len("héllo".encode())
    assert summary["dead_letters"] == {"duplicate": len("Hello, "), "invalid": 2}  # events (a text row's bytes)
    assert summary["dead_letter_rows"] == {"duplicate": 1, "invalid": 2}  # input rows
    assert [v.split("+")[0] for v in summary["model_version"]] == ["tiny-1.0.0"]
    printed = r["stdout"]
    assert "bits/char" in printed
    assert f"dead letters: 3 rows (duplicate 1 row, {len('Hello, ')} bytes; invalid 2 rows)" in printed


def _assert_offline(pred: list[dict], want: dict) -> None:
    """Every prediction row equals the offline per-key run, and every byte came out exactly once."""
    assert len(pred) == len(want)
    assert len({(r["key"], r["pos"]) for r in pred}) == len(pred)
    for r in pred:
        nxt, lp = want[(r["key"], r["pos"])]
        if nxt is None:
            assert r["logprob_next"] is None
        else:
            assert abs(r["logprob_next"] - nxt) <= 1e-5
        if r["pos"] == 0:  # the streaming-native score of this byte: none for a key's first byte
            assert r["logprob"] is None and r["fresh"] and r["reset"] == "new"
        else:
            assert abs(r["logprob"] - float(want[(r["key"], r["pos"] - 1)][1][_byte(r)])) <= 1e-5
        top = np.argsort(-lp, kind="stable")[:5]
        assert r["topk_tokens"][0] == top[0]
        np.testing.assert_allclose(r["topk_probs"], np.exp(lp[r["topk_tokens"]]), atol=1e-5)
        assert r["model_version"].startswith("tiny-1.0.0+")


def test_next_token_job_ttl_ends_a_stream():
    """Replay with --ttl: a key idle past the TTL ends its stream (null logprob_next), then restarts fresh."""
    r, model_path = _ran("ttl")
    out = r["out"]
    pred = sorted(pa.concat_tables([pq.read_table(str(f)) for f in out.glob("predictions-*.parquet")]).to_pylist(),
                  key=lambda r: (r["ts"], r["offset"]))
    model = load(model_path, providers=[CPU])
    want = []
    for text in ("abc", "de"):
        toks = lm.encode(text.encode())
        lp = model.step(toks[None])[0]["logprobs"][0]
        want += [float(lp[i, toks[i + 1]]) if i + 1 < len(toks) else None for i in range(len(toks))]
    assert [r["pos"] for r in pred] == [0, 1, 2, 0, 1]
    assert [r["reset"] for r in pred if r["fresh"]] == ["new", "expired"]
    for r, w in zip(pred, want, strict=True):
        assert (r["logprob_next"] is None) == (w is None)
        if w is not None:
            assert abs(r["logprob_next"] - w) <= 1e-5
    summary = json.loads((out / "summary.json").read_text())
    assert summary["keys"]["t"]["bytes"] == 5 and summary["keys"]["t"]["scored"] == 3


@pytest.mark.parametrize("t0", T0S)
def test_replay_from_a_sub_millisecond_first_time(t0):
    """TestStream watermarks must be whole milliseconds: a replay starting at 12.3456 used to end in a traceback."""
    out = _ran(t0)[0]["out"]
    pred = pa.concat_tables([pq.read_table(str(f)) for f in out.glob("predictions-*.parquet")])
    assert sorted(zip(pred.column("key").to_pylist(), pred.column("pos").to_pylist(), strict=True)) == [
        ("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1)]


def _byte(r):
    """The byte of a prediction row (its text row's byte at ``offset``)."""
    by = {(row["key"], row["seq"]): row["text"].encode() for row in ROWS if row["ts"] not in BAD_TS}
    return by[(r["key"], r["seq"])][r["offset"]]


def test_read_events_reasons(tmp_path):
    p = tmp_path / "e.jsonl"
    p.write_text('{"key": "a", "ts": 1, "token": 300}\n{"key": "", "ts": 1, "token": 3}\n'
                 '{"key": "b", "ts": 2, "token": 4}\n')
    table, dead = read_events(p)
    assert table.num_rows == 1 and table.column("seq").to_pylist() == [2]  # seq defaults to the row position
    assert sorted(d.reason for d in dead) == ["key: expected a non-empty string, got ''",
                                              "token: expected an int in [0, 256), got 300"]


# ---- remote paths, user errors, retries ---------------------------------------------------------

MEMFS_CASES = ("memfs batch", "memfs replay", "memfs retried writes")


def memfs_job(argv: list[str]) -> int:
    """A job process's run on the memfs:// scheme (tests/run_jobs.py; the scheme is in-process):
    ``[case, model, dump, local events file]``. The case's input and model are put on memfs:// (the retried
    case: input and model local, data file writes failing half-way on their first 3 tries), the job runs, and
    memfs's files, the failed writes and the failures left are pickled to ``dump``. Returns the job's exit code."""
    case, model, dump, local = argv
    beam_memfs.reset()
    flags = ["--providers", "cpu", "--quiet", "--shards", "2"]
    faults = [None, 0]
    if case == "memfs retried writes":
        pathlib.Path(local).write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
        faults = beam_memfs.fail_writes(lambda p: p.startswith("memfs://out/") and (
            "/.temp-" in p or p.endswith(".parquet")), times=3)  # data files, temporary or final
        argv = ["--input", local, "--output", "memfs://out/run", "--model", model, *flags, "--replay", "--step", "40"]
    else:
        _put_rows(beam_memfs.FILES)
        beam_memfs.FILES["memfs://models/tiny.onnx"] = pathlib.Path(model).read_bytes()
        argv = ["--input", "memfs://in/events-*", "--output", "memfs://out/run", "--model", "memfs://models/tiny.onnx",
                *flags, *(["--replay", "--step", "40"] if case == "memfs replay" else [])]
    rc = next_token.main(argv)
    pathlib.Path(dump).write_bytes(pickle.dumps({"files": dict(beam_memfs.FILES), "faulted": list(beam_memfs.FAULTED),
                                                 "left": faults[1]}))
    return rc


def _memfs_run(case: str) -> tuple[dict, str]:
    """(what the memfs case left: its files, failed writes and failures left; the model it ran)."""
    r, model = _ran(case)
    return pickle.loads(r["out"].read_bytes()), model


def _memfs_table(files: dict, prefix: str) -> list[dict]:
    parts = [pq.read_table(io.BytesIO(b)) for p, b in sorted(files.items()) if p.startswith(prefix)]
    return pa.concat_tables(parts).to_pylist() if parts else []


def _put_rows(memfs: dict) -> None:
    """ROWS split over two files of a glob (JSONL and Parquet) on the memfs:// scheme."""
    half = len(ROWS) // 2
    memfs["memfs://in/events-0.jsonl"] = ("\n".join(json.dumps(r) for r in ROWS[:half]) + "\n").encode()
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([{**r, "ts": str(r["ts"])} for r in ROWS[half:]]), sink)
    memfs["memfs://in/events-1.parquet"] = sink.getvalue()


@pytest.mark.parametrize("case", MEMFS_CASES[:2])
def test_job_on_a_remote_filesystem(case):
    """Input (a glob), model and output all on a scheme that is not the local one."""
    got, model = _memfs_run(case)
    memfs = got["files"]
    want = _reference(load(model, providers=[CPU]), ROWS)
    _assert_offline(_memfs_table(memfs, "memfs://out/run/predictions-"), want)
    dead = _memfs_table(memfs, "memfs://out/run/dead_letters-")
    assert sorted(d["kind"] for d in dead) == ["duplicate"] * len("Hello, ") + ["invalid"] * 2
    assert json.loads(memfs["memfs://out/run/summary.json"])["events"] == len(want)
    assert not [p for p in memfs if "/.temp-" in p or "/.write-check" in p]  # no temporary files left


def test_retried_writes_leave_one_copy_of_every_row():
    """Writes of data files fail half-way on their first tries; the DirectRunner (--streaming replay)
    retries the bundles; every row is in exactly one final file, and no partial file is ever under a
    final name. (The legacy batch runner cannot run the job; batch retries are tested on the sink in
    test_beam_sinks.py.)"""
    got, model = _memfs_run("memfs retried writes")
    memfs = got["files"]
    assert got["left"] == 0 and len(got["faulted"]) == 3  # the failures did happen
    assert not [f for f in got["faulted"] if "/.temp-" not in f]  # never under a final name
    _assert_offline(_memfs_table(memfs, "memfs://out/run/predictions-"), _reference(load(model, providers=[CPU]), ROWS))
    dead = _memfs_table(memfs, "memfs://out/run/dead_letters-")
    assert sorted(d["kind"] for d in dead) == ["duplicate"] * len("Hello, ") + ["invalid"] * 2
    assert not [p for p in memfs if "/.temp-" in p]  # the partial files of the failed tries are gone


def _one_line_error(capsys, rc: int, what: str) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1].startswith("next_token: ") and what in err[-1], err
    assert not any("Traceback" in line for line in err), err


@pytest.mark.parametrize("case", ["missing", "empty", "header only", "model", "shipped", "unwritable"])
def test_user_errors_exit_2_and_leave_no_output_folder(beam_models, tmp_path, capsys, case):
    path = tmp_path / ("events.csv" if case == "header only" else "events.jsonl")
    path.write_text({"missing": "", "empty": "", "header only": "key,ts,text\n"}.get(case, json.dumps(ROWS[0])))
    if case == "missing":
        path.unlink()
    out = tmp_path / "out"
    model = beam_models["tiny"]
    if case == "model":
        model = str(tmp_path / "no-model.onnx")
    if case == "shipped":
        model = "shipped:chartlm"
    if case == "unwritable":
        (tmp_path / "a-file").write_text("x")
        out = tmp_path / "a-file" / "out"
    gc.collect()  # what earlier tests' objects print when collected is theirs, not this job's
    capsys.readouterr()
    rc = next_token.main(["--input", str(path), "--output", str(out), "--model", model, "--providers", "cpu",
                          "--quiet", "--shards", "1"])
    what = {"missing": "got no such file", "empty": "got an empty file", "header only": "got none",
            "model": "model: expected a streamrnn LM", "unwritable": "output: expected a writable directory",
            "shipped": "model: expected one of shipped:charlm, shipped:market, got 'shipped:chartlm'"}[case]
    _one_line_error(capsys, rc, what)
    assert not out.exists()


def test_cli_error_is_one_line(tmp_path):
    """As users run it: python -m beam_jobs.next_token, a missing input: one line on stderr, exit code 2."""
    r = subprocess.run([sys.executable, "-m", "beam_jobs.next_token", "--input", str(tmp_path / "none.jsonl"),
                        "--output", str(tmp_path / "out")], capture_output=True, text=True, timeout=120,
                       cwd=str(pathlib.Path(__file__).resolve().parents[1]))
    assert r.returncode == 2
    lines = [x for x in r.stderr.splitlines() if x.startswith("next_token")]
    missing = str(tmp_path / "none.jsonl")
    assert lines == [f"next_token: input: expected an events file at {missing!r}, got no such file"]
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()
