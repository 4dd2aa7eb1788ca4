"""Virtual perturbation of large tensors in slices: an embedding materialises only the rows its tokens read, a
linear layer (an LM head) its output rows a block at a time, so the transient memory stays at one slice instead
of the whole tensor (a 128k-token vocabulary's embedding is a fifth of a 1B model).

Row r of a row-major [R, C] tensor with global base b holds elements b + r*C ... b + r*C + C - 1, so a slice is
written by the same out-of-place kernel (mode OUT) with bases ``b + r*C``: every element gets exactly the value
the whole-tensor materialisation gives it. The embedding's output is therefore bit-identical; the blocked linear
layer sums each output element over the same inputs, but the matrix-multiply library may order the sum
differently for a block than for the whole matrix (equal within the dtype's rounding, not always bit for bit).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import rng
from ..perturb import ParamSet
from ..perturb.plan import _Group
from ..rng import KernelMode

__all__ = ["perturbed_rows", "sliced_forward"]


def perturbed_rows(ps: ParamSet, seed: int, offset: float, index: int, rows: torch.Tensor | range,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows ``rows`` (a range, or a 1-d int tensor of row indices) of tensor ``index`` of ``ps`` (2-d, contiguous)
    as ``round(theta + offset*z(seed))`` in ``out`` (contiguous [len(rows), C] of theta's dtype; None: a new one),
    which is returned. theta is not written. The backend is the set's for mode OUT (``ps.backend_for``, the one
    decision of ``kernels.choose``, as for ``ps.perturbed_copy``)."""
    seed = rng.check_seed(seed)
    theta = ps.tensors[index].detach()
    if theta.dim() != 2 or not theta.is_contiguous():
        raise ValueError(f"{ps.names[index]}: row slices need a contiguous 2-d tensor, got shape "
                         f"{tuple(theta.shape)}")
    cols, base = theta.shape[1], ps.bases[index]
    if isinstance(rows, range):
        r0, n = rows.start, len(rows)
        out = torch.empty(n, cols, dtype=theta.dtype, device=theta.device) if out is None else out
        if n:
            g = _Group([out.view(-1)], [base + r0 * cols], None, sources=[theta[r0:r0 + n].reshape(-1)])
            ps.backend_for(KernelMode.OUT).launch(g, seed, 1.0, float(offset), 0.0, KernelMode.OUT, ps.dist)
        return out
    idx = [int(r) for r in rows.tolist()]
    out = torch.empty(len(idx), cols, dtype=theta.dtype, device=theta.device) if out is None else out
    if idx:
        g = _Group([out[i] for i in range(len(idx))], [base + r * cols for r in idx], None,
                   sources=[theta[r] for r in idx])
        ps.backend_for(KernelMode.OUT).launch(g, seed, 1.0, float(offset), 0.0, KernelMode.OUT, ps.dist)
    return out


def sliced_forward(module: nn.Module, weight: Callable[[torch.Tensor | range], torch.Tensor],
                   done: Callable[[torch.Tensor], None], bias: Callable[[], torch.Tensor | None],
                   block_rows: int) -> Callable | None:
    """A replacement ``forward`` for ``module`` (an ``nn.Embedding`` without ``max_norm``, or an ``nn.Linear``)
    that reads its weight a slice at a time: ``weight(rows)`` gives the perturbed rows (a range, or the row
    indices an embedding reads), ``done(slice)`` is told when a slice is no longer needed, ``bias()`` gives the
    bias to add (perturbed or not, or None). None for any other module (it then materialises its weight whole)."""
    if type(module) is nn.Embedding and module.max_norm is None:
        def embedding(ids: torch.Tensor) -> torch.Tensor:
            uniq, inv = torch.unique(ids, return_inverse=True)
            rows = weight(uniq)
            out = F.embedding(inv, rows)
            done(rows)
            return out
        return embedding
    if type(module) is nn.Linear:
        n_out = module.out_features

        def linear(x: torch.Tensor) -> torch.Tensor:
            b = bias()
            out = x.new_empty(*x.shape[:-1], n_out)
            for r0 in range(0, n_out, block_rows):
                r1 = min(r0 + block_rows, n_out)
                w = weight(range(r0, r1))
                out[..., r0:r1] = F.linear(x, w, None if b is None else b[r0:r1])
                done(w)
            if b is not None and b is not module.bias:     # a perturbed bias is transient too
                done(b)
            return out
        return linear
    return None
