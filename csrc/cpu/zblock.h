// z for a block of kZBlock consecutive Philox counters, vectorised: the CPU's one source of normals; and the
// per-counter expansions of the sign stream and of the stochastic-rounding bits.
//
// Reference semantics: out[4 i + j] = randn4x(seed, kfirst + i)[j] (docs/rng_spec.md): Philox words
// bit-exact, uniforms bit-exact (same expression as csrc/philox.h), log/sincos/sqrt in fp32 (fastmath.h) within
// the spec's 1e-6 tolerance of the float64 formula. Both axpby and randn4x go through gen_z_block, so what the
// tests see from randn4x is exactly what the update applies.
//
// Layout: structure-of-arrays over counters (lane i = counter kfirst + i): Philox in philox_simd.h, then one
// `omp simd` loop for Box-Muller (log, sqrt, sincos all branch-free), then one interleave into element order.
#pragma once

#include <cmath>
#include <cstdint>

#include "../philox.h"
#include "fastmath.h"
#include "philox_simd.h"

namespace mezo {
namespace cpu {

constexpr int kZBlock = 32;  // counters per block: 128 z = 512 B on the stack, two AVX-512 vectors per word

// Words of counters kfirst .. kfirst + kZBlock - 1, 4 per counter in counter order.
inline void gen_words_block(const RoundKeys& rk, uint64_t kfirst, uint32_t* __restrict out) {
  alignas(64) uint32_t a[kZBlock], b[kZBlock], c[kZBlock], d[kZBlock];
  philox_soa<kZBlock>(rk, kfirst, a, b, c, d);
  for (int i = 0; i < kZBlock; ++i) {
    out[4 * i + 0] = a[i];
    out[4 * i + 1] = b[i];
    out[4 * i + 2] = c[i];
    out[4 * i + 3] = d[i];
  }
}

MEZO_INLINE void box_muller_fast(uint32_t wu, uint32_t wt, float& c, float& s) {
  const float u0 = uniform_f32(wu);
  const float u = u0 < kUMinF ? kUMinF : u0;  // = fmax(kUMinF, u0) (u0 is never NaN) but a plain select
  const float th = kTwoPiF * uniform_f32(wt);
  // vsqrtps, correctly rounded; the build passes -fno-math-errno, else GCC adds an errno branch (no simd)
  const float r = std::sqrt(-2.0f * fast_logf(u));
  float sn, cs;
  fast_sincosf(th, sn, cs);
  c = r * cs;
  s = r * sn;
}

// z[4 kfirst .. 4 (kfirst + kZBlock)) into out (128 floats).
inline void gen_z_block(const RoundKeys& rk, uint64_t kfirst, float* __restrict out) {
  alignas(64) uint32_t w0[kZBlock], w1[kZBlock], w2[kZBlock], w3[kZBlock];
  philox_soa<kZBlock>(rk, kfirst, w0, w1, w2, w3);
  alignas(64) float n0[kZBlock], n1[kZBlock], n2[kZBlock], n3[kZBlock];
#pragma omp simd
  for (int i = 0; i < kZBlock; ++i) {
    box_muller_fast(w0[i], w1[i], n0[i], n1[i]);
    box_muller_fast(w2[i], w3[i], n2[i], n3[i]);
  }
  for (int i = 0; i < kZBlock; ++i) {
    out[4 * i + 0] = n0[i];
    out[4 * i + 1] = n1[i];
    out[4 * i + 2] = n2[i];
    out[4 * i + 3] = n3[i];
  }
}

// The sign stream (rng.signs): element j of counter k's 128 is bit j & 31 of word j >> 5, z = 1 - 2 bit.
// out[j] = +-1.0f for j in [0, kSignGroup); the sign bit is the stream bit moved to bit 31.
MEZO_INLINE void sign_block(uint32_t w0, uint32_t w1, uint32_t w2, uint32_t w3, float* __restrict out) {
  static_assert(kSignGroup == 128, "one counter's four words give 128 signs");
  const uint32_t w[4] = {w0, w1, w2, w3};
  for (int q = 0; q < 4; ++q) {
    const uint32_t x = w[q];
#pragma omp simd
    for (int j = 0; j < 32; ++j) out[32 * q + j] = u2f(0x3f800000u | ((x << (31 - j)) & 0x80000000u));
  }
}

// 16-bit stochastic-rounding values of elements 8 kfirst .. 8 (kfirst + N) (rng.sr_bits): Philox at the SR
// stream's keys, counter k gives elements 8k + 2q + h the half h of word q (low half first).
template <int N>
MEZO_INLINE void sr_block(const RoundKeys& rk_sr, uint64_t kfirst, uint16_t* __restrict out) {
  static_assert(kSrGroup == 8, "one counter's four words give 8 16-bit values");
  alignas(64) uint32_t w[4][N];
  philox_soa<N>(rk_sr, kfirst, w[0], w[1], w[2], w[3]);
  for (int i = 0; i < N; ++i) {
    for (int q = 0; q < 4; ++q) {
      out[8 * i + 2 * q] = static_cast<uint16_t>(w[q][i]);
      out[8 * i + 2 * q + 1] = static_cast<uint16_t>(w[q][i] >> 16);
    }
  }
}

}  // namespace cpu
}  // namespace mezo
