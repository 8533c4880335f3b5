"""The Beam layer's counters and distributions (namespace ``streamrnn``), defined once.

Runners report them natively (Dataflow monitoring, Flink's metric reporters).
"""

from __future__ import annotations

from apache_beam.metrics import Metrics

NAMESPACE = "streamrnn"

#: Dead-letter kinds; each has a counter of the same name and adds to ``dead_letters``.
DEAD_KINDS = ("invalid", "late", "duplicate", "error")
_DEAD_COUNTER = {"invalid": "invalid", "late": "late", "duplicate": "duplicates", "error": "errors"}


class Counters:
    """Create inside ``setup()``; cheap to create."""

    def __init__(self) -> None:
        def c(n: str):
            return Metrics.counter(NAMESPACE, n)

        self.events_in = c("events_in")
        self.events = c("events_applied")
        self.batches = c("batches")
        self.flushes = c("flushes")
        self.expired = c("expired")
        self.model_resets = c("model_update_resets")
        self.model_switches = c("model_switches")
        self.compactions = c("state_compactions")
        self.rebuilds = c("state_rebuilds")
        self.state_bytes_written = c("state_bytes_written")
        self._dead = {k: c(v) for k, v in _DEAD_COUNTER.items()}
        self._dead_total = c("dead_letters")
        self.batch_latency = Metrics.distribution(NAMESPACE, "batch_latency_us")
        self.batch_size = Metrics.distribution(NAMESPACE, "batch_size")
        self.flush_state_bytes = Metrics.distribution(NAMESPACE, "flush_state_bytes")

    def dead(self, kind: str, n: int = 1) -> None:
        self._dead[kind].inc(n)
        self._dead_total.inc(n)
