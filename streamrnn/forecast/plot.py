"""``--plot``: the market job's forecasts drawn per symbol (needs the optional ``plot`` extra: matplotlib).

Per symbol two panels: the close, with each bar's one-bar-ahead median and 80%/95% price
bands drawn at the bar they forecast (and the online-calibrated 80% band, dashed, where the run has
it); below, the live error (realised minus median, % log
return) against the 80%/95% return bands, with the 80%/95% coverage in the title.

Which symbols: ``symbols`` (``--plot-symbols``) in the order given; by default the ``top`` (3)
symbols with the most output rows, ties in alphabetical order. Which bars: each symbol's last
``last`` (``--plot-last``) rows, by default all of them. The coverage in a title is computed over
the scored bars drawn in that panel, so with every bar drawn it equals that symbol's
``coverage_80`` / ``coverage_95`` in the run's ``summary.json``. Axes: time (UTC) below, price in
the bars' own currency above, % log return in the error panel.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from ..errors import InputError


def check_plotting(png: str) -> None:
    """InputError (one line) unless matplotlib imports and ``png`` ends in ``.png``."""
    if not png.lower().endswith(".png"):
        raise InputError(f"--plot: expected a .png file name, got {png!r}")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise InputError("--plot: expected matplotlib (pip install 'streamrnn[plot]'), got it not installed") from None


def read_forecasts(root: str) -> pa.Table:
    """Every ``forecasts-*.parquet`` under ``root`` (any Beam filesystem) as one table, by symbol and time."""
    paths = sorted(m.path for r in FileSystems.match([FileSystems.join(root, "forecasts-*.parquet")])
                   for m in r.metadata_list)
    tables = []
    for p in paths:
        with FileSystems.open(p, compression_type="uncompressed") as f:
            tables.append(pq.read_table(io.BytesIO(f.read())))
    if not tables:
        raise InputError(f"--plot: expected forecasts-*.parquet in {root!r}, got none")
    return pa.concat_tables(tables).sort_by([("symbol", "ascending"), ("ts", "ascending")])


def plot_forecasts(root: str, png: str, *, symbols: Sequence[str] | None = None, simulated: bool = False,
                   top: int = 3, last: int | None = None) -> dict[str, dict]:
    """Draw the chosen symbols (module doc) to ``png``; returns, per symbol drawn, the coverage in its title:
    ``{"scored", "coverage_80", "coverage_95"}`` over the drawn bars."""
    check_plotting(png)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = read_forecasts(root)
    sym = np.asarray(t.column("symbol").to_pylist(), dtype=object)
    if symbols:
        missing = [s for s in symbols if s not in set(sym)]
        if missing:
            raise InputError(f"--plot-symbols: expected symbols in the output, got unknown {missing} "
                             f"(have e.g. {sorted(set(sym))[:5]})")
        chosen = list(symbols)
    else:
        names, counts = np.unique(sym, return_counts=True)
        chosen = [str(n) for n in names[np.argsort(-counts, kind="stable")][:top]]
    fig, axes = plt.subplots(2 * len(chosen), 1, figsize=(11, 4.2 * len(chosen)), squeeze=False,
                             gridspec_kw={"height_ratios": [2, 1] * len(chosen)})
    drawn = {}
    for i, s in enumerate(chosen):
        drawn[s] = _draw(t.filter(pa.array(sym == s)), s, axes[2 * i, 0], axes[2 * i + 1, 0], last)
    title = "market_forecast: one-bar-ahead forecasts" + (" — SIMULATED market (not real prices)" if simulated
                                                          else "")
    fig.suptitle(title, fontsize=12, color="firebrick" if simulated else "black")
    fig.tight_layout()
    folder = os.path.dirname(os.path.abspath(png))
    os.makedirs(folder, exist_ok=True)
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return drawn


def drawn_coverage(t: pa.Table, k: int) -> dict:
    """The 80%/95% coverage of one symbol's rows ``k..`` (its scored ones): what its panel's title shows."""
    hit80, hit95 = ([h for h in t.column(c).to_pylist()[k:] if h is not None] for c in ("in80_h1", "in95_h1"))
    return {"scored": len(hit80), "coverage_80": float(np.mean(hit80)) if hit80 else None,
            "coverage_95": float(np.mean(hit95)) if hit95 else None}


def _draw(t: pa.Table, symbol: str, ax, ax_err, last: int | None) -> dict:
    def col(name: str) -> np.ndarray:
        return t.column(name).to_numpy(zero_copy_only=False).astype(np.float64)

    ts = col("ts").astype("datetime64[s]")
    close = col("close")
    n = len(ts)
    k = 0 if last is None else max(0, n - last)
    # the forecast made at bar j is for bar j + 1: draw it there
    at, med = ts[k + 1:], col("h1_median")[k:n - 1]
    ax.fill_between(at, col("h1_lo95")[k:n - 1], col("h1_hi95")[k:n - 1], color="tab:blue", alpha=0.15,
                    label="95% band", step="mid")
    ax.fill_between(at, col("h1_lo80")[k:n - 1], col("h1_hi80")[k:n - 1], color="tab:blue", alpha=0.3,
                    label="80% band", step="mid")
    ax.plot(at, med, color="tab:blue", lw=0.8, label="forecast median")
    if "h1_cal_lo80" in t.column_names and t.column("h1_cal_lo80").null_count < n:  # the job's online calibration
        for side in ("lo", "hi"):
            ax.plot(at, col(f"h1_cal_{side}80")[k:n - 1], color="tab:red", lw=0.7, ls="--", drawstyle="steps-mid",
                    label="calibrated 80% band (ACI)" if side == "lo" else None)
    ax.plot(ts[k:], close[k:], color="black", lw=1.0, label="close")
    ax.set_title(f"{symbol}: close and one-bar-ahead forecast")
    ax.set_ylabel("price (the bars' currency)")
    ax.set_xlabel("bar time (UTC)")
    ax.legend(loc="upper left", fontsize=8, ncol=4)
    err = t.column("error_h1").to_numpy(zero_copy_only=False)
    err = np.where(np.equal(err, None), np.nan, err).astype(np.float64)[k:n - 1]
    loc = col("h1_ret_loc")[k:n - 1]
    band = {q: 100.0 * np.log(col(f"h1_{q}")[k:n - 1] / close[k:n - 1]) - loc for q in ("lo80", "hi80", "lo95",
                                                                                         "hi95")}
    ax_err.fill_between(at, band["lo95"], band["hi95"], color="tab:orange", alpha=0.15, step="mid")
    ax_err.fill_between(at, band["lo80"], band["hi80"], color="tab:orange", alpha=0.3, step="mid")
    ax_err.axhline(0.0, color="grey", lw=0.5)
    ax_err.plot(at, err, ".", ms=2.5, color="black")
    c = drawn_coverage(t, k)  # the last row has no realised bar: rows k.. score what is drawn
    cov = (f"coverage 80%: {c['coverage_80']:.1%}, 95%: {c['coverage_95']:.1%} over {c['scored']} scored bars"
           if c["scored"] else "no realised bars yet")
    ax_err.set_title(f"{symbol}: live error (realised - median, % log return); {cov}", fontsize=10)
    ax_err.set_ylabel("% log return")
    ax_err.set_xlabel("bar time (UTC)")
    return c
