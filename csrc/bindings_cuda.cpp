// mezo_kernels._C_cuda: pybind11 front of the CUDA backend (docs/kernel_abi.md). No libtorch and a static
// cudart: pointers and the stream are Python ints (tensor.data_ptr(), torch.cuda.current_stream().cuda_stream),
// so this module works next to any torch build; kernels run on the thread's current device/context.
//
// Reference semantics: as csrc/cuda/launch.h. Checks scalar arguments here (ValueError); the plan tables live on
// the device, so their rows are trusted (mezo_kernels/perturb.py builds them). Launch errors -> RuntimeError.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "bindings_common.h"
#include "cuda/launch.h"
#include "cuda/lowrank.h"

namespace py = pybind11;
using namespace mezo::bind;

namespace {

void raise_if(const char* err, const char* what) {
  // std::runtime_error becomes RuntimeError in Python
  if (err != nullptr) throw std::runtime_error(std::string("mezo_kernels._C_cuda.") + what + ": CUDA error: " + err);
}

void axpby(uintptr_t meta_ptr, int64_t num_tensors, uintptr_t chunks_ptr, int64_t num_chunks, int64_t chunk_size,
           int dtype, int mode, int dist, const py::int_& seed, double alpha, double beta, double gamma,
           uintptr_t stream) {
  const uint64_t s = to_seed(seed);
  check_launch(meta_ptr, num_tensors, chunks_ptr, num_chunks, chunk_size, dtype, mode, dist);
  const char* err;
  {
    py::gil_scoped_release nogil;
    err = mezo::cuda::launch_axpby(reinterpret_cast<const int64_t*>(meta_ptr), num_tensors,
                                   reinterpret_cast<const int64_t*>(chunks_ptr), num_chunks, chunk_size, dtype, mode,
                                   dist, s,
                                   static_cast<float>(alpha), static_cast<float>(beta), static_cast<float>(gamma),
                                   stream);
  }
  raise_if(err, "axpby");
}

void philox_words(const py::int_& seed, const py::int_& k_start, int64_t n, uintptr_t out_ptr, uintptr_t stream) {
  const uint64_t s = to_seed(seed), k = to_counter(k_start);
  check_out(n, out_ptr);
  const char* err;
  {
    py::gil_scoped_release nogil;
    err = mezo::cuda::launch_philox_words(s, k, n, reinterpret_cast<uint32_t*>(out_ptr), stream);
  }
  raise_if(err, "philox_words");
}

void randn4x(const py::int_& seed, const py::int_& k_start, int64_t n, uintptr_t out_ptr, uintptr_t stream) {
  const uint64_t s = to_seed(seed), k = to_counter(k_start);
  check_out(n, out_ptr);
  const char* err;
  {
    py::gil_scoped_release nogil;
    err = mezo::cuda::launch_randn4x(s, k, n, reinterpret_cast<float*>(out_ptr), stream);
  }
  raise_if(err, "randn4x");
}

// The fused low-rank update of one 2-d tensor (block) in place, asynchronous on `stream`: csrc/cuda/lowrank.h.
void lowrank_update(uintptr_t w_ptr, int64_t m, int64_t n, int64_t row0, int64_t col0, int64_t M, int64_t N,
                    int64_t r, int64_t base, int dtype, bool stochastic, const py::int_& seed_u,
                    const py::int_& seed_v, double alpha, double beta, uintptr_t scratch_ptr, int64_t scratch_len,
                    uintptr_t stream) {
  const uint64_t su = to_seed(seed_u), sv = to_seed(seed_v);
  check_lowrank(w_ptr, m, n, row0, col0, M, N, r, base, dtype);
  if (r > mezo::cuda::kLowrankMaxRank)
    throw py::value_error("lowrank_r must be <= " + str(mezo::cuda::kLowrankMaxRank) + " on CUDA, got " + str(r));
  if (mezo::cuda::lowrank_tiles(m, n) > INT32_MAX)
    throw py::value_error("the block (" + str(m) + ", " + str(n) + ") has too many 64 x 64 tiles for one launch");
  const int64_t need = mezo::cuda::lowrank_scratch_doubles(m, n, r);
  if (scratch_ptr == 0 || scratch_len < need)
    throw py::value_error("scratch must hold lowrank_scratch(m, n, r) = " + str(need) + " float64 values, got " +
                          (scratch_ptr == 0 ? std::string("a null pointer") : str(scratch_len)));
  const mezo::cuda::LowrankLaunch job{reinterpret_cast<void*>(w_ptr), m, n, row0, col0, M, N, r, base, dtype,
                                      stochastic, su, sv, static_cast<float>(alpha), static_cast<float>(beta),
                                      reinterpret_cast<double*>(scratch_ptr), stream};
  const char* err;
  {
    py::gil_scoped_release nogil;
    err = mezo::cuda::launch_lowrank(job);
  }
  raise_if(err, "lowrank_update");
}

py::list cuda_features() {
  py::list f = features();
  f.append("op:lowrank_update");
  return f;
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "mezo-kernels CUDA backend: fused seeded perturbation (Gaussian or sign directions), one block per chunk";
  m.def("axpby", &axpby, py::arg("meta_ptr"), py::arg("num_tensors"), py::arg("chunks_ptr"), py::arg("num_chunks"),
        py::arg("chunk_size"), py::arg("dtype"), py::arg("mode"), py::arg("dist"), py::arg("seed"), py::arg("alpha"),
        py::arg("beta"), py::arg("gamma"), py::arg("stream") = 0,
        "Apply a kernel mode with directions of distribution `dist` (spec_codes.h) to every chunk of a plan (device "
        "pointers) on `stream` (cudaStream_t).");
  m.def("philox_words", &philox_words, py::arg("seed"), py::arg("k_start"), py::arg("n"), py::arg("out_ptr"),
        py::arg("stream") = 0, "Write 4*n uint32 words for counters k_start .. k_start+n-1 to device memory.");
  m.def("randn4x", &randn4x, py::arg("seed"), py::arg("k_start"), py::arg("n"), py::arg("out_ptr"),
        py::arg("stream") = 0, "Write 4*n float32 normals for counters k_start .. k_start+n-1 to device memory.");
  m.def("chunk_size", [] { return mezo::cuda::kChunk; }, "Elements per chunk (4 quads of 4 elements per thread).");
  m.def("build_info", [] { return std::string(mezo::cuda::build_info()); }, "nvcc version, archs, chunk size.");
  m.def("spec_codes", &spec_codes, "The spec's constants, kernel modes, distributions and dtype codes compiled in.");
  m.def("lowrank_update", &lowrank_update, py::arg("w_ptr"), py::arg("m"), py::arg("n"), py::arg("row0"),
        py::arg("col0"), py::arg("M"), py::arg("N"), py::arg("r"), py::arg("base"), py::arg("dtype"),
        py::arg("stochastic"), py::arg("seed_u"), py::arg("seed_v"), py::arg("alpha"), py::arg("beta"),
        py::arg("scratch_ptr"), py::arg("scratch_len"), py::arg("stream") = 0,
        "Fused low-rank update W <- round(fma(U V^T / sqrt(r), beta, alpha W)) of the m x n block at (row0, col0) "
        "of an (M, N) tensor with base `base` (device pointer, contiguous block; csrc/cuda/lowrank.h), using "
        "`scratch_len` >= lowrank_scratch(m, n, r) float64 values of device memory at scratch_ptr, on `stream`.");
  m.def("lowrank_scratch", &mezo::cuda::lowrank_scratch_doubles, py::arg("m"), py::arg("n"), py::arg("r"),
        "float64 values of scratch lowrank_update needs for an m x n block at rank r (U and V, padded to tiles).");
  m.def("features", &cuda_features,
        "What this build implements: 'dist', 'mode:<NAME>', 'dist:<name>', 'op:lowrank_update'.");
}
