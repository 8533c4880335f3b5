"""Instrumentation overhead: the Beam benchmark's pipeline (variant a) with Prometheus metrics on and off.

    python -m streamrnn.bench.metrics [--keys 16 --events 2000 --repeats 3] [--identity]

Runs alternate (on, off, on, off, ...) in one process on the DirectRunner, reading the same
Parquet events as ``streamrnn bench beam``; ``STREAMRNN_METRICS=off`` switches the mirror off
(Beam's own counters count either way). Prints JSON: median seconds and events/s of each,
``throughput_loss`` = 1 - on/off events per second (wall clock), and ``cpu_overhead`` = on/off
process CPU seconds - 1, which other load on a shared machine disturbs far less. ``--identity`` replaces the model's
compute by an identity (zero outputs), so the overhead is measured against the pipeline alone.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

from .. import DEFAULT_MODEL
from ..metrics.export import ENV_SWITCH
from .common import byte_events, run_stateful, write_byte_events


def run(keys: int, events: int, repeats: int, shards: int, identity: bool, model: str = DEFAULT_MODEL) -> dict:
    tok, ts = byte_events(keys, events)
    root = tempfile.mkdtemp(prefix="metrics-bench-")
    path = write_byte_events(tok, ts, os.path.join(root, "events.parquet"))
    times: dict[str, list[float]] = {"on": [], "off": []}
    cpu: dict[str, list[float]] = {"on": [], "off": []}
    before = os.environ.get(ENV_SWITCH)
    try:
        run_stateful(model, path, shards, identity=identity)  # warm-up: imports, model load, caches
        for _ in range(repeats):
            for mode in ("on", "off"):
                os.environ[ENV_SWITCH] = mode
                c0 = time.process_time()
                dt, got, _ = run_stateful(model, path, shards, identity=identity)
                cpu[mode].append(time.process_time() - c0)
                n_out = sum(len(k) for k, _, _ in got)
                if n_out != tok.size:
                    raise RuntimeError(f"metrics bench: expected {tok.size} outputs, got {n_out}")
                times[mode].append(dt)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        if before is None:
            os.environ.pop(ENV_SWITCH, None)
        else:
            os.environ[ENV_SWITCH] = before
    med = {m: statistics.median(v) for m, v in times.items()}
    cmed = {m: statistics.median(v) for m, v in cpu.items()}
    return {"events": int(tok.size), "keys": keys, "identity_model": identity, "repeats": repeats,
            "seconds_median": med, "seconds_all": times, "cpu_seconds_median": cmed, "cpu_seconds_all": cpu,
            "events_per_s": {m: tok.size / v for m, v in med.items()},
            "throughput_loss": 1.0 - med["off"] / med["on"],
            "cpu_overhead": cmed["on"] / cmed["off"] - 1.0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m streamrnn.bench.metrics", description=__doc__.split("\n")[0])
    ap.add_argument("--keys", type=int, default=16)
    ap.add_argument("--events", type=int, default=2000, help="events per key")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--identity", action="store_true", help="identity model: the pipeline's own cost only")
    args = ap.parse_args(argv)
    from ..cli.logs import guard_imports

    guard_imports()
    print(json.dumps(run(args.keys, args.events, args.repeats, args.shards, args.identity), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
