// CPU backend: the fused seeded-Gaussian update over a plan (docs/kernel_abi.md), OpenMP over chunks.
//
// Reference semantics (mezo_kernels/rng.py + docs/kernel_abi.md): for element i of tensor t, g = base[t] + i,
// z = randn4x(seed, g >> 2)[g & 3];
//   mode 0: d = round(fma(z, beta, alpha*d))       mode 1: m' = fma(z, beta, alpha*m); m = m'; d = round(fma(z, gamma, m'))
//   mode 2: d = round(fma(z, gamma, m))            mode 3: d = round(z)
//
// Shape of the work: a chunk walks its counters in blocks of kZBlock (zblock.h: vectorised Philox + fp32
// Box-Muller into a 512-byte stack buffer), then a second, trivially vectorised loop applies the mode to the
// elements the block covers. Element j of the block buffer is global index 4*k + j, so any base (also not a
// multiple of 4) and partial counters at both chunk ends are just an offset and a length: no special cases,
// and nothing outside [start, end) of a tensor is ever read or written.
#include "kernel.h"

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <string>

#include "convert.h"
#include "zblock.h"

namespace mezo {
namespace cpu {
namespace {

std::atomic<int> g_threads{0};
constexpr int64_t kParallelMin = 32768;  // elements; below this one thread finishes before a fork-join would  // 0: OpenMP's default (OMP_NUM_THREADS or the core count)

int threads() {
  const int n = g_threads.load(std::memory_order_relaxed);
  return n > 0 ? n : omp_get_max_threads();
}

// One block's worth of elements. std::fma is the ABI's true fused multiply-add (vfmadd with FMA hardware;
// glibc's exact fmaf otherwise). alpha*x is rounded to fp32 first, as the ABI specifies.
template <class D, int MODE>
MEZO_INLINE void apply(typename D::Storage* __restrict d, float* __restrict m, const float* __restrict z, int n,
                       float alpha, float beta, float gamma) {
#pragma omp simd
  for (int j = 0; j < n; ++j) {
    if constexpr (MODE == 0) {
      d[j] = D::store(std::fma(z[j], beta, alpha * D::load(d[j])));
    } else if constexpr (MODE == 1) {
      const float mm = std::fma(z[j], beta, alpha * m[j]);
      m[j] = mm;
      d[j] = D::store(std::fma(z[j], gamma, mm));
    } else if constexpr (MODE == 2) {
      d[j] = D::store(std::fma(z[j], gamma, m[j]));
    } else {
      d[j] = D::store(z[j]);  // FILL: d is never read (it may hold NaN poison)
    }
  }
}

template <class D, int MODE>
void run_chunk(const int64_t* meta, int64_t T, int64_t t, int64_t start, int64_t chunk_size, const RoundKeys& rk,
               float alpha, float beta, float gamma) {
  auto* d = reinterpret_cast<typename D::Storage*>(static_cast<intptr_t>(meta[t]));
  const int64_t numel = meta[T + t], base = meta[2 * T + t];
  float* m = (MODE == 1 || MODE == 2) ? reinterpret_cast<float*>(static_cast<intptr_t>(meta[3 * T + t])) : nullptr;
  const int64_t g_lo = base + start, g_hi = base + std::min(start + chunk_size, numel);
  alignas(64) float zb[4 * kZBlock];
  for (int64_t k = g_lo >> 2; 4 * k < g_hi; k += kZBlock) {
    gen_z_block(rk, static_cast<uint64_t>(k), zb);
    const int64_t lo = std::max(4 * k, g_lo), hi = std::min(4 * (k + kZBlock), g_hi);
    const int64_t off = lo - base;  // element index in the tensor
    apply<D, MODE>(d + off, m ? m + off : nullptr, zb + (lo - 4 * k), static_cast<int>(hi - lo), alpha, beta,
                   gamma);
  }
}

template <class D, int MODE>
void run(const int64_t* meta, int64_t T, const int64_t* chunks, int64_t C, int64_t chunk_size, uint64_t seed,
         float alpha, float beta, float gamma) {
  const RoundKeys rk(seed);
  const int nt = threads();
  // Fork only when there is enough work to pay for waking the pool (~2-5 us; more on a busy machine).
  int64_t total = 0;
  for (int64_t c = 0; c < C && total < kParallelMin; ++c)
    total += std::min(chunk_size, meta[T + chunks[2 * c]] - chunks[2 * c + 1]);
  // dynamic: chunks of small tensors are shorter than CHUNK, so static scheduling would leave a core idle
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (C > 1 && nt > 1 && total >= kParallelMin)
  for (int64_t c = 0; c < C; ++c) {
    run_chunk<D, MODE>(meta, T, chunks[2 * c], chunks[2 * c + 1], chunk_size, rk, alpha, beta, gamma);
  }
}

template <class D>
void run_mode(int mode, const int64_t* meta, int64_t T, const int64_t* chunks, int64_t C, int64_t cs,
              uint64_t seed, float a, float b, float g) {
  switch (mode) {
    case 0: return run<D, 0>(meta, T, chunks, C, cs, seed, a, b, g);
    case 1: return run<D, 1>(meta, T, chunks, C, cs, seed, a, b, g);
    case 2: return run<D, 2>(meta, T, chunks, C, cs, seed, a, b, g);
    default: return run<D, 3>(meta, T, chunks, C, cs, seed, a, b, g);
  }
}

// Counters k_start + [0, n) in blocks; the last, partial block goes through a stack buffer so exactly 4*n
// values are written. Every value comes from the same gen_*_block code as axpby uses.
template <class Out, class Gen>
void blocks(uint64_t k_start, int64_t n, Out* out, Gen gen) {
  const int64_t nb = (n + kZBlock - 1) / kZBlock;
  const int nt = threads();
#pragma omp parallel for schedule(static) num_threads(nt) if (nb >= 64 && nt > 1)
  for (int64_t b = 0; b < nb; ++b) {
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
  }
}

}  // namespace

void axpby(const int64_t* meta, int64_t num_tensors, const int64_t* chunks, int64_t num_chunks, int64_t chunk_size,
           int dtype, int mode, uint64_t seed, float alpha, float beta, float gamma) {
  switch (dtype) {
    case 0: return run_mode<F32>(mode, meta, num_tensors, chunks, num_chunks, chunk_size, seed, alpha, beta, gamma);
    case 1: return run_mode<F16>(mode, meta, num_tensors, chunks, num_chunks, chunk_size, seed, alpha, beta, gamma);
    default:
      return run_mode<BF16>(mode, meta, num_tensors, chunks, num_chunks, chunk_size, seed, alpha, beta, gamma);
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
    std::snprintf(buf, sizeof buf, "; openmp %d; chunk %lld; zblock %d counters", _OPENMP,
                  static_cast<long long>(kChunk), kZBlock);
    return s + buf;
  }();
  return info.c_str();
}

}  // namespace cpu
}  // namespace mezo
