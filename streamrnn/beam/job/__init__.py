"""The job API: what a Beam job built on :class:`~streamrnn.beam.StatefulInference` imports (the two jobs in
``beam_jobs/`` import only this and :mod:`streamrnn.beam`).

* running a job: ``launcher`` (the job's flag parser and Beam's flags, the checks made before a pipeline runs,
  ``execute`` and ``run``: errors in one line, exit 2), :class:`JobError`, :class:`Output`; flag validators
  ``at_least``, ``fraction`` and ``fractions``; the errors a job turns into one line (``InputError``,
  ``ModelLoadError``);
* input: :class:`ReadEvents` / :class:`ReplayEvents` (event files, batch or replayed), ``demo_events``;
  :class:`ParseFiles` and :class:`LiveParser` (a job's own rows, read by the same rules), :class:`EventParser`;
  live input: :class:`ReadLive`, :class:`LiveRun`, ``add_live_args``, ``live_source``;
* output: :class:`WriteParquet`, ``DEAD_LETTER_SCHEMA``, :class:`CountUnread` (the reader's dead letters counted);
  the summary: ``SUMMARY``, :class:`MeanMetric`, :class:`WriteSummary`, ``print_summary``, ``read_summary``;
* models: ``load_model`` (any Beam filesystem, ``shipped:NAME``), ``CPU``.

The modules behind it: ``launcher``, ``io``, ``event_files``, ``replay``, ``live``, ``sinks``, ``summary``.
"""

from __future__ import annotations

from ...cli.args import at_least, fraction, fractions
from ...errors import InputError, ModelLoadError
from ...model.runtime import CPU
from ..models import load_model
from ..records import DEAD_LETTER_SCHEMA
from ..step.counters import CountUnread
from . import launcher
from .io import ParseFiles, ReadEvents, ReplayEvents, demo_events
from .launcher import JobError, Output
from .live import EventParser, LiveParser, LiveRun, ReadLive, add_live_args, live_source
from .sinks import WriteParquet
from .summary import SUMMARY, MeanMetric, WriteSummary, print_summary, read_summary

__all__ = [
    "CPU",
    "DEAD_LETTER_SCHEMA",
    "SUMMARY",
    "CountUnread",
    "EventParser",
    "InputError",
    "JobError",
    "LiveParser",
    "LiveRun",
    "MeanMetric",
    "ModelLoadError",
    "Output",
    "ParseFiles",
    "ReadEvents",
    "ReadLive",
    "ReplayEvents",
    "WriteParquet",
    "WriteSummary",
    "add_live_args",
    "at_least",
    "demo_events",
    "fraction",
    "fractions",
    "launcher",
    "live_source",
    "load_model",
    "print_summary",
    "read_summary",
]
