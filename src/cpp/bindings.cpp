// pybind11 module: plain arrays in, plain arrays out. The module name comes from the build
// (cryomap._core for the portable build, cryomap._core_avx2 for the AVX2+FMA build).
#include <omp.h>

#include "projector.hpp"

#ifndef CRYOMAP_MODULE_NAME
#define CRYOMAP_MODULE_NAME _core
#endif

namespace py = pybind11;
using namespace cryomap;

PYBIND11_MODULE(CRYOMAP_MODULE_NAME, m) {
    m.doc() = "cryomap C++ core: Fourier-slice projection, back-projection, E-step and M-step";
    m.def("project", &project, py::arg("volume_ft"), py::arg("rotations"), py::arg("coords"),
          py::arg("scale"), py::arg("interp"),
          "Central slices of a centred half-volume at the given rotations (R,3,3 RELION Euler "
          "matrices) and image pixels (J,2 kx,ky); returns (R,J) complex64.");
    m.def("backproject", &backproject, py::arg("data"), py::arg("weight"), py::arg("slices"),
          py::arg("slice_weights"), py::arg("rotations"), py::arg("coords"), py::arg("scale"),
          py::arg("interp"),
          "Adjoint of project: accumulate slices and their weights into data/weight in place.");
    m.def("phase_shift", &phase_shift, py::arg("images"), py::arg("coords"), py::arg("shifts"),
          py::arg("box"),
          "Translate each image (B,J) by its shift (B,2 px) with RELION's sign convention.");
    m.def("max_threads", []() { return omp_get_max_threads(); },
          "Number of OpenMP threads the kernels use.");
    m.def("set_threads", [](int n) {
              if (n < 1) throw py::value_error("threads: expected a positive count");
              omp_set_num_threads(n);
          }, py::arg("n"), "Set the number of OpenMP threads for later calls.");
#ifdef CRYOMAP_SIMD_AVX2
    m.attr("simd") = "avx2+fma";
#else
    m.attr("simd") = "baseline";
#endif
}
