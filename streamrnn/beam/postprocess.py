"""Per-event postprocessing run inside the stateful step, vectorised over a batch.

A postprocess turns the model's raw task outputs (e.g. ``logprobs [N, 256]``) into
the few columns a job needs, before they leave the worker. It must be picklable
(a module-level class), because Beam ships it to workers.
"""

from __future__ import annotations

import numpy as np

from .. import lm


class Postprocess:
    """Base class. ``needs_prev``: also receive each event's previous-step outputs."""

    needs_prev: bool = False

    def __call__(self, x: np.ndarray, outputs: dict[str, np.ndarray],
                 prev_outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError


class NextTokenPostprocess(Postprocess):
    """Next-token columns for a byte LM.

    ``topk_tokens`` / ``topk_probs`` ``[N, k]`` predict the byte after this event;
    ``logprob`` ``[N]`` is the natural-log probability the model had given this
    event's byte before it arrived (NaN where the key's stream started fresh).
    """

    needs_prev = True

    def __init__(self, k: int = 5):
        self.k = k

    def __call__(self, x, outputs, prev_outputs):
        lp = outputs["logprobs"]
        tk, tp = lm.topk(lp, self.k)
        prev = prev_outputs["logprobs"]
        actual = lm.token_logprob(prev, np.asarray(x, np.int64))
        return {"topk_tokens": tk.astype(np.int64), "topk_probs": tp.astype(np.float32),
                "logprob": actual.astype(np.float32)}
