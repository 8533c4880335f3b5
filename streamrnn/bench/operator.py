"""``streamrnn bench operator``: operator overhead against raw ONNX Runtime and torch eager.

One run measures, on a 2-layer H=256 LSTM LM with random weights, for each (B, T):

* ``raw``: ``InferenceSession.run`` on prepared numpy feeds (the baseline);
* ``step``: :meth:`Model.step` (validation + state wrapping);
* ``keyed``: :meth:`KeyedOperator.process` with B keys x T events each (grouping,
  state gather/scatter);
* ``torch``: torch eager ``RecurrentNet`` (``nn.LSTM``) under ``no_grad``.

The three ONNX Runtime variants are interleaved call by call, in a fresh random order
every round, and every call is timed on its own, so machine noise hits them alike.
torch is timed in its own block right after: its OpenMP threads keep spinning after a
call and would slow whichever ORT call came next. The median call time of each variant
is reported as key-steps/s, with ratios and GFLOP/s against the SGEMM peak measured in
the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np

SHAPES = ((1, 1), (256, 1), (1, 64), (256, 64))


def sgemm_peak_gflops(n: int = 1024, repeats: int = 9) -> float:
    """Median float32 matmul throughput of numpy's BLAS, GFLOP/s."""
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = a.T.copy()
    a @ b
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times) / 1e9


def flops_per_key_step(layers: int, hidden: int, in_dim: int, out_dim: int, gates: int = 4) -> int:
    """Multiply-add FLOPs of one step of one sequence (recurrent layers + head)."""
    f = 0
    for li in range(layers):
        d = in_dim if li == 0 else hidden
        f += 2 * gates * hidden * (d + hidden)
    return f + 2 * hidden * out_dim


def _interleaved(variants: dict[str, Callable[[], object]], seconds: float, min_calls: int,
                 seed: int = 0) -> dict[str, list[float]]:
    """Per-call times of each variant, one call of each per round in a random order, until
    ``seconds`` have passed and every variant has ``min_calls`` samples."""
    samples: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    rng = np.random.default_rng(seed)
    perf = time.perf_counter
    t_end = perf() + seconds
    while len(samples[names[0]]) < min_calls or perf() < t_end:
        for i in rng.permutation(len(names)):
            fn = variants[names[i]]
            t = perf()
            fn()
            samples[names[i]].append(perf() - t)
    return samples


def run(*, hidden: int = 256, layers: int = 2, seconds: float = 4.0, min_calls: int = 15, threads: int = 0,
        shapes=SHAPES, seed: int = 0) -> dict:
    import torch

    import streamrnn
    from streamrnn.keyed import KeyedOperator
    from streamrnn.runtime import CPU, SessionConfig
    from streamrnn.train.export import export
    from streamrnn.train.nets import NetConfig, RecurrentNet

    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(threads)
    net = RecurrentNet(NetConfig(hidden=hidden, layers=layers, embed_dim=64)).eval()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "bench.onnx")
        export(net, path, name="bench-lstm")
        model = streamrnn.load(path, providers=[CPU], session_config=SessionConfig(intra_op_threads=threads))
    sess = model.session
    flops = flops_per_key_step(layers, hidden, 64, 256)
    peak = sgemm_peak_gflops()
    rng = np.random.default_rng(seed)
    results = []
    for B, T in shapes:
        x = rng.integers(0, 256, (B, T)).astype(np.int64)
        st = model.initial_state(B)
        feeds = {"x": x, "lengths": np.full(B, T, np.int32), "h": st["h"], "c": st["c"]}
        out_names = [o.name for o in sess.get_outputs()]
        keys = [f"key-{i}" for i in range(B)]
        ev_keys = [k for _ in range(T) for k in keys]  # T rounds of B keys, interleaved
        ev_x = x.T.reshape(-1)
        op = KeyedOperator(model, max_keys=max(B, 16))
        tx = torch.from_numpy(x)
        tst = net.initial_state(B)

        def torch_call(tx=tx, tst=tst):
            with torch.no_grad():
                logits, _ = net(tx, tst)
                torch.log_softmax(logits, -1)

        variants = {
            "raw": lambda feeds=feeds, names=out_names: sess.run(names, feeds),
            "step": lambda x=x, st=st: model.step(x, st),
            "keyed": lambda ev_keys=ev_keys, ev_x=ev_x, op=op: op.process(ev_keys, ev_x),
        }
        for fn in (*variants.values(), torch_call):
            fn()
        samples = _interleaved(variants, seconds, min_calls, seed)
        samples.update(_interleaved({"torch": torch_call}, seconds / 3, min_calls, seed))
        med = {k: statistics.median(v) for k, v in samples.items()}
        row = {"B": B, "T": T, "calls_per_variant": len(samples["raw"])}
        for k, v in med.items():
            ks = B * T / v
            row[k] = {"median_s_per_call": v, "key_steps_per_s": ks, "us_per_key_step": 1e6 / ks,
                      "gflops": ks * flops / 1e9, "frac_of_sgemm_peak": ks * flops / 1e9 / peak}
        row["ratio_step_vs_raw"] = med["raw"] / med["step"]
        row["ratio_keyed_vs_raw"] = med["raw"] / med["keyed"]
        row["ratio_keyed_vs_torch"] = med["torch"] / med["keyed"]
        row["ratio_step_vs_torch"] = med["torch"] / med["step"]
        results.append(row)
    by = {(r["B"], r["T"]): r for r in results}
    goals = {}
    if (256, 1) in by:
        r = by[(256, 1)]
        goals["step_ge_0.9x_raw_at_256x1"] = {"value": r["ratio_step_vs_raw"], "met": r["ratio_step_vs_raw"] >= 0.9}
        goals["keyed_ge_0.8x_raw_at_256x1"] = {"value": r["ratio_keyed_vs_raw"], "met": r["ratio_keyed_vs_raw"] >= 0.8}
        goals["keyed_ge_1.2x_torch_at_256x1"] = {"value": r["ratio_keyed_vs_torch"],
                                                 "met": r["ratio_keyed_vs_torch"] >= 1.2}
    if (1, 1) in by:
        r = by[(1, 1)]
        lat = r["step"]["median_s_per_call"] / r["raw"]["median_s_per_call"]
        goals["b1_step_latency_le_1.1x_raw"] = {"value": lat, "met": lat <= 1.1}
    return {
        "benchmark": "operator", "model": f"{layers}x{hidden} LSTM LM (vocab 256, embed 64, random weights)",
        "flops_per_key_step": flops, "sgemm_peak_gflops": peak, "stat": "median of per-call times",
        "seconds_per_shape": seconds,
        "threads": threads or "ort/torch default", "torch_threads": torch.get_num_threads(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "onnxruntime": __import__("onnxruntime").__version__, "torch": torch.__version__,
        "results": results, "goals": goals,
    }


def _human(res: dict) -> str:
    lines = [f"{res['model']}; SGEMM peak {res['sgemm_peak_gflops']:.1f} GFLOP/s; medians of per-call times"]
    lines.append(f"{'B,T':>8} {'variant':>7} {'key-steps/s':>12} {'us/key-step':>12} {'GFLOP/s':>8} {'%peak':>6}")
    for r in res["results"]:
        for k in ("raw", "step", "keyed", "torch"):
            v = r[k]
            lines.append(f"{r['B']:>4},{r['T']:<3} {k:>7} {v['key_steps_per_s']:>12.0f} {v['us_per_key_step']:>12.2f} "
                         f"{v['gflops']:>8.2f} {100 * v['frac_of_sgemm_peak']:>5.1f}%")
        lines.append(f"{'':>8} step/raw {r['ratio_step_vs_raw']:.3f}  keyed/raw {r['ratio_keyed_vs_raw']:.3f}  "
                     f"keyed/torch {r['ratio_keyed_vs_torch']:.3f}")
    for k, g in res["goals"].items():
        lines.append(f"goal {k}: {g['value']:.3f} {'MET' if g['met'] else 'MISSED'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="streamrnn bench operator", description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seconds", type=float, default=4.0, help="time budget per shape (variants interleaved)")
    p.add_argument("--min-calls", type=int, default=15, help="at least this many timed calls per variant")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads for ORT and torch (0: defaults)")
    a = p.parse_args(argv)
    res = run(hidden=a.hidden, layers=a.layers, seconds=a.seconds, min_calls=a.min_calls, threads=a.threads)
    print(json.dumps(res, indent=2) if a.json else _human(res), file=sys.stdout)
    return 0
