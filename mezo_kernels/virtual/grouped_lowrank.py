"""Grouped low-rank passes: one forward over G row groups, group g's weights at ``theta + offset_g * z(seed_g)`` with
low-rank directions (issue 21; ``virtual.lowrank`` is the one-group case).

Within :meth:`GroupedLowRank.active`, rows ``g*M .. (g+1)*M - 1`` of every module input are group g (group-major,
as ``train.batched_pm`` stacks them and the forward engine's row groups keep them):

- a module with a low-rank weight (``nn.Linear``, HF ``Conv1D``, ``nn.Embedding``) runs once over all rows and a
  forward hook adds group g's rank-r term to its rows of the output, ``(x_g V_j)(s_g U_j)ᵀ`` (j: g's direction;
  U, V drawn once per direction, the scale ``offset_g/sqrt(r)`` folded into U); a dense bias of such a module adds
  ``round(b + offset_g*z_b) - b`` to its rows;
- a module holding only dense tensors (norms, small matrices) runs once per group on that group's rows, each time
  with its tensors swapped for the group's materialised copy ``round(theta + offset_g*z)`` (``perturbed_copy``).

The stored weights are never written, nor their version counters bumped. The losses are those of the sequential
passes up to the rounding of the output sums.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .. import _compat
from ..perturb import ParamSet
from .grouped_lora import _sets
from .lowrank import LowRankHooks, kind_of, materialised

__all__ = ["GroupedLowRank"]


class GroupedLowRank:
    """The modules of ``model`` that own the tensors of ``param_sets`` (sets with ``lowrank_r``). ValueError naming a
    tensor no module owns, or a low-rank weight in a module kind the term is not known for (``LowRankHooks``)."""

    def __init__(self, model: nn.Module, param_sets: ParamSet | Sequence[ParamSet]) -> None:
        self.sets = _sets(param_sets)
        where = {t.data_ptr(): (si, ti) for si, ps in enumerate(self.sets) for ti, t in enumerate(ps.tensors)
                 if t.numel()}
        self.low: list[tuple[nn.Module, str, int, int, list[tuple[int, int]]]] = []   # + the module's dense bias
        self.dense: list[tuple[nn.Module, list[tuple[str, int, int]]]] = []
        found = set()
        for module in model.modules():
            own = [(n, *where[p.data_ptr()]) for n, p in module.named_parameters(recurse=False)
                   if p.numel() and p.data_ptr() in where]
            low = [e for e in own if self._is_low(e) and not materialised(module)]
            found.update((si, ti) for _, si, ti in own)
            if low:
                LowRankHooks(self.sets, [(module, low)])            # the kind checks, with their messages
                rest = [e for e in own if e not in low]
                if any(n != "bias" for n, _, _ in rest):
                    raise ValueError(f"{type(module).__name__}: besides its low-rank weight it holds trained "
                                     "tensors other than a bias; the grouped pass cannot perturb them per group")
                self.low.append((module, kind_of(module), low[0][1], low[0][2], [(si, ti) for _, si, ti in rest]))
            elif own:
                self.dense.append((module, own))
        stray = [ps.names[ti] for si, ps in enumerate(self.sets) for ti, t in enumerate(ps.tensors)
                 if t.numel() and (si, ti) not in found]
        if stray:
            raise ValueError(f"{stray[0]} is not a parameter of any module of the model: the grouped pass perturbs "
                             "tensors inside their module's forward")
        self.groups = 0
        self._perts: list = []
        self._drawn: dict = {}

    def _is_low(self, entry: tuple[str, int, int]) -> bool:
        _, si, ti = entry
        part = self.sets[si].lowrank
        return part is not None and part.covers(ti)

    # ------------------------------------------------------------------------------------------- per group
    def _factors(self, si: int, ti: int, dtype: torch.dtype, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(s_g U, V) of every group for tensor (si, ti), U drawn once per seed."""
        part, out = self.sets[si].lowrank, []
        for seed, offset in self._perts:
            if (si, seed) not in self._drawn:          # every factor of the set, one launch per seed
                self._drawn[si, seed] = part.factors_all(seed)
            u, v = self._drawn[si, seed][ti]
            out.append(((u * (offset / math.sqrt(part.r))).to(device=device, dtype=dtype),
                        v.to(device=device, dtype=dtype)))
        return out

    def _low_hook(self, kind: str, si: int, ti: int, bias: list[tuple[int, int]]):
        cache: dict = {}

        def hook(module: nn.Module, args, output):
            x, G = args[0], self.groups
            if output.shape[0] % G:
                raise RuntimeError(f"{type(module).__name__}: {output.shape[0]} rows do not split into {G} row "
                                   "groups; every forward inside the grouped pass must stack its rows group-major")
            key = (output.dtype, output.device)
            if key not in cache:
                cache[key] = self._factors(si, ti, *key)
                cache[key, "bias"] = [self._bias_delta(bias, seed, off, output.dtype) for seed, off in self._perts]
            out = output if not torch.is_grad_enabled() else output.clone()
            og, xg = out.view(G, -1, out.shape[-1]), x.reshape(G, -1, *x.shape[1:])
            for g, (u, v) in enumerate(cache[key]):
                rows = og[g]
                if kind == "embedding":
                    left, right = F.embedding(xg[g], u), v.T
                elif kind == "linear":
                    left, right = xg[g].to(out.dtype) @ v, u.T
                else:
                    left, right = xg[g].to(out.dtype) @ u, v.T
                rows.view(-1, rows.shape[-1]).addmm_(left.reshape(-1, left.shape[-1]), right)
                if cache[key, "bias"][g] is not None:
                    rows += cache[key, "bias"][g]
            return out
        return hook

    def _bias_delta(self, bias: list[tuple[int, int]], seed, offset: float, dtype) -> torch.Tensor | None:
        if not bias:
            return None
        si, ti = bias[0]
        theta = self.sets[si].tensors[ti]
        return (self.sets[si].perturbed_copy(seed, offset, ti).float() - theta.float()).to(dtype)

    def _grouped_forward(self, module: nn.Module, own: list[tuple[str, int, int]]):
        inner = module.forward
        copies = [[self.sets[si].perturbed_copy(seed, off, ti) for _, si, ti in own] for seed, off in self._perts]

        def forward(x, *args, **kwargs):
            G = self.groups
            if x.shape[0] % G:
                raise RuntimeError(f"{type(module).__name__}: {x.shape[0]} rows do not split into {G} row groups")
            outs = []
            for g, xg in enumerate(x.chunk(G)):
                saved = [_compat.swap_parameter(module, n, c) for (n, _, _), c in zip(own, copies[g])]
                try:
                    outs.append(inner(xg, *args, **kwargs))
                finally:
                    for (n, _, _), t in zip(own, saved):
                        _compat.swap_parameter(module, n, t)
            return torch.cat(outs)
        return forward

    @contextlib.contextmanager
    def active(self, perturbations: Sequence[tuple[object, float]]) -> Iterator["GroupedLowRank"]:
        """Hooks and per-group forwards on for ``len(perturbations)`` row groups (``(seed, offset)`` each; a seed may
        be a ``(seed_u, seed_v)`` pair); all undone on exit, also after an exception."""
        if not perturbations:
            raise ValueError("no perturbations: a grouped forward needs at least one row group")
        if self.groups:
            raise RuntimeError("GroupedLowRank.active does not nest")
        self._perts, self.groups = [(s, float(o)) for s, o in perturbations], len(perturbations)
        handles, installed = [], []
        try:
            for module, kind, si, ti, bias in self.low:
                handles.append(module.register_forward_hook(self._low_hook(kind, si, ti, bias)))
            for module, own in self.dense:
                if "forward" in vars(module):
                    raise RuntimeError(f"{type(module).__name__} already has its forward replaced (another wrapper)")
                module.forward = self._grouped_forward(module, own)
                installed.append(module)
            yield self
        finally:
            for h in handles:
                h.remove()
            for module in installed:
                del module.forward
            self._perts, self.groups, self._drawn = [], 0, {}
