// pybind11 module: plain arrays in, plain arrays out. The module name comes from the build
// (cryomap._core for the portable build, cryomap._core_avx2 for the AVX2+FMA build).
#include <omp.h>

#include "likelihood.hpp"
#include "projector.hpp"
#include "sums.hpp"

#include <pybind11/stl.h>

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
    m.def("regularised_average", &regularised_average, py::arg("data"), py::arg("weight"),
          py::arg("tau2"), py::arg("pad"), py::arg("ndim"), py::arg("tau2_fudge"),
          py::arg("r_max"), py::arg("minres_map"),
          "RELION's reconstruct on the centred padded grid: D / max(W + 1/(p^d T tau2), "
          "<.>_shell / 1000) inside round(r_max p); tau2 per shell (n,) or per voxel.");
    m.def("symmetrise_sums", &symmetrise_sums, py::arg("data"), py::arg("weight"),
          py::arg("operators"), py::arg("radius"), py::arg("counts") = std::vector<int>{},
          "Point-group sum of back-projection sums: data/weight + sum_R S(R k) for |k| <= "
          "radius (trilinear, Friedel mates conjugated), in steps of counts[s] operators each "
          "summing the previous step's result (one step of all when empty); returns "
          "(data, weight).");
    m.def("phase_shift", &phase_shift, py::arg("images"), py::arg("coords"), py::arg("shifts"),
          py::arg("box"),
          "Translate each image (B,J) by its shift (B,2 px) with RELION's sign convention.");
    m.def("expectation", &expectation, py::arg("images"), py::arg("ctf"), py::arg("inv_sigma2"),
          py::arg("slices"), py::arg("coords"), py::arg("shifts"), py::arg("box"),
          py::arg("log_prior_rot"), py::arg("log_prior_shift"), py::arg("significant_fraction"),
          py::arg("block_rows") = 0, py::arg("block_cols") = 0,
          py::arg("slice_group") = py::array_t<int64_t>(0), py::arg("min_group_mass") = 0.0,
          "E-step: posterior over (shift, orientation) poses of each image.\n"
          "images (B,J) c64, ctf (B,J) f32, inv_sigma2 (B,J) f32 (>= 0; 0 drops a pixel), "
          "slices (R,J) c64, coords (J,2) f32 (kx,ky), shifts (T,2) f64 px, box, "
          "log_prior_rot (R,) f64, log_prior_shift (B,T) f64 (-inf excludes a pose), "
          "significant_fraction in (0,1] (1 = dense); block_rows/block_cols: GEMM tile sizes "
          "(0 = automatic); slice_group (R,) i64 or empty: per-group (class) pruning, groups "
          "below min_group_mass of the total dropped.\nReturns a dict: weights (B,T,R) f32 (sum 1 per image), best_r, "
          "best_t, n_significant (B,) i64, max_prob, log_marginal, min_diff2 (B,) f64.");
    m.def("maximization_sums", &maximization_sums, py::arg("images"), py::arg("ctf"),
          py::arg("inv_sigma2"), py::arg("slices"), py::arg("coords"), py::arg("shifts"),
          py::arg("box"), py::arg("weights"), py::arg("pixel_shell"), py::arg("n_shells"),
          py::arg("data_slices"), py::arg("weight_slices"), py::arg("method") = 0,
          "M-step sums from posterior weights (B,T,R) f32. Accumulates in place "
          "data_slices (R,J) c64 += sum_{i,t} g CTF X(t)/sigma2 and weight_slices (R,J) f32 "
          "+= sum_{i,t} g CTF^2/sigma2; returns residual_power (B, n_shells) f64 = "
          "sum_{t,r} g sum_{j in shell} |X(t) - CTF A_r|^2 (all pixels, not divided by "
          "sigma2). pixel_shell (J,) i64 in [0, n_shells). method: 0 auto, 1 gemm, 2 sparse.");
    m.def("expectation_subsets", &expectation_subsets, py::arg("images"), py::arg("ctf"),
          py::arg("inv_sigma2"), py::arg("slices"), py::arg("coords"), py::arg("shifts"),
          py::arg("box"), py::arg("rot_ptr"), py::arg("rot_index"), py::arg("rot_log_prior"),
          py::arg("shift_ptr"), py::arg("shift_index"), py::arg("shift_log_prior"),
          py::arg("significant_fraction"), py::arg("slice_group") = py::array_t<int64_t>(0),
          py::arg("min_group_mass") = 0.0,
          "E-step over per-image pose subsets: image i against the product of its orientations "
          "slices[rot_index[rot_ptr[i]:rot_ptr[i+1]]] and translations "
          "shifts[shift_index[shift_ptr[i]:shift_ptr[i+1]]] (CSR lists, i64; log priors f64 per "
          "entry, -inf excludes one). Returns a dict: weights (sum_i T_i R_i,) f32 with image "
          "i's (T_i, R_i) block at block_ptr[i]; best_r, best_t (indices into slices, shifts), "
          "n_significant (B,) i64; max_prob, log_marginal, min_diff2 (B,) f64.");
    m.def("maximization_sums_coo", &maximization_sums_coo, py::arg("images"), py::arg("ctf"),
          py::arg("inv_sigma2"), py::arg("slices"), py::arg("coords"), py::arg("shifts"),
          py::arg("box"), py::arg("image_index"), py::arg("shift_index"),
          py::arg("slice_index"), py::arg("weights"), py::arg("pixel_shell"),
          py::arg("n_shells"), py::arg("data_slices"), py::arg("weight_slices"),
          py::arg("method") = 0,
          "maximization_sums with sparse weights: weights (nnz,) f32 of (image_index, "
          "shift_index, slice_index) (nnz,) i64 triples, each at most once.");
    m.def("max_threads", []() { return omp_get_max_threads(); },
          "Number of OpenMP threads the kernels use.");
    m.def("set_threads", [](int n) {
              if (n < 1) throw py::value_error("threads: expected a positive count");
              omp_set_num_threads(n);
          }, py::arg("n"), "Set the number of OpenMP threads for later calls.");
#if defined(CRYOMAP_SIMD_AVX512)
    m.attr("simd") = "avx512";
#elif defined(CRYOMAP_SIMD_AVX2)
    m.attr("simd") = "avx2+fma";
#else
    m.attr("simd") = "baseline";
#endif
}
