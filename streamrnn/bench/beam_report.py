"""The JSON report of ``streamrnn bench beam``: sections, ratios measured in the same run, the issue's goals."""

from __future__ import annotations

import json
import os

import numpy as np

#: (ratio name, goal): the targets of issue 6, each checked against this run's own ratio.
GOALS = (("a_over_b", 20.0), ("a_over_min_c_d", 0.6), ("stream_over_identity", 0.5),
         ("sweep_max_over_min_keys", 0.7))


def report(results: dict[str, dict], config: dict, quality_paths: tuple[str, str] | None) -> dict:
    """The bench's one JSON object from the per-variant results (``a``-``d``, ``s``, ``k``)."""
    batch = {v: r for v, r in results.items() if v in "abcd"}
    out: dict = {"config": config, "variants": batch}
    if "s" in results:
        out["stream"] = results["s"]
    if "k" in results:
        out["key_sweep"] = results["k"]
    eps = {v: r["events_per_s"] for v, r in batch.items()}
    ratios: dict[str, float] = {}
    if "a" in eps and "b" in eps:
        ratios["a_over_b"] = eps["a"] / eps["b"]
    if "a" in eps and "c" in eps and "d" in eps:
        ratios["a_over_min_c_d"] = eps["a"] / min(eps["c"], eps["d"])
    if "s" in results:
        ratios["stream_over_identity"] = results["s"]["ratio_stateful_over_identity"]
        ratios["stream_identity_model_over_identity"] = results["s"]["ratio_stateful_identity_model_over_identity"]
    if "k" in results:
        ratios["sweep_max_over_min_keys"] = results["k"]["ratio_max_over_min_keys"]
        ratios["sweep_max_over_min_keys_amortized"] = results["k"]["ratio_max_over_min_keys_amortized"]
        ratios["sweep_max_over_min_keys_paired"] = results["k"]["ratio_max_over_min_keys_paired"]
    out["ratios"] = ratios
    out["goals"] = {name: {"goal": f">= {goal}", "measured": ratios[name], "met": ratios[name] >= goal}
                    for name, goal in GOALS if name in ratios}
    if quality_paths and all(os.path.exists(p) for p in quality_paths):
        out["quality_b_vs_a"] = _quality(*(np.load(p) for p in quality_paths))
    return out


def _quality(a: np.ndarray, b: np.ndarray) -> dict:
    m = ~np.isnan(a) & ~np.isnan(b)
    ln2 = np.log(2.0)
    beyond = m[:, 64:]
    return {
        "bits_per_char_a": float(-a[m].mean() / ln2), "bits_per_char_b": float(-b[m].mean() / ln2),
        "mean_abs_logprob_diff": float(np.abs(a[m] - b[m]).mean()),
        "events_beyond_window": int(beyond.sum()),
        "mean_abs_logprob_diff_beyond_window": float(np.abs(a[:, 64:][beyond] - b[:, 64:][beyond]).mean())
        if beyond.any() else None,
    }


def text(out: dict) -> str:
    """A short human-readable summary of :func:`report`'s object."""
    lines = []
    for v, r in out["variants"].items():
        lines.append(f"({v}) {r['events_per_s']:>12,.0f} events/s  median {r['seconds_median']:.3f} s  "
                     f"peak RSS {r['peak_rss_mb']:.0f} MB")
    if "stream" in out:
        s = out["stream"]
        for name, r in s["variants"].items():
            lines.append(f"(s) streaming {name}: {r['events_per_s']:,.0f} events/s ({s['watermark_steps']} "
                         f"watermark steps, {s['events']} events)")
    if "key_sweep" in out:
        for n, r in out["key_sweep"]["by_keys"].items():
            lines.append(f"(k) {int(n):>7,} keys held: {r['events_per_s']:,.0f} events/s per flush, "
                         f"{r['state_bytes_per_flush_median'] / 2**20:.2f} MiB state written per flush")
    for name, g in out["goals"].items():
        lines.append(f"{name}: {g['measured']:.2f} (goal {g['goal']}: {'met' if g['met'] else 'NOT met'})")
    if "quality_b_vs_a" in out:
        lines.append(json.dumps(out["quality_b_vs_a"]))
    return "\n".join(lines)
