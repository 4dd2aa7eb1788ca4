"""The RNG spec (``docs/rng_spec.md``) in pure PyTorch: the reference every backend is tested against.

- ``philox``: the shared codes (kernel modes, dtype and distribution codes), Philox4x32-10, the Gaussian stream,
  bases and the seed schedule;
- ``bits``: the sign stream and the stochastic-rounding stream, with the rounding itself;
- ``header``: ``csrc/spec_codes.h``, the same codes for the C++/CUDA sources.

This package imports nothing else of mezo_kernels.
"""
from .bits import (F16_MIN_NORMAL_EXP, F16_MIN_SUBNORMAL_BITS, F16_MIN_SUBNORMAL_EXP, direction, signs, sr_bits,
                   sr_seed, stochastic_round, stream_bits)
from .philox import *  # noqa: F401,F403  (the spec's names: see philox.__all__)
from .philox import __all__ as _philox_all

__all__ = [*_philox_all, "direction", "signs", "sr_bits", "sr_seed", "stochastic_round", "stream_bits",
           "F16_MIN_NORMAL_EXP", "F16_MIN_SUBNORMAL_BITS", "F16_MIN_SUBNORMAL_EXP"]
