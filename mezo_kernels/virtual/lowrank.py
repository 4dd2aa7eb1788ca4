"""Low-rank directions applied inside the matmul (issue 21): the +/-eps passes never form ``z = U Vᵀ/sqrt(r)``.

For a weight W of shape (m, n) whose set draws rank-r directions (``perturb.lowrank_part``), a module's output at
``W + s*z`` is its output at W plus a rank-r term, so the stored weight is neither written nor copied:

- ``nn.Linear`` (``y = x Wᵀ + b``, W is (out, in)): ``y += (x V) (s/sqrt(r) U)ᵀ``;
- HF ``Conv1D`` (``y = x W + b``, W is (in, out)): ``y += (x U) (s/sqrt(r) V)ᵀ``;
- ``nn.Embedding`` (``y = W[ids]``, W is (vocab, dim)): ``y += (s/sqrt(r) U)[ids] Vᵀ``.

A tied weight (an embedding and an LM head over one storage) is one tensor of the set, hence one (U, V) seen by
both uses. U and V are drawn once per ``perturbed`` block (r*(m + n) normals per weight, cast to the output's dtype)
and reused by every forward inside it (micro-batches, the engine's runs). Any other module kind holding a low-rank
2-d parameter is refused at construction: the rank-r term of its forward is unknown here.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ..perturb import ParamSet

__all__ = ["LowRankHooks", "kind_of", "materialised"]


def materialised(module: nn.Module) -> bool:
    """An ``nn.Embedding`` subclass with a forward of its own (OPT's learned positions take the attention mask, not
    the ids): its input is not the rows it reads, so its weight is materialised as ``round(theta + s*U Vᵀ/sqrt(r))``
    (``perturbed_copy``, the same z) like a dense tensor; positional tables are small."""
    return isinstance(module, nn.Embedding) and type(module).forward is not nn.Embedding.forward


def kind_of(module: nn.Module) -> str | None:
    """``"linear"``, ``"conv1d"`` or ``"embedding"`` for the module kinds the forward-side term covers, else None."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding) and not materialised(module):
        return "embedding"
    # transformers.pytorch_utils.Conv1D (GPT-2), matched by shape of its API: this layer imports no transformers
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx"):
        return "conv1d"
    return None


class LowRankHooks:
    """The forward-side low-rank terms of ``owners`` (``[(module, [(param name, set, index)])]``, the entries whose
    set has low-rank factors for them) over ``param_sets``. ValueError at construction naming a module kind it does
    not cover, an embedding with ``max_norm`` (its forward rewrites the weight) or a low-rank tensor held under
    another name than ``weight``."""

    def __init__(self, param_sets: Sequence[ParamSet], owners: Sequence[tuple[nn.Module, list[tuple[str, int, int]]]]):
        self.param_sets = list(param_sets)
        self._owners: list[tuple[nn.Module, str, int, int]] = []
        for module, own in owners:
            kind = kind_of(module)
            for name, si, ti in own:
                pname = self.param_sets[si].names[ti]
                if kind is None:
                    raise ValueError(
                        f"{type(module).__name__}.{name} ({pname}) gets a low-rank direction, but the forward-side "
                        f"term is known only for nn.Linear, nn.Embedding and HF Conv1D (an nn.Embedding subclass is materialised); exclude it from the trained "
                        "parameters, use perturb='inplace' (which materialises z), or distribution='gaussian'")
                if name != "weight":
                    raise ValueError(f"{type(module).__name__}.{name} ({pname}): only a module's 'weight' takes the "
                                     "forward-side low-rank term")
                if kind == "embedding" and module.max_norm is not None:
                    raise ValueError(f"{type(module).__name__} ({pname}) has max_norm: its forward renormalises the "
                                     "stored rows, which a perturbation never written cannot follow; use "
                                     "perturb='inplace'")
                self._owners.append((module, kind, si, ti))
        self._factors: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._active: tuple[object, float] | None = None

    @property
    def modules(self) -> list[nn.Module]:
        return [m for m, *_ in self._owners]

    def covered(self) -> set[tuple[int, int]]:
        """(set, index) of every tensor these hooks perturb."""
        return {(si, ti) for _, _, si, ti in self._owners}

    def install(self, seed: object, offset: float, reached: set) -> list:
        """Register the hooks for one block (``perturbed``); returns their handles. The factors of the last block
        are dropped; each hook adds its (set, index) to ``reached`` when it runs."""
        self._factors.clear()
        self._active = (seed, float(offset))
        self._reached = reached
        return [m.register_forward_hook(self._hook(kind, si, ti)) for m, kind, si, ti in self._owners]

    def clear(self) -> None:
        self._factors.clear()
        self._active = None

    def _uv(self, si: int, ti: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(s/sqrt(r) U, V) of tensor (si, ti) in ``dtype``: U is [m, r], V [n, r] for W of shape (m, n)."""
        key = (si, ti, dtype, device)
        got = self._factors.get(key)
        if got is None:
            seed, offset = self._active
            part = self.param_sets[si].lowrank
            if si not in self._factors:            # every factor of the set, one launch per block
                self._factors[si] = part.factors_all(seed)
            u, v = self._factors[si][ti]
            u = u.to(device) * (offset / math.sqrt(part.r))       # the scale folded into U once, in fp32
            got = self._factors[key] = (u.to(dtype), v.to(device=device, dtype=dtype))
        return got

    def _hook(self, kind: str, si: int, ti: int):
        def add_term(module: nn.Module, args, output):
            if self._active is None or not isinstance(output, torch.Tensor):
                return None
            x = args[0] if args else None
            self._reached.add((si, ti))
            u, v = self._uv(si, ti, output.dtype, output.device)
            if kind == "embedding":
                left, right = F.embedding(x, u), v.T       # [.., r] rows of sU, then Vᵀ
            elif kind == "linear":                         # W (out, in): x V -> [.., r], then (sU)ᵀ -> [.., out]
                left, right = x.to(output.dtype) @ v, u.T
            else:                                          # Conv1D: W (in, out), U indexes its rows (inputs)
                left, right = x.to(output.dtype) @ u, v.T
            # in place when nothing can need the output unchanged (no autograd): an LM head's logits are the
            # largest activation of a forward, and an out-of-place sum would hold two more copies of them
            if not torch.is_grad_enabled() and output.is_contiguous():
                out2 = output.view(-1, output.shape[-1])
                out2.addmm_(left.reshape(-1, left.shape[-1]), right)
                return None
            return output + left @ right
        return add_term
