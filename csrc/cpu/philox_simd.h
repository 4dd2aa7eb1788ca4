// Philox4x32-10 for kZBlock consecutive counters at once, written with AVX-512 / AVX2 intrinsics.
//
// Reference semantics: w[j][i] = philox4x32_10(key(seed), counter(kfirst + i))[j], bit-exact with csrc/philox.h
// (checked against it by tests/test_ext_build.py through _C.philox_words).
// Why intrinsics: the 32x32->64 products. GCC vectorises `uint64_t(a) * b` by widening to 64-bit lanes
// (vpmovzxdq + vpmullq + vpermt2d repacking), about 3x the work of vpmuludq on the even and odd 32-bit lanes
// followed by one blend per half, which is what this file does. Targets without AVX2 use the portable loop.
#pragma once

#include <cstdint>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "../philox.h"
#include "fastmath.h"

namespace mezo {
namespace cpu {

// Round keys are the same for every lane: computed once per call, not per counter.
struct RoundKeys {
  uint32_t k0[kPhiloxRounds], k1[kPhiloxRounds];
  explicit RoundKeys(uint64_t seed) {
    uint32_t a = static_cast<uint32_t>(seed), b = static_cast<uint32_t>(seed >> 32);
    for (int r = 0; r < kPhiloxRounds; ++r) {
      k0[r] = a;
      k1[r] = b;
      a += kPhiloxW0;
      b += kPhiloxW1;
    }
  }
};

// Portable: identical arithmetic to mezo::philox4x32_10, unrolled so a simd loop around it vectorises.
MEZO_INLINE void philox_lane(const RoundKeys& rk, uint64_t k, uint32_t& w0, uint32_t& w1, uint32_t& w2,
                             uint32_t& w3) {
  uint32_t c0 = static_cast<uint32_t>(k), c1 = static_cast<uint32_t>(k >> 32), c2 = 0u, c3 = 0u;
#pragma GCC unroll kPhiloxRounds  // straight-line code: a loop inside the simd loop body would block vectorisation
  for (int r = 0; r < kPhiloxRounds; ++r) {
    const uint64_t p0 = static_cast<uint64_t>(kPhiloxM1) * c2;
    const uint64_t p1 = static_cast<uint64_t>(kPhiloxM0) * c0;
    const uint32_t n0 = static_cast<uint32_t>(p0 >> 32) ^ c1 ^ rk.k0[r];
    const uint32_t n2 = static_cast<uint32_t>(p1 >> 32) ^ c3 ^ rk.k1[r];
    c1 = static_cast<uint32_t>(p0);
    c3 = static_cast<uint32_t>(p1);
    c0 = n0;
    c2 = n2;
  }
  w0 = c0;
  w1 = c1;
  w2 = c2;
  w3 = c3;
}

#if defined(__AVX512F__)
constexpr int kSimdLanes = 16;
using VecU = __m512i;
MEZO_INLINE VecU vset1(uint32_t x) { return _mm512_set1_epi32(static_cast<int>(x)); }
MEZO_INLINE VecU vxor3(VecU a, VecU b, VecU c) { return _mm512_ternarylogic_epi32(a, b, c, 0x96); }
// (hi, lo) of a[i] * m for all 16 lanes: even lanes from one vpmuludq, odd lanes from another.
MEZO_INLINE void vmulhilo(VecU a, VecU m, VecU& hi, VecU& lo) {
  const VecU pe = _mm512_mul_epu32(a, m);
  const VecU po = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(pe, 32), po);
  lo = _mm512_mask_blend_epi32(0xAAAA, pe, _mm512_slli_epi64(po, 32));
}
MEZO_INLINE void vcounters(uint64_t k, VecU& lo, VecU& hi) {
  const VecU base = vset1(static_cast<uint32_t>(k));
  lo = _mm512_add_epi32(base, _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  const __mmask16 carry = _mm512_cmplt_epu32_mask(lo, base);  // lo wrapped past 2^32
  hi = _mm512_mask_add_epi32(vset1(static_cast<uint32_t>(k >> 32)), carry, vset1(static_cast<uint32_t>(k >> 32)),
                             vset1(1u));
}
MEZO_INLINE void vstore(uint32_t* p, VecU v) { _mm512_storeu_si512(p, v); }
#elif defined(__AVX2__)
constexpr int kSimdLanes = 8;
using VecU = __m256i;
MEZO_INLINE VecU vset1(uint32_t x) { return _mm256_set1_epi32(static_cast<int>(x)); }
MEZO_INLINE VecU vxor3(VecU a, VecU b, VecU c) { return _mm256_xor_si256(_mm256_xor_si256(a, b), c); }
MEZO_INLINE void vmulhilo(VecU a, VecU m, VecU& hi, VecU& lo) {
  const VecU pe = _mm256_mul_epu32(a, m);
  const VecU po = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(pe, 32), po, 0xAA);
  lo = _mm256_blend_epi32(pe, _mm256_slli_epi64(po, 32), 0xAA);
}
MEZO_INLINE void vcounters(uint64_t k, VecU& lo, VecU& hi) {
  const VecU base = vset1(static_cast<uint32_t>(k));
  lo = _mm256_add_epi32(base, _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  // unsigned lo < base  <=>  (lo ^ 2^31) < (base ^ 2^31) signed; the compare gives -1 where it wrapped
  const VecU sign = vset1(0x80000000u);
  const VecU carry = _mm256_cmpgt_epi32(_mm256_xor_si256(base, sign), _mm256_xor_si256(lo, sign));
  hi = _mm256_sub_epi32(vset1(static_cast<uint32_t>(k >> 32)), carry);
}
MEZO_INLINE void vstore(uint32_t* p, VecU v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
#endif

// Words of counters kfirst .. kfirst + kZBlock - 1 as four arrays (structure of arrays). kZBlock must be a
// multiple of kSimdLanes.
template <int N>
MEZO_INLINE void philox_soa(const RoundKeys& rk, uint64_t kfirst, uint32_t* __restrict w0, uint32_t* __restrict w1,
                            uint32_t* __restrict w2, uint32_t* __restrict w3) {
#if defined(__AVX512F__) || defined(__AVX2__)
  static_assert(N % kSimdLanes == 0, "block must be a whole number of vectors");
  const VecU m0 = vset1(kPhiloxM0), m1 = vset1(kPhiloxM1);
  for (int i = 0; i < N; i += kSimdLanes) {
    VecU c0, c1, c2 = vset1(0u), c3 = vset1(0u);
    vcounters(kfirst + static_cast<uint64_t>(i), c0, c1);
#pragma GCC unroll kPhiloxRounds
    for (int r = 0; r < kPhiloxRounds; ++r) {
      VecU hi0, lo0, hi1, lo1;
      vmulhilo(c2, m1, hi0, lo0);
      vmulhilo(c0, m0, hi1, lo1);
      c0 = vxor3(hi0, c1, vset1(rk.k0[r]));
      c2 = vxor3(hi1, c3, vset1(rk.k1[r]));
      c1 = lo0;
      c3 = lo1;
    }
    vstore(w0 + i, c0);
    vstore(w1 + i, c1);
    vstore(w2 + i, c2);
    vstore(w3 + i, c3);
  }
#else
#pragma omp simd
  for (int i = 0; i < N; ++i) philox_lane(rk, kfirst + static_cast<uint64_t>(i), w0[i], w1[i], w2[i], w3[i]);
#endif
}

}  // namespace cpu
}  // namespace mezo
