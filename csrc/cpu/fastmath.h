// Branch-free fp32 log and sincos for the CPU Box-Muller step, written so that `#pragma omp simd` loops
// calling them vectorise (AVX-512/AVX2). Double-precision libm would be accurate but scalar and ~10x too slow.
//
// Reference semantics: z_ref = float64 sqrt(-2 log u) * cos/sin(th) with the fp32 clamp u and the fp32 angle th
// (docs/rng_spec.md, "Gaussian directions"). These fp32 versions keep |z - z_ref| <= 1e-6 + 1e-6 |z_ref|:
//   log: cephes logf (|rel err| ~1 ulp), log1p-style core so -2 log(u) stays relatively accurate as u -> 1;
//   sincos: 3-constant Cody-Waite reduction by pi/2 (exact for th < 2 pi, since j <= 4) + cephes sinf/cosf
//           minimax polynomials on [-pi/4, pi/4] (~1 ulp), so the absolute error of r*cos is ~r * 6e-8 < 4e-7.
// Determinism: the build uses -ffp-contract=off, so vector and scalar-remainder code round identically; FMA is
// used only where spelled out (mezo_fmaf), and only when the target has it in hardware.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__GNUC__)
#define MEZO_INLINE inline __attribute__((always_inline))
#else
#define MEZO_INLINE inline
#endif

namespace mezo {
namespace cpu {

MEZO_INLINE uint32_t f2u(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
MEZO_INLINE float u2f(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Polynomial helper: a true FMA where the ISA has one (vfmadd, vectorises), else mul + add. Within one build
// the choice is fixed, so results are bit-for-bit repeatable. (The parameter update itself always uses a true
// fma, see kernel.cpp: the ABI requires it.)
MEZO_INLINE float mezo_fmaf(float a, float b, float c) {
#if defined(__FMA__) || defined(__AVX512F__)
  return __builtin_fmaf(a, b, c);
#else
  return a * b + c;
#endif
}

// Natural log for positive normal x (here x = u1 in [kUMinF, 1 - 2^-24]; no zero/inf/NaN/denormal handling).
// x = m * 2^e with m in [sqrt(1/2), sqrt(2)); f = m - 1 is exact (Sterbenz), log x = e ln2 + log1p(f) with
// ln2 split in two (0.693359375 has 9 bits, so e * it is exact) as in cephes logf.
MEZO_INLINE float fast_logf(float x) {
  const uint32_t ix = f2u(x);
  int32_t e = static_cast<int32_t>(ix >> 23) - 126;           // x = m * 2^e, m in [0.5, 1)
  const float m = u2f((ix & 0x007fffffu) | 0x3f000000u);
  const bool lo = m < 0.707106781186547524f;
  e = lo ? e - 1 : e;
  const float f = lo ? (m + m) - 1.0f : m - 1.0f;              // both exact
  const float z = f * f;
  float p = 7.0376836292e-2f;
  p = mezo_fmaf(p, f, -1.1514610310e-1f);
  p = mezo_fmaf(p, f, 1.1676998740e-1f);
  p = mezo_fmaf(p, f, -1.2420140846e-1f);
  p = mezo_fmaf(p, f, 1.4249322787e-1f);
  p = mezo_fmaf(p, f, -1.6668057665e-1f);
  p = mezo_fmaf(p, f, 2.0000714765e-1f);
  p = mezo_fmaf(p, f, -2.4999993993e-1f);
  p = mezo_fmaf(p, f, 3.3333331174e-1f);
  const float fe = static_cast<float>(e);
  float y = p * f * z;
  y = mezo_fmaf(fe, -2.12194440e-4f, y);
  y = mezo_fmaf(-0.5f, z, y);
  float r = f + y;
  r = mezo_fmaf(fe, 0.693359375f, r);
  return r;
}

// sin and cos of th in [0, 2 pi). j = round(th * 2/pi) in 0..4; x = th - j pi/2 with pi/2 = DP1 + DP2 + DP3
// (DP1, DP2 have few bits so j*DP1, j*DP2 are exact); then the quadrant j & 3 swaps/negates the pair.
// Sign flips are XORs on the bit patterns, so the whole function is selects and arithmetic (no branches).
MEZO_INLINE void fast_sincosf(float th, float& s_out, float& c_out) {
  const int32_t j = static_cast<int32_t>(th * 0.636619772367581343f + 0.5f);  // th >= 0: truncation = floor
  const float fj = static_cast<float>(j);
  float x = mezo_fmaf(-fj, 1.5703125f, th);
  x = mezo_fmaf(-fj, 4.837512969970703125e-4f, x);
  x = mezo_fmaf(-fj, 7.54978995489188216e-8f, x);
  const float z = x * x;
  // cephes sinf: x + x^3 P(x^2)
  float ps = -1.9515295891e-4f;
  ps = mezo_fmaf(ps, z, 8.3321608736e-3f);
  ps = mezo_fmaf(ps, z, -1.6666654611e-1f);
  const float s = mezo_fmaf(ps * z, x, x);
  // cephes cosf: 1 - z/2 + z^2 Q(z)
  float pc = 2.443315711809948e-5f;
  pc = mezo_fmaf(pc, z, -1.388731625493765e-3f);
  pc = mezo_fmaf(pc, z, 4.166664568298827e-2f);
  float c = mezo_fmaf(-0.5f, z, pc * z * z);
  c = c + 1.0f;
  const uint32_t q = static_cast<uint32_t>(j) & 3u;
  const bool swap = (q & 1u) != 0;
  const float sv = swap ? c : s;
  const float cv = swap ? s : c;
  s_out = u2f(f2u(sv) ^ ((q & 2u) << 30));           // sin negative in quadrants 2, 3
  c_out = u2f(f2u(cv) ^ (((q + 1u) & 2u) << 30));    // cos negative in quadrants 1, 2
}

}  // namespace cpu
}  // namespace mezo
