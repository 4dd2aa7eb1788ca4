// Philox4x32-10, the Triton-compatible uniform and the randn4x Box-Muller stream (docs/rng_spec.md).
//
// Reference semantics (the pure-PyTorch mezo_kernels/rng.py):
//   key = (seed lo32, seed hi32); counter = (k lo32, k hi32, 0, 0); 10 rounds
//   U(w) = fp32(x) * kUniformScale with x = int32(w), x = ~x if x < 0
//   randn4x(k) = (r1 cos th1, r1 sin th1, r2 cos th2, r2 sin th2),
//     u = max(kUMinF, U(w0|w2)), th = kTwoPiF * U(w1|w3) (fp32), r = sqrt(-2 log u)
//   z[g] = randn4x(g >> 2)[g & 3]
// The constants come from spec_codes.h, generated from mezo_kernels/rng.py.
//
// Every function is __host__ __device__ so the same words come out of g++ and nvcc. The integer part and the
// uniform are bit-exact everywhere. The transcendental part differs by target on purpose:
//   device: logf/cosf/sinf (accurate libdevice, never the __logf intrinsics) and sqrt.approx.ftz.f32, which is
//           exactly what Triton emits for tl.log/tl.cos/tl.sin/tl.sqrt, so CUDA matches Triton bit for bit;
//   host:   log/cos/sin/sqrt in double, rounded once to float (the spec's comparison reference). The fast CPU
//           kernel does not use this path; it has its own vectorised fp32 math (csrc/cpu/fastmath.h).
#pragma once

#include <cstdint>
#include <cstring>
#if !defined(__CUDA_ARCH__)
#include <cmath>
#endif

#include "spec_codes.h"

#if defined(__CUDACC__)
#define MEZO_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define MEZO_HD inline __attribute__((always_inline))
#else
#define MEZO_HD inline
#endif

namespace mezo {

struct U32x4 {
  uint32_t x, y, z, w;
};
struct F32x4 {
  float x, y, z, w;
};

// hi/lo halves of a 32x32-bit product. A 64-bit product on the host (compiles to one mul / vpmuludq),
// __umulhi on the device (mul.hi.u32 next to mul.lo.u32: nvcc pairs them better than a 64-bit product).
MEZO_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  hi = __umulhi(a, b);
  lo = a * b;
#else
  const uint64_t p = static_cast<uint64_t>(a) * b;
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
#endif
}

// One Philox4x32-10 block for an arbitrary 128-bit counter (the known-answer tests use all four words).
MEZO_HD U32x4 philox4x32_10(uint32_t k0, uint32_t k1, U32x4 c) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < kPhiloxRounds; ++r) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(kPhiloxM1, c.z, hi0, lo0);
    mulhilo32(kPhiloxM0, c.x, hi1, lo1);
    c = U32x4{hi0 ^ c.y ^ k0, lo0, hi1 ^ c.w ^ k1, lo1};
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return c;
}

// The stream's block: key from the uint64 seed, counter (k lo32, k hi32, 0, 0).
MEZO_HD U32x4 philox_counter(uint64_t seed, uint64_t k) {
  return philox4x32_10(static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32),
                       U32x4{static_cast<uint32_t>(k), static_cast<uint32_t>(k >> 32), 0u, 0u});
}

MEZO_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

MEZO_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

// Triton's uint_to_uniform_float (32-bit path). x ^ (x >> 31) is ~x for negative x and x otherwise: the same
// value as the spec's branch, written branch-free so loops over it vectorise. One int->float rounding (RNE)
// and one fp32 multiply by kUniformScale = (1 - 2^-24) * 2^-31, so u <= 1 - 2^-24 < 1.
MEZO_HD float uniform_f32(uint32_t w) {
  const int32_t s = static_cast<int32_t>(w);
  const int32_t x = s ^ (s >> 31);
  return static_cast<float>(x) * kUniformScale;
}

#if defined(__CUDA_ARCH__)
// Triton lowers tl.sqrt to sqrt.approx.ftz.f32; sqrtf would give the correctly rounded sqrt.rn.f32 and
// differ in the last bit now and then.
__device__ __forceinline__ float sqrt_approx_ftz(float x) {
  float r;
  asm("sqrt.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
}
#endif

// One Box-Muller pair from two words: (r cos th, r sin th). Clamp and angle are fp32 on every target.
MEZO_HD void box_muller(uint32_t wu, uint32_t wt, float& c, float& s) {
#if defined(__CUDA_ARCH__)
  const float u = fmaxf(kUMinF, uniform_f32(wu));
#else
  const float u = std::fmax(kUMinF, uniform_f32(wu));
#endif
  const float th = kTwoPiF * uniform_f32(wt);
#if defined(__CUDA_ARCH__)
  const float r = sqrt_approx_ftz(-2.0f * logf(u));
  // separate cosf/sinf like Triton; nvcc may merge them into sincosf, which is bitwise identical
  c = r * cosf(th);
  s = r * sinf(th);
#else
  const double r = std::sqrt(-2.0 * std::log(static_cast<double>(u)));
  c = static_cast<float>(r * std::cos(static_cast<double>(th)));
  s = static_cast<float>(r * std::sin(static_cast<double>(th)));
#endif
}

// The four normals of counter k: z[4k + j] = randn4x(seed, k)[j].
MEZO_HD F32x4 randn4x(uint64_t seed, uint64_t k) {
  const U32x4 w = philox_counter(seed, k);
  F32x4 n;
  box_muller(w.x, w.y, n.x, n.y);
  box_muller(w.z, w.w, n.z, n.w);
  return n;
}

}  // namespace mezo
