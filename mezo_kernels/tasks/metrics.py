"""What is computed from an objective's output: the output record itself, accuracy, F1, the scalar to minimize
(:func:`objective_value`, :func:`scalar_objective`) and :class:`Reduction`, the same scalar split into per-example
rows and a reduction so that ranks can exchange plain tensors (``distributed.DataParallelLoss``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .records import ObjectiveKind

__all__ = ["ObjectiveOutput", "ObjectiveKind", "from_scores", "accuracy", "f1", "objective_value",
           "scalar_objective", "Reduction"]

_OR_CALLABLE = " or a callable"         # what the kind's error adds where a user objective may stand instead


@dataclass
class ObjectiveOutput:
    """Result of one objective forward over a batch of B examples with C classes.

    loss: scalar float32 tensor, mean of ``per_example``.
    per_example: [B] float32 cross-entropy of each example.
    logits: [B, C] float32 class scores (label-word logits or candidate log-prob scores).
    preds: [B] int64 argmax of ``logits``.
    labels: [B] int64 gold labels.
    """

    loss: torch.Tensor
    per_example: torch.Tensor
    logits: torch.Tensor
    preds: torch.Tensor
    labels: torch.Tensor


def from_scores(scores: torch.Tensor, labels: torch.Tensor) -> ObjectiveOutput:
    """The output for class ``scores`` [B, C] and gold ``labels`` [B]: CE per example, its mean, argmax."""
    scores = scores.float()
    per = F.cross_entropy(scores, labels, reduction="none")
    return ObjectiveOutput(per.mean(), per, scores, scores.argmax(-1), labels)


def accuracy(out: ObjectiveOutput) -> float:
    """Fraction of ``preds == labels`` (0.0 for an empty batch)."""
    n = out.labels.numel()
    return float((out.preds == out.labels).sum().item()) / n if n else 0.0


def f1(out: ObjectiveOutput, positive: int = 1, zero_division: float = 1.0) -> float:
    """Binary F1 of class ``positive``: ``2 TP / (2 TP + FP + FN)``.

    When the batch has no positive labels and no positive predictions (0/0) the result is ``zero_division``
    (default 1.0: nothing to find and nothing wrongly found).
    """
    p, y = out.preds == positive, out.labels == positive
    tp = int((p & y).sum().item())
    denom = 2 * tp + int((p & ~y).sum().item()) + int((~p & y).sum().item())
    return 2 * tp / denom if denom else float(zero_division)


def objective_value(out: ObjectiveOutput, kind: ObjectiveKind | str = ObjectiveKind.CE) -> float:
    """A float to minimize (:class:`ObjectiveKind`): ``"ce"`` the mean cross-entropy, ``"neg_accuracy"``
    -accuracy, ``"neg_f1"`` -F1 of class 1."""
    kind = ObjectiveKind.parse(kind, _OR_CALLABLE)
    if kind == ObjectiveKind.CE:
        return float(out.loss.item())
    if kind == ObjectiveKind.NEG_ACCURACY:
        return -accuracy(out)
    return -f1(out)


UserObjective = Callable[[nn.Module, Sequence[Any]], Union[float, ObjectiveOutput]]


def scalar_objective(objective: UserObjective, kind: ObjectiveKind | str = ObjectiveKind.CE
                     ) -> Callable[[nn.Module, Sequence[Any]], float]:
    """``fn(model, batch) -> float`` to minimize in one process.

    ``objective(model, batch)`` returns an ``ObjectiveOutput`` (reduced with ``kind``) or a number (used as is,
    lower is better). The model passed in is the one to run (it may be a peft wrapper).
    """
    if not callable(objective):
        raise TypeError(f"objective must be callable as objective(model, batch), got {objective!r}")
    Reduction(kind)                                    # refuse an unknown kind now, not at the first step

    def call(model: nn.Module, batch: Sequence[Any]) -> float:
        r = objective(model, batch)
        return objective_value(r, kind) if isinstance(r, ObjectiveOutput) else float(r)

    return call


@dataclass(frozen=True)
class Reduction:
    """How per-example results become the scalar to minimize, split so that ranks can exchange plain tensors
    (``distributed.DataParallelLoss``): ``rows(out)`` -> [K, b] float32 per-example rows of one rank's output
    (K = 1: the CE values; K = 3 for the metric kinds: CE, prediction, label -- small ints, exact in fp32);
    ``value(rows)`` -> the float of the whole batch from the [K, B] rows in batch order, equal to
    ``objective_value`` of the full-batch output. ``additive``: the value is the mean of row 0, so ranks may
    exchange one partial sum instead of the rows."""

    kind: ObjectiveKind = ObjectiveKind.CE

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", ObjectiveKind.parse(self.kind, _OR_CALLABLE))

    @property
    def additive(self) -> bool:
        return self.kind == ObjectiveKind.CE

    def rows(self, out: ObjectiveOutput) -> torch.Tensor:
        if not isinstance(out, ObjectiveOutput):
            raise TypeError("exchanging losses between ranks needs per-example values: the objective must return an "
                            f"ObjectiveOutput, got {type(out).__name__}")
        rows = [out.per_example.float()]
        if self.kind != ObjectiveKind.CE:
            rows += [out.preds.float(), out.labels.float()]
        return torch.stack(rows).contiguous()

    def value(self, rows: torch.Tensor) -> float:
        per = rows[0]
        if self.kind == ObjectiveKind.CE:
            return float(per.mean().item())
        return objective_value(ObjectiveOutput(per.mean(), per, torch.empty(0), rows[1].long(), rows[2].long()),
                               self.kind)
