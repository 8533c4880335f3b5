"""The market job's online calibration and multi-horizon live scoring, per symbol, in Beam state (issue 15).

Flow (after ``JobColumns``; ``beam_jobs/market_forecast.py`` composes it)::

  job rows (blocks, many symbols) -> ByShard -> (shard, rows) -> CalibrateShard (stateful, per shard of
                                  symbols) -> job rows + calibrated bands + scores

The Beam key is a shard of symbols (``shard_of(symbol, num_shards)``, the transform's sharding), so one
firing calibrates many symbols in a few vectorised calls; each symbol's state is its own rows in the shard's.

**What a row gets.** Bar ``t`` of a symbol carries the model's forecast for ``t + 1 .. t + H``. This step

* *scores* every target that bar ``t`` completes: the ``h``-bar forecast issued at bar ``t - h``, for
  ``h = 1..H``. The realised return is ``100 ln(C_t / C_{t-h})`` (% log, from the closes, float64). A target is
  scored only when the ``h`` bars in between were all applied (the rows' ``bar`` indices are consecutive) and
  none is a corporate-action jump (the features' rule, :func:`~.features.targets`). Columns
  ``scored_h{h}_*``: the origin's time, the realised return, the error (realised minus the origin's median),
  the NLL (nats) under the origin's Student-t, and per level whether it fell inside the raw and the
  calibrated interval, per tail whether it fell below the raw and the calibrated VaR;
* *calibrates*: the symbol's :class:`~.conformal.OnlineConformal` learns those targets (adaptive conformal
  inference, one step per bar; :mod:`.conformal`), then issues bar ``t``'s bands at its updated ``a``:
  ``h{h}_cal_lo{L}`` / ``h{h}_cal_hi{L}`` (prices) per level, and per tail ``p`` the value at risk and the
  expected shortfall ``h{h}_var{p}`` / ``h{h}_es{p}`` (positive losses, % log return) and the VaR as a price,
  ``h{h}_var{p}_price = close * exp(-VaR / 100)``.

The order per bar is the calibrator's (learn, then predict), so each bar's calibrated band has seen exactly
the targets completed by that bar: no look-ahead, and equal to an offline :meth:`OnlineConformal.run` over
the symbol's rows from its first one (tests/test_market_job_calibration.py checks this, bit for bit).

**State per symbol** (Beam ``ReadModifyWriteState`` per shard, Arrow IPC bytes, no pickle): the calibrator's
(:meth:`~.conformal.OnlineConformal.to_arrow`: ``a`` per horizon and target, the ring of the ``a`` issued at the
last ``H`` origins, the bar count; :func:`~.conformal.state_bytes`) and a ring of the last ``H`` rows (bar
index, time, close, jump flag, the ``H`` locations and scales). Nothing is kept in memory between firings:
each one rebuilds both from Beam state, so a rebuilt worker computes exactly what a warm one would.

**Order and timestamps.** Rows are buffered per shard and applied when the watermark passes their timestamp
(an event-time timer at the earliest pending one), in ``(symbol, bar)`` order; with a bounded input everything
buffered is applied at the first firing (one pass per shard, as ``BarFeatures`` does). Each firing emits its
rows as one block at the later of its own time and its rows' latest timestamp: never earlier than the timer
that emits it, nor than any row's upstream timestamp (streaming: a row is applied only once the watermark
passed its timestamp, so the block goes out at the firing's time). Rows released at the end of the input
(``END_OF_INPUT``) arrive when the watermark is already there; a timer set then never fired on the
DirectRunner, so a timer at ``END_OF_INPUT`` set from the shard's first row applies them. The upstream rows
come in ``bar`` order per symbol over time (``StatefulInference`` stamps a row when its next event is known),
so a row whose ``bar`` is not after the symbol's last applied one means that order broke: the step fails
loudly rather than calibrate out of order. The state and timer names carry a ``cal_`` prefix: with the same
names as ``BarFeatures`` (``flush``) in one fused stage, the DirectRunner fired this step's timer on state it
had never written.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.coders import BytesCoder, VarIntCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import BagStateSpec, ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.transforms.window import TimestampedValue

from ..beam.records import from_ipc, shard_of, to_ipc
from ..beam.step.clock import END_OF_INPUT_MICROS, timestamp
from ..beam.step.counters import NAMESPACE, Counters
from ..beam.step.intake import REL
from ..errors import DeployError, SnapshotError
from ..metrics.catalogue import guarded
from .conformal import GAMMA, LEVELS, METHOD, TAILS, OnlineConformal, bands, label, misses, pit
from .distribution import nll
from .pooled import MarketScale

#: the calibrator state table's metadata key of the pooled scale term's state (:mod:`.pooled`)
POOL_META = b"streamrnn.pool"

#: score sums per horizon, in this order, then per level raw and calibrated hits, per tail raw and calibrated
#: breaches (:func:`score_sums`)
SUM_FIELDS = ("scored", "nll", "abs_error")


def calibrated_fields(horizons: int, levels: Sequence[float] = LEVELS, tails: Sequence[float] = TAILS
                      ) -> list[pa.Field]:
    """The calibrated band columns (module doc), per horizon."""
    out = []
    for h in range(1, horizons + 1):
        for lv in levels:
            out += [pa.field(f"h{h}_cal_{side}{label(lv)}", pa.float64()) for side in ("lo", "hi")]
        for p in tails:
            out += [pa.field(f"h{h}_var{label(p)}", pa.float64()), pa.field(f"h{h}_es{label(p)}", pa.float64()),
                    pa.field(f"h{h}_var{label(p)}_price", pa.float64())]
    return out


def scored_fields(horizons: int, levels: Sequence[float] = LEVELS, tails: Sequence[float] = TAILS
                  ) -> list[pa.Field]:
    """The live score columns (module doc), per horizon: null where this bar completes no target of ``h``."""
    out = []
    for h in range(1, horizons + 1):
        s = f"scored_h{h}_"
        out += [pa.field(s + n, pa.float64()) for n in ("origin_ts", "ret", "error", "nll")]
        for lv in levels:
            out += [pa.field(f"{s}in{label(lv)}", pa.bool_()), pa.field(f"{s}cal_in{label(lv)}", pa.bool_())]
        for p in tails:
            out += [pa.field(f"{s}var{label(p)}_breach", pa.bool_()),
                    pa.field(f"{s}cal_var{label(p)}_breach", pa.bool_())]
    return out


def ring_schema(horizons: int) -> pa.Schema:
    """The ring of each symbol's last ``H`` rows (module doc, State); ``pool``: the pooled scale multiplier each
    row's forecast was issued with (:mod:`.pooled`; 1 with ``pool`` off, and for a ring written before it)."""
    return pa.schema([("symbol", pa.string()), ("bar", pa.int64()), ("ts", pa.float64()), ("close", pa.float64()),
                      ("jump", pa.bool_()), ("loc", pa.list_(pa.float64(), horizons)),
                      ("scale", pa.list_(pa.float64(), horizons)), ("pool", pa.list_(pa.float64(), horizons))])


def _np(t: pa.Table, name: str) -> np.ndarray:
    return t.column(name).to_numpy()


def _fixed(t: pa.Table, name: str, width: int) -> np.ndarray:
    col = t.column(name).combine_chunks()
    return col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), width).astype(np.float64)


class Calibrator:
    """The calibration and scoring of a chunk of rows of many symbols, from their state (Arrow tables) to their
    new state: pure, no Beam. ``df``: the model's Student-t degrees of freedom per horizon."""

    def __init__(self, df: Sequence[float], *, levels: Sequence[float] = LEVELS, tails: Sequence[float] = TAILS,
                 gamma: float = GAMMA, scaling: str = "proportional", method: str = METHOD, pool: float = 0.0):
        self.df = np.asarray(df, np.float64)
        self.levels, self.tails, self.gamma, self.scaling = tuple(levels), tuple(tails), float(gamma), scaling
        self.method = method
        self.config = self._calibrator().config  # checks them (InputError, one line)
        self.pool = MarketScale(pool, self.df).weight  # checks it (InputError, one line)
        self.H = int(self.config.horizons)
        self.ring = ring_schema(self.H)
        #: rows the last :meth:`apply` took after their release time's step was applied (:mod:`.pooled`)
        self.late_rows = 0

    def _calibrator(self) -> OnlineConformal:
        return OnlineConformal(self.df, levels=self.levels, tails=self.tails, gamma=self.gamma, scaling=self.scaling,
                               method=self.method)

    def fields(self) -> list[pa.Field]:
        """The columns :meth:`apply` appends."""
        return calibrated_fields(self.H, self.levels, self.tails) + scored_fields(self.H, self.levels, self.tails)

    def apply(self, aci: pa.Table | None, ring: pa.Table | None, rows: pa.Table) -> tuple[pa.Table, pa.Table, pa.Table]:
        """Rows (job columns, any symbols, each symbol's after its state's last bar) -> (the rows sorted by
        ``(symbol, bar)`` with :meth:`fields` appended, the calibrators' new state, the new ring). With ``pool``,
        the rows' release times are their ``_rel`` column (the bar time without one) and the pooled term's state
        rides in the calibrator state's schema metadata."""
        H, cfg = self.H, self.config
        K, L = len(cfg.nominal), len(self.levels)
        cal = self._calibrator()
        market = MarketScale(self.pool, self.df)
        if aci is not None and self.pool:
            try:
                market.restore((aci.schema.metadata or {}).get(POOL_META))
            except SnapshotError as e:
                raise DeployError(f"calibration state: {e}") from None
        if aci is not None:
            try:
                cal.restore(aci)
            except SnapshotError as e:  # a deploy mismatch: the launcher's one line, exit 2
                raise DeployError(f"calibration state: {e}: the state this job carries was written with other "
                                    "--levels, --var or --calibration (or a model of other horizons); run with the "
                                    "settings that wrote it, or start without it") from None
        rows = rows.sort_by([("symbol", "ascending"), ("bar", "ascending")])
        ring = self.ring.empty_table() if ring is None else ring
        n = rows.num_rows
        touched = pc.is_in(ring.column("symbol"), value_set=pc.unique(rows.column("symbol")))
        old, keep = ring.filter(touched), ring.filter(pc.invert(touched))
        m = old.num_rows

        # each touched symbol's ring rows, then its new rows, in bar order
        sym = np.concatenate([_np(old, "symbol").astype(object), _np(rows, "symbol").astype(object)])
        names, g = np.unique(sym, return_inverse=True)
        bar = np.concatenate([_np(old, "bar"), _np(rows, "bar")]).astype(np.int64)
        order = np.lexsort((bar, g))
        g, bar = g[order], bar[order]
        same = g[1:] == g[:-1]
        is_new = (np.arange(m + n) >= m)[order]
        # each new row after its symbol's ring (its last applied bars) and its previous new row
        after = np.full(len(names), np.iinfo(np.int64).min)
        np.maximum.at(after, g[~is_new], bar[~is_new])
        nw = np.flatnonzero(is_new)
        prev = after[g[nw]]
        inner = (nw > 0) & same[np.maximum(nw - 1, 0)] & is_new[np.maximum(nw - 1, 0)]
        prev[inner] = np.maximum(prev[inner], bar[nw[inner] - 1])
        if (bar[nw] <= prev).any():
            k = int(np.flatnonzero(bar[nw] <= prev)[0])
            raise RuntimeError(f"calibration of {names[g[nw[k]]]!r}: bar {int(bar[nw[k]])} after bar {int(prev[k])}: "
                               "rows out of bar order (the upstream step emits each symbol's rows in bar order)")
        close = np.concatenate([_np(old, "close"), _np(rows, "close")])[order]
        ts = np.concatenate([_np(old, "ts"), _np(rows, "ts")])[order]
        jump = np.concatenate([_np(old, "jump").astype(bool), pc.match_substring(rows.column("flags"), "jump")
                               .to_numpy(zero_copy_only=False)])[order]
        loc_new = np.stack([_np(rows, f"h{h}_ret_loc") for h in range(1, H + 1)], 1).reshape(n, H).astype(np.float64)
        scale_new = np.stack([_np(rows, f"h{h}_ret_scale") for h in range(1, H + 1)], 1).reshape(n, H).astype(
            np.float64)
        loc = np.concatenate([_fixed(old, "loc", H), loc_new])[order]
        scale = np.concatenate([_fixed(old, "scale", H), scale_new])[order]
        old_pool = _fixed(old, "pool", H) if "pool" in old.column_names else np.ones((m, H))
        # a forecast the model gave as NaN, inf or a scale <= 0 is no distribution: it gets no bands and
        # issues no target (its row flows on, its band and score columns null)
        with np.errstate(invalid="ignore"):
            usable = np.isfinite(loc) & np.isfinite(scale) & (scale > 0)
        first = np.searchsorted(g, g)  # each row's group start
        rank = np.arange(m + n) - first  # its index within its symbol's rows here
        pos = np.flatnonzero(is_new)  # the new rows, in (symbol, bar) order: rows' order

        # the targets each new row completes: origin i - h for horizon h
        i = pos[:, None]
        hh = np.arange(1, H + 1)[None, :]
        o = np.maximum(i - hh, 0)
        cj = np.cumsum(jump)
        valid = (rank[i] - hh >= 0) & (bar[i] - bar[o] == hh) & (cj[i] - cj[o] == 0) & usable[o, hh - 1]
        with np.errstate(divide="ignore", invalid="ignore"):
            y = np.where(valid, 100.0 * np.log(close[i] / close[o]), 0.0)
        loc_o = np.where(valid, loc[o, hh - 1], 0.0)
        scale_o = np.where(valid, scale[o, hh - 1], 1.0)
        # the pooled scale term (off: every multiplier 1): the targets' raw surprises, step by step; each row's
        # forecast is then issued (and later scored by the calibrator) at its scale times its step's multiplier
        f_new, self.late_rows = np.ones((n, H)), 0
        if self.pool:
            rel = (_np(rows, REL).astype(np.int64) if REL in rows.column_names  # without it: the bar time
                   else np.round(_np(rows, "ts") * 1e6).astype(np.int64))
            f_new, self.late_rows = market.advance(rel, _np(rows, "ts"), np.abs(y - loc_o) / scale_o, valid)
        pool = np.concatenate([old_pool, f_new])[order]
        scale_eff = scale * pool if self.pool else scale
        scale_o_eff = np.where(valid, scale_eff[o, hh - 1], 1.0) if self.pool else scale_o

        # the a issued at each row: the ring's from the calibrator's ring of issued a (slot: bar count mod H);
        # each new row's after learning its targets (the calibrator's order: learn, then issue)
        issued = np.zeros((m + n, H, K))
        at = {k: r for r, k in enumerate(cal.keys())}
        seq, ring_a = cal.seq, cal.issued
        count = np.bincount(g[~is_new], minlength=len(names))
        for k, name in enumerate(names.tolist()):
            seq0 = int(seq[at[name]]) if name in at else 0
            if count[k] != min(seq0, H):
                raise RuntimeError(f"calibration state of {name!r}: a ring of {count[k]} rows for {seq0} bars learned")
        old_pos = np.flatnonzero(~is_new)
        if len(old_pos):
            r = np.array([at[nm] for nm in names[g[old_pos]].tolist()], np.int64)
            slot = (seq[r] - count[g[old_pos]] + rank[old_pos]) % H
            issued[old_pos] = ring_a[r, slot]
        fresh = np.array([nm not in at for nm in names[g[pos]].tolist()], bool)
        local = rank[pos] - count[g[pos]]  # the new row's index among its symbol's new rows
        if fresh.any():  # new symbols: each whole chunk at once (run == learn per bar, bit for bit)
            fk, fidx = np.unique(g[pos][fresh], return_inverse=True)
            lens = np.bincount(fidx)
            shape = (len(fk), int(lens.max()), H)
            yo, lo, so, vo = np.zeros(shape), np.zeros(shape), np.ones(shape), np.zeros(shape, bool)
            rr, cc = np.nonzero(valid[fresh])
            s_, t_ = fidx[rr], local[fresh][rr] - (cc + 1)  # the origin: a new row of the same symbol
            yo[s_, t_, cc], vo[s_, t_, cc] = y[fresh][rr, cc], True
            lo[s_, t_, cc], so[s_, t_, cc] = loc_o[fresh][rr, cc], scale_o_eff[fresh][rr, cc]
            got = cal.run(names[fk].tolist(), yo, lo, so, vo, lens)
            issued[pos[fresh]] = got[fidx, local[fresh]]
        if (~fresh).any():  # symbols with state: one learn per step, all of them at once
            for step in range(int(local[~fresh].max()) + 1):
                sel = np.flatnonzero(~fresh & (local == step))
                keys = names[g[pos[sel]]].tolist()
                cal.learn(keys, y[sel], loc_o[sel], scale_o_eff[sel], valid[sel])
                at = {k: r for r, k in enumerate(cal.keys())}
                issued[pos[sel]] = cal.alpha[[at[k] for k in keys]]

        # scores of the completed targets: raw (the nominal a) and calibrated (the a issued at the origin)
        p2, lower = pit(y, loc_o, scale_o, self.df)
        p2e, lowere = pit(y, loc_o, scale_o_eff, self.df) if self.pool else (p2, lower)
        a_origin = issued[o, hh - 1]
        cal_miss = misses(p2e, lowere, a_origin, cfg.two_sided) & valid[..., None]
        raw_miss = misses(p2, lower, np.broadcast_to(cfg.nominal, a_origin.shape), cfg.two_sided) & valid[..., None]
        err = y - loc_o
        with np.errstate(invalid="ignore", divide="ignore"):
            loss = nll(y, loc_o, scale_o, np.broadcast_to(self.df, y.shape))

        # this bar's calibrated bands (null where its forecast is unusable)
        c_new = close[pos]
        ok = usable[pos]
        b = bands(issued[pos], np.where(ok, loc[pos], 0.0), np.where(ok, scale_eff[pos], 1.0), self.df, cfg)
        out = rows
        for h in range(H):
            null = ~ok[:, h]

            def col(v, null=null):
                return pa.array(v, pa.float64(), mask=null)
            for lv in self.levels:
                for side in ("lo", "hi"):
                    q = b[f"{side}{label(lv)}"][:, h]
                    out = out.append_column(f"h{h + 1}_cal_{side}{label(lv)}", col(c_new * np.exp(q / 100.0)))
            for p in self.tails:
                var = b[f"var{label(p)}"][:, h]
                out = out.append_column(f"h{h + 1}_var{label(p)}", col(var))
                out = out.append_column(f"h{h + 1}_es{label(p)}", col(b[f"es{label(p)}"][:, h]))
                out = out.append_column(f"h{h + 1}_var{label(p)}_price", col(c_new * np.exp(-var / 100.0)))
        for h in range(H):
            s, mask = f"scored_h{h + 1}_", ~valid[:, h]
            for name, v in (("origin_ts", ts[o[:, h]]), ("ret", y[:, h]), ("error", err[:, h]), ("nll", loss[:, h])):
                out = out.append_column(s + name, pa.array(v, pa.float64(), mask=mask))
            for k, lv in enumerate(self.levels):
                out = out.append_column(f"{s}in{label(lv)}", pa.array(~raw_miss[:, h, k], mask=mask))
                out = out.append_column(f"{s}cal_in{label(lv)}", pa.array(~cal_miss[:, h, k], mask=mask))
            for j, p in enumerate(self.tails):
                out = out.append_column(f"{s}var{label(p)}_breach", pa.array(raw_miss[:, h, L + j], mask=mask))
                out = out.append_column(f"{s}cal_var{label(p)}_breach", pa.array(cal_miss[:, h, L + j], mask=mask))

        last = rank >= np.bincount(g, minlength=len(names))[g] - H  # each touched symbol's last H rows
        tail = pa.table({"symbol": pa.array(names[g[last]].tolist(), pa.string()), "bar": pa.array(bar[last]),
                         "ts": pa.array(ts[last]), "close": pa.array(close[last]), "jump": pa.array(jump[last]),
                         "loc": pa.FixedSizeListArray.from_arrays(pa.array(loc[last].reshape(-1)), H),
                         "scale": pa.FixedSizeListArray.from_arrays(pa.array(scale[last].reshape(-1)), H),
                         "pool": pa.FixedSizeListArray.from_arrays(pa.array(pool[last].reshape(-1)), H)},
                        schema=self.ring)
        if "pool" not in keep.column_names:  # a ring written before the pooled term: its rows issued at 1
            keep = keep.append_column("pool", pa.FixedSizeListArray.from_arrays(
                pa.array(np.ones(keep.num_rows * H)), H))
        new_ring = pa.concat_tables([keep.select(self.ring.names).cast(self.ring), tail]).sort_by(
            [("symbol", "ascending"), ("bar", "ascending")])
        state = cal.to_arrow()
        if self.pool:
            state = state.replace_schema_metadata({**state.schema.metadata, POOL_META: market.to_json()})
        return out, state, new_ring


def sum_names(levels: Sequence[float] = LEVELS, tails: Sequence[float] = TAILS) -> list[str]:
    """The names of one horizon's score sums (the columns of :func:`score_sums`)."""
    return [*SUM_FIELDS, *(f"in{label(lv)}" for lv in levels), *(f"cal_in{label(lv)}" for lv in levels),
            *(f"var{label(p)}_breach" for p in tails), *(f"cal_var{label(p)}_breach" for p in tails)]


def score_sums(block: pa.RecordBatch | pa.Table, horizons: int, levels: Sequence[float] = LEVELS,
               tails: Sequence[float] = TAILS, *, by: str = "symbol") -> dict[str, np.ndarray]:
    """Per value of column ``by``, the ``[H, len(sum_names)]`` sums of a block's ``scored_h*`` columns (what the
    summary and the live metrics count): scored targets, NLL, absolute error, raw and calibrated hits per level,
    raw and calibrated VaR breaches per tail."""
    names = sum_names(levels, tails)
    keys, inv = np.unique(block.column(by).to_numpy(zero_copy_only=False), return_inverse=True)
    out = np.zeros((len(keys), horizons, len(names)))
    for h in range(1, horizons + 1):
        scored = block.column(f"scored_h{h}_nll").is_valid().to_numpy(zero_copy_only=False)
        if not scored.any():
            continue
        for j, n in enumerate(names):
            if j == 0:
                v = scored.astype(np.float64)
            else:
                col = block.column(f"scored_h{h}_{'error' if n == 'abs_error' else n}")
                v = pc.fill_null(col, False if col.type == pa.bool_() else 0.0).to_numpy(zero_copy_only=False)
                v = np.abs(v) if n == "abs_error" else v.astype(np.float64)
            out[:, h - 1, j] = np.bincount(inv, weights=v, minlength=len(keys))
    return {str(k): out[i] for i, k in enumerate(keys.tolist())}


class _ByShard(beam.DoFn):
    """A job block -> ``(shard, Arrow IPC of the shard's rows)``, each row tagged with the block's timestamp
    (``_rel``, micros); the shard of a symbol is :func:`~streamrnn.beam.records.shard_of`'s."""

    def __init__(self, num_shards: int):
        self.num_shards = int(num_shards)

    def process(self, block: pa.RecordBatch, ts=beam.DoFn.TimestampParam) -> Iterator:
        if not block.num_rows:
            return
        t = pa.Table.from_batches([block])
        t = t.append_column(REL, pa.array(np.full(t.num_rows, ts.micros, np.int64)))
        names = pc.unique(t.column("symbol"))
        shards = np.array([shard_of(k, self.num_shards) for k in names.to_pylist()], np.int64)
        if (shards == shards[0]).all():  # a block of one shard (StatefulInference's blocks, the same sharding)
            yield int(shards[0]), to_ipc(t)
            return
        shard = shards[pc.index_in(t.column("symbol"), value_set=names).to_numpy()]
        for s in np.unique(shard).tolist():
            yield s, to_ipc(t.filter(pa.array(shard == s)))


_ROWS_SPEC = BagStateSpec("cal_rows", BytesCoder())
_ACI_SPEC = ReadModifyWriteStateSpec("cal_aci", BytesCoder())
_RING_SPEC = ReadModifyWriteStateSpec("cal_ring", BytesCoder())
_DUE_SPEC = ReadModifyWriteStateSpec("cal_due", VarIntCoder())
_FLUSH_SPEC = TimerSpec("cal_flush", TimeDomain.WATERMARK)
_END_SPEC = TimerSpec("cal_end", TimeDomain.WATERMARK)
_ROWS, _ACI, _RING, _DUE = (beam.DoFn.StateParam(s) for s in (_ROWS_SPEC, _ACI_SPEC, _RING_SPEC, _DUE_SPEC))
_FLUSH, _END = beam.DoFn.TimerParam(_FLUSH_SPEC), beam.DoFn.TimerParam(_END_SPEC)


class CalibrateShard(beam.DoFn):
    """Stateful per shard of symbols: buffered rows applied in bar order when the watermark passes them (module
    doc). ``flush_all`` (a bounded input): everything buffered is applied at the first firing. The live metrics
    per horizon (:meth:`streamrnn.metrics.catalogue.Recorder.forecast_horizons`) count the scores this step emits."""

    def __init__(self, df: Sequence[float], *, levels: Sequence[float] = LEVELS, tails: Sequence[float] = TAILS,
                 gamma: float = GAMMA, scaling: str = "proportional", method: str = METHOD, pool: float = 0.0,
                 flush_all: bool = False):
        self.calibrator = Calibrator(df, levels=levels, tails=tails, gamma=gamma, scaling=scaling, method=method,
                                     pool=pool)
        self.flush_all = flush_all

    def setup(self) -> None:
        self.m = Counters()
        self.pool_late = Metrics.counter(NAMESPACE, "calibration_pool_late_rows")

    def process(self, kv, now=beam.DoFn.TimestampParam, rows=_ROWS, due=_DUE, flush=_FLUSH, end=_END) -> None:
        rows.add(kv[1])
        if not self.flush_all:
            # the rows upstream releases at the end of the input come when the watermark is already there: a
            # timer set then might never fire, so one set from the start applies them (and holds their time)
            end.set(timestamp(END_OF_INPUT_MICROS))
            if now.micros >= END_OF_INPUT_MICROS:
                return
        cur = due.read()
        if cur is None or now.micros < cur:
            due.write(now.micros)
            flush.set(timestamp(now.micros))

    @on_timer(_FLUSH_SPEC)
    def on_flush(self, now=beam.DoFn.TimestampParam, rows=_ROWS, aci=_ACI, ring=_RING, due=_DUE, flush=_FLUSH
                 ) -> Iterator:
        yield from self._apply(now.micros, self.flush_all, rows, aci, ring, due, flush)

    @on_timer(_END_SPEC)
    def on_end(self, now=beam.DoFn.TimestampParam, rows=_ROWS, aci=_ACI, ring=_RING, due=_DUE, flush=_FLUSH
               ) -> Iterator:
        yield from self._apply(now.micros, True, rows, aci, ring, due, flush)

    def _apply(self, now: int, everything: bool, rows, aci, ring, due, flush) -> Iterator:
        """Apply the held rows due at ``now`` (micros; all with ``everything``), keep the rest for a timer."""
        held = [from_ipc(b) for b in rows.read()]
        if not held:
            return
        t = pa.concat_tables(held) if len(held) > 1 else held[0]
        rel = t.column(REL).to_numpy()
        ready = np.ones(len(rel), bool) if everything else rel <= now
        cur, rest = t.filter(pa.array(ready)), t.filter(pa.array(~ready))
        rows.clear()
        if rest.num_rows:
            rows.add(to_ipc(rest))
            nxt = int(rest.column(REL).to_numpy().min())
            due.write(nxt)
            flush.set(timestamp(nxt))
        else:
            due.clear()
        if not cur.num_rows:
            return
        a, r = aci.read(), ring.read()
        out, a_new, r_new = self.calibrator.apply(None if a is None else from_ipc(a),
                                                  None if r is None else from_ipc(r), cur)
        aci.write(to_ipc(a_new))
        ring.write(to_ipc(r_new))
        if self.calibrator.late_rows:
            self.pool_late.inc(self.calibrator.late_rows)
        if self.m.prom is not None:
            c = self.calibrator
            for v, sums in score_sums(out, c.H, c.levels, c.tails, by="model_version").items():
                guarded(self.m.prom.forecast_horizons, v, sums, [label(x) for x in c.levels],
                        [label(x) for x in c.tails])
        # one block per application, at the later of its time and its rows' latest (module doc, timestamps)
        at = max(now, int(pc.max(out.column(REL)).as_py()))
        for batch in out.drop_columns([REL]).combine_chunks().to_batches():
            yield TimestampedValue(batch, timestamp(at))


class Calibrate(beam.PTransform):
    """Job rows -> the same rows with the calibrated bands and live scores of every horizon appended (module doc),
    in :meth:`Calibrator.fields` order after the input's columns. ``num_shards``: the Beam keys the symbols
    are spread over (each holds its symbols' state). ``pool``: the weight of the market-wide scale term
    (:mod:`.pooled`; 0, the default: off); it reads every symbol at once, so with it on the step runs as one Beam
    key whatever ``num_shards`` is (its bands do not depend on the sharding)."""

    def __init__(self, df: Sequence[float], *, levels: Sequence[float] = LEVELS, tails: Sequence[float] = TAILS,
                 gamma: float = GAMMA, scaling: str = "proportional", method: str = METHOD, num_shards: int = 16,
                 pool: float = 0.0, label: str | None = None):
        super().__init__(label)
        self.df, self.levels, self.tails, self.gamma = list(df), tuple(levels), tuple(tails), float(gamma)
        self.scaling, self.method = scaling, method
        self.pool = Calibrator(self.df, levels=self.levels, tails=self.tails, gamma=self.gamma, scaling=scaling,
                               method=method, pool=pool).pool  # InputError now
        self.num_shards = 1 if self.pool else int(num_shards)

    def expand(self, rows):
        flush_all = bool(getattr(rows, "is_bounded", True))
        keyed = rows | "ByShard" >> beam.ParDo(_ByShard(self.num_shards)).with_output_types(
            beam.typehints.Tuple[int, bytes])
        return keyed | "CalibrateShard" >> beam.ParDo(CalibrateShard(
            self.df, levels=self.levels, tails=self.tails, gamma=self.gamma, scaling=self.scaling, method=self.method,
            pool=self.pool, flush_all=flush_all))


def horizon_summary(sums: np.ndarray, levels: Sequence[float] = LEVELS, tails: Sequence[float] = TAILS) -> dict:
    """``summary.json``'s ``horizons`` block from ``[H, len(sum_names)]`` sums: per horizon the scored targets,
    mean NLL (nats), MAE (% log return), coverage per level raw and calibrated, VaR breach rate per tail raw
    and calibrated (None where nothing was scored)."""
    out = {}
    L, P = len(levels), len(tails)
    for h, row in enumerate(np.asarray(sums, np.float64)):
        n = row[0]
        per = [float(v / n) if n else None for v in row]
        out[f"h{h + 1}"] = {
            "scored": int(n), "nll": per[1], "mae": per[2],
            "coverage": {label(lv): {"raw": per[3 + k], "calibrated": per[3 + L + k]} for k, lv in enumerate(levels)},
            "var_breaches": {label(p): {"raw": per[3 + 2 * L + j], "calibrated": per[3 + 2 * L + P + j]}
                             for j, p in enumerate(tails)}}
    return out


__all__ = ["Calibrate", "CalibrateShard", "Calibrator", "calibrated_fields", "horizon_summary", "ring_schema",
           "score_sums", "scored_fields", "sum_names"]
