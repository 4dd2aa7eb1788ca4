"""Row groups: one forward whose rows are ``G`` copies of the same rows, each copy run under its own weights.

A batched MeZO step (``batched_pm``) stacks the batch once per (direction, sign) and lets every LoRA layer add each
copy's own perturbed delta. The rows are group-major: rows ``g * R .. (g + 1) * R - 1`` are group g, and every
group holds the same tokens. The engine plans prefixes over one group, runs the layers below the first trainable
one once for all groups (they see frozen weights only), then tiles the plan and the hidden states G times: from
there on each group computes its own copy of every shared segment, since a segment's K/V depend on the group's
weights.
"""
from __future__ import annotations

import torch

from .plan import Plan, Segment

__all__ = ["check_groups", "first_group", "tile_plan", "tile_states"]


def check_groups(groups: object) -> int:
    """``groups`` as an int >= 1, or a ValueError naming the bad value."""
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"row groups must be an int >= 1, got {groups!r}")
    return groups


def first_group(input_ids: torch.Tensor, attention_mask: torch.Tensor, groups: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The first of ``groups`` group-major blocks of ``input_ids``/``attention_mask`` [G * R, T] -> [R, T] each;
    a ValueError unless the rows split into G blocks holding the same tokens and mask."""
    rows = input_ids.shape[0]
    if rows % groups:
        raise ValueError(f"{rows} rows do not split into {groups} row groups of equal size")
    r = rows // groups
    ids, mask = input_ids.view(groups, r, -1), attention_mask.view(groups, r, -1)
    if not (bool((ids == ids[:1]).all()) and bool((mask == mask[:1]).all())):
        raise ValueError(f"the {groups} row groups must hold the same rows (tokens and mask), group-major")
    return input_ids[:r], attention_mask[:r]


def tile_plan(plan: Plan, groups: int) -> Plan:
    """The plan of ``groups`` group-major copies of the rows of ``plan``: every segment once per group (its
    parent in the same group), so no K/V is shared between groups. Segment paths repeat across groups, so the
    tiled plan's segments must never key the eval cache."""
    S, out = len(plan.segments), []
    for g in range(groups):
        out += [Segment(s.tokens, s.start, s.parent + g * S if s.parent >= 0 else -1, s.level, s.path)
                for s in plan.segments]
    owner = [o + g * S if o >= 0 else -1 for g in range(groups) for o in plan.owner]
    return Plan(out, owner, plan.plen * groups)


def tile_states(hidden: list[torch.Tensor | None], groups: int) -> list[torch.Tensor | None]:
    """Each batch's hidden states [n, T, H] -> [groups * n, T, H], group-major, matching :func:`tile_plan`
    (a level's segments keep their order inside each group)."""
    return [None if h is None else h.repeat(groups, *([1] * (h.dim() - 1))) for h in hidden]
