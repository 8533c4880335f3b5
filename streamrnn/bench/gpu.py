"""``streamrnn bench gpu``: does the CUDA path really run, and what does it buy? At most ~4 minutes.

It prints ONNX Runtime's providers and whether the CUDA execution provider really loads (with
ORT's own reason when it does not). Without CUDA it says so and exits 0. With CUDA it measures,
in the same run:

* parity CUDA vs CPU of every shipped model (max |difference| of all outputs and states, goal ≤ 1e-4);
* key-steps/s on a 2-layer H=512 LSTM LM (random weights, built with torch) for B ∈ {1, 64, 1024,
  8192} × T ∈ {1, 64}, interleaved call by call: ``device`` (:meth:`Model.step`, state resident on
  the GPU through IOBinding), ``keyed`` (:class:`KeyedOperator`, state slabs on the GPU), ``host``
  (the same CUDA session with numpy state, copied to and from the host every call), ``cpu`` (the
  CPU provider; shapes up to 65,536 key-steps per call) and ``cudnn`` (torch ``nn.LSTM`` on cuDNN);
* the Beam layer (``StatefulInference`` on the DirectRunner) in events/s on CUDA vs CPU;
* GPU memory (torch's peak, and the process's use by ``nvidia-smi``, ORT's arena included).

Goals: device-resident ≥ 0.5× cuDNN at B ≥ 1024, and ≥ 2× the host round-trip.
``--simulate-on-cpu`` runs every measurement with the CPU provider in place of CUDA at toy sizes,
so the harness itself is tested on machines without a GPU (its numbers mean nothing).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable

import numpy as np
import onnxruntime as ort

from ..cli.args import Heartbeat, OneLineParser, at_least
from .common import byte_events, interleaved, write_byte_events
from .operator import flops_per_key_step

SHAPES = tuple((B, T) for B in (1, 64, 1024, 8192) for T in (1, 64))
CPU_MAX_KEY_STEPS = 65_536  # larger calls on the CPU provider would take most of the time budget
PARITY_GOAL = 1e-4


def _cuda_providers(simulate: bool) -> list:
    from ..model.runtime import CPU, CUDA

    return [CPU] if simulate else [(CUDA, {"device_id": 0}), CPU]


def _torch_info() -> dict:
    try:
        import torch
    except ImportError as e:
        return {"installed": False, "reason": str(e)}
    info = {"installed": True, "version": torch.__version__, "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info.update(device=torch.cuda.get_device_name(0), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
    return info


def _nvidia_smi_mib() -> float | None:
    """This process's GPU memory by ``nvidia-smi`` (ORT's arena keeps its peak), MiB; None if unknown."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        pid, _, mib = line.partition(",")
        if pid.strip() == str(os.getpid()):
            return float(mib)
    return None


def _random_x(spec, B: int, T: int, rng: np.random.Generator) -> np.ndarray:
    if spec.input.kind == "tokens":
        return rng.integers(0, spec.input.vocab_size, (B, T)).astype(np.int64)
    return rng.standard_normal((B, T, spec.input.n_features)).astype(np.float32)


def parity(simulate: bool, B: int = 8, T: int = 64) -> dict:
    """Max |CUDA - CPU| over every output and state of each shipped model, two chained calls."""
    from .. import DEFAULT_MODEL, load
    from ..model.runtime import CPU

    folder = os.path.dirname(DEFAULT_MODEL)
    res = {}
    for name in sorted(f for f in os.listdir(folder) if f.endswith(".onnx")):
        path = os.path.join(folder, name)
        gpu, cpu = load(path, providers=_cuda_providers(simulate)), load(path, providers=[CPU])
        rng = np.random.default_rng(0)
        sg, sc, worst = None, None, 0.0
        for _ in range(2):  # the second call starts from the carried (device-resident) state
            x = _random_x(cpu.spec, B, T, rng)
            (og, sg), (oc, sc) = gpu.step(x, sg), cpu.step(x, sc)
            diffs = [np.abs(og[k] - oc[k]).max() for k in oc] + [np.abs(sg[k] - sc[k]).max() for k in sc.names]
            worst = max(worst, *map(float, diffs))
        res[name] = {"max_abs_diff": worst, "met": worst <= PARITY_GOAL, "provider": gpu.provider}
    return res


def _quiet(status: str) -> None:
    pass


def _throughput(path: str, net, shapes, seconds: float, min_calls: int, deadline: float, simulate: bool,
                progress: Callable[[str], None] = _quiet) -> list:
    import torch

    from .. import load
    from ..keyed.operator import KeyedOperator
    from ..model.runtime import CPU

    dev = torch.device("cpu" if simulate else "cuda")
    tnet = net.to(dev)
    gpu, cpu = load(path, providers=_cuda_providers(simulate)), load(path, providers=[CPU])
    sync = (lambda: None) if simulate else torch.cuda.synchronize
    rng = np.random.default_rng(0)
    rows = []
    for i, (B, T) in enumerate(shapes):
        if time.monotonic() > deadline:
            rows.append({"B": B, "T": T, "skipped": "time budget spent"})
            continue
        progress(f"throughput, shape {i + 1}/{len(shapes)} (B={B}, T={T})")
        x = rng.integers(0, 256, (B, T)).astype(np.int64)
        lens = np.full(B, T, np.int32)
        carried = {"device": gpu.step(x)[1]}  # device-resident state, advanced call after call
        host = gpu.initial_state(B).numpy()
        keys = [f"k{i}" for i in range(B)]
        ev_keys, ev_x = [k for _ in range(T) for k in keys], x.T.reshape(-1)
        op = KeyedOperator(gpu, max_keys=max(B, 16), state_on_device=not simulate)
        tx, tst = torch.from_numpy(x).to(dev), tnet.initial_state(B, dev)

        def device_step(x=x, carried=carried):
            carried["device"] = gpu.step(x, carried["device"])[1]

        def cudnn(tx=tx, tst=tst):
            with torch.no_grad():
                torch.log_softmax(tnet(tx, tst)[0], -1)
            sync()

        variants: dict[str, Callable[[], object]] = {
            "device": device_step,
            "keyed": lambda op=op, k=ev_keys, e=ev_x: op.process(k, e),
            "host": lambda x=x, lens=lens, host=host: gpu.run_unchecked(x, lens, host),
        }
        if B * T <= CPU_MAX_KEY_STEPS:
            variants["cpu"] = lambda x=x, lens=lens, host=host: cpu.run_unchecked(x, lens, host)
        for fn in (*variants.values(), cudnn):
            fn()
        samples = interleaved(variants, seconds, min_calls)
        samples.update(interleaved({"cudnn": cudnn}, seconds / 3, min_calls))
        med = {k: statistics.median(v) for k, v in samples.items()}
        row = {"B": B, "T": T, "calls": len(samples["device"]),
               **{k: {"key_steps_per_s": B * T / v, "median_s_per_call": v} for k, v in med.items()},
               "ratio_device_vs_cudnn": med["cudnn"] / med["device"],
               "ratio_device_vs_host": med["host"] / med["device"],
               "ratio_keyed_vs_host": med["host"] / med["keyed"]}
        if "cpu" in med:
            row["ratio_device_vs_cpu"] = med["cpu"] / med["device"]
        rows.append(row)
    return rows


def beam_events_per_s(path: str, simulate: bool, keys: int, per_key: int,
                      progress: Callable[[str], None] = _quiet) -> dict:
    """``StatefulInference`` on the DirectRunner over the same events, on CUDA and on the CPU provider."""
    from ..cli.logs import guard_imports

    guard_imports()  # before apache_beam: its import-time 'apitools not found' warning stays off stderr
    import apache_beam as beam

    from ..beam import NextTokenPostprocess, StatefulInference
    from ..beam.job.io import ReadEvents
    from ..model.runtime import CPU

    d = tempfile.mkdtemp(prefix="bench-gpu-")
    try:
        events = write_byte_events(*byte_events(keys, per_key), os.path.join(d, "events.parquet"))
        out = {}
        for label, providers in (("cuda", _cuda_providers(simulate)), ("cpu", [CPU])):
            progress(f"Beam pipeline on {label}, {keys * per_key:,} events")
            t0 = time.perf_counter()
            with beam.Pipeline() as p:
                blocks, _ = p | ReadEvents(events, block_rows=8192)
                rows, _ = blocks | StatefulInference(model=path, num_shards=4, window_size=60.0, output="arrow",
                                                     postprocess=NextTokenPostprocess(5), providers=providers)
                rows | beam.Map(lambda b: b.num_rows) | beam.CombineGlobally(sum)
            dt = time.perf_counter() - t0
            out[label] = {"seconds": dt, "events_per_s": keys * per_key / dt}
        out["ratio_cuda_vs_cpu"] = out["cpu"]["seconds"] / out["cuda"]["seconds"]
        return {"events": keys * per_key, "keys": keys, **out}
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _goal(value: float | None, limit: float, at_most: bool = False) -> dict:
    met = None if value is None else (value <= limit if at_most else value >= limit)
    return {"value": value, "limit": limit, "met": met}


def run(*, budget_s: float = 220.0, seconds: float = 2.0, min_calls: int = 5, hidden: int = 512, layers: int = 2,
        shapes=SHAPES, beam_keys: int = 1024, beam_per_key: int = 64, simulate: bool = False,
        progress: Callable[[str], None] = _quiet) -> dict:
    """The whole check; ``progress(status)`` is told which part runs (the CLI's progress lines)."""
    from ..model.runtime import cuda_usable

    t_start = time.monotonic()
    ok, reason = (True, "simulated on the CPU provider (--simulate-on-cpu)") if simulate else cuda_usable(0)
    res: dict = {
        "benchmark": "gpu", "onnxruntime": ort.__version__, "available_providers": ort.get_available_providers(),
        "cuda_available": ok, "reason": reason, "simulated_on_cpu": simulate, "torch": _torch_info(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
    }
    if not ok:
        return res
    progress("parity of the shipped models, CUDA vs CPU")
    res["parity"] = parity(simulate)
    try:
        import torch

        from ..train.export import export
        from ..train.nets import NetConfig, RecurrentNet
    except ImportError as e:
        res["throughput"] = {"skipped": f"needs torch (the 'train' extra) to build the LSTM and run cuDNN: {e}"}
        res["seconds"] = time.monotonic() - t_start
        return res
    torch.manual_seed(0)
    net = RecurrentNet(NetConfig(hidden=hidden, layers=layers, embed_dim=64)).eval()
    d = tempfile.mkdtemp(prefix="bench-gpu-")
    try:
        path = os.path.join(d, "bench.onnx")
        export(net, path, name=f"bench-lm-{layers}x{hidden}")
        deadline = t_start + budget_s * 0.8  # the rest is for the Beam section
        res["model"] = f"{layers}x{hidden} LSTM LM (vocab 256, embed 64, random weights)"
        res["flops_per_key_step"] = flops_per_key_step(layers, hidden, 64, 256)
        res["throughput"] = _throughput(path, net, shapes, seconds, min_calls, deadline, simulate, progress)
        res["beam"] = beam_events_per_s(path, simulate, beam_keys, beam_per_key, progress)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    res["gpu_memory"] = {"torch_peak_allocated_mib": None if simulate else torch.cuda.max_memory_allocated() / 2**20,
                         "process_used_mib_nvidia_smi": None if simulate else _nvidia_smi_mib()}
    big = [r for r in res["throughput"] if "device" in r and r["B"] >= 1024]
    res["goals"] = {
        "device_ge_0.5x_cudnn_at_B_ge_1024": _goal(min((r["ratio_device_vs_cudnn"] for r in big), default=None), 0.5),
        "device_ge_2x_host_at_B_ge_1024": _goal(min((r["ratio_device_vs_host"] for r in big), default=None), 2.0),
        "parity_le_1e-4": _goal(max(p["max_abs_diff"] for p in res["parity"].values()), PARITY_GOAL, at_most=True),
    }
    res["seconds"] = time.monotonic() - t_start
    return res


def _human(res: dict) -> str:
    lines = [f"onnxruntime {res['onnxruntime']}; providers {', '.join(res['available_providers'])}",
             f"CUDA: {'yes' if res['cuda_available'] else 'no'} ({res['reason']})"]
    for name, p in (res.get("parity") or {}).items():
        lines.append(f"parity {name}: max |cuda - cpu| {p['max_abs_diff']:.2e} ({'MET' if p['met'] else 'MISSED'})")
    tp = res.get("throughput")
    if isinstance(tp, dict):
        lines.append(f"throughput: {tp['skipped']}")
    for r in tp if isinstance(tp, list) else []:
        if "skipped" in r:
            lines.append(f"B={r['B']:>5} T={r['T']:>3}: skipped ({r['skipped']})")
            continue
        cells = "  ".join(f"{k} {r[k]['key_steps_per_s']:>12.0f}" for k in ("device", "keyed", "host", "cpu", "cudnn")
                          if k in r)
        lines.append(f"B={r['B']:>5} T={r['T']:>3} key-steps/s: {cells}")
    if "beam" in res:
        b = res["beam"]
        lines.append(f"beam: {b['events']} events, cuda {b['cuda']['events_per_s']:.0f}/s, cpu "
                     f"{b['cpu']['events_per_s']:.0f}/s (x{b['ratio_cuda_vs_cpu']:.2f})")
    for k, g in (res.get("goals") or {}).items():
        v = "n/a" if g["value"] is None else f"{g['value']:.3g}"
        lines.append(f"goal {k}: {v} {'MET' if g['met'] else 'MISSED' if g['met'] is False else ''}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="streamrnn bench gpu", description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--budget", type=at_least(10.0), default=220.0, help="seconds for the whole check (default: 220)")
    p.add_argument("--seconds", type=at_least(0.0, open_=True), default=2.0,
                   help="time per shape (variants interleaved)")
    p.add_argument("--min-calls", type=at_least(1), default=5)
    p.add_argument("--simulate-on-cpu", action="store_true",
                   help="run every measurement with the CPU provider at toy sizes (tests the harness; numbers mean "
                        "nothing)")
    a = p.parse_args(argv)
    with Heartbeat("streamrnn bench gpu") as hb:
        if a.simulate_on_cpu:
            res = run(budget_s=a.budget, seconds=0.05, min_calls=2, hidden=16, layers=2, shapes=((1, 1), (64, 4)),
                      beam_keys=8, beam_per_key=8, simulate=True, progress=hb.update)
        else:
            res = run(budget_s=a.budget, seconds=a.seconds, min_calls=a.min_calls, progress=hb.update)
    print(json.dumps(res, indent=2) if a.json else _human(res))
    return 0
