"""± and n directions in one batched forward (LoRA): L+ and L- of n directions from forwards of 2·n·B rows.

The batch is encoded once and stacked once per row group, group ``2j`` being direction j at ``+eps`` and group
``2j + 1`` at ``-eps`` (group-major rows). The frozen base projections run once over all rows; each group's
adapter delta uses its own perturbed adapters (``grouped_lora``). With a ``ForwardEngine`` the forward keeps its
reuses (``ForwardEngine.row_groups``): layers below the first LoRA layer run once for all groups, shared prompt
segments run once per group.

The losses are those of the sequential path (weights ``round(theta ± eps*z)``, the objective's value of the batch)
up to fp32 summation order, and the stored weights are never written: the only write of a step is the update,
``g_j = (L+_j - L-_j) / (2 eps)`` applied by the optimizer as in its virtual-perturbation mode, so the seed log
and its replay are those of that mode.

``max_rows`` bounds the rows of one forward (memory): the groups are split into several forwards of whole groups
(a group is never split; with ``max_rows`` below one group's rows, each forward runs one group).
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..forward import ForwardEngine
from ..virtual.grouped_lora import GroupedLoRA
from ..virtual.grouped_lowrank import GroupedLowRank
from ..perturb.lowrank_part import check_draw
from ..optim import projected_grad
from ..tasks.metrics import ObjectiveKind, Reduction, from_scores, objective_value
from ..perturb import ParamSet

__all__ = ["batched_pm_losses", "pm_grads", "tile_encoding", "make_pm_fn", "pm_fn_factory"]

# encoding keys holding one entry per row / per target / per example: stacked as they are
_REPEAT = ("input_ids", "attention_mask", "mask_pos", "labels", "tgt_pos", "tgt_ids", "cont_len")


def tile_encoding(enc: dict[str, torch.Tensor], groups: int) -> dict[str, torch.Tensor]:
    """An objective's encoding (``MaskedLMObjective`` / ``CausalLMObjective``.encode) stacked ``groups`` times,
    group-major: row tensors [R, ...] -> [G*R, ...]; indices into the rows (``tgt_r``) and into the (example,
    candidate) slots (``tgt_row``) shifted to their group's copy. An unknown key is a ValueError."""
    rows = enc["input_ids"].shape[0]
    out = {}
    for key, v in enc.items():
        if key == "tgt_r":
            out[key] = torch.cat([v + g * rows for g in range(groups)])
        elif key == "tgt_row":
            slots = enc["cont_len"].shape[0]
            out[key] = torch.cat([v + g * slots for g in range(groups)])
        elif key in _REPEAT:
            out[key] = v.repeat(groups, *([1] * (v.dim() - 1)))
        else:
            raise ValueError(f"encoding key {key!r} is not known to the batched ± pass: cannot stack it per group")
    return out


def _check(seeds: Sequence[int], eps: float, max_rows: int | None) -> tuple[list[int], float]:
    seeds = [check_draw(s) for s in seeds]       # a pair: lazy low-rank V
    if not seeds:
        raise ValueError("seeds is empty: give one seed per direction")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1):
        raise ValueError(f"max_rows must be None or an int >= 1, got {max_rows!r}")
    return seeds, float(eps)


def _engine(objective: Any) -> ForwardEngine | None:
    if not (callable(getattr(objective, "encode", None)) and callable(getattr(objective, "forward", None))):
        raise TypeError("the batched ± pass needs an objective with encode(batch) and forward(model, enc) "
                        f"(MaskedLMObjective, CausalLMObjective); got {type(objective).__name__}")
    engine = getattr(objective, "engine", None)
    if engine is not None and not isinstance(engine, ForwardEngine):
        raise TypeError(f"the objective's engine is a {type(engine).__name__}; the batched ± pass needs a "
                        "ForwardEngine (it knows row groups) or None (the plain forward)")
    return engine


def _group_values(out, groups: int, kind: ObjectiveKind | str) -> list[float]:
    """The objective's value of each group's slice of a stacked output (logits [G*B, C], labels [G*B])."""
    B = out.labels.shape[0] // groups
    return [objective_value(from_scores(out.logits[g * B:(g + 1) * B], out.labels[g * B:(g + 1) * B]), kind)
            for g in range(groups)]


def batched_pm_losses(model: nn.Module, objective: Any, batch: Sequence[Any], seeds: Sequence[int], eps: float,
                      param_sets: ParamSet | Sequence[ParamSet], max_rows: int | None = None,
                      kind: ObjectiveKind | str = ObjectiveKind.CE) -> list[tuple[float, float]]:
    """``[(L+_j, L-_j)]`` for each seed j: the objective's value (``kind``, default the mean CE) of ``batch`` with
    every adapter tensor of ``param_sets`` at ``theta + eps*z(seed_j)`` and at ``theta - eps*z(seed_j)``.

    model: the peft LoRA model the objective runs (in eval mode). objective: a ``MaskedLMObjective`` or
    ``CausalLMObjective`` whose engine is a ``ForwardEngine`` or None. param_sets: the optimizer's sets, whose
    tensors must all be LoRA adapter weights of ``model``. max_rows: most rows per forward (module docstring).
    A non-finite loss stays in its own (direction, sign): the groups never mix. The stored weights are only read,
    also when the forward raises."""
    return _losses(model, objective, batch, seeds, eps, _grouped(model, param_sets), max_rows, kind)


def _grouped(model: nn.Module, param_sets: ParamSet | Sequence[ParamSet]) -> GroupedLoRA | GroupedLowRank:
    """The grouped pass of the sets' directions: low-rank terms (``distribution="lowrank"``) or LoRA deltas."""
    sets = [param_sets] if isinstance(param_sets, ParamSet) else list(param_sets)
    return GroupedLowRank(model, sets) if any(ps.lowrank is not None for ps in sets) else GroupedLoRA(model, sets)


def _losses(model, objective, batch, seeds, eps, grouped: GroupedLoRA | GroupedLowRank, max_rows, kind) -> list[tuple[float, float]]:
    seeds, eps = _check(seeds, eps, max_rows)
    Reduction(kind)                                    # an unknown kind is refused before any forward
    engine = _engine(objective)
    enc = objective.encode(batch)
    perts = [(s, sign * eps) for s in seeds for sign in (1.0, -1.0)]
    rows = enc["input_ids"].shape[0]
    per = len(perts) if max_rows is None else max(1, min(len(perts), max_rows // rows))
    values: list[float] = []
    with torch.no_grad():
        for c in range(0, len(perts), per):
            chunk = perts[c:c + per]
            rows_of = engine.row_groups(len(chunk)) if engine is not None else contextlib.nullcontext()
            with grouped.active(chunk), rows_of:
                out = objective.forward(model, tile_encoding(enc, len(chunk)))
            values += _group_values(out, len(chunk), kind)
    return [(values[2 * j], values[2 * j + 1]) for j in range(len(seeds))]


def pm_grads(pairs: Sequence[tuple[float, float]], eps: float) -> list[tuple[float, str | None]]:
    """MeZO's rule (``optim.projected_grad``) per direction: ``(g, skip)``."""
    return [projected_grad(lp, lm, eps) for lp, lm in pairs]


def pm_fn_factory(model: nn.Module, objective: Any, param_sets: ParamSet | Sequence[ParamSet],
                  max_rows: int | None = None, kind: ObjectiveKind | str = ObjectiveKind.CE
                  ) -> Callable[[Sequence[Any]], Callable[[Sequence[int], float], list[tuple[float, float]]]]:
    """``batch -> pm_fn`` for a training loop: the LoRA layers are looked up once, here, not once per step."""
    grouped = _grouped(model, param_sets)
    return lambda batch: (lambda seeds, eps: _losses(model, objective, batch, seeds, eps, grouped, max_rows, kind))


def make_pm_fn(model: nn.Module, objective: Any, batch: Sequence[Any], param_sets: ParamSet | Sequence[ParamSet],
               max_rows: int | None = None, kind: ObjectiveKind | str = ObjectiveKind.CE
               ) -> Callable[[Sequence[int], float], list[tuple[float, float]]]:
    """``pm_fn(seeds, eps) -> [(L+, L-)]`` for one batch: what an optimizer's batched step calls with the step's
    seeds and its eps (``MeZO.step_batched(pm_fn)``)."""
    return pm_fn_factory(model, objective, param_sets, max_rows, kind)(batch)
