"""Train a byte-level language model with truncated BPTT, carrying state.

The training text (UTF-8 bytes, vocab 256) is cut into ``batch`` contiguous
streams. Each step feeds the next ``bptt`` bytes of every stream and starts
from the state the previous step ended with (detached), the way the model is
used online. Every epoch shifts the streams by a seeded random offset.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..cli.args import Heartbeat
from ..errors import InputError
from .nets import NetConfig, RecurrentNet


@dataclass
class LMTrainConfig:
    """Settings of ``streamrnn train lm`` (mirrored in the exported model's metadata)."""

    cell: str = "lstm"
    hidden: int = 512
    layers: int = 2
    embed_dim: int = 64
    dropout: float = 0.2
    batch: int = 64
    bptt: int = 128
    steps: int = 2000
    lr: float = 2e-3
    min_lr_frac: float = 0.05
    warmup: int = 100
    weight_decay: float = 0.05
    clip: float = 1.0
    val_frac: float = 0.1
    eval_every: int = 250
    seed: int = 1337
    threads: int = 0
    max_minutes: float = 0.0

    def validate(self) -> None:
        """InputError naming the CLI flag of the first bad setting."""
        def bad(flag: str, want: str, got) -> InputError:
            return InputError(f"--{flag}: expected {want}, got {got!r}")

        for name in ("hidden", "layers", "embed_dim", "batch", "bptt", "steps", "eval_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise bad({"embed_dim": "embed"}.get(name, name).replace("_", "-"), "an int >= 1", v)
        if self.cell not in ("lstm", "gru", "rnn"):
            raise bad("cell", "lstm, gru or rnn", self.cell)
        if not 0 < self.val_frac < 1:
            raise bad("val-frac", "a fraction in (0, 1)", self.val_frac)
        if not 0 <= self.dropout < 1:
            raise bad("dropout", "a fraction in [0, 1)", self.dropout)
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise bad("lr", "a finite number > 0", self.lr)
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise bad("weight-decay", "a finite number >= 0", self.weight_decay)
        if not (self.max_minutes >= 0 and math.isfinite(self.max_minutes)):
            raise bad("max-minutes", "a number >= 0 (0: no time cap)", self.max_minutes)
        if not isinstance(self.threads, int) or self.threads < 0:
            raise bad("threads", "an int >= 0 (0: torch's default)", self.threads)


CKPT_FORMAT = "streamrnn-lm-checkpoint/2"
VAL_STREAMS = 16
# settings that may change when a run is resumed (the rest must match the checkpoint)
RESUMABLE = ("steps", "max_minutes", "threads", "eval_every")


def load_checkpoint(ckpt: Path, cfg: LMTrainConfig, data_hash: str, text_path) -> dict:
    """Load a checkpoint without unpickling code (``weights_only``) and check it belongs to this run.

    The checkpoint is bound to the training data's sha256 and to every setting but
    :data:`RESUMABLE`; any mismatch is an :class:`InputError` naming what differs.
    """
    try:
        blob = torch.load(ckpt, weights_only=True, map_location="cpu")
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError... for a bad file
        raise InputError(f"--checkpoint {ckpt}: expected a streamrnn training checkpoint, got an unreadable "
                         f"file ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                         "pass --restart to train from scratch") from e
    if not isinstance(blob, dict) or blob.get("format") != CKPT_FORMAT:
        got = blob.get("format") if isinstance(blob, dict) else type(blob).__name__
        raise InputError(f"--checkpoint {ckpt}: format: expected {CKPT_FORMAT!r}, got {got!r}; "
                         "pass --restart to train from scratch")
    if blob.get("data_sha256") != data_hash:
        raise InputError(f"--checkpoint {ckpt}: training data: expected the text it was trained on "
                         f"(sha256 {str(blob.get('data_sha256'))[:16]}), got {os.fspath(text_path)!r} "
                         f"(sha256 {data_hash[:16]}); pass --restart to train on this text from scratch")
    saved = blob.get("config")
    theirs = {k: v for k, v in (saved if isinstance(saved, dict) else {}).items() if k not in RESUMABLE}
    ours = {k: v for k, v in asdict(cfg).items() if k not in RESUMABLE}
    if theirs != ours:
        diff = {k: (theirs.get(k), ours.get(k)) for k in sorted(set(theirs) | set(ours))
                if theirs.get(k) != ours.get(k)}
        raise InputError(f"--checkpoint {ckpt}: settings: expected {theirs}, got {ours} "
                         f"(differs in {', '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in diff.items())}; "
                         f"only {', '.join(RESUMABLE)} may change on resume)")
    return blob


def split_bytes(data: bytes, val_frac: float) -> tuple[np.ndarray, np.ndarray]:
    """First ``1 - val_frac`` of the bytes train, the rest validate (nanoGPT's char split)."""
    arr = np.frombuffer(data, dtype=np.uint8)
    n = int(len(arr) * (1 - val_frac))
    return arr[:n], arr[n:]


def progress(step: int, elapsed_s: float, cfg: LMTrainConfig) -> float:
    """Fraction of the run done: by steps, or by wall time when ``max_minutes`` binds first.

    A binding time cap makes the schedule depend on machine speed, so such a run is
    reproducible only up to timing; a pure step budget is bit-for-bit reproducible.
    """
    p = step / cfg.steps
    if cfg.max_minutes > 0:
        p = max(p, elapsed_s / (60 * cfg.max_minutes))
    return min(1.0, p)


def lr_at(step: int, cfg: LMTrainConfig, frac: float | None = None) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_frac * lr`` over the run's progress ``frac``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    p = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup) if frac is None else frac
    p = min(1.0, p)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * p)))


def _streams(data: np.ndarray, batch: int, offset: int) -> torch.Tensor:
    n = (len(data) - offset) // batch
    return torch.from_numpy(data[offset:offset + n * batch].astype(np.int64).reshape(batch, n))


@torch.no_grad()
def evaluate(net: RecurrentNet, data: np.ndarray, *, streams: int = VAL_STREAMS, chunk: int = 256) -> float:
    """Mean nats/byte over ``data`` cut into ``streams`` contiguous pieces, state carried within each."""
    net.eval()
    s = _streams(data, streams, 0)
    state = net.initial_state(streams)
    total, count = 0.0, 0
    for t0 in range(0, s.shape[1] - 1, chunk):
        x = s[:, t0:min(t0 + chunk, s.shape[1] - 1)]
        y = s[:, t0 + 1:t0 + 1 + x.shape[1]]
        logits, state = net(x, state)
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum").item()
        count += y.numel()
    net.train()
    return total / count


def _progress(total: int, initial: int):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm ships with the train extra
        return None
    return tqdm(total=total, initial=initial, unit="step", file=sys.stderr, dynamic_ncols=True,
                disable=None)


def train_lm(text_path: str | os.PathLike, cfg: LMTrainConfig, *, checkpoint: str | os.PathLike,
             resume: bool = True, log=print) -> tuple[RecurrentNet, dict]:
    """Train (or resume) and return the net and a summary dict (metrics, data hash, timing)."""
    cfg.validate()
    try:
        data = Path(text_path).read_bytes()
    except OSError as e:
        raise InputError(f"--text: expected a readable text file, got {os.fspath(text_path)!r} "
                         f"({e.strerror or e})") from e
    data_hash = hashlib.sha256(data).hexdigest()
    train, val = split_bytes(data, cfg.val_frac)
    need_train = cfg.batch * (2 * cfg.bptt + 1)
    if len(train) < need_train or len(val) < 2 * VAL_STREAMS:
        raise InputError(
            f"--text: expected at least {need_train} training bytes (--batch x (2 x --bptt + 1)) and "
            f"{2 * VAL_STREAMS} validation bytes (--val-frac {cfg.val_frac}), got {len(train)} and {len(val)} "
            f"from {len(data)} bytes in {os.fspath(text_path)!r}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    net_cfg = NetConfig(cell=cfg.cell, hidden=cfg.hidden, layers=cfg.layers, embed_dim=cfg.embed_dim,
                        dropout=cfg.dropout, vocab_size=256, task="lm", input_kind="tokens")
    net = RecurrentNet(net_cfg)
    decay = [p for n, p in net.named_parameters() if p.dim() >= 2 and not n.startswith("embed")]
    no_decay = [p for n, p in net.named_parameters() if not (p.dim() >= 2 and not n.startswith("embed"))]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.99))
    step, epoch, pos, elapsed = 0, 0, 0, 0.0
    offset = int(rng.integers(0, cfg.bptt))
    state = net.initial_state(cfg.batch)
    history: list[dict] = []
    ckpt = Path(checkpoint)
    if resume and ckpt.exists():
        blob = load_checkpoint(ckpt, cfg, data_hash, text_path)
        net.load_state_dict(blob["net"])
        opt.load_state_dict(blob["opt"])
        torch.set_rng_state(blob["torch_rng"])
        rng.bit_generator.state = blob["np_rng"]
        step, epoch, pos, elapsed, history, offset = (
            blob[k] for k in ("step", "epoch", "pos", "elapsed", "history", "offset"))
        state = tuple(blob["state"])
        log(f"resumed from {ckpt} at step {step}")

    def save() -> None:
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        tmp = ckpt.with_suffix(".tmp")
        torch.save({"format": CKPT_FORMAT, "data_sha256": data_hash, "net": net.state_dict(),
                    "opt": opt.state_dict(), "config": asdict(cfg),
                    "torch_rng": torch.get_rng_state(), "np_rng": rng.bit_generator.state,
                    "step": step, "epoch": epoch, "pos": pos, "elapsed": elapsed, "history": history,
                    "offset": offset, "state": state}, tmp)
        os.replace(tmp, ckpt)

    streams = _streams(train, cfg.batch, offset)
    bar = _progress(cfg.steps, step)
    # plain stderr lines (after 10 s, at most every 10 s) where tqdm draws no bar (stderr is not a terminal)
    lines = Heartbeat("train lm", f"step {step}/{cfg.steps}") if bar is None or bar.disable else None
    net.train()
    t_start = time.perf_counter() - elapsed
    train_loss_ema = None
    while progress(step, time.perf_counter() - t_start, cfg) < 1.0:
        if pos + cfg.bptt + 1 > streams.shape[1]:
            epoch += 1
            pos = 0
            offset = int(rng.integers(0, cfg.bptt))
            streams = _streams(train, cfg.batch, offset)
            state = net.initial_state(cfg.batch)
        x = streams[:, pos:pos + cfg.bptt]
        y = streams[:, pos + 1:pos + 1 + cfg.bptt]
        frac = progress(step, time.perf_counter() - t_start, cfg)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg, frac)
        logits, state = net(x, state)
        state = tuple(s.detach() for s in state)
        loss = F.cross_entropy(logits.reshape(-1, 256), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.clip)
        opt.step()
        step += 1
        pos += cfg.bptt
        lv = loss.item()
        train_loss_ema = lv if train_loss_ema is None else 0.98 * train_loss_ema + 0.02 * lv
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{train_loss_ema:.3f}", lr=f"{opt.param_groups[0]['lr']:.2e}")
        if lines is not None:
            lines.update(f"step {step}/{cfg.steps}, train {train_loss_ema:.3f} nats/char")
        done = progress(step, time.perf_counter() - t_start, cfg) >= 1.0
        if step % cfg.eval_every == 0 or done:
            val_loss = evaluate(net, val)
            elapsed = time.perf_counter() - t_start
            history.append({"step": step, "epoch": epoch, "train_loss": train_loss_ema,
                            "val_loss": val_loss, "elapsed_s": round(elapsed, 1)})
            msg = (f"step {step}/{cfg.steps} epoch {epoch} train {train_loss_ema:.4f} "
                   f"val {val_loss:.4f} nats/char ({val_loss / math.log(2):.3f} bits/char) {elapsed / 60:.1f} min")
            if bar is not None and not bar.disable:
                bar.write(msg, file=sys.stderr)
            else:
                log(msg)
            save()
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - t_start
    save()
    last = history[-1] if history else {}
    summary = {
        "data_file": Path(text_path).name, "data_sha256": data_hash, "data_bytes": len(data),
        "train_bytes": len(train), "val_bytes": len(val), "split": f"first {1 - cfg.val_frac:.0%} train",
        "steps": step, "epochs": round(step * cfg.bptt * cfg.batch / len(train), 2),
        "train_seconds": round(elapsed, 1), "settings": json.dumps(asdict(cfg), sort_keys=True),
        "train_loss": round(last.get("train_loss", float("nan")), 4),
        "val_loss_streams16": round(last.get("val_loss", float("nan")), 4),
        "history": json.dumps(history),
    }
    net.eval()
    return net, summary
