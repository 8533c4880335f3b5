"""Carried-state health of the forecaster (issue 17): its loss is the NLL of the realised bar under the previous bar's
one-bar-ahead Student-t forecast (the anchored scale), checked against scipy's t density anchored by the previous
bar's own ``log_vol``, and against the market job's ``ForecastPostprocess`` logprob; the rule around it is the
documented one (the event-by-event reference of tests/test_health_splits.py, with this loss), whatever the split
into calls; and in ``StatefulInference`` warm, cold and retried flushes give the same outputs and stores, equal
to the operator's."""

from __future__ import annotations

import math
import pathlib

import numpy as np
import pytest
from scipy import stats
from shard_harness import Scenario, runs_in_every_mode
from test_health_splits import _run, reference

from streamrnn.beam import Event, StatefulInference
from streamrnn.errors import InputError
from streamrnn.forecast.beam import ForecastPostprocess
from streamrnn.forecast.evaluate import forecast_meta
from streamrnn.forecast.features import FeatureConfig, offline_features
from streamrnn.forecast.synthetic import simulate, with_returns
from streamrnn.keyed.health import HEALTH, HealthConfig, task_loss
from streamrnn.keyed.operator import KeyedOperator
from streamrnn.model.loaded import load
from streamrnn.model.runtime import CPU

MODEL = str(pathlib.Path(__file__).resolve().parent.parent / "exported" / "market.onnx")
KEYS = ("AAA", "BBB", "JMP")
N_EACH = 40
#: as tests/test_health_splits.py's; "sampled" is the forecaster's default watch rule (no reference)
CONFIGS = {
    "strikes": HealthConfig("heal", reference=1e-3, window=5, warmup=1, patience=2, margin=-1e9),
    "real": HealthConfig("heal", reference=1e-3, window=6, warmup=2, patience=1, margin=0.0, half_life=8.0),
    "sampled": HealthConfig("heal", window=4, sample_every=3, warmup=0, patience=1, margin=-1e9),
    "flag": HealthConfig("flag", reference=2.0, half_life=4.0),
}


@pytest.fixture(scope="module")
def model():
    return load(MODEL, providers=[CPU])


@pytest.fixture(scope="module")
def feats(model) -> dict[str, np.ndarray]:
    """Per symbol, N_EACH bars' features (float32, as the job's events): two GARCH series, and one of calm 1% days
    with a break to 4% and a +65% corporate-action jump (a bar that is not scored)."""
    cfg = FeatureConfig(**forecast_meta(model)["features"])
    sim = simulate(["AAA", "BBB"], start="2016-01-01", end="2016-04-01", seed=4)
    rng = np.random.default_rng(5)
    r = np.concatenate([rng.standard_normal(15), 4.0 * rng.standard_normal(25)])
    r[20] = 100.0 * math.log(1.65)
    out = {b.symbol: offline_features(b, cfg).x[:N_EACH].astype(np.float32) for b in sim}
    out["JMP"] = offline_features(with_returns(r, symbol="JMP"), cfg).x.astype(np.float32)
    assert out["JMP"][20, 7] == 1.0 and all(len(v) == N_EACH for v in out.values())
    return out


def scipy_loss(meta: dict):
    """The loss by hand: -log t(df_1) density of the bar's return (x0 * exp(x5)) at loc = sd * mean and scale
    sd * exp(log_scale), sd = exp(the previous bar's log_vol as the graph read it, float32); NaN on a jump bar."""
    df = meta["df"][0]

    def loss(last: dict, prev_x, x) -> float:
        if x[7] > 0.5:
            return math.nan
        lv = float(np.float32(prev_x[5]))
        ret = float(x[0]) * math.exp(float(x[5]))
        return -float(stats.t.logpdf(ret, df, loc=math.exp(lv) * float(last["mean"][0]),
                                     scale=math.exp(lv + float(last["log_scale"][0]))))

    return loss


def _interleaved(feats: dict, seed: int) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    keys = [k for k in KEYS for _ in range(N_EACH)]
    rng.shuffle(keys)
    pos = dict.fromkeys(KEYS, 0)
    x = []
    for k in keys:
        x.append(feats[k][pos[k]])
        pos[k] += 1
    return keys, np.stack(x)


def _same(got: dict, want: dict, where) -> None:
    assert [got["reset"][i] for i in np.flatnonzero(where)] == list(want["reset"])
    np.testing.assert_allclose(got["health"][where], want["health"], rtol=1e-5, equal_nan=True)
    np.testing.assert_allclose(got["logprobs"][where], want["logprobs"], atol=2e-5)  # the "mean" output
    np.testing.assert_allclose(got["prev"][where], want["prev"], atol=2e-5, equal_nan=True)


@pytest.fixture(scope="module")
def one_call(model, feats):
    meta = forecast_meta(model)
    cache: dict = {}

    def get(name: str, seed: int):
        if (name, seed) not in cache:
            keys, x = _interleaved(feats, seed)
            got, op = _run(model, CONFIGS[name], keys, x, [])
            refs = {k: reference(model, CONFIGS[name], feats[k], scipy_loss(meta)) for k in KEYS}
            cache[(name, seed)] = keys, x, got, op, refs
        return cache[(name, seed)]

    return get


def test_loss_is_the_t_nll_under_the_previous_anchored_forecast(model, feats):
    """The EW loss of one key, fed bar by bar, is the recursion of scipy's NLL; the first bar and the jump bar are
    not scored; and each loss is minus the market job's ``logprob`` (ForecastPostprocess, the model's location)."""
    meta = forecast_meta(model)
    cfg = HealthConfig("flag", reference=1.7, half_life=3.0)
    x = feats["JMP"]
    op = KeyedOperator(model, keep_last_output=True, health=cfg)
    r = op.process(["JMP"] * len(x), x)
    loss = scipy_loss(meta)
    want, num, den = [], 0.0, 0.0
    for t in range(len(x)):
        if t:
            lt = loss({n: v[t] for n, v in r.prev_outputs.items()}, x[t - 1], x[t])
            if not math.isnan(lt):
                num, den = (1 - cfg.alpha) * num + cfg.alpha * lt, (1 - cfg.alpha) * den + cfg.alpha
        want.append(num / den / 1.7 if den else math.nan)
    np.testing.assert_allclose(r.state_health, want, rtol=1e-6, equal_nan=True)
    assert math.isnan(r.state_health[0]) and r.state_health[20] == r.state_health[19]  # the jump: no change
    post = ForecastPostprocess.for_model(meta, "model")(x, r.outputs, r.prev_outputs)
    mine = task_loss(model.spec)(r.prev_outputs, (np.arange(len(x)),), x)
    np.testing.assert_array_equal(mine, -post["logprob"])
    assert np.isnan(mine[[0, 20]]).all() and np.isfinite(np.delete(mine, [0, 20])).all()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_one_call_equals_the_reference(one_call, name):
    keys, _, got, op, refs = one_call(name, 0)
    for k in KEYS:
        _same(got, refs[k], np.array(keys) == k)
    if name != "flag":
        assert op.health_counts.heals > 0 and HEALTH in got["reset"]


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("split", ["each", "sevens", "random"])
def test_any_split_equals_one_call(model, one_call, name, split):
    keys, x, whole, op1, refs = one_call(name, 1)
    n = len(keys)
    rng = np.random.default_rng(7)
    cuts = {"each": list(range(1, n)), "sevens": list(range(7, n, 7)),
            "random": sorted(rng.choice(np.arange(1, n), 25, replace=False).tolist())}[split]
    got, op = _run(model, CONFIGS[name], keys, x, cuts)
    for k in KEYS:
        _same(got, refs[k], np.array(keys) == k)
    assert got["reset"] == whole["reset"] and op.health_counts == op1.health_counts


def test_a_forecaster_samples_its_watches_and_a_features_model_without_a_distribution_is_refused(model, tmp_path):
    op = KeyedOperator(model, health="heal")
    assert op.health.reference is None  # val_nll is not a per-key level (streamrnn.keyed.health)
    assert KeyedOperator(model, health=HealthConfig("flag", reference=1.5)).health.reference == 1.5
    from conftest import make_net

    from streamrnn.train.export import export
    path = tmp_path / "feat.onnx"
    export(make_net("lstm", kind="features"), path, name="tiny-feat")
    bare = load(str(path), providers=[CPU])
    with pytest.raises(InputError) as e:
        KeyedOperator(bare, health="flag")
    assert str(e.value) == ("KeyedOperator: health='flag': expected a next-token model (task 'lm') or a forecaster "
                            "(task 'forecast' with training.forecast), got task 'forecast' without "
                            "training.forecast; pass health='off'")
    KeyedOperator(bare, health="off")
    StatefulInference(model=MODEL, health="heal")  # the transform takes a forecaster's health too


# -- StatefulInference ------------------------------------------------------------------------------------------
def _scenario(feats: dict, windows: int = 5) -> Scenario:
    """The three symbols' bars over ``windows`` windows of 10 s, arriving out of order, a watermark after each."""
    rng = np.random.default_rng(2)
    per = N_EACH // windows
    steps = []
    for w in range(windows):
        evs = []
        for k in KEYS:
            ts = np.sort(rng.uniform(w * 10.0, w * 10.0 + 9.9, per))
            evs += [Event(k, round(float(t), 3), w * per + i, feats[k][w * per + i].tolist())
                    for i, t in enumerate(ts)]
        rng.shuffle(evs)
        steps += [("add", evs), ("wm", w * 10.0 + 10.5)]
    return Scenario(steps=steps, window=10.0, num_shards=2)


@pytest.fixture(scope="module")
def beam_runs(feats):
    sc, out = _scenario(feats), {}
    for name in ("sampled", "real"):
        out[name] = {m: h.result() for m, h in runs_in_every_mode(MODEL, sc, health=CONFIGS[name]).items()}
    return sc, out


@pytest.mark.parametrize("name", ["sampled", "real"])
def test_beam_warm_cold_and_retried_flushes_give_the_same_outputs_and_stores(beam_runs, name):
    _, out = beam_runs
    base = out[name]["warm"]
    for mode, r in out[name].items():
        for part in ("outputs", "dead", "stores"):
            assert r[part] == base[part], f"{name}, {mode}: {part} differ from the warm run"
    rows = [dict(o[:-1]) for o in base["outputs"]]
    assert len(rows) == len(KEYS) * N_EACH and not base["dead"]
    assert any(r["reset"] == HEALTH for r in rows)


@pytest.mark.parametrize("name", ["sampled", "real"])
def test_beam_outputs_equal_the_keyed_operator(beam_runs, model, name):
    """Beam runs each key's bars in flushes of calls of at most 4 steps and 3 keys; the operator gets each key's
    whole stream in one call. Same heals at the same bars, state health and forecasts."""
    sc, out = beam_runs
    rows = [dict(o[:-1]) for o in out[name]["warm"]["outputs"]]
    op = KeyedOperator(model, keep_last_output=True, health=CONFIGS[name])
    for k in KEYS:
        mine = sorted((r for r in rows if r["key"] == k), key=lambda r: (r["ts"], r["seq"], r["sub"]))
        evs = sorted((e for kind, es in sc.steps if kind == "add" for e in es if e.key == k),
                     key=lambda e: (e.ts, e.seq, e.sub))
        r = op.process([k] * len(evs), np.array([e.x for e in evs], np.float32))
        assert [x["reset"] for x in mine] == r.reset.tolist()
        np.testing.assert_allclose([x["state_health"] if x["state_health"] != "nan" else np.nan for x in mine],
                                   r.state_health, rtol=1e-6, equal_nan=True)
        np.testing.assert_allclose(np.array([x["mean"] for x in mine], float), r.outputs["mean"], atol=2e-5)
