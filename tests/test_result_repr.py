"""A per-event result prints as one short line (issue 16): its counts and each field's dtype and shape, never
thousands of numbers."""

from __future__ import annotations

import numpy as np

from streamrnn.keyed.operator import KeyedOperator, KeyedResult


def test_a_keyed_results_repr_is_one_short_line(lstm):
    op = KeyedOperator(lstm, max_keys=100, keep_last_output=True)
    keys = [f"k{i % 40}" for i in range(400)]
    r = op.process(keys, np.arange(400) % 7)
    text = repr(r)
    V = r.outputs["logprobs"].shape[-1]
    assert "\n" not in text and len(text) < 200, text
    assert text.startswith(f"KeyedResult(400 events, 40 fresh; outputs={{logprobs: float32[400, {V}]}}"), text
    assert f"prev_outputs={{logprobs: float32[400, {V}]}}" in text and "reset=" in text


def test_one_event_is_singular():
    r = KeyedResult(outputs={}, pos=np.zeros(1, np.int64), fresh=np.ones(1, bool))
    assert repr(r) == "KeyedResult(1 event, 1 fresh; outputs={}, prev_outputs={}, reset=<U12[0])"


def test_a_next_token_results_repr_is_one_short_line(lstm):
    """The README's ``r``: one line however many events (it printed 12,757 characters for 3 bytes)."""
    from streamrnn import NextTokenOperator, lm

    r = NextTokenOperator(lstm, k=3).observe(["alice", "bob", "alice"], lm.encode("Hi!"))
    text = repr(r)
    assert "\n" not in text and len(text) < 250, text
    assert text.startswith("NextTokenResult(3 events, 2 fresh; logprob=float32[3], topk_tokens=int64[3, 3], "), text
