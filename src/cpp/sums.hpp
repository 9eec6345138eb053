// M-step sums: posterior-weighted back-projection data and weights per slice (the numerator
// and denominator sums of docs/method.md eq. (13)) and the per-image residual power per resolution shell
// (the sum of docs/method.md eq. (15), not yet divided by anything).
#pragma once

#include "likelihood.hpp"

namespace cryomap {

// How maximization_sums evaluates the sums: 0 = choose by cost, 1 = GEMMs over the
// compressed (rows with any weight) x (orientations with any weight) block, 2 = a direct loop
// over the nonzero weights.
enum class SumsMethod { Auto = 0, Gemm = 1, Sparse = 2 };

// data_slices[r, j] += sum_{i,t} g(i,t,r) Y_it(j);  weight_slices[r, j] += sum_{i,t} g(i,t,r) W_ij
// (in place), and returns residual_power (B, n_shells) float64:
//   residual_power[i, s] = sum_{t,r} g(i,t,r) sum_{j: shell_j = s} |X_ij(t) - CTF_ij A_rj|^2
// over all pixels j (whatever inv_sigma2), not divided by sigma2.
py::array_t<double> maximization_sums(const py::array& images, const py::array& ctf,
                                      const py::array& inv_sigma2, const py::array& slices,
                                      const py::array& coords, const py::array& shifts, int box,
                                      const py::array& weights, const py::array& pixel_shell,
                                      py::ssize_t n_shells, py::array& data_slices,
                                      py::array& weight_slices, int method);

// The same sums from a sparse list of weights: weights[e] of image image_index[e] at shift
// shift_index[e] and orientation slice_index[e] (each triple at most once; zeros ignored).
py::array_t<double> maximization_sums_coo(
    const py::array& images, const py::array& ctf, const py::array& inv_sigma2,
    const py::array& slices, const py::array& coords, const py::array& shifts, int box,
    const py::array& image_index, const py::array& shift_index, const py::array& slice_index,
    const py::array& weights, const py::array& pixel_shell, py::ssize_t n_shells,
    py::array& data_slices, py::array& weight_slices, int method);

}  // namespace cryomap
