"""Carried-state health (issue 17): the EW loss, the shadow, heal, hysteresis, atomicity, snapshots, off."""

from __future__ import annotations

import numpy as np
import pytest
from test_atomic import Boom, _assert_same, _everything, _fail_on_call

from streamrnn import NextTokenOperator
from streamrnn.keyed.health import UNWATCHED, HealthConfig, ew_padded, scan
from streamrnn.keyed.operator import KeyedOperator
from streamrnn.keyed.slab import HEALTH_FILL
from streamrnn.lm import token_logprob

KEYS = ["a", "b", "c"]


def _stream(rng, n):
    return rng.integers(0, 256, (len(KEYS), n))


def _feed(op, toks, step):
    rs = []
    for t in range(0, toks.shape[1], step):
        x = toks[:, t:t + step]
        rs.append(op.process([k for k in KEYS for _ in range(x.shape[1])], x.reshape(-1)))
    return rs


def test_ew_loss_is_the_direct_recursion_of_the_logprobs(lstm, rng):
    cfg = HealthConfig("flag", half_life=5.0, reference=2.0)
    op = KeyedOperator(lstm, keep_last_output=True, health=cfg)
    toks = _stream(rng, 40)
    rs = _feed(op, toks, 3)
    a = cfg.alpha
    for i, k in enumerate(KEYS):
        lp = np.concatenate([token_logprob(r.prev_outputs["logprobs"], np.asarray(tok))[i * n:(i + 1) * n]
                             for r, tok, n in ((r, toks[:, j * 3:j * 3 + 3].reshape(-1), min(3, 40 - j * 3))
                                               for j, r in enumerate(rs))])
        num = den = 0.0
        want = []
        for x in -lp.astype(np.float64):
            if not np.isnan(x):
                num, den = (1 - a) * num + a * x, (1 - a) * den + a
            want.append(num / den / 2.0 if den else np.nan)
        got = np.concatenate([r.state_health[i * len(r.pos) // 3:(i + 1) * len(r.pos) // 3] for r in rs])
        np.testing.assert_allclose(got, want, rtol=1e-9)
        slot = op._store.slots[k]
        assert op._store.health["ew_num"][slot] == pytest.approx(num, rel=1e-12)


def test_ew_blocks_equal_one_block():
    rng = np.random.default_rng(0)
    loss = rng.random((4, 40))
    loss[rng.random((4, 40)) < 0.2] = np.nan
    a = 1 - 2 ** (-1 / 0.05)
    n1, d1 = ew_padded(np.ones(4), np.ones(4), loss, a, 0.05)  # blocks of 20 columns
    n2, d2 = ew_padded(np.ones(4), np.ones(4), loss, a, 1e9)
    np.testing.assert_allclose(n1, n2, rtol=1e-9)
    np.testing.assert_allclose(d1, d2, rtol=1e-9)


def _heal_cfg(**kw):
    base = dict(policy="heal", reference=1e-3, window=4, patience=1, margin=-1e9, warmup=0)
    return HealthConfig(**{**base, **kw})


def test_shadow_loss_equals_a_fresh_operator_over_the_same_window(lstm, rng):
    """Watched after the first call (reference tiny): the shadow starts fresh at event 2; its losses over the
    window equal an independent fresh NextTokenOperator fed the same events."""
    op = KeyedOperator(lstm, keep_last_output=True, health=_heal_cfg(margin=1e9))  # never heals
    toks = _stream(rng, 6)
    _feed(op, toks[:, :2], 2)
    assert (op._store.health["shadow_slot"][[op._store.slots[k] for k in KEYS]] >= 0).all()
    _feed(op, toks[:, 2:5], 3)
    fresh = NextTokenOperator(lstm)
    r = fresh.observe([k for k in KEYS for _ in range(3)], toks[:, 2:5].reshape(-1))
    want = -r.logprob.reshape(3, 3)[:, 1:].astype(np.float64).sum(axis=1)  # first event: nothing predicted it
    s = op._store
    got = s.health["win_shadow"][[s.slots[k] for k in KEYS]]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_heal_resets_the_state_and_the_shadow_goes_on_without_the_reset(lstm, rng):
    """A heal after the window's last event: the key's state becomes the initial state (its last output is kept:
    it predicts the next event), its shadow goes on as the state it had, and its next event says
    reset="health" and runs as a fresh key's first event."""
    op = KeyedOperator(lstm, keep_last_output=True, health=_heal_cfg())
    toks = _stream(rng, 7)
    _feed(op, toks[:, :2], 2)  # watch starts after this call
    rs = _feed(op, toks[:, 2:6], 4)  # a 4-step window closes: strike, patience 1: heal after its 4th event
    assert op.health_counts.heals == 3
    assert rs[0].reset.tolist() == [""] * 12
    off = KeyedOperator(lstm, keep_last_output=True, health="off")
    _feed(off, toks[:, :6], 3)
    s = op._store
    for k in KEYS:
        slot = s.slots[k]
        sh = s.health["shadow_slot"][slot]
        assert sh >= 0 and s.health["regime"][slot] == 1
        for n in ("h", "c"):
            assert not op.state_of(k)[n].any()
            np.testing.assert_allclose(s.shadow.slab[n][:, sh], off.state_of(k)[n][:, 0], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(op.last_output(k)["logprobs"], off.last_output(k)["logprobs"], atol=1e-5)
    r = op.process(KEYS, toks[:, 6])
    assert r.reset.tolist() == ["health"] * 3
    fresh = KeyedOperator(lstm, keep_last_output=True, health="off").process(KEYS, toks[:, 6])
    np.testing.assert_allclose(r.outputs["logprobs"], fresh.outputs["logprobs"], atol=1e-5)
    np.testing.assert_allclose(r.prev_outputs["logprobs"], off.process(KEYS, toks[:, 6]).prev_outputs["logprobs"],
                               atol=1e-5)


def _cols(B, **kw):
    cols = {n: np.full(B, fill, dt) for n, (dt, fill) in HEALTH_FILL.items()}
    cols.update(kw)
    return cols


def test_hysteresis_does_not_flap():
    """Strikes alternate with clean windows: patience 2 never heals; two strikes in a row do."""
    cfg = HealthConfig("heal", reference=1.0, window=2, patience=2, margin=0.1, warmup=0, max_watch=10)
    cols = _cols(1, shadow_slot=np.array([0]), ew_num=np.array([5.0]), ew_den=np.array([1.0]))
    heals = []
    for carried, shadow in [(2.0, 1.0), (1.0, 1.0), (2.0, 1.0), (1.0, 1.5), (2.0, 1.0), (2.0, 1.0)]:
        v = scan(cfg, cols, np.full((1, 2), carried), np.full((1, 2), shadow), np.array([2]), np.array([10]),
                 np.array([True]), 9, _no_fresh)
        heals.append(bool(v.heal[0]))
        assert v.shadow[0] != UNWATCHED  # watched again at once (ew 5 > 1.3): a fresh shadow with the next call
        cols = v.cols
    assert heals == [False, False, False, False, False, True]


def _no_fresh(asks):
    raise AssertionError(f"no fresh shadow expected within the call, got {asks}")


def test_a_failed_call_changes_no_health_field(lstm, monkeypatch, rng):
    op = KeyedOperator(lstm, keep_last_output=True, health=_heal_cfg(margin=1e9), pack_step_cost=0.0)
    _feed(op, _stream(rng, 3), 3)
    before = _everything(op), op.health_counts.heals
    _fail_on_call(monkeypatch, lstm, 2)
    keys = ["a"] * 20 + ["b", "c", "d"]
    with pytest.raises(Boom):
        op.process(keys, rng.integers(0, 256, len(keys)))
    _assert_same(before[0], _everything(op))
    assert op.health_counts.heals == before[1]


@pytest.mark.parametrize("policy", ["flag", "heal"])
def test_restore_then_continue_equals_never_saved(lstm, rng, tmp_path, policy):
    cfg = _heal_cfg(margin=0.0, patience=2) if policy == "heal" else HealthConfig("flag", reference=1.0)
    toks = _stream(rng, 24)
    a = KeyedOperator(lstm, keep_last_output=True, health=cfg)
    _feed(a, toks[:, :10], 2)
    a.save(tmp_path / "s.parquet")
    b = KeyedOperator(lstm, keep_last_output=True, health=cfg)
    b.restore(tmp_path / "s.parquet")
    assert b.snapshot().equals(a.snapshot())  # restore then continue == never saved (wall clock aside)
    ra, rb = _feed(a, toks[:, 10:], 2), _feed(b, toks[:, 10:], 2)
    for x, y in zip(ra, rb, strict=True):
        np.testing.assert_array_equal(x.outputs["logprobs"], y.outputs["logprobs"])
        np.testing.assert_array_equal(x.state_health, y.state_health)
        assert x.reset.tolist() == y.reset.tolist()
    assert b.snapshot().drop_columns(["last_seen"]).equals(a.snapshot().drop_columns(["last_seen"]))


def test_off_gives_todays_results(lstm, rng):
    toks = _stream(rng, 12)
    off = KeyedOperator(lstm, keep_last_output=True, health="off")
    heal = KeyedOperator(lstm, keep_last_output=True, health=_heal_cfg(margin=1e9))
    for x, y in zip(_feed(off, toks, 3), _feed(heal, toks, 3), strict=True):
        assert x.state_health is None and x.bad_health is None
        np.testing.assert_array_equal(x.outputs["logprobs"], y.outputs["logprobs"])  # shadows change nothing
        np.testing.assert_array_equal(x.prev_outputs["logprobs"], y.prev_outputs["logprobs"])
    assert not any(c.startswith("health_") for c in off.snapshot().column_names)


def test_a_snapshot_of_no_keys_under_heal(lstm):
    """A shard's delta may name no held key: an empty snapshot with the shadow columns, restorable (its reshape of
    zero rows failed)."""
    op = KeyedOperator(lstm, health=HealthConfig("heal", reference=1e-3))
    op.process(["a"] * 3, np.array([1, 2, 3]))
    t = op.snapshot(keys=[])
    assert t.num_rows == 0 and any(c.startswith("shadow_last_") for c in t.column_names)
    assert KeyedOperator(lstm, health=HealthConfig("heal", reference=1e-3)).restore(t) == 0
