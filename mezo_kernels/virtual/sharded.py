"""Virtual perturbation of a parameter that its module holds as a wrapper over a local tensor (a tensor-parallel
DTensor): the wrapper's local tensor is cut into runs that are ``ParamSet`` entries (``optim.dtensor``), so the
perturbed local tensor is written run by run (mode OUT, each run with its global base, hence the single-process z)
into one transient buffer, and the module sees a new wrapper over that buffer for the length of its forward.

This serves a parallel style whose module forward reads the parameter itself (``parallelize_module``'s
``ColwiseParallel``/``RowwiseParallel``); FSDP2 all-gathers outside the module's hooks and is refused by ``MeZO``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .. import _compat
from ..perturb import ParamSet

__all__ = ["Wrapped", "materialise"]


@dataclass(frozen=True)
class Wrapped:
    """``param``: the wrapper as the module holds it (a DTensor); ``runs``: ``(set, index in the set, start in the
    local flat tensor)`` of each run; ``local``: the plain local tensor (shape, dtype, device)."""

    param: torch.Tensor
    runs: tuple[tuple[int, int, int], ...]
    local: torch.Tensor

    def nbytes(self) -> int:
        return self.local.numel() * self.local.element_size()


def materialise(sets: Sequence[ParamSet], w: Wrapped, seed: int, offset: float, buf: torch.Tensor) -> torch.Tensor:
    """``buf`` (contiguous, the local tensor's shape and dtype) filled with ``round(theta + offset*z(seed))`` run by
    run, wrapped like ``w.param``."""
    flat = buf.view(-1)
    for si, ti, a in w.runs:
        t = sets[si].tensors[ti]
        sets[si].perturbed_copy(seed, offset, ti, out=flat[a:a + t.numel()].view(t.shape))
    return _compat.dtensor_from_local(buf, w.param)
