"""eval lm: carried vs reset scoring against direct computation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from streamrnn import InputError, lm
from streamrnn.lm.evaluate import carried_logprobs, eval_lm, reset_logprobs
from streamrnn.model.loaded import load
from streamrnn.model.runtime import CPU

TEXT = b"First Citizen:\nBefore we proceed any further, hear me speak.\n" * 3


@pytest.fixture()
def m(lstm_path):
    return load(lstm_path, providers=[CPU])


def test_carried_equals_whole_sequence_scoring(m):
    toks = lm.encode(TEXT)
    whole, _ = m.step(toks[None, :-1])
    ref = lm.token_logprob(whole["logprobs"][0], toks[1:])
    for chunk in (1, 7, 64, 10_000):
        np.testing.assert_allclose(carried_logprobs(m, toks, chunk), ref, atol=1e-5)


@pytest.mark.parametrize("every", [1, 5, 16, 64])
def test_reset_scoring_restarts_state_each_window(m, every):
    toks = lm.encode(TEXT)
    got = reset_logprobs(m, toks, every, batch=3)
    ref = []
    for start in range(0, len(toks) - 1, every):
        window = toks[start:min(start + every, len(toks) - 1)]
        o, _ = m.step(window[None])  # fresh state for every window
        ref.extend(lm.token_logprob(o["logprobs"][0], toks[start + 1:start + 1 + len(window)]))
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_eval_lm_report(m):
    r = eval_lm(m, TEXT, chunk=13, reset_every=16, parity_bytes=50)
    toks = lm.encode(TEXT)
    assert r.n_bytes == len(TEXT) and r.parity_bytes == 50 and r.parity_max_abs <= 1e-5
    assert r.nats_per_char == pytest.approx(-carried_logprobs(m, toks, 100).mean(), abs=1e-6)
    assert r.bits_per_char == pytest.approx(r.nats_per_char / math.log(2))
    assert r.bits_per_char_reset == pytest.approx(-reset_logprobs(m, toks, 16).mean() / math.log(2), abs=1e-6)


def test_eval_lm_bad_input(m):
    with pytest.raises(InputError, match="text: expected at least 2 bytes, got 1"):
        eval_lm(m, b"a")
    with pytest.raises(InputError, match="expected >= 1"):
        eval_lm(m, TEXT, chunk=0)
