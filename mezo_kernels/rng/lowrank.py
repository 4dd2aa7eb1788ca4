"""Low-rank directions (``docs/rng_spec.md``, "Low-rank directions"): the reference in pure PyTorch.

A 2-d weight of shape (m, n) with global base b gets ``z = U Vᵀ / sqrt(r)`` instead of m*n independent Gaussians,
with U (m x r) and V (n x r) read from the spec's Gaussian stream:

- ``U[i, k] = normal(seed_u, b + i*r + k)``: rows of U are contiguous, so a ``Shard(0)`` rank reads only its rows;
- ``V[j, k] = normal(seed_v, b + m*r + j*r + k)``: the same for V and a ``Shard(1)`` rank.

The factors occupy ``[b, b + r*(m + n))``, inside the tensor's own dense range ``[b, b + m*n)`` (the rule below
guarantees ``r*(m + n) < m*n``), so they never overlap another tensor's indices. ``seed_u == seed_v`` is the plain
mode; LoZO's lazy V keeps ``seed_v`` for several steps while ``seed_u`` changes every step. The entries of z have
mean 0 and variance 1, as dense Gaussian entries do.

Tensors that are not 2-d (norms, biases) and 2-d tensors where ``r*(m + n) >= m*n`` keep the dense Gaussian
``normal(seed_u, b + i)``: the factors would cost as much as the tensor.

Summation order (what every backend computes, so a backend given bit-identical U and V lands on the same bits):
``z[i, j] = fp32( (sum_{k=0..r-1} f64(U[i,k]) * f64(V[j,k])) / sqrt_f64(r) )`` -- each product is exact in float64
(24 + 24 bits), the sum is accumulated in float64 in the order k = 0, 1, .., r - 1 (acc = p_0, acc = acc + p_1,
...), divided once by the correctly rounded float64 sqrt(r), and rounded once to float32 (:func:`lowrank_product`).
The fused update then is ``W <- round(fma_f32(z, beta, fp32(alpha * W)))`` (:func:`fma_f32`: a true fp32 fma).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .philox import check_seed, normal

__all__ = ["uses_lowrank", "lowrank_factors", "lowrank_direction", "lowrank_product", "check_rank", "fma_f32"]

_ROWS_ELEMS = 1 << 20                      # elements per row slab in lowrank_product: bounds the float64 temporary


def check_rank(r: object) -> int:
    """``r`` as an int >= 1 (TypeError / ValueError naming ``lowrank_r`` otherwise)."""
    if isinstance(r, bool) or not isinstance(r, int):
        raise TypeError(f"lowrank_r must be an int >= 1, got {type(r).__name__}")
    if r < 1:
        raise ValueError(f"lowrank_r must be >= 1, got {r}")
    return r


def uses_lowrank(shape: Sequence[int], r: int) -> bool:
    """Whether a tensor of ``shape`` gets a rank-``r`` direction (2-d and ``r*(m + n) < m*n``), else dense."""
    r = check_rank(r)
    if len(shape) != 2:
        return False
    m, n = int(shape[0]), int(shape[1])
    return r * (m + n) < m * n


def lowrank_factors(seed_u: int, seed_v: int, base: int, m: int, n: int, r: int,
                    device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, V)``: float32 tensors of shapes ``[m, r]`` and ``[n, r]`` of the weight with base ``base``."""
    seed_u, seed_v, r = check_seed(seed_u), check_seed(seed_v), check_rank(r)
    if isinstance(base, bool) or not isinstance(base, int) or base < 0:
        raise ValueError(f"base must be an int >= 0, got {base!r}")
    if m < 1 or n < 1:
        raise ValueError(f"a low-rank direction needs m, n >= 1, got ({m}, {n})")
    u = normal(seed_u, base, m * r, device).view(m, r)
    v = normal(seed_v, base + m * r, n * r, device).view(n, r)
    return u, v


def lowrank_direction(seed_u: int, seed_v: int, base: int, shape: Sequence[int], r: int,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """z of a tensor of ``shape`` (float32, that shape): ``U Vᵀ / sqrt(r)`` where :func:`uses_lowrank`, else the
    dense Gaussian stream at ``seed_u``. The product is taken in float64 and rounded once to float32, so every
    backend that sums the r terms in float64 (or exactly) lands on these values."""
    shape = tuple(int(d) for d in shape)
    if not uses_lowrank(shape, r):
        return normal(seed_u, base, math.prod(shape), device).view(shape)
    u, v = lowrank_factors(seed_u, seed_v, base, shape[0], shape[1], r, device)
    return lowrank_product(u, v)


def lowrank_product(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``U Vᵀ / sqrt(r)`` (float32 [m, n]) from float32 factors ``u`` [m, r] and ``v`` [n, r], in the spec's order:
    float64 products (exact), accumulated k = 0 .. r-1, one float64 division by ``sqrt(r)``, one rounding to fp32.

    The order is written out (no BLAS, whose blocking may reorder the sum), so the C++ and Triton kernels, which
    follow it, match these bits exactly when given the same U and V."""
    if u.dim() != 2 or v.dim() != 2 or u.shape[1] != v.shape[1]:
        raise ValueError(f"factors must be [m, r] and [n, r], got {tuple(u.shape)} and {tuple(v.shape)}")
    m, r = u.shape
    sqrt_r = math.sqrt(r)                  # correctly rounded (IEEE sqrt), as std::sqrt / sqrt.rn.f64
    vt = v.double().T                      # [r, n]
    out = torch.empty(m, v.shape[0], dtype=torch.float32, device=u.device)
    step = max(1, _ROWS_ELEMS // max(1, v.shape[0]))
    for lo in range(0, m, step):
        ud = u[lo:lo + step].double()
        acc = ud[:, 0:1] * vt[0]
        for k in range(1, r):
            acc = acc + ud[:, k:k + 1] * vt[k]
        out[lo:lo + step] = (acc / sqrt_r).float()
    return out


def fma_f32(a: torch.Tensor, b: torch.Tensor | float, c: torch.Tensor) -> torch.Tensor:
    """``fma(a, b, c)`` on float32 values, correctly rounded once (a true fp32 fused multiply-add), as float32.

    ``a*b`` is exact in float64; ``s = a*b + c`` in float64 plus its exact error (TwoSum) gives the sum rounded to
    odd, whose rounding to float32 is the correctly rounded sum (53 >= 24 + 2 bits). ``b`` is rounded to fp32
    first when a Python float. Unlike ``rng.fma_update`` no double-rounding tie is left: bit-exact with std::fma."""
    a64 = a.float().double()
    b64 = torch.tensor(b, dtype=torch.float32) if not isinstance(b, torch.Tensor) else b.float()
    p = a64 * b64.to(a64.device).double()
    c64 = c.float().double()
    s = p + c64
    bb = s - p
    err = (p - (s - bb)) + (c64 - bb)
    odd = (s.view(torch.int64) & 1) == 1
    toward = torch.nextafter(s, torch.where(err > 0, math.inf, -math.inf).to(s.dtype))
    fix = torch.isfinite(s) & (err != 0) & ~odd
    return torch.where(fix, toward, s).float()
