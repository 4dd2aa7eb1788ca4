// CPU backend: the fused seeded update over a plan (docs/kernel_abi.md), chunks spread over pool.h's threads.
//
// Reference semantics (mezo_kernels/rng.py + docs/kernel_abi.md): for element i of tensor t, g = base[t] + i,
// z = z(seed, g) of the launch's distribution (gaussian: randn4x(seed, g >> 2)[g & 3]; sign: 1 - 2 * bit g & 127
// of Philox counter g >> 7), and the mode's effect as listed in spec_codes.h; AXPBY_SR rounds with sround
// (convert.h) and the 16 bits of the SR stream at g (zblock.h sr_block).
//
// Shape of the work: a chunk walks blocks of z in a stack buffer: 128 elements from a multiple of 8 (gaussian:
// 32 counters of gen_z_block, vectorised Philox + fp32 Box-Muller) or 2048 from a multiple of 128 (sign: 16
// counters, one vectorised Philox call); then one trivially vectorised loop applies the mode to the elements of
// the block inside the chunk. Any base (also not a multiple of 4 or 8) and
// partial sub-blocks at both chunk ends are just an offset and a length: no special cases, and nothing outside
// [start, end) of a tensor is ever read or written.
#include "kernel.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <string>

#include "../spec_codes.h"
#include "convert.h"
#include "pool.h"
#include "zblock.h"

namespace mezo {
namespace cpu {
namespace {

constexpr int kSub = 4 * kZBlock;        // elements per Gaussian block
constexpr int kSignCounters = 16;        // sign counters per block (a whole number of SIMD vectors)
static_assert(kSub % kSrGroup == 0 && kSignGroup % kSrGroup == 0, "blocks hold whole SR counters");

std::atomic<int> g_threads{0};  // 0: default_threads() (OMP_NUM_THREADS or the CPUs this process may use)
// Elements below which the calling thread does the whole launch: waking a worker costs ~5-50 us (more on a busy
// machine) and ~65k Gaussian elements take about that long on one core. Sign elements are ~4x cheaper.
constexpr int64_t kParallelMin = 65536;

int threads() {
  static const int dflt = default_threads();
  const int n = g_threads.load(std::memory_order_relaxed);
  return n > 0 ? n : dflt;
}

template <class T>
T* ptr(int64_t v) {
  return reinterpret_cast<T*>(static_cast<intptr_t>(v));
}

// One sub-block's worth of elements. std::fma is the ABI's true fused multiply-add (vfmadd with FMA hardware;
// glibc's exact fmaf otherwise). alpha*x is rounded to fp32 first, as the ABI specifies.
template <class D, int MODE>
MEZO_INLINE void apply(typename D::Storage* __restrict d, float* __restrict m,
                       const typename D::Storage* __restrict src, const float* __restrict z,
                       const uint16_t* __restrict r, int n, float alpha, float beta, float gamma) {
#pragma omp simd
  for (int j = 0; j < n; ++j) {
    if constexpr (MODE == kModeAxpby) {
      d[j] = D::store(std::fma(z[j], beta, alpha * D::load(d[j])));
    } else if constexpr (MODE == kModeMasterUpdate) {
      const float mm = std::fma(z[j], beta, alpha * m[j]);
      m[j] = mm;
      d[j] = D::store(std::fma(z[j], gamma, mm));
    } else if constexpr (MODE == kModeMasterView) {
      d[j] = D::store(std::fma(z[j], gamma, m[j]));
    } else if constexpr (MODE == kModeFill) {
      d[j] = D::store(z[j]);  // d is never read (it may hold NaN poison)
    } else if constexpr (MODE == kModeOut) {
      d[j] = D::store(std::fma(z[j], beta, alpha * D::load(src[j])));  // d is never read
    } else {
      static_assert(MODE == kModeAxpbySr, "kernel mode without an implementation");
      const float y = std::fma(z[j], beta, alpha * D::load(d[j]));
      if constexpr (D::kStochastic) {
        d[j] = D::sround(y, r[j]);
      } else {
        d[j] = D::store(y);
      }
    }
  }
}

struct Keys {
  RoundKeys z, sr;  // sr: the stochastic-rounding stream's keys (only used by AXPBY_SR on 16-bit dtypes)
};

template <class D, int MODE, int DIST>
void run_chunk(const int64_t* meta, int64_t T, int64_t t, int64_t start, int64_t chunk_size, const Keys& keys,
               float alpha, float beta, float gamma) {
  using S = typename D::Storage;
  constexpr bool kSr = MODE == kModeAxpbySr && D::kStochastic;
  S* d = ptr<S>(meta[t]);
  const int64_t numel = meta[T + t], base = meta[2 * T + t];
  float* m = mode_uses_master(MODE) ? ptr<float>(meta[3 * T + t]) : nullptr;
  const S* src = mode_uses_source(MODE) ? ptr<const S>(meta[3 * T + t]) : nullptr;
  const int64_t g_lo = base + start, g_hi = base + std::min(start + chunk_size, numel);
  // z (and SR bits) of elements e0 .. e0 + E (e0 a multiple of 8) are in zb (rb); apply the mode to those inside
  // the chunk. Gaussian: E = kSub; sign: E = kSignCounters sign counters, so the per-call overhead is spread
  // over 2048 cheap elements.
  constexpr int E = DIST == kDistGaussian ? kSub : kSignCounters * kSignGroup;
  alignas(64) float zb[E];
  alignas(64) uint16_t rb[kSr ? E : 1];
  auto sub = [&](int64_t e0) {
    const int64_t lo = std::max(e0, g_lo), hi = std::min(e0 + E, g_hi);
    const int64_t off = lo - base;  // element index in the tensor
    if constexpr (kSr) sr_block<E / kSrGroup>(keys.sr, static_cast<uint64_t>(e0 / kSrGroup), rb);
    apply<D, MODE>(d + off, m ? m + off : nullptr, src ? src + off : nullptr, zb + (lo - e0),
                   kSr ? rb + (lo - e0) : nullptr, static_cast<int>(hi - lo), alpha, beta, gamma);
  };
  if constexpr (DIST == kDistGaussian) {
    for (int64_t e0 = g_lo & ~int64_t{7}; e0 < g_hi; e0 += E) {
      gen_z_block(keys.z, static_cast<uint64_t>(e0 >> 2), zb);
      sub(e0);
    }
  } else {
    static_assert(DIST == kDistSign, "distribution without an implementation");
    for (int64_t k = g_lo / kSignGroup; k * kSignGroup < g_hi; k += kSignCounters) {
      alignas(64) uint32_t w[4][kSignCounters];
      philox_soa<kSignCounters>(keys.z, static_cast<uint64_t>(k), w[0], w[1], w[2], w[3]);
      // counters past the chunk's end give signs nobody reads: cheaper than a shorter, variable-length fill
      for (int i = 0; i < kSignCounters; ++i) sign_block(w[0][i], w[1][i], w[2][i], w[3][i], zb + i * kSignGroup);
      sub(k * kSignGroup);
    }
  }
}

template <class D, int MODE, int DIST>
void run(const int64_t* meta, int64_t T, const int64_t* chunks, int64_t C, int64_t chunk_size, uint64_t seed,
         float alpha, float beta, float gamma) {
  const Keys keys{RoundKeys(seed), RoundKeys(MODE == kModeAxpbySr ? sr_seed(seed) : 0)};
  // Stay on the calling thread when the work is smaller than waking a worker (sign elements count 1/4).
  const int64_t min_work = DIST == kDistGaussian ? kParallelMin : 4 * kParallelMin;
  int64_t total = 0;
  for (int64_t c = 0; c < C && total < min_work; ++c)
    total += std::min(chunk_size, meta[T + chunks[2 * c]] - chunks[2 * c + 1]);
  auto one = [&](int64_t c) {
    run_chunk<D, MODE, DIST>(meta, T, chunks[2 * c], chunks[2 * c + 1], chunk_size, keys, alpha, beta, gamma);
  };
  if (total < min_work) {
    for (int64_t c = 0; c < C; ++c) one(c);
  } else {
    parallel_for(C, threads(), one);  // one chunk per claimed unit: chunks of small tensors are short
  }
}

template <class D, int DIST>
void run_mode(int mode, const int64_t* meta, int64_t T, const int64_t* chunks, int64_t C, int64_t cs,
              uint64_t seed, float a, float b, float g) {
  static_assert(kNumModes == 6, "a new kernel mode needs a case here");
  switch (mode) {
    case kModeAxpby: return run<D, kModeAxpby, DIST>(meta, T, chunks, C, cs, seed, a, b, g);
    case kModeMasterUpdate: return run<D, kModeMasterUpdate, DIST>(meta, T, chunks, C, cs, seed, a, b, g);
    case kModeMasterView: return run<D, kModeMasterView, DIST>(meta, T, chunks, C, cs, seed, a, b, g);
    case kModeFill: return run<D, kModeFill, DIST>(meta, T, chunks, C, cs, seed, a, b, g);
    case kModeOut: return run<D, kModeOut, DIST>(meta, T, chunks, C, cs, seed, a, b, g);
    case kModeAxpbySr:  // fp32: the fma result is already fp32, AXPBY_SR is AXPBY
      if constexpr (D::kStochastic) return run<D, kModeAxpbySr, DIST>(meta, T, chunks, C, cs, seed, a, b, g);
      return run<D, kModeAxpby, DIST>(meta, T, chunks, C, cs, seed, a, b, g);
    default: return;  // unreachable: the bindings reject unknown modes
  }
}

template <class D>
void run_dist(int dist, int mode, const int64_t* meta, int64_t T, const int64_t* chunks, int64_t C, int64_t cs,
              uint64_t seed, float a, float b, float g) {
  static_assert(kNumDists == 2, "a new distribution needs a case here");
  switch (dist) {
    case kDistGaussian: return run_mode<D, kDistGaussian>(mode, meta, T, chunks, C, cs, seed, a, b, g);
    case kDistSign: return run_mode<D, kDistSign>(mode, meta, T, chunks, C, cs, seed, a, b, g);
    default: return;  // unreachable: the bindings reject unknown distributions
  }
}

// Counters k_start + [0, n) in blocks; the last, partial block goes through a stack buffer so exactly 4*n
// values are written. Every value comes from the same gen_*_block code as axpby uses.
template <class Out, class Gen>
void blocks(uint64_t k_start, int64_t n, Out* out, Gen gen) {
  const int64_t nb = (n + kZBlock - 1) / kZBlock;
  parallel_for(nb, nb >= 64 ? threads() : 1, [&](int64_t b) {
    const uint64_t k = k_start + static_cast<uint64_t>(b) * kZBlock;
    const int64_t cnt = std::min<int64_t>(kZBlock, n - b * kZBlock);
    Out* dst = out + 4 * b * kZBlock;
    if (cnt == kZBlock) {
      gen(k, dst);
    } else {
      alignas(64) Out tmp[4 * kZBlock];
      gen(k, tmp);
      std::copy(tmp, tmp + 4 * cnt, dst);
    }
  });
}

}  // namespace

void axpby(const int64_t* meta, int64_t num_tensors, const int64_t* chunks, int64_t num_chunks, int64_t chunk_size,
           int dtype, int mode, int dist, uint64_t seed, float alpha, float beta, float gamma) {
  static_assert(kNumDTypes == 3, "a new dtype code needs a case here");
  const int64_t T = num_tensors, C = num_chunks, cs = chunk_size;
  switch (dtype) {
    case kDTypeFloat32: return run_dist<F32>(dist, mode, meta, T, chunks, C, cs, seed, alpha, beta, gamma);
    case kDTypeFloat16: return run_dist<F16>(dist, mode, meta, T, chunks, C, cs, seed, alpha, beta, gamma);
    case kDTypeBfloat16: return run_dist<BF16>(dist, mode, meta, T, chunks, C, cs, seed, alpha, beta, gamma);
    default: return;  // unreachable: the bindings reject unknown dtype codes
  }
}

void philox_words(uint64_t seed, uint64_t k_start, int64_t n, uint32_t* out) {
  const RoundKeys rk(seed);
  blocks(k_start, n, out, [&rk](uint64_t k, uint32_t* dst) { gen_words_block(rk, k, dst); });
}

void randn4x(uint64_t seed, uint64_t k_start, int64_t n, float* out) {
  const RoundKeys rk(seed);
  blocks(k_start, n, out, [&rk](uint64_t k, float* dst) { gen_z_block(rk, k, dst); });
}

int num_threads() { return threads(); }

void set_num_threads(int n) { g_threads.store(n, std::memory_order_relaxed); }

const char* build_info() {
  static const std::string info = [] {
    std::string s = "mezo_kernels._C (CPU): ";
#if defined(__VERSION__)
    s += "compiler " __VERSION__ "; ";
#endif
#if defined(MEZO_CPU_ARCH_STR)
    s += "arch " MEZO_CPU_ARCH_STR "; ";
#endif
    s += "simd";
#if defined(__AVX512F__)
    s += " avx512f";
#endif
#if defined(__AVX2__)
    s += " avx2";
#endif
#if defined(__FMA__)
    s += " fma";
#endif
#if defined(__ARM_NEON)
    s += " neon";
#endif
    char buf[128];
    std::snprintf(buf, sizeof buf, "; threads: work-claiming pool; chunk %lld; zblock %d counters",
                  static_cast<long long>(kChunk), kZBlock);
    return s + buf;
  }();
  return info.c_str();
}

}  // namespace cpu
}  // namespace mezo
