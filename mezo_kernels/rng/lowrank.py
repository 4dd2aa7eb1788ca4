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
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .philox import check_seed, normal

__all__ = ["uses_lowrank", "lowrank_factors", "lowrank_direction", "check_rank"]


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
    return (u.double() @ v.double().T / math.sqrt(r)).float()
