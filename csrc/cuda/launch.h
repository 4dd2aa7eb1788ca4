// Host-side entry points of the CUDA backend (docs/kernel_abi.md), implemented in axpby.cu / stream.cu.
// Plain C++ types only, so csrc/bindings_cuda.cpp compiles with the host compiler and no CUDA headers.
// Each returns nullptr on success or the CUDA error string of cudaGetLastError() after the launch.
//
// Reference semantics: as csrc/cpu/kernel.h (the kernel modes on a plan; z of distribution `dist` from
// docs/rng_spec.md).
#pragma once

#include <cstdint>

namespace mezo {
namespace cuda {

constexpr int kThreads = 256;                 // threads per block
constexpr int64_t kChunk = 16 * kThreads;     // elements per chunk: 4 quads (Gaussian Philox counters) per thread

const char* launch_axpby(const int64_t* meta, int64_t num_tensors, const int64_t* chunks, int64_t num_chunks,
                         int64_t chunk_size, int dtype, int mode, int dist, uint64_t seed, float alpha, float beta,
                         float gamma, uintptr_t stream);
const char* launch_philox_words(uint64_t seed, uint64_t k_start, int64_t n, uint32_t* out, uintptr_t stream);
const char* launch_randn4x(uint64_t seed, uint64_t k_start, int64_t n, float* out, uintptr_t stream);
const char* build_info();

}  // namespace cuda
}  // namespace mezo
