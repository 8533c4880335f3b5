"""The next_token job end to end (batch and replay), against an offline run of the model per key."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
import test_beam_transform as tbt

from beam_jobs import next_token
from streamrnn import lm
from streamrnn.beam.io import read_events
from streamrnn.model import load
from streamrnn.runtime import CPU

beam_models = tbt.beam_models

ROWS = [
    {"key": "u1", "ts": 100.0, "seq": 0, "text": "Hello, "},
    {"key": "u2", "ts": 101.0, "seq": 0, "text": "héllo"},          # multi-byte UTF-8
    {"key": "u1", "ts": 190.0, "seq": 1, "text": "world!"},          # next window
    {"key": "u1", "ts": 150.0, "seq": 2, "text": " big"},            # arrives out of order
    {"key": "u1", "ts": 100.0, "seq": 0, "text": "Hello, "},         # duplicate row
    {"key": "u3", "ts": "1970-01-01T00:01:45Z", "seq": 0, "text": "ISO time"},
    {"key": "u2", "ts": "yesterday", "seq": 1, "text": "bad"},       # unreadable ts
]


def _reference(model, rows):
    """Per key: bytes in (ts, seq) order run once from the initial state; logprob_next per byte."""
    want = {}
    ok = [r for r in rows if r["ts"] != "yesterday"]
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


@pytest.mark.parametrize("fmt,replay", [("jsonl", True), ("csv", False), ("parquet", False)])
def test_next_token_job(beam_models, tmp_path, fmt, replay, capsys):
    path = tmp_path / f"events.{fmt}"
    if fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    else:
        t = pa.Table.from_pylist([{**r, "ts": str(r["ts"])} for r in ROWS])
        (pq.write_table if fmt == "parquet" else pcsv.write_csv)(t, str(path))
    out = tmp_path / "out"
    argv = ["--input", str(path), "--output", str(out), "--model", beam_models["tiny"], "--window", "60",
            "--providers", "cpu", "--quiet", "--shards", "2"]
    assert next_token.main([*argv, "--replay", "--step", "40"] if replay else argv) == 0
    pred = pa.concat_tables([pq.read_table(str(f)) for f in sorted(out.glob("predictions-*.parquet"))]).to_pylist()
    want = _reference(load(beam_models["tiny"], providers=[CPU]), ROWS)
    assert len(pred) == len(want)
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
    dead = pa.concat_tables([pq.read_table(str(f)) for f in out.glob("dead_letters-*.parquet")]).to_pylist()
    kinds = sorted((d["kind"], d["reason"].split(":")[0]) for d in dead)
    assert kinds == [("duplicate", "duplicate")] * len("Hello, ") + [("invalid", "ts")]
    assert json.loads(next(d for d in dead if d["kind"] == "invalid")["event"])["ts"] == "yesterday"
    assert len({(r["key"], r["pos"]) for r in pred}) == len(pred)  # each byte once
    summary = json.loads((out / "summary.json").read_text())
    u1 = [v[0] for (k, _), v in want.items() if k == "u1" and v[0] is not None]
    assert math.isclose(summary["keys"]["u1"]["bits_per_char"], -np.mean(u1) / math.log(2), rel_tol=1e-5)
    every = [v[0] for v in want.values() if v[0] is not None]
    assert math.isclose(summary["bits_per_char"], -np.mean(every) / math.log(2), rel_tol=1e-5)
    assert summary["events"] == len(want) and summary["keys"]["u2"]["bytes"] == len("héllo".encode())
    assert summary["dead_letters"] == {"duplicate": len("Hello, "), "invalid": 1}
    assert [v.split("+")[0] for v in summary["model_version"]] == ["tiny-1.0.0"]
    assert "bits/char" in capsys.readouterr().out


def test_next_token_job_ttl_ends_a_stream(beam_models, tmp_path):
    """Replay with --ttl: a key idle past the TTL ends its stream (null logprob_next), then restarts fresh."""
    path = tmp_path / "events.jsonl"
    rows = [{"key": "t", "ts": 100.0, "seq": 0, "text": "abc"}, {"key": "t", "ts": 5000.0, "seq": 1, "text": "de"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out"
    assert next_token.main(["--input", str(path), "--output", str(out), "--model", beam_models["tiny"], "--replay",
                            "--ttl", "1000", "--providers", "cpu", "--quiet", "--shards", "1"]) == 0
    pred = sorted(pa.concat_tables([pq.read_table(str(f)) for f in out.glob("predictions-*.parquet")]).to_pylist(),
                  key=lambda r: (r["ts"], r["offset"]))
    model = load(beam_models["tiny"], providers=[CPU])
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


def _byte(r):
    """The byte of a prediction row (its text row's byte at ``offset``)."""
    by = {(row["key"], row["seq"]): row["text"].encode() for row in ROWS if row["ts"] != "yesterday"}
    return by[(r["key"], r["seq"])][r["offset"]]


def test_read_events_reasons(tmp_path):
    p = tmp_path / "e.jsonl"
    p.write_text('{"key": "a", "ts": 1, "token": 300}\n{"key": "", "ts": 1, "token": 3}\n'
                 '{"key": "b", "ts": 2, "token": 4}\n')
    table, dead = read_events(p)
    assert table.num_rows == 1 and table.column("seq").to_pylist() == [2]  # seq defaults to the row position
    assert sorted(d.reason for d in dead) == ["key: expected a non-empty string, got ''",
                                              "token: expected an int in [0, 256), got 300"]
