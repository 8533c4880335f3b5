"""``eval forecast --report PNG``: the backtest on one page (needs the optional ``plot`` extra: matplotlib).

Drawn from the result dict alone (``eval forecast --json`` output), so a saved JSON can be drawn again:

1. **Coverage by year** (h1, all symbols): the model's raw coverage of every level's central band per
   calendar year, solid, and the online-calibrated (ACI) one, dashed, against the nominal level (a dotted
   line) and the issue's target band of +-3 points around it (shaded).
2. **PIT histogram** (h1, all symbols): the share of outcomes per PIT bin, as a density (1 is uniform,
   i.e. calibrated), for the model and the best baseline (lowest h1 NLL over all symbols).
3. **NLL by year** (h1, all symbols): the model against the best baseline, nats; a year where the
   Diebold-Mariano test finds either better at 5% is marked.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from ..errors import InputError

NAMES = {"lstm": "model", "naive": "naive", "ewma_normal": "EWMA-normal", "ewma_t": "EWMA-t",
         "garch_normal": "GARCH-normal", "garch_t": "GARCH-t", "tcn": "TCN"}


def check_report(png: str) -> None:
    """InputError (one line) unless ``png`` ends in ``.png``, its folder exists and matplotlib imports: checked
    before any work, so a long backtest never ends on a missing extra."""
    if not png.lower().endswith(".png"):
        raise InputError(f"--report: expected a .png file name, got {png!r}")
    folder = os.path.dirname(os.path.abspath(png))
    if not os.path.isdir(folder):
        raise InputError(f"--report: expected a file in an existing folder, got {png!r} (no folder {folder!r})")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise InputError("--report: expected matplotlib (pip install 'streamrnn[plot]'), got it not "
                         "installed") from None


def _label(level: float) -> str:
    return f"{100 * level:.10g}"


def report_data(r: Mapping) -> dict:
    """What the report draws, as plain numbers (years, coverage per level raw and ACI, PIT densities, NLL by year,
    DM verdicts): the tests check the PNG's inputs through this."""
    bt = r["backtest"]
    best = bt["best_baseline"]
    by_year = bt["groups"]["all"]["by_year"]
    years = [y for y, t in by_year.items() if t["lstm"]["h1"]["n"]]
    aci_years = r.get("conformal", {}).get("groups", {}).get("all", {}).get("h1", {}).get("by_year", {})
    cov = {}
    for lv in r["levels"]:
        key = f"coverage_{_label(lv)}"
        cov[_label(lv)] = {"level": 100 * lv,
                           "raw": [100 * by_year[y]["lstm"]["h1"][key] for y in years],
                           "aci": [aci_years.get(y, {}).get("aci", {}).get(_label(lv)) for y in years]}
    bins = bt["pit"]["bins"]
    pit = {}
    for m in ("lstm", best):
        counts = bt["pit"]["h1"][m]
        n = sum(counts)
        pit[m] = [c * bins / n if n else 0.0 for c in counts]
    dm = bt["dm"]["all"]["by_year"]
    return {"best": best, "years": years, "coverage": cov, "pit_bins": bins, "pit": pit,
            "nll": {m: [by_year[y][m]["h1"]["nll"] for y in years] for m in ("lstm", best)},
            "dm_better": [dm[y][best]["h1"]["nll"].get("better", "neither") for y in years]}


def write_report(r: Mapping, png: str) -> dict:
    """Draw the three panels (module doc) of an ``eval forecast`` result to ``png``; returns :func:`report_data`."""
    check_report(png)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = report_data(r)
    years = [int(y) for y in d["years"]]
    best = NAMES.get(d["best"], d["best"])
    fig, ax = plt.subplots(3, 1, figsize=(10, 12))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (lab, c) in enumerate(d["coverage"].items()):
        col = colors[i % len(colors)]
        lv = c["level"]
        ax[0].axhspan(lv - 3, lv + 3, color=col, alpha=0.12, lw=0)
        ax[0].axhline(lv, color=col, ls=":", lw=1)
        ax[0].plot(years, c["raw"], "o-", color=col, label=f"{lab}% band, raw")
        if any(v is not None for v in c["aci"]):
            ax[0].plot(years, [float("nan") if v is None else v for v in c["aci"]], "s--", color=col, ms=4,
                       label=f"{lab}% band, ACI")
    ax[0].set_title("h1 coverage by year (all symbols): nominal level dotted, +-3 points shaded")
    ax[0].set_xlabel("year")
    ax[0].set_ylabel("outcomes inside the band (%)")
    ax[0].legend(fontsize=7, ncol=2)
    edges = [i / d["pit_bins"] for i in range(d["pit_bins"] + 1)]
    width = 1 / d["pit_bins"]
    ax[1].bar(edges[:-1], d["pit"]["lstm"], width=width, align="edge", alpha=0.6, label="model")
    ax[1].step(edges, [*d["pit"][d["best"]], d["pit"][d["best"]][-1]], where="post", color="k", lw=1.2, label=best)
    ax[1].axhline(1.0, color="grey", ls=":", lw=1, label="uniform (calibrated)")
    ax[1].set_title("PIT histogram, h1 (all symbols)")
    ax[1].set_xlabel("PIT = forecast CDF at the outcome")
    ax[1].set_ylabel("density")
    ax[1].legend(fontsize=8)
    ax[2].plot(years, d["nll"]["lstm"], "o-", label="model")
    ax[2].plot(years, d["nll"][d["best"]], "s-", color="k", label=f"{best} (best baseline)")
    for x, y, v in zip(years, d["nll"]["lstm"], d["dm_better"], strict=True):
        if v != "neither":
            ax[2].annotate("model better" if v == "model" else f"{best} better", (x, y), fontsize=7,
                           textcoords="offset points", xytext=(0, 8), ha="center")
    ax[2].set_title("h1 NLL by year (all symbols; labelled where Diebold-Mariano p < 0.05)")
    ax[2].set_xlabel("year")
    ax[2].set_ylabel("NLL (nats per target)")
    ax[2].legend(fontsize=8)
    for a in (ax[0], ax[2]):
        a.set_xticks(years if len(years) <= 25 else years[::max(1, len(years) // 20)])
    fig.suptitle(f"eval forecast {r['start']}..{r['end'] or 'end'}: {os.path.basename(str(r['model']))} on "
                 f"{os.path.basename(str(r['bars']).rstrip('/'))}", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return d
