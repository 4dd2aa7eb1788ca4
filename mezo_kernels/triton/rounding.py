"""fp32 -> fp16/bf16 roundings for the Triton kernel, giving the same bits compiled and interpreted.

``round_nearest`` is the plain one rounding of every mode; ``sround`` the stochastic rounding of mode AXPBY_SR,
exactly as ``rng.stochastic_round`` (the spec) with the rounding bits r of ``philox.stream_bits``."""
from __future__ import annotations

import triton
import triton.language as tl

from .. import _compat
from .. import rng
from ..rng import bits as rng_bits

__all__ = ["round_bf16", "round_nearest", "sround"]

_FLOAT16 = tl.constexpr(int(rng.DTypeCode.FLOAT16))
_BFLOAT16 = tl.constexpr(int(rng.DTypeCode.BFLOAT16))
_F16_MIN_SUB_BITS = tl.constexpr(rng_bits.F16_MIN_SUBNORMAL_BITS)          # bits of 2**-24
_F16_MIN_NORMAL_EXP = tl.constexpr(rng_bits.F16_MIN_NORMAL_EXP)      # -14
_F16_MIN_SUB_EXP = tl.constexpr(rng_bits.F16_MIN_SUBNORMAL_EXP)            # -24


@triton.jit
def _round_bf16_bits(x):
    """fp32 -> bf16, round to nearest even, with integer ops (the interpreter's version of ``round_bf16``)."""
    b = x.to(tl.uint32, bitcast=True)
    r = tl.add(b, 0x7FFF + ((b >> 16) & 1), sanitize_overflow=False)  # may wrap only for NaN, fixed below
    r = tl.where(x != x, b | 0x400000, r)  # NaN stays a (quiet) NaN instead of carrying into Inf
    return (r >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


# Whether these functions run in Triton's interpreter (TRITON_INTERPRET=1 when they were decorated).
_INTERPRETED = tl.constexpr(_compat.triton_interpreting(_round_bf16_bits))


@triton.jit
def round_bf16(x):
    """fp32 -> bf16, round to nearest even (NaN stays NaN; its payload is not specified).

    Compiled: Triton's cast, cvt.rn.bf16x2.f32 on sm_80+ (one F2FP per two elements in SASS). The interpreter's
    cast does not round to nearest even (checked on 3.9: it truncates, or adds the cut-off bit without carrying
    into the exponent), so there the integer version computes the same bits."""
    if _INTERPRETED:
        out = _round_bf16_bits(x)
    else:
        out = x.to(tl.bfloat16, fp_downcast_rounding="rtne")
    return out


@triton.jit
def round_nearest(x, DTYPE: tl.constexpr):
    """fp32 -> DTYPE (a dtype code), to nearest even (fp16: Triton's cast is RTNE compiled and interpreted)."""
    if DTYPE == _BFLOAT16:
        out = round_bf16(x)
    elif DTYPE == _FLOAT16:
        out = x.to(tl.float16)
    else:
        out = x
    return out


@triton.jit
def sround(y, r, DTYPE: tl.constexpr):
    """fp32 y -> fp16/bf16 (DTYPE code), stochastically with 16-bit uint32 random r (``rng.stochastic_round``).

    On m = |bits(y)|: drop d low bits (bf16: 16; fp16: 13, or -1 - e in the subnormal range), go away from zero
    iff r < q = the dropped fraction scaled to 16 bits; the add may carry into the exponent, which is right.
    |y| < 2**-24 (fp16): 0 or 2**-24 with q = floor(|y| * 2**40), computed here from the bits as the shift of
    the 24-bit significand by -17 - e (identical, and immune to flush-to-zero). NaN/Inf round to nearest."""
    b = y.to(tl.uint32, bitcast=True)
    sign = b & 0x80000000
    m = b & 0x7FFFFFFF
    special = m >= 0x7F800000
    if DTYPE == _BFLOAT16:
        low = m & 0xFFFF
        m2 = (m - low) + ((r < low).to(tl.uint32) << 16)
        out = ((sign | m2) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        out = tl.where(special, round_bf16(y), out)
    else:
        tl.static_assert(DTYPE == _FLOAT16, "stochastic rounding targets fp16 or bf16")
        e = (m >> 23).to(tl.int32) - 127
        d = tl.minimum(tl.where(e >= _F16_MIN_NORMAL_EXP, 13, -1 - e), 23)
        t = (m >> d.to(tl.uint32)) << d.to(tl.uint32)
        low = m - t
        # q = floor(low * 2**16 / 2**d): one of the two shifts is by 0
        q = (low >> tl.maximum(d - 16, 0).to(tl.uint32)) << tl.maximum(16 - d, 0).to(tl.uint32)
        m2 = t + ((r < q).to(tl.uint32) << d.to(tl.uint32))
        sig = (m & 0x7FFFFF) | 0x800000
        qt = sig >> tl.minimum(tl.maximum(-17 - e, 0), 31).to(tl.uint32)   # clamped: valid shifts everywhere
        tiny = e < _F16_MIN_SUB_EXP
        m2 = tl.where(tiny, tl.where(r < qt, _F16_MIN_SUB_BITS, 0).to(tl.uint32), m2)
        out = (sign | m2).to(tl.float32, bitcast=True).to(tl.float16)
        out = tl.where(special, y.to(tl.float16), out)
    return out
