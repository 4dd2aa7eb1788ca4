// CUDA backend: the fused seeded update over a plan (docs/kernel_abi.md), one block per chunk.
//
// Reference semantics (mezo_kernels/rng.py + docs/kernel_abi.md): for element i of tensor t, g = base[t] + i,
// z = z(seed, g) of the launch's distribution (gaussian: randn4x(seed, g >> 2)[g & 3]; sign: 1 - 2 * bit g & 127
// of Philox counter g >> 7), and the mode's effect as listed in spec_codes.h; AXPBY_SR rounds with sround.h and
// the 16 bits of the SR stream (Philox at key(sr_seed(seed)), counter g >> 3) at g.
//
// Work split: grid = num_chunks; a block walks the quads q (elements 4q .. 4q + 3 in global index) of its chunk,
// thread x taking q_lo + x, q_lo + x + kThreads, ... (kChunk / (4 kThreads) of them in a full chunk): neighbouring
// threads touch neighbouring 16-byte vectors, and the per-thread setup (plan rows, alignment) is paid once for
// several quads. Gaussian: one Philox call per quad (its 4 normals). Sign: one Philox call per 32 quads, computed
// by the first threads of the block into shared memory, so the kernel is left with the loads and stores.
// Pointers read from the plan are generic; global_ptr() tells the compiler they are global, so it emits LDG/STG.
// Explicit fmaf everywhere, no --use_fast_math: the result must equal Triton's (tl.fma) bit for bit.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../philox.h"
#include "../spec_codes.h"
#include "../sround.h"
#include "launch.h"

namespace mezo {
namespace cuda {
namespace {

// Storage traits: S is the element type, V the 4-element vector type (16 B for fp32, 8 B for 16-bit types).
struct F32 {
  using S = float;
  using V = float4;
  static constexpr bool kStochastic = false;  // AXPBY_SR is AXPBY: the fma result is already fp32
  __device__ static float ld(S v) { return v; }
  __device__ static S st(float v) { return v; }
  __device__ static void unpack(V v, float (&f)[4]) { f[0] = v.x; f[1] = v.y; f[2] = v.z; f[3] = v.w; }
  __device__ static V pack(const S (&f)[4]) { return make_float4(f[0], f[1], f[2], f[3]); }
};
template <class Cvt>
struct Half16 {  // fp16 / bf16 as raw uint16 bits; Cvt gives the round-to-nearest-even conversions
  using S = uint16_t;
  using V = uint2;  // element 0 in the low half of .x (little-endian)
  static constexpr bool kStochastic = true;
  __device__ static float ld(S v) { return Cvt::to_f32(v); }
  __device__ static S st(float v) { return Cvt::from_f32(v); }
  __device__ static S sr(float v, uint32_t r) { return Cvt::from_f32(Cvt::sround_value(v, r)); }
  __device__ static void unpack(V v, float (&f)[4]) {
    f[0] = ld(static_cast<S>(v.x & 0xffffu));
    f[1] = ld(static_cast<S>(v.x >> 16));
    f[2] = ld(static_cast<S>(v.y & 0xffffu));
    f[3] = ld(static_cast<S>(v.y >> 16));
  }
  __device__ static V pack(const S (&h)[4]) {
    return make_uint2(static_cast<uint32_t>(h[0]) | (static_cast<uint32_t>(h[1]) << 16),
                      static_cast<uint32_t>(h[2]) | (static_cast<uint32_t>(h[3]) << 16));
  }
};
struct CvtF16 {
  __device__ static float to_f32(uint16_t h) { return __half2float(__ushort_as_half(h)); }
  __device__ static uint16_t from_f32(float f) { return __half_as_ushort(__float2half_rn(f)); }
  __device__ static float sround_value(float y, uint32_t r) { return sround_f16_value(y, r); }
};
struct CvtBF16 {
  __device__ static float to_f32(uint16_t h) { return __bfloat162float(__ushort_as_bfloat16(h)); }
  __device__ static uint16_t from_f32(float f) { return __bfloat16_as_ushort(__float2bfloat16_rn(f)); }
  __device__ static float sround_value(float y, uint32_t r) { return sround_bf16_value(y, r); }
};
using F16 = Half16<CvtF16>;
using BF16 = Half16<CvtBF16>;

// Global-space accesses. The tensor pointers come from the meta table, so the compiler cannot tell their address
// space and would emit generic LD/ST (an address-space check on every access); every tensor and master lives in
// global memory, and ld.global.ca / st.global.wb are exactly the default caching of a plain load and store.
template <class T>
__device__ __forceinline__ T ld_global(const T* p) {
  return __ldca(p);
}
template <class T>
__device__ __forceinline__ void st_global(T* p, T v) {
  __stwb(p, v);
}

// The mode on one element: x is d (AXPBY, AXPBY_SR), m (master modes; MASTER_UPDATE updates it in place) or src
// (OUT); r the element's 16 SR bits. Returns the stored value of d.
template <class D, int MODE>
__device__ __forceinline__ typename D::S update(float z, float& x, uint32_t r, float alpha, float beta,
                                                float gamma) {
  if constexpr (MODE == kModeAxpby || MODE == kModeOut) {
    return D::st(fmaf(z, beta, alpha * x));
  } else if constexpr (MODE == kModeMasterUpdate) {
    x = fmaf(z, beta, alpha * x);
    return D::st(fmaf(z, gamma, x));
  } else if constexpr (MODE == kModeMasterView) {
    return D::st(fmaf(z, gamma, x));
  } else if constexpr (MODE == kModeFill) {
    return D::st(z);  // d is never read
  } else {
    static_assert(MODE == kModeAxpbySr, "kernel mode without an implementation");
    return D::sr(fmaf(z, beta, alpha * x), r);
  }
}

// A thread's quads within a window: with kChunk elements per chunk, each thread takes kQuadsPerThread quads,
// unrolled, so the per-thread setup (plan rows, alignment, sign words) is paid once for all of them.
constexpr int kQuadsPerThread = static_cast<int>(kChunk / (4 * kThreads));
constexpr int kWindowQuads = kQuadsPerThread * kThreads;
// Sign words of a window: 32 quads per sign counter, +1 for a window that does not start at a counter boundary.
constexpr int kWindowCounters = kWindowQuads / 32 + 1;
static_assert(kSignGroup == 128, "a sign counter covers 32 quads");
static_assert(kWindowCounters <= kThreads, "one thread per sign counter of a window");

// One quad: z of elements 4q .. 4q + 3 (and their SR bits), then the mode on those of them inside [start, end).
template <class D, int DIST, int MODE>
__device__ __forceinline__ void quad(int64_t q, typename D::S* __restrict__ d, float* __restrict__ m,
                                     const typename D::S* __restrict__ src, int64_t base, int64_t start,
                                     int64_t end, bool vec, const uint32_t* words, int64_t c_lo, uint64_t seed,
                                     uint64_t sr_seed, float alpha, float beta, float gamma) {
  using S = typename D::S;
  using V = typename D::V;
  constexpr bool kMaster = mode_uses_master(MODE), kSource = mode_uses_source(MODE);
  constexpr bool kReadsD = MODE == kModeAxpby || MODE == kModeAxpbySr;
  float z[4];
  if constexpr (DIST == kDistGaussian) {
    const F32x4 n = randn4x(seed, static_cast<uint64_t>(q));
    z[0] = n.x; z[1] = n.y; z[2] = n.z; z[3] = n.w;
  } else {
    // quad q holds bits 4 (q & 7) .. +3 of word (q >> 3) & 3 of counter q >> 5; bit 1 -> -1.0f (sign bit set)
    const uint32_t w = words[4 * static_cast<int>((q >> 5) - c_lo) + static_cast<int>((q >> 3) & 3)] >>
                       (4 * static_cast<uint32_t>(q & 7));
#pragma unroll
    for (int j = 0; j < 4; ++j) z[j] = __uint_as_float(0x3f800000u | ((w >> j) << 31));
  }
  uint32_t r[4] = {0u, 0u, 0u, 0u};
  if constexpr (MODE == kModeAxpbySr) {  // elements 4q .. 4q + 3: words 2 (q & 1), 2 (q & 1) + 1 of SR counter q >> 1
    const U32x4 w = philox_counter(sr_seed, static_cast<uint64_t>(q >> 1));
    const uint32_t lo = (q & 1) ? w.z : w.x, hi = (q & 1) ? w.w : w.y;
    r[0] = lo & 0xffffu; r[1] = lo >> 16; r[2] = hi & 0xffffu; r[3] = hi >> 16;
  }
  const int64_t i0 = 4 * q - base;  // element index of z[0]; may lie outside [start, end) at chunk edges
  if (vec && i0 + 4 <= end) {
    float x[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    S y[4];
    if constexpr (kReadsD) D::unpack(ld_global(reinterpret_cast<const V*>(d + i0)), x);
    if constexpr (kSource) D::unpack(ld_global(reinterpret_cast<const V*>(src + i0)), x);
    if constexpr (kMaster) {
      const float4 mv = ld_global(reinterpret_cast<const float4*>(m + i0));
      x[0] = mv.x; x[1] = mv.y; x[2] = mv.z; x[3] = mv.w;
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) y[j] = update<D, MODE>(z[j], x[j], r[j], alpha, beta, gamma);
    if constexpr (MODE == kModeMasterUpdate) {
      st_global(reinterpret_cast<float4*>(m + i0), make_float4(x[0], x[1], x[2], x[3]));
    }
    st_global(reinterpret_cast<V*>(d + i0), D::pack(y));
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t i = i0 + j;
      if (i < start || i >= end) continue;  // never touch memory outside this chunk's elements
      float x = 0.0f;
      if constexpr (kReadsD) x = D::ld(ld_global(d + i));
      if constexpr (kSource) x = D::ld(ld_global(src + i));
      if constexpr (kMaster) x = ld_global(m + i);
      const S y = update<D, MODE>(z[j], x, r[j], alpha, beta, gamma);
      if constexpr (MODE == kModeMasterUpdate) st_global(m + i, x);
      st_global(d + i, y);
    }
  }
}

// At least 4 blocks per SM (<= 64 registers): unrolled quads would otherwise hoist every load and take up to 128.
template <class D, int DIST, int MODE>
__global__ void __launch_bounds__(kThreads, 4)
    axpby_kernel(const int64_t* __restrict__ meta, int64_t T, const int64_t* __restrict__ chunks, int64_t chunk_size,
                 uint64_t seed, uint64_t sr_seed, float alpha, float beta, float gamma) {
  using S = typename D::S;
  using V = typename D::V;
  constexpr bool kMaster = mode_uses_master(MODE), kSource = mode_uses_source(MODE);
  const int64_t t = chunks[2 * static_cast<int64_t>(blockIdx.x)];
  const int64_t start = chunks[2 * static_cast<int64_t>(blockIdx.x) + 1];
  S* __restrict__ d = reinterpret_cast<S*>(meta[t]);
  float* __restrict__ m = kMaster ? reinterpret_cast<float*>(meta[3 * T + t]) : nullptr;
  const S* __restrict__ src = kSource ? reinterpret_cast<const S*>(meta[3 * T + t]) : nullptr;
  const int64_t numel = meta[T + t], base = meta[2 * T + t];
  const int64_t end = min(start + chunk_size, numel);
  const int64_t q_lo = (base + start) >> 2, q_hi = (base + end - 1) >> 2;  // inclusive quad range
  // 4-wide loads/stores need every quad's 4 elements to start on a vector boundary: base % 4 == 0 (then
  // 4q - base is a multiple of 4, and >= start because start is) and the tensor (and master/source) pointers
  // aligned to the vector size. Block-uniform, so no divergence; otherwise everything takes the masked scalar path.
  const bool vec = (base & 3) == 0 && (reinterpret_cast<uintptr_t>(d) % sizeof(V)) == 0 &&
                   (!kMaster || (reinterpret_cast<uintptr_t>(m) % sizeof(float4)) == 0) &&
                   (!kSource || (reinterpret_cast<uintptr_t>(src) % sizeof(V)) == 0);
  __shared__ uint4 words[DIST == kDistSign ? kWindowCounters : 1];
  // A chunk of kChunk elements is one window when its base is a multiple of 4, else one plus a single quad;
  // longer chunks (a caller's own chunk_size) take several.
  for (int64_t w_lo = q_lo; w_lo <= q_hi; w_lo += kWindowQuads) {
    const int64_t c_lo = w_lo >> 5;  // first sign counter of the window
    if constexpr (DIST == kDistSign) {
      const int64_t w_hi = min(w_lo + kWindowQuads - 1, q_hi);
      if (w_lo != q_lo) __syncthreads();  // every thread is done with the previous window's words
      if (threadIdx.x <= (w_hi >> 5) - c_lo) {
        const U32x4 w = philox_counter(seed, static_cast<uint64_t>(c_lo + threadIdx.x));
        words[threadIdx.x] = make_uint4(w.x, w.y, w.z, w.w);
      }
      __syncthreads();
    }
#pragma unroll
    for (int it = 0; it < kQuadsPerThread; ++it) {
      const int64_t q = w_lo + threadIdx.x + static_cast<int64_t>(it) * kThreads;
      if (q > q_hi) break;
      quad<D, DIST, MODE>(q, d, m, src, base, start, end, vec, reinterpret_cast<const uint32_t*>(words), c_lo, seed,
                          sr_seed, alpha, beta, gamma);
    }
  }
}

template <class D, int DIST, int MODE>
void launch(const int64_t* meta, int64_t T, const int64_t* chunks, int64_t C, int64_t cs, uint64_t seed, float a,
            float b, float g, cudaStream_t s) {
  const uint64_t srs = MODE == kModeAxpbySr ? sr_seed(seed) : 0;
  axpby_kernel<D, DIST, MODE><<<static_cast<unsigned>(C), kThreads, 0, s>>>(meta, T, chunks, cs, seed, srs, a, b, g);
}

template <class D, int DIST>
void launch_mode(int mode, const int64_t* meta, int64_t T, const int64_t* chunks, int64_t C, int64_t cs,
                 uint64_t seed, float a, float b, float g, cudaStream_t s) {
  static_assert(kNumModes == 6, "a new kernel mode needs a case here");
  switch (mode) {
    case kModeAxpby: return launch<D, DIST, kModeAxpby>(meta, T, chunks, C, cs, seed, a, b, g, s);
    case kModeMasterUpdate: return launch<D, DIST, kModeMasterUpdate>(meta, T, chunks, C, cs, seed, a, b, g, s);
    case kModeMasterView: return launch<D, DIST, kModeMasterView>(meta, T, chunks, C, cs, seed, a, b, g, s);
    case kModeFill: return launch<D, DIST, kModeFill>(meta, T, chunks, C, cs, seed, a, b, g, s);
    case kModeOut: return launch<D, DIST, kModeOut>(meta, T, chunks, C, cs, seed, a, b, g, s);
    case kModeAxpbySr:  // fp32: the fma result is already fp32, AXPBY_SR is AXPBY
      if constexpr (D::kStochastic) return launch<D, DIST, kModeAxpbySr>(meta, T, chunks, C, cs, seed, a, b, g, s);
      return launch<D, DIST, kModeAxpby>(meta, T, chunks, C, cs, seed, a, b, g, s);
    default: return;  // unreachable: the bindings reject unknown modes
  }
}

template <class D>
void launch_dist(int dist, int mode, const int64_t* meta, int64_t T, const int64_t* chunks, int64_t C, int64_t cs,
                 uint64_t seed, float a, float b, float g, cudaStream_t s) {
  static_assert(kNumDists == 2, "a new distribution needs a case here");
  switch (dist) {
    case kDistGaussian: return launch_mode<D, kDistGaussian>(mode, meta, T, chunks, C, cs, seed, a, b, g, s);
    case kDistSign: return launch_mode<D, kDistSign>(mode, meta, T, chunks, C, cs, seed, a, b, g, s);
    default: return;  // unreachable: the bindings reject unknown distributions
  }
}

}  // namespace

const char* launch_axpby(const int64_t* meta, int64_t num_tensors, const int64_t* chunks, int64_t num_chunks,
                         int64_t chunk_size, int dtype, int mode, int dist, uint64_t seed, float alpha, float beta,
                         float gamma, uintptr_t stream) {
  if (num_chunks == 0) return nullptr;
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  const int64_t T = num_tensors, C = num_chunks, cs = chunk_size;
  static_assert(kNumDTypes == 3, "a new dtype code needs a case here");
  switch (dtype) {
    case kDTypeFloat32: launch_dist<F32>(dist, mode, meta, T, chunks, C, cs, seed, alpha, beta, gamma, s); break;
    case kDTypeFloat16: launch_dist<F16>(dist, mode, meta, T, chunks, C, cs, seed, alpha, beta, gamma, s); break;
    case kDTypeBfloat16: launch_dist<BF16>(dist, mode, meta, T, chunks, C, cs, seed, alpha, beta, gamma, s); break;
    default: return "unknown dtype code";  // unreachable: the bindings reject it first
  }
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

}  // namespace cuda
}  // namespace mezo
