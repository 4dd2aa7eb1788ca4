// Argument checks and seed conversion shared by bindings_cpu.cpp and bindings_cuda.cpp (docs/kernel_abi.md).
// Every failure is a ValueError naming the argument, so a bad plan fails loudly in Python instead of
// scribbling over memory in a kernel.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

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

inline void check_launch(uintptr_t meta_ptr, int64_t num_tensors, uintptr_t chunks_ptr, int64_t num_chunks,
                         int64_t chunk_size, int dtype, int mode) {
  if (dtype < 0 || dtype > 2)
    throw py::value_error("dtype code must be 0 (float32), 1 (float16) or 2 (bfloat16), got " + str(dtype));
  if (mode < 0 || mode > 3)
    throw py::value_error("mode must be 0 (AXPBY), 1 (MASTER_UPDATE), 2 (MASTER_VIEW) or 3 (FILL), got " +
                          str(mode));
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
                         int mode) {
  for (int64_t t = 0; t < T; ++t) {
    const int64_t ptr = meta[t], numel = meta[T + t], base = meta[2 * T + t], mptr = meta[3 * T + t];
    const std::string at = " (tensor " + str(t) + ")";
    if (ptr == 0) throw py::value_error("meta[0]: null data pointer" + at);
    if (numel < 1) throw py::value_error("meta[1]: numel must be >= 1, got " + str(numel) + at);
    if (base < 0 || base > (int64_t{1} << 62) - numel)
      throw py::value_error("meta[2]: base must be in [0, 2**62 - numel), got " + str(base) + at);
    if ((mode == 1 || mode == 2) && mptr == 0)
      throw py::value_error("meta[3]: mode " + str(mode) + " needs an fp32 master copy, got a null pointer" + at);
  }
  for (int64_t c = 0; c < C; ++c) {
    const int64_t t = chunks[2 * c], start = chunks[2 * c + 1];
    const std::string at = " (chunk " + str(c) + ")";
    if (t < 0 || t >= T) throw py::value_error("chunks[:, 0]: tensor index " + str(t) + " out of range" + at);
    if (start < 0 || start >= meta[T + t] || start % chunk_size != 0)
      throw py::value_error("chunks[:, 1]: start " + str(start) + " must be a multiple of chunk_size in [0, numel)" + at);
  }
}

}  // namespace bind
}  // namespace mezo
