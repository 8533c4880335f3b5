"""State snapshots of a stopped job, and seeding a new pipeline from one, with any ``num_shards``.

``StatefulInference(save_state=PATH)``: when the input ends (a bounded input, or a
streaming drain), every shard writes its store as Arrow IPC files, one folder per shard:
``PATH/shard-00003/{state,meta,ids,held}.arrow`` (the key state rows, stream metadata,
applied ids within the dedupe horizon, held-back output rows), and the job writes
``PATH/manifest.json`` last: the model's name, version, weights fingerprint and state
signature, the source ``num_shards``, the transform's event-time settings, and each shard's
files, row counts and event-time marks. A snapshot without its manifest is incomplete.

``StatefulInference(initial_state=PATH)`` checks the manifest at construction (another model
or state signature is refused in one line) and each shard of the new pipeline, on its first
flush, takes the keys that are now its own (``crc32(key) % num_shards``) from every file.
Run A on the first part of a stream, then B on the rest from A's snapshot, and B's outputs
are those of one run over the whole stream, whatever the two shard counts.

Any Beam filesystem works (``gs://``, ``s3://``, local). No pickle anywhere.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms import trigger
from apache_beam.transforms.window import GlobalWindows, TimestampedValue

from ...errors import InputError
from ...keyed import snapshot
from ...model.spec import ModelSpec
from ..records import KEY, shard_of
from .clock import EARLIEST
from .store import PARTS, pack_full, unpack

FORMAT = "streamrnn-state-snapshot/1"
MANIFEST = "manifest.json"


def _join(*parts: str) -> str:
    return FileSystems.join(*parts)


def _shard_dir(root: str, shard: int) -> str:
    return _join(root, f"shard-{shard:05d}")


def _write(path: str, data: bytes) -> None:
    with FileSystems.create(path) as f:
        f.write(data)


def _read(path: str) -> bytes:
    with FileSystems.open(path) as f:
        return f.read()


def _ipc_file(t: pa.Table) -> bytes:
    sink = io.BytesIO()
    with pa.ipc.new_file(sink, t.schema) as w:
        w.write_table(t)
    return sink.getvalue()


class _WriteShard(beam.DoFn):
    """(shard, full store blob) -> the shard's files; yields what the manifest lists of it."""

    def __init__(self, root: str):
        self.root = root

    def process(self, element) -> Iterator[dict]:
        shard, blob = element
        head, parts = unpack(blob)
        d = _shard_dir(self.root, shard)
        files, sums = {}, {}
        for name in PARTS:
            data = _ipc_file(parts[name])
            files[name] = f"shard-{shard:05d}/{name}.arrow"
            sums[name] = hashlib.sha256(data).hexdigest()
            _write(_join(d, f"{name}.arrow"), data)
        yield {"shard": shard, "files": files, "sha256": sums, "rows": {n: parts[n].num_rows for n in PARTS},
               "scalars": head.get("scalars", {}), "model": head["model"], "extra": head.get("extra", {})}


class _WriteManifest(beam.DoFn):
    def __init__(self, root: str, base: dict):
        self.root, self.base = root, base

    def process(self, shards: list[dict]) -> Iterator[str]:
        shards = sorted(shards, key=lambda s: s["shard"])
        manifest = {**self.base, "shards": shards,
                    "keys": sum(s["rows"]["state"] for s in shards)}
        _write(_join(self.root, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True).encode())
        yield _join(self.root, MANIFEST)


class WriteSnapshot(beam.PTransform):
    """(shard, full store blob) elements of one input's end -> the snapshot set (the manifest last)."""

    def __init__(self, root: str, spec: ModelSpec, settings: dict[str, Any]):
        super().__init__()
        self.root = root
        self.base = {"format": FORMAT, "model": spec.name, "version": spec.version,
                     "fingerprint": spec.fingerprint, "state": snapshot.signature(spec), **settings}

    def expand(self, blobs):
        return (blobs
                | "WriteShards" >> beam.ParDo(_WriteShard(self.root))
                # once, when the input has ended (a bounded input, or a streaming drain)
                | "AtEnd" >> beam.WindowInto(GlobalWindows(), trigger=trigger.AfterWatermark(),
                                             accumulation_mode=trigger.AccumulationMode.DISCARDING)
                | "AllShards" >> beam.combiners.ToList().without_defaults()
                | "WriteManifest" >> beam.ParDo(_WriteManifest(self.root, self.base)))


def _refuse(root: str, what: str) -> InputError:
    return InputError(f"initial_state: {root}: {what}")


def read_manifest(root: str, spec: ModelSpec, *, next_fields: tuple[str, ...] = ()) -> dict:
    """The snapshot's manifest, checked against the model and settings that will carry its state, and every
    file it lists against its checksum (one-line errors, before any pipeline runs)."""
    if not isinstance(root, str) or not root:
        raise InputError(f"initial_state: expected a snapshot folder, got {root!r}")
    path = _join(root, MANIFEST)
    try:
        m = json.loads(_read(path))
    except Exception as e:  # missing, unreadable or not JSON: say which, in one line
        raise InputError(f"initial_state: expected a state snapshot folder with {MANIFEST} (written by "
                         f"save_state when a job ended), got {root!r}: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise InputError(f"initial_state: {path}: expected format {FORMAT!r}, got "
                         f"{m.get('format') if isinstance(m, dict) else type(m).__name__!r}")
    if m.get("state") != snapshot.signature(spec):
        raise _refuse(root, f"expected state shapes {snapshot.signature(spec)} (model {spec.name} {spec.version}), "
                            f"got {m.get('state')} (model {m.get('model')} {m.get('version')}): a snapshot of "
                            "another model cannot seed this one")
    if m.get("fingerprint") != spec.fingerprint:
        raise _refuse(root, f"expected the weights of model {spec.name} {spec.version} (fingerprint "
                            f"{spec.fingerprint[:12]}), got {m.get('model')} {m.get('version')} (fingerprint "
                            f"{str(m.get('fingerprint'))[:12]}); seed with the model that wrote it, then update")
    shards = m.get("shards")
    if not isinstance(shards, list) or not all(isinstance(s, dict) and isinstance(s.get("files"), dict)
                                               and isinstance(s.get("sha256"), dict) for s in shards):
        raise _refuse(root, f"{MANIFEST}: expected a list of shards with their files and sha256, got "
                            f"{type(shards).__name__}")
    for s in shards:
        fp = s.get("extra", {}).get("fingerprint", spec.fingerprint)
        if fp != spec.fingerprint:  # a model update had switched this shard when the state was saved
            raise _refuse(root, f"shard {s.get('shard')}: expected state under model fingerprint "
                                f"{spec.fingerprint[:12]}, got {str(fp)[:12]} (a model update in effect when it was "
                                "saved); seed with that model")
        for name in PARTS:
            f = _join(root, str(s["files"].get(name)))
            try:
                digest = hashlib.sha256(_read(f)).hexdigest()
            except Exception as e:
                raise _refuse(root, f"expected {f}, got {type(e).__name__}: "
                                    f"{str(e).splitlines()[0] if str(e) else ''}") from None
            if digest != s["sha256"].get(name):
                raise _refuse(root, f"{f}: expected sha256 {str(s['sha256'].get(name))[:12]} (the manifest's), "
                                    f"got {digest[:12]}: the snapshot was changed or partly rewritten")
    want = list(m.get("next_fields", []))
    if want != list(next_fields):
        raise _refuse(root, f"next_fields: expected {want} (the run that saved it held rows for them), got "
                            f"{list(next_fields)}")
    return m


def seed_kicks(pipeline: beam.Pipeline, manifest: dict, num_shards: int, size: int, lateness: int):
    """One payload per shard of a seeded pipeline, released with the window of the snapshot's last applied event,
    so every shard flushes once and takes its keys (their TTL expiries and held rows go on from there)."""
    from .clock import release_micros, timestamp
    from .stateful import SEED

    ends = [s.get("extra", {}).get("applied_max", EARLIEST) for s in manifest["shards"]]
    at = int(release_micros(np.array([min(ends, default=EARLIEST)]), size=size, lateness=lateness)[0])
    payload = json.dumps({"at": at}).encode()
    return (pipeline | "SeedShards" >> beam.Create([(s, (SEED, payload)) for s in range(num_shards)])
            | "SeedTime" >> beam.Map(lambda e: TimestampedValue(e, timestamp(at))))


def seed_blob(root: str, manifest: dict, shard: int, num_shards: int, model_path: str) -> bytes:
    """A full store blob of the keys of ``shard`` (of ``num_shards``) from every file of the snapshot, under the
    new pipeline's ``model_path`` (the manifest's model was checked against it)."""
    parts: dict[str, list[pa.Table]] = {n: [] for n in PARTS}
    floor = swept = None
    for s in manifest["shards"]:
        for name in PARTS:
            t = pa.ipc.open_file(pa.py_buffer(_read(_join(root, s["files"][name])))).read_all()
            if t.num_rows:
                keys = t.column(KEY).to_pylist()
                mine = [shard_of(k.decode() if isinstance(k, bytes) else k, num_shards) == shard for k in keys]
                t = t.filter(pa.array(mine))
            parts[name].append(t)
        sc = s.get("scalars", {})
        floor = sc.get("ids_floor", EARLIEST) if floor is None else min(floor, sc.get("ids_floor", EARLIEST))
        swept = sc.get("swept", EARLIEST) if swept is None else min(swept, sc.get("swept", EARLIEST))
    tables = {}
    for name, ts in parts.items():
        rows = [t for t in ts if t.num_rows]
        meta = ts[0].schema.metadata if ts else None
        if rows:
            tables[name] = pa.concat_tables(rows, promote_options="permissive").replace_schema_metadata(meta)
        else:
            tables[name] = ts[0] if ts else pa.table({KEY: pa.array([], pa.string())})
    return pack_full(tables, model=model_path, scalars={"ids_floor": floor if floor is not None else EARLIEST,
                                                   "swept": swept if swept is not None else EARLIEST})
