"""The perturbation stream, in pure PyTorch: the reference every backend is tested against.

This module and ``bits.py`` are ``docs/rng_spec.md`` in code; they import nothing else of the package. The
package face ``mezo_kernels.rng`` exports both.

- Philox4x32-10 (Random123) with key = (seed lo32, seed hi32) and counter = (k lo32, k hi32, 0, 0).
- Uniform as Triton's ``uint_to_uniform_float``: ``x = int32(w); x = ~x if x < 0; u = fp32(x) * 2**-31``-ish
  (``UNIFORM_SCALE``, the fp32 constant just under 2**-31), one rounding each.
- randn4x: two Box-Muller pairs per counter; ``z[g] = n[g & 3]`` at counter ``k = g >> 2``.
- The one update op: ``theta <- round(fma(z, beta, alpha * theta))`` in fp32.
- Signs (``signs``): z = 1 - 2*bit, 128 elements per counter. Stochastic rounding (``stochastic_round``): 16 bits
  per element from the stream of ``sr_seed(seed)``, 8 elements per counter.

PyTorch has no uint64, so every 32-bit word lives in an int64 tensor, and each 32x32-bit product is split into
16-bit halves of the constant so that no partial product reaches 2**63.
"""
from __future__ import annotations

import enum
import math
import struct
from typing import Iterable, Sequence

import torch

__all__ = [
    "SEED_MAX", "check_seed", "split_seed", "philox4x32_10", "philox_words", "uniform",
    "normal", "normal_f64", "default_bases", "fma_update", "splitmix64", "seed_for",
    "PHILOX_M0", "PHILOX_M1", "PHILOX_W0", "PHILOX_W1", "PHILOX_ROUNDS", "UNIFORM_SCALE_BITS", "UNIFORM_SCALE",
    "TWO_PI_F32", "U_MIN_F32", "KernelMode", "DTypeCode", "DTYPE_CODES", "SPLITMIX_GOLDEN", "SPLITMIX_M1",
    "SPLITMIX_M2", "Distribution", "distribution_code", "SIGN_GROUP", "SR_GROUP", "SR_SEED_XOR", "words_table",
]


def _f32(x: float) -> float:
    """``x`` rounded to the nearest float32, as a Python float (exactly representable)."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def _f32_from_bits(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits))[0]


# ---------------------------------------------------------------------------------------------- shared codes
# The one definition of every constant and code the backends share. Triton reads them as tl.constexpr globals;
# C++/CUDA read csrc/spec_codes.h, the text of spec_header.emit_header() (written by
# `python tools/gen_spec_header.py`), which tests/test_spec_codes.py keeps equal to this module.
PHILOX_M0 = 0xD2511F53                     # round multiplier of counter word 0
PHILOX_M1 = 0xCD9E8D57                     # round multiplier of counter word 2
PHILOX_W0 = 0x9E3779B9                     # key schedule increment of key word 0: golden ratio
PHILOX_W1 = 0xBB67AE85                     # key schedule increment of key word 1: sqrt(3) - 1
PHILOX_ROUNDS = 10
# bitcast<float32>(UNIFORM_SCALE_BITS) = 4.6566126e-10 = (1 - 2**-24) * 2**-31: keeps u below 1 (Triton's value).
UNIFORM_SCALE_BITS = 0x2FFFFFFF
UNIFORM_SCALE = _f32_from_bits(UNIFORM_SCALE_BITS)
TWO_PI_F32 = _f32(2 * math.pi)             # 6.2831855; the Box-Muller angle is U * TWO_PI_F32 (one fp32 product)
U_MIN_F32 = _f32(1e-7)                     # Box-Muller clamp on u1: keeps log(u1) finite, bounds |z| by 5.68


SIGN_GROUP = 128                           # sign stream: elements per Philox call (1 bit each, 4 words x 32)
SR_GROUP = 8                               # stochastic rounding: elements per Philox call (16 bits each)
SR_SEED_XOR = 0x53525F524F554E44           # "SR_ROUND": the SR stream's seed is splitmix64(seed ^ SR_SEED_XOR)


class KernelMode(enum.IntEnum):
    """Operation codes of the kernel ABI (``docs/kernel_abi.md``).

    Each member carries ``uses_master`` (the mode reads the fp32 master copy at ``meta[3]``, which must be
    non-null), ``uses_source`` (the mode reads a source tensor of the group's dtype at ``meta[3]``, non-null) and
    ``effect`` on element i (z = z(seed, base + i) of the launch's distribution, fp32 math, one rounding to the
    tensor's dtype; ``sround`` is :func:`stochastic_round`). A new mode is one row here plus its implementation in
    each backend; csrc/spec_codes.h is regenerated from this."""

    def __new__(cls, code: int, uses_master: bool, uses_source: bool, effect: str) -> "KernelMode":
        obj = int.__new__(cls, code)
        obj._value_ = code
        obj.uses_master = uses_master
        obj.uses_source = uses_source
        obj.effect = effect
        return obj

    AXPBY = 0, False, False, "d = round(fma(z, beta, alpha * d))"
    MASTER_UPDATE = 1, True, False, "m' = fma(z, beta, alpha * m); m = m'; d = round(fma(z, gamma, m'))"
    MASTER_VIEW = 2, True, False, "d = round(fma(z, gamma, m))"
    FILL = 3, False, False, "d = round(z)"
    OUT = 4, False, True, "d = round(fma(z, beta, alpha * src)); src (meta[3], group dtype) is never written"
    AXPBY_SR = 5, False, False, "d = sround(fma(z, beta, alpha * d), g, sr_seed(seed)); fp32 groups: plain round"


class Distribution(enum.IntEnum):
    """Direction distributions: the ``dist`` code of a kernel launch. ``label`` is the public name."""

    def __new__(cls, code: int, label: str) -> "Distribution":
        obj = int.__new__(cls, code)
        obj._value_ = code
        obj.label = label
        return obj

    GAUSSIAN = 0, "gaussian"               # randn4x: Box-Muller pairs, 4 elements per Philox call
    SIGN = 1, "rademacher"                 # +-1, SIGN_GROUP elements per Philox call


def distribution_code(dist: object) -> Distribution:
    """A :class:`Distribution` from a member, its code or its public name (``"gaussian"``/``"rademacher"``)."""
    if isinstance(dist, Distribution):
        return dist
    if isinstance(dist, str):
        for d in Distribution:
            if dist == d.label:
                return d
        raise ValueError(f"unknown distribution {dist!r}; expected one of "
                         f"{', '.join(repr(d.label) for d in Distribution)}")
    if isinstance(dist, int) and not isinstance(dist, bool) and dist in set(Distribution):
        return Distribution(dist)
    raise TypeError(f"distribution must be a name ({', '.join(d.label for d in Distribution)}) or a "
                    f"Distribution code, got {dist!r}")


class DTypeCode(enum.IntEnum):
    """Element type codes of the kernel ABI; a member's name in lower case is its torch dtype."""
    FLOAT32 = 0
    FLOAT16 = 1
    BFLOAT16 = 2


DTYPE_CODES: dict[torch.dtype, DTypeCode] = {getattr(torch, c.name.lower()): c for c in DTypeCode}

SEED_MAX = 2**64 - 1
_MASK32 = 0xFFFFFFFF
_TORCH_CHUNK = 1 << 20                     # elements per slab in normal(): bounds temporary memory


def check_seed(seed: object) -> int:
    """Return ``seed`` as a Python int in [0, 2**64); negative int64 seeds map to their two's complement."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int in [0, 2**64), got {type(seed).__name__}")
    if -(2**63) <= seed < 0:
        seed += 2**64
    if not 0 <= seed <= SEED_MAX:
        raise ValueError(f"seed must be in [0, 2**64) (or a negative int64), got {seed}")
    return seed


def split_seed(seed: int) -> tuple[int, int]:
    """(key0, key1) = (low 32 bits, high 32 bits) of the uint64 seed."""
    seed = check_seed(seed)
    return seed & _MASK32, seed >> 32


def _mulhilo(m: int, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of m * c for a 32-bit constant m and int64 tensor c holding uint32 values."""
    a = c * (m & 0xFFFF)                    # < 2**48
    b = c * (m >> 16)                       # < 2**48
    t = a + ((b & 0xFFFF) << 16)            # low 48 bits of the full product, plus a carry into bit 32+
    return (b >> 16) + (t >> 32), t & _MASK32


def philox4x32_10(k0: int, k1: int, c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor,
                  c3: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 on int64 tensors holding uint32 counter words (broadcastable); key (k0, k1) as ints."""
    for _ in range(PHILOX_ROUNDS):
        hi0, lo0 = _mulhilo(PHILOX_M1, c2)
        hi1, lo1 = _mulhilo(PHILOX_M0, c0)
        c0, c1, c2, c3 = hi0 ^ c1 ^ k0, lo0, hi1 ^ c3 ^ k1, lo1
        k0, k1 = (k0 + PHILOX_W0) & _MASK32, (k1 + PHILOX_W1) & _MASK32
    return c0, c1, c2, c3


def philox_words(seed: int, k: torch.Tensor) -> torch.Tensor:
    """Words for counters ``k`` (int64 tensor, values in [0, 2**63)): int64 tensor of shape ``k.shape + (4,)``."""
    key0, key1 = split_seed(seed)
    if k.dtype != torch.int64:
        raise TypeError(f"counters must be int64, got {k.dtype}")
    zero = torch.zeros_like(k)
    w = philox4x32_10(key0, key1, k & _MASK32, k >> 32, zero, zero)
    return torch.stack(w, dim=-1)


def uniform(w: torch.Tensor) -> torch.Tensor:
    """float32 uniforms in [0, 1 - 2**-24] from int64 tensors holding uint32 words (bit-exact with Triton)."""
    x = torch.where(w >= 2**31, _MASK32 - w, w)   # int32 view, then ~x for negatives
    return x.to(torch.float32) * torch.tensor(UNIFORM_SCALE, dtype=torch.float32)


def _box_muller(w: torch.Tensor) -> torch.Tensor:
    """[..., 4] words -> [..., 4] float32 normals. Clamp and angle in fp32, the rest in float64 (spec)."""
    u = uniform(w)
    u1 = torch.clamp_min(u[..., 0::2], U_MIN_F32)                          # u1, u2
    th = u[..., 1::2] * torch.tensor(TWO_PI_F32, dtype=torch.float32)      # th1, th2 (fp32 product)
    r = torch.sqrt(-2.0 * torch.log(u1.double()))
    th = th.double()
    n = torch.stack((r * torch.cos(th), r * torch.sin(th)), dim=-1)          # [..., 2 pairs, (cos, sin)]
    return n.reshape(*w.shape[:-1], 4)


def normal_f64(seed: int, base: int, n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """z[base : base + n] as float64 (the spec's comparison reference: fp32 clamp and angle, float64 rest)."""
    return _normal(seed, base, n, device, torch.float64)


def normal(seed: int, base: int, n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """z[base : base + n] as float32: the float64 evaluation rounded once. Shape ``[n]``."""
    return _normal(seed, base, n, device, torch.float32)


def _normal(seed, base, n, device, dtype) -> torch.Tensor:
    seed = check_seed(seed)
    if base < 0 or n < 0:
        raise ValueError(f"base and n must be >= 0, got base={base}, n={n}")
    out = torch.empty(n, dtype=dtype, device=device)
    for lo in range(0, n, _TORCH_CHUNK):
        hi = min(n, lo + _TORCH_CHUNK)
        k0, k1 = (base + lo) >> 2, (base + hi - 1) >> 2
        k = torch.arange(k0, k1 + 1, dtype=torch.int64, device=out.device)
        z = _box_muller(philox_words(seed, k)).reshape(-1)
        off = (base + lo) & 3
        out[lo:hi] = z[off:off + hi - lo].to(dtype)
    return out


def default_bases(numels: Iterable[int]) -> list[int]:
    """Running sum of ``numel`` with every base rounded up to a multiple of 4 (so tensors start on a counter)."""
    bases, nxt = [], 0
    for n in numels:
        bases.append(nxt)
        nxt = (nxt + int(n) + 3) & ~3
    return bases


# ---------------------------------------------------------------------------------------------- seed schedule
SPLITMIX_GOLDEN = 0x9E3779B97F4A7C15       # 2**64 / golden ratio: splitmix64's increment
SPLITMIX_M1 = 0xBF58476D1CE4E5B9
SPLITMIX_M2 = 0x94D049BB133111EB
_GOLDEN64 = SPLITMIX_GOLDEN
_M64 = 2**64 - 1


def splitmix64(x: int) -> int:
    """SplitMix64's output function of ``x + golden`` (Steele et al.): a 64-bit mix of a 64-bit int."""
    x = (x + SPLITMIX_GOLDEN) & _M64
    x = ((x ^ (x >> 30)) * SPLITMIX_M1) & _M64
    x = ((x ^ (x >> 27)) * SPLITMIX_M2) & _M64
    return x ^ (x >> 31)


def seed_for(base_seed: int, step: int, j: int = 0, n_directions: int = 1) -> int:
    """The Philox seed of direction ``j`` of step ``step``: ``splitmix64(base + golden * (step * n + j + 1))``."""
    base_seed = check_seed(base_seed)
    return splitmix64((base_seed + _GOLDEN64 * (step * n_directions + j + 1)) & _M64)


def fma_update(x: torch.Tensor, z: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """``fma(z, beta, alpha * x)`` in fp32 (alpha, beta rounded to fp32), returned as float32.

    alpha*x is an fp32 product; z*beta is exact in float64 (24+24 bits) and the float64 sum is rounded to fp32,
    which equals a true fp32 fma except in the rare double-rounding tie (tests allow 1 ulp)."""
    a32 = torch.tensor(alpha, dtype=torch.float32)
    b32 = torch.tensor(beta, dtype=torch.float32, device=z.device).double()
    ax = x.float() * a32.to(x.device)
    return (z.double() * b32 + ax.double()).float()


def words_table(seed: int, ks: Sequence[int]) -> list[tuple[int, int, int, int]]:
    """Python-int words for a few counters: a convenience for known-answer tests and docs."""
    w = philox_words(seed, torch.tensor(list(ks), dtype=torch.int64))
    return [tuple(int(v) for v in row) for row in w]
