"""Best-checkpoint selection on the k-shot dev split (``--select-on dev``), kept in memory.

The trainer offers every evaluation on the selection split (every ``eval_every`` steps and at the end of
training) to :class:`BestWeights`; it keeps a copy of the trainable weights of the best one and puts them back
before the final evaluation on the reported split. Only the selection split's metrics are ever compared, so the
reported split cannot influence which weights are kept.

Order: higher accuracy wins; equal accuracy, lower mean cross-entropy wins; a full tie keeps the earlier step
(the later one would have to be strictly better). The initial weights are not a candidate (the paper's trainers
keep the best of the checkpoints evaluated during training).

Memory: one copy of the trainable tensors, in host memory (so a GPU run spends no device memory on it). For
LoRA that is the adapter (e.g. 460,800 fp32 numbers, 1.8 MB, for SmolLM2-135M with r=8 on q/v); for
full-parameter training it is a whole second copy of the model's weights in their dtype (RoBERTa-large fp32:
1.4 GB; OPT-13B fp16: 26 GB).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

__all__ = ["BestWeights", "is_better"]


def is_better(ev: dict, best: dict | None) -> bool:
    """Whether evaluation ``ev`` (``accuracy``, ``loss``) beats ``best`` (None: nothing yet): higher accuracy,
    then lower loss; a full tie is not better (the earlier checkpoint stays)."""
    if best is None:
        return True
    if ev["accuracy"] != best["accuracy"]:
        return ev["accuracy"] > best["accuracy"]
    return ev["loss"] < best["loss"]


class BestWeights:
    """The best trainable weights seen so far. ``params``: the trainable ``(name, tensor)`` pairs (the
    optimizer's tensors, updated in place by training)."""

    def __init__(self, params: Sequence[tuple[str, torch.Tensor]]) -> None:
        self.tensors = [p for _, p in params]
        self.best_step: int | None = None
        self.best: dict | None = None
        self.candidates = 0
        self.last_step: int | None = None           # the step of the latest evaluation offered or read
        self._saved: list[torch.Tensor] | None = None

    def offer(self, step: int, ev: dict) -> bool:
        """Consider the current weights, evaluated as ``ev`` after ``step`` steps; keep a copy if they are the
        best so far. Returns whether they were kept."""
        self.candidates += 1
        self.last_step = step
        if not is_better(ev, self.best):
            return False
        self.best_step, self.best = step, dict(ev)
        self._saved = [t.detach().to("cpu", copy=True) for t in self.tensors]
        return True

    def best_of(self, evals: Iterable[dict]) -> int | None:
        """On resume: take the best of earlier evaluations (``evals.jsonl`` records of the selection split) as
        the one to beat; returns its step (the caller replays the seed log up to it and calls :meth:`capture`),
        or None when there were none."""
        best_step, best, n = None, None, 0
        for ev in evals:
            n += 1
            self.last_step = int(ev["step"]) if self.last_step is None else max(self.last_step, int(ev["step"]))
            if is_better(ev, best):
                best_step, best = int(ev["step"]), dict(ev)
        self.candidates += n
        if best is not None:
            self.best_step, self.best = best_step, {k: v for k, v in best.items() if k not in ("step", "split")}
        return best_step

    def capture(self) -> None:
        """Copy the current weights as those of ``best_step`` (resume: the log has been replayed up to it)."""
        self._saved = [t.detach().to("cpu", copy=True) for t in self.tensors]

    def restore(self) -> None:
        """Put the kept weights back into the trainable tensors (nothing to do when none were kept)."""
        if self._saved is None:
            return
        with torch.no_grad():
            for t, s in zip(self.tensors, self._saved):
                t.copy_(s)

    def summary(self) -> dict:
        """``{"best_step", "best", "candidates"}`` for ``summary.json``."""
        return {"best_step": self.best_step, "best": self.best, "candidates": self.candidates}
