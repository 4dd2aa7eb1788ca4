// CUDA backend: the fused seeded-Gaussian update over a plan (docs/kernel_abi.md), one block per chunk.
//
// Reference semantics (mezo_kernels/rng.py + docs/kernel_abi.md): for element i of tensor t, g = base[t] + i,
// z = randn4x(seed, g >> 2)[g & 3];
//   mode 0: d = round(fma(z, beta, alpha*d))    mode 1: m' = fma(z, beta, alpha*m); m = m'; d = round(fma(z, gamma, m'))
//   mode 2: d = round(fma(z, gamma, m))         mode 3: d = round(z)
//
// Work split: grid = num_chunks; thread x of a block takes counters k_lo + x, k_lo + x + blockDim, ... of its
// chunk, so one Philox call feeds the 4 elements 4k..4k+3 (with kChunk = 4 * kThreads each thread does exactly
// one counter, plus one extra counter in thread 0 when the base is not a multiple of 4). The kernel is then
// bound by memory bandwidth, not by Philox/Box-Muller.
// Explicit fmaf everywhere, no --use_fast_math: the result must equal Triton's (tl.fma) bit for bit.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../philox.h"
#include "launch.h"

namespace mezo {
namespace cuda {
namespace {

// Storage traits: S is the element type, V the 4-element vector type (16 B for fp32, 8 B for 16-bit types).
struct F32 {
  using S = float;
  using V = float4;
  __device__ static float ld(S v) { return v; }
  __device__ static S st(float v) { return v; }
  __device__ static void unpack(V v, float (&f)[4]) { f[0] = v.x; f[1] = v.y; f[2] = v.z; f[3] = v.w; }
  __device__ static V pack(const float (&f)[4]) { return make_float4(f[0], f[1], f[2], f[3]); }
};
template <class Cvt>
struct Half16 {  // fp16 / bf16 as raw uint16 bits; Cvt gives the round-to-nearest-even conversions
  using S = uint16_t;
  using V = uint2;  // element 0 in the low half of .x (little-endian)
  __device__ static float ld(S v) { return Cvt::to_f32(v); }
  __device__ static S st(float v) { return Cvt::from_f32(v); }
  __device__ static void unpack(V v, float (&f)[4]) {
    f[0] = ld(static_cast<S>(v.x & 0xffffu));
    f[1] = ld(static_cast<S>(v.x >> 16));
    f[2] = ld(static_cast<S>(v.y & 0xffffu));
    f[3] = ld(static_cast<S>(v.y >> 16));
  }
  __device__ static V pack(const float (&f)[4]) {
    return make_uint2(static_cast<uint32_t>(st(f[0])) | (static_cast<uint32_t>(st(f[1])) << 16),
                      static_cast<uint32_t>(st(f[2])) | (static_cast<uint32_t>(st(f[3])) << 16));
  }
};
struct CvtF16 {
  __device__ static float to_f32(uint16_t h) { return __half2float(__ushort_as_half(h)); }
  __device__ static uint16_t from_f32(float f) { return __half_as_ushort(__float2half_rn(f)); }
};
struct CvtBF16 {
  __device__ static float to_f32(uint16_t h) { return __bfloat162float(__ushort_as_bfloat16(h)); }
  __device__ static uint16_t from_f32(float f) { return __bfloat16_as_ushort(__float2bfloat16_rn(f)); }
};
using F16 = Half16<CvtF16>;
using BF16 = Half16<CvtBF16>;

// The mode on one fp32 value; x is d (mode 0) or m (modes 1, 2; updated in place for mode 1).
template <int MODE>
__device__ __forceinline__ float update(float z, float& x, float alpha, float beta, float gamma) {
  if constexpr (MODE == 0) {
    return fmaf(z, beta, alpha * x);
  } else if constexpr (MODE == 1) {
    x = fmaf(z, beta, alpha * x);
    return fmaf(z, gamma, x);
  } else if constexpr (MODE == 2) {
    return fmaf(z, gamma, x);
  } else {
    return z;  // FILL: d is never read
  }
}

template <class D, int MODE>
__global__ void __launch_bounds__(kThreads)
    axpby_kernel(const int64_t* __restrict__ meta, int64_t T, const int64_t* __restrict__ chunks, int64_t chunk_size,
                 uint64_t seed, float alpha, float beta, float gamma) {
  using S = typename D::S;
  constexpr bool kMaster = MODE == 1 || MODE == 2;
  const int64_t t = chunks[2 * static_cast<int64_t>(blockIdx.x)];
  const int64_t start = chunks[2 * static_cast<int64_t>(blockIdx.x) + 1];
  S* __restrict__ d = reinterpret_cast<S*>(meta[t]);
  float* __restrict__ m = kMaster ? reinterpret_cast<float*>(meta[3 * T + t]) : nullptr;
  const int64_t numel = meta[T + t], base = meta[2 * T + t];
  const int64_t end = min(start + chunk_size, numel);
  const int64_t k_lo = (base + start) >> 2, k_hi = (base + end - 1) >> 2;  // inclusive counter range
  // 4-wide loads/stores need every counter's 4 elements to start on a vector boundary: base % 4 == 0 (then
  // 4k - base is a multiple of 4, and >= start because start is) and the tensor (and master) pointers aligned
  // to the vector size. Block-uniform, so no divergence; otherwise everything takes the masked scalar path.
  const bool vec = (base & 3) == 0 && (reinterpret_cast<uintptr_t>(d) % sizeof(typename D::V)) == 0 &&
                   (!kMaster || (reinterpret_cast<uintptr_t>(m) % sizeof(float4)) == 0);
  for (int64_t k = k_lo + threadIdx.x; k <= k_hi; k += blockDim.x) {
    const F32x4 n = randn4x(seed, static_cast<uint64_t>(k));
    const float z[4] = {n.x, n.y, n.z, n.w};
    const int64_t i0 = 4 * k - base;  // element index of z[0]; may lie outside [start, end) at chunk edges
    if (vec && i0 + 4 <= end) {
      float x[4] = {0.0f, 0.0f, 0.0f, 0.0f}, y[4];
      if constexpr (MODE == 0) D::unpack(reinterpret_cast<const typename D::V*>(d + i0)[0], x);
      if constexpr (kMaster) {
        const float4 mv = reinterpret_cast<const float4*>(m + i0)[0];
        x[0] = mv.x; x[1] = mv.y; x[2] = mv.z; x[3] = mv.w;
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) y[j] = update<MODE>(z[j], x[j], alpha, beta, gamma);
      if constexpr (MODE == 1) reinterpret_cast<float4*>(m + i0)[0] = make_float4(x[0], x[1], x[2], x[3]);
      reinterpret_cast<typename D::V*>(d + i0)[0] = D::pack(y);
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t i = i0 + j;
        if (i < start || i >= end) continue;  // never touch memory outside this chunk's elements
        float x = 0.0f;
        if constexpr (MODE == 0) x = D::ld(d[i]);
        if constexpr (kMaster) x = m[i];
        const float y = update<MODE>(z[j], x, alpha, beta, gamma);
        if constexpr (MODE == 1) m[i] = x;
        d[i] = D::st(y);
      }
    }
  }
}

template <class D, int MODE>
void launch(const int64_t* meta, int64_t T, const int64_t* chunks, int64_t C, int64_t cs, uint64_t seed, float a,
            float b, float g, cudaStream_t s) {
  axpby_kernel<D, MODE><<<static_cast<unsigned>(C), kThreads, 0, s>>>(meta, T, chunks, cs, seed, a, b, g);
}

template <class D>
void launch_mode(int mode, const int64_t* meta, int64_t T, const int64_t* chunks, int64_t C, int64_t cs,
                 uint64_t seed, float a, float b, float g, cudaStream_t s) {
  switch (mode) {
    case 0: return launch<D, 0>(meta, T, chunks, C, cs, seed, a, b, g, s);
    case 1: return launch<D, 1>(meta, T, chunks, C, cs, seed, a, b, g, s);
    case 2: return launch<D, 2>(meta, T, chunks, C, cs, seed, a, b, g, s);
    default: return launch<D, 3>(meta, T, chunks, C, cs, seed, a, b, g, s);
  }
}

}  // namespace

const char* launch_axpby(const int64_t* meta, int64_t num_tensors, const int64_t* chunks, int64_t num_chunks,
                         int64_t chunk_size, int dtype, int mode, uint64_t seed, float alpha, float beta,
                         float gamma, uintptr_t stream) {
  if (num_chunks == 0) return nullptr;
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case 0: launch_mode<F32>(mode, meta, num_tensors, chunks, num_chunks, chunk_size, seed, alpha, beta, gamma, s); break;
    case 1: launch_mode<F16>(mode, meta, num_tensors, chunks, num_chunks, chunk_size, seed, alpha, beta, gamma, s); break;
    default: launch_mode<BF16>(mode, meta, num_tensors, chunks, num_chunks, chunk_size, seed, alpha, beta, gamma, s);
  }
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

}  // namespace cuda
}  // namespace mezo
