"""Out-of-place perturbation of a ``ParamSet``: theta + offset*z(seed) written into other buffers (mode OUT).

The stored weights are only read: neither their bits nor their version counters change, so a caller can run a
forward on the copy while theta stays the exact, unperturbed state. Element i of tensor t still sees
z(seed, bases[t] + i) of the set's distribution, the z of the in-place path.
"""
from __future__ import annotations

import torch

from .. import _compat
from .. import rng
from .plan import _Group
from ..rng import KernelMode

__all__ = ["CopyMixin"]


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device:
        return False
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()


class CopyMixin:
    """``perturbed_copy`` / ``perturbed_copies`` of ``ParamSet`` (which provides the state used here)."""

    def _check_copy(self, seed: int, index: int | None = None) -> int:
        # one tensor's copy reads only that tensor: when its storage is the one the tables know, the scan of every
        # tensor's storage (a rebuild check, O(tensors) per call and so O(tensors^2) per virtual forward) can wait
        # for a call that reads the others
        if index is not None and self._tensors[index].data_ptr() == self._ptrs[index]:
            seed = rng.check_seed(seed)
        else:
            seed = self._prepare(seed)
        if self._active is not None:
            raise RuntimeError(f"the weights are perturbed in place by seed {self._active[0]}: restore_() before "
                               "taking perturbed copies of theta")
        return seed

    def _launch_out(self, plan: _Group, dsts: list[torch.Tensor], seed: int, offset: float) -> None:
        plan.retarget(dsts)
        try:
            self._backend_for(KernelMode.OUT).launch(plan, seed, 1.0, offset, 0.0, KernelMode.OUT, self._dist)
        finally:
            plan.release()
        _compat.bump_version(dsts)   # written through raw pointers, as an in-place op would
        self.launches += 1

    def perturbed_copy(self, seed: int, offset: float, index: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Tensor ``index`` (in ``tensors`` order) as ``round(theta + offset*z(seed))``, in one launch of mode OUT.

        ``out``: a contiguous tensor of theta's shape, dtype and device, not overlapping theta, or None for a new
        one. Returns ``out``. theta is never written and its version counter is not bumped. Refused (RuntimeError)
        while the set is perturbed in place."""
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(f"index must be an int, got {type(index).__name__}")
        if not -len(self._tensors) <= index < len(self._tensors):
            raise ValueError(f"index {index} out of range for a set of {len(self._tensors)} tensors")
        index %= len(self._tensors)
        seed = self._check_copy(seed, index)
        theta = self._tensors[index]
        name = self.names[index]
        if out is None:
            out = torch.empty_like(theta, memory_format=torch.contiguous_format)
        else:
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
        if theta.numel() == 0:
            return out
        plan = self._copy_plans.get(index)
        if plan is None:
            plan = self._copy_plans[index] = _Group([out.detach()], [self.bases[index]], None,
                                                    sources=[theta.detach()])
        self._launch_out(plan, [out.detach()], seed, float(offset))
        return out

    def perturbed_copies(self, seed: int, offset: float) -> list[torch.Tensor]:
        """Every tensor as ``round(theta + offset*z(seed))`` in new buffers, one launch per dtype group.

        Returns tensors in ``tensors`` order, each of its theta's shape and dtype. theta is never written."""
        seed = self._check_copy(seed)
        outs = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in self._tensors]
        for gi, (g, idx) in enumerate(zip(self._groups, self._group_index)):
            plan = self._copy_plans.get(-1 - gi)
            dsts = [outs[i].detach() for i in idx]
            if plan is None:
                plan = self._copy_plans[-1 - gi] = _Group(dsts, g.bases, None, sources=g.tensors)
            self._launch_out(plan, dsts, seed, float(offset))
        return outs
