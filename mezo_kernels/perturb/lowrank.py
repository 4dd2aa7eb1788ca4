"""The fused low-rank update of one 2-d tensor (issue 21; spec: ``docs/rng_spec.md``, "Low-rank directions").

``W <- round(fma(z, beta, alpha * W))`` with ``z = U Vᵀ / sqrt(r)`` never materialised by the kernels: U and V are
regenerated from ``(seed_u, seed_v, base)`` inside the op (r*(m + n) normals), and weight decay rides in alpha:

- :func:`lowrank_update_`: alpha = 1 - lr*wd, beta = -lr*grad (the MeZO update, weight decay fused);
- :func:`lowrank_perturb_`: alpha = 1, beta = offset (theta <- theta + offset*z; the in-place reference path);
- :func:`lowrank_axpby_`: any alpha, beta.

Arithmetic, on every backend (the reference is :func:`lowrank_update_reference`):
``z[i, j] = fp32((sum_{k=0..r-1} f64(U[i,k]) * f64(V[j,k])) / sqrt_f64(r))`` (``rng.lowrank.lowrank_product``:
exact float64 products accumulated k = 0, 1, .. in order, one division, one rounding), then
``y = fma_f32(z, beta, fp32(alpha * W))`` and one rounding to W's dtype: to nearest even, or (``rounding=
"stochastic"``, fp16/bf16) ``rng.stochastic_round`` with the SR stream of ``seed_u`` at the element's global index
``base + i*N + j``, as kernel mode AXPBY_SR. fp32 tensors are never rounded stochastically.

Agreement: given bit-identical U and V the C++ kernel equals the reference bit for bit (fp32, nearest, stochastic);
the Gaussian stream itself is bit-exact within a backend and within the spec's 1e-6 across backends, so the torch
backend (``rng.normal``) and the C++ one (its own vectorised Box-Muller) may differ by an ulp of z.

Shards: ``full_shape=(M, N)`` and ``start=(row0, col0)`` say that ``w`` is the block of rows ``[row0, row0 + m)``
and columns ``[col0, col0 + n)`` of an (M, N) tensor with base ``base``: it then gets exactly the bits of that
block of the unsharded update. Backends: ``kernels.choose_lowrank`` (CUDA, Triton and torch on a GPU; C++ and torch
on the CPU). The CUDA kernel (``csrc/cuda/lowrank.cu``) reads the device Gaussian stream, bit-identical to Triton's,
so it equals the Triton backend bit for bit and the reference given that stream.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .. import kernels, rng
from ..rng.lowrank import check_rank, fma_f32, lowrank_product, uses_lowrank

__all__ = ["lowrank_update_", "lowrank_perturb_", "lowrank_axpby_", "lowrank_update_reference",
           "lowrank_factors_block", "ROUNDINGS"]

ROUNDINGS = ("nearest", "stochastic")


def _is_dtensor(t: object) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:   # torch without distributed
        return False
    return isinstance(t, DTensor)


def _check(w: object, seed_u: object, seed_v: object, base: object, r: object, rounding: object,
           full_shape: Sequence[int] | None, start: Sequence[int]) -> tuple[int, int, int, int, tuple, tuple]:
    """Validated (seed_u, seed_v, base, r, (M, N), (row0, col0)); TypeError / ValueError naming the problem."""
    if _is_dtensor(w):
        raise TypeError("the low-rank update does not take DTensors yet: pass the local shard with full_shape= and "
                        "start= (its position in the full tensor)")
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"w must be a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in rng.DTYPE_CODES:
        raise TypeError(f"unsupported dtype {w.dtype}; expected one of {', '.join(map(str, rng.DTYPE_CODES))}")
    if w.dim() != 2:
        raise ValueError(f"the low-rank update takes 2-d tensors, got a {w.dim()}-d tensor of shape "
                         f"{tuple(w.shape)}: tensors that are not 2-d use the dense Gaussian path "
                         "(rng.lowrank.uses_lowrank is False for them)")
    if not w.is_contiguous():
        raise ValueError(f"w must be contiguous (row-major), got strides {w.stride()} for shape {tuple(w.shape)}")
    r = check_rank(r)
    seed_u, seed_v = rng.check_seed(seed_u), rng.check_seed(seed_v)
    if isinstance(base, bool) or not isinstance(base, int) or base < 0:
        raise ValueError(f"base must be an int >= 0, got {base!r}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {', '.join(ROUNDINGS)}, got {rounding!r}")
    m, n = (int(d) for d in w.shape)
    full = (m, n) if full_shape is None else tuple(int(d) for d in full_shape)
    st = tuple(int(d) for d in start)
    if len(full) != 2 or len(st) != 2:
        raise ValueError(f"full_shape and start must be pairs, got {full_shape!r} and {start!r}")
    if m < 1 or n < 1 or min(st) < 0 or st[0] + m > full[0] or st[1] + n > full[1]:
        raise ValueError(f"the block {tuple(w.shape)} at {st} is not inside the tensor {full} (empty tensors have "
                         "nothing to update)")
    if not uses_lowrank(full, r):
        raise ValueError(f"a tensor of shape {full} with lowrank_r={r} has r*(m + n) >= m*n: it uses the dense "
                         "Gaussian path (rng.lowrank.uses_lowrank), not the low-rank update")
    if base + full[0] * full[1] > 2**62:
        raise ValueError(f"base + numel must be <= 2**62, got base={base} for shape {full}")
    return seed_u, seed_v, base, r, full, st


def lowrank_factors_block(seed_u: int, seed_v: int, base: int, r: int, full_shape: Sequence[int],
                          start: Sequence[int], shape: Sequence[int], device=None,
                          normal=rng.normal) -> tuple[torch.Tensor, torch.Tensor]:
    """(U rows [row0, row0 + m), V rows [col0, col0 + n)) of the (M, N) tensor, float32 [m, r] and [n, r], from
    ``normal(seed, g0, count, device)`` (the spec's ``rng.normal`` by default; tests pass a backend's stream)."""
    (M, _), (row0, col0), (m, n) = full_shape, start, shape
    u = normal(seed_u, base + row0 * r, m * r, device).view(m, r)
    v = normal(seed_v, base + M * r + col0 * r, n * r, device).view(n, r)
    return u, v


def lowrank_update_reference(w: torch.Tensor, u: torch.Tensor, v: torch.Tensor, alpha: float, beta: float,
                             rounding: str = "nearest", seed_u: int = 0, base: int = 0,
                             full_shape: Sequence[int] | None = None, start: Sequence[int] = (0, 0)) -> torch.Tensor:
    """The update's result (a new tensor of w's dtype and shape) for given factors ``u`` [m, r], ``v`` [n, r]: the
    spec's order, written out (``lowrank_product``, a true fp32 fma, one rounding). Stochastic rounding reads the SR
    stream of ``seed_u`` at ``base + (row0 + i)*N + col0 + j``."""
    m, n = w.shape
    N = n if full_shape is None else int(full_shape[1])
    row0, col0 = (int(s) for s in start)
    z = lowrank_product(u, v)
    ax = w.float() * torch.tensor(alpha, dtype=torch.float32).to(w.device)
    y = fma_f32(z, beta, ax)
    if rounding == "nearest" or w.dtype == torch.float32:
        return y.to(w.dtype)
    g_row0 = base + row0 * N + col0
    if n == N:      # the block's elements are one contiguous range of global indices
        return rng.stochastic_round(y, w.dtype, seed_u, g_row0)
    return torch.stack([rng.stochastic_round(y[i], w.dtype, seed_u, g_row0 + i * N) for i in range(m)])


def _torch_launch(w, seed_u, seed_v, base, r, alpha, beta, stochastic, full, start) -> None:
    u, v = lowrank_factors_block(seed_u, seed_v, base, r, full, start, w.shape, w.device)
    w.copy_(lowrank_update_reference(w, u, v, alpha, beta, "stochastic" if stochastic else "nearest", seed_u, base,
                                     full, start))


def _cpu_launch(w, seed_u, seed_v, base, r, alpha, beta, stochastic, full, start) -> None:
    C = kernels._REGISTRY["cpu"].module()
    C.lowrank_update(w.data_ptr(), w.shape[0], w.shape[1], start[0], start[1], full[0], full[1], r, base,
                     int(rng.DTYPE_CODES[w.dtype]), bool(stochastic), seed_u, seed_v, float(alpha), float(beta))


def _cuda_launch(w, seed_u, seed_v, base, r, alpha, beta, stochastic, full, start) -> None:
    """Asynchronous on the current stream of w's device; the factor scratch (r*(m + n) float64, padded to the
    kernel's tiles) comes from torch's caching allocator, whose stream order keeps it alive for the launch."""
    C = kernels._REGISTRY["cuda"].module()
    m, n = w.shape
    with torch.cuda.device(w.device):
        scratch = torch.empty(C.lowrank_scratch(m, n, r), dtype=torch.float64, device=w.device)
        C.lowrank_update(w.data_ptr(), m, n, start[0], start[1], full[0], full[1], r, base,
                         int(rng.DTYPE_CODES[w.dtype]), bool(stochastic), seed_u, seed_v, float(alpha), float(beta),
                         scratch.data_ptr(), scratch.numel(), torch.cuda.current_stream(w.device).cuda_stream)


def _triton_launch(w, seed_u, seed_v, base, r, alpha, beta, stochastic, full, start) -> None:
    import mezo_kernels.triton as tr
    if w.device.type == "cuda":
        with torch.cuda.device(w.device):
            tr.lowrank_update(w, seed_u, seed_v, base, r, alpha, beta, stochastic, full, start)
    else:
        tr.lowrank_update(w, seed_u, seed_v, base, r, alpha, beta, stochastic, full, start)


_LAUNCH = {"torch": _torch_launch, "cpu": _cpu_launch, "cuda": _cuda_launch, "triton": _triton_launch}


def lowrank_axpby_(w: torch.Tensor, seed_u: int, seed_v: int, base: int, r: int, alpha: float, beta: float,
                   rounding: str = "nearest", backend: str = "auto", *, full_shape: Sequence[int] | None = None,
                   start: Sequence[int] = (0, 0)) -> torch.Tensor:
    """``w <- round(fma(U Vᵀ/√r, beta, alpha*w))`` in place (module docstring); returns ``w``."""
    seed_u, seed_v, base, r, full, st = _check(w, seed_u, seed_v, base, r, rounding, full_shape, start)
    alpha, beta = float(alpha), float(beta)
    if not (math.isfinite(alpha) and math.isfinite(beta)):
        raise ValueError(f"alpha and beta must be finite, got {alpha}, {beta}")
    name = kernels.choose_lowrank(backend, w.device)
    stochastic = rounding == "stochastic" and w.dtype != torch.float32
    with torch.no_grad():
        _LAUNCH[name](w, seed_u, seed_v, base, r, alpha, beta, stochastic, full, st)
    return w


def lowrank_update_(w: torch.Tensor, seed_u: int, seed_v: int, base: int, r: int, lr: float, grad: float,
                    weight_decay: float = 0.0, rounding: str = "nearest", backend: str = "auto", *,
                    full_shape: Sequence[int] | None = None, start: Sequence[int] = (0, 0)) -> torch.Tensor:
    """The MeZO update ``w <- (1 - lr*wd) w - lr*grad*z`` of one 2-d tensor in one pass: alpha = 1 - lr*wd,
    beta = -lr*grad (computed in float64, rounded once to fp32 by the kernel). Returns ``w``."""
    for name, val in (("lr", lr), ("grad", grad), ("weight_decay", weight_decay)):
        if isinstance(val, bool) or not isinstance(val, (int, float)) or not math.isfinite(val):
            raise TypeError(f"{name} must be a finite float, got {val!r}")
    return lowrank_axpby_(w, seed_u, seed_v, base, r, 1.0 - lr * weight_decay, -lr * grad, rounding, backend,
                          full_shape=full_shape, start=start)


def lowrank_perturb_(w: torch.Tensor, seed_u: int, seed_v: int, base: int, r: int, offset: float,
                     rounding: str = "nearest", backend: str = "auto", *, full_shape: Sequence[int] | None = None,
                     start: Sequence[int] = (0, 0)) -> torch.Tensor:
    """``w <- w + offset*z`` (alpha = 1, beta = offset): the in-place perturbation, the reference path of the
    forward-side application. Returns ``w``."""
    if isinstance(offset, bool) or not isinstance(offset, (int, float)) or not math.isfinite(offset):
        raise TypeError(f"offset must be a finite float, got {offset!r}")
    return lowrank_axpby_(w, seed_u, seed_v, base, r, 1.0, offset, rounding, backend, full_shape=full_shape,
                          start=start)
