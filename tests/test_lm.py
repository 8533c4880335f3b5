"""Next-token helpers: top-k, online log-prob of the actual next token, generation."""

from __future__ import annotations

import numpy as np
import pytest

from streamrnn import InputError, NextTokenOperator, lm
from streamrnn.model.loaded import load
from streamrnn.model.runtime import CPU


def test_encode_decode_round_trip():
    s = "héllo, wörld\n"
    assert lm.decode(lm.encode(s)) == s
    assert lm.encode(b"\x00\xff").tolist() == [0, 255]


def test_topk_matches_full_sort(rng):
    lp = np.log(rng.dirichlet(np.ones(256), size=(3, 4))).astype(np.float32)
    tok, p = lm.topk(lp, 7)
    ref = np.argsort(-lp, axis=-1, kind="stable")[..., :7]
    np.testing.assert_array_equal(np.sort(tok, -1), np.sort(ref, -1))
    np.testing.assert_allclose(p, np.exp(np.take_along_axis(lp, ref, -1)), rtol=1e-6)
    assert (np.diff(p, axis=-1) <= 0).all()
    with pytest.raises(InputError, match="k: expected 1..256, got 0"):
        lm.topk(lp, 0)


def test_online_logprob_equals_offline_scoring(lstm_path):
    m = load(lstm_path, providers=[CPU])
    text = lm.encode("To be, or not to be")
    op = NextTokenOperator(m, k=3)
    # feed in two calls, interleaved with another key
    r1 = op.observe(["a"] * 6 + ["b"] * 2, np.concatenate([text[:6], text[:2]]))
    r2 = op.observe(["a"] * (len(text) - 6), text[6:])
    got = np.concatenate([r1.logprob[:6], r2.logprob])
    whole, _ = m.step(text[None])
    ref = lm.token_logprob(whole["logprobs"][0, :-1], text[1:])
    assert np.isnan(got[0]) and np.isnan(r1.logprob[6])
    np.testing.assert_allclose(got[1:], ref, atol=1e-5)
    assert r2.pos.tolist() == list(range(6, len(text)))
    tk, _ = lm.topk(whole["logprobs"][0, -1], 3)
    np.testing.assert_array_equal(r2.topk_tokens[-1], tk)


def test_generate_does_not_disturb_state(lstm_path):
    m = load(lstm_path, providers=[CPU])
    op = NextTokenOperator(m)
    op.observe(["s"] * 5, lm.encode("Hello"))
    h, c = op.keyed.state_of("s")
    a = op.generate("s", 25, seed=7)
    b = op.generate("s", 25, seed=7)
    assert a == b and len(a.encode("utf-8", errors="surrogateescape")) >= 1
    h2, c2 = op.keyed.state_of("s")
    assert (h == h2).all() and (c == c2).all() and op.keyed.steps_of("s") == 5
    # continuing the stream after generation equals never having generated
    fresh = NextTokenOperator(m)
    fresh.observe(["s"] * 5, lm.encode("Hello"))
    np.testing.assert_array_equal(op.observe(["s"], [33]).logprobs, fresh.observe(["s"], [33]).logprobs)


def test_greedy_generation_matches_manual_loop(lstm_path):
    m = load(lstm_path, providers=[CPU])
    prompt = lm.encode("abc")
    o, st = m.step(prompt[None])
    got = lm.generate(m, st, o["logprobs"][0, -1], 10, greedy=True)
    toks, lp, s = [], o["logprobs"][0, -1], st
    for _ in range(10):
        t = int(np.argmax(lp))
        toks.append(t)
        o2, s = m.step(np.array([[t]]), s)
        lp = o2["logprobs"][0, -1]
    assert got == lm.decode(toks)


def test_generate_needs_history_or_prompt(lstm_path):
    op = NextTokenOperator(load(lstm_path, providers=[CPU]))
    with pytest.raises(InputError, match="expected a key with history or a prompt"):
        op.generate("nobody", 5)
    assert isinstance(op.generate("nobody", 5, prompt="Hi", seed=0), str)


def test_sampling_respects_top_k_and_temperature(rng):
    lp = np.log(np.array([0.5, 0.3, 0.2] + [0.0] * 253) + 1e-30).astype(np.float32)
    draws = {lm.sample(lp, rng, top_k=2) for _ in range(200)}
    assert draws == {0, 1}
    with pytest.raises(InputError, match="temperature: expected > 0"):
        lm.sample(lp, rng, temperature=0)


def test_next_token_operator_needs_lm(nets_and_paths):
    m = load(nets_and_paths[("lstm", "features")][1], providers=[CPU])
    with pytest.raises(InputError, match="model task: expected 'lm', got 'forecast'"):
        NextTokenOperator(m)
