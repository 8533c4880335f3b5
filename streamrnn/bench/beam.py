"""``streamrnn bench beam``: the Beam transform against Beam's stateless answer and two ceilings.

Same events in every variant (K keys x E byte events, DirectRunner batch, a 2-layer
H=256 LSTM LM with random weights unless ``--model``):

* ``a``: :class:`~streamrnn.beam.StatefulInference` (state carried, batched across keys);
* ``b``: RunInference with ``OnnxModelHandlerNumpy`` over each key's last W=64 events,
  recomputed from zero state for every event (stateless sliding windows), plus its
  prediction quality against (a) on the same events;
* ``c``: the (a) pipeline with the model call replaced by identity (framework ceiling);
* ``d``: pure batched ONNX Runtime over the same events (compute ceiling).

Each variant runs in its own subprocess (so peak RSS is its own); times are medians
over ``--repeats``. JSON goes to stdout with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

VARIANTS = ("a", "b", "c", "d")


def _events(keys: int, per_key: int, seed: int = 0):
    """Byte events of ``keys`` streams of text-like bytes, interleaved, as (key list, ts, seq, tokens)."""
    from ..beam.io import _DEMO_TEXT

    corpus = np.frombuffer(_DEMO_TEXT.encode() * (1 + per_key * keys // len(_DEMO_TEXT)), np.uint8)
    rng = np.random.default_rng(seed)
    tok = np.empty((keys, per_key), np.int64)
    for k in range(keys):
        s = int(rng.integers(0, len(corpus) - per_key))
        tok[k] = corpus[s:s + per_key]
    ts = 1_000.0 + np.arange(per_key)[None, :] * 1.0 + rng.uniform(0, 0.5, (keys, 1))
    return tok, ts


def _write_events(tok, ts, path: str) -> str:
    """The events as a Parquet file (``key, ts, seq, token``), arrival in event-time order, keys interleaved.

    Pipelines read it with :class:`~streamrnn.beam.io.ReadEvents`, as a job does: embedding
    the events in the pipeline with ``beam.Create`` would measure pickling and compressing
    the data into the pipeline graph instead (most of the wall time at 200k events).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    K, E = tok.shape
    keys = np.repeat(np.array([f"key-{k:05d}" for k in range(K)], dtype=object)[None, :], E, axis=0).T
    order = np.argsort(ts.reshape(-1), kind="stable")
    pq.write_table(pa.table({"key": pa.array(keys.reshape(-1)[order].tolist(), pa.string()),
                             "ts": ts.reshape(-1)[order], "seq": np.tile(np.arange(E), K)[order],
                             "token": tok.reshape(-1)[order]}), path)
    return path


class _Sink:
    """Collects results across the pickling boundary: one .npy file per element, read back after the run."""

    def __init__(self, root: str):
        self.root = root
        os.makedirs(root, exist_ok=True)

    def __call__(self, item):
        import pickle
        import uuid

        with open(os.path.join(self.root, uuid.uuid4().hex), "wb") as f:
            pickle.dump(item, f)

    def read(self) -> list:
        import pickle

        out = []
        for name in os.listdir(self.root):
            with open(os.path.join(self.root, name), "rb") as f:
                out.append(pickle.load(f))
        return out


class _IdentityModel:
    """Stands in for :class:`~streamrnn.model.Model`: task outputs are zeros, state passes through."""

    def __init__(self, model):
        self.__dict__.update(model.__dict__)
        self._real = model
        self.spec = model.spec

    def __getattr__(self, name):
        return getattr(self._real, name)

    def run_unchecked(self, x, lengths, state):
        B, T = x.shape[:2]
        return {"logprobs": np.zeros((B, T, 256), np.float32)}, state


def _run_a(model_path, events_path, shards, identity=False):
    import apache_beam as beam

    from ..beam import NextTokenPostprocess, StatefulInference
    from ..beam import transform as tr
    from ..beam.io import ReadEvents

    sink = _Sink(tempfile.mkdtemp(prefix="bench-a-"))
    if identity:
        real = tr.load
        tr.load = lambda path, providers="auto": _IdentityModel(real(path, providers=providers))
    try:
        t0 = time.perf_counter()
        with beam.Pipeline() as p:
            blocks, _unread = p | ReadEvents(events_path, block_rows=8192)
            out, _ = blocks | StatefulInference(
                model=model_path, num_shards=shards, window_size=60.0, postprocess=NextTokenPostprocess(5),
                output="arrow", providers=["CPUExecutionProvider"])
            out | beam.Map(lambda b: (b.column("key").to_pylist(), b.column("seq").to_numpy(),
                                      b.column("logprob").to_numpy())) | beam.Map(sink)
        dt = time.perf_counter() - t0
    finally:
        if identity:
            tr.load = real
    got = sink.read()
    shutil.rmtree(sink.root, ignore_errors=True)
    return dt, got


def _run_b(model_path, tok, ts, W=64):
    import apache_beam as beam
    from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
    from apache_beam.ml.inference.onnx_inference import OnnxModelHandlerNumpy

    K, E = tok.shape

    def infer(session, batch, inference_args=None):
        """Windows are ragged (a key's first events): right-pad, use lengths, zero state."""
        B = len(batch)
        L = max(len(w) for w in batch)
        x = np.zeros((B, L), np.int64)
        lengths = np.zeros(B, np.int32)
        for i, w in enumerate(batch):
            x[i, :len(w)] = w
            lengths[i] = len(w)
        feeds = {"x": x, "lengths": lengths}
        for inp in session.get_inputs():
            if inp.name not in feeds:
                layers, hidden = inp.shape[0], inp.shape[2]
                feeds[inp.name] = np.zeros((layers, B, hidden), np.float32)
        lp = session.run(["logprobs"], feeds)[0]
        return lp[np.arange(B), lengths - 1]

    def windows(k):
        for i in range(E):
            yield (k, i), tok[k, max(0, i - W + 1):i + 1]

    sink = _Sink(tempfile.mkdtemp(prefix="bench-b-"))
    handler = KeyedModelHandler(OnnxModelHandlerNumpy(model_path, providers=["CPUExecutionProvider"],
                                                      inference_fn=infer, max_batch_size=256))
    t0 = time.perf_counter()
    with beam.Pipeline() as p:
        res = (p | beam.Create(list(range(K)), reshuffle=False) | "Windows" >> beam.FlatMap(windows)
               | "RunInference" >> RunInference(handler))
        res | beam.Map(lambda kv: (kv[0], kv[1].inference)) | beam.BatchElements(min_batch_size=512) | beam.Map(sink)
    dt = time.perf_counter() - t0
    got = dict(kv for batch in sink.read() for kv in batch)
    shutil.rmtree(sink.root, ignore_errors=True)
    return dt, got


def _run_d(model_path, tok):
    from ..model import load

    m = load(model_path, providers=["CPUExecutionProvider"])
    K, E = tok.shape
    t0 = time.perf_counter()
    state = m.initial_state(K)
    lengths = None
    for s in range(0, E, 256):
        x = tok[:, s:s + 256]
        lengths = np.full(K, x.shape[1], np.int32)
        _, state = m.run_unchecked(x, lengths, state)
    return time.perf_counter() - t0


def _one(args) -> dict:
    """Run one variant ``repeats`` times in this process; a JSON-able result."""
    tok, ts = _events(args.keys, args.events)
    n = tok.size
    times, extra = [], {}
    events_path = _write_events(tok, ts, os.path.join(tempfile.mkdtemp(prefix="bench-events-"), "events.parquet"))
    for r in range(args.repeats if args.variant != "b" else args.repeats_b):
        if args.variant == "a" or args.variant == "c":
            dt, got = _run_a(args.model, events_path, args.shards, identity=args.variant == "c")
            if args.variant == "a" and r == 0 and args.quality_out:
                lp = np.full(tok.shape, np.nan)
                for keys, seq, logprob in got:
                    kidx = np.array([int(k.split("-")[1]) for k in keys])
                    lp[kidx, seq] = logprob
                np.save(args.quality_out, lp)
        elif args.variant == "b":
            dt, got = _run_b(args.model, tok, ts)
            if r == 0 and args.quality_out:
                lp = np.full(tok.shape, np.nan)
                for (k, i), row in got.items():  # logprob the window model gave to the next byte
                    if i + 1 < tok.shape[1]:
                        lp[k, i + 1] = row[tok[k, i + 1]]
                np.save(args.quality_out, lp)
        else:
            dt = _run_d(args.model, tok)
        times.append(dt)
    med = statistics.median(times)
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"variant": args.variant, "events": n, "seconds_median": med, "seconds_all": times,
            "events_per_s": n / med, "peak_rss_mb": rss_kb / 1024, **extra}


def _make_model(path: str, hidden: int, layers: int) -> None:
    try:
        import torch

        from ..train.export import export
        from ..train.nets import NetConfig, RecurrentNet
    except ImportError as e:  # pragma: no cover
        raise SystemExit(f"streamrnn bench beam: needs the 'train' extra (torch) to build the bench model: {e}") from e
    torch.manual_seed(0)
    export(RecurrentNet(NetConfig(hidden=hidden, layers=layers)), path, name=f"bench-lm-{layers}x{hidden}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="streamrnn bench beam", description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=100, help="keys (default %(default)s; the issue's full size: 1000)")
    ap.add_argument("--events", type=int, default=100, help="events per key (default %(default)s; full: 200)")
    ap.add_argument("--shards", type=int, default=4, help="state shards of (a)/(c) (default %(default)s)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of a, c, d (median) (default %(default)s)")
    ap.add_argument("--repeats-b", type=int, default=1, help="runs of b, the slow one (default %(default)s)")
    ap.add_argument("--model", default=None, help="LM to use (default: a random-weight 2x256 LSTM LM)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--variants", default="abcd", help="subset to run (default %(default)s)")
    ap.add_argument("--json", action="store_true", help="print the JSON result to stdout")
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--quality-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.variant:
        print(json.dumps(_one(args)))
        return 0
    tmp = tempfile.mkdtemp(prefix="streamrnn-bench-beam-")
    try:
        model = args.model
        if model is None:
            model = os.path.join(tmp, "bench.onnx")
            _make_model(model, args.hidden, args.layers)
        results = {}
        for v in args.variants:
            if v not in VARIANTS:
                ap.error(f"--variants: expected letters from {VARIANTS}, got {v!r}")
            cmd = [sys.executable, "-m", "streamrnn.bench.beam", "--variant", v, "--model", model,
                   "--keys", str(args.keys), "--events", str(args.events), "--shards", str(args.shards),
                   "--repeats", str(args.repeats), "--repeats-b", str(args.repeats_b)]
            if v in "ab":
                cmd += ["--quality-out", os.path.join(tmp, f"lp_{v}.npy")]
            print(f"streamrnn bench beam: running ({v}) ...", file=sys.stderr)
            r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            if r.returncode != 0:
                print(r.stderr[-4000:], file=sys.stderr)
                return r.returncode
            results[v] = json.loads(r.stdout.strip().splitlines()[-1])
        out: dict = {"config": {"keys": args.keys, "events_per_key": args.events, "shards": args.shards,
                                "model": args.model or f"random {args.layers}x{args.hidden} LSTM LM",
                                "runner": "DirectRunner (batch)", "window_b": 64, "repeats": args.repeats,
                                "cpus": os.cpu_count()},
                     "variants": results}
        eps = {v: r["events_per_s"] for v, r in results.items()}
        ratios = {}
        if "a" in eps and "b" in eps:
            ratios["a_over_b"] = eps["a"] / eps["b"]
        if "a" in eps and "c" in eps and "d" in eps:
            ratios["a_over_min_c_d"] = eps["a"] / min(eps["c"], eps["d"])
        out["ratios"] = ratios
        qa, qb = os.path.join(tmp, "lp_a.npy"), os.path.join(tmp, "lp_b.npy")
        if os.path.exists(qa) and os.path.exists(qb):
            a, b = np.load(qa), np.load(qb)
            m = ~np.isnan(a) & ~np.isnan(b)
            ln2 = np.log(2.0)
            out["quality_b_vs_a"] = {
                "bits_per_char_a": float(-a[m].mean() / ln2), "bits_per_char_b": float(-b[m].mean() / ln2),
                "mean_abs_logprob_diff": float(np.abs(a[m] - b[m]).mean()),
                "events_beyond_window": int(m[:, 64:].sum()),
                "mean_abs_logprob_diff_beyond_window": float(np.abs(a[:, 64:][m[:, 64:]] - b[:, 64:][m[:, 64:]]).mean())
                if m[:, 64:].any() else None,
            }
        text = json.dumps(out, indent=2)
        if args.json:
            print(text)
        else:
            for v, r in results.items():
                print(f"({v}) {r['events_per_s']:>12,.0f} events/s  median {r['seconds_median']:.3f} s  "
                      f"peak RSS {r['peak_rss_mb']:.0f} MB")
            for k, v in ratios.items():
                print(f"{k}: {v:.2f}")
            if "quality_b_vs_a" in out:
                print(json.dumps(out["quality_b_vs_a"]))
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
