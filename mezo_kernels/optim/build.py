"""What ``MeZO`` builds from its parameters, once, at construction: the kernel entries (one per plain tensor; the
local runs of a DTensor, ``optim.dtensor``), one ``ParamSet`` per param group, and what a step needs across
processes (``optim.distributed``). Plain tensors take the path they always took: no DTensor or process-group
check runs per step, and single-process runs keep their bits.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from .. import _compat
from . import distributed
from .dtensor import Run, ShardedLayout, expand
from ..perturb import ParamSet
from ..virtual import Wrapped

__all__ = ["Built", "build"]


@dataclass
class Built:
    sets: list[ParamSet | None]                       # one per param group (None: no entry on this rank)
    flat: list[int]                                   # set entry in group order -> flat tensor index
    sharded: ShardedLayout | None                     # None: plain tensors only
    reduce: Callable[[Sequence[float]], list[float]] | None = None
    prepare: Callable[[], None] | None = None
    check_group: object = None                        # the ranks the start check compares (None: no check)
    wrapped: list[Wrapped] = field(default_factory=list)   # DTensors as virtual perturbation swaps them


def build(names: Sequence[str], tensors: Sequence[torch.Tensor], bases: Sequence[int],
          groups: Sequence[tuple[list[int], float, float, dict]], *, backend: str, exact: bool | None,
          distribution: str, model: nn.Module | object | None, fsdp: Sequence[nn.Module],
          loss_group: object, lowrank_r: int | None = None) -> Built:
    """The sets and the cross-process parts for ``tensors`` (flat order) with full-tensor ``bases`` and the
    layout's ``groups`` (flat indices, lr, weight decay, other keys). ValueError for a storage listed twice, and
    for DTensors: those of ``expand`` and ``distributed.check_owned``. ``lowrank_r``: rank-r directions for the 2-d
    tensors (``perturb.lowrank_part``); a run of a DTensor's shard then carries its full tensor's base and shape."""
    sharded = None
    if fsdp or any(_compat.is_dtensor(t) for t in tensors):
        distributed.check_owned(model, names, tensors, bool(fsdp))
        for name, t in zip(names, tensors):
            if not t.requires_grad:
                raise ValueError(f"{name}: requires_grad is False; pass only the trainable parameters")
        sharded = expand(names, tensors, bases)
        runs = sharded.runs
    else:
        runs = [[(n, t, b)] for n, t, b in zip(names, tensors, bases)]
    ptrs = [t.data_ptr() for rs in runs for _, t, _ in rs if t.numel()]
    if len(set(ptrs)) != len(ptrs):
        raise ValueError("the same storage appears twice in the parameter list: it would be perturbed twice")
    sets: list[ParamSet | None] = []
    flat: list[int] = []
    where: dict[int, list[tuple[int, int]]] = {}      # flat index -> (param_sets index, entry) of its runs
    for idx, *_ in groups:
        entries: list[Run] = [r for i in idx for r in runs[i]]
        ps = None
        if entries:
            blocks = None
            if lowrank_r is not None and sharded is not None:     # a run's place in its full tensor
                blocks = [(bases[i], tuple(tensors[i].shape)) if tensors[i].dim() == 2 else None
                          for i in idx for _ in runs[i]]
            ps = ParamSet([(n, t) for n, t, _ in entries], bases=[b for *_, b in entries], backend=backend,
                          exact_restore=exact, require_grad=sharded is None, distribution=distribution,
                          lowrank_r=lowrank_r, blocks=blocks)
            k = 0
            for i in idx:
                for _ in runs[i]:
                    where.setdefault(i, []).append((sum(s is not None for s in sets), k))
                    k += 1
        sets.append(ps)
        flat += [i for i in idx for _ in runs[i]]
    out = Built(sets, flat, sharded)
    group = distributed.loss_group_for(loss_group, sharded, fsdp)
    out.reduce = distributed.reduce_fn(group)
    out.check_group = distributed.check_group_for(loss_group, sharded)
    if sharded is not None:
        out.prepare = distributed.Prepare(fsdp, sharded.wrappers)
        for i, t in enumerate(tensors):
            if sharded.is_dtensor[i]:
                starts = [0]
                for _, r, _ in runs[i]:
                    starts.append(starts[-1] + r.numel())
                out.wrapped.append(Wrapped(t, tuple((si, ti, a) for (si, ti), a in zip(where.get(i, []), starts)),
                                           sharded.locals[i]))
    return out
