"""What the benchmarks share: their byte events, the stateful pipeline they time, the identity model, timing
in interleaved rounds, and the measured code's state. No benchmark imports another's private names."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator

import numpy as np


def byte_events(keys: int, per_key: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Byte events of ``keys`` streams of text-like bytes (the demo events' text): tokens and times, ``[keys, per_key]``
    each."""
    from ..beam.job.io import DEMO_TEXT

    corpus = np.frombuffer(DEMO_TEXT.encode() * (1 + per_key * keys // len(DEMO_TEXT)), np.uint8)
    rng = np.random.default_rng(seed)
    tok = np.empty((keys, per_key), np.int64)
    for k in range(keys):
        s = int(rng.integers(0, len(corpus) - per_key))
        tok[k] = corpus[s:s + per_key]
    ts = 1_000.0 + np.arange(per_key)[None, :] * 1.0 + rng.uniform(0, 0.5, (keys, 1))
    return tok, ts


def write_byte_events(tok: np.ndarray, ts: np.ndarray, path: str) -> str:
    """The events as a Parquet file (``key, ts, seq, token``), arrival in event-time order, keys interleaved.

    Pipelines read it with :class:`~streamrnn.beam.job.io.ReadEvents`, as a job does: embedding
    the events in the pipeline with ``beam.Create`` would measure pickling and compressing
    the data into the pipeline graph instead (most of the wall time at 200k events).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    K, E = tok.shape
    keys = np.repeat(np.array([f"key-{k:05d}" for k in range(K)], dtype=object)[None, :], E, axis=0).T
    order = np.argsort(ts.reshape(-1), kind="stable")
    pq.write_table(pa.table({"key": pa.array(keys.reshape(-1)[order].tolist(), pa.string()),
                             "ts": ts.reshape(-1)[order], "seq": np.tile(np.arange(E), K)[order],
                             "token": tok.reshape(-1)[order]}), path)
    return path


class Sink:
    """Collects results across the pickling boundary: one .npy file per element, read back after the run."""

    def __init__(self, root: str):
        self.root = root
        os.makedirs(root, exist_ok=True)

    def __call__(self, item):
        import pickle
        import uuid

        with open(os.path.join(self.root, uuid.uuid4().hex), "wb") as f:
            pickle.dump(item, f)

    def read(self) -> list:
        import pickle

        out = []
        for name in os.listdir(self.root):
            with open(os.path.join(self.root, name), "rb") as f:
                out.append(pickle.load(f))
        return out


class IdentityModel:
    """Stands in for :class:`~streamrnn.model.loaded.Model`: task outputs are zeros, state passes through."""

    def __init__(self, model):
        self.__dict__.update(model.__dict__)
        self._real = model
        self.spec = model.spec

    def __getattr__(self, name):
        return getattr(self._real, name)

    def run_unchecked(self, x, lengths, state, *, binding=None):
        B, T = x.shape[:2]
        return {"logprobs": np.zeros((B, T, 256), np.float32)}, state


@contextlib.contextmanager
def identity_models() -> Iterator[None]:
    """Within: the stateful DoFn loads :class:`IdentityModel` s (it loads models through
    ``stateful.load_model``; the DirectRunner runs it in this process)."""
    from ..beam.step import stateful as st

    real = st.load_model
    st.load_model = lambda path, providers="auto": IdentityModel(real(path, providers))
    try:
        yield
    finally:
        st.load_model = real


def run_stateful(model_path: str, events_path: str, shards: int, identity: bool = False) -> tuple[float, list, float]:
    """``bench beam``'s variant a: :class:`~streamrnn.beam.StatefulInference` over the events file on the DirectRunner
    (batch). Wall seconds, ``(keys, seq, logprob)`` columns of every output block, and process CPU seconds."""
    import apache_beam as beam

    from ..beam import NextTokenPostprocess, StatefulInference
    from ..beam.job.io import ReadEvents

    sink = Sink(tempfile.mkdtemp(prefix="bench-a-"))
    with identity_models() if identity else contextlib.nullcontext():
        t0, c0 = time.perf_counter(), time.process_time()
        with beam.Pipeline() as p:
            blocks, _unread = p | ReadEvents(events_path, block_rows=8192)
            out, _ = blocks | StatefulInference(
                model=model_path, num_shards=shards, window_size=60.0, postprocess=NextTokenPostprocess(5),
                output="arrow", providers=["CPUExecutionProvider"])
            # the columns the checks need, as Arrow / numpy (no per-row Python objects inside the timed run)
            out | beam.Map(lambda b: (b.column("key"), b.column("seq").to_numpy(),
                                      b.column("logprob").to_numpy())) | beam.Map(sink)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    got = sink.read()
    shutil.rmtree(sink.root, ignore_errors=True)
    return dt, got, cpu


def code_state() -> dict:
    """The commit measured, and which library files differed from it (others edit the same checkout)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    def git(*a: str) -> str:
        r = subprocess.run(["git", "-C", root, *a], capture_output=True, text=True)
        return r.stdout if r.returncode == 0 else ""

    return {"commit": git("rev-parse", "--short", "HEAD").strip() or None,
            "uncommitted": [ln[3:] for ln in git("status", "--porcelain", "--", "streamrnn").splitlines()]}


def make_model(path: str, hidden: int, layers: int) -> None:
    """A random LSTM LM (``layers`` x ``hidden``) exported to ``path``: the benchmarks' model (the 'train' extra)."""
    try:
        import torch

        from ..train.export import export
        from ..train.nets import NetConfig, RecurrentNet
    except ImportError as e:  # pragma: no cover
        raise SystemExit(f"streamrnn bench beam: needs the 'train' extra (torch) to build the bench model: {e}") from e
    torch.manual_seed(0)
    export(RecurrentNet(NetConfig(hidden=hidden, layers=layers)), path, name=f"bench-lm-{layers}x{hidden}")


def interleaved(variants: dict[str, Callable[[], object]], seconds: float, min_calls: int,
                 seed: int = 0) -> dict[str, list[float]]:
    """Per-call times of each variant, one call of each per round in a random order, until
    ``seconds`` have passed and every variant has ``min_calls`` samples."""
    samples: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    rng = np.random.default_rng(seed)
    perf = time.perf_counter
    t_end = perf() + seconds
    while len(samples[names[0]]) < min_calls or perf() < t_end:
        for i in rng.permutation(len(names)):
            fn = variants[names[i]]
            t = perf()
            fn()
            samples[names[i]].append(perf() - t)
    return samples
