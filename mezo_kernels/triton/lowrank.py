"""Triton: the fused low-rank update of one 2-d tensor (``docs/rng_spec.md``, "Low-rank directions").

Two launches: ``_normals_kernel`` writes the factors U (local rows) and V (local columns) from the spec's Gaussian
stream into fp32 scratch (r*(m + n) values, the per-element path ``randn_at``, so any base works), then
``_lowrank_kernel`` computes, per [BM, BN] tile, ``z = fp32((sum_k f64(U[i,k]) f64(V[j,k])) / sqrt_f64(r))``
(float64, k = 0..r-1 in order; the products are exact, so a contracted fma gives the same bits) and
``W = round(fma(z, beta, alpha * W))``, to nearest or stochastically with the SR bits of ``seed_u`` at the element's
global index ``base + (row0 + i)*N + col0 + j`` (one Philox call per element here: simple, to be tuned with the GPU
codegen checks). Semantics as ``csrc/cpu/lowrank.h``; reference ``mezo_kernels.perturb.lowrank``.

The Gaussian values are the Triton stream's (bit-exact with the CUDA kernel per the spec, within 1e-6 of the CPU's),
so this backend is compared with the reference within a tolerance, as the axpby kernel is.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import rng
from .philox import _words, randn_at, signed_words
from .rounding import round_nearest, sround

__all__ = ["lowrank_update", "normals", "BLOCK_M", "BLOCK_N"]

BLOCK_M = 32
BLOCK_N = 64
_NORMALS_BLOCK = 256
_MASK32 = 0xFFFFFFFF
_FLOAT32 = tl.constexpr(int(rng.DTypeCode.FLOAT32))
_SR_GROUP = tl.constexpr(rng.SR_GROUP)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "g0", "n"])
def _normals_kernel(out_ptr, seed_lo, seed_hi, g0, n, BLOCK: tl.constexpr):
    """out: fp32 [n]; out[e] = z(seed, g0 + e) for any int64 g0 >= 0."""
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    z = randn_at(g0.to(tl.int64) + e, seed_lo, seed_hi)
    tl.store(out_ptr + e, z, mask=e < n)


@triton.jit
def _sr_bits_at(g, sr_lo, sr_hi):
    """uint32: the 16 SR bits of int64 global indices g (any shape): counter g >> 3, word (g & 7) >> 1, half g & 1."""
    w0, w1, w2, w3 = _words(g // _SR_GROUP, sr_lo, sr_hi)
    q = (g & 7) >> 1
    w = tl.where(q == 0, w0, tl.where(q == 1, w1, tl.where(q == 2, w2, w3)))
    return (w >> ((g & 1) * 16).to(tl.uint32)) & 0xFFFF


@triton.jit(do_not_specialize=["m", "n", "N", "g0", "r", "sr_lo", "sr_hi"])
def _lowrank_kernel(w_ptr, u_ptr, v_ptr, m, n, N, g0, r, sr_lo, sr_hi, alpha, beta, DTYPE: tl.constexpr,
                    SR: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """w: the m x n block (contiguous, dtype code DTYPE); u: fp32 [m, r]; v: fp32 [n, r]; g0: the global index of
    the block's element (0, 0); N: the full tensor's row length (global index of (i, j) = g0 + i*N + j)."""
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    cols = tl.program_id(1).to(tl.int64) * BN + tl.arange(0, BN)
    rm, cm = rows < m, cols < n
    r64 = r.to(tl.int64)
    acc = tl.load(u_ptr + rows * r64, mask=rm, other=0.0).to(tl.float64)[:, None] * \
        tl.load(v_ptr + cols * r64, mask=cm, other=0.0).to(tl.float64)[None, :]
    for k in range(1, r):
        uk = tl.load(u_ptr + rows * r64 + k, mask=rm, other=0.0).to(tl.float64)
        vk = tl.load(v_ptr + cols * r64 + k, mask=cm, other=0.0).to(tl.float64)
        acc = acc + uk[:, None] * vk[None, :]
    # float64 sqrt and division are IEEE-exact (sqrt.rn.f64 / div.rn.f64 compiled, numpy interpreted); the
    # approximate forms Triton may pick exist for fp32 only (tl.sqrt_rn / tl.div_rn take fp32 alone)
    sqrt_r = tl.sqrt(tl.zeros([1, 1], dtype=tl.float64) + r)
    z = (acc / sqrt_r).to(tl.float32)
    mask = rm[:, None] & cm[None, :]
    ptrs = w_ptr + rows[:, None] * n.to(tl.int64) + cols[None, :]
    x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    y = tl.fma(z, beta, alpha * x)
    if SR and DTYPE != _FLOAT32:
        g = g0.to(tl.int64) + rows[:, None] * N.to(tl.int64) + cols[None, :]
        out = sround(y, _sr_bits_at(g, sr_lo, sr_hi), DTYPE)
    else:
        out = round_nearest(y, DTYPE)
    tl.store(ptrs, out, mask=mask)


def normals(seed: int, g0: int, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """fp32 [n]: z(seed, g0 .. g0 + n - 1) from the Triton device functions (the factors' stream)."""
    out = torch.empty(n, dtype=torch.float32, device=device)
    if n:
        lo, hi = signed_words(seed & _MASK32, seed >> 32)
        _normals_kernel[(triton.cdiv(n, _NORMALS_BLOCK),)](out, lo, hi, g0, n, BLOCK=_NORMALS_BLOCK)
    return out


def lowrank_update(w: torch.Tensor, seed_u: int, seed_v: int, base: int, r: int, alpha: float, beta: float,
                   stochastic: bool, full_shape: tuple[int, int], start: tuple[int, int]) -> None:
    """In place on the contiguous 2-d block ``w`` at ``start`` of a ``full_shape`` tensor (checked by the caller,
    ``perturb.lowrank``); asynchronous on CUDA."""
    (m, n), (M, N), (row0, col0) = w.shape, full_shape, start
    u = normals(seed_u, base + row0 * r, m * r, w.device)
    v = normals(seed_v, base + M * r + col0 * r, n * r, w.device)
    sr = rng.sr_seed(seed_u) if stochastic else 0
    sr_lo, sr_hi = signed_words(sr & _MASK32, sr >> 32)
    grid = (triton.cdiv(m, BLOCK_M), triton.cdiv(n, BLOCK_N))
    _lowrank_kernel[grid](w, u, v, m, n, N, base + row0 * N + col0, r, sr_lo, sr_hi, float(alpha), float(beta),
                          DTYPE=int(rng.DTYPE_CODES[w.dtype]), SR=bool(stochastic), BM=BLOCK_M, BN=BLOCK_N)
