"""Live input (streamrnn.beam.job.live): a watched folder, Pub/Sub (a fake subscription), Kafka's row parsing.

The jobs' live runs are compared with one batch run over the same rows, per event; the files
of a watched folder are dropped from a thread, each batch when the pipeline has shown it took
the one before (a round, then the first predictions written), so no test sleeps to wait.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import apache_beam as beam
import background
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.utils.timestamp import Timestamp

from beam_jobs import next_token
from streamrnn.beam.job import live
from streamrnn.beam.job.event_files import parse_events
from streamrnn.beam.job.live import EventClock, EventParser, LiveSource, Message, ParseRecords, ReadLive

WORDS = ["to be", " or not", " to be:", " that is", " the question", "\n", "whether 'tis", " nobler"]


def _rows(key: str, t0: float, t1: float, seq0: int, n: int, k: int) -> list[dict]:
    step = (t1 - t0) / n
    return [{"key": key, "ts": round(t0 + step * i + k * 1.5, 3), "seq": seq0 + i, "text": WORDS[(i + k) % len(WORDS)]}
            for i in range(n)]


def batches() -> list[list[list[dict]]]:
    """Three batches of files (a batch is a list of files, a file a list of rows), event time 100..700 s.

    Batch 2 holds a late row (u1 at 255 s, behind batch 1's newest row but within the allowed
    lateness of its window) and a copy of a batch 1 row (a duplicate); batch 3 a row that is no
    row (a bad ts).
    """
    keys = ["u1", "u2", "u3"]
    b1 = [[r for i, k in enumerate(keys) for r in _rows(k, 100, 300, 0, 6, i)]]
    dup = dict(b1[0][4])
    b2 = [[*_rows("u1", 300, 500, 6, 5, 0), {"key": "u1", "ts": 255.0, "seq": 50, "text": " late"}],
          [*_rows("u2", 300, 500, 6, 5, 1), *_rows("u3", 300, 500, 6, 5, 2), dup]]
    b3 = [[*(r for i, k in enumerate(keys) for r in _rows(k, 500, 700, 11, 5, i)),
           {"key": "u2", "ts": "soon", "seq": 99, "text": "bad"}]]
    return [b1, b2, b3]


def _write(path: Path, rows: list[dict]) -> None:
    """A file appears whole: written under another name, then renamed into the glob."""
    tmp = path.with_name(f".{path.name}.part")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


def _table(folder: Path, prefix: str) -> list[dict]:
    files = sorted(folder.glob(f"{prefix}-*.parquet"))
    return pa.concat_tables([pq.read_table(str(f)) for f in files]).to_pylist() if files else []


def _wait(pred, timeout: float, what: str) -> None:
    """Until ``pred()`` holds (checked every 20 ms), at most ``timeout`` s."""
    end = time.monotonic() + timeout
    tick = threading.Event()
    while not pred():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        tick.wait(0.02)


ARGS = ["--window", "60", "--allowed-lateness", "60", "--providers", "cpu", "--shards", "2"]


JOB = "next_token and market_forecast live runs of test_live_input"


@background.job(JOB, file=__file__)
def _job_runs(folder: Path) -> dict:
    """The live runs below (a watched folder, a fake Pub/Sub subscription, the market job's watched folder) and the
    batch runs they are compared with, one after another in a process of their own (tests/run_jobs.py; the live
    runs' threads and fake subscription live there: :func:`watched_run`, :func:`pubsub_run`,
    :func:`market_runs`), beside the other tests (tests/background.py): {run: its result and folder}."""
    model = str(folder / "tiny.onnx")
    _write(folder / "all.jsonl", [r for b in batches() for f in b for r in f])
    runs = {"model": ("conftest:export_tiny_lm", [model]),
            "batch": ("beam_jobs.next_token", ["--input", str(folder / "all.jsonl"), "--output", str(folder / "batch"),
                                              "--model", model, *ARGS, "--quiet"]),
            "watched": ("test_live_input:watched_run", [str(folder / "watched"), model]),
            "pubsub": ("test_live_input:pubsub_run", [str(folder / "pubsub"), model]),
            "market": ("test_live_input:market_runs", [str(folder / "market")])}
    ran = background.run_jobs(folder, runs)
    return {name: {**r, "folder": folder / name} for name, r in ran.items()}


def _ran(name: str) -> dict:
    """The background run ``name``, which succeeded (with the model), with its folder as "folder"."""
    got = background.result(JOB)
    for n in ("model", name):
        assert got[n]["rc"] == 0, got[n]["stderr"][-3000:]
    return got[name]


@pytest.fixture(scope="module")
def batch_run() -> dict:
    """One batch run over the batches' files concatenated: predictions by event, dead letters, summary."""
    return _result(_ran("batch")["folder"])


def _result(out: Path) -> dict:
    preds = {(r["key"], r["seq"], r["offset"]): r for r in _table(out, "predictions")}
    dead = sorted(((d["kind"], d["key"], d["seq"], d["reason"]) for d in _table(out, "dead_letters")), key=repr)
    return {"preds": preds, "dead": dead, "summary": json.loads((out / "summary.json").read_text())}


def _assert_same(live_run: dict, batch: dict) -> float:
    """Every event's prediction as in the batch run (<= 1e-6); returns the largest difference."""
    assert live_run["preds"].keys() == batch["preds"].keys()
    worst = 0.0
    for k, b in batch["preds"].items():
        r = live_run["preds"][k]
        for col in ("logprob", "logprob_next"):
            assert (r[col] is None) == (b[col] is None), (k, col)
            if b[col] is not None:
                worst = max(worst, abs(r[col] - b[col]))
        worst = max(worst, max(abs(x - y) for x, y in zip(r["topk_probs"], b["topk_probs"], strict=True)))
        assert (r["topk_tokens"], r["pos"], r["fresh"], r["reset"], r["ts"]) == (
            b["topk_tokens"], b["pos"], b["fresh"], b["reset"], b["ts"]), k
    assert worst <= 1e-6
    return worst


def watched_run(argv: list[str]) -> int:
    """In the job process: three batches dropped into a watched folder (a late row, a duplicate across batches, a
    bad row), each once the job took the one before; ``[folder, model]``: the folder's ``in`` (watched), ``out``
    and ``marks.json`` (when the first predictions were written and the input ended, in s from the start)."""
    folder, model = Path(argv[0]), argv[1]
    src, out = folder / "in", folder / "out"
    src.mkdir(parents=True)
    b1, b2, b3 = batches()
    _write(src / "01.jsonl", b1[0])
    (src / "notes.txt").write_text("not an events file: never read")
    marks: dict[str, float | str] = {}

    def drop() -> None:
        try:
            _wait(lambda: bool(live._PROGRESS), 60, "the source")
            progress = next(iter(live._PROGRESS.values()))
            _wait(lambda: progress.files >= 1, 60, "the first file taken")
            for i, f in enumerate(b2):
                _write(src / f"02-{i}.jsonl", f)
            _wait(lambda: progress.files >= 3, 60, "batch 2 taken")
            _write(src / "03.jsonl", b3[0])
            # windows close while the job runs: predictions are written before the input ends
            _wait(lambda: any(out.glob("predictions-*.parquet")) or progress.ended, 60, "predictions or the end")
            marks["predictions"] = time.monotonic() - t0 if not progress.ended else math.inf
            _wait(lambda: progress.ended, 60, "the end of the input")
            marks["ended"] = time.monotonic() - t0
        except AssertionError as e:
            marks["error"] = str(e)

    t = threading.Thread(target=drop, daemon=True)
    t0 = time.monotonic()
    t.start()
    rc = next_token.main(["--input", str(src / "*.jsonl"), "--watch", "--watch-interval", "200ms",
                          "--watch-stop-after", "6s", "--output", str(out), "--model", model, *ARGS,
                          "--log-every", "1"])
    marks["took"] = time.monotonic() - t0
    t.join(5)
    (folder / "marks.json").write_text(json.dumps(marks))
    return rc


def test_watched_folder_equals_one_batch_run(batch_run):
    """Three batches dropped into a watched folder (:func:`watched_run`) give the batch run's predictions per event;
    windows close before the stop; the job stops by itself."""
    assert 255.0 < max(r["ts"] for r in batches()[0][0])  # batch 2's late row is behind the watermark batch 1 leaves
    r = _ran("watched")
    marks = json.loads((r["folder"] / "marks.json").read_text())
    assert "error" not in marks, marks
    assert marks["predictions"] < marks["ended"]
    err = r["stderr"]
    assert "live (streaming)" in err and "(watched every 200 ms, stopping after 6 s)" in err
    assert "4 file(s) taken (2,945 bytes), watermark 1970-01-01 00:11:03 UTC" in err  # the newest row: 663 s
    got = _result(r["folder"] / "out")
    worst = _assert_same(got, batch_run)
    assert got["dead"] == batch_run["dead"]
    assert got["summary"]["dead_letter_rows"] == batch_run["summary"]["dead_letter_rows"] == {"duplicate": 1,
                                                                                               "invalid": 1}
    assert math.isclose(got["summary"]["bits_per_char"], batch_run["summary"]["bits_per_char"], rel_tol=1e-9)
    print(f"\nwatched folder: {marks['took']:.1f} s, max |diff| {worst:.2e}, first predictions "
          f"{marks['predictions']:.1f} s in, input ended {marks['ended']:.1f} s in")


# -- Pub/Sub: a fake subscription with SubscriberClient's pull / acknowledge -------------------------------------
class FakeSubscription:
    """What the jobs use of google-cloud-pubsub's ``SubscriberClient``: ``pull`` and ``acknowledge``.

    Messages are published a batch at a time: the next batch once every message pulled so far
    is acknowledged (as a publisher that waits for the job would), so each batch is its own round.
    """

    def __init__(self, batches: list[list[bytes]]):
        self.batches = list(batches)
        self.queue: list[SimpleNamespace] = []
        self.outstanding: dict[str, str] = {}
        self.acked: list[str] = []
        self.published: list[str] = []
        self.pulls = 0
        self.lock = threading.Lock()
        self._publish()

    def _publish(self) -> None:
        if self.batches and not self.queue and not self.outstanding:
            for data in self.batches.pop(0):
                mid = str(1000 + len(self.published))
                self.published.append(mid)
                self.queue.append(SimpleNamespace(ack_id=f"ack-{mid}", message=SimpleNamespace(
                    data=data, message_id=mid, publish_time=datetime.now(UTC), attributes={})))

    def pull(self, request: dict, timeout: float | None = None) -> SimpleNamespace:
        assert request["subscription"] == "projects/p/subscriptions/s"
        with self.lock:
            self.pulls += 1
            got, self.queue = self.queue[:request["max_messages"]], self.queue[request["max_messages"]:]
            self.outstanding.update((m.ack_id, m.message.message_id) for m in got)
            return SimpleNamespace(received_messages=got)

    def acknowledge(self, request: dict) -> None:
        with self.lock:
            for a in request["ack_ids"]:
                self.acked.append(self.outstanding.pop(a))
            self._publish()


def _messages(rows_batches: list[list[dict]]) -> list[list[bytes]]:
    return [[json.dumps(r).encode() for r in rows] for rows in rows_batches]


TOO_LATE = {"key": "u3", "ts": 150.0, "seq": 77, "text": " too late"}  # its window closed with round 1


def pubsub_run(argv: list[str]) -> int:
    """In the job process: the batches' rows as messages of a fake subscription, a batch per round, with a message
    that is not JSON and a row later than the allowed lateness; ``[folder, model]``: the folder's ``out`` and
    ``subscription.json`` (the messages published and acked, the batches left)."""
    folder, model = Path(argv[0]), argv[1]
    msgs = _messages([[r for f in b for r in f] for b in batches()])
    msgs[2] += [b"{not json", json.dumps(TOO_LATE).encode()]
    fake = FakeSubscription(msgs)
    before, live.default_subscriber = live.default_subscriber, lambda: fake
    try:
        rc = next_token.main(["--input", "projects/p/subscriptions/s", "--watch-interval", "200ms",
                              "--watch-stop-after", "3s", "--output", str(folder / "out"), "--model", model, *ARGS,
                              "--quiet"])
    finally:
        live.default_subscriber = before
    (folder / "subscription.json").write_text(json.dumps({"published": fake.published, "acked": fake.acked,
                                                          "left": len(fake.batches)}))
    return rc


def test_pubsub_subscription_equals_one_batch_run(batch_run):
    """The same rows as messages of a (fake) subscription (:func:`pubsub_run`) give the batch run's predictions;
    a message that is not JSON and a row later than the allowed lateness are dead letters; all are acked."""
    r = _ran("pubsub")
    fake = json.loads((r["folder"] / "subscription.json").read_text())
    got = _result(r["folder"] / "out")
    _assert_same(got, batch_run)
    extra = [d for d in got["dead"] if d not in batch_run["dead"]]
    assert sorted((d[:3] for d in extra), key=repr) == [("invalid", None, None)] + [("late", "u3", 77)] * len(
        TOO_LATE["text"])
    assert [d[3] for d in extra if d[0] == "invalid"] == [
        f"message {fake['published'][-2]}: expected a JSON object, got invalid JSON (Expecting property name "
        "enclosed in double quotes)"]
    assert sorted(fake["acked"]) == sorted(fake["published"]) and not fake["left"]


def _event_rows(items) -> list[tuple]:
    return sorted(t for b in items for t in zip(*(b.column(c).to_pylist() for c in ("key", "ts", "seq", "sub", "x")),
                                                strict=True))


def _expected(rows: list[dict]) -> list[tuple]:
    table, _ = parse_events("".join(json.dumps(r) + "\n" for r in rows).encode(), "x.jsonl")
    return _event_rows(table.to_batches())


_SUBSCRIPTIONS: dict[str, FakeSubscription] = {}
_GOT: dict[str, list] = {}  # what the in-process FnApiRunner's steps saw


def _got(x, what: str) -> None:  # a module function: pickled by name, so the runner's copy appends here
    _GOT.setdefault(what, []).append(x)


def _fake_subscriber() -> FakeSubscription:  # picklable: the SDF carries its factory
    return _SUBSCRIPTIONS["sdf"]


@pytest.mark.parametrize("kind", ["files", "pubsub"])
def test_splittable_dofn_source(tmp_path, kind):
    """The driver of runners other than the DirectRunner (PollSource, a splittable DoFn with a manual watermark):
    files appearing between rounds are each read once, a subscription's messages are acked in the bundle
    finalizer, bad rows are dead letters, and the source ends after stop_after."""
    b1, b2, _ = batches()
    if kind == "files":
        _write(tmp_path / "01.jsonl", b1[0])
        src = LiveSource(str(tmp_path / "*.jsonl"), interval=0.1, stop_after=2.0)
        rows = b1[0] + b2[0]
    else:
        _SUBSCRIPTIONS["sdf"] = fake = FakeSubscription([*_messages([b1[0], b2[0]]), [b"[1, 2]"]])
        src = LiveSource("projects/p/subscriptions/s", interval=0.1, stop_after=2.0, subscriber=_fake_subscriber)
        rows = b1[0] + b2[0]
    with live.LiveRun(src) as run:
        if kind == "files":
            def drop() -> None:
                _wait(lambda: run.progress.files >= 1, 30, "the first round")
                _write(tmp_path / "02.jsonl", b2[0])

            threading.Thread(target=drop, daemon=True).start()
        _GOT.clear()
        with beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"])) as p:
            items, dead = p | ReadLive(src, EventParser(), driver="sdf")
            items | "Items" >> beam.Map(_got, "items")
            dead | "Dead" >> beam.Map(_got, "dead")
        assert _event_rows(_GOT["items"]) == _expected(rows)
        reasons = [d.reason.split(":")[0] for d in _GOT.get("dead", [])]
        assert reasons == ([] if kind == "files" else [f"message {1000 + len(rows)}"])
        assert run.progress.ended
    if kind == "pubsub":
        assert sorted(fake.acked) == sorted(fake.published) and len(fake.published) == len(rows) + 1


def test_poll_tracker_checkpoints():
    """A round claims the state after it; a checkpoint makes that state the residual, the round the primary."""
    t = live._PollsTracker(live._Polls(3, '{"a": 1}', False))
    assert t.try_split(0.5) is None  # no dynamic splits of a round
    assert t.try_claim(('{"a": 2}', False)) and not t.try_claim(('{"a": 3}', False))
    primary, residual = t.try_split(0)
    assert primary == live._Polls(3, '{"a": 1}', True) and residual == live._Polls(4, '{"a": 2}', False)
    assert t.check_done() and not t.try_claim(("x", False))
    last = live._PollsTracker(live._Polls(5, "", False))
    assert last.try_claim(("s", True)) and last.try_split(0) is None and last.check_done()
    early = live._PollsTracker(live._Polls(1, "s", False))  # a checkpoint before any claim: everything remains
    assert early.try_split(0) == (live._Polls(1, "s", True), live._Polls(1, "s", False))
    assert not early.try_claim(("t", False)) and early.check_done()
    coder = live._PollsCoder()
    assert coder.decode(coder.encode(residual)) == residual


def test_watermark_rule():
    """The newest row time taken, capped at the wall clock, whole milliseconds, never back."""
    c = EventClock()
    assert c.advance([], now=1e9) is None
    assert c.advance([100.0004, 50.0, math.nan], now=1e9) == 100_000_000
    assert c.advance([80.0], now=1e9) == 100_000_000  # an older round: the watermark stays
    assert c.advance([3e9], now=2e9) == 2e15  # a row from the future: capped at now
    assert c.advance([], now=2.5e9) == 2.5e15 and c.newest == 3e9  # and follows the clock up to it
    assert EventClock.from_json(c.to_json()) == c


# -- messages: one rule for Pub/Sub and Kafka rows ---------------------------------------------------------------
def test_message_rows_fallbacks_and_dead_letters():
    msgs = [Message(json.dumps({"key": "a", "text": "hi"}).encode(), 7, 1234.5, "ack7", "7"),  # no ts, no seq
            Message(json.dumps({"key": "a", "ts": 10.0, "seq": None, "token": 3}).encode(), 8, 99.0, None, "8"),
            Message(b"\xff{}", 9, 1.0, None, "9"),
            Message(b"[1]", 10, 1.0, None, "10"),
            Message(json.dumps({"ts": 5.0, "text": "x"}).encode(), 11, 1.0, None, "11"),  # no key
            Message(json.dumps({"key": "b", "ts": 5.0}).encode(), 12, 1.0, None, "12")]  # no payload
    p = EventParser().messages(msgs, "projects/p/subscriptions/s")
    assert _event_rows([b for b, _ in p.items]) == [("a", 10.0, 8, 0, 3), ("a", 1234.5, 7, 0, 104),
                                                     ("a", 1234.5, 7, 1, 105)]
    assert p.newest == 1234.5
    assert [d.reason for d in p.dead] == [
        "message 9: expected UTF-8 text, got the byte 0xff at byte offset 0, which is not UTF-8",
        "message 10: expected a JSON object, got list",
        "key: expected a non-empty string, got None",
        "text/token: expected a UTF-8 string in text or an int in token, got neither"]
    assert json.loads(p.dead[0].event) == {"message": "9", "raw": "\\xff{}"}
    assert json.loads(p.dead[3].event)["seq"] == 12  # the row as it was used: its seq from the message


def test_kafka_record_parsing():
    """ReadFromKafka(with_metadata=True) records -> events and dead letters, through ParseRecords (a bundle at
    a time, at its earliest record time): seq defaults to partition * 2**40 + offset, ts to the record's
    create time (ms)."""
    recs = [beam.Row(topic="t", partition=1, offset=5, timestamp=1_700_000_000_000, key=b"",
                     value=json.dumps({"key": "k", "text": "ab"}).encode(), headers=[]),
            beam.Row(topic="t", partition=0, offset=6, timestamp=1_700_000_001_000, key=b"",
                     value=json.dumps({"key": "k", "ts": 12.0, "seq": 3, "token": 65}).encode(), headers=[]),
            beam.Row(topic="t", partition=0, offset=7, timestamp=1_700_000_002_000, key=b"", value=b"nope",
                     headers=[])]
    assert [m.seq for m in live.kafka_messages(recs)] == [live.KAFKA_PARTITION + 5, 6, 7]
    fn = ParseRecords(EventParser(), "kafka://b:9092/t")  # the DoFn's own calls, as a runner makes them
    fn.setup()
    fn.start_bundle()
    for r in recs:
        fn.process(r, Timestamp.of(r.timestamp / 1000))
    out = list(fn.finish_bundle())
    items = [w.value for w in out if not isinstance(w, beam.pvalue.TaggedOutput)]
    dead = [w.value.value for w in out if isinstance(w, beam.pvalue.TaggedOutput)]
    assert {w.timestamp for w in out if not isinstance(w, beam.pvalue.TaggedOutput)} == {Timestamp.of(1_700_000_000)}
    assert _event_rows(items) == [("k", 12.0, 3, 0, 65), ("k", 1_700_000_000.0, live.KAFKA_PARTITION + 5, 0, 97),
                                  ("k", 1_700_000_000.0, live.KAFKA_PARTITION + 5, 1, 98)]
    assert [d.reason for d in dead] == ["message t/0@7: expected a JSON object, got invalid JSON (Expecting value)"]


def test_kafka_read_is_beams_cross_language_read():
    """Built (not expanded: that needs Java): ReadFromKafka with metadata, create-time watermark, offsets
    committed on finalize, max_read_time from --watch-stop-after, the given expansion service."""
    from apache_beam.coders import RowCoder
    from apache_beam.io.kafka import ReadFromKafka
    from apache_beam.portability.api import external_transforms_pb2

    src = LiveSource("kafka://b1:9092,b2:9092/events", stop_after=90.5, expansion_service="localhost:8097",
                     kafka_config=(("group.id", "mine"), ("security.protocol", "SASL_SSL")))
    t = live.kafka_read(src)
    assert isinstance(t, ReadFromKafka) and t._urn == ReadFromKafka.URN_WITH_METADATA
    payload = external_transforms_pb2.ExternalConfigurationPayload.FromString(t._payload)
    cfg = RowCoder(payload.schema).decode(payload.payload)
    assert cfg.consumer_config == {"bootstrap.servers": "b1:9092,b2:9092", "group.id": "mine",
                                   "auto.offset.reset": "earliest", "security.protocol": "SASL_SSL"}
    assert (cfg.topics, cfg.timestamp_policy, cfg.commit_offset_in_finalize, cfg.max_read_time) == (
        ["events"], "CreateTime", True, 91)
    assert t._expansion_service == "localhost:8097"


# -- the jobs' flags --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv,why", [
    (["--watch"], "--watch: expected --input GLOB (the folder or bucket to watch), got no --input"),
    (["--input", "projects/p/subscriptions/s", "--watch"], "--watch: expected --input GLOB of files, got "),
    (["--input", "IN/*.jsonl", "--watch", "--replay"], "--watch: expected either --watch"),
    (["--input", "IN/*.jsonl", "--watch-interval", "5s"], "--watch-interval: expected --watch (or a Pub/Sub"),
    (["--input", "IN/*.jsonl", "--watch", "--watch-interval", "0"], "--watch-interval: expected a duration > 0"),
    (["--input", "IN/*.jsonl", "--watch", "--watch-stop-after", "soon"], "--watch-stop-after: expected a duration"),
    (["--input", "IN/nope/*.jsonl", "--watch"], "--input: expected a folder to watch, got "),
    (["--input", "projects/p/subscriptions/s"], "--input projects/p/subscriptions/s: expected Beam's gcp extra for "
                                                "Pub/Sub, got no google-cloud-pubsub here: pip install"),
    (["--input", "projects/p/subscriptions/s", "--replay"], "--replay: expected files to replay, got "),
    (["--input", "kafka://b:9092/t"], "--input kafka://b:9092/t: expected a portable runner"),
    (["--input", "kafka://b:9092/t", "--runner", "PortableRunner"], "expected Java 11+ on PATH"),
    (["--input", "kafka://b:9092", "--runner", "PortableRunner"], "--input: expected kafka://BROKER"),
    (["--input", "kafka://b:9092/t", "--watch-interval", "1s", "--runner", "PortableRunner"],
     "--watch-interval: expected a watched folder or a Pub/Sub subscription"),
    (["--input", "IN/*.jsonl", "--expansion-service", "h:1"], "--expansion-service: expected --input kafka://"),
    (["--input", "gs://b/x/*.jsonl", "--watch"], "--input: expected a path on a filesystem Beam can open here, got "
                                                 "'gs://b/x/*.jsonl' (gs:// needs Beam's gcp extra"),
])
def test_flag_mistakes_are_one_line(tmp_path, capsys, monkeypatch, argv, why):
    monkeypatch.setattr(live.shutil, "which", lambda name: None)
    monkeypatch.setattr(live, "_pubsub_installed", lambda: False)
    (tmp_path / "IN").mkdir()
    argv = [a.replace("IN/", f"{tmp_path}/IN/") for a in argv]
    assert next_token.main([*argv, "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("next_token: ") and why in err, err
    assert not (tmp_path / "out").exists()


def test_a_glob_that_cannot_be_listed_is_one_line(tmp_path, capsys, monkeypatch):
    def refuse(patterns):
        raise live.BeamIOError("List operation failed", {patterns[0]: ValueError("Must provide one of client")})

    monkeypatch.setattr(live.FileSystems, "match", refuse)
    assert next_token.main(["--input", str(tmp_path / "*.jsonl"), "--watch", "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"next_token: --input: expected a glob Beam can list, got '{tmp_path}/*.jsonl' (List "
                          "operation failed with exceptions") and err.count("\n") == 1


def test_durations_and_inputs():
    assert [live.duration(s) for s in ("10s", "250ms", "5m", "1.5h", "2d", "7", "1e1s")] == [
        10.0, 0.25, 300.0, 5400.0, 172800.0, 7.0, 10.0]
    assert [live.input_kind(s) for s in ("projects/p/subscriptions/s", "kafka://b/t", "gs://b/x/*.jsonl",
                                         "projects/p/topics/t")] == ["pubsub", "kafka", "files", "files"]
    assert live.kafka_address("kafka://a:1,b:2/topic") == ("a:1,b:2", "topic")


# -- the market job: a watched folder of bar files -----------------------------------------------------------------
def market_runs(argv: list[str]) -> int:
    """In the job process: bars (CSV, two batches, a bar repeated across them and a broken bar) in one batch run
    (``b``) and dropped into a watched folder (``l``), the second once the job took the first; ``[folder]``."""
    from beam_jobs import market_forecast

    folder = Path(argv[0])
    first, second = _market_files()
    batch_in, src = folder / "batch", folder / "in"
    batch_in.mkdir(parents=True)
    src.mkdir()
    (batch_in / "1.csv").write_text(first)
    (batch_in / "2.csv").write_text(second)
    (src / "1.csv").write_text(first)
    model = str(Path(__file__).resolve().parent.parent / "exported" / "market.onnx")
    common = ["--model", model, "--quiet", "--metrics-port", "0", "--shards", "1", "--window", str(35 * 86400)]
    if market_forecast.main(["--input", str(batch_in), "--output", str(folder / "b"), *common]) != 0:
        return 1

    def drop() -> None:
        _wait(lambda: any(p.files >= 1 for p in list(live._PROGRESS.values())), 60, "the first file taken")
        _write(src / "2.csv", [])  # (a name in the glob first: an empty file is left for a later round)
        (src / "2.csv").write_text(second)

    threading.Thread(target=drop, daemon=True).start()
    return market_forecast.main(["--input", str(src), "--watch", "--watch-interval", "200ms",
                                 "--watch-stop-after", "3s", "--output", str(folder / "l"), *common])


def _market_files() -> tuple[str, str]:
    """Two symbols' daily bars as two CSV files, the second with the first's last bar again and a broken bar."""
    from streamrnn.forecast.synthetic import simulate

    sims = simulate(["AAA", "BBB"], start="2016-01-01", end="2016-02-20", seed=3)
    lines = sorted((float(b.ts[i]), b.symbol, i, b) for b in sims for i in range(len(b)))
    cut = len(lines) // 2

    def csv_of(part) -> str:
        rows = [",".join([str(datetime.fromtimestamp(t, UTC).date()),
                          *(repr(float(getattr(b, c)[i])) for c in ("open", "high", "low", "close", "volume")), s])
                for t, s, i, b in part]
        return "date,open,high,low,close,volume,Name\n" + "\n".join(rows) + "\n"

    return csv_of(lines[:cut]), csv_of(lines[cut - 1:]) + "2016-02-19,10.0,9.0,11.0,10.0,1000,AAA\n"


def test_market_watched_folder_equals_one_batch_run():
    """Bars dropped into a watched folder (:func:`market_runs`) give the batch run's forecasts; a JSON bar message
    takes the market's columns and its message's time."""
    from streamrnn.forecast.beam import BarParser

    folder = _ran("market")["folder"]
    key = ("symbol", "ts")

    def rows(out: str) -> dict:
        return {tuple(r[k] for k in key): r for r in _table(folder / out, "forecasts")}

    b, got = rows("b"), rows("l")
    first, second = _market_files()
    bars = first.count("\n") + second.count("\n") - 4  # less 2 headers, a repeated bar and a broken one
    assert b.keys() == got.keys() and len(b) == bars
    for k, r in b.items():
        for c, v in r.items():
            if isinstance(v, float) and not math.isnan(v):
                assert abs(got[k][c] - v) <= 1e-6, (k, c)
            elif not isinstance(v, float):
                assert got[k][c] == v, (k, c)
    dead = {out: sorted((d["kind"], d["reason"].split(":")[0]) for d in _table(folder / out, "dead_letters"))
            for out in ("b", "l")}
    assert dead["b"] == dead["l"] and [k for k, _ in dead["l"]] == ["duplicate", "invalid"]
    # a message's bar: the same columns, its time from the message, no symbol a dead letter
    p = BarParser({}).messages([Message(json.dumps({"Name": "AAA", "open": 1.0, "high": 2.0, "low": 0.5, "close": 1.5,
                                                    "volume": 10}).encode(), 5, 1_700_000_000.0, None, "5"),
                                Message(b'{"close": 1.0}', 6, 1.0, None, "6")], "projects/p/subscriptions/s")
    assert [(bar["symbol"], bar["ts"], bar["close"]) for bar, _ in p.items] == [("AAA", 1_700_000_000.0, 1.5)]
    assert [d.reason for d in p.dead] == ["projects/p/subscriptions/s message 6: symbol: expected one of "
                                          "['symbol', 'name', 'ticker'] (or --columns symbol=NAME), got none"]


def test_watermark_steps_and_source_errors():
    """The DirectRunner's watermark advances at most a step at a time; a subscription that cannot be pulled
    is the job's one-line error when the pipeline ends."""
    assert live.watermark_steps(None, 10_000_000, 1.0, None) == [10_000_000]
    assert live.watermark_steps(None, 10_000_000, 1.0, 4.0) == [1_000_000, 5_000_000, 9_000_000, 10_000_000]
    assert live.watermark_steps(9_000_000, 10_000_000, None, 4.0) == [10_000_000]
    assert live.watermark_steps(10_000_000, 10_000_000, None, 4.0) == []
    assert len(live.watermark_steps(0, 10**15, None, 1.0)) == 10_000  # at most 10,000 steps

    class NotFound(Exception):
        pass

    class Gone:
        def pull(self, request, timeout=None):
            raise NotFound("404 Resource not found (resource=s).")

    with pytest.raises(live.InputError, match=r"expected a Pub/Sub subscription this job can pull, got "
                                              r"'projects/p/subscriptions/s' \(NotFound: 404"):
        live.SubscriptionPoller("projects/p/subscriptions/s", Gone()).poll()
    src = LiveSource("projects/p/subscriptions/s")
    run = live.LiveRun(src)
    run.progress.error = live.InputError("--input: expected a Pub/Sub subscription this job can pull, got ...")
    from streamrnn.beam.job.launcher import JobError

    with pytest.raises(JobError, match="^--input: expected a Pub/Sub subscription"), run:
        pass
    assert src.token not in live._PROGRESS
