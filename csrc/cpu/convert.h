// fp16 / bf16 <-> fp32 by bit manipulation (and stochastic rounding to them), branch-free so the element loops
// of kernel.cpp vectorise.
//
// Reference semantics (what torch does for .to(dtype)): loads are exact widenings; stores round to nearest,
// ties to even, with overflow to +-inf, fp16 subnormals produced correctly, NaN kept NaN (quiet).
// Selects instead of branches: every candidate is computed and the right one picked, which the vectoriser
// turns into blends/masks (the build uses -fno-trapping-math so it may also speculate the fp ops).
// F16C would do fp16 in one instruction but only 8 lanes at a time and only when the target has it; this
// integer form is exact on every target and was verified against torch on all 65536 halves (tests).
#pragma once

#include <cstdint>

#include "../sround.h"
#include "fastmath.h"  // f2u / u2f / MEZO_INLINE

namespace mezo {
namespace cpu {

MEZO_INLINE float bf16_to_f32(uint16_t h) { return u2f(static_cast<uint32_t>(h) << 16); }

MEZO_INLINE uint16_t f32_to_bf16(float f) {
  const uint32_t u = f2u(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;  // RNE; carries into the exponent (-> inf)
  const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
  return static_cast<uint16_t>(nan ? 0x7fc0u : rounded);            // torch's canonical bf16 NaN
}

// After F. Giesen, "half_to_float_fast5": shift exponent+mantissa into place and rebias; inf/NaN get the
// extra exponent bias, zero/subnormals are normalised by one exact fp32 subtraction.
MEZO_INLINE float f16_to_f32(uint16_t h) {
  const uint32_t shifted_exp = 0x7c00u << 13;
  uint32_t o = (static_cast<uint32_t>(h) & 0x7fffu) << 13;
  const uint32_t exp = shifted_exp & o;
  o += (127u - 15u) << 23;
  const uint32_t inf_nan = o + ((128u - 16u) << 23);
  const float sub = u2f(o + (1u << 23)) - u2f(113u << 23);  // exact: both operands and result are normal
  o = exp == shifted_exp ? inf_nan : o;
  o = exp == 0u ? f2u(sub) : o;
  return u2f(o | ((static_cast<uint32_t>(h) & 0x8000u) << 16));
}

// After F. Giesen, "float_to_half_fast3_rtne": three candidate encodings, one picked.
MEZO_INLINE uint16_t f32_to_f16(float ff) {
  uint32_t f = f2u(ff);
  const uint32_t sign = f & 0x80000000u;
  f ^= sign;
  const uint32_t f32_inf = 255u << 23;
  const uint32_t f16_max = (127u + 16u) << 23;                     // 2^16: everything from here rounds to inf
  const uint32_t denorm_magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
  // overflow / inf / NaN
  const uint32_t o_big = f > f32_inf ? 0x7e00u : 0x7c00u;
  // fp16 subnormal or zero (|f| < 2^-14): adding 0.5 lets the FPU's RNE do the rounding of the shifted value
  const uint32_t o_small = f2u(u2f(f) + u2f(denorm_magic)) - denorm_magic;
  // normal: rebias, add 0xfff plus the lsb of the kept mantissa (ties to even), truncate
  const uint32_t mant_odd = (f >> 13) & 1u;
  const uint32_t o_norm = (f + (static_cast<uint32_t>(15 - 127) << 23) + 0xfffu + mant_odd) >> 13;
  uint32_t o = f >= f16_max ? o_big : o_norm;
  o = f < (113u << 23) ? o_small : o;
  return static_cast<uint16_t>(o | (sign >> 16));
}

// Stochastic rounding (sround.h) followed by the exact round-to-nearest conversion above.
MEZO_INLINE uint16_t sround_bf16(float y, uint32_t r) { return f32_to_bf16(sround_bf16_value(y, r)); }
MEZO_INLINE uint16_t sround_f16(float y, uint32_t r) { return f32_to_f16(sround_f16_value(y, r)); }

// Element access by dtype (kDTypeFloat32 / kDTypeFloat16 / kDTypeBfloat16): float, or uint16_t tagged as fp16 / bf16.
// sround: stochastic rounding with 16 random bits; for fp32 the fma result is already fp32 (plain rounding).
struct F32 {
  using Storage = float;
  static constexpr bool kStochastic = false;  // AXPBY_SR is AXPBY: no SR bits are generated
  static MEZO_INLINE float load(float v) { return v; }
  static MEZO_INLINE float store(float v) { return v; }
  static MEZO_INLINE float sround(float v, uint32_t) { return v; }
};
struct F16 {
  using Storage = uint16_t;
  static constexpr bool kStochastic = true;
  static MEZO_INLINE float load(uint16_t v) { return f16_to_f32(v); }
  static MEZO_INLINE uint16_t store(float v) { return f32_to_f16(v); }
  static MEZO_INLINE uint16_t sround(float v, uint32_t r) { return sround_f16(v, r); }
};
struct BF16 {
  using Storage = uint16_t;
  static constexpr bool kStochastic = true;
  static MEZO_INLINE float load(uint16_t v) { return bf16_to_f32(v); }
  static MEZO_INLINE uint16_t store(float v) { return f32_to_bf16(v); }
  static MEZO_INLINE uint16_t sround(float v, uint32_t r) { return sround_bf16(v, r); }
};

}  // namespace cpu
}  // namespace mezo
