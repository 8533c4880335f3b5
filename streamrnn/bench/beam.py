"""``streamrnn bench beam``: the Beam transform against Beam's stateless answer and two ceilings.

Same events in every variant (K keys x E byte events, DirectRunner batch, a 2-layer
H=256 LSTM LM with random weights unless ``--model``):

* ``a``: :class:`~streamrnn.beam.StatefulInference` (state carried, batched across keys);
* ``b``: RunInference with ``OnnxModelHandlerNumpy`` over each key's last W=64 events,
  recomputed from zero state for every event (stateless sliding windows), plus its
  prediction quality against (a) on the same events;
* ``c``: the (a) pipeline with the model call replaced by identity (framework ceiling);
* ``d``: pure batched ONNX Runtime over the same events (compute ceiling).

Two more sections (``--variants`` letters ``s`` and ``k``):

* ``s``: streaming. The same events replayed window by window with 30+ watermark steps
  through DirectRunner ``--streaming`` (TestStream): StatefulInference against a
  streaming identity pipeline with the same windows and shards, and against itself with
  no shard cache (every flush rebuilds from Beam state); then a replay with 1k vs 50k keys
  held by one shard, the same events per window (``beam_stream.py``);
* ``k``: key-count sweep of one shard's flush (1k, 10k, 100k keys held, the same events
  per flush), below Beam through the DoFn's own flush code, with the shipped charlm
  model: events/s and state bytes written per flush (``beam_sweep.py``).

Each variant runs in its own subprocess (so peak RSS is its own); times are medians
over ``--repeats``. JSON goes to stdout with ``--json``. ``--quick`` runs every
section at a toy size (a smoke test, not a measurement).
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

from .common import Sink, byte_events, code_state, make_model, run_stateful, write_byte_events

VARIANTS = ("a", "b", "c", "d", "s", "k")


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

    sink = Sink(tempfile.mkdtemp(prefix="bench-b-"))
    handler = KeyedModelHandler(OnnxModelHandlerNumpy(model_path, providers=["CPUExecutionProvider"],
                                                      inference_fn=infer, max_batch_size=256))
    t0, c0 = time.perf_counter(), time.process_time()
    with beam.Pipeline() as p:
        res = (p | beam.Create(list(range(K)), reshuffle=False) | "Windows" >> beam.FlatMap(windows)
               | "RunInference" >> RunInference(handler))
        res | beam.Map(lambda kv: (kv[0], kv[1].inference)) | beam.BatchElements(min_batch_size=512) | beam.Map(sink)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    got = dict(kv for batch in sink.read() for kv in batch)
    shutil.rmtree(sink.root, ignore_errors=True)
    return dt, got, cpu


def _run_d(model_path, tok):
    from ..model.loaded import load

    m = load(model_path, providers=["CPUExecutionProvider"])
    K, E = tok.shape
    t0, c0 = time.perf_counter(), time.process_time()
    state = m.initial_state(K)
    lengths = None
    for s in range(0, E, 256):
        x = tok[:, s:s + 256]
        lengths = np.full(K, x.shape[1], np.int32)
        _, state = m.run_unchecked(x, lengths, state)
    return time.perf_counter() - t0, time.process_time() - c0


def _one(args) -> dict:
    """Run one variant (``repeats`` times for a-d) in this process; a JSON-able result."""
    if args.variant == "k":
        from .beam_sweep import run as sweep

        res = sweep(args.sweep_model, _ints(args.sweep_keys), keys_per_flush=args.sweep_keys_per_flush,
                    events_per_key=args.sweep_events_per_key, flushes=args.sweep_flushes,
                    warmup=args.sweep_warmup, rebuild_max_keys=args.sweep_rebuild_max_keys)
        return {**res, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if args.variant == "s":
        from .beam_stream import run as stream

        tok, ts = byte_events(args.stream_keys or args.keys, args.stream_events or args.events)
        res = stream(args.model, tok, ts, windows=args.stream_windows, shards=args.shards,
                     repeats=args.stream_repeats, no_cache=args.stream_cold)
        if args.stream_held != "0":
            from .beam_stream import run_held

            res["held_keys"] = run_held(args.model, _ints(args.stream_held),
                                        keys_per_flush=args.stream_held_keys_per_flush,
                                        events_per_key=args.sweep_events_per_key, windows=args.stream_held_windows,
                                        warmup=args.stream_held_warmup, repeats=args.stream_held_repeats)
        return {**res, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    tok, ts = byte_events(args.keys, args.events)
    n = tok.size
    times, cpus, extra = [], [], {}
    events_path = write_byte_events(tok, ts, os.path.join(tempfile.mkdtemp(prefix="bench-events-"), "events.parquet"))
    for r in range(args.repeats if args.variant != "b" else args.repeats_b):
        if args.variant == "a" or args.variant == "c":
            dt, got, cpu = run_stateful(args.model, events_path, args.shards, identity=args.variant == "c")
            n_out = sum(len(k) for k, _, _ in got)
            if n_out != n:
                raise RuntimeError(f"bench ({args.variant}): expected {n} outputs, got {n_out}")
            if args.variant == "c" and r == 0:  # the identity model ran: every logprob is 0 (NaN where fresh)
                lps = np.concatenate([lp for _, _, lp in got])
                if not np.all((lps == 0) | np.isnan(lps)):
                    raise RuntimeError("bench (c): the identity model was not used")
            if args.variant == "a" and r == 0 and args.quality_out:
                lp = np.full(tok.shape, np.nan)
                for keys, seq, logprob in got:
                    kidx = np.array([int(k.split("-")[1]) for k in keys.to_pylist()])
                    lp[kidx, seq] = logprob
                np.save(args.quality_out, lp)
        elif args.variant == "b":
            dt, got, cpu = _run_b(args.model, tok, ts)
            if r == 0 and args.quality_out:
                lp = np.full(tok.shape, np.nan)
                for (k, i), row in got.items():  # logprob the window model gave to the next byte
                    if i + 1 < tok.shape[1]:
                        lp[k, i + 1] = row[tok[k, i + 1]]
                np.save(args.quality_out, lp)
        else:
            dt, cpu = _run_d(args.model, tok)
        times.append(dt)
        cpus.append(cpu)
    shutil.rmtree(os.path.dirname(events_path), ignore_errors=True)
    med = statistics.median(times)
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"variant": args.variant, "events": n, "seconds_median": med, "seconds_all": times,
            "events_per_s": n / med, "peak_rss_mb": rss_kb / 1024,
            # CPU seconds of the process (every thread: ORT's too): less sensitive to other work on the machine
            "cpu_seconds_median": statistics.median(cpus), "cpu_seconds_all": cpus,
            "events_per_cpu_s": n / statistics.median(cpus), **extra}


def _key_counts(text: str) -> str:
    """``--sweep-keys``: comma-separated ints >= 1 (kept as text: it travels to the variant's subprocess)."""
    try:
        ok = all(int(v) >= 1 for v in text.split(",")) and bool(text.strip())
    except ValueError:
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError(f"expected comma-separated key counts >= 1, got {text!r}")
    return text


def _key_counts_or_off(text: str) -> str:
    return text if text.strip() == "0" else _key_counts(text)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


#: ``--quick``: every section at a toy size (a smoke test; the numbers mean nothing).
QUICK = {"keys": 12, "events": 40, "repeats": 1, "repeats_b": 1, "hidden": 32, "layers": 1, "stream_repeats": 1,
         "stream_windows": 5,
         "sweep_keys": "50,500", "sweep_keys_per_flush": 16, "sweep_flushes": 3, "sweep_warmup": 1,
         "stream_held": "40,400", "stream_held_keys_per_flush": 16, "stream_held_windows": 2, "stream_held_warmup": 1,
         "stream_held_repeats": 1}


def _parser() -> argparse.ArgumentParser:
    from .. import DEFAULT_MODEL
    from ..cli.args import OneLineParser, at_least

    ap = OneLineParser(prog="streamrnn bench beam", description=__doc__.splitlines()[0],
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add, one, zero = ap.add_argument, at_least(1), at_least(0)
    add("--keys", type=one, default=100, help="keys of a-d and s (the issue's full size: 1000)")
    add("--events", type=one, default=100, help="events per key (full size: 200)")
    add("--shards", type=one, default=4, help="state shards of (a)/(c)/(s)")
    add("--repeats", type=one, default=3, help="runs of a, c, d (median)")
    add("--repeats-b", type=one, default=1, help="runs of b, the slow one")
    add("--model", default=None, help="LM of a-d and s (default: a random-weight 2x256 LSTM LM)")
    add("--hidden", type=one, default=256)
    add("--layers", type=one, default=2)
    add("--variants", default="abcdsk", help="subset to run")
    add("--stream-keys", type=zero, default=0, help="keys of (s) (0: --keys)")
    add("--stream-events", type=zero, default=0, help="events per key of (s) (0: --events)")
    add("--stream-windows", type=at_least(2), default=32, help="windows, so watermark steps, of (s)")
    add("--stream-repeats", type=one, default=3, help="runs of each (s) pipeline (median)")
    add("--stream-cold", action=argparse.BooleanOptionalAction, default=True,
        help="(s) also replays with no shard cache (shard_cache_bytes=0: every flush rebuilds, the old behaviour)")
    add("--stream-held", type=_key_counts_or_off, default="1000,50000",
        help="keys held by one shard in the (s) held-keys replay (0: skip it)")
    add("--stream-held-keys-per-flush", type=one, default=256, help="keys touched per window in the held-keys replay")
    add("--stream-held-windows", type=one, default=12, help="timed windows per held-keys replay")
    add("--stream-held-warmup", type=zero, default=2, help="untimed windows first in the held-keys replay")
    add("--stream-held-repeats", type=one, default=2, help="replays per key count (alternating)")
    add("--sweep-model", default=DEFAULT_MODEL, help="model of (k) (default: the shipped charlm)")
    add("--sweep-keys", type=_key_counts, default="1000,10000,100000", help="keys held per shard in (k)")
    add("--sweep-keys-per-flush", type=one, default=256, help="keys touched per flush in (k)")
    add("--sweep-events-per-key", type=one, default=4,
        help="events per touched key per flush in (k) and per window in the (s) held-keys replay")
    add("--sweep-flushes", type=one, default=12, help="timed flushes per key count in (k)")
    add("--sweep-warmup", type=zero, default=2, help="untimed flushes first in (k)")
    add("--sweep-rebuild-max-keys", type=one, default=10_000, help="time a cache-miss rebuild up to this many keys")
    add("--quick", action="store_true", help="every section at a toy size (a smoke test, < 30 s)")
    add("--json", action="store_true", help="print the JSON result to stdout")
    add("--variant", help=argparse.SUPPRESS)
    add("--quality-out", help=argparse.SUPPRESS)
    return ap


#: (ratio name, goal): issue 14's targets, checked against this run's own ratios (issue 6's are ``beam_report.GOALS``).
MORE_GOALS = (("stream_held_max_over_min_keys", 0.7), ("a_over_d", 0.8))


def _more_goals(out: dict) -> None:
    """Adds issue 14's ratios and goals to the report (in place)."""
    ratios, s, v = out["ratios"], out.get("stream", {}), out["variants"]
    if "ratio_stateful_over_no_cache" in s:
        ratios["stream_over_no_cache"] = s["ratio_stateful_over_no_cache"]
    if "held_keys" in s:
        ratios["stream_held_max_over_min_keys"] = s["held_keys"]["ratio_max_over_min_keys"]
        ratios["stream_held_max_over_min_keys_flush_only"] = s["held_keys"]["ratio_max_over_min_keys_flush_only"]
    if "a" in v and "d" in v:
        ratios["a_over_d"] = v["a"]["events_per_s"] / v["d"]["events_per_s"]
        ratios["a_over_d_cpu"] = v["a"]["events_per_cpu_s"] / v["d"]["events_per_cpu_s"]
    if "ratio_stateful_over_identity_cpu" in s:
        ratios["stream_over_identity_cpu"] = s["ratio_stateful_over_identity_cpu"]
    if "held_keys" in s:
        ratios["stream_held_max_over_min_keys_cpu"] = s["held_keys"]["ratio_max_over_min_keys_cpu"]
    for name, goal in MORE_GOALS:
        if name in ratios:
            out["goals"][name] = {"goal": f">= {goal}", "measured": ratios[name], "met": ratios[name] >= goal}


def _text(out: dict, text) -> str:
    lines = [text(out)]
    for n, r in out.get("stream", {}).get("held_keys", {}).get("by_keys", {}).items():
        lines.append(f"(s) streaming, {int(n):>7,} keys held: {r['events_per_s']:,.0f} events/s per window "
                     f"(flush alone {r['flush_events_per_s']:,.0f})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from ..cli.args import Heartbeat, parse_with_quick
    from .beam_report import report, text

    ap = _parser()
    args, argv = parse_with_quick(ap, argv, QUICK)
    if args.variant:
        print(json.dumps(_one(args)))
        return 0
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad or not args.variants:
        ap.error(f"--variants: expected letters from {''.join(VARIANTS)}, got {args.variants!r}")
    tmp = tempfile.mkdtemp(prefix="streamrnn-bench-beam-")
    try:
        load_before = os.getloadavg()
        model = args.model
        if model is None and set(args.variants) - {"k"}:
            model = os.path.join(tmp, "bench.onnx")
            make_model(model, args.hidden, args.layers)
        results = {}
        # plain lines on stderr while a variant runs long: after 10 s, at most every 10 s
        with Heartbeat("streamrnn bench beam", "starting") as beat:
            for i, v in enumerate(args.variants):
                quality = os.path.join(tmp, f"lp_{v}.npy") if v in "ab" else None
                print(f"streamrnn bench beam: running ({v}) ...", file=sys.stderr)
                beat.update(f"variant ({v}), {i + 1}/{len(args.variants)}")
                if args.quick:  # one process: at a toy size, start-up would dominate (peak RSS is then shared)
                    results[v] = _one(argparse.Namespace(**{**vars(args), "variant": v, "model": model,
                                                            "quality_out": quality}))
                    continue
                cmd = [sys.executable, "-m", "streamrnn.bench.beam", *argv, "--variant", v, "--model", model or ""]
                if quality:
                    cmd += ["--quality-out", quality]
                r = subprocess.run(cmd, capture_output=True, text=True,
                                   env={**os.environ, "PYTHONWARNINGS": "ignore"})
                if r.returncode != 0:
                    print(r.stderr[-4000:], file=sys.stderr)
                    return r.returncode
                results[v] = json.loads(r.stdout.strip().splitlines()[-1])
        config = {"keys": args.keys, "events_per_key": args.events, "shards": args.shards,
                  "model": args.model or f"random {args.layers}x{args.hidden} LSTM LM", "sweep_model": args.sweep_model,
                  "runner": "DirectRunner (batch) for a-d", "window_b": 64, "repeats": args.repeats,
                  "quick": args.quick, "cpus": os.cpu_count(), "code": code_state(),
                  "loadavg_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)]}
        out = report(results, config, (os.path.join(tmp, "lp_a.npy"), os.path.join(tmp, "lp_b.npy")))
        _more_goals(out)
        print(json.dumps(out, indent=2) if args.json else _text(out, text))
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
