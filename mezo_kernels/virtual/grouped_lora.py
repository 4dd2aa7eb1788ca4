"""Grouped LoRA deltas: one forward over G row groups, group g's adapters perturbed by its own ``(seed, offset)``.

Within :meth:`GroupedLoRA.active`, every peft LoRA ``Linear`` whose adapter weights are in the perturbed sets runs
its frozen base projection once over all rows, and a forward hook adds, for group g (rows ``g*M .. (g+1)*M - 1``
of the layer's input, group-major),

    delta_g = scaling * (x_g @ A_g^T) @ B_g^T,   A_g = round(A + offset_g * z_A(seed_g)), likewise B_g,

as two batched matmuls over the [G, ...] stacks of the perturbed adapters. The stacks are materialised once per
call by the kernels (``ParamSet.perturbed_copies``, mode OUT: the z of the in-place path, theta only read). The
stored adapter weights are never written, nor their version counters bumped.

Why a hook of our own rather than peft's mixed-batch forward (``adapter_names=``, ``_mixed_batch_forward``):
- peft loops over the adapters in Python, gathering each one's rows with fancy indexing and scattering the result
  back: 2n gathers, 2n pairs of small matmuls and 2n scatters per LoRA layer, where a bmm does one launch;
- it would need 2n registered adapters: ``add_adapter`` creates modules and parameters, which changes
  ``named_parameters`` (the canonical order the seed layout follows) and the requires_grad flags the forward
  engine reads to find the first trainable layer;
- ``adapter_names`` reaches the layers through pre-hooks that ``PeftModel.forward`` registers for the time of its
  own call; the forward engine calls the projections itself, layer by layer, so the names would never arrive.
Skipping peft's own delta needs one private flag, set and restored in ``_compat.lora_delta_off``.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import nn

from .. import _compat
from ..perturb import ParamSet

__all__ = ["GroupedLoRA"]

_Loc = tuple[int, int]          # (set index, tensor index) of a perturbed tensor


def _sets(param_sets: ParamSet | Sequence[ParamSet]) -> list[ParamSet]:
    sets = [param_sets] if isinstance(param_sets, ParamSet) else list(param_sets)
    if not sets or not all(isinstance(ps, ParamSet) for ps in sets):
        raise TypeError("param_sets must be a ParamSet or a non-empty sequence of them")
    return sets


class GroupedLoRA:
    """The LoRA layers of ``model`` whose adapters are in ``param_sets`` (every tensor of the sets must be such an
    adapter weight, requiring grad, so that the forward engine's frozen layers hold none of them).

    ``active(perturbations)``: a context in which each forward's rows are ``len(perturbations)`` row groups, group
    g's adapters being ``theta + offset_g * z(seed_g)`` (see the module docstring)."""

    def __init__(self, model: nn.Module, param_sets: ParamSet | Sequence[ParamSet]) -> None:
        self.sets = _sets(param_sets)
        where: dict[tuple[int, tuple], _Loc] = {}
        for si, ps in enumerate(self.sets):
            for ti, t in enumerate(ps.tensors):
                where[(t.data_ptr(), tuple(t.shape))] = (si, ti)
        self.layers: list[tuple[str, nn.Module, list[tuple[_compat.LoraAdapter, _Loc | None, _Loc | None]]]] = []
        covered: set[_Loc] = set()
        for name, mod in model.named_modules():
            adapters = _compat.lora_adapters(mod)
            entries = []
            for ad in adapters or ():
                la = where.get((ad.A.data_ptr(), tuple(ad.A.shape)))
                lb = where.get((ad.B.data_ptr(), tuple(ad.B.shape)))
                if la is None and lb is None:
                    continue                      # not perturbed: peft's own delta is the same for every group
                if ad.dropout.training and getattr(ad.dropout, "p", 0.0):
                    raise ValueError(f"{name}: LoRA dropout is active (training mode); the ± losses need the same "
                                     "function in every group: call model.eval()")
                entries.append((ad, la, lb))
                covered.update(x for x in (la, lb) if x is not None)
            if entries:
                if len(entries) != len(adapters):
                    raise ValueError(f"{name}: some active adapters are perturbed and some are not; put all or none "
                                     "of a layer's active adapters in the set")
                self.layers.append((name, mod, entries))
        stray = [ps.names[ti] for si, ps in enumerate(self.sets) for ti in range(len(ps.tensors))
                 if (si, ti) not in covered and ps.tensors[ti].numel()]
        if stray:
            more = f" and {len(stray) - 3} more" if len(stray) > 3 else ""
            raise ValueError(f"the batched ± pass perturbs LoRA adapter weights only; {', '.join(stray[:3])}{more} "
                             "are not lora_A/lora_B weights of an active peft LoRA Linear")
        frozen = [name for ps in self.sets for name, t in zip(ps.names, ps.tensors) if not t.requires_grad]
        if frozen:
            raise ValueError(f"{frozen[0]}: requires_grad is False; the forward engine would take its layer for "
                             "frozen and run it once for all row groups")
        self._stacks: dict[int, list[tuple[torch.Tensor, torch.Tensor, float]]] = {}
        self.groups = 0

    def _materialise(self, perturbations: Sequence[tuple[int, float]]) -> None:
        """[G, r, in] and [G, out, r] stacks of every hooked adapter, group g perturbed by perturbations[g]."""
        G = len(perturbations)
        copies = [[ps.perturbed_copies(seed, off) for ps in self.sets] for seed, off in perturbations]

        def stack(t: torch.Tensor, loc: _Loc | None) -> torch.Tensor:
            if loc is None:                       # a frozen half of a perturbed adapter: the same in every group
                return t.detach().unsqueeze(0).expand(G, *t.shape)
            return torch.stack([c[loc[0]][loc[1]] for c in copies])

        self._stacks = {li: [(stack(ad.A, la), stack(ad.B, lb), ad.scaling) for ad, la, lb in entries]
                        for li, (_, _, entries) in enumerate(self.layers)}

    def _hook(self, li: int):
        name = self.layers[li][0]

        def hook(module: nn.Module, args: tuple, kwargs: dict, out: torch.Tensor) -> torch.Tensor:
            x = args[0] if args else kwargs["x"]
            G = self.groups
            if x.shape[0] % G:
                raise RuntimeError(f"{name}: {x.shape[0]} input rows do not split into {G} row groups; every "
                                   "forward inside the batched ± pass must stack its rows group-major")
            xg = x.reshape(G, -1, x.shape[-1])
            for A, B, scaling in self._stacks[li]:
                d = torch.bmm(torch.bmm(xg.to(A.dtype), A.transpose(1, 2)), B.transpose(1, 2)) * scaling
                out = out + d.reshape(out.shape).to(out.dtype)
            return out

        return hook

    @contextlib.contextmanager
    def active(self, perturbations: Sequence[tuple[int, float]]) -> Iterator["GroupedLoRA"]:
        """Hooks on, peft's own deltas off, for ``len(perturbations)`` row groups; all undone on exit, also after
        an exception. perturbations: ``(seed, offset)`` per group."""
        if not perturbations:
            raise ValueError("no perturbations: a grouped forward needs at least one row group")
        if self.groups:
            raise RuntimeError("GroupedLoRA.active does not nest")
        self._materialise(perturbations)
        self.groups = len(perturbations)
        handles = []
        try:
            with _compat.lora_delta_off([mod for _, mod, _ in self.layers]):
                for li, (_, mod, _) in enumerate(self.layers):
                    handles.append(mod.register_forward_hook(self._hook(li), with_kwargs=True))
                yield self
        finally:
            for h in handles:
                h.remove()
            self._stacks, self.groups = {}, 0
