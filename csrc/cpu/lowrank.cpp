// CPU backend: the fused low-rank update W <- round(fma(U Vᵀ/√r, beta, alpha W)) of one 2-d tensor (lowrank.h).
//
// Shape of the work:
//   1. the factors: U's m rows and V's n rows from the Gaussian stream (gen_z_block, the very code of axpby and
//      randn4x, so they are bit-identical to _C.randn4x), r*(m + n) normals, spread over the pool; V is then
//      transposed into Vt [r, n] so the inner loop reads it with unit stride;
//   2. the pass: units of rows (or of row segments when a row is long), claimed by the pool; per row a tile of
//      kTile columns: acc (float64, on the stack) = U[i,0] V[:,0], += U[i,k] V[:,k] for k = 1..r-1, one division
//      by sqrt(r) (a multiplication when sqrt(r) is a power of two: the same bits), one rounding to fp32, then
//      the fma and the rounding of every element of the tile, stochastic ones reading sr_block's bits.
// All loops are plain element loops the compiler vectorises (-ffp-contract=off keeps acc += u*v a multiply and an
// add; the product is exact in float64, so an fma would give the same bits anyway).
#include "lowrank.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "../spec_codes.h"
#include "convert.h"
#include "kernel.h"
#include "pool.h"
#include "zblock.h"

namespace mezo {
namespace cpu {
namespace {

// SR bits of a tile come from one sr_block of kSrCounters counters (a whole number of SIMD vectors: 32) from the
// multiple of 8 at or below the tile's first global index, so a tile holds at most 32*8 - 7 elements.
constexpr int kSrCounters = 32;
constexpr int kTile = kSrCounters * kSrGroup - kSrGroup;  // 248 columns per tile: acc is ~2 KiB of float64, in L1
static_assert(kTile + kSrGroup - 1 <= kSrCounters * kSrGroup, "a tile's SR bits fit in one sr_block");
constexpr int64_t kUnitElems = 16384;          // elements per claimed unit of the pass
constexpr int64_t kParallelMinElems = 32768;   // below this the calling thread does the whole pass

template <class D, bool SR, bool POW2>
void row_segment(typename D::Storage* __restrict drow, const float* __restrict urow, const float* __restrict vt,
                 int64_t n, int64_t j0, int64_t j1, int64_t r, double sqrt_r, double inv_sqrt_r,
                 const RoundKeys& sr_keys, int64_t g_row, float alpha, float beta) {
  alignas(64) double acc[kTile];
  alignas(64) float z[kTile];
  alignas(64) uint16_t rb[SR ? kSrCounters * kSrGroup : 1];
  for (int64_t jt = j0; jt < j1; jt += kTile) {
    const int len = static_cast<int>(std::min<int64_t>(kTile, j1 - jt));
    // k outer, j inner: each pass a unit-stride vector loop over the tile (acc stays in L1). Tried: k inside the
    // j loop (acc in a register) vectorises worse with GCC 12 (4x slower at r = 16).
    {
      const double u0 = urow[0];
      const float* __restrict v0 = vt + jt;
#pragma omp simd
      for (int j = 0; j < len; ++j) acc[j] = u0 * static_cast<double>(v0[j]);
    }
    for (int64_t k = 1; k < r; ++k) {
      const double uk = urow[k];
      const float* __restrict vk = vt + k * n + jt;
#pragma omp simd
      for (int j = 0; j < len; ++j) acc[j] = acc[j] + uk * static_cast<double>(vk[j]);
    }
    if constexpr (POW2) {
#pragma omp simd
      for (int j = 0; j < len; ++j) z[j] = static_cast<float>(acc[j] * inv_sqrt_r);  // exact scaling: same bits
    } else {
#pragma omp simd
      for (int j = 0; j < len; ++j) z[j] = static_cast<float>(acc[j] / sqrt_r);
    }
    typename D::Storage* __restrict d = drow + jt;
    if constexpr (SR) {
      const int64_t g = g_row + jt, e0 = g & ~int64_t{kSrGroup - 1};
      sr_block<kSrCounters>(sr_keys, static_cast<uint64_t>(e0 / kSrGroup), rb);
      const uint16_t* __restrict rr = rb + (g - e0);
#pragma omp simd
      for (int j = 0; j < len; ++j) d[j] = D::sround(std::fma(z[j], beta, alpha * D::load(d[j])), rr[j]);
    } else {
#pragma omp simd
      for (int j = 0; j < len; ++j) d[j] = D::store(std::fma(z[j], beta, alpha * D::load(d[j])));
    }
  }
}

template <class D, bool SR, bool POW2>
void pass(const LowrankJob& jb, const float* u, const float* vt) {
  using S = typename D::Storage;
  S* w = static_cast<S*>(jb.w);
  const int64_t m = jb.m, n = jb.n, r = jb.r;
  const double sqrt_r = std::sqrt(static_cast<double>(r)), inv = 1.0 / sqrt_r;
  const RoundKeys sr_keys(SR ? sr_seed(jb.seed_u) : 0);
  // units: `rows` whole rows, or (rows == 1) a segment of `seg` columns of one row
  const int64_t seg = std::min<int64_t>(n, kUnitElems);
  const int64_t segs = (n + seg - 1) / seg;
  const int64_t rows = segs > 1 ? 1 : std::max<int64_t>(1, kUnitElems / n);
  const int64_t units = segs > 1 ? m * segs : (m + rows - 1) / rows;
  auto one = [&](int64_t unit) {
    int64_t i0, i1, j0, j1;
    if (segs > 1) {
      i0 = unit / segs, i1 = i0 + 1, j0 = (unit % segs) * seg, j1 = std::min(n, j0 + seg);
    } else {
      i0 = unit * rows, i1 = std::min(m, i0 + rows), j0 = 0, j1 = n;
    }
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t g_row = jb.base + (jb.row0 + i) * jb.N + jb.col0;  // global index of element (i, 0)
      row_segment<D, SR, POW2>(w + i * n, u + i * r, vt, n, j0, j1, r, sqrt_r, inv, sr_keys, g_row, jb.alpha,
                               jb.beta);
    }
  };
  if (m * n < kParallelMinElems || units == 1) {
    for (int64_t c = 0; c < units; ++c) one(c);
  } else {
    parallel_for(units, num_threads(), one);
  }
}

template <class D, bool SR>
void pass_scaled(const LowrankJob& jb, const float* u, const float* vt) {
  const double s = std::sqrt(static_cast<double>(jb.r));
  int e = 0;
  if (std::frexp(s, &e) == 0.5) {  // sqrt(r) a power of two (r = 1, 4, 16, ...): divide = multiply by 1/sqrt(r)
    pass<D, SR, true>(jb, u, vt);
  } else {
    pass<D, SR, false>(jb, u, vt);
  }
}

template <class D>
void dispatch(const LowrankJob& jb, const float* u, const float* vt) {
  if (jb.stochastic && D::kStochastic) {
    pass_scaled<D, true>(jb, u, vt);
  } else {
    pass_scaled<D, false>(jb, u, vt);
  }
}

}  // namespace

void normals(uint64_t seed, uint64_t g0, int64_t count, float* out) {
  if (count <= 0) return;
  const RoundKeys rk(seed);
  constexpr int64_t E = 4 * kZBlock;           // elements per block
  const uint64_t e_first = g0 & ~uint64_t{3};  // the block grid starts at counter g0 >> 2
  const int64_t nb = (static_cast<int64_t>(g0 - e_first) + count + E - 1) / E;
  parallel_for(nb, nb >= 64 ? num_threads() : 1, [&](int64_t b) {
    alignas(64) float tmp[E];
    const uint64_t e0 = e_first + static_cast<uint64_t>(b) * E;  // global index of tmp[0]
    gen_z_block(rk, e0 >> 2, tmp);
    const uint64_t lo = std::max(e0, g0), hi = std::min(e0 + E, g0 + static_cast<uint64_t>(count));
    std::copy(tmp + (lo - e0), tmp + (hi - e0), out + (lo - g0));
  });
}

void lowrank_update(const LowrankJob& jb) {
  const int64_t m = jb.m, n = jb.n, r = jb.r;
  std::vector<float> u(static_cast<size_t>(m * r)), v(static_cast<size_t>(n * r)), vt(static_cast<size_t>(n * r));
  normals(jb.seed_u, static_cast<uint64_t>(jb.base + jb.row0 * r), m * r, u.data());
  normals(jb.seed_v, static_cast<uint64_t>(jb.base + jb.M * r + jb.col0 * r), n * r, v.data());
  for (int64_t j = 0; j < n; ++j)
    for (int64_t k = 0; k < r; ++k) vt[k * n + j] = v[j * r + k];
  static_assert(kNumDTypes == 3, "a new dtype code needs a case here");
  switch (jb.dtype) {
    case kDTypeFloat32: return dispatch<F32>(jb, u.data(), vt.data());
    case kDTypeFloat16: return dispatch<F16>(jb, u.data(), vt.data());
    case kDTypeBfloat16: return dispatch<BF16>(jb, u.data(), vt.data());
    default: return;  // unreachable: the bindings reject unknown dtype codes
  }
}

}  // namespace cpu
}  // namespace mezo
