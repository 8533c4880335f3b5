"""Offline evaluation of a byte-level LM: carried state vs reset-every-N, and streaming parity."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from .errors import InputError
from .lm import token_logprob
from .model import Model


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


#: ``progress(status)``: told what a long evaluation is doing (the CLI's :class:`~streamrnn.cliargs.Heartbeat`)
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
