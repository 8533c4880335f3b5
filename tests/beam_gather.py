"""Gather what a pipeline's steps emit, and check it after the run: ``assert_that`` without its cost.

``assert_that`` adds about eight steps per check (a window, a side ``Create``, a CoGroupByKey, the
match), and the DirectRunner pays for every step at every bundle and watermark step: in the small
pipelines of these tests the checks cost as much as the transform under test. ``Gather`` adds one
step per collection, which writes a bundle's elements to a folder when the bundle finishes (a
bundle that fails before its end writes nothing). It works on every runner of this machine, in this
process or in worker processes. After ``run()`` the test reads them back and applies the same
matchers, in the test process (a worker never imports the test modules, nor torch through them).

    g = Gather(tmp_path)
    with beam.Pipeline() as p:
        out, dead = p | beam.Create(evs) | StatefulInference(...)
        g(out, "outputs")
        g(dead, "dead", stamps=True)  # (element, timestamp in micros) pairs
        g(out, "windowed", windows=True)  # (element, timestamp, (window start, window end) in micros)
    check_outputs(want)(g["outputs"])

This module imports only Beam: worker processes import it by name (``worker_path`` puts tests/
on their PYTHONPATH).
"""

from __future__ import annotations

import os
import pickle
import uuid
from pathlib import Path
from typing import Any

import apache_beam as beam


class _Write(beam.DoFn):
    def __init__(self, folder: str, stamps: bool, windows: bool):
        self.folder = folder
        self.stamps = stamps
        self.windows = windows

    def start_bundle(self) -> None:
        self.buf: list = []

    def process(self, x: Any, ts=beam.DoFn.TimestampParam, w=beam.DoFn.WindowParam) -> None:
        # (asking for the window makes the runner call this once per window of an element, as assert_that's
        # re-windowing into the global window would count it)
        if self.windows:
            self.buf.append((x, ts.micros, (w.start.micros, w.end.micros)))
        else:
            self.buf.append((x, ts.micros) if self.stamps else x)

    def finish_bundle(self) -> None:
        if self.buf:
            path = os.path.join(self.folder, uuid.uuid4().hex)
            with open(path + ".part", "wb") as f:
                pickle.dump(self.buf, f)
            os.replace(path + ".part", path + ".pkl")
        self.buf = []


class Gather:
    """Named collections of one or more pipelines, under ``root`` (a fresh folder per name)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def __call__(self, pcoll: beam.PCollection, name: str, *, stamps: bool = False, windows: bool = False) -> None:
        folder = self.root / name
        folder.mkdir(parents=True)  # a name is gathered once
        _ = pcoll | f"Gather[{name}]" >> beam.ParDo(_Write(str(folder), stamps, windows))

    def __getitem__(self, name: str) -> list:
        folder = self.root / name
        if not folder.is_dir():
            raise KeyError(f"nothing was gathered as {name!r}")
        return [x for f in sorted(folder.glob("*.pkl")) for x in pickle.loads(f.read_bytes())]
