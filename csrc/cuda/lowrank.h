// Host-side entry of the CUDA low-rank update (implemented in lowrank.cu). Plain C++ types only, so
// csrc/bindings_cuda.cpp compiles with the host compiler and no CUDA headers.
//
// Reference semantics: csrc/cpu/lowrank.h (the same job, the same bits given the same U and V); the Gaussian stream
// is the device one of philox.h (bit-identical to _C_cuda.randn4x and to the Triton kernels).
#pragma once

#include <cstdint>

namespace mezo {
namespace cuda {

// The update kernel's block tile (rows x columns of W); the factor scratch pads U's and V's rows to its multiples.
constexpr int64_t kLowrankTileM = 64;
constexpr int64_t kLowrankTileN = 64;
constexpr int64_t kLowrankMaxRank = 65536;   // the kernels keep r in 32 bits and the padding entries below 2^22

struct LowrankLaunch {
  void* w;                      // the block, m x n contiguous (row-major), device memory, dtype code `dtype`
  int64_t m, n;                 // block shape
  int64_t row0, col0, M, N;     // block position in the full (M, N) tensor
  int64_t r, base;              // rank, the tensor's global base index
  int dtype;
  bool stochastic;              // SR rounding (ignored for fp32)
  uint64_t seed_u, seed_v;
  float alpha, beta;
  double* scratch;              // >= lowrank_scratch_doubles(m, n, r) doubles of device memory, any contents
  uintptr_t stream;             // cudaStream_t
};

// Doubles of scratch one launch needs: r * (m rounded up to kLowrankTileM + n rounded up to kLowrankTileN).
inline int64_t lowrank_scratch_doubles(int64_t m, int64_t n, int64_t r) {
  const int64_t mp = (m + kLowrankTileM - 1) / kLowrankTileM * kLowrankTileM;
  const int64_t np = (n + kLowrankTileN - 1) / kLowrankTileN * kLowrankTileN;
  return r * (mp + np);
}

// Tiles of the update kernel's grid (one block each); the bindings require < 2**31.
inline int64_t lowrank_tiles(int64_t m, int64_t n) {
  return ((m + kLowrankTileM - 1) / kLowrankTileM) * ((n + kLowrankTileN - 1) / kLowrankTileN);
}

// Both launches on `stream`; nullptr on success, else the CUDA error string after them.
const char* launch_lowrank(const LowrankLaunch& job);

}  // namespace cuda
}  // namespace mezo
