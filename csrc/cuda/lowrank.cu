// CUDA backend: the fused low-rank update W <- round(fma(U Vᵀ/√r, beta, alpha W)) of one 2-d tensor or block
// (docs/rng_spec.md, "Low-rank directions"; semantics as csrc/cpu/lowrank.h, reference perturb/lowrank.py):
//   U[i, k] = z(seed_u, b + (row0 + i) r + k),  V[j, k] = z(seed_v, b + M r + (col0 + j) r + k),
//   zz[i, j] = fp32((sum_{k = 0..r-1} f64(U[i,k]) f64(V[j,k]), accumulated in that order) / sqrt_f64(r)),
//   W[i, j]  = round(fmaf(zz, beta, alpha W[i, j])): to nearest even, or (stochastic, fp16/bf16) sround with the 16
//              SR bits of seed_u at g = b + (row0 + i) N + col0 + j, exactly as mode AXPBY_SR reads them.
//
// Two launches on the caller's stream:
//   1. factors_kernel: the r (m + n) normals of U's and V's rows, one randn4x (philox.h: the very Philox words and
//      device Box-Muller of axpby.cu / stream.cu, so the stream is _C_cuda.randn4x's and Triton's bit for bit) per
//      counter, stored as float64 (exact) in the scratch, transposed and zero-padded to whole tiles:
//      Ut[k][i] (r x mp) then Vt[k][j] (r x np).
//   2. lowrank_kernel: one block of 128 threads per 64 x 64 tile of W; a thread owns 4 consecutive rows x 8 columns,
//      accumulates the 32 sums with one DFMA per element and k (the products are exact in float64, so the fma
//      rounds exactly as acc + p does), reading per k two 16-byte vectors of Ut and four of Vt (L1/L2 hits: the
//      threads of a row / column group read the same ones), then loads its W vectors. Columns: 16-bit dtypes take
//      8 consecutive ones (one 16-byte access per row, one SR Philox call per row when the row's global index is a
//      multiple of 8); fp32 two quads 32 columns apart, so each float4 instruction of a warp covers 128 contiguous
//      bytes per row.
//
// Why a pre-pass and not the factors regenerated inside the update kernel: a tile of BM x BN elements needs
// r (BM + BN) normals, so regenerating them in every tile costs r (BM + BN) / (BM BN) normals per element (r / 32 at
// 64 x 64: half a normal per element at r = 16, about 20 SASS instructions, half of what a bf16 pass may spend per
// element at H100 bandwidth), and the larger tiles that would amortise it leave most SMs idle on the small matrices
// of the target models (a 192 x 576 SmolLM2 projection is 27 tiles of 64 x 64). The pre-pass draws each normal once
// (r (m + n) / 4 Philox calls per tensor); the scratch is r (mp + np) doubles (L2-resident for every shape of the
// target models) and holds them as float64 so the update kernel never converts (F2F.F64.F32 issues at 1/8 of the
// fp32 rate on sm_80/sm_90). The cost is a second launch per tensor.
// Explicit fmaf/fma, no --use_fast_math (CMakeLists.txt): the bits must be the reference's.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "../philox.h"
#include "../spec_codes.h"
#include "../sround.h"
#include "lowrank.h"

namespace mezo {
namespace cuda {
namespace {

constexpr int kLrThreads = 128;       // 4 warps: 16 row groups (4 rows each) x 8 column groups (8 columns each)
constexpr int kFactorThreads = 256;
constexpr int kRowsPT = 4, kColsPT = 8;
static_assert(kLrThreads / 8 * kRowsPT == kLowrankTileM && 8 * kColsPT == kLowrankTileN, "tile = threads x 4 x 8");

// Storage traits. S: the element; Vec: a thread's vector of one row (8 columns: 16 B for 16-bit types, two float4 for
// fp32); col(tx, c): the tile column of the thread's c-th element.
struct LrF32 {
  using S = float;
  struct Vec {
    float4 a, b;
  };
  __device__ static int col(int tx, int c) { return c < 4 ? 4 * tx + c : 32 + 4 * tx + (c - 4); }
  __device__ static bool vec_ok(int64_t n, const void* w) {
    return n % 4 == 0 && reinterpret_cast<uintptr_t>(w) % 16 == 0;
  }
  __device__ static float ld(S v) { return v; }
  __device__ static S st(float v) { return v; }
  __device__ static S sr(float v, uint32_t) { return v; }
  __device__ static Vec load(const S* p) { return Vec{__ldca(reinterpret_cast<const float4*>(p)),
                                                      __ldca(reinterpret_cast<const float4*>(p + 32))}; }
  __device__ static void unpack(const Vec& v, float (&f)[8]) {
    f[0] = v.a.x; f[1] = v.a.y; f[2] = v.a.z; f[3] = v.a.w; f[4] = v.b.x; f[5] = v.b.y; f[6] = v.b.z; f[7] = v.b.w;
  }
  __device__ static void store(S* p, const S (&y)[8]) {
    __stwb(reinterpret_cast<float4*>(p), make_float4(y[0], y[1], y[2], y[3]));
    __stwb(reinterpret_cast<float4*>(p + 32), make_float4(y[4], y[5], y[6], y[7]));
  }
};
template <class Cvt>
struct LrHalf {   // fp16 / bf16 as raw uint16 bits; element 0 in the low half of .x (little-endian)
  using S = uint16_t;
  using Vec = uint4;
  __device__ static int col(int tx, int c) { return 8 * tx + c; }
  __device__ static bool vec_ok(int64_t n, const void* w) {
    return n % 8 == 0 && reinterpret_cast<uintptr_t>(w) % 16 == 0;
  }
  __device__ static float ld(S v) { return Cvt::to_f32(v); }
  __device__ static S st(float v) { return Cvt::from_f32(v); }
  __device__ static S sr(float v, uint32_t r) { return Cvt::from_f32(Cvt::sround_value(v, r)); }
  __device__ static Vec load(const S* p) { return __ldca(reinterpret_cast<const uint4*>(p)); }
  __device__ static void unpack(const Vec& v, float (&f)[8]) {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      f[2 * q] = ld(static_cast<S>(w[q] & 0xffffu));
      f[2 * q + 1] = ld(static_cast<S>(w[q] >> 16));
    }
  }
  __device__ static void store(S* p, const S (&h)[8]) {
    uint32_t w[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) w[q] = static_cast<uint32_t>(h[2 * q]) | (static_cast<uint32_t>(h[2 * q + 1]) << 16);
    __stwb(reinterpret_cast<uint4*>(p), make_uint4(w[0], w[1], w[2], w[3]));
  }
};
struct LrCvtF16 {
  __device__ static float to_f32(uint16_t h) { return __half2float(__ushort_as_half(h)); }
  __device__ static uint16_t from_f32(float f) { return __half_as_ushort(__float2half_rn(f)); }
  __device__ static float sround_value(float y, uint32_t r) { return sround_f16_value(y, r); }
};
struct LrCvtBF16 {
  __device__ static float to_f32(uint16_t h) { return __bfloat162float(__ushort_as_bfloat16(h)); }
  __device__ static uint16_t from_f32(float f) { return __bfloat16_as_ushort(__float2bfloat16_rn(f)); }
  __device__ static float sround_value(float y, uint32_t r) { return sround_bf16_value(y, r); }
};
using LrF16 = LrHalf<LrCvtF16>;
using LrBF16 = LrHalf<LrCvtBF16>;

// e / r and e % r for the pre-pass, without the 64-bit division subroutine: 32-bit division when e fits (every shape
// of the target models), else two rounds of a float64 estimate (the first leaves |rem| < 2^11 r, the second is off by
// at most one) and a final correction.
__device__ __forceinline__ void divmod(int64_t e, int r, double inv_r, int64_t& q, int64_t& rem) {
  if (e <= 0xffffffffll) {
    const uint32_t q32 = static_cast<uint32_t>(e) / static_cast<uint32_t>(r);
    q = q32;
    rem = static_cast<int64_t>(static_cast<uint32_t>(e) - q32 * static_cast<uint32_t>(r));
    return;
  }
  q = static_cast<int64_t>(static_cast<double>(e) * inv_r);
  rem = e - q * r;
  const int64_t dq = static_cast<int64_t>(floor(static_cast<double>(rem) * inv_r));
  q += dq;
  rem -= dq * r;
  if (rem < 0) q -= 1, rem += r;
  if (rem >= r) q += 1, rem -= r;
}

// Pre-pass. U is stored times u_scale: 1/sqrt(r) when that is a power of two (r = 1, 4, 16, ...), else 1. Scaling
// by a power of two is exact and commutes with every rounding of the sum (no under/overflow: |U V| >= 2^-300), so
// the update kernel's sum is then already acc / sqrt(r), bit for bit, and it skips a multiply per element.
// Work items, grid-stride: [0, cu) the Philox counters of U, [cu, cu + cv) those of V (one randn4x each,
// its up to 4 normals scattered to Ut / Vt), then the r (mp - m) + r (np - n) padding entries (zeroed, so the update
// kernel reads defined values past the tensor's edge without a bounds check).
__global__ void __launch_bounds__(kFactorThreads)
    factors_kernel(uint64_t seed_u, uint64_t seed_v, int64_t gu0, int64_t gv0, int64_t m, int64_t n, int r,
                   int64_t mp, int64_t np, int64_t cu, int64_t cv, double inv_r, double u_scale,
                   double* __restrict__ ut, double* __restrict__ vt) {
  const int64_t pu = r * (mp - m), pv = r * (np - n), total = cu + cv + pu + pv;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total; t += stride) {
    if (t < cu + cv) {
      const bool is_u = t < cu;
      const int64_t g_first = is_u ? gu0 : gv0, count = (is_u ? m : n) * r, rows = is_u ? mp : np;
      double* __restrict__ out = is_u ? ut : vt;
      const int64_t c = (g_first >> 2) + (is_u ? t : t - cu);
      const F32x4 z4 = randn4x(is_u ? seed_u : seed_v, static_cast<uint64_t>(c));
      const float z[4] = {z4.x, z4.y, z4.z, z4.w};
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int64_t e = 4 * c + q - g_first;   // index into the factor, row-major [rows][r]
        if (e < 0 || e >= count) continue;
        int64_t i, k;
        divmod(e, r, inv_r, i, k);
        out[k * rows + i] = static_cast<double>(z[q]) * (is_u ? u_scale : 1.0);   // exact: a power of two
      }
    } else {
      // r (mp - m) < 2^22 entries (r <= 2^16, checked by the bindings): 32-bit division
      const bool is_u = t - cu - cv < pu;
      const uint32_t p = static_cast<uint32_t>(t - cu - cv - (is_u ? 0 : pu));
      const uint32_t width = static_cast<uint32_t>(is_u ? mp - m : np - n), k = p / width;
      (is_u ? ut : vt)[k * (is_u ? mp : np) + (is_u ? m : n) + (p - k * width)] = 0.0;
    }
  }
}

// The 16 SR bits of the 8 consecutive elements from global index g (counter g >> 3, word (g & 7) >> 1, half g & 1):
// one Philox call when g is a multiple of 8, else two (only for bases, N or col0 that are not multiples of 8).
__device__ __forceinline__ void sr_octet(uint64_t sr_seed, int64_t g, uint32_t (&rb)[8]) {
  const U32x4 a = philox_counter(sr_seed, static_cast<uint64_t>(g >> 3));
  const int off = static_cast<int>(g & 7);
  if (off == 0) {
    const uint32_t w[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
    for (int q = 0; q < 4; ++q) rb[2 * q] = w[q] & 0xffffu, rb[2 * q + 1] = w[q] >> 16;
    return;
  }
  const U32x4 b = philox_counter(sr_seed, static_cast<uint64_t>(g >> 3) + 1);
  uint32_t w[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
  // halves off .. off + 7 of the two counters' 16: shift by (off >> 1) words in two steps, then by one half
  // (constant indices only: a runtime index would put w in local memory)
  const int s = off >> 1;
#pragma unroll
  for (int q = 0; q < 6; ++q) w[q] = (s & 2) ? w[q + 2] : w[q];
#pragma unroll
  for (int q = 0; q < 5; ++q) w[q] = (s & 1) ? w[q + 1] : w[q];
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const uint32_t v = (off & 1) ? __funnelshift_r(w[q], w[q + 1], 16) : w[q];
    rb[2 * q] = v & 0xffffu, rb[2 * q + 1] = v >> 16;
  }
}

// s / d correctly rounded, without the division subroutine (a CALL ptxas keeps out of line, and 20-odd instructions):
// with y = RN(1/d) and the faithful q0 = RN(s y), the remainder r = s - q0 d is exact in one fma and RN(q0 + r y)
// is RN(s / d) (Markstein's theorem, Muller et al., Handbook of Floating-Point Arithmetic, sec. 4.7), barring
// under/overflow, which cannot occur here: s is 0 or at least 2^-298 in magnitude (a sum of fp32 products) and
// d = sqrt(r) >= 1. Also checked against s / d on 6e7 random s for every r = 2 .. 3000 (host g++, the same IEEE ops).
// When d is a power of two, y is exact, r = 0 and the result is q0 = s y.
__host__ __device__ __forceinline__ double div_sqrt_r(double s, double d, double y) {
  const double q0 = s * y;
  return fma(fma(-q0, d, s), y, q0);
}

// sqrt(R) is a power of two (R = 1, 4, 16, ...): dividing by it is multiplying by its inverse, bit for bit.
__host__ __device__ constexpr bool sqrt_is_pow2(int R) {
  for (int s = 1; s * s <= R; s *= 2)
    if (s * s == R) return true;
  return false;
}

// R > 0: the rank as a compile-time constant (the k loop unrolled); R == 0: any rank, r_rt at run time.
template <class D, bool SR, int R>
__global__ void __launch_bounds__(kLrThreads, 3)
    lowrank_kernel(typename D::S* __restrict__ w, int64_t m, int64_t n, int64_t tiles_n, const double* __restrict__ ut,
                   const double* __restrict__ vt, int64_t mp, int64_t np, int r_rt, int64_t N, int64_t g0,
                   uint64_t sr_seed, float alpha, float beta, double sqrt_r, double inv_sqrt_r, bool prescaled) {
  using S = typename D::S;
  const int r = R > 0 ? R : r_rt;
  // tiles < 2**31 (the bindings check it): a 32-bit division, not the 64-bit one's subroutine call
  const uint32_t ti32 = blockIdx.x / static_cast<uint32_t>(tiles_n);
  const int64_t ti = ti32, tj = blockIdx.x - ti32 * static_cast<uint32_t>(tiles_n);
  const int tx = threadIdx.x & 7, ty = threadIdx.x >> 3;
  const int64_t i0 = ti * kLowrankTileM + kRowsPT * ty;        // the thread's first row
  const int64_t j0 = tj * kLowrankTileN + D::col(tx, 0);       // the thread's first column
  const int64_t j_last = tj * kLowrankTileN + D::col(tx, kColsPT - 1);
  // 16-byte accesses need every row's first element aligned: block-uniform (n and the pointer), then per row whether
  // all 8 columns are inside the tensor; the rest takes the masked scalar path.
  const bool vec = D::vec_ok(n, w) && j_last < n;

  // acc[a][c] = sum_k Ut[k][i0 + a] Vt[k][col c]: k = 0 a product, then one fma per k (exact products).
  double acc[kRowsPT][kColsPT];
  const double* __restrict__ up = ut + i0;
  const double* __restrict__ vp = vt + j0;
  auto factors = [&](int k, double (&u)[kRowsPT], double (&v)[kColsPT]) {
    const double2 u01 = __ldg(reinterpret_cast<const double2*>(up + k * mp));
    const double2 u23 = __ldg(reinterpret_cast<const double2*>(up + k * mp + 2));
    u[0] = u01.x; u[1] = u01.y; u[2] = u23.x; u[3] = u23.y;
#pragma unroll
    for (int h = 0; h < 4; ++h) {   // columns c = 2h, 2h + 1: contiguous pairs (fp32: the second quad 32 further)
      const double2 p = __ldg(reinterpret_cast<const double2*>(vp + k * np + D::col(0, 2 * h)));
      v[2 * h] = p.x; v[2 * h + 1] = p.y;
    }
  };
  {
    double u[kRowsPT], v[kColsPT];
    factors(0, u, v);
#pragma unroll
    for (int a = 0; a < kRowsPT; ++a)
#pragma unroll
      for (int c = 0; c < kColsPT; ++c) acc[a][c] = u[a] * v[c];
  }
#pragma unroll
  for (int k = 1; k < (R > 0 ? R : r); ++k) {
    double u[kRowsPT], v[kColsPT];
    factors(k, u, v);
#pragma unroll
    for (int a = 0; a < kRowsPT; ++a)
#pragma unroll
      for (int c = 0; c < kColsPT; ++c) acc[a][c] = fma(u[a], v[c], acc[a][c]);
  }

  // 16-bit types: the W vectors of all rows first (16 registers), so their latency overlaps the scaling and the SR
  // Philox calls below; fp32 (32 registers for 4 rows) loads each row where it is used, or ptxas spills
  constexpr bool kAhead = sizeof(typename D::S) == 2;
  typename D::Vec raw[kRowsPT];
#pragma unroll
  for (int a = 0; a < kRowsPT; ++a)
    if (kAhead && vec && i0 + a < m) raw[a] = D::load(w + (i0 + a) * n + j0);
#pragma unroll
  for (int a = 0; a < kRowsPT; ++a) {
    const int64_t i = i0 + a;
    if (i >= m) break;
    float z[kColsPT];
#pragma unroll
    for (int c = 0; c < kColsPT; ++c) {
      double s = acc[a][c];
      if constexpr (R > 0 && sqrt_is_pow2(R)) {
        // U was scaled by 1/sqrt(R) in the pre-pass: s is acc / sqrt(R) already
      } else {
        if (!prescaled) s = div_sqrt_r(s, sqrt_r, inv_sqrt_r);
      }
      z[c] = __double2float_rn(s);
    }
    uint32_t rb[kColsPT] = {0u, 0u, 0u, 0u, 0u, 0u, 0u, 0u};
    if constexpr (SR) sr_octet(sr_seed, g0 + i * N + j0, rb);   // 16-bit types: the 8 columns are consecutive
    S* row = w + i * n;
    if (vec) {
      float x[kColsPT];
      S y[kColsPT];
      D::unpack(kAhead ? raw[a] : D::load(row + j0), x);
#pragma unroll
      for (int c = 0; c < kColsPT; ++c) {
        const float v = fmaf(z[c], beta, alpha * x[c]);
        y[c] = SR ? D::sr(v, rb[c]) : D::st(v);
      }
      D::store(row + j0, y);
    } else {
#pragma unroll
      for (int c = 0; c < kColsPT; ++c) {
        const int64_t j = tj * kLowrankTileN + D::col(tx, c);
        if (j >= n) continue;                  // never touch memory outside the block
        const float v = fmaf(z[c], beta, alpha * D::ld(__ldca(row + j)));
        __stwb(row + j, SR ? D::sr(v, rb[c]) : D::st(v));
      }
    }
  }
}

// sqrt(r) a power of two (r = 1, 4, 16, ...): the pre-pass scales U by 1/sqrt(r) (exact), the update kernel does not.
bool prescaled(int64_t r) {
  int e = 0;
  return std::frexp(std::sqrt(static_cast<double>(r)), &e) == 0.5;
}

struct Geometry {
  int64_t mp, np, tiles_n, tiles;
};

template <class D, bool SR, int R>
void launch_update(const LowrankLaunch& j, const Geometry& geo, cudaStream_t s) {
  const double sqrt_r = std::sqrt(static_cast<double>(j.r));   // correctly rounded, as the reference's math.sqrt
  const double* ut = j.scratch;
  const double* vt = j.scratch + j.r * geo.mp;
  lowrank_kernel<D, SR, R><<<static_cast<unsigned>(geo.tiles), kLrThreads, 0, s>>>(
      static_cast<typename D::S*>(j.w), j.m, j.n, geo.tiles_n, ut, vt, geo.mp, geo.np, static_cast<int>(j.r), j.N,
      j.base + j.row0 * j.N + j.col0, SR ? sr_seed(j.seed_u) : 0, j.alpha, j.beta, sqrt_r, 1.0 / sqrt_r,
      prescaled(j.r));
}

// Ranks with their own unrolled kernel: the ones the benchmarks and the issue name (r = 1 is the default); every
// other rank runs the R = 0 kernel (a k loop), bit for bit the same.
template <class D, bool SR>
void launch_rank(const LowrankLaunch& j, const Geometry& geo, cudaStream_t s) {
  if (j.r == 1) return launch_update<D, SR, 1>(j, geo, s);
  if (j.r == 4) return launch_update<D, SR, 4>(j, geo, s);
  if (j.r == 16) return launch_update<D, SR, 16>(j, geo, s);
  return launch_update<D, SR, 0>(j, geo, s);
}

}  // namespace

const char* launch_lowrank(const LowrankLaunch& j) {
  const auto s = reinterpret_cast<cudaStream_t>(j.stream);
  Geometry geo;
  geo.mp = (j.m + kLowrankTileM - 1) / kLowrankTileM * kLowrankTileM;
  geo.np = (j.n + kLowrankTileN - 1) / kLowrankTileN * kLowrankTileN;
  geo.tiles_n = geo.np / kLowrankTileN;
  geo.tiles = lowrank_tiles(j.m, j.n);
  const int r = static_cast<int>(j.r);
  const int64_t gu0 = j.base + j.row0 * j.r, gv0 = j.base + j.M * j.r + j.col0 * j.r;
  const int64_t cu = ((gu0 + j.m * j.r - 1) >> 2) - (gu0 >> 2) + 1;
  const int64_t cv = ((gv0 + j.n * j.r - 1) >> 2) - (gv0 >> 2) + 1;
  const int64_t items = cu + cv + j.r * (geo.mp - j.m) + j.r * (geo.np - j.n);
  const int64_t blocks = (items + kFactorThreads - 1) / kFactorThreads;
  const double u_scale = prescaled(j.r) ? 1.0 / std::sqrt(static_cast<double>(j.r)) : 1.0;
  const unsigned grid = static_cast<unsigned>(blocks < (int64_t{1} << 20) ? blocks : (int64_t{1} << 20));
  factors_kernel<<<grid, kFactorThreads, 0, s>>>(j.seed_u, j.seed_v, gu0, gv0, j.m, j.n, r, geo.mp, geo.np, cu, cv,
                                                 1.0 / j.r, u_scale, j.scratch, j.scratch + j.r * geo.mp);
  static_assert(kNumDTypes == 3, "a new dtype code needs a case here");
  switch (j.dtype) {
    case kDTypeFloat32: launch_rank<LrF32, false>(j, geo, s); break;
    case kDTypeFloat16:
      j.stochastic ? launch_rank<LrF16, true>(j, geo, s) : launch_rank<LrF16, false>(j, geo, s);
      break;
    case kDTypeBfloat16:
      j.stochastic ? launch_rank<LrBF16, true>(j, geo, s) : launch_rank<LrBF16, false>(j, geo, s);
      break;
    default: return "unknown dtype code";  // unreachable: the bindings reject it first
  }
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

}  // namespace cuda
}  // namespace mezo
