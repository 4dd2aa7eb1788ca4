// mezo_kernels._C: pybind11 front of the CPU backend (docs/kernel_abi.md). No libtorch: every pointer is a
// Python int (tensor.data_ptr()), so the module builds and imports without torch and works with any torch.
//
// Reference semantics: as csrc/cpu/kernel.h. This file only checks arguments (ValueError with the reason),
// converts seeds (uint64, negative int64 taken as two's complement) and releases the GIL around the work.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "bindings_common.h"
#include "cpu/kernel.h"
#include "cpu/lowrank.h"
#include "philox.h"

namespace py = pybind11;
using namespace mezo::bind;

namespace {

void axpby(uintptr_t meta_ptr, int64_t num_tensors, uintptr_t chunks_ptr, int64_t num_chunks, int64_t chunk_size,
           int dtype, int mode, int dist, const py::int_& seed, double alpha, double beta, double gamma) {
  const uint64_t s = to_seed(seed);
  check_launch(meta_ptr, num_tensors, chunks_ptr, num_chunks, chunk_size, dtype, mode, dist);
  const auto* meta = reinterpret_cast<const int64_t*>(meta_ptr);
  const auto* chunks = reinterpret_cast<const int64_t*>(chunks_ptr);
  // host tables: the per-tensor and per-chunk checks are cheap next to the work (one pass over C + T rows)
  check_tables(meta, num_tensors, chunks, num_chunks, chunk_size, mode, dtype_size(dtype));
  py::gil_scoped_release nogil;
  mezo::cpu::axpby(meta, num_tensors, chunks, num_chunks, chunk_size, dtype, mode, dist, s,
                   static_cast<float>(alpha), static_cast<float>(beta), static_cast<float>(gamma));
}

py::tuple philox4x32_10(uint32_t k0, uint32_t k1, uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3) {
  const mezo::U32x4 w = mezo::philox4x32_10(k0, k1, mezo::U32x4{c0, c1, c2, c3});
  return py::make_tuple(w.x, w.y, w.z, w.w);
}

void philox_words(const py::int_& seed, const py::int_& k_start, int64_t n, uintptr_t out_ptr) {
  const uint64_t s = to_seed(seed), k = to_counter(k_start);
  check_out(n, out_ptr);
  if (n == 0) return;
  py::gil_scoped_release nogil;
  mezo::cpu::philox_words(s, k, n, reinterpret_cast<uint32_t*>(out_ptr));
}

void randn4x(const py::int_& seed, const py::int_& k_start, int64_t n, uintptr_t out_ptr) {
  const uint64_t s = to_seed(seed), k = to_counter(k_start);
  check_out(n, out_ptr);
  if (n == 0) return;
  py::gil_scoped_release nogil;
  mezo::cpu::randn4x(s, k, n, reinterpret_cast<float*>(out_ptr));
}

// The fused low-rank update of one 2-d tensor (block) in place: csrc/cpu/lowrank.h has the semantics.
void lowrank_update(uintptr_t w_ptr, int64_t m, int64_t n, int64_t row0, int64_t col0, int64_t M, int64_t N,
                    int64_t r, int64_t base, int dtype, bool stochastic, const py::int_& seed_u,
                    const py::int_& seed_v, double alpha, double beta) {
  const uint64_t su = to_seed(seed_u), sv = to_seed(seed_v);
  check_lowrank(w_ptr, m, n, row0, col0, M, N, r, base, dtype);
  const mezo::cpu::LowrankJob job{reinterpret_cast<void*>(w_ptr), m, n, row0, col0, M, N, r, base, dtype,
                                  stochastic, su, sv, static_cast<float>(alpha), static_cast<float>(beta)};
  py::gil_scoped_release nogil;
  mezo::cpu::lowrank_update(job);
}

void normals(const py::int_& seed, int64_t g0, int64_t n, uintptr_t out_ptr) {
  const uint64_t s = to_seed(seed);
  check_out(n, out_ptr);
  if (g0 < 0 || g0 > (int64_t{1} << 62) - n) throw py::value_error("g0 must be in [0, 2**62 - n), got " + str(g0));
  if (n == 0) return;
  py::gil_scoped_release nogil;
  mezo::cpu::normals(s, static_cast<uint64_t>(g0), n, reinterpret_cast<float*>(out_ptr));
}

py::list cpu_features() {
  py::list f = features();
  f.append("op:lowrank_update");
  return f;
}

void set_num_threads(int n) {
  if (n < 1) throw py::value_error("set_num_threads: n must be >= 1, got " + std::to_string(n));
  mezo::cpu::set_num_threads(n);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "mezo-kernels CPU backend: fused seeded perturbation (Philox4x32-10; Box-Muller or signs), thread pool";
  m.def("axpby", &axpby, py::arg("meta_ptr"), py::arg("num_tensors"), py::arg("chunks_ptr"), py::arg("num_chunks"),
        py::arg("chunk_size"), py::arg("dtype"), py::arg("mode"), py::arg("dist"), py::arg("seed"), py::arg("alpha"),
        py::arg("beta"), py::arg("gamma"),
        "Apply a kernel mode with directions of distribution `dist` (spec_codes.h) to every chunk of a plan (host "
        "pointers).");
  m.def("philox4x32_10", &philox4x32_10, py::arg("k0"), py::arg("k1"), py::arg("c0"), py::arg("c1"), py::arg("c2"),
        py::arg("c3"), "One Philox4x32-10 block: (key, counter) -> 4 uint32 words.");
  m.def("philox_words", &philox_words, py::arg("seed"), py::arg("k_start"), py::arg("n"), py::arg("out_ptr"),
        "Write 4*n uint32 words for counters k_start .. k_start+n-1 to host memory.");
  m.def("randn4x", &randn4x, py::arg("seed"), py::arg("k_start"), py::arg("n"), py::arg("out_ptr"),
        "Write 4*n float32 normals z[4k+j] for counters k_start .. k_start+n-1 to host memory.");
  m.def("chunk_size", [] { return mezo::cpu::kChunk; }, "Elements per chunk this backend wants in its plans.");
  m.def("num_threads", &mezo::cpu::num_threads, "Threads the kernels use (the calling thread included).");
  m.def("set_num_threads", &set_num_threads, py::arg("n"), "Set the kernels' thread count for later calls.");
  m.def("build_info", [] { return std::string(mezo::cpu::build_info()); }, "Compiler, ISA flags, chunk size.");
  m.def("spec_codes", &spec_codes, "The spec's constants, kernel modes, distributions and dtype codes compiled in.");
  m.def("lowrank_update", &lowrank_update, py::arg("w_ptr"), py::arg("m"), py::arg("n"), py::arg("row0"),
        py::arg("col0"), py::arg("M"), py::arg("N"), py::arg("r"), py::arg("base"), py::arg("dtype"),
        py::arg("stochastic"), py::arg("seed_u"), py::arg("seed_v"), py::arg("alpha"), py::arg("beta"),
        "Fused low-rank update W <- round(fma(U V^T / sqrt(r), beta, alpha W)) of the m x n block at (row0, col0) "
        "of an (M, N) tensor with base `base` (host pointer, contiguous block; csrc/cpu/lowrank.h).");
  m.def("normals", &normals, py::arg("seed"), py::arg("g0"), py::arg("n"), py::arg("out_ptr"),
        "Write the n float32 normals z(seed, g0 + e) (any g0) to host memory: the stream lowrank_update reads.");
  m.def("features", &cpu_features, "What this build implements: 'dist', 'mode:<NAME>', 'dist:<name>'.");
}
