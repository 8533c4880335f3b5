"""Train the bar forecaster: a stacked recurrent net (or the causal TCN) with a Student-t head.

Each training symbol is one sequence from its first bar (zero state), the way
the model runs online. The head gives, for every bar, a location and log-scale
per horizon h = 1..H of the cumulative % log return to bar t+h; a learned
degrees-of-freedom per horizon (``df = 2 + exp(df_raw)``) makes it a Student-t.
The loss is the mean t NLL over the valid training targets (those ending before
``fit_end``, on non-held-out symbols). Validation NLL (origins in
``[fit_end, val_end)``) picks the best checkpoint; the test period is never read.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from ..errors import InputError
from ..forecast import scale
from ..forecast.dataset import Prepared, Split
from ..forecast.features import FEATURE_NAMES, FeatureConfig
from ..forecast.progress import Progress
from ..forecast.scale import LOG_VOL
from ..model.spec import SPEC_KEY, ModelSpec, OutputTensor
from .graph import set_spec
from .lm import _progress, lr_at, progress
from .nets import NetConfig, RecurrentNet
from .tcn import CausalTCN, TCNConfig

FORECAST_KEY = "forecast"


@dataclass
class ForecastTrainConfig:
    """Settings of ``streamrnn train forecast`` (stored in the model's metadata)."""

    cell: str = "lstm"          # lstm | gru | rnn | tcn
    hidden: int = 32
    layers: int = 2
    dropout: float = 0.0
    horizons: int = 5
    batch: int = 32
    steps: int = 400
    lr: float = 3e-3
    min_lr_frac: float = 0.05
    warmup: int = 20
    weight_decay: float = 1e-4
    clip: float = 1.0
    eval_every: int = 50
    seed: int = 0
    threads: int = 1
    max_minutes: float = 0.0
    tcn_levels: int = 5
    tcn_kernel: int = 3
    split: Split = field(default_factory=Split)
    features: FeatureConfig = field(default_factory=FeatureConfig)


class ForecastNet(RecurrentNet):
    """A :class:`RecurrentNet` with a learned Student-t degrees of freedom per horizon (kept in metadata).

    ``anchor``: the outputs are relative to the EWMA sd (:mod:`streamrnn.forecast.scale`); the first
    layer's weights from the absolute ``log_vol`` feature are held at zero (its gradient is masked, and
    weight decay keeps zero at zero), so the network sees only scale-free inputs and its output is the
    same whatever the level of volatility. The log-scale bias starts at ``0.5 ln h`` plus the scale of a
    unit-variance t(6), the anchor's own forecast.
    """

    def __init__(self, config: NetConfig, anchor: bool = False):
        super().__init__(config)
        self.df_raw = nn.Parameter(torch.full((config.n_targets,), math.log(4.0)))
        self.anchor = anchor
        if anchor:
            H = config.n_targets
            w = self.rnn.weight_ih_l0
            mask = torch.ones_like(w)
            mask[:, LOG_VOL] = 0.0
            with torch.no_grad():
                w.mul_(mask)
                self.head.bias[:H].zero_()
                h = torch.arange(1, H + 1, dtype=torch.float32)
                self.head.bias[H:] = 0.5 * torch.log(h) + 0.5 * math.log(4 / 6)
            w.register_hook(lambda g: g * mask)


class ForecastTCN(CausalTCN):
    def __init__(self, config: TCNConfig, horizons: int):
        super().__init__(config)
        self.df_raw = nn.Parameter(torch.full((horizons,), math.log(4.0)))


def build_net(cfg: ForecastTrainConfig) -> nn.Module:
    F = len(FEATURE_NAMES)
    if cfg.cell == "tcn":
        return ForecastTCN(TCNConfig(input_kind="features", n_features=F, channels=cfg.hidden, kernel=cfg.tcn_kernel,
                                     levels=cfg.tcn_levels, out_dim=2 * cfg.horizons, dropout=cfg.dropout),
                           cfg.horizons)
    return ForecastNet(NetConfig(cell=cfg.cell, input_kind="features", n_features=F, hidden=cfg.hidden,
                                 layers=cfg.layers, dropout=cfg.dropout, task="forecast",
                                 n_targets=cfg.horizons), anchor=cfg.features.anchor)


def t_nll(y: torch.Tensor, out: torch.Tensor, df_raw: torch.Tensor, log_vol: torch.Tensor | None = None
          ) -> torch.Tensor:
    """Per-target Student-t NLL; ``out [..., 2H]`` = (loc, log_scale), relative to the EWMA sd ``exp(log_vol)``
    ``[...]`` when given (:mod:`streamrnn.forecast.scale`)."""
    H = df_raw.shape[0]
    loc, log_scale = out[..., :H], out[..., H:]
    if log_vol is not None:
        lv = log_vol.unsqueeze(-1)
        loc, log_scale = loc * torch.exp(lv), log_scale + lv
    v = 2.0 + torch.exp(df_raw)
    z = (y - loc) * torch.exp(-log_scale)
    return (-(torch.lgamma((v + 1) / 2) - torch.lgamma(v / 2) - 0.5 * torch.log(v * math.pi))
            + log_scale + (v + 1) / 2 * torch.log1p(z * z / v))


def feature_stats(data: list[Prepared], split: Split) -> tuple[np.ndarray, np.ndarray]:
    """Mean/std of each feature over the training bars (before ``fit_end``) of the training symbols."""
    end = float(np.datetime64(split.fit_end, "s").astype(np.int64))
    xs = np.concatenate([p.series.x[p.series.ts < end] for p in data])
    sd = xs.std(axis=0)
    return xs.mean(axis=0), np.where(sd > 1e-8, sd, 1.0)


def pack(data: list[Prepared], split: Split, mean: np.ndarray, std: np.ndarray):
    """Right-padded tensors over symbols: x (normalised), y, train mask, val mask, raw log_vol (the anchor);
    only bars before ``val_end``."""
    end = float(np.datetime64(split.val_end, "s").astype(np.int64))
    lens = [int((p.series.ts < end).sum()) for p in data]
    S, T, H = len(data), max(lens), data[0].y.shape[1]
    X = np.zeros((S, T, len(mean)), np.float32)
    Y = np.zeros((S, T, H), np.float32)
    MT = np.zeros((S, T, H), bool)
    MV = np.zeros((S, T, H), bool)
    A = np.zeros((S, T), np.float32)
    for i, (p, n) in enumerate(zip(data, lens, strict=True)):
        X[i, :n] = (p.series.x[:n] - mean) / std
        A[i, :n] = p.series.x[:n, LOG_VOL]
        Y[i, :n] = p.y[:n]
        MT[i, :n] = p.window(None, split.fit_end)[:n]
        MV[i, :n] = p.window(split.fit_end, split.val_end)[:n]
    return torch.from_numpy(X), torch.from_numpy(Y), torch.from_numpy(MT), torch.from_numpy(MV), torch.from_numpy(A)


@torch.no_grad()
def masked_nll(net: nn.Module, X, Y, M, A=None, chunk: int = 64) -> tuple[float, list[float]]:
    """Mean t NLL over the masked targets: overall and per horizon."""
    net.eval()
    tot = torch.zeros(Y.shape[-1], dtype=torch.float64)
    cnt = torch.zeros(Y.shape[-1], dtype=torch.float64)
    for s in range(0, X.shape[0], chunk):
        out, _ = net(X[s:s + chunk])
        nll = t_nll(Y[s:s + chunk], out, net.df_raw, None if A is None else A[s:s + chunk])
        m = M[s:s + chunk]
        tot += (nll * m).sum(dim=(0, 1)).double()
        cnt += m.sum(dim=(0, 1)).double()
    net.train()
    per = (tot / cnt.clamp(min=1)).tolist()
    return float(tot.sum() / cnt.sum().clamp(min=1)), per


def train_forecast(data: list[Prepared], cfg: ForecastTrainConfig, *, checkpoint: str | os.PathLike,
                   resume: bool = True, log=print) -> tuple[nn.Module, dict]:
    """Train on the non-held-out symbols of ``data``; return the best-validation net and a summary."""
    train_syms = [p for p in data if not cfg.split.held_out(p.symbol)]
    if not train_syms:
        raise InputError("train forecast: bars: expected symbols outside the held-out set, got none")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    mean, std = feature_stats(train_syms, cfg.split)
    X, Y, MT, MV, A = pack(train_syms, cfg.split, mean, std)
    if not cfg.features.anchor:
        A = None
    if not MT.any() or not MV.any():
        raise InputError(f"train forecast: bars: expected targets before {cfg.split.fit_end} and in "
                         f"[{cfg.split.fit_end}, {cfg.split.val_end}), got {int(MT.sum())} and {int(MV.sum())}")
    t_fit = int(MT.any(dim=2).any(dim=0).nonzero().max()) + 1  # training steps never run past fit_end's bars
    net = build_net(cfg)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step, elapsed, history, best = 0, 0.0, [], {"val": math.inf, "step": 0, "net": None}
    ckpt = Path(checkpoint)
    settings = json.loads(json.dumps(asdict(cfg)))
    free = ("steps", "max_minutes", "threads", "eval_every")
    if resume and ckpt.exists():
        blob = torch.load(ckpt, weights_only=False)
        theirs = {k: v for k, v in blob["config"].items() if k not in free}
        ours = {k: v for k, v in settings.items() if k not in free}
        if theirs != ours:
            raise InputError(f"checkpoint {ckpt}: settings: expected {theirs}, got {ours} "
                             f"(only {', '.join(free)} may change on resume)")
        net.load_state_dict(blob["net"])
        opt.load_state_dict(blob["opt"])
        torch.set_rng_state(blob["torch_rng"])
        rng.bit_generator.state = blob["np_rng"]
        step, elapsed, history, best = blob["step"], blob["elapsed"], blob["history"], blob["best"]
        log(f"resumed from {ckpt} at step {step}")

    def save() -> None:
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        tmp = ckpt.with_suffix(".tmp")
        torch.save({"net": net.state_dict(), "opt": opt.state_dict(), "config": settings,
                    "torch_rng": torch.get_rng_state(), "np_rng": rng.bit_generator.state, "step": step,
                    "elapsed": elapsed, "history": history, "best": best}, tmp)
        os.replace(tmp, ckpt)

    bar = _progress(cfg.steps, step)
    # plain stderr lines (after 10 s, every 10 s) where tqdm draws no bar (stderr is not a terminal)
    lines = Progress("train forecast", enabled=bar is None or bool(bar.disable))
    net.train()
    t0 = time.perf_counter() - elapsed
    ema = None
    while progress(step, time.perf_counter() - t0, cfg) < 1.0:
        idx = torch.from_numpy(rng.choice(X.shape[0], size=min(cfg.batch, X.shape[0]), replace=False))
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg, progress(step, time.perf_counter() - t0, cfg))
        out, _ = net(X[idx, :t_fit])
        m = MT[idx, :t_fit]
        lv = None if A is None else A[idx, :t_fit]
        loss = (t_nll(Y[idx, :t_fit], out, net.df_raw, lv) * m).sum() / m.sum().clamp(min=1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.clip)
        opt.step()
        step += 1
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{ema:.4f}")
        lines.tick(step, cfg.steps, "steps", f"train NLL {ema:.4f}")
        done = progress(step, time.perf_counter() - t0, cfg) >= 1.0
        if step % cfg.eval_every == 0 or done:
            val, per = masked_nll(net, X, Y, MV, A)
            elapsed = time.perf_counter() - t0
            history.append({"step": step, "train_nll": round(ema, 5), "val_nll": round(val, 5),
                            "val_nll_h": [round(v, 4) for v in per], "elapsed_s": round(elapsed, 1)})
            if val < best["val"]:
                best = {"val": val, "step": step, "net": {k: v.clone() for k, v in net.state_dict().items()}}
            save()
            msg = f"step {step}/{cfg.steps} train {ema:.4f} val {val:.4f} (h1 {per[0]:.4f}) {elapsed / 60:.1f} min"
            (bar.write if bar is not None and not bar.disable else log)(msg)
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - t0
    save()
    if best["net"] is not None:
        net.load_state_dict(best["net"])
    net.eval()
    df = (2.0 + torch.exp(net.df_raw.detach())).tolist()
    summary = {
        "steps": step, "train_seconds": round(elapsed, 1), "best_step": best["step"],
        "val_nll": round(best["val"], 5), "df": [round(v, 4) for v in df],
        "train_symbols": len(train_syms), "heldout_symbols_in_data": len(data) - len(train_syms),
        "feature_mean": mean.tolist(), "feature_std": std.tolist(), "history": history,
        "settings": settings,
    }
    return net, summary


def forecast_meta(cfg: ForecastTrainConfig, summary: dict, data_desc: str) -> dict:
    """The ``training["forecast"]`` block that serving and ``eval forecast`` read."""
    return {
        "distribution": "student_t", "df": summary["df"], "horizons": cfg.horizons,
        "target": "cumulative log return in percent from this bar's close to the close h bars later, h = 1..H",
        "bar_seconds": cfg.features.bar_seconds, "features": cfg.features.to_dict(),
        "feature_names": list(FEATURE_NAMES), "split": cfg.split.to_dict(), "data": data_desc,
    }


def export_forecast(net: ForecastNet, path: str | os.PathLike, cfg: ForecastTrainConfig, summary: dict, *,
                    data_desc: str, name: str, version: str = "1.0.0", metrics: dict | None = None) -> ModelSpec:
    """Export through the project's ONNX contract, then describe the Student-t outputs in the spec."""
    from .export import export

    training = {FORECAST_KEY: forecast_meta(cfg, summary, data_desc),
                **{k: summary[k] for k in ("steps", "train_seconds", "best_step", "train_symbols")},
                "settings": json.dumps(summary["settings"], sort_keys=True),
                "history": json.dumps(summary["history"])}
    spec = export(net, path, name=name, version=version, training=training,
                  metrics={"val_nll": summary["val_nll"], **(metrics or {})}, feature_names=FEATURE_NAMES,
                  mean=np.asarray(summary["feature_mean"]), std=np.asarray(summary["feature_std"]))
    H = cfg.horizons
    if cfg.features.anchor:  # relative to the EWMA sd exp(log_vol) of the input bar (streamrnn.forecast.scale)
        outs = (OutputTensor("mean", ("batch", "time", H),
                             "location in running-sd units: the median of a Student-t over the cumulative % log "
                             "return to bars t+1..t+H is exp(log_vol) * mean (log_vol: input feature 5); df per "
                             "horizon in training.forecast.df"),
                OutputTensor("log_scale", ("batch", "time", H),
                             "log scale relative to the EWMA sd: that Student-t's scale is exp(log_vol + log_scale)"))
    else:
        outs = (OutputTensor("mean", ("batch", "time", H),
                             "location (= median) of a Student-t over the cumulative % log return to bars t+1..t+H; "
                             "df per horizon in training.forecast.df"),
                OutputTensor("log_scale", ("batch", "time", H), "natural log of that Student-t's scale parameter"))
    m = onnx.load(os.fspath(path))
    spec = replace(ModelSpec.from_json({p.key: p.value for p in m.metadata_props}[SPEC_KEY]), outputs=outs)
    set_spec(m, spec)
    onnx.save(m, os.fspath(path))
    return spec


def save_tcn(net: ForecastTCN, path: str | os.PathLike, cfg: ForecastTrainConfig, summary: dict, *,
             data_desc: str) -> None:
    """Save the TCN baseline as a torch file (it is scored by ``eval forecast --tcn``, not served)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"tcn": net.config.to_dict(), "state_dict": net.state_dict(),
                FORECAST_KEY: forecast_meta(cfg, summary, data_desc),
                "feature_mean": summary["feature_mean"], "feature_std": summary["feature_std"],
                "train_seconds": summary["train_seconds"], "val_nll": summary["val_nll"]}, path)


def load_tcn(path: str | os.PathLike) -> tuple[ForecastTCN, dict]:
    blob = torch.load(path, weights_only=False)
    meta = blob[FORECAST_KEY]
    net = ForecastTCN(TCNConfig(**blob["tcn"]), meta["horizons"])
    net.load_state_dict(blob["state_dict"])
    return net.eval(), blob


def tcn_outputs(path: str, data: list[Prepared], H: int, meta: Mapping) -> tuple[list, list, np.ndarray]:
    """A TCN checkpoint's absolute forecasts on ``data`` (``eval forecast --tcn``: the evaluator's
    :data:`~streamrnn.forecast.evaluate.TcnOutputs` with ``path`` bound): per symbol the locations and log
    scales of every horizon, and the checkpoint's Student-t df."""
    net, blob = load_tcn(path)
    mean, std = np.asarray(blob["feature_mean"]), np.asarray(blob["feature_std"])
    locs, lss = [], []
    with torch.no_grad():
        for p in data:
            x = torch.from_numpy(((p.series.x - mean) / std).astype(np.float32))[None]
            out, _ = net(x)
            loc, ls = scale.absolute(meta, out[0, :, :H].double().numpy(), out[0, :, H:].double().numpy(), p.series.x)
            locs.append(loc)
            lss.append(ls)
    return locs, lss, np.asarray(blob["forecast"]["df"], np.float64)
