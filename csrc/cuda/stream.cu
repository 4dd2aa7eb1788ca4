// CUDA backend: raw Philox words and normals for a counter range (docs/kernel_abi.md philox_words/randn4x),
// used by the cross-backend tests to compare streams, and build_info().
//
// Reference semantics: out[4i + j] = philox(seed, k_start + i)[j] / randn4x(seed, k_start + i)[j]
// (docs/rng_spec.md), k wrapping mod 2^64. One thread per counter, grid-stride so any n fits in a
// bounded grid; 16-byte stores when out is 16-byte aligned (always for torch allocations), else 4 scalar stores.
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>

#include "../philox.h"
#include "launch.h"

namespace mezo {
namespace cuda {
namespace {

template <class W, class V, class Gen>
__global__ void __launch_bounds__(kThreads) counters_kernel(uint64_t seed, uint64_t k_start, int64_t n, W* out,
                                                            bool aligned16, Gen gen) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    W v[4];
    gen(seed, k_start + static_cast<uint64_t>(i), v);
    if (aligned16) {
      V q;  // uint4 / float4: one 16-byte store per counter
      q.x = v[0]; q.y = v[1]; q.z = v[2]; q.w = v[3];
      reinterpret_cast<V*>(out)[i] = q;
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j) out[4 * i + j] = v[j];
    }
  }
}

struct WordsGen {
  __device__ void operator()(uint64_t seed, uint64_t k, uint32_t (&v)[4]) const {
    const U32x4 w = philox_counter(seed, k);
    v[0] = w.x; v[1] = w.y; v[2] = w.z; v[3] = w.w;
  }
};
struct NormalGen {
  __device__ void operator()(uint64_t seed, uint64_t k, float (&v)[4]) const {
    const F32x4 z = randn4x(seed, k);
    v[0] = z.x; v[1] = z.y; v[2] = z.z; v[3] = z.w;
  }
};

template <class W, class V, class Gen>
const char* launch_counters(uint64_t seed, uint64_t k_start, int64_t n, W* out, uintptr_t stream) {
  if (n <= 0) return nullptr;
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  const unsigned grid = static_cast<unsigned>(blocks < (int64_t{1} << 20) ? blocks : (int64_t{1} << 20));
  const bool aligned16 = reinterpret_cast<uintptr_t>(out) % 16 == 0;
  counters_kernel<W, V, Gen><<<grid, kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(seed, k_start, n, out,
                                                                                         aligned16, Gen{});
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

}  // namespace

const char* launch_philox_words(uint64_t seed, uint64_t k_start, int64_t n, uint32_t* out, uintptr_t stream) {
  return launch_counters<uint32_t, uint4, WordsGen>(seed, k_start, n, out, stream);
}

const char* launch_randn4x(uint64_t seed, uint64_t k_start, int64_t n, float* out, uintptr_t stream) {
  return launch_counters<float, float4, NormalGen>(seed, k_start, n, out, stream);
}

const char* build_info() {
  static char buf[256];
  static const int once = std::snprintf(buf, sizeof buf,
                                        "mezo_kernels._C_cuda: nvcc %d.%d; archs %s; static cudart; chunk %lld "
                                        "elements, %d threads/block; no fast-math",
                                        __CUDACC_VER_MAJOR__, __CUDACC_VER_MINOR__,
#if defined(MEZO_CUDA_ARCHS_STR)
                                        MEZO_CUDA_ARCHS_STR,
#else
                                        "?",
#endif
                                        static_cast<long long>(kChunk), kThreads);
  (void)once;
  return buf;
}

}  // namespace cuda
}  // namespace mezo
