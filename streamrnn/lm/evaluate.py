"""Offline evaluation of a byte-level LM: carried state vs reset-every-N, and streaming parity."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from ..errors import InputError
from ..model.loaded import Model
from . import token_logprob


@dataclass
class LMEval:
    """Result of :func:`eval_lm`. Losses are per predicted byte (bytes 1..n-1)."""

    n_bytes: int
    nats_per_char: float
    bits_per_char: float
    reset_every: int
    nats_per_char_reset: float
    bits_per_char_reset: float
    chunk: int
    parity_bytes: int
    parity_max_abs: float
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


#: ``progress(status)``: told what a long evaluation is doing (the CLI's :class:`~streamrnn.cli.args.Heartbeat`)
Progress = Callable[[str], None]


def _quiet(status: str) -> None:
    pass


def carried_logprobs(model: Model, tokens: np.ndarray, chunk: int, progress: Progress = _quiet) -> np.ndarray:
    """Log-prob of each token 1..n-1 with state carried from the start, fed ``chunk`` bytes per call."""
    out = np.empty(len(tokens) - 1, np.float64)
    state = None
    for t0 in range(0, len(tokens) - 1, chunk):
        progress(f"carried state, {t0:,}/{len(tokens) - 1:,} bytes")
        x = tokens[t0:min(t0 + chunk, len(tokens) - 1)]
        o, state = model.step(x[None], state)
        out[t0:t0 + len(x)] = token_logprob(o["logprobs"][0], tokens[t0 + 1:t0 + 1 + len(x)])
    return out


def reset_logprobs(model: Model, tokens: np.ndarray, every: int, batch: int = 256,
                   progress: Progress = _quiet) -> np.ndarray:
    """Log-prob of tokens 1..n-1 when the state restarts from zero every ``every`` bytes.

    Windows are ``tokens[j*every:(j+1)*every]``; a window's last output predicts the
    next window's first byte (so both modes score the same bytes).
    """
    n = len(tokens) - 1
    windows = math.ceil(n / every)
    padded = np.zeros(windows * every, np.int64)
    padded[:n] = tokens[:n]
    rows = padded.reshape(windows, every)
    lengths = np.full(windows, every, np.int32)
    lengths[-1] = n - (windows - 1) * every
    out = np.empty(windows * every, np.float64)
    targets = np.zeros(windows * every, np.int64)
    targets[:n] = tokens[1:n + 1]
    for b0 in range(0, windows, batch):
        progress(f"state reset every {every} bytes, {min(b0 * every, n):,}/{n:,} bytes")
        sl = slice(b0, min(b0 + batch, windows))
        o, _ = model.step(rows[sl], lengths=lengths[sl])
        out[sl.start * every:sl.stop * every] = token_logprob(
            o["logprobs"], targets[sl.start * every:sl.stop * every].reshape(-1, every)).ravel()
    return out[:n]


def eval_lm(model: Model, data: bytes, *, chunk: int = 1024, reset_every: int = 64,
            parity_bytes: int = 100_000, progress: Progress = _quiet) -> LMEval:
    """Bits/char with carried state and with resets, plus chunked-vs-whole parity on a prefix; ``progress`` is
    told which part runs and how far it got."""
    if model.spec.task != "lm":
        raise InputError(f"eval lm: model task: expected 'lm', got {model.spec.task!r}")
    if len(data) < 2:
        raise InputError(f"eval lm: text: expected at least 2 bytes, got {len(data)}")
    if chunk < 1 or reset_every < 1:
        raise InputError(f"eval lm: chunk and reset_every: expected >= 1, got {chunk} and {reset_every}")
    t = time.perf_counter()
    tokens = np.frombuffer(data, np.uint8).astype(np.int64)
    carried = carried_logprobs(model, tokens, chunk, progress)
    reset = reset_logprobs(model, tokens, reset_every, progress=progress)
    p = min(len(tokens), parity_bytes)
    progress(f"parity, one call over the first {p:,} bytes")
    whole, _ = model.step(tokens[None, :p - 1])
    whole_lp = token_logprob(whole["logprobs"][0], tokens[1:p])
    parity = float(np.max(np.abs(whole_lp - carried[:p - 1])))
    nats, nats_r = -float(carried.mean()), -float(reset.mean())
    return LMEval(n_bytes=len(tokens), nats_per_char=nats, bits_per_char=nats / math.log(2),
                  reset_every=reset_every, nats_per_char_reset=nats_r, bits_per_char_reset=nats_r / math.log(2),
                  chunk=chunk, parity_bytes=p, parity_max_abs=parity, seconds=time.perf_counter() - t)


# -- carried-state health (issue 17) ------------------------------------------------------------------------
@dataclass
class HealthEval:
    """Result of :func:`eval_health` on one text: bits/char of each policy, the same bytes scored by each."""

    text: str
    n_bytes: int
    streams: int
    step: int
    scored_bytes: int
    bits_per_char: dict  # carried, reset64 (reset_every), flag, heal
    heals: int
    heal_rate_per_kib: float
    max_watch: int  # keys that heal may watch (or heal) at once
    max_bad_share: float
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def out_of_domain_text(n_bytes: int, seed: int = 0, root=None) -> bytes:
    """An out-of-domain text built at run time: this package's Python source, its technical English (docs),
    and random bytes, in alternating blocks (seeded)."""
    from pathlib import Path

    root = Path(root) if root is not None else Path(__file__).resolve().parents[1]  # streamrnn/
    src = b"".join(p.read_bytes() for p in sorted(root.rglob("*.py")))
    docs_dir = root.parent / "docs"
    docs = b"".join(p.read_bytes() for p in sorted(docs_dir.glob("*.md"))) if docs_dir.is_dir() else src[::-1]
    rng = np.random.default_rng(seed)
    out, total = [], 0
    while total < n_bytes:
        kind = rng.choice(3, p=[0.45, 0.45, 0.10])
        if kind == 2:
            block = rng.integers(0, 256, int(rng.integers(64, 512)), dtype=np.uint8).tobytes()
        else:
            pool = src if kind == 0 else docs
            n = int(rng.integers(512, 4096))
            s = int(rng.integers(0, max(1, len(pool) - n)))
            block = pool[s:s + n]
        out.append(block)
        total += len(block)
    return b"".join(out)[:n_bytes]


def policy_run(model: Model, segs: np.ndarray, step: int, health, progress: Progress, label: str, *,
               heal_mask: bool = False) -> tuple:
    """Per-event loss of every stream under one health policy (the model's task loss,
    :func:`streamrnn.keyed.health.task_loss`: nats; NaN for each stream's first event and any event the task does
    not score), streams ``segs [S, L, ...]`` fed ``step`` events per key per call; heals; the largest share of keys
    in bad health after a call; with ``heal_mask``, also where the heals were (``[S, L]`` bool)."""
    from ..keyed.health import HEALTH, task_loss
    from ..keyed.operator import KeyedOperator

    S, L = segs.shape[:2]
    loss_of = task_loss(model.spec)
    op = KeyedOperator(model, max_keys=S, keep_last_output=True, health=health)
    names = [f"s{i}" for i in range(S)]
    keys = [k for k in names for _ in range(step)]
    loss = np.full((S, L), np.nan)
    healed = np.zeros((S, L), bool)
    worst = 0.0
    for t0 in range(0, L, step):
        if t0 % (step * 256) == 0:
            progress(f"{label}: {t0 * S:,}/{L * S:,} events")
        n = min(step, L - t0)
        ks = keys if n == step else [k for k in names for _ in range(n)]
        x = segs[:, t0:t0 + n].reshape(S * n, *segs.shape[2:])
        r = op.process(ks, x)
        loss[:, t0:t0 + n] = loss_of(r.prev_outputs, (np.arange(S * n),), x).reshape(S, n)
        healed[:, t0:t0 + n] = (r.reset == HEALTH).reshape(S, n)
        if r.bad_health is not None:
            worst = max(worst, r.bad_health / S)
    if heal_mask:
        return loss, op.health_counts.heals, worst, healed
    return loss, op.health_counts.heals, worst


def eval_health(model: Model, data: bytes, *, text: str = "text", streams: int = 32, step: int = 4,
                reset_every: int = 64, heal: Any = "heal", progress: Progress = _quiet) -> HealthEval:
    """Bits/char of carried state, reset-every-N, ``flag`` and ``heal`` on ``data`` split into ``streams``
    contiguous streams (keys), ``step`` bytes per key per call. Each stream's first byte is not scored by
    any policy (nothing predicted it); reset-every-N scores a window's first byte by the previous window.

    ``heal`` may watch every stream at once unless its config says otherwise (``max_watch``), as the operator's
    default allows: the measure is of the rule (a bound of a quarter of the streams missed the out-of-domain
    target by 0.23 bits/char, docs/operator.md)."""
    if model.spec.task != "lm":
        raise InputError(f"eval health: model task: expected 'lm', got {model.spec.task!r}")
    L = len(data) // streams
    if L < 2:
        raise InputError(f"eval health: text: expected at least {2 * streams} bytes, got {len(data)}")
    step = min(step, L)  # more bytes per call than a stream holds: the whole stream in one call
    from ..keyed.health import HealthConfig

    if heal == "heal":
        heal = HealthConfig("heal")
    if isinstance(heal, HealthConfig) and heal.max_watch is None:
        heal = replace(heal, max_watch=streams)
    max_watch = heal.max_watch if isinstance(heal, HealthConfig) else max(1, streams // 4)
    t = time.perf_counter()
    segs = np.frombuffer(data[:L * streams], np.uint8).astype(np.int64).reshape(streams, L)
    lps, heals = {}, 0
    worst = 0.0
    for policy in ("off", "flag", "heal"):
        loss, h, w = policy_run(model, segs, step, heal if policy == "heal" else policy, progress,
                                f"{text}, health={policy}")
        lps["carried" if policy == "off" else policy] = -loss[:, 1:]
        if policy == "heal":
            heals, worst = h, w
    progress(f"{text}, state reset every {reset_every} bytes")
    every = min(reset_every, L)  # a window longer than the stream never resets
    lps[f"reset{reset_every}"] = np.stack([reset_logprobs(model, segs[i], every) for i in range(streams)])
    bits = {k: -float(np.mean(v)) / math.log(2) for k, v in lps.items()}
    scored = streams * (L - 1)
    return HealthEval(text=text, n_bytes=L * streams, streams=streams, step=step, scored_bytes=scored,
                      bits_per_char=bits, heals=heals, heal_rate_per_kib=heals / (scored / 1024), max_watch=max_watch,
                      max_bad_share=worst, seconds=time.perf_counter() - t)
