// CPU backend entry points (docs/kernel_abi.md), called by csrc/bindings_cpu.cpp with the GIL released.
//
// Reference semantics: element i of tensor t, g = base[t] + i, z = z(seed, g) of distribution `dist`
// (docs/rng_spec.md); `mode`, `dtype` and `dist` are the codes of spec_codes.h (kMode*, kDType*, kDist*),
// whose comments give each mode's effect.
// Arguments are assumed validated (bindings_cpu.cpp does it); these functions never throw.
#pragma once

#include <cstdint>

namespace mezo {
namespace cpu {

constexpr int64_t kChunk = 16384;  // elements per chunk: 64 KiB of fp32, stays in L2 across the load+store

// meta: [4, T] int64 (ptr, numel, base, master or source ptr); chunks: [C, 2] int64 (tensor, start).
// A source (mode OUT) must not overlap its destination.
void axpby(const int64_t* meta, int64_t num_tensors, const int64_t* chunks, int64_t num_chunks,
           int64_t chunk_size, int dtype, int mode, int dist, uint64_t seed, float alpha, float beta, float gamma);

// 4 words / 4 normals per counter for counters k_start .. k_start + n - 1 (k wraps mod 2^64).
void philox_words(uint64_t seed, uint64_t k_start, int64_t n, uint32_t* out);
void randn4x(uint64_t seed, uint64_t k_start, int64_t n, float* out);

int num_threads();
void set_num_threads(int n);  // n >= 1; applies to every later call from any Python thread
const char* build_info();

}  // namespace cpu
}  // namespace mezo
