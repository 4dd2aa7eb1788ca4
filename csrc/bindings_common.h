// Argument checks, seed conversion and the spec-code table shared by bindings_cpu.cpp and bindings_cuda.cpp
// (docs/kernel_abi.md). Every failure is a ValueError naming the argument, so a bad plan fails loudly in Python
// instead of scribbling over memory in a kernel. Modes and dtype codes come from spec_codes.h.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "spec_codes.h"

namespace mezo {
namespace bind {

namespace py = pybind11;

inline std::string str(long long v) { return std::to_string(v); }

// Seeds are uint64; a negative int64 seed means its two's complement (as in mezo_kernels.rng.check_seed).
inline uint64_t to_seed(const py::int_& v) {
  int overflow = 0;
  const long long s = PyLong_AsLongLongAndOverflow(v.ptr(), &overflow);
  if (overflow == 0) {
    if (s == -1 && PyErr_Occurred()) throw py::error_already_set();
    return static_cast<uint64_t>(s);
  }
  if (overflow > 0) {
    const unsigned long long u = PyLong_AsUnsignedLongLong(v.ptr());
    if (!PyErr_Occurred()) return u;
    PyErr_Clear();
  }
  throw py::value_error("seed must be in [-2**63, 2**64), got " + py::str(v).cast<std::string>());
}

// Counter indices are uint64 and never negative.
inline uint64_t to_counter(const py::int_& v) {
  const unsigned long long u = PyLong_AsUnsignedLongLong(v.ptr());
  if (PyErr_Occurred()) {
    PyErr_Clear();
    throw py::value_error("k_start must be in [0, 2**64), got " + py::str(v).cast<std::string>());
  }
  return u;
}

inline void check_out(int64_t n, uintptr_t out_ptr) {
  if (n < 0) throw py::value_error("n must be >= 0, got " + str(n));
  if (n > (int64_t{1} << 60)) throw py::value_error("n too large: " + str(n));
  if (n > 0 && out_ptr == 0) throw py::value_error("out_ptr is null");
}

// Bytes per element of a dtype code.
inline int64_t dtype_size(int dtype) {
  static_assert(kNumDTypes == 3, "a new dtype code needs its size here");
  return dtype == kDTypeFloat32 ? 4 : 2;
}

// "0 (AXPBY), 1 (MASTER_UPDATE), ..." from a names table indexed by code.
inline std::string code_list(const char* const* names, int n) {
  std::string s;
  for (int i = 0; i < n; ++i) s += (i ? ", " : "") + str(i) + " (" + names[i] + ")";
  return s;
}

inline void check_launch(uintptr_t meta_ptr, int64_t num_tensors, uintptr_t chunks_ptr, int64_t num_chunks,
                         int64_t chunk_size, int dtype, int mode, int dist) {
  if (dtype < 0 || dtype >= kNumDTypes)
    throw py::value_error("dtype code must be one of " + code_list(kDTypeNames, kNumDTypes) + ", got " + str(dtype));
  if (mode < 0 || mode >= kNumModes)
    throw py::value_error("mode must be one of " + code_list(kModeNames, kNumModes) + ", got " + str(mode));
  if (dist < 0 || dist >= kNumDists)
    throw py::value_error("dist must be one of " + code_list(kDistNames, kNumDists) + ", got " + str(dist));
  if (num_tensors <= 0) throw py::value_error("num_tensors must be > 0, got " + str(num_tensors));
  if (num_chunks < 0) throw py::value_error("num_chunks must be >= 0, got " + str(num_chunks));
  if (num_chunks > INT32_MAX) throw py::value_error("num_chunks must be < 2**31, got " + str(num_chunks));
  if (chunk_size <= 0 || chunk_size % 4 != 0)
    throw py::value_error("chunk_size must be a positive multiple of 4, got " + str(chunk_size));
  if (meta_ptr == 0) throw py::value_error("meta_ptr is null");
  if (num_chunks > 0 && chunks_ptr == 0) throw py::value_error("chunks_ptr is null");
}

// Host-resident tables only (CPU backend): each row of meta and chunks must describe memory the kernel may touch.
inline void check_tables(const int64_t* meta, int64_t T, const int64_t* chunks, int64_t C, int64_t chunk_size,
                         int mode, int64_t elem_size) {
  for (int64_t t = 0; t < T; ++t) {
    const int64_t ptr = meta[t], numel = meta[T + t], base = meta[2 * T + t], mptr = meta[3 * T + t];
    const std::string at = " (tensor " + str(t) + ")";
    if (ptr == 0) throw py::value_error("meta[0]: null data pointer" + at);
    if (numel < 1) throw py::value_error("meta[1]: numel must be >= 1, got " + str(numel) + at);
    if (base < 0 || base > (int64_t{1} << 62) - numel)
      throw py::value_error("meta[2]: base must be in [0, 2**62 - numel), got " + str(base) + at);
    if (mode_uses_master(mode) && mptr == 0)
      throw py::value_error("meta[3]: mode " + std::string(kModeNames[mode]) +
                            " needs an fp32 master copy, got a null pointer" + at);
    if (mode_uses_source(mode)) {
      if (mptr == 0)
        throw py::value_error("meta[3]: mode " + std::string(kModeNames[mode]) +
                              " needs a source tensor, got a null pointer" + at);
      // the kernel reads the source while it writes the destination: the two ranges must be disjoint
      const int64_t bytes = numel * elem_size;
      if (mptr < ptr + bytes && ptr < mptr + bytes)
        throw py::value_error("meta[3]: the source of mode " + std::string(kModeNames[mode]) +
                              " overlaps its destination meta[0]" + at);
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    const int64_t t = chunks[2 * c], start = chunks[2 * c + 1];
    const std::string at = " (chunk " + str(c) + ")";
    if (t < 0 || t >= T) throw py::value_error("chunks[:, 0]: tensor index " + str(t) + " out of range" + at);
    if (start < 0 || start >= meta[T + t] || start % chunk_size != 0)
      throw py::value_error("chunks[:, 1]: start " + str(start) + " must be a multiple of chunk_size in [0, numel)" +
                            at);
  }
}

// The fused low-rank update of one block (rows [row0, row0 + m), columns [col0, col0 + n)) of an (M, N) tensor.
inline void check_lowrank(uintptr_t w_ptr, int64_t m, int64_t n, int64_t row0, int64_t col0, int64_t M, int64_t N,
                          int64_t r, int64_t base, int dtype) {
  if (dtype < 0 || dtype >= kNumDTypes)
    throw py::value_error("dtype code must be one of " + code_list(kDTypeNames, kNumDTypes) + ", got " + str(dtype));
  if (w_ptr == 0) throw py::value_error("w_ptr is null");
  if (r < 1) throw py::value_error("lowrank_r must be >= 1, got " + str(r));
  constexpr int64_t kMax = int64_t{1} << 40;
  if (M < 1 || N < 1 || M > kMax || N > kMax)
    throw py::value_error("the full shape (M, N) must be in [1, 2**40], got (" + str(M) + ", " + str(N) + ")");
  if (m < 1 || n < 1 || row0 < 0 || col0 < 0 || row0 > M - m || col0 > N - n)
    throw py::value_error("the block (" + str(m) + ", " + str(n) + ") at (" + str(row0) + ", " + str(col0) +
                          ") is not inside the tensor (" + str(M) + ", " + str(N) + ")");
  if (M > (int64_t{1} << 62) / N) throw py::value_error("M * N too large");
  // the spec's rule: the factors live inside the tensor's own index range (docs/rng_spec.md)
  if (r > M * N / (M + N) || r * (M + N) >= M * N)
    throw py::value_error("lowrank_r = " + str(r) + " with r*(M + N) >= M*N for (" + str(M) + ", " + str(N) +
                          "): such a tensor takes the dense Gaussian path, not the low-rank update");
  if (base < 0 || base > (int64_t{1} << 62) - M * N)
    throw py::value_error("base must be in [0, 2**62 - M*N), got " + str(base));
}

// The spec codes compiled into this module, so tests can compare them with mezo_kernels.rng (a stale build or a
// hand-edited header shows up there instead of as wrong bits).
inline py::dict spec_codes() {
  py::dict d, modes, dtypes, dists;
  d["PHILOX_M0"] = kPhiloxM0;
  d["PHILOX_M1"] = kPhiloxM1;
  d["PHILOX_W0"] = kPhiloxW0;
  d["PHILOX_W1"] = kPhiloxW1;
  d["PHILOX_ROUNDS"] = kPhiloxRounds;
  d["UNIFORM_SCALE_BITS"] = kUniformScaleBits;
  d["UNIFORM_SCALE"] = static_cast<double>(kUniformScale);
  d["TWO_PI_F32"] = static_cast<double>(kTwoPiF);
  d["U_MIN_F32"] = static_cast<double>(kUMinF);
  d["SIGN_GROUP"] = kSignGroup;
  d["SR_GROUP"] = kSrGroup;
  d["SR_SEED_XOR"] = kSrSeedXor;
  py::list master, source;
  for (int m = 0; m < kNumModes; ++m) {
    modes[kModeNames[m]] = m;
    if (mode_uses_master(m)) master.append(m);
    if (mode_uses_source(m)) source.append(m);
  }
  for (int t = 0; t < kNumDTypes; ++t) dtypes[kDTypeNames[t]] = t;
  for (int k = 0; k < kNumDists; ++k) dists[kDistNames[k]] = k;
  d["modes"] = modes;
  d["modes_using_master"] = master;
  d["modes_using_source"] = source;
  d["dtypes"] = dtypes;
  d["distributions"] = dists;
  return d;
}

// What this build implements, for callers that must tell it from an older one: "dist" (axpby takes a
// distribution code after the mode), "mode:<NAME>" and "dist:<name>" for every code compiled in.
inline py::list features() {
  py::list f;
  f.append("dist");
  for (int m = 0; m < kNumModes; ++m) f.append(std::string("mode:") + kModeNames[m]);
  for (int k = 0; k < kNumDists; ++k) f.append(std::string("dist:") + kDistNames[k]);
  return f;
}

}  // namespace bind
}  // namespace mezo
