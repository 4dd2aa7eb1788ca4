// CPU backend: the fused low-rank update of one 2-d tensor (docs/rng_spec.md, "Low-rank directions"), called by
// csrc/bindings_cpu.cpp with the GIL released. Arguments are assumed validated there; these functions never throw
// (except std::bad_alloc for the factor scratch, which the bindings turn into MemoryError).
//
// Reference semantics (mezo_kernels/rng/lowrank.py, mezo_kernels/perturb/lowrank.py): the full tensor has shape
// (M, N) and base b; this call holds its block of rows [row0, row0 + m) and columns [col0, col0 + n), stored
// contiguously (m x n, row-major). With U[i, k] = z(seed_u, b + i*r + k), V[j, k] = z(seed_v, b + M*r + j*r + k)
// (the CPU's Gaussian stream, bit-identical to randn4x),
//   zz[i, j] = fp32( (sum_{k = 0..r-1} f64(U[i,k]) * f64(V[j,k]), accumulated in that order) / sqrt_f64(r) )
//   y        = fma_f32(zz, beta, fp32(alpha * W[i, j]))
//   W[i, j]  = round(y): to nearest even, or (stochastic, fp16/bf16 only) sround with the 16 SR bits of seed_u at
//              the element's global index g = b + i*N + j (i, j in the full tensor), as mode AXPBY_SR.
// Nothing outside the m x n block is read or written.
#pragma once

#include <cstdint>

namespace mezo {
namespace cpu {

struct LowrankJob {
  void* w;                      // the block, m x n contiguous, of dtype code `dtype`
  int64_t m, n;                 // block shape
  int64_t row0, col0, M, N;     // block position in the full (M, N) tensor
  int64_t r, base;              // rank, the tensor's global base index
  int dtype;
  bool stochastic;              // SR rounding (ignored for fp32)
  uint64_t seed_u, seed_v;
  float alpha, beta;
};

void lowrank_update(const LowrankJob& job);

// z(seed, g0 + e) for e in [0, count): the CPU's Gaussian stream at any (unaligned) start.
void normals(uint64_t seed, uint64_t g0, int64_t count, float* out);

}  // namespace cpu
}  // namespace mezo
