"""Deploy: the worker install script (the Dockerfile's install steps) run into a fresh venv, the one
Beam pin, and both jobs run distributed the way Flink on Kubernetes runs Python: a Beam job service
and a separate worker pool process (from that venv) on loopback, ``--environment_type=EXTERNAL``,
with outputs equal to the DirectRunner's for the same input."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import background
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from streamrnn.beam.job.io import demo_events, missing_filesystem

ROOT = Path(__file__).resolve().parent.parent
INSTALL = ROOT / "deploy" / "install_worker.sh"
PIN_KEYS = ("BEAM_VERSION", "PYTHON_VERSION", "CUDA_IMAGE")


def versions() -> dict[str, str]:
    out = {}
    for line in (ROOT / "deploy" / "versions.env").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            k, v = line.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def _env_without_checkout() -> dict[str, str]:
    """The test process's environment at its start (tests/background.py) without the checkout's variables."""
    return {k: v for k, v in background.ENV.items() if k not in ("STREAMRNN_MODEL", "PYTHONPATH")}


def _launcher_env() -> dict[str, str]:
    """A launcher's: the checkout under test, as this test process imports it (a launcher started outside the
    checkout would import whatever the venv's editable install points to: another checkout, when a clone shares
    its venv, and the workers built from this one would then rightly refuse its code)."""
    return {**_env_without_checkout(), "PYTHONPATH": str(ROOT)}


@background.job("deploy: worker venv and wheel", file=__file__)
def _worker_build(folder: Path) -> tuple[Path, Path, Path]:
    """(source, worker venv, wheel), built beside the other tests (tests/background.py).

    source: a clean copy of the checkout (no stale build/ or egg-info of an earlier build leaks into a package).
    worker venv: a fresh venv with the worker installed by deploy/install_worker.sh from the source, as the
    Dockerfile does; offline and fast: the test venv's site-packages are appended (a .pth) so pip finds the
    pinned Beam and the other dependencies already installed; streamrnn itself is built and installed into the
    new venv (pip leaves the checkout's editable install, outside that venv, alone).
    wheel: ``pip wheel`` of the source."""
    src = folder / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "runs", "*.egg-info", "__pycache__", ".hypothesis", ".*_cache"))
    venv, _ = _venv_over_test_env(folder / "venv")
    _install_worker(src, venv, {**_env_without_checkout(), "PIP_NO_INDEX": "1", "PIP_NO_BUILD_ISOLATION": "0"})
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                        "-q", "-w", str(folder / "dist"), str(src)], capture_output=True, text=True, timeout=300,
                       env=background.ENV)
    assert r.returncode == 0, r.stderr
    (whl,) = (folder / "dist").glob("streamrnn-*.whl")
    return src, venv, whl


@pytest.fixture(scope="module")
def worker_venv() -> Path:
    return background.result("deploy: worker venv and wheel")[1]


def _venv_over_test_env(venv: Path) -> tuple[Path, Path]:
    """A fresh venv that also sees this test environment's packages (a .pth after its own site-packages)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120,
                   env=background.ENV)
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True,
                          check=True, env=background.ENV).stdout.strip()
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv, Path(site)


def _install_worker(source: Path, venv: Path, env: dict[str, str], *flags: str) -> str:
    r = subprocess.run(["bash", str(source / "deploy" / "install_worker.sh"), "--python", str(venv / "bin" / "python"),
                        *flags, str(source)], capture_output=True, text=True, timeout=300, env=env, cwd=source.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"streamrnn worker: beam {versions()['BEAM_VERSION']}" in r.stdout, r.stdout
    return r.stdout


def test_install_worker_builds_a_working_worker(worker_venv):
    py = worker_venv / "bin" / "python"
    code = ("import json, os, apache_beam, onnxruntime, streamrnn, beam_jobs.next_token; "
            "print(json.dumps({'beam': apache_beam.__version__, 'streamrnn': streamrnn.__file__, "
            "'jobs': beam_jobs.next_token.__file__, 'model': streamrnn.DEFAULT_MODEL, "
            "'model_exists': os.path.exists(streamrnn.DEFAULT_MODEL)}))")
    r = subprocess.run([str(py), "-c", code], capture_output=True, text=True, timeout=120, cwd=worker_venv,
                       env=_env_without_checkout())
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["beam"] == versions()["BEAM_VERSION"]
    # the installed copy (code and shipped model), not the checkout
    for k in ("streamrnn", "jobs", "model"):
        assert Path(got[k]).resolve().is_relative_to(worker_venv.resolve()), got
    assert got["model_exists"]


@background.job("deploy: CPU-only worker venv", file=__file__)
def _cpu_worker_build(folder: Path) -> tuple[str, Path, subprocess.CompletedProcess]:
    """install_worker.sh --cpu into a fresh venv: (its output, the venv's site-packages, where its python finds
    onnxruntime)."""
    source = background.result("deploy: worker venv and wheel")[0]
    venv, site = _venv_over_test_env(folder / "venv")
    out = _install_worker(source, venv, {**_env_without_checkout(), "PIP_NO_BUILD_ISOLATION": "0"}, "--cpu")
    code = "import onnxruntime; print(onnxruntime.__file__)"
    r = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, cwd=folder,
                       env=_env_without_checkout())
    return out, site, r


@pytest.mark.slow
def test_install_worker_cpu_builds_a_cpu_only_worker():
    """``--cpu`` (the CPU image's install): ONNX Runtime's CPU build in the venv, no onnxruntime-gpu. This one
    needs the package index: the CPU build is not in the test environment, which has the GPU build."""
    out, site, r = background.result("deploy: CPU-only worker venv")
    assert "CUDAExecutionProvider" not in out and "CPUExecutionProvider" in out, out
    own = {p.name.split("-")[0].lower() for p in site.glob("*.dist-info")}
    assert {"onnxruntime", "streamrnn"} <= own and "onnxruntime_gpu" not in own, own
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).resolve().is_relative_to(site.resolve())  # its own build, not the GPU one


def test_install_worker_bad_source_is_one_line_exit_2(tmp_path):
    r = subprocess.run(["bash", str(INSTALL), "--python", sys.executable, str(tmp_path / "missing")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "SOURCE: expected" in r.stderr, r.stderr
    r = subprocess.run(["bash", str(INSTALL), "--bogus"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "unknown option --bogus" in r.stderr
    for args, want in ((["--beam-extras", "gcp;rm -rf /", str(ROOT)], "got 'gcp;rm -rf /'"),
                       (["--beam-extras", "--cpu", str(ROOT)], "got '--cpu'"),
                       (["--beam-extras", "gcp,,aws", str(ROOT)], "got 'gcp,,aws'"),
                       (["--beam-extras"], "got none"), (["--python"], "--python: expected an interpreter path")):
        r = subprocess.run(["bash", str(INSTALL), *args], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and want in r.stderr, (args, r.stderr)


def test_one_pin_for_image_workers_and_launcher():
    """versions.env is the pin; the Dockerfile's defaults and this (launcher) environment must agree with it."""
    import apache_beam

    pins = versions()
    assert set(PIN_KEYS) <= set(pins), pins
    assert apache_beam.__version__ == pins["BEAM_VERSION"]
    assert f"{sys.version_info[0]}.{sys.version_info[1]}" == pins["PYTHON_VERSION"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    for k in PIN_KEYS:
        assert re.search(rf"^ARG {k}={re.escape(pins[k])}$", dockerfile, re.M), k


def test_onnxruntime_pin_is_a_build_for_the_base_images_cuda():
    """versions.env pins onnxruntime(-gpu) next to the CUDA base image: the pinned GPU build (what this test
    environment runs, as it runs the pinned Beam) says in its own build info which CUDA it was built for, and
    that major version must be the base image's (a CUDA 12 build cannot load on a CUDA 13 base, nor back)."""
    pins = versions()
    info = pytest.importorskip("onnxruntime.capi.build_and_package_info")
    if info.package_name != "onnxruntime-gpu":
        pytest.skip(f"this environment has ONNX Runtime's {info.package_name} build, not the pinned GPU build")
    assert info.__version__ == pins["ONNXRUNTIME_VERSION"], (
        f"onnxruntime-gpu: expected {pins['ONNXRUNTIME_VERSION']} (deploy/versions.env), got {info.__version__}; "
        "install the pin, or move ONNXRUNTIME_VERSION and CUDA_IMAGE together")
    base = re.fullmatch(r"nvidia/cuda:(\d+)\.\d+\.\d+-cudnn-runtime-\S+", pins["CUDA_IMAGE"])
    assert base, pins["CUDA_IMAGE"]
    assert info.cuda_version.split(".")[0] == base.group(1), (info.cuda_version, pins["CUDA_IMAGE"])
    install = INSTALL.read_text()
    assert '"onnxruntime-gpu==$ONNXRUNTIME_VERSION"' in install and '"onnxruntime==$ONNXRUNTIME_VERSION"' in install


def test_dockerfile_is_a_beam_worker_image():
    lines = [ln.strip() for ln in (ROOT / "Dockerfile").read_text().splitlines() if not ln.lstrip().startswith("#")]
    text = "\n".join(lines)
    assert re.search(r"^FROM apache/beam_python\$\{PYTHON_VERSION\}_sdk:\$\{BEAM_VERSION\} AS beam_sdk$", text, re.M)
    assert "COPY --from=beam_sdk /opt/apache/beam /opt/apache/beam" in lines
    assert lines[-1] == 'ENTRYPOINT ["/opt/apache/beam/boot"]'
    # the user is a build argument: non-root by default (Flink, Kubernetes), root for Dataflow; the install
    # steps run as the non-root user either way, and the home (the workers' cwd) is open to any --user
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert "ARG WORKER_USER=streamrnn" in lines and users[-1] == "${WORKER_USER}" and lines[-2] == "USER ${WORKER_USER}"
    assert re.search(r'case "\$WORKER_USER" in streamrnn\|10001\|root\|0\) ;;', text)
    assert "chmod 755 /home/streamrnn" in text
    assert "./deploy/install_worker.sh" in text and "torch" not in text
    assert re.search(r"^FROM base-\$\{VARIANT\} AS worker$", text, re.M) and "ARG VARIANT=gpu" in lines
    assert "COPY --chown=streamrnn exported ./exported" in lines
    # gs:// and s3:// on the workers (Dataflow reads gs://), through the install script's one option
    assert "ARG BEAM_EXTRAS=gcp,aws" in lines and '--beam-extras "$BEAM_EXTRAS" . \\' in lines
    # Beam's boot installs staged packages into the default environment as the worker user, who owns it
    assert "ENV PATH=/opt/venv/bin:$PATH RUN_PYTHON_SDK_IN_DEFAULT_ENVIRONMENT=1" in lines
    assert re.search(r"chown -R streamrnn [^\n]*/opt/venv", text)
    install = next(i for i, ln in enumerate(lines) if "install_worker.sh --python" in ln)
    assert lines.index("USER streamrnn") < install < lines.index("USER ${WORKER_USER}")  # pip runs as streamrnn
    # workers start outside the source tree, so they import the installed package
    workdirs = [ln.split()[1] for ln in lines if ln.startswith("WORKDIR ")]
    assert workdirs[-1] != "/opt/streamrnn" and lines.index(f"WORKDIR {workdirs[-1]}") > install


def test_deploy_docs_say_which_user_and_their_docker_runs_write_as_the_caller():
    """Dataflow's image is built with WORKER_USER=root; every `docker run` that mounts a host folder runs as the
    caller's uid, so its outputs are writable (and the caller's) whichever user the image was built with."""
    doc = (ROOT / "docs" / "deploy.md").read_text()
    assert "--build-arg WORKER_USER=root" in doc
    runs = [ln for ln in doc.splitlines() if ln.lstrip().startswith("docker run") and " -v " in ln]
    assert runs
    for ln in runs:
        assert '--user "$(id -u):$(id -g)"' in ln, ln


@pytest.mark.skipif(missing_filesystem("gs://b/x") is None, reason="Beam's gcp extra is installed here")
@pytest.mark.parametrize("job", ["next_token", "market_forecast"])
@pytest.mark.parametrize("flag", ["--input", "--model", "--output"])
def test_a_gs_path_without_beams_gcp_extra_is_one_line_naming_it(job, flag, tmp_path, capsys):
    """``gs://`` without ``apache-beam[gcp]``: one line naming the missing extra, exit code 2, no traceback,
    for the input, the model and the output alike."""
    import importlib

    import apache_beam

    main = importlib.import_module(f"beam_jobs.{job}").main
    if job == "next_token":
        events = demo_events(tmp_path / "events.jsonl", keys=2)
    else:
        from streamrnn.forecast.synthetic import simulate, write_sp500_layout

        events = str(tmp_path / "bars")
        write_sp500_layout(simulate(["SIMA"], start="2016-01-01", end="2016-02-01", seed=4), events)
    model = "shipped:charlm" if job == "next_token" else "shipped:market"
    args = {"--input": events, "--model": model, "--output": str(tmp_path / "out"), flag: "gs://bucket/x"}
    assert main([a for kv in args.items() for a in kv] + ["--metrics-port", "0", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    want = f'gs:// needs Beam\'s gcp extra: pip install "apache-beam[gcp]=={apache_beam.__version__}"'
    assert len([ln for ln in err if want in ln]) == 1 and "Traceback" not in "\n".join(err), err
    assert err[-1].startswith(f"{job}: ") and "'gs://bucket/x'" in err[-1] and want in err[-1], err


# --- a distributed run: job service + worker pool on loopback -------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, log: Path, deadline_s: float = 60.0) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"exited with {proc.returncode} before listening on {port}: {log.read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            proc_wait = min(0.1, max(0.0, end - time.monotonic()))
            try:
                proc.wait(timeout=proc_wait)  # returns early only if it died
            except subprocess.TimeoutExpired:
                pass
    raise AssertionError(f"nothing listening on 127.0.0.1:{port} after {deadline_s} s: {log.read_text()[-2000:]}")


@contextmanager
def _service(args: list[str], port: int, env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    with open(log, "w") as f:
        # cwd outside the checkout: `python -m` puts the cwd first on sys.path, and a worker started in the
        # checkout would import its streamrnn instead of the venv's
        proc = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                cwd=log.parent)
    try:
        _wait_for_port(port, proc, log)
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=20)
        # the pool's SDK harness children are in its session: none may outlive the test
        try:
            os.killpg(proc.pid, 9)
        except ProcessLookupError:
            pass


@contextmanager
def _portable(worker_venv: Path, logs: Path) -> Iterator[list[str]]:
    """Pipeline options for the PortableRunner against a local job service and a worker pool whose SDK harnesses
    run the venv that install_worker.sh built; the services' logs and the job service's staged artifacts go to
    ``logs``."""
    logs.mkdir()
    job_port, pool_port = _free_port(), _free_port()
    env = _env_without_checkout()
    pool_env = {**env, "PATH": f"{worker_venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
                "VIRTUAL_ENV": str(worker_venv)}  # the pool starts each harness as `python` from PATH
    job = [sys.executable, "-m", "apache_beam.runners.portability.local_job_service_main", "--port", str(job_port),
           "--staging_dir", str(logs / "staging")]
    pool = [str(worker_venv / "bin" / "python"), "-m", "apache_beam.runners.worker.worker_pool_main",
            "--service_port", str(pool_port)]
    with _service(job, job_port, env, logs / "job_service.log"), \
            _service(pool, pool_port, pool_env, logs / "worker_pool.log"):
        yield ["--runner=PortableRunner", f"--job_endpoint=localhost:{job_port}", "--environment_type=EXTERNAL",
               f"--environment_config=localhost:{pool_port}"]


def _job(module: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """A job as a launcher runs it: a process of its own, the checkout under test, --quiet, no exporter."""
    return subprocess.run([sys.executable, "-m", module, "--quiet", "--metrics-port", "0", *args], capture_output=True,
                          text=True, timeout=240, cwd=cwd, env=_launcher_env())


def _equal_runs(job: str, args: list[str], options: list[str], logs: Path, folder: Path) -> dict:
    """The job on the DirectRunner (direct/) and distributed (dist/): both processes, and the SDK harnesses the
    pool started for the distributed run."""
    direct = _job(f"beam_jobs.{job}", [*args, "--output", str(folder / "direct")], folder)
    before = _harnesses_started(logs)
    dist = _job(f"beam_jobs.{job}", [*args, "--output", str(folder / "dist"), *options], folder)
    return {"direct": direct, "dist": dist, "harnesses": _harnesses_started(logs) - before, "folder": folder}


@background.job("deploy: distributed runs", file=__file__)
def _distributed(folder: Path) -> dict:
    """Both jobs run distributed the way Flink on Kubernetes runs Python, and on the DirectRunner for the same
    input; then the market job with the worker install's shipped model swapped for another one. Beside the other
    tests (tests/background.py): every step is another process."""
    from streamrnn import DEFAULT_MODEL
    from streamrnn.beam.job.io import demo_events
    from streamrnn.forecast.synthetic import simulate, write_sp500_layout

    _, worker_venv, wheel = background.result("deploy: worker venv and wheel")
    runs: dict = {"logs": folder / "services"}
    with _portable(worker_venv, runs["logs"]) as options:
        # next_token: the model on a shared filesystem (not the checkout), opened by the workers from --model;
        # the distributed run ships the wheel with --extra_package
        nt = folder / "next_token"
        (nt / "shared").mkdir(parents=True)
        model = shutil.copy(DEFAULT_MODEL, nt / "shared" / "lm.onnx")
        events = demo_events(nt / "events.jsonl", keys=4)
        runs["next_token"] = _equal_runs("next_token", ["--input", events, "--model", str(model)],
                                         [*options, "--extra_package", str(wheel)], runs["logs"], nt)
        mf = folder / "market_forecast"
        write_sp500_layout(simulate(["SIMA", "SIMB", "SIMC"], start="2016-01-01", end="2016-05-01", seed=3),
                           mf / "bars")
        runs["market_forecast"] = _equal_runs("market_forecast", ["--input", str(mf / "bars")], options,
                                              runs["logs"], mf)
        # the market job with the worker install's copy of shipped:market swapped for another model
        sw = folder / "swapped"
        code = "from streamrnn.model import shipped; print(shipped.resolve('shipped:market'))"
        installed = Path(subprocess.run([str(worker_venv / "bin" / "python"), "-c", code], capture_output=True,
                                        text=True, check=True, cwd=folder, env=_env_without_checkout()).stdout.strip())
        write_sp500_layout(simulate(["SIMA"], start="2016-01-01", end="2016-02-01", seed=4), sw / "bars")
        kept = installed.read_bytes()
        try:
            if installed.resolve().is_relative_to(worker_venv.resolve()):  # (never the checkout's: checked below)
                shutil.copy(DEFAULT_MODEL, installed)
            swapped = _job("beam_jobs.market_forecast", ["--input", str(sw / "bars"), "--output", str(sw / "out"),
                                                         *options], folder)
        finally:
            installed.write_bytes(kept)
        runs["swapped"] = {"installed": installed, "run": swapped, "folder": sw}
    return runs


def _table(folder: Path, prefix: str, sort: list[str]) -> pa.Table | None:
    files = sorted(folder.glob(f"{prefix}-*.parquet"))
    if not files:
        return None
    return pa.concat_tables([pq.read_table(f) for f in files]).sort_by([(c, "ascending") for c in sort])


def _assert_json_close(a: object, b: object, where: str = "summary") -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_json_close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_json_close(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and not isinstance(a, bool):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-5, nan_ok=True), where
    else:
        assert a == b, where


def _floats(col: pa.ChunkedArray) -> np.ndarray | None:
    """A float column (or list-of-float column, flattened) as numpy with nulls as NaN; None for other types."""
    if pa.types.is_list(col.type):
        col = pc.list_flatten(col)
    if not pa.types.is_floating(col.type):
        return None
    return col.cast(pa.float64()).fill_null(float("nan")).to_numpy()


def _assert_tables_match(a: pa.Table, b: pa.Table) -> None:
    """Same rows and columns; floats to 1e-5 (ONNX Runtime's batches may differ between runners)."""
    assert a.schema == b.schema and a.num_rows == b.num_rows
    for name in a.column_names:
        fa, fb = _floats(a.column(name)), _floats(b.column(name))
        if fa is not None:
            np.testing.assert_allclose(fa, fb, rtol=1e-5, atol=1e-5, equal_nan=True, err_msg=name)
        else:
            assert a.column(name).to_pylist() == b.column(name).to_pylist(), name


def _assert_same_outputs(direct: Path, dist: Path, main: str, sort: list[str]) -> None:
    a, b = _table(direct, main, sort), _table(dist, main, sort)
    assert a is not None and b is not None and a.num_rows > 0, f"no {main} rows"
    _assert_tables_match(a, b)
    da, db = (_table(d, "dead_letters", ["reason"]) for d in (direct, dist))
    assert (da is None) == (db is None)
    if da is not None:
        assert sorted(map(str, da.column("reason").to_pylist())) == sorted(map(str, db.column("reason").to_pylist()))
    _assert_json_close(*(json.loads((d / "summary.json").read_text()) for d in (direct, dist)))


def _harnesses_started(logs: Path) -> int:
    return (logs / "worker_pool.log").read_text().count("Starting worker with command")


def _assert_distributed_equals_direct(job: str, main: str, sort: list[str]) -> None:
    r = background.result("deploy: distributed runs")[job]
    assert r["direct"].returncode == 0, r["direct"].stderr[-4000:]
    assert r["dist"].returncode == 0, r["dist"].stderr[-4000:]
    assert r["harnesses"] > 0  # the pool's SDK harnesses ran it, not the job service in-process
    _assert_same_outputs(r["folder"] / "direct", r["folder"] / "dist", main, sort)


@pytest.mark.slow
def test_next_token_distributed_equals_direct():
    """The model on a shared filesystem (not the checkout), opened by the workers from --model."""
    _assert_distributed_equals_direct("next_token", "predictions", ["key", "seq", "offset"])


@pytest.mark.slow
def test_market_forecast_distributed_equals_direct():
    _assert_distributed_equals_direct("market_forecast", "forecasts", ["symbol", "ts"])


@pytest.mark.slow
def test_extra_package_wheel_is_staged_to_the_job_service():
    """``--extra_package dist/streamrnn-*.whl`` ships the code to the cluster: the job service receives the
    wheel byte for byte (the next-token job's distributed run shipped it). (A bare worker_pool_main starts
    harnesses without Beam's boot, so nothing staged is installed here; boot does that in DOCKER/PROCESS
    environments and in the image's --worker_pool mode.)"""
    wheel = background.result("deploy: worker venv and wheel")[2]
    runs = background.result("deploy: distributed runs")
    assert runs["next_token"]["dist"].returncode == 0, runs["next_token"]["dist"].stderr[-4000:]
    same = [p for p in (runs["logs"] / "staging").rglob(f"*{wheel.name}") if p.read_bytes() == wheel.read_bytes()]
    assert len(same) == 1, list((runs["logs"] / "staging").rglob("*"))
    (listing,) = same[0].parent.glob("*extra_packages.txt")
    assert wheel.name in listing.read_text().split()


@pytest.mark.slow
def test_workers_resolve_shipped_models_in_their_own_install(worker_venv):
    """``--model shipped:market`` (the default) is resolved by each worker in its venv, not at the launcher's
    path: with the worker install's copy swapped for another model, the workers refuse to run (a one-line
    DeployError naming both models) instead of forecasting with a model the launcher never read."""
    sw = background.result("deploy: distributed runs")["swapped"]
    installed, r = sw["installed"], sw["run"]
    assert installed.resolve().is_relative_to(worker_venv.resolve()) and installed.is_file()
    lines = [ln for ln in r.stderr.strip().splitlines() if not ln.startswith("WARNING:")]
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and len(lines) == 2, lines  # the job's first line, then the error
    assert re.fullmatch(r"market_forecast: StatefulInference: model 'shipped:market': expected market-\S+ \(what the "
                        r"launcher read\), got charlm-\S+ on worker .*", lines[-1]), lines[-3:]
    assert not list((sw["folder"] / "out").glob("forecasts-*.parquet"))  # not one forecast from the other model
