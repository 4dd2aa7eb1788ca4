"""The spec's bit streams: sign (Rademacher) directions and the stochastic-rounding bits, with the rounding.

Both read Philox4x32-10 words (``rng.philox_words``) a few bits at a time: the sign stream one bit per element,
SIGN_GROUP elements per counter, at the step's seed; the rounding stream 16 bits per element, SR_GROUP elements per
counter, at ``sr_seed(seed)``. Exported by ``mezo_kernels.rng``, which is where callers should take them from.
"""
from __future__ import annotations

import torch

from .philox import (DTYPE_CODES, SIGN_GROUP, SR_GROUP, SR_SEED_XOR, Distribution, check_seed, distribution_code,
                     normal, philox_words, splitmix64)

__all__ = ["stream_bits", "signs", "direction", "sr_seed", "sr_bits", "stochastic_round"]
_MASK32 = 0xFFFFFFFF
_CHUNK = 1 << 20                           # elements per slab: bounds temporary memory


def stream_bits(seed: int, base: int, n: int, group: int, bits: int, device) -> torch.Tensor:
    """int64 [n]: the ``bits`` random bits of each global index g in [base, base + n).

    Element g reads counter ``k = g // group``; its bits start at bit ``(g % group) * bits`` of the words
    w0, w1, w2, w3 taken as one 128-bit string (w0 first, least significant bit first). ``bits`` divides 32."""
    seed = check_seed(seed)
    if isinstance(base, bool) or not isinstance(base, int) or base < 0 or n < 0:
        raise ValueError(f"base and n must be ints >= 0, got base={base!r}, n={n!r}")
    per_word = 32 // bits
    out = torch.empty(n, dtype=torch.int64, device=device)
    for lo in range(0, n, _CHUNK):
        hi = min(n, lo + _CHUNK)
        g = torch.arange(base + lo, base + hi, dtype=torch.int64, device=out.device)
        k0 = (base + lo) // group
        w = philox_words(seed, torch.arange(k0, (base + hi - 1) // group + 1, dtype=torch.int64, device=out.device))
        j = g % group
        word = w[g // group - k0, j // per_word]
        out[lo:hi] = (word >> ((j % per_word) * bits)) & ((1 << bits) - 1)
    return out


def signs(seed: int, base: int, n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The sign (Rademacher) stream z[base : base + n] as float32 +-1, shape ``[n]`` (docs/rng_spec.md "Signs").

    Counter ``k = g >> 7`` (SIGN_GROUP elements per Philox call); bit ``b`` = bit ``g & 31`` of word
    ``(g & 127) >> 5``; ``z = 1 - 2*b``."""
    b = stream_bits(seed, base, n, SIGN_GROUP, 1, device)
    return (1 - 2 * b).to(torch.float32)


def direction(seed: int, base: int, n: int, device: torch.device | str | None = None,
              distribution: object = "gaussian") -> torch.Tensor:
    """z[base : base + n] (float32, shape ``[n]``) of ``distribution``: a name, code or :class:`Distribution`."""
    if distribution_code(distribution) == Distribution.SIGN:
        return signs(seed, base, n, device)
    return normal(seed, base, n, device)


def sr_seed(seed: int) -> int:
    """The stochastic-rounding stream's Philox seed for a step's ``seed``: ``splitmix64(seed ^ SR_SEED_XOR)``.

    A stream of its own: the z stream of ``seed`` never feeds the rounding."""
    return splitmix64(check_seed(seed) ^ SR_SEED_XOR)


def sr_bits(seed: int, base: int, n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """int64 [n] in [0, 2**16): the rounding bits r of global indices base .. base + n - 1 for step ``seed``.

    Philox at key(sr_seed(seed)), counter ``k = g >> 3``; ``r = (w[(g & 7) >> 1] >> (16 * (g & 1))) & 0xFFFF``."""
    return stream_bits(sr_seed(seed), base, n, SR_GROUP, 16, device)


F16_MIN_SUBNORMAL_BITS = 0x33800000             # float32 bits of 2**-24, fp16's smallest subnormal (and its spacing)
F16_MIN_NORMAL_EXP, F16_MIN_SUBNORMAL_EXP = -14, -24
TINY_SCALE = 2.0**40                      # |y| < 2**-24 -> q = floor(|y| * 2**40) < 2**16


def _signed32(b: torch.Tensor) -> torch.Tensor:
    """int64 holding uint32 values -> the same bits as int32."""
    return (b - ((b >> 31) << 32)).to(torch.int32)


def stochastic_round(y: torch.Tensor, dtype: torch.dtype, seed: int, base: int = 0) -> torch.Tensor:
    """Round float32 ``y`` (any shape; element i, flat order, has global index base + i) to ``dtype``, stochastically.

    Unbiased up to 2**-16 of a spacing: the result is y's neighbour away from zero with probability
    floor(frac * 2**16) / 2**16, frac = y's distance to the truncated value in units of the dtype's spacing there,
    using :func:`sr_bits` of (seed, base). Integer operations on y's fp32 bits, bit-exact on every backend:

    - NaN/Inf: round to nearest. bf16: the low d = 16 mantissa bits are dropped.
    - fp16: d = 13 in the normal range (exponent e >= -14), d = -1 - e for -24 <= e < -14 (subnormals: spacing
      2**-24); for |y| < 2**-24 the result is 0 or 2**-24 (y's sign), away from zero iff r < floor(|y| * 2**40).
    - low = m & (2**d - 1); q = floor(low * 2**16 / 2**d); away iff r < q; m' = (m - low) + (away << d), an
      integer add, so a carry into the exponent is the correct next value. m' then converts to ``dtype`` exactly,
      except that fp16 values past 65504 become inf, as round-to-nearest would make them.
    float32 ``dtype``: y itself (a copy). Returns a tensor of ``dtype`` and y's shape."""
    if not isinstance(y, torch.Tensor) or y.dtype != torch.float32:
        raise TypeError(f"stochastic_round expects a float32 tensor, got {getattr(y, 'dtype', type(y).__name__)}")
    if dtype not in DTYPE_CODES:
        raise TypeError(f"unsupported dtype {dtype}; expected one of {', '.join(map(str, DTYPE_CODES))}")
    if dtype == torch.float32:
        return y.clone()
    flat = y.reshape(-1)
    r = sr_bits(seed, base, flat.numel(), flat.device)
    b = flat.view(torch.int32).to(torch.int64) & _MASK32
    sign, m = b & 0x80000000, b & 0x7FFFFFFF
    if dtype == torch.bfloat16:
        d = torch.full_like(m, 16)
    else:
        e = (m >> 23) - 127
        # clamp: keeps the shifts valid where e < -24, whose result the tiny branch below replaces
        d = torch.where(e >= F16_MIN_NORMAL_EXP, 13, -1 - e).clamp(max=23)
    low = m & ((1 << d) - 1)
    q = torch.where(d >= 16, low >> (d - 16).clamp(min=0), low << (16 - d).clamp(min=0))
    m2 = (m - low) + ((r < q).to(torch.int64) << d)
    if dtype == torch.float16:
        tiny = e < F16_MIN_SUBNORMAL_EXP
        qt = torch.where(tiny, flat.abs(), 0.0).double().mul(TINY_SCALE).floor().to(torch.int64)
        m2 = torch.where(tiny, (r < qt).to(torch.int64) * F16_MIN_SUBNORMAL_BITS, m2)
    out = _signed32(sign | m2).view(torch.float32).to(dtype)
    out = torch.where(m >= 0x7F800000, flat.to(dtype), out)
    return out.view(y.shape)
