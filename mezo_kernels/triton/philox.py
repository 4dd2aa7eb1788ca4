"""Triton device functions for the perturbation stream of ``docs/rng_spec.md``.

Our own Philox4x32-10, uniform and randn4x, written with uint64 products and uint32 arithmetic. We do not call
``tl.randn``/``tl.randn4x``: their int64-offset generator changed before 3.4 and their internals are not an API.
The formulas are the same as Triton's ``random.py`` (``philox_impl``, ``uint_to_uniform_float``,
``pair_uniform_to_normal``), so ``z[4k]`` equals ``tl.randn(seed, k)`` on Triton >= 3.4.

Also two tiny private kernels used by the tests, and their Python wrappers:
``philox_words`` (uint32 words for any counters) and ``randn4x`` (normals for a counter range).

Every constant comes from the spec module (``mezo_kernels.rng``) as a ``tl.constexpr`` global, the only form of
global that ``@triton.jit`` code may read.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import rng

__all__ = ["philox4x32_10", "uniform", "randn4x_counters", "randn_at", "stream_bits", "seed_words", "signed_words",
           "philox_words", "randn4x", "bits"]

_PHILOX_M0 = tl.constexpr(rng.PHILOX_M0)
_PHILOX_M1 = tl.constexpr(rng.PHILOX_M1)
_PHILOX_W0 = tl.constexpr(rng.PHILOX_W0)
_PHILOX_W1 = tl.constexpr(rng.PHILOX_W1)
_PHILOX_ROUNDS = tl.constexpr(rng.PHILOX_ROUNDS)
_UNIFORM_SCALE = tl.constexpr(rng.UNIFORM_SCALE)    # an exact fp32 value: the multiply's operand, unrounded
_TWO_PI = tl.constexpr(rng.TWO_PI_F32)
_U_MIN = tl.constexpr(rng.U_MIN_F32)


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Ten Philox rounds on uint32 tensors (c*) with uint32 key scalars/tensors (k*). Returns 4 uint32 words."""
    # Wrap-around is the point, so tl.mul/tl.add with sanitize_overflow=False: with debug=True Triton would
    # otherwise insert overflow asserts on these uint32 ops (this is what Triton's own philox_impl does).
    for _ in tl.static_range(_PHILOX_ROUNDS):
        # Both halves of each 32x32 -> 64-bit product from one uint64 multiply of zero-extended operands: one
        # IMAD.WIDE.U32 in SASS (umulhi plus a wrapping 32-bit multiply compile to IMAD.HI.U32 and IMAD).
        p0 = tl.mul(c2.to(tl.uint64), _PHILOX_M1, sanitize_overflow=False)
        p1 = tl.mul(c0.to(tl.uint64), _PHILOX_M0, sanitize_overflow=False)
        c0 = (p0 >> 32).to(tl.uint32) ^ c1 ^ k0
        c1 = p0.to(tl.uint32)
        c2 = (p1 >> 32).to(tl.uint32) ^ c3 ^ k1
        c3 = p1.to(tl.uint32)
        k0 = tl.add(k0, _PHILOX_W0, sanitize_overflow=False)
        k1 = tl.add(k1, _PHILOX_W1, sanitize_overflow=False)
    return c0, c1, c2, c3


@triton.jit
def uniform(w):
    """uint32 word -> fp32 in [0, 1 - 2**-24]: x = int32(w), ~x if negative, then one fp32 multiply."""
    x = w.to(tl.int32, bitcast=True)
    x = tl.where(x < 0, ~x, x)
    return x.to(tl.float32) * _UNIFORM_SCALE


@triton.jit
def _key(seed_lo, seed_hi):
    # The seed arrives as two *signed* int32 scalars (so its Triton type never changes); reinterpret as uint32.
    return seed_lo.to(tl.uint32, bitcast=True), seed_hi.to(tl.uint32, bitcast=True)


@triton.jit
def _words(k, seed_lo, seed_hi):
    """Philox words for int64 counter indices k (>= 0): counter = (k lo32, k hi32, 0, 0)."""
    k0, k1 = _key(seed_lo, seed_hi)
    c0 = (k & 0xFFFFFFFF).to(tl.uint32)
    c1 = (k >> 32).to(tl.uint32)
    zero = tl.zeros_like(c0)
    return philox4x32_10(c0, c1, zero, zero, k0, k1)


@triton.jit
def randn4x_counters(k, seed_lo, seed_hi):
    """The four fp32 normals (n0, n1, n2, n3) of each int64 counter index in k: z[4k + j] = n_j."""
    w0, w1, w2, w3 = _words(k, seed_lo, seed_hi)
    u1 = tl.maximum(uniform(w0), _U_MIN)
    u2 = tl.maximum(uniform(w2), _U_MIN)
    th1 = uniform(w1) * _TWO_PI
    th2 = uniform(w3) * _TWO_PI
    r1 = tl.sqrt(-2.0 * tl.log(u1))
    r2 = tl.sqrt(-2.0 * tl.log(u2))
    return r1 * tl.cos(th1), r1 * tl.sin(th1), r2 * tl.cos(th2), r2 * tl.sin(th2)


@triton.jit
def randn_at(g, seed_lo, seed_hi):
    """z[g] for arbitrary int64 global indices g (any alignment): the per-element path.

    One Philox call per element (4x the work of randn4x_counters), but only the Box-Muller pair that the lane
    needs is evaluated; the selected inputs go through the very same fp32 ops, so results are bit-identical."""
    w0, w1, w2, w3 = _words(g >> 2, seed_lo, seed_hi)
    lane = g & 3
    first = lane < 2
    u = tl.maximum(uniform(tl.where(first, w0, w2)), _U_MIN)
    th = uniform(tl.where(first, w1, w3)) * _TWO_PI
    r = tl.sqrt(-2.0 * tl.log(u))
    return tl.where((lane & 1) == 0, r * tl.cos(th), r * tl.sin(th))


@triton.jit
def stream_bits(g0, seed_lo, seed_hi, ROWS: tl.constexpr, GROUP: tl.constexpr, BITS: tl.constexpr):
    """uint32 [ROWS * GROUP]: the BITS random bits of global indices g0 + e (int64 g0 >= 0), in element order.

    Index g reads counter g // GROUP at bit (g % GROUP) * BITS of the words w0..w3 as one 128-bit string (the
    sign stream: GROUP 128, BITS 1; the rounding bits: GROUP 8, BITS 16). Row r holds g0 + r*GROUP .. + GROUP - 1,
    which straddle at most two counters, k = g0 // GROUP + r and k + 1: two Philox calls per GROUP elements for any
    g0, with no gather (the word is picked by selects on the [ROWS, GROUP] grid)."""
    o = (g0 % GROUP).to(tl.int32)
    ka = g0 // GROUP + tl.arange(0, ROWS).to(tl.int64)
    a0, a1, a2, a3 = _words(ka, seed_lo, seed_hi)
    b0, b1, b2, b3 = _words(ka + 1, seed_lo, seed_hi)
    jj = o + tl.arange(0, GROUP)
    use_b = (jj >= GROUP)[None, :]
    pos = (jj % GROUP) * BITS                 # bit position in the 128-bit string of the row's counter
    widx = (pos >> 5)[None, :]
    shift = (pos & 31).to(tl.uint32)[None, :]
    wa = tl.where(widx == 0, a0[:, None], tl.where(widx == 1, a1[:, None], tl.where(widx == 2, a2[:, None],
                                                                                       a3[:, None])))
    wb = tl.where(widx == 0, b0[:, None], tl.where(widx == 1, b1[:, None], tl.where(widx == 2, b2[:, None],
                                                                                       b3[:, None])))
    w = tl.where(use_b, wb, wa)
    out = (w >> shift) & ((1 << BITS) - 1)
    return tl.reshape(out, [ROWS * GROUP])


@triton.jit
def interleave4(n0, n1, n2, n3, N: tl.constexpr):
    """[N//4] x 4 -> [N] in element order n0[0], n1[0], n2[0], n3[0], n0[1], ...

    join(join(n0, n2), join(n1, n3)) has shape [N//4, 2, 2] with [q, i, j] = n_{2i+j}[q]; row-major reshape gives
    flat index 4q + 2i + j. Each join adds a register-resident minor dim, so after compilation a thread holds 4
    consecutive elements: no shuffle, and contiguous (vectorizable) loads/stores."""
    return tl.reshape(tl.join(tl.join(n0, n2), tl.join(n1, n3)), [N])


@triton.jit
def randn8_counters(k, seed_lo, seed_hi):
    """fp32 [8 * N]: z[8q + e] for int64 counter pairs k [N] (z[4k] .. z[4k + 7]: counters k and k + 1).

    The same normals as randn4x_counters, in an order that puts each thread's 8 consecutive elements (two
    counters) in its registers: the 16-byte accesses of 16-bit dtypes, with no layout conversion."""
    a0, a1, a2, a3 = randn4x_counters(k, seed_lo, seed_hi)
    b0, b1, b2, b3 = randn4x_counters(k + 1, seed_lo, seed_hi)
    # [q, h, i, j] = n_{2i+j} of counter k + h: flat index 8q + 4h + 2i + j
    return tl.reshape(tl.join(tl.join(tl.join(a0, b0), tl.join(a2, b2)), tl.join(tl.join(a1, b1), tl.join(a3, b3))),
                      [8 * k.shape[0]])


# ------------------------------------------------------------------------------------------- test kernels
@triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
def _philox_words_kernel(ctr_ptr, out_ptr, seed_lo, seed_hi, n, BLOCK: tl.constexpr):
    """ctr: int64 [n, 4] holding uint32 counter words; out: int64 [n, 4] the Philox words (as uint32 values)."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    c0 = tl.load(ctr_ptr + 4 * i, mask=m, other=0).to(tl.uint32)
    c1 = tl.load(ctr_ptr + 4 * i + 1, mask=m, other=0).to(tl.uint32)
    c2 = tl.load(ctr_ptr + 4 * i + 2, mask=m, other=0).to(tl.uint32)
    c3 = tl.load(ctr_ptr + 4 * i + 3, mask=m, other=0).to(tl.uint32)
    k0, k1 = _key(seed_lo, seed_hi)
    w0, w1, w2, w3 = philox4x32_10(c0, c1, c2, c3, k0, k1)
    # uint32 -> int64 zero-extends, so the int64 table holds the words as values in [0, 2**32).
    tl.store(out_ptr + 4 * i, w0.to(tl.int64), mask=m)
    tl.store(out_ptr + 4 * i + 1, w1.to(tl.int64), mask=m)
    tl.store(out_ptr + 4 * i + 2, w2.to(tl.int64), mask=m)
    tl.store(out_ptr + 4 * i + 3, w3.to(tl.int64), mask=m)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "k_start"])
def _randn4x_kernel(out_ptr, seed_lo, seed_hi, k_start, n, BLOCK: tl.constexpr):
    """out: fp32 [4n]; out[4q + j] = z[4(k_start + q) + j], written through the same interleave as the update."""
    q = tl.program_id(0) * (BLOCK // 4) + tl.arange(0, BLOCK // 4)
    n0, n1, n2, n3 = randn4x_counters(k_start.to(tl.int64) + q, seed_lo, seed_hi)
    z = interleave4(n0, n1, n2, n3, BLOCK)
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + e, z, mask=e < 4 * n)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "g_start"])
def _bits_kernel(out_ptr, seed_lo, seed_hi, g_start, n, GROUP: tl.constexpr, BITS: tl.constexpr,
                 BLOCK: tl.constexpr):
    """out: int64 [n]; out[e] = the BITS stream bits of global index g_start + e."""
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    b = stream_bits(g_start.to(tl.int64) + tl.program_id(0) * BLOCK, seed_lo, seed_hi, BLOCK // GROUP, GROUP, BITS)
    tl.store(out_ptr + e, b.to(tl.int64), mask=e < n)


def seed_words(seed: int) -> tuple[int, int]:
    """uint64 (or negative int64) seed -> (lo, hi) as *signed* int32 Python ints (checked: ``rng.split_seed``).

    Triton types an int argument by its value (int32 / uint32 / int64); always passing signed int32 keeps one
    signature for every seed, so with do_not_specialize a new seed never recompiles."""
    return signed_words(*rng.split_seed(seed))


def signed_words(lo: int, hi: int) -> tuple[int, int]:
    """Two uint32 halves of a seed (``rng.split_seed``'s) as signed int32: no checks, for the launcher, whose seed
    the public API checked."""
    return lo - (1 << 32) * (lo >> 31), hi - (1 << 32) * (hi >> 31)


def philox_words(seed: int, counters: torch.Tensor) -> torch.Tensor:
    """Philox4x32-10 words for counters (int64 [..., 4] of uint32 values) -> int64 [..., 4]. Test helper."""
    ctr = counters.to(torch.int64).reshape(-1, 4).contiguous()
    out = torch.empty_like(ctr)
    lo, hi = seed_words(seed)
    n, block = ctr.shape[0], 256
    _philox_words_kernel[(triton.cdiv(n, block),)](ctr, out, lo, hi, n, BLOCK=block)
    return out.reshape(counters.shape)


def randn4x(seed: int, k_start: int, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """fp32 [4n]: z[4*k_start : 4*(k_start + n)] from the Triton device functions. Test helper."""
    out = torch.empty(4 * n, dtype=torch.float32, device=device)
    lo, hi = seed_words(seed)
    block = 1024
    _randn4x_kernel[(triton.cdiv(4 * n, block),)](out, lo, hi, k_start, n, BLOCK=block)
    return out


def bits(seed: int, g_start: int, n: int, group: int, nbits: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """int64 [n]: ``stream_bits`` of global indices g_start .. g_start + n - 1 (``rng_bits.stream_bits``). Test helper."""
    out = torch.empty(n, dtype=torch.int64, device=device)
    lo, hi = seed_words(seed)
    block = 1024
    _bits_kernel[(triton.cdiv(n, block),)](out, lo, hi, g_start, n, GROUP=group, BITS=nbits, BLOCK=block)
    return out
