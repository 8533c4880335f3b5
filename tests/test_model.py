"""Model.step semantics, chunking invariance, provider selection and bad input."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import streamrnn
from streamrnn import InputError, ModelLoadError, StateError
from streamrnn.model.loaded import load
from streamrnn.model.runtime import CPU, CUDA, SessionConfig, cuda_usable


def test_initial_state_and_shapes(lstm):
    s = lstm.initial_state(3)
    assert s.names == ("h", "c")
    assert s["h"].shape == (2, 3, 16) and s["c"].shape == (2, 3, 16)
    assert not s["h"].any()
    out, new = lstm.step(np.zeros((3, 5), np.int64), s)
    assert out["logprobs"].shape == (3, 5, 256)
    np.testing.assert_allclose(np.exp(out["logprobs"]).sum(-1), 1.0, atol=1e-5)
    assert new.batch == 3


def test_step_does_not_mutate_inputs(lstm, rng):
    x = rng.integers(0, 256, (2, 4))
    x0 = x.copy()
    s = lstm.as_state((rng.normal(size=(2, 2, 16)).astype(np.float32),
                       rng.normal(size=(2, 2, 16)).astype(np.float32)))
    h0, c0 = s["h"].copy(), s["c"].copy()
    _, new = lstm.step(x, s)
    assert (s["h"] == h0).all() and (s["c"] == c0).all() and (x == x0).all()
    assert not np.shares_memory(new["h"], s["h"])


def test_state_none_is_initial(lstm, rng):
    x = rng.integers(0, 256, (2, 6))
    a, sa = lstm.step(x)
    b, sb = lstm.step(x, lstm.initial_state(2))
    assert (a["logprobs"] == b["logprobs"]).all() and (sa["h"] == sb["h"]).all()


@given(data=st.data(), n=st.integers(2, 60))
@settings(max_examples=25, deadline=None)
def test_chunking_invariance(lstm_path, data, n):
    """Any split of a sequence into chunks, state carried, equals the whole run."""
    m = load(lstm_path, providers=[CPU])
    seed = data.draw(st.integers(0, 2**16))
    x = np.random.default_rng(seed).integers(0, 256, (2, n))
    cuts = sorted(data.draw(st.sets(st.integers(1, n - 1), max_size=6)))
    whole, ws = m.step(x)
    state, parts = None, []
    for a, b in zip([0, *cuts], [*cuts, n], strict=True):
        o, state = m.step(x[:, a:b], state)
        parts.append(o["logprobs"])
    np.testing.assert_allclose(np.concatenate(parts, axis=1), whole["logprobs"], atol=1e-5, rtol=0)
    for a, b in zip(state, ws, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_ragged_lengths_take_each_rows_last_state(lstm, rng):
    x = rng.integers(0, 256, (3, 6))
    lengths = np.array([6, 2, 4])
    out, st_ = lstm.step(x, lengths=lengths)
    for i, n in enumerate(lengths):
        o1, s1 = lstm.step(x[i:i + 1, :n])
        np.testing.assert_allclose(out["logprobs"][i, :n], o1["logprobs"][0], atol=1e-6)
        np.testing.assert_allclose(st_["h"][:, i], s1["h"][:, 0], atol=1e-6)


def test_features_model_validates(nets_and_paths):
    m = load(nets_and_paths[("lstm", "features")][1], providers=[CPU])
    x = np.zeros((2, 3, 3), np.float32)
    out, _ = m.step(x)
    assert set(out) == {"mean", "log_scale"} and out["mean"].shape == (2, 3, 2)
    x[1, 2, 1] = np.nan
    with pytest.raises(InputError, match=r"feature f1 at \[1, 2\]: expected a finite number, got nan"):
        m.step(x)
    x[1, 2, 1] = np.inf
    with pytest.raises(InputError, match="expected a finite number, got inf"):
        m.step(x)
    with pytest.raises(InputError, match=r"x shape: expected \[batch, time, 3\], got \[2, 3, 4\]"):
        m.step(np.zeros((2, 3, 4), np.float32))
    with pytest.raises(InputError, match="x dtype: expected float features, got int64"):
        m.step(np.zeros((2, 3, 3), np.int64))


@pytest.mark.parametrize(
    ("x", "match"),
    [
        (np.zeros((2, 3), np.float32), "x dtype: expected integer tokens, got float32"),
        (np.zeros(3, np.int64), r"x rank: expected 2 \[batch, time\], got shape \[3\]"),
        (np.zeros((1, 2, 3), np.int64), r"x rank: expected 2 \[batch, time\], got shape \[1, 2, 3\]"),
        (np.array([[1, 256]]), "x token: expected 0 <= token < 256, got 256"),
        (np.array([[-1, 3]]), "x token: expected 0 <= token < 256, got -1"),
        (np.zeros((0, 3), np.int64), "expected batch >= 1 and time >= 1"),
        (np.zeros((2, 0), np.int64), "expected batch >= 1 and time >= 1"),
    ],
)
def test_bad_x(lstm, x, match):
    with pytest.raises(InputError, match=match):
        lstm.step(x)


def test_bad_state(lstm, wide_lstm_path):
    wide = load(wide_lstm_path, providers=[CPU])
    with pytest.raises(StateError, match=r"state 'h' shape: expected \[2, 1, 16\] \[layers, batch, hidden\], "
                                         r"got \[2, 1, 24\]"):
        lstm.step(np.zeros((1, 1), np.int64), wide.initial_state(1))
    with pytest.raises(StateError, match=r"state 'h' shape: expected \[2, 2, 16\]"):
        lstm.step(np.zeros((2, 1), np.int64), lstm.initial_state(1))  # batch mismatch
    with pytest.raises(StateError, match="expected 2 tensors"):
        lstm.step(np.zeros((1, 1), np.int64), (np.zeros((2, 1, 16), np.float32),))
    with pytest.raises(StateError, match=r"state names: expected \['h', 'c'\], got \['h', 'x'\]"):
        lstm.step(np.zeros((1, 1), np.int64), {"h": np.zeros((2, 1, 16), np.float32), "x": 0})
    with pytest.raises(StateError, match="dtype: expected float32, got float64"):
        lstm.step(np.zeros((1, 1), np.int64), (np.zeros((2, 1, 16)), np.zeros((2, 1, 16))))


def test_bad_lengths(lstm):
    x = np.zeros((2, 3), np.int64)
    with pytest.raises(InputError, match=r"lengths: expected values in 1..3, got 0..3"):
        lstm.step(x, lengths=[0, 3])
    with pytest.raises(InputError, match=r"lengths: expected int \[2\]"):
        lstm.step(x, lengths=[1, 2, 3])


def test_missing_corrupt_and_foreign_files(tmp_path):
    with pytest.raises(ModelLoadError, match="expected an ONNX file at .*nope.onnx.*got no such file"):
        load(tmp_path / "nope.onnx")
    bad = tmp_path / "corrupt.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 10)
    with pytest.raises(ModelLoadError, match="expected a valid ONNX model"):
        load(bad)
    plain = tmp_path / "plain.onnx"
    from streamrnn.model import _probe

    plain.write_bytes(_probe.identity_model())
    with pytest.raises(ModelLoadError, match=r"metadata: expected key 'streamrnn.spec'"):
        load(plain)


def test_truncated_model_file(lstm_path, tmp_path):
    p = tmp_path / "trunc.onnx"
    p.write_bytes(lstm_path.read_bytes()[:2000])
    with pytest.raises(ModelLoadError):
        load(p)


def test_spec_that_does_not_match_graph(lstm_path, tmp_path):
    m = onnx.load(str(lstm_path))
    for p in m.metadata_props:
        if p.key == "streamrnn.spec":
            p.value = p.value.replace('"name": "h"', '"name": "hidden"')
    p = tmp_path / "mismatch.onnx"
    onnx.save(m, str(p))
    with pytest.raises(ModelLoadError, match=r"state: expected tensors \['h', 'c'\] for a lstm, got \['hidden'"):
        load(p)
    for prop in m.metadata_props:
        if prop.key == "streamrnn.spec":
            prop.value = "{not json"
    onnx.save(m, str(p))
    with pytest.raises(ModelLoadError, match="not a valid streamrnn spec"):
        load(p)


def test_auto_provider_logs_one_line(lstm_path, caplog):
    caplog.set_level(logging.INFO, logger="streamrnn")
    m = load(lstm_path)  # "auto"
    lines = [r for r in caplog.records if r.name == "streamrnn"]
    assert len(lines) == 1
    ok, reason = cuda_usable()
    assert m.provider == (CUDA if ok else CPU)
    assert m.provider in lines[0].getMessage() and reason in lines[0].getMessage()


def test_explicit_provider_honoured(lstm_path):
    m = load(lstm_path, providers=[CPU], session_config=SessionConfig(intra_op_threads=1))
    assert m.provider == CPU and m.session.get_providers() == [CPU]


@pytest.mark.skipif(cuda_usable()[0], reason="CUDA loads here")
def test_explicit_cuda_without_gpu_is_an_error(lstm_path):
    with pytest.raises(ModelLoadError, match="CUDAExecutionProvider.*failed to load"):
        load(lstm_path, providers=[CUDA, CPU])


def test_threads_share_a_model(lstm, rng):
    from concurrent.futures import ThreadPoolExecutor

    xs = [rng.integers(0, 256, (2, 8)) for _ in range(8)]
    expected = [lstm.step(x)[0]["logprobs"] for x in xs]
    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(lambda x: lstm.step(x)[0]["logprobs"], xs))
    for a, b in zip(got, expected, strict=True):
        assert (a == b).all()


def test_package_surface():
    assert callable(streamrnn.load) and streamrnn.DEFAULT_MODEL.endswith("charlm.onnx")


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_usable()[0], reason="needs a CUDA GPU with a loadable CUDA provider")
def test_cuda_state_stays_on_device_and_matches_cpu(lstm_path, rng):
    gpu = load(lstm_path, providers=[CUDA, CPU])
    cpu = load(lstm_path, providers=[CPU])
    x = rng.integers(0, 256, (4, 10))
    s_gpu = s_cpu = None
    for a, b in ((0, 3), (3, 4), (4, 10)):
        og, s_gpu = gpu.step(x[:, a:b], s_gpu)
        oc, s_cpu = cpu.step(x[:, a:b], s_cpu)
        assert s_gpu.on_device
        np.testing.assert_allclose(og["logprobs"], oc["logprobs"], atol=1e-4)
    np.testing.assert_allclose(s_gpu.numpy()["h"], s_cpu["h"], atol=1e-4)


def test_iobinding_path_carries_ortvalue_state(lstm, rng):
    """The device-resident-state code path, exercised on the CPU provider: OrtValues in, OrtValues out."""
    x = rng.integers(0, 256, (3, 9))
    lens = np.full(3, 3, np.int32)
    st = lstm.initial_state(3)
    ref_state = st
    for t in range(0, 9, 3):
        out, st = lstm._step_iobinding(np.ascontiguousarray(x[:, t:t + 3]), lens, st, device="cpu")
        ref, ref_state = lstm.step(x[:, t:t + 3], ref_state)
        assert st.on_device and not ref_state.on_device
        np.testing.assert_array_equal(out["logprobs"], ref["logprobs"])
    np.testing.assert_array_equal(st.numpy()["c"], ref_state["c"])
    assert not st.numpy().on_device
