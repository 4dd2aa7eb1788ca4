"""Out-of-place perturbation of a ``ParamSet``: theta + offset*z(seed) written into other buffers (mode OUT).

The stored weights are only read: neither their bits nor their version counters change, so a caller can run a
forward on the copy while theta stays the exact, unperturbed state. Element i of tensor t still sees
z(seed, bases[t] + i) of the set's distribution, the z of the in-place path.

``Copier`` does the work for one built set; ``ParamSet`` owns one and hands it, per call, what only the set can
decide: a checked seed and the backend chosen for mode OUT (``kernels.choose``).
"""
from __future__ import annotations

from typing import Sequence

import torch

from .. import _compat
from .plan import _Group
from ..rng import Distribution, KernelMode

__all__ = ["Copier", "check_index"]


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device:
        return False
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()


def check_index(index: int, n: int) -> int:
    """``index`` into a set of ``n`` tensors as a non-negative int (negative counts from the end)."""
    if isinstance(index, bool) or not isinstance(index, int):
        raise TypeError(f"index must be an int, got {type(index).__name__}")
    if not -n <= index < n:
        raise ValueError(f"index {index} out of range for a set of {n} tensors")
    return index % n


class Copier:
    """Mode OUT for one built set: the plans (one per tensor, one per dtype group, built on first use and pointed
    at each call's destinations) and the launches.

    Args:
        names, tensors, bases: the set's, in its order.
        groups: the set's dtype groups (their tensors and bases are the sources of a whole-set copy), with
            ``group_index[g]``, the set positions of group g's tensors.
        dist: the set's distribution.
    """

    def __init__(self, names: Sequence[str], tensors: Sequence[torch.Tensor], bases: Sequence[int],
                 groups: Sequence[_Group], group_index: Sequence[list[int]], dist: Distribution):
        self._names, self._tensors, self._bases = names, tensors, bases
        self._groups, self._group_index, self._dist = groups, group_index, dist
        self._plans: dict[int, _Group] = {}            # per tensor index, and per group (-1 - g)

    def out_for(self, index: int, out: torch.Tensor | None) -> torch.Tensor:
        """``out`` checked against tensor ``index`` (shape, dtype, device, contiguous, not overlapping it), or a new
        contiguous buffer like it when None."""
        theta, name = self._tensors[index], self._names[index]
        if out is None:
            return torch.empty_like(theta, memory_format=torch.contiguous_format)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
        if out.dtype != theta.dtype:
            raise TypeError(f"out has dtype {out.dtype}, {name} has {theta.dtype}")
        if out.shape != theta.shape:
            raise ValueError(f"out has shape {tuple(out.shape)}, {name} has {tuple(theta.shape)}")
        if out.device != theta.device:
            raise ValueError(f"out is on device {out.device}, {name} on device {theta.device}")
        if not out.is_contiguous():
            raise ValueError(f"out is not contiguous (stride {out.stride()}); the kernels write flat memory")
        if _overlaps(out, theta):
            raise ValueError(f"out overlaps {name}'s storage: theta must never be written")
        return out

    def copy(self, backend, seed: int, offset: float, index: int, out: torch.Tensor) -> None:
        """Write tensor ``index`` (non-empty) perturbed into ``out`` (from :meth:`out_for`) with ``backend``, in one
        launch; ``seed`` already checked."""
        plan = self._plans.get(index)
        if plan is None:
            plan = self._plans[index] = _Group([out.detach()], [self._bases[index]], None,
                                               sources=[self._tensors[index].detach()])
        self._launch(backend, plan, [out.detach()], seed, offset)

    def copies(self, backend, seed: int, offset: float) -> list[torch.Tensor]:
        """Every tensor perturbed, in new buffers in the set's order: one launch per dtype group (``backend``: None
        when there is no group); ``seed`` already checked."""
        outs = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in self._tensors]
        for gi, (g, idx) in enumerate(zip(self._groups, self._group_index)):
            plan = self._plans.get(-1 - gi)
            dsts = [outs[i].detach() for i in idx]
            if plan is None:
                plan = self._plans[-1 - gi] = _Group(dsts, g.bases, None, sources=g.tensors)
            self._launch(backend, plan, dsts, seed, offset)
        return outs

    def _launch(self, backend, plan: _Group, dsts: list[torch.Tensor], seed: int, offset: float) -> None:
        plan.retarget(dsts)
        try:
            backend.launch(plan, seed, 1.0, offset, 0.0, KernelMode.OUT, self._dist)
        finally:
            plan.release()
        _compat.bump_version(dsts)   # written through raw pointers, as an in-place op would
