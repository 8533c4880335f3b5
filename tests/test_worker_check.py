"""Launcher vs worker: ``shipped:NAME`` models resolved by each install, and the worker's checks that it
runs the launcher's Beam, streamrnn and model file (a DeployError naming both sides, never other outputs).

The distributed form of the same checks (a worker pool from its own venv) is in tests/test_deploy.py."""

from __future__ import annotations

import shutil
import sys

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that
from conftest import make_net

import streamrnn
from streamrnn import DeployError, ModelLoadError
from streamrnn.beam import Event, StatefulInference
from streamrnn.beam.job import launcher
from streamrnn.beam.models import model_version
from streamrnn.beam.step import worker_check
from streamrnn.beam.step.stateful import ShardStep
from streamrnn.model import shipped
from streamrnn.model.loaded import load
from streamrnn.model.runtime import CPU
from streamrnn.train.export import export

EVENTS = [Event("a", 10.0 + i, i, 65 + i) for i in range(5)]


def test_shipped_names_resolve_to_this_install_and_load():
    assert {"charlm", "market"} <= set(shipped.names())
    for name in shipped.names():
        for ref in (f"shipped:{name}", f"shipped:{name}.onnx"):
            path = shipped.resolve(ref)
            assert path.startswith(str(shipped.FOLDER)) and path.endswith(f"/{name}.onnx")
    assert shipped.resolve("shipped:charlm") == str(shipped.FOLDER / "charlm.onnx")
    via_ref, via_path = load("shipped:charlm", providers=[CPU]), load(streamrnn.DEFAULT_MODEL, providers=[CPU])
    assert via_ref.spec.fingerprint == via_path.spec.fingerprint


@pytest.mark.parametrize("ref", ["shipped:nope", "shipped:", "shipped:../exported/charlm", "shipped:/etc/passwd",
                                 "shipped:charlm.md"])
def test_unknown_shipped_name_is_a_model_load_error_naming_the_choices(ref):
    with pytest.raises(ModelLoadError, match=r"model: expected one of shipped:charlm, shipped:market, got"):
        shipped.resolve(ref)
    with pytest.raises(ModelLoadError, match="expected one of"):
        load(ref, providers=[CPU])


def _shard_steps(p: beam.Pipeline) -> list[ShardStep]:
    found: list[ShardStep] = []

    class Visit(beam.pipeline.PipelineVisitor):
        def visit_transform(self, node):
            fn = getattr(getattr(node.transform, "fn", None), "__class__", None)
            if fn is ShardStep:
                found.append(node.transform.fn)

    p.visit(Visit())
    return found


def test_a_shipped_reference_travels_as_a_name_not_the_launchers_path():
    """What workers receive is ``shipped:market`` (each resolves it in its own install), not this checkout's path."""
    p = beam.Pipeline()
    _ = p | beam.Create([]) | StatefulInference(model="shipped:market", num_shards=2, providers=[CPU])
    (step,) = _shard_steps(p)
    assert step.model_path == "shipped:market"
    assert step.launcher_env == worker_check.environment()


def _run(model: str, options: list[str] | None = None) -> None:
    with beam.Pipeline(options=PipelineOptions(options or [])) as p:
        out, _ = p | beam.Create(EVENTS) | StatefulInference(model=model, num_shards=2, window_size=60.0,
                                                               providers=[CPU])
        assert_that(out | beam.combiners.Count.Globally(), lambda n: n == [len(EVENTS)])


def test_a_worker_reading_another_file_at_the_model_path_fails_naming_both(tmp_path):
    """The launcher read one model at a path; by the time the workers load it, another file is there
    (two images, a bucket overwritten): a DeployError naming both versions, not the other model's outputs."""
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    export(make_net("lstm"), a, name="lm", version="1")
    export(make_net("lstm", seed=1), b, name="lm", version="1")  # same name, version and shapes: other weights
    path = tmp_path / "model.onnx"
    shutil.copy(a, path)
    want, got = (model_version(load(m, providers=[CPU]).spec) for m in (a, b))
    assert want != got
    p = beam.Pipeline()
    _ = p | beam.Create(EVENTS) | StatefulInference(model=str(path), num_shards=2, providers=[CPU])
    shutil.copy(b, path)
    with pytest.raises(Exception) as e:  # the runner decides how it wraps it
        p.run().wait_until_finish()
    assert f"expected {want} (what the launcher read), got {got} on worker" in (launcher.deploy_error(e.value) or "")
    shutil.copy(a, path)
    _run(str(path))  # and the same pipeline with the launcher's file runs


@pytest.mark.parametrize("name, launchers", [("apache-beam", "2.60.0"), ("python", "3.12"), ("python", "3.10")])
def test_a_worker_on_another_beam_or_python_fails_naming_both_versions(monkeypatch, name, launchers):
    """A launcher on one Beam, or one Python minor version (whose pickles the workers would load), and workers
    on another: the step refuses to run instead of mixing semantics, in one line that says what to do."""
    real = worker_check.environment()
    assert real["python"] == f"{sys.version_info[0]}.{sys.version_info[1]}"
    if real[name] == launchers:
        launchers = "3.13"
    monkeypatch.setattr(worker_check, "environment", lambda: {**real, name: launchers})
    p = beam.Pipeline()
    _ = p | beam.Create(EVENTS) | StatefulInference(model="shipped:market", num_shards=2, providers=[CPU])
    monkeypatch.undo()  # the "workers" (this process) now report the real version
    with pytest.raises(Exception) as e:
        p.run().wait_until_finish()
    msg = launcher.deploy_error(e.value) or ""
    want = f"StatefulInference: {name}: expected {launchers} (the launcher's), got {real[name]} on worker"
    assert msg.startswith(want) and "\n" not in msg, msg
    if name == "python":
        assert msg.endswith("(docker build --build-arg PYTHON_VERSION=...)"), msg


def test_require_environment_names_each_side():
    here = worker_check.environment()
    worker_check.require_environment(here, "step")  # the same: nothing to say
    with pytest.raises(DeployError, match=r"^step: streamrnn: expected 9\.9\.9 \(the launcher's\), got "):
        worker_check.require_environment({**here, "streamrnn": "9.9.9"}, "step")


@pytest.mark.parametrize("wrapped", [False, True])
def test_launcher_reports_a_deploy_error_in_one_line(capsys, tmp_path, wrapped):
    """A runner hands the worker's DeployError back wrapped in its own error text (the portable runner's
    RuntimeError carries the worker's traceback); the launcher prints the one line, exit code 2."""
    msg = "StatefulInference: model 'm.onnx': expected lm-1+aaaa (what the launcher read), got lm-1+bbbb on worker w"

    def body() -> int:
        if not wrapped:
            raise DeployError(msg)
        raise RuntimeError(f"Pipeline job x failed in state FAILED: Traceback (most recent call last):\n  File ...\n"
                           f"streamrnn.errors.DeployError: {msg} [while running 'Step/ParDo(ShardStep)']\n\nmore")

    out = launcher.Output(str(tmp_path / "out"), ["predictions"])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "predictions-0.parquet").write_bytes(b"written before the worker failed")
    assert launcher.run("next_token", out, body) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"next_token: {msg}"]
    assert (tmp_path / "out" / "predictions-0.parquet").exists()  # what was written stays


def test_deploy_error_is_only_a_deploy_errors_exception_line():
    assert launcher.deploy_error(DeployError("m [while running 'Infer[v2]/ShardStep']")) == "m"
    for quoted in (ValueError("bad column name 'DeployError: x' in csv"), RuntimeError("KeyError: 'DeployError: y'"),
                   RuntimeError("Traceback ...\nValueError: DeployError: z")):
        assert launcher.deploy_error(quoted) is None, quoted
    with pytest.raises(RuntimeError):  # not a deploy error: re-raised as it was
        launcher.run("job", launcher.Output("/nonexistent/out", []), lambda: (_ for _ in ()).throw(
            RuntimeError("KeyError: 'DeployError: y'")))


def test_code_digest_is_part_of_the_environment_and_load_keeps_bytes_paths():
    env = worker_check.environment()
    assert len(env["streamrnn code"]) == 12 and env["streamrnn"] == streamrnn.__version__
    import os

    assert load(os.fsencode(streamrnn.DEFAULT_MODEL), providers=[CPU]).spec.name == "charlm"
