"""Next-token helpers for byte-level language models (task ``lm``).

>>> import numpy as np, streamrnn
>>> from streamrnn import lm
>>> m = streamrnn.load(streamrnn.DEFAULT_MODEL)
>>> out, state = m.step(lm.encode("ROMEO:").reshape(1, -1))
>>> tokens, probs = lm.topk(out["logprobs"][0, -1], 3)
>>> tokens.shape, bool(probs[0] >= probs[1] >= probs[2])
((3,), True)
>>> text = lm.generate(m, state, out["logprobs"][0, -1], 20, greedy=True)
>>> len(text)
20
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError
from ..keyed.operator import Key, KeyedOperator, summary_repr
from ..model.loaded import Model, State


def encode(text: str | bytes) -> np.ndarray:
    """UTF-8 bytes of ``text`` as int64 tokens ``[len]``."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return np.frombuffer(data, dtype=np.uint8).astype(np.int64)


def decode(tokens: Sequence[int] | np.ndarray) -> str:
    """Tokens back to text (invalid UTF-8 sequences are replaced)."""
    return bytes(np.asarray(tokens, dtype=np.uint8).tolist()).decode("utf-8", errors="replace")


def probs(logprobs: np.ndarray) -> np.ndarray:
    """Next-token probabilities ``[..., V]`` from log-probabilities."""
    return np.exp(logprobs)


def topk(logprobs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most likely next tokens and their probabilities, most likely first: ``[..., k]`` each.

    Equal values are ordered by token.
    """
    logprobs = np.asarray(logprobs)
    V = logprobs.shape[-1]
    if not 1 <= k <= V:
        raise InputError(f"topk: k: expected 1..{V}, got {k}")
    if k > _ARGMAX_K or logprobs.ndim == 1:
        tok, lp = _topk_sort(logprobs, k)
        return tok, np.exp(lp)
    # Many rows, small k: k passes of argmax over chunks of rows that stay in cache (3x faster than a
    # partition of the whole array at 256 tokens, k=5). A row with fewer than k values above -inf (or a
    # NaN) takes the sort below, so the result is the same either way.
    flat = logprobs.reshape(-1, V)
    n = flat.shape[0]
    tok = np.empty((n, k), np.int64)
    val = np.empty((n, k), flat.dtype)
    for s in range(0, n, _CHUNK):
        w = flat[s:s + _CHUNK].copy()
        rows = np.arange(len(w))
        for j in range(k):
            a = w.argmax(axis=-1)
            tok[s:s + len(w), j] = a
            val[s:s + len(w), j] = w[rows, a]
            w[rows, a] = -np.inf
        bad = ~(val[s:s + len(w), k - 1] > -np.inf)
        if bad.any():
            i = s + np.flatnonzero(bad)
            tok[i], val[i] = _topk_sort(flat[i], k)
    return tok.reshape(*logprobs.shape[:-1], k), np.exp(val).reshape(*logprobs.shape[:-1], k)


_ARGMAX_K = 16
_CHUNK = 4096


def _topk_sort(logprobs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, log-probabilities) of the ``k`` largest, by a partition and a sort."""
    part = np.argpartition(-logprobs, k - 1, axis=-1)[..., :k]
    lp = np.take_along_axis(logprobs, part, axis=-1)
    # ties lowest token first, as the argmax path
    order = np.lexsort((part, -lp), axis=-1)
    return np.take_along_axis(part, order, axis=-1), np.take_along_axis(lp, order, axis=-1)


def token_logprob(logprobs: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """``logprobs[..., tokens]``: the log-probability the model gave to each actual token."""
    return np.take_along_axis(logprobs, np.asarray(tokens, np.int64)[..., None], axis=-1)[..., 0]


def sample(logprobs: np.ndarray, rng: np.random.Generator, *, temperature: float = 1.0,
           top_k: int | None = None, greedy: bool = False) -> int:
    """Draw one token from a ``[V]`` log-probability row."""
    if greedy:
        return int(np.argmax(logprobs))
    if not temperature > 0:
        raise InputError(f"sample: temperature: expected > 0, got {temperature}")
    z = logprobs.astype(np.float64) / temperature
    if top_k is not None:
        cut = np.partition(z, -top_k)[-top_k]
        z = np.where(z >= cut, z, -np.inf)
    p = np.exp(z - z.max())
    return int(rng.choice(len(p), p=p / p.sum()))


def generate(model: Model, state: State, last_logprobs: np.ndarray, n: int, *, temperature: float = 1.0,
             top_k: int | None = None, greedy: bool = False, seed: int | None = None) -> str:
    """Generate ``n`` bytes continuing from ``state`` (batch 1), whose last output was ``last_logprobs [V]``.

    ``state`` is not modified (``step`` never mutates its input).
    """
    if n < 0:
        raise InputError(f"generate: n: expected >= 0, got {n}")
    rng = np.random.default_rng(seed)
    lp = np.asarray(last_logprobs, np.float32)
    out = []
    st = state
    for _ in range(n):
        t = sample(lp, rng, temperature=temperature, top_k=top_k, greedy=greedy)
        out.append(t)
        o, st = model.step(np.array([[t]], np.int64), st)
        lp = o["logprobs"][0, -1]
    return decode(out)


@dataclass
class NextTokenResult:
    """Per-event next-token results, aligned with the events of one call.

    ``logprob`` is the log-probability the model had given this event's token before
    it arrived (online loss; NaN for a key's first token). ``topk_tokens`` /
    ``topk_probs`` ``[N, k]`` predict the token after this one. ``reset`` says why a
    fresh event started fresh (:class:`~streamrnn.keyed.operator.KeyedResult`).
    """

    pos: np.ndarray
    fresh: np.ndarray
    logprob: np.ndarray
    topk_tokens: np.ndarray
    topk_probs: np.ndarray
    logprobs: np.ndarray
    reset: np.ndarray = field(default_factory=lambda: np.zeros(0, object))
    #: with health on (:mod:`streamrnn.keyed.health`): each event's state health and the call's keys in bad health
    state_health: np.ndarray | None = None
    bad_health: int | None = None

    def __repr__(self) -> str:
        return summary_repr(self)


class NextTokenOperator:
    """Online next-token prediction per key, on a :class:`KeyedOperator`.

    >>> import numpy as np, streamrnn
    >>> op = streamrnn.NextTokenOperator(streamrnn.load(streamrnn.DEFAULT_MODEL), k=5)
    >>> r = op.observe(["s1", "s1"], streamrnn.lm.encode("Th"))
    >>> bool(np.isnan(r.logprob[0])), bool(r.logprob[1] < 0), r.topk_tokens.shape
    (True, True, (2, 5))
    >>> before = op.keyed.state_of("s1")["h"].copy()
    >>> len(op.generate("s1", 10, seed=0)) == 10 and bool((op.keyed.state_of("s1")["h"] == before).all())
    True
    """

    def __init__(self, model: Model, *, k: int = 5, max_keys: int = 1_000_000, ttl: float | None = None,
                 clock=None, health=None):
        if model.spec.task != "lm":
            raise InputError(f"NextTokenOperator: model task: expected 'lm', got {model.spec.task!r}")
        V = model.spec.input.vocab_size
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 1 <= k <= V:
            raise InputError(f"NextTokenOperator: k: expected an int in 1..{V}, got {k!r}")
        self.k = int(k)
        kw = {} if clock is None else {"clock": clock}
        self.keyed = KeyedOperator(model, max_keys=max_keys, ttl=ttl, keep_last_output=True, health=health, **kw)

    @property
    def model(self) -> Model:
        return self.keyed.model

    def observe(self, keys: Sequence[Key], tokens: np.ndarray) -> NextTokenResult:
        """Feed one token per event (keys may repeat, in order); score and predict."""
        r = self.keyed.process(keys, tokens)
        lp = r.outputs["logprobs"]
        prev = r.prev_outputs["logprobs"]
        actual = token_logprob(prev, np.asarray(tokens))  # NaN rows stay NaN
        tk, tp = topk(lp, self.k)
        return NextTokenResult(r.pos, r.fresh, actual, tk, tp, lp, r.reset, r.state_health, r.bad_health)

    def generate(self, key: Key, n: int, *, prompt: str | bytes = b"", **kw) -> str:
        """Continue ``key``'s stream by ``n`` bytes without changing its carried state (a key past the TTL has
        none: it needs a prompt, like a new key)."""
        state = self.keyed.state_of(key)
        last = self.keyed.last_output(key)
        lp = None if last is None else last["logprobs"]
        if prompt:
            o, state = self.model.step(encode(prompt)[None], state)
            lp = o["logprobs"][0, -1]
        if lp is None or np.isnan(lp).any():
            raise InputError(f"generate: key {key!r}: expected a key with history or a prompt, got neither")
        return generate(self.model, state, lp, n, **kw)
