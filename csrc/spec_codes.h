// Generated from mezo_kernels/rng/ by `python tools/gen_spec_header.py`; do not edit.
// The spec's shared codes for the C++ and CUDA backends; tests/test_spec_codes.py checks this file
// against mezo_kernels/rng.py and against the values compiled into the extensions.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define MEZO_SPEC_HD __host__ __device__
#else
#define MEZO_SPEC_HD
#endif

namespace mezo {

// Philox4x32-10 (docs/rng_spec.md)
constexpr uint32_t kPhiloxM0 = 0xD2511F53u;  // round multiplier of counter word 0
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;  // round multiplier of counter word 2
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;  // key schedule: golden ratio
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;  // key schedule: sqrt(3) - 1
constexpr int kPhiloxRounds = 10;

// Uniform and Box-Muller; fp32 values as exact hex literals
constexpr uint32_t kUniformScaleBits = 0x2FFFFFFFu;
constexpr float kUniformScale = 0x1.fffffep-32f;  // 4.6566126e-10
constexpr float kTwoPiF = 0x1.921fb6p+2f;  // 6.2831855
constexpr float kUMinF = 0x1.ad7f2ap-24f;  // 1e-07

// Kernel modes (docs/kernel_abi.md)
constexpr int kModeAxpby = 0;  // d = round(fma(z, beta, alpha * d))
constexpr int kModeMasterUpdate = 1;  // m' = fma(z, beta, alpha * m); m = m'; d = round(fma(z, gamma, m'))
constexpr int kModeMasterView = 2;  // d = round(fma(z, gamma, m))
constexpr int kModeFill = 3;  // d = round(z)
constexpr int kModeOut = 4;  // d = round(fma(z, beta, alpha * src)); src (meta[3], group dtype) is never written
constexpr int kModeAxpbySr = 5;  // d = sround(fma(z, beta, alpha * d), g, sr_seed(seed)); fp32 groups: plain round
constexpr int kNumModes = 6;
constexpr const char* kModeNames[kNumModes] = {"AXPBY", "MASTER_UPDATE", "MASTER_VIEW", "FILL", "OUT", "AXPBY_SR"};  // indexed by code
// The mode reads the fp32 master copy (meta[3] must be non-null).
MEZO_SPEC_HD constexpr bool mode_uses_master(int mode) {
  return mode == kModeMasterUpdate || mode == kModeMasterView;
}
// The mode reads a source tensor of the group's dtype at meta[3] (non-null); it never writes it.
MEZO_SPEC_HD constexpr bool mode_uses_source(int mode) {
  return mode == kModeOut;
}

// Direction distributions (the dist code of a launch)
constexpr int kDistGaussian = 0;  // gaussian
constexpr int kDistSign = 1;  // rademacher
constexpr int kNumDists = 2;
constexpr const char* kDistNames[kNumDists] = {"gaussian", "rademacher"};  // indexed by code
constexpr int kSignGroup = 128;  // sign stream: elements per Philox call, counter k = g / 128

// Stochastic rounding (mode AXPBY_SR): Philox at key(sr_seed(seed)), counter k = g / 8, 16 bits each
constexpr int kSrGroup = 8;
constexpr uint64_t kSrSeedXor = 0x53525F524F554E44ull;  // "SR_ROUND"
constexpr uint64_t kSplitmixGolden = 0x9E3779B97F4A7C15ull;
constexpr uint64_t kSplitmixM1 = 0xBF58476D1CE4E5B9ull;
constexpr uint64_t kSplitmixM2 = 0x94D049BB133111EBull;
MEZO_SPEC_HD constexpr uint64_t splitmix64(uint64_t x) {
  x += kSplitmixGolden;
  x = (x ^ (x >> 30)) * kSplitmixM1;
  x = (x ^ (x >> 27)) * kSplitmixM2;
  return x ^ (x >> 31);
}
MEZO_SPEC_HD constexpr uint64_t sr_seed(uint64_t seed) { return splitmix64(seed ^ kSrSeedXor); }

// Element type codes
constexpr int kDTypeFloat32 = 0;  // float32
constexpr int kDTypeFloat16 = 1;  // float16
constexpr int kDTypeBfloat16 = 2;  // bfloat16
constexpr int kNumDTypes = 3;
constexpr const char* kDTypeNames[kNumDTypes] = {"float32", "float16", "bfloat16"};  // indexed by code

}  // namespace mezo
