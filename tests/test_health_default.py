"""The default health policy (issue 17): ``health=None`` flags where the model can judge a key's state by itself (a
next-token model with a reference loss: the shipped charlm), and is ``off`` elsewhere (a model without a reference
would write only unknown ``state_health``; a task without a loss cannot flag at all); the default watch bound lets
every key be watched."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import streamrnn
from streamrnn import NextTokenOperator
from streamrnn.beam import StatefulInference
from streamrnn.errors import InputError
from streamrnn.keyed.health import HealthConfig, default_policy, policy_of, resolve
from streamrnn.keyed.operator import KeyedOperator
from streamrnn.model.loaded import load
from streamrnn.model.runtime import CPU
from streamrnn.model.shipped import resolve as shipped


@pytest.fixture(scope="module")
def charlm():
    return load(streamrnn.DEFAULT_MODEL, providers=[CPU])


@pytest.fixture(scope="module")
def market():
    return load(shipped("shipped:market"), providers=[CPU])


def test_charlm_flags_by_default_as_health_flag(charlm):
    """The default is flag itself: the same state_health and bad-health counts as health='flag', from the reference
    loss the model's spec carries."""
    text = np.frombuffer(b"Hello there, how are you?" + bytes(range(200, 240)), np.uint8).astype(np.int64)
    keys = ["en"] * 25 + ["odd"] * 40
    default, flag = KeyedOperator(charlm, max_keys=8), KeyedOperator(charlm, max_keys=8, health="flag")
    assert default.health == flag.health and default.health.reference == charlm.spec.metrics["val_nats_per_char"]
    for lo, hi in ((0, 30), (30, 65)):  # two calls: the EW loss carries over
        a, b = default.process(keys[lo:hi], text[lo:hi]), flag.process(keys[lo:hi], text[lo:hi])
        np.testing.assert_array_equal(a.state_health, b.state_health)
        assert a.bad_health == b.bad_health
    assert a.bad_health == 1 and a.state_health[-1] > 1.15  # bytes charlm never saw: in bad health
    assert NextTokenOperator(charlm).keyed.health.policy == "flag"


def test_models_without_a_reference_are_off_by_default(lstm, market, nets_and_paths):
    """A next-token model without val_nats_per_char, a forecaster (its val_nll is no reference), and a model of
    a task without a loss (task 'forecast' without training.forecast): off, results as before."""
    feats = load(nets_and_paths[("lstm", "features")][1], providers=[CPU])
    for m in (lstm, market, feats):
        assert default_policy(m.spec) == "off" and KeyedOperator(m).health.policy == "off"
    r = KeyedOperator(lstm).process(["a", "a"], np.array([1, 2]))
    assert r.state_health is None and r.bad_health is None
    # flag where asked: a forecaster (unknown state_health without a reference), but not a task without a loss
    assert KeyedOperator(market, health="flag").health.policy == "flag"
    with pytest.raises(InputError) as e:
        KeyedOperator(feats, health="flag")
    assert "\n" not in str(e.value) and "pass health='off'" in str(e.value)


def test_a_spec_reference_that_is_no_number_is_off_by_default_and_refused_when_flagged(lstm):
    spec = dataclasses.replace(lstm.spec, metrics={"val_nats_per_char": float("nan")})
    model = type("M", (), {"spec": spec})()
    assert default_policy(spec) == "off" and resolve(None, model, 4).policy == "off"
    with pytest.raises(InputError, match=r"^KeyedOperator: health.reference: expected a positive number of nats, "
                                         r"got nan$"):
        resolve("flag", model, 4)


def test_every_key_may_be_watched_by_default(lstm):
    assert resolve("heal", lstm, 1000).max_watch == 1000
    assert resolve(HealthConfig("heal", max_watch=3), lstm, 1000).max_watch == 3
    with pytest.raises(InputError, match="health.max_watch: expected an int >= 0, got True"):
        resolve(HealthConfig("heal", max_watch=True), lstm, 1000)


def test_policy_of(charlm, market):
    assert [policy_of(None, charlm.spec), policy_of(None, market.spec)] == ["flag", "off"]
    assert policy_of("heal", market.spec) == "heal" and policy_of(HealthConfig("flag"), charlm.spec) == "flag"


def test_the_transform_takes_the_models_default(market):
    assert StatefulInference(model=streamrnn.DEFAULT_MODEL, providers=[CPU]).health == "flag"
    assert StatefulInference(model=shipped("shipped:market"), providers=[CPU]).health == "off"
    assert StatefulInference(model=streamrnn.DEFAULT_MODEL, providers=[CPU], health="off").health == "off"


def test_bad_health_counts_keys_above_one_plus_bad_margin_not_the_watch_level(charlm):
    """Bad health (the result's count, the gauge) is state_health above 1 + bad_margin (1.5), not the watch level
    1.15: English text of varying difficulty puts keys between the two, and they are not counted; bytes charlm
    never saw are. Counted against the results' own state_health, under both the defaults and other margins."""
    english = (b"Whether 'tis nobler in the mind to suffer the slings and arrows of outrageous fortune, or to "
               b"take arms against a sea of troubles. ZQXJ KVWY qzxj 1987 ^^ {} ~~ 0x7f " * 3)
    odd = bytes(range(160, 256)) * 3
    streams = {"en": english, "odd": odd, **{f"w{i}": english[i * 7:] for i in range(6)}}
    for cfg in (HealthConfig("flag"), HealthConfig("flag", bad_margin=0.2), HealthConfig("flag", bad_margin=3.0)):
        op = KeyedOperator(charlm, max_keys=16, health=cfg)
        seen_between = False
        for t0 in range(0, 240, 16):
            keys = [k for k, s in streams.items() for _ in s[t0:t0 + 16]]
            x = np.frombuffer(b"".join(s[t0:t0 + 16] for s in streams.values()), np.uint8).astype(np.int64)
            r = op.process(keys, x)
            last = {k: h for k, h in zip(keys, r.state_health, strict=True)}  # each key's last event of the call
            want = sum(1 for h in last.values() if h > 1.0 + cfg.bad_margin)
            assert r.bad_health == want == op.bad_health_keys(), (cfg.bad_margin, t0)
            seen_between |= any(1.15 < h <= 1.5 for h in last.values())
        assert seen_between  # the threshold matters: some English key sat between the watch level and bad health
    with pytest.raises(InputError, match="health.bad_margin: expected a finite number > -1.0"):
        KeyedOperator(charlm, health=HealthConfig("flag", bad_margin=float("nan")))
