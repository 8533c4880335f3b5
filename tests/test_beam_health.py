"""Carried-state health in ``StatefulInference`` (issue 17): the health columns and shadows live in the shard store,
so warm, cold (cache dropped every flush) and failed-then-retried flushes give the same outputs and stores; the
outputs equal ``KeyedOperator(health=...)`` fed each key's events in (ts, seq, sub) order; ``state_health`` and
``reset="health"`` reach the outputs and the counters count the heals."""

from __future__ import annotations

import apache_beam as beam
import numpy as np
import pytest
import test_beam_transform as tbt
from beam_gather import Gather
from shard_harness import Harness, Scenario, assert_warm_equals_rebuilt, runs_in_every_mode

from streamrnn.beam import Event, StatefulInference
from streamrnn.beam.step.store import KeyMeta, ShardStore
from streamrnn.errors import InputError
from streamrnn.keyed.health import HEALTH, HealthConfig
from streamrnn.keyed.operator import KeyedOperator
from streamrnn.model.loaded import load
from streamrnn.model.runtime import CPU

beam_models = tbt.beam_models  # the session fixture of tiny models

KEYS = ("a", "b", "c")
#: the tiny model has no reference loss: "sampled" watches one window in two by step count and always strikes
#: (then resets again every 3 steps while that does better);
#: "real" watches every key (tiny reference) and strikes where the carried state does worse than the shadow
CONFIGS = {
    "sampled": HealthConfig("heal", window=4, sample_every=2, warmup=0, patience=1, margin=-1e9, reset_window=3),
    "real": HealthConfig("heal", reference=1e-3, window=5, warmup=1, patience=1, margin=0.0, half_life=8.0),
    "flag": HealthConfig("flag", reference=2.0, half_life=4.0),
}


def _scenario(seed: int, windows: int = 6) -> Scenario:
    """Events of three keys over ``windows`` windows of 10 s, out of order within a window, watermark after each."""
    rng = np.random.default_rng(seed)
    steps, seq = [], dict.fromkeys(KEYS, 0)
    for w in range(windows):
        evs = []
        for _ in range(int(rng.integers(6, 16))):
            k = KEYS[int(rng.integers(len(KEYS)))]
            tok = int(rng.integers(60, 64)) if rng.random() < 0.7 else int(rng.integers(0, 256))
            evs.append(Event(k, round(w * 10.0 + float(rng.uniform(0.0, 9.9)), 3), seq[k], tok))
            seq[k] += 1
        steps += [("add", evs), ("wm", w * 10.0 + 10.5)]
    return Scenario(steps=steps, window=10.0, num_shards=2)


def _rows(result: dict) -> list[dict]:
    return [dict(o[:-1]) for o in result["outputs"]]


@pytest.fixture(scope="module")
def runs(beam_models):
    """Per config: the scenario in every mode (the retry modes fail after every third state write)."""
    model, sc, out = beam_models["tiny"], _scenario(0), {}
    for name, cfg in CONFIGS.items():
        out[name] = {m: h.result() for m, h in runs_in_every_mode(model, sc, health=cfg).items()}
    return sc, out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_warm_cold_and_retried_flushes_give_the_same_outputs_and_stores(runs, name):
    _, out = runs
    base = out[name]["warm"]
    for mode, r in out[name].items():
        for part in ("outputs", "dead", "stores"):
            assert r[part] == base[part], f"{name}, {mode}: {part} differ from the warm run"
    rows = _rows(base)
    assert rows and all("state_health" in r for r in rows)
    assert any(base["stores"].values())
    if name != "flag":
        assert any(r["reset"] == HEALTH for r in rows)  # heals happened, and came out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_outputs_equal_the_keyed_operator_over_each_keys_events(runs, beam_models, name):
    """Beam applies each key's events in flushes of calls of at most 4 steps and 3 keys; the operator gets each
    key's whole stream in one call. Same resets (heals at the same events), state health and outputs."""
    sc, out = runs
    rows = _rows(out[name]["warm"])
    op = KeyedOperator(load(beam_models["tiny"], providers=[CPU]), keep_last_output=True, health=CONFIGS[name])
    for k in KEYS:
        mine = sorted((r for r in rows if r["key"] == k), key=lambda r: (r["ts"], r["seq"], r["sub"]))
        evs = sorted((e for kind, es in sc.steps if kind == "add" for e in es if e.key == k),
                     key=lambda e: (e.ts, e.seq, e.sub))
        assert [(r["seq"], r["pos"]) for r in mine] == [(e.seq, i) for i, e in enumerate(evs)]
        r = op.process([k] * len(evs), np.array([e.x for e in evs]))
        assert [x["reset"] for x in mine] == r.reset.tolist()
        np.testing.assert_allclose([x["state_health"] if x["state_health"] != "nan" else np.nan for x in mine],
                                   r.state_health, rtol=1e-6, equal_nan=True)
        np.testing.assert_allclose(np.array([x["logprobs"] for x in mine], float), r.outputs["logprobs"], atol=2e-5)


def test_rebuild_keeps_the_shadows_and_a_log_without_a_policy_says_off(beam_models):
    """from_log restores the health columns and each watched key's shadow exactly; the policy is the log's unless
    the step passes its own."""
    model = load(beam_models["tiny"], providers=[CPU])
    store = ShardStore.new(model, "m", keep_last_output=True, health=CONFIGS["real"])
    rng = np.random.default_rng(1)
    store.op.process(["a"] * 9 + ["b"] * 3, rng.integers(0, 256, 12))
    for k in ("a", "b"):
        store.set_meta(k, KeyMeta(1.0, 10**12, "", True))
    assert (store.op._store.health["shadow_slot"] >= 0).any()  # a shadow is running
    blob, _ = store.delta(compact=False)
    back, _ = ShardStore.from_log([blob], lambda p: model, keep_last_output=True, default_path="m")
    assert back.lasting() == store.lasting() and back.op.health.policy == "heal"
    assert "health_shadow_state_h" in back.op.snapshot().column_names or any(
        c.startswith("health_shadow") or c.startswith("shadow_") for c in back.op.snapshot().column_names)
    off, _ = ShardStore.from_log([blob], lambda p: model, keep_last_output=True, default_path="m", health="off")
    assert off.op.health.policy == "off" and not any(c.startswith("health_") for c in off.op.snapshot().column_names)


def test_pipeline_outputs_state_health_and_counts_heals(beam_models, tmp_path):
    """A DirectRunner pipeline: the same outputs as the operator over each key's events, the heals counted."""
    rng = np.random.default_rng(3)
    events = tbt.make_events(rng, n_keys=3, per_key=30, span=300.0)
    cfg = CONFIGS["sampled"]
    g = Gather(tmp_path)
    p = beam.Pipeline()
    out, _ = p | beam.Create(events) | StatefulInference(model=beam_models["tiny"], num_shards=2, window_size=30.0,
                                                         max_steps_per_call=8, health=cfg)
    g(out, "outputs")
    result = p.run()
    result.wait_until_finish()
    preds = g["outputs"]
    op = KeyedOperator(load(beam_models["tiny"], providers=[CPU]), health=cfg)
    heals = 0
    for k in sorted({e.key for e in events}):
        evs = sorted((e for e in events if e.key == k), key=lambda e: (e.ts, e.seq, e.sub))
        r = op.process([k] * len(evs), np.array([e.x for e in evs]))
        got = {p_.seq: p_ for p_ in preds if p_.key == k}
        assert [got[e.seq].reset for e in evs] == r.reset.tolist()
        np.testing.assert_allclose([got[e.seq].outputs["state_health"] for e in evs], r.state_health, rtol=1e-6,
                                   equal_nan=True)
        heals += int(np.count_nonzero(r.reset == HEALTH))
    assert heals > 0 and tbt.counters(result).get("health_resets") == heals


@pytest.mark.parametrize(("health", "which", "says"), [
    ("sometimes", "tiny", "health: expected one of off, flag, heal"),
    ("heal", "feat", "expected a next-token model (task 'lm') or a forecaster (task 'forecast' with "
                     "training.forecast), got task 'forecast' without training.forecast"),
    (HealthConfig("heal", window=0), "tiny", "health.window: expected an int >= 1, got 0"),
])
def test_bad_health_is_one_line_at_construction(beam_models, health, which, says):
    with pytest.raises(InputError) as e:
        StatefulInference(model=beam_models[which], health=health)
    assert str(e.value).startswith("StatefulInference: health") and says in str(e.value)
    assert "\n" not in str(e.value)


def test_warm_store_equals_its_rebuild_after_every_flush(beam_models):
    """The harness's own check (warm mode asserts it after every flush), here with heals in every window."""
    h = Harness(beam_models["tiny"], _scenario(5, windows=4), mode="warm", health=CONFIGS["sampled"]).run()
    assert h.flushes > 0
    for s in h.shards:
        assert_warm_equals_rebuilt(h, s)
