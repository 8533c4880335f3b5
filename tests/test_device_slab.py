"""Keyed state kept on the device as OrtValue slabs (the CUDA code path, run here on the CPU provider)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from conftest import FakeClock
from hypothesis import given, settings
from hypothesis import strategies as st

from streamrnn import KeyedOperator
from streamrnn.keyed import _slab_ops
from streamrnn.model.loaded import load
from streamrnn.model.runtime import CPU, cuda_usable
from streamrnn.train import slab_ops


def test_shipped_graphs_match_their_builder():
    assert (_slab_ops.GATHER, _slab_ops.SCATTER, _slab_ops.PAD) == (
        slab_ops.gather_model(), slab_ops.scatter_model(), slab_ops.pad_model())


def _same(a: KeyedOperator, b: KeyedOperator) -> None:
    sa, sb = a.snapshot(), b.snapshot()
    assert sa.column("key").equals(sb.column("key")) and a.keys() == b.keys()
    for c in sa.column_names:
        if c.startswith("state_") or (c.startswith("last_") and c != "last_seen"):
            np.testing.assert_allclose(sa.column(c).combine_chunks().flatten().to_numpy(zero_copy_only=False),
                                       sb.column(c).combine_chunks().flatten().to_numpy(zero_copy_only=False),
                                       atol=2e-6, rtol=0)
        else:
            assert sa.column(c).equals(sb.column(c)), c


@given(keys=st.lists(st.sampled_from(["a", "b", "c", b"d", "e", "f", "g"]), min_size=1, max_size=50),
       seed=st.integers(0, 2**16), cut=st.integers(0, 50), max_keys=st.integers(2, 8))
@settings(max_examples=25, deadline=None)
def test_device_state_equals_host_state(lstm_path, keys, seed, cut, max_keys):
    m = load(lstm_path, providers=[CPU])
    x = np.random.default_rng(seed).integers(0, 256, len(keys))
    clock = FakeClock()
    kw = {"max_keys": max_keys, "ttl": 3.0, "clock": clock, "keep_last_output": True, "initial_capacity": 1}
    dev, host = KeyedOperator(m, state_on_device=True, **kw), KeyedOperator(m, **kw)
    assert dev.state_on_device and not host.state_on_device
    c = min(cut, len(keys))
    for part in (slice(0, c), slice(c, None)):
        if len(set(keys[part])) > max_keys:
            continue
        rd, rh = dev.process(keys[part], x[part]), host.process(keys[part], x[part])
        np.testing.assert_allclose(rd.outputs["logprobs"], rh.outputs["logprobs"], atol=2e-6, rtol=0)
        assert (rd.pos == rh.pos).all() and (rd.fresh == rh.fresh).all()
        clock.advance(2.0)
    _same(dev, host)
    assert isinstance(dev._dev.slab["c"], ort.OrtValue) and dev._store.slab == {}  # no host copy of state
    assert dev.evictions == host.evictions


def test_device_snapshot_restore_and_growth(lstm, rng):
    keys = [f"k{i % 37}" for i in range(200)]
    x = rng.integers(0, 256, len(keys))
    clock = FakeClock()
    a = KeyedOperator(lstm, state_on_device=True, initial_capacity=2, clock=clock)
    a.process(keys[:100], x[:100])
    b = KeyedOperator(lstm, state_on_device=True, initial_capacity=2, clock=clock)
    assert b.restore(a.snapshot()) == 37
    ra, rb = a.process(keys[100:], x[100:]), b.process(keys[100:], x[100:])
    assert (ra.outputs["logprobs"] == rb.outputs["logprobs"]).all()
    ref = KeyedOperator(lstm, clock=clock)
    ref.process(keys[:100], x[:100])
    ref.process(keys[100:], x[100:])
    _same(a, ref)
    np.testing.assert_allclose(a.state_of("k5")["h"], ref.state_of("k5")["h"], atol=2e-6)


def test_failed_device_process_keeps_old_slabs(lstm, monkeypatch, rng):
    op = KeyedOperator(lstm, state_on_device=True, max_keys=40, pack_step_cost=0.0)
    op.process(["a", "b"], [1, 2])
    before = op.snapshot()
    real = lstm._step_iobinding
    calls = [0]

    def failing(*a, **kw):
        calls[0] += 1
        if calls[0] == 2:
            raise RuntimeError("injected device failure")
        return real(*a, **kw)

    monkeypatch.setattr(lstm, "_step_iobinding", failing)
    keys = ["a"] * 30 + [f"n{i}" for i in range(20)]
    with pytest.raises(RuntimeError, match="injected"):
        op.process(keys, rng.integers(0, 256, len(keys)))
    assert op.snapshot().equals(before, check_metadata=True) and op.keys() == ["a", "b"]


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_usable()[0], reason="needs a loadable CUDA provider")
def test_cuda_keyed_state_stays_on_the_gpu(lstm_path, rng):
    gpu = KeyedOperator(load(lstm_path, providers="cuda"))
    cpu = KeyedOperator(load(lstm_path, providers="cpu"))
    assert gpu.state_on_device and gpu._dev.device == "cuda"
    keys = ["a"] * 20 + [f"k{i}" for i in range(30)] + ["b"] * 5
    x = rng.integers(0, 256, len(keys))
    for _ in range(3):
        np.testing.assert_allclose(gpu.process(keys, x).outputs["logprobs"], cpu.process(keys, x).outputs["logprobs"],
                                   atol=1e-4)
    np.testing.assert_allclose(gpu.state_of("a")["c"], cpu.state_of("a")["c"], atol=1e-4)
