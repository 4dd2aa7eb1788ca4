// Stochastic rounding of an fp32 value to bf16 / fp16 with 16 random bits, for every backend (host and device).
//
// Reference semantics: mezo_kernels/rng.py stochastic_round (the same integer steps on y's fp32 bit pattern).
// On y's magnitude bits m, the d bits the target drops at that magnitude are cut off (t = m - low) and one unit
// 2^d is added when r < q = floor(low / 2^d * 2^16): an integer add, so a carry into the exponent is the correct
// next value. bf16 drops d = 16 bits everywhere; fp16 drops 13 in its normal range, -1 - e (14..23) in its
// subnormal range (e the unbiased exponent), and below 2^-24 the result is 0 or 2^-24 with
// q = floor(|y| 2^40) (exact: a power-of-two scaling, then truncation). NaN and Inf are returned unchanged.
//
// Each function returns an fp32 value that the backend's round-to-nearest conversion turns into the rounded
// result: the value is exactly representable in the target (so the conversion only changes the encoding), or it
// lies beyond the target's largest finite value (fp16: the conversion gives inf, as round-to-nearest of y would),
// or it is y itself (NaN/Inf). Branch-free, so the CPU loops around it vectorise.
#pragma once

#include <cstdint>

#include "philox.h"

namespace mezo {

MEZO_HD float sround_bf16_value(float y, uint32_t r) {
  const uint32_t b = float_to_bits(y), m = b & 0x7fffffffu, low = m & 0xffffu;
  const uint32_t kept = (m - low) + (r < low ? 0x10000u : 0u);
  return m >= 0x7f800000u ? y : bits_to_float((b & 0x80000000u) | kept);
}

MEZO_HD float sround_f16_value(float y, uint32_t r) {
  const uint32_t b = float_to_bits(y), m = b & 0x7fffffffu;
  const int32_t e = static_cast<int32_t>(m >> 23) - 127;  // unbiased exponent of y
  const uint32_t d = static_cast<uint32_t>(e >= -14 ? 13 : (e >= -24 ? -1 - e : 23));
  const uint32_t low = m & ((1u << d) - 1u);
  const uint32_t q = d >= 16 ? low >> (d - 16) : low << (16 - d);  // floor(low / 2^d * 2^16)
  const uint32_t kept = (m - low) + (r < q ? (1u << d) : 0u);
  const uint32_t q_tiny = static_cast<uint32_t>(bits_to_float(m) * 0x1p40f);  // |y| < 2^-24
  const uint32_t tiny = r < q_tiny ? 0x33800000u : 0u;                        // 2^-24 or +0
  const uint32_t mag = e < -24 ? tiny : kept;
  return m >= 0x7f800000u ? y : bits_to_float((b & 0x80000000u) | mag);
}

}  // namespace mezo
