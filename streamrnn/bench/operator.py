"""``streamrnn bench operator``: operator overhead against raw ONNX Runtime and torch eager.

One run measures, on a 2-layer H=256 LSTM LM with random weights, for each (B, T):

* ``raw``: ``InferenceSession.run`` on prepared numpy feeds (the baseline);
* ``step``: :meth:`Model.step` (validation + state wrapping);
* ``keyed``: :meth:`KeyedOperator.process` with B keys x T events each (grouping,
  state gather/scatter);
* ``torch``: torch eager ``RecurrentNet`` (``nn.LSTM``) under ``no_grad``.

The skew section feeds the same number of events as Zipf-distributed keys (s = 1.1)
and as uniform keys (the same distinct keys, events spread evenly), plus the burst case
of one key with 300 events among 300 single-event keys, each packed (the default; the
cases' calls interleaved, so that their ratios see the same load) and unpacked (one
padded call, the old behaviour; 3 calls, timed apart). It reports
key-steps/s, the padded volume, the peak numpy memory of one call (``tracemalloc``) and
the peak resident-memory growth of a first call on a fresh session (ORT's buffers included).

The three ONNX Runtime variants are interleaved call by call, in a fresh random order
every round, and every call is timed on its own, so machine noise hits them alike.
torch is timed in its own block right after: its OpenMP threads keep spinning after a
call and would slow whichever ORT call came next. The median call time of each variant
is reported as key-steps/s, with ratios and GFLOP/s against the SGEMM peak measured in
the same run. The health costs (``keyed_flag``, ``keyed_heal`` against ``keyed``, health off) are
medians of per-round paired ratios. This random-weights model has no reference loss, so ``heal``
samples its watches (one window of 64 steps in 8, every key in step): a short run may never reach
a sampled window. ``charlm_health`` (skip with ``--no-charlm``) therefore also times the three
policies with the shipped ``charlm`` on in-domain text, keys warmed up first, where the reference
loss decides the watches, as in production.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable

import numpy as np

from ..cli.args import Heartbeat, OneLineParser, at_least
from .common import interleaved

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


def zipf_keys(rng: np.random.Generator, n: int, s: float, universe: int) -> list[str]:
    """``n`` event keys drawn from ``universe`` keys with P(rank k) proportional to 1 / k**s."""
    p = 1.0 / np.arange(1, universe + 1) ** s
    return [f"z{i}" for i in rng.choice(universe, n, p=p / p.sum())]


def _peak_bytes(fn: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _peak_rss_delta(fn: Callable[[], object]) -> int:
    """Peak resident memory during ``fn`` minus before it (sampled every ~0.5 ms from /proc; 0 elsewhere)."""
    import threading

    def rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            return 0

    base, peak, done = rss(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.0005)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        fn()
    finally:
        done.set()
        t.join()
    return max(0, max(peak[0], rss()) - base)


def _quiet(status: str) -> None:
    pass


def paired_cost(base: list[float], variant: list[float]) -> float:
    """Throughput lost by ``variant`` against ``base``: the median over rounds of ``1 - base_i / variant_i``,
    each round's two calls timed back to back (:func:`~streamrnn.bench.common.interleaved`), so that load which
    drifts between rounds cancels in each ratio."""
    return statistics.median(1.0 - b / v for b, v in zip(base, variant, strict=True))


def charlm_health(shapes, *, seconds: float, min_calls: int, seed: int, warm_key_steps: int = 16384,
                  progress: Callable[[str], None] = _quiet) -> dict | None:
    """The health policies' cost with the shipped ``charlm`` (its reference loss decides the watches) on in-domain
    text (the demo events' Shakespeare, a stream per key, new bytes every call), after a warm-up of up to
    ``warm_key_steps`` bytes per operator (at most 1 KiB per key) so that the EW losses and watches are those of
    running keys, not of new ones. ``off``, ``flag`` and ``heal`` are interleaved call by call; costs are medians
    of per-round paired ratios; ``heal_watched_share`` is the mean share of the keys watched during the calls."""
    import streamrnn
    from streamrnn.keyed.operator import KeyedOperator
    from streamrnn.model.shipped import names

    from .common import byte_events

    if "charlm" not in names():
        return None
    model = streamrnn.load("shipped:charlm")
    out = {"model": "shipped:charlm", "text": "demo events' Shakespeare (in domain)", "shapes": []}
    for i, (B, T) in enumerate(shapes):
        progress(f"charlm health, case {i + 1}/{len(shapes)} (B={B}, T={T})")
        warm = max(1, min(1024, warm_key_steps // B))
        calls = max(min_calls, 1)
        per_key = warm + T * max(calls, min(3000, 20000 // (B * T) + 1))  # room for the rounds that fit in seconds
        tok, _ = byte_events(B, per_key + 1, seed=seed + i)
        keys = [f"key-{k}" for k in range(B)]
        ops = {p: KeyedOperator(model, max_keys=max(B, 16), health=p) for p in ("off", "flag", "heal")}
        for op in ops.values():
            op.process([k for _ in range(warm) for k in keys], tok[:, :warm].T.reshape(-1))
        at, watched = [warm], []
        ev_keys = [k for _ in range(T) for k in keys]

        def call(op, at=at, ev_keys=ev_keys, tok=tok, T=T):
            return op.process(ev_keys, tok[:, at[0]:at[0] + T].T.reshape(-1))

        def heal(op=ops["heal"], call=call, watched=watched, B=B):
            call(op)
            watched.append(op._store.shadow.used / B)

        variants = {"off": lambda op=ops["off"], call=call: call(op),
                    "flag": lambda op=ops["flag"], call=call: call(op), "heal": heal}
        samples = {k: [] for k in variants}
        t_end = time.perf_counter() + seconds
        rng = np.random.default_rng(seed)
        while at[0] + T <= per_key and (len(samples["off"]) < calls or time.perf_counter() < t_end):
            s = interleaved(variants, 0.0, 1, int(rng.integers(1 << 31)))  # one round: the same bytes for each
            for k, v in s.items():
                samples[k] += v
            at[0] += T
        med = {k: statistics.median(v) for k, v in samples.items()}
        out["shapes"].append({"B": B, "T": T, "warm_bytes_per_key": warm, "calls_per_variant": len(samples["off"]),
                              **{f"{k}_median_s_per_call": v for k, v in med.items()},
                              "health_flag_cost": paired_cost(samples["off"], samples["flag"]),
                              "health_heal_cost": paired_cost(samples["off"], samples["heal"]),
                              "heal_watched_share": float(np.mean(watched)) if watched else 0.0})
    return out


def skew(model, *, events: int, zipf_s: float, universe: int, seconds: float, min_calls: int, seed: int,
         fresh_model: Callable[[], object] | None = None, progress: Callable[[str], None] = _quiet) -> dict:
    """Zipf vs uniform keys with the same events, and the burst case; packed and unpacked."""
    from streamrnn.keyed.operator import KeyedOperator
    from streamrnn.keyed.packing import group, pack

    rng = np.random.default_rng(seed)
    zk = zipf_keys(rng, events, zipf_s, universe)
    distinct = list(dict.fromkeys(zk))
    uk = [distinct[i % len(distinct)] for i in range(events)]
    burst = ["busy"] * 300 + [f"q{i}" for i in range(300)]
    flat = [f"u{i}" for i in range(300) for _ in range(2)]
    cases = {"zipf": zk, "uniform": uk, "burst_1x300_plus_300x1": burst, "flat_300x2": flat}
    out: dict = {"events": events, "zipf_s": zipf_s, "universe": universe, "distinct_keys": len(distinct),
                 "busiest_key_events": max(group(zk).counts.tolist()), "cases": {}}
    built = {}
    for name, keys in cases.items():
        x = rng.integers(0, 256, len(keys))
        g = group(keys)
        ops = {"packed": KeyedOperator(model, max_keys=len(g.keys) + 16),
               "unpacked": KeyedOperator(model, max_keys=len(g.keys) + 16, pack_step_cost=float("inf"))}
        variants = {v: (lambda op=op, keys=keys, x=x: op.process(keys, x)) for v, op in ops.items()}
        for fn in variants.values():
            fn()
        built[name] = (keys, x, g, ops, variants)
    # the physical bound of the Zipf call: its packed groups as bare model calls (the session's threads, no
    # operator), the ones the operator runs on its side thread (the busiest keys' chain) and the others in turn
    zg = built["zipf"][2]
    zgroups = pack(zg.counts, step_cost=built["zipf"][3]["packed"].pack_step_cost)
    n_side = max(1, built["zipf"][3]["packed"]._side_groups(zgroups, zg.counts))

    def bare(groups: list) -> Callable[[], object]:
        calls = []
        for gr in groups:
            counts = zg.counts[gr]
            calls.append((rng.integers(0, 256, (len(gr), int(counts.max()))), counts.astype(np.int32), len(gr)))
        return lambda: [model.run_unchecked(x, n, model.initial_state(b)) for x, n, b in calls]

    bound = {"zipf_chain_alone": bare(zgroups[:n_side]), "zipf_rest_in_turn": bare(zgroups[n_side:])}
    for fn in bound.values():
        fn()
    # the packed variants of every case interleaved call by call (the Zipf / uniform ratio is a ratio of
    # calls timed under the same load); the unpacked ones can be ~30x slower: a few calls each, apart
    progress(f"skewed keys, {len(cases)} cases interleaved")
    packed = interleaved({**{name: b[4]["packed"] for name, b in built.items()}, **bound},
                         seconds * (len(cases) + len(bound)), min_calls, seed)
    for i, (name, (keys, x, g, ops, variants)) in enumerate(built.items()):
        progress(f"skewed keys, case {i + 1}/{len(cases)} ({name}) unpacked")
        samples = {"packed": packed[name], **interleaved({"unpacked": variants["unpacked"]}, 0.0, 3, seed)}
        groups = pack(g.counts)
        row = {"events": len(keys), "keys": len(g.keys), "busiest": int(g.counts.max()),
               "padded_key_steps_packed": int(sum(len(gr) * g.counts[gr].max() for gr in groups)),
               "model_calls_packed": len(groups),
               "padded_key_steps_unpacked": int(len(g.keys) * g.counts.max())}
        for v, fn in variants.items():
            med = statistics.median(samples[v])
            row[v] = {"median_s_per_call": med, "key_steps_per_s": len(keys) / med,
                      "peak_numpy_bytes": _peak_bytes(fn)}
            if fresh_model is not None:  # first call on a fresh session: ORT's arena growth shows in RSS
                op = KeyedOperator(fresh_model(), max_keys=len(g.keys) + 16,
                                   pack_step_cost=ops[v].pack_step_cost)
                call = lambda op=op, k=keys, x=x: op.process(k, x)  # noqa: E731
                row[v]["peak_rss_delta_bytes_fresh_session"] = _peak_rss_delta(call)
        out["cases"][name] = row
    c = out["cases"]
    out["ratio_zipf_vs_uniform_key_steps"] = (c["zipf"]["packed"]["key_steps_per_s"]
                                              / c["uniform"]["packed"]["key_steps_per_s"])
    # a Zipf call takes at least its chain's time (the chain's steps run one after another): key-steps/s at most
    # uniform's x zipf_bound; the rest's groups in turn are the other thread's share when the chain overlaps
    uni, chain = c["uniform"]["packed"]["median_s_per_call"], statistics.median(packed["zipf_chain_alone"])
    rest = statistics.median(packed["zipf_rest_in_turn"])
    out["zipf_bound"] = {"side_groups": [[len(gr), int(zg.counts[gr].max())] for gr in zgroups[:n_side]],
                         "chain_alone_s": chain, "rest_in_turn_s": rest, "uniform_s": uni,
                         "uniform_over_chain": uni / chain, "uniform_over_rest_in_turn": uni / rest,
                         "uniform_over_chain_plus_rest": uni / (chain + rest)}
    out["ratio_zipf_vs_uniform_peak_memory"] = (c["zipf"]["packed"]["peak_numpy_bytes"]
                                                / c["uniform"]["packed"]["peak_numpy_bytes"])
    if fresh_model is not None:
        out["ratio_zipf_vs_uniform_peak_rss"] = (c["zipf"]["packed"]["peak_rss_delta_bytes_fresh_session"]
                                                 / max(1, c["uniform"]["packed"]["peak_rss_delta_bytes_fresh_session"]))
    out["burst_speedup_packed_vs_unpacked"] = (c["burst_1x300_plus_300x1"]["unpacked"]["median_s_per_call"]
                                               / c["burst_1x300_plus_300x1"]["packed"]["median_s_per_call"])
    return out


def run(*, hidden: int = 256, layers: int = 2, seconds: float = 4.0, min_calls: int = 15, threads: int = 0,
        shapes=SHAPES, seed: int = 0, events: int = 4096, zipf_s: float = 1.1, universe: int = 1000,
        with_skew: bool = True, with_charlm: bool = False, progress: Callable[[str], None] = _quiet) -> dict:
    """The whole benchmark; ``progress(status)`` is told which part runs (the CLI's progress lines)."""
    progress("building the model")
    import torch

    import streamrnn
    from streamrnn.keyed.operator import KeyedOperator
    from streamrnn.model.runtime import CPU, SessionConfig
    from streamrnn.train.export import export
    from streamrnn.train.nets import NetConfig, RecurrentNet

    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(threads)
    net = RecurrentNet(NetConfig(hidden=hidden, layers=layers, embed_dim=64)).eval()
    d = tempfile.mkdtemp()
    try:
        path = os.path.join(d, "bench.onnx")
        export(net, path, name="bench-lstm")
        cfg = SessionConfig(intra_op_threads=threads)
        model = streamrnn.load(path, providers=[CPU], session_config=cfg)
        with open(path, "rb") as f:
            blob = f.read()
    finally:
        shutil.rmtree(d, ignore_errors=True)

    def fresh_model():
        from streamrnn.model.loaded import Model
        from streamrnn.model.runtime import create_session

        return Model(create_session(blob, [CPU], cfg, what="bench"), model.spec, source="bench")

    sess = model.session
    flops = flops_per_key_step(layers, hidden, 64, 256)
    peak = sgemm_peak_gflops()
    rng = np.random.default_rng(seed)
    results = []
    for i, (B, T) in enumerate(shapes):
        progress(f"shape {i + 1}/{len(shapes)} (B={B}, T={T})")
        x = rng.integers(0, 256, (B, T)).astype(np.int64)
        st = model.initial_state(B)
        feeds = {"x": x, "lengths": np.full(B, T, np.int32), "h": st["h"], "c": st["c"]}
        out_names = [o.name for o in sess.get_outputs()]
        keys = [f"key-{i}" for i in range(B)]
        ev_keys = [k for _ in range(T) for k in keys]  # T rounds of B keys, interleaved
        ev_x = x.T.reshape(-1)
        op = KeyedOperator(model, max_keys=max(B, 16), health="off")
        # health (issue 17): flag = EW loss per key; heal = that plus fresh shadow rows for watched keys (this
        # random-weights model has no reference loss: keys are sampled, one window in 8)
        op_flag = KeyedOperator(model, max_keys=max(B, 16), health="flag")
        op_heal = KeyedOperator(model, max_keys=max(B, 16), health="heal")
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
            "keyed_flag": lambda ev_keys=ev_keys, ev_x=ev_x, op=op_flag: op.process(ev_keys, ev_x),
            "keyed_heal": lambda ev_keys=ev_keys, ev_x=ev_x, op=op_heal: op.process(ev_keys, ev_x),
        }
        for fn in (*variants.values(), torch_call):
            fn()
        samples = interleaved(variants, seconds, min_calls, seed)
        samples.update(interleaved({"torch": torch_call}, seconds / 3, min_calls, seed))
        med = {k: statistics.median(v) for k, v in samples.items()}
        row = {"B": B, "T": T, "calls_per_variant": len(samples["raw"])}
        for k, v in med.items():
            ks = B * T / v
            row[k] = {"median_s_per_call": v, "key_steps_per_s": ks, "us_per_key_step": 1e6 / ks,
                      "gflops": ks * flops / 1e9, "frac_of_sgemm_peak": ks * flops / 1e9 / peak}
        row["ratio_step_vs_raw"] = med["raw"] / med["step"]
        row["ratio_keyed_vs_raw"] = med["raw"] / med["keyed"]
        # throughput lost to health='flag' / 'heal': the median over rounds of each round's paired ratio
        row["health_flag_cost"] = paired_cost(samples["keyed"], samples["keyed_flag"])
        row["health_heal_cost"] = paired_cost(samples["keyed"], samples["keyed_heal"])
        row["ratio_keyed_vs_torch"] = med["torch"] / med["keyed"]
        row["ratio_step_vs_torch"] = med["torch"] / med["step"]
        results.append(row)
    by = {(r["B"], r["T"]): r for r in results}
    goals = {}
    charlm = charlm_health(shapes, seconds=seconds, min_calls=min_calls, seed=seed,
                           progress=progress) if with_charlm else None
    for r in (charlm or {}).get("shapes", []):
        B, T = r["B"], r["T"]
        goals[f"health_flag_cost_le_3pct_charlm_at_{B}x{T}"] = {"value": r["health_flag_cost"],
                                                                "met": r["health_flag_cost"] <= 0.03}
        goals[f"health_heal_cost_le_15pct_charlm_at_{B}x{T}"] = {"value": r["health_heal_cost"],
                                                                 "met": r["health_heal_cost"] <= 0.15}
    skewed = skew(model, events=events, zipf_s=zipf_s, universe=universe, seconds=seconds, min_calls=min_calls,
                  seed=seed, fresh_model=fresh_model, progress=progress) if with_skew else None
    if skewed:
        v = skewed["ratio_zipf_vs_uniform_key_steps"]
        goals["zipf_key_steps_ge_0.8x_uniform"] = {"value": v, "met": v >= 0.8}
        v = skewed["ratio_zipf_vs_uniform_peak_rss"]
        goals["zipf_peak_memory_le_2x_uniform"] = {"value": v, "met": v <= 2.0}
    if (256, 1) in by:
        r = by[(256, 1)]
        goals["step_ge_0.9x_raw_at_256x1"] = {"value": r["ratio_step_vs_raw"], "met": r["ratio_step_vs_raw"] >= 0.9}
        goals["keyed_ge_0.9x_raw_at_256x1"] = {"value": r["ratio_keyed_vs_raw"], "met": r["ratio_keyed_vs_raw"] >= 0.9}
        goals["keyed_ge_1.2x_torch_at_256x1"] = {"value": r["ratio_keyed_vs_torch"],
                                                 "met": r["ratio_keyed_vs_torch"] >= 1.2}
    for (B, T), r in by.items():
        goals[f"health_flag_cost_le_3pct_at_{B}x{T}"] = {"value": r["health_flag_cost"],
                                                         "met": r["health_flag_cost"] <= 0.03}
        goals[f"health_heal_cost_le_15pct_at_{B}x{T}"] = {"value": r["health_heal_cost"],
                                                          "met": r["health_heal_cost"] <= 0.15}
    if (1, 1) in by:
        r = by[(1, 1)]
        lat = r["step"]["median_s_per_call"] / r["raw"]["median_s_per_call"]
        goals["b1_step_latency_le_1.1x_raw"] = {"value": lat, "met": lat <= 1.1}
    return {
        "benchmark": "operator", "model": f"{layers}x{hidden} LSTM LM (vocab 256, embed 64, random weights)",
        "flops_per_key_step": flops, "sgemm_peak_gflops": peak, "stat": "median of per-call times",
        "health_cost_stat": "median of per-round paired ratios",
        "seconds_per_shape": seconds,
        "threads": threads or "ort/torch default", "torch_threads": torch.get_num_threads(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "onnxruntime": __import__("onnxruntime").__version__, "torch": torch.__version__,
        "results": results, "skew": skewed, "charlm_health": charlm, "goals": goals,
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
                     f"keyed/torch {r['ratio_keyed_vs_torch']:.3f}  health cost flag "
                     f"{100 * r['health_flag_cost']:.1f}% heal {100 * r['health_heal_cost']:.1f}%")
    for r in (res.get("charlm_health") or {}).get("shapes", []):
        lines.append(f"charlm {r['B']:>4},{r['T']:<3} health cost flag {100 * r['health_flag_cost']:.1f}% heal "
                     f"{100 * r['health_heal_cost']:.1f}% (heal watched {100 * r['heal_watched_share']:.0f}% of the "
                     f"keys; {r['calls_per_variant']} calls each)")
    sk = res.get("skew")
    if sk:
        lines.append(f"skew: {sk['events']} events, Zipf s={sk['zipf_s']} over {sk['universe']} keys "
                     f"({sk['distinct_keys']} distinct, busiest {sk['busiest_key_events']} events)")
        for name, c in sk["cases"].items():
            lines.append(f"  {name:>24} packed {c['packed']['key_steps_per_s']:>10.0f} key-steps/s "
                         f"{c['packed']['peak_rss_delta_bytes_fresh_session'] / 1e6:>8.1f} MB  unpacked "
                         f"{c['unpacked']['key_steps_per_s']:>10.0f} key-steps/s "
                         f"{c['unpacked']['peak_rss_delta_bytes_fresh_session'] / 1e6:>8.1f} MB")
    if sk:
        b = sk["zipf_bound"]
        lines.append(f"  Zipf bound: uniform / chain alone {b['uniform_over_chain']:.3f}, uniform / rest in turn "
                     f"{b['uniform_over_rest_in_turn']:.3f}, uniform / (chain + rest) "
                     f"{b['uniform_over_chain_plus_rest']:.3f}")
    for k, g in res["goals"].items():
        lines.append(f"goal {k}: {g['value']:.3f} {'MET' if g['met'] else 'MISSED'}")
    return "\n".join(lines)


def shapes_arg(s: str) -> tuple[tuple[int, int], ...]:
    """An argparse ``type``: ``BxT`` shapes, comma-separated (``1x1,256x1``)."""
    out = []
    for part in s.split(","):
        b, _, t = part.strip().lower().partition("x")
        if not (b.isdigit() and t.isdigit() and int(b) >= 1 and int(t) >= 1):
            raise argparse.ArgumentTypeError(f"expected BxT shapes such as 1x1,256x1 (B, T >= 1), got {part!r}")
        out.append((int(b), int(t)))
    return tuple(out)


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="streamrnn bench operator", description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--hidden", type=at_least(1), default=256)
    p.add_argument("--layers", type=at_least(1), default=2)
    p.add_argument("--seconds", type=at_least(0.0, open_=True), default=4.0,
                   help="time budget per shape (variants interleaved)")
    p.add_argument("--min-calls", type=at_least(1), default=15, help="at least this many timed calls per variant")
    p.add_argument("--threads", type=at_least(0), default=0, help="intra-op threads for ORT and torch (0: defaults)")
    p.add_argument("--events", type=at_least(1), default=4096, help="events per call in the Zipf/uniform cases")
    p.add_argument("--zipf-s", type=at_least(1.0, open_=True), default=1.1, help="Zipf exponent of the keys")
    p.add_argument("--universe", type=at_least(1), default=1000, help="keys the Zipf draw picks from")
    p.add_argument("--no-skew", action="store_true", help="skip the skewed-keys section")
    p.add_argument("--no-charlm", action="store_true",
                   help="skip the health policies' cost with the shipped charlm on in-domain text")
    p.add_argument("--shapes", type=shapes_arg, default=SHAPES,
                   help="the (B, T) shapes of the overhead section, e.g. 1x1,256x1 (default: all four)")
    a = p.parse_args(argv)
    with Heartbeat("streamrnn bench operator") as hb:
        res = run(hidden=a.hidden, layers=a.layers, seconds=a.seconds, min_calls=a.min_calls, threads=a.threads,
                  events=a.events, zipf_s=a.zipf_s, universe=a.universe, with_skew=not a.no_skew, shapes=a.shapes,
                  with_charlm=not a.no_charlm,
                  progress=hb.update)
    print(json.dumps(res, indent=2) if a.json else _human(res), file=sys.stdout)
    return 0
