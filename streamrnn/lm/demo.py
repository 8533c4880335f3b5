"""Operator-API demo: sessions typing text, predicted online with per-key carried state.

``python -m streamrnn.lm.demo [--model M]`` interleaves a few typing sessions into one
event stream, feeds it in micro-batches through :class:`~streamrnn.NextTokenOperator`
(one batched ONNX Runtime call per micro-batch), prints what the model expects next
for each session, scores every keystroke when it arrives (online bits/char), and
finally generates a continuation for each session from its carried state.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np

from .. import DEFAULT_MODEL
from ..model.loaded import load
from . import NextTokenOperator

SESSIONS = {
    "session-romeo": "ROMEO:\nBut soft, what light through yonder window breaks?\n"
                     "It is the east, and Juliet is the sun.\n",
    "session-hamlet": "HAMLET:\nTo be, or not to be, that is the question:\n"
                      "Whether 'tis nobler in the mind to suffer\n",
    "session-king": "KING RICHARD III:\nNow is the winter of our discontent\n"
                    "Made glorious summer by this sun of York;\n",
    "session-user": "I will go to the market tomorrow morning and buy some bread and cheese for the journey.\n",
}


def interleave(sessions: dict[str, str], seed: int) -> list[tuple[str, int]]:
    """Merge the sessions' bytes into one stream: random interleaving, each session in order."""
    rng = np.random.default_rng(seed)
    queues = {k: list(v.encode()) for k, v in sessions.items()}
    events = []
    while queues:
        k = list(queues)[rng.integers(len(queues))]
        events.append((k, queues[k].pop(0)))
        if not queues[k]:
            del queues[k]
    return events


def _show(t: int) -> str:
    return repr(chr(t))[1:-1] if 32 <= t < 127 or t == 10 else f"\\x{t:02x}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m streamrnn.lm.demo", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--batch", type=int, default=32, help="events per micro-batch (one ORT call each)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-n", type=int, default=120, help="bytes to generate per session at the end")
    a = p.parse_args(argv)
    model = load(a.model)
    print(f"model: {model}")
    op = NextTokenOperator(model, k=3)
    events = interleave(SESSIONS, a.seed)
    total_lp: dict[str, list[float]] = {k: [] for k in SESSIONS}
    t0 = time.perf_counter()
    for i in range(0, len(events), a.batch):
        chunk = events[i:i + a.batch]
        keys = [k for k, _ in chunk]
        r = op.observe(keys, np.array([t for _, t in chunk]))
        for j, k in enumerate(keys):
            if not np.isnan(r.logprob[j]):
                total_lp[k].append(float(r.logprob[j]))
        if (i // a.batch) % 4 == 0:
            last = {k: j for j, k in enumerate(keys)}
            shown = ", ".join(
                f"{k[8:]}@{int(r.pos[j])} next: " + "/".join(
                    f"'{_show(int(t))}' {p:.0%}" for t, p in zip(r.topk_tokens[j], r.topk_probs[j], strict=True))
                for k, j in list(last.items())[:2])
            print(f"events {i + len(chunk):4d}/{len(events)}  {shown}")
    dt = time.perf_counter() - t0
    print(f"\n{len(events)} keystrokes from {len(SESSIONS)} sessions in {math.ceil(len(events) / a.batch)} batched "
          f"calls, {dt * 1e3:.0f} ms ({len(events) / dt:,.0f} events/s)")
    print("online loss (each byte scored by the prediction made before it arrived):")
    for k, v in total_lp.items():
        print(f"  {k:15s} {len(v) + 1:4d} bytes  {-np.mean(v) / math.log(2):.3f} bits/char")
    print(f"\ncontinuations (greedy=False, temperature 0.8, {a.n} bytes; carried state untouched):")
    for i, k in enumerate(SESSIONS):
        text = op.generate(k, a.n, temperature=0.8, seed=a.seed + i)
        tail = SESSIONS[k].rstrip("\n").split("\n")[-1][-40:]
        print(f"--- {k}: ...{tail}\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
