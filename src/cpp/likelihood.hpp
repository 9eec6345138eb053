// E-step: squared differences of every image against every (shift, orientation) pose and the
// normalised posterior over poses (docs/method.md eq. (17)), by GEMMs.
//
// Notation (docs/method.md eqs. (2)-(4)): image i, Fourier pixel j, shift t, slice r.
//   X_ij(t) = X_ij exp(-2 pi i (kx_j tx + ky_j ty) / N)        shifted image
//   diff2(i,t,r) = sum_j |X_ij(t) - CTF_ij A_rj|^2 inv_sigma2_ij / 2
//   Y_it(j) = CTF_ij X_ij(t) inv_sigma2_ij,  W_ij = CTF_ij^2 inv_sigma2_ij
//   diff2 = c_i - Re sum_j conj(A_rj) Y_it(j) + 1/2 sum_j W_ij |A_rj|^2,
//   c_i = 1/2 sum_j |X_ij|^2 inv_sigma2_ij.
#pragma once

#include <algorithm>
#include <cstring>
#include <limits>

#include "common.hpp"

namespace cryomap {

// Borrowed views of the validated inputs shared by the E-step and the M-step sums.
struct ModelData {
    py::ssize_t n_img = 0, n_pix = 0, n_rot = 0, n_shift = 0;
    const cfloat* images = nullptr;      // (B, J)
    const float* ctf = nullptr;          // (B, J)
    const float* inv_sigma2 = nullptr;   // (B, J), >= 0; 0 excludes a pixel
    const cfloat* slices = nullptr;      // (R, J)
    const float* coords = nullptr;       // (J, 2) (kx, ky)
    const double* shifts = nullptr;      // (T, 2) pixels
    int box = 0;
};

// Validate images/ctf/inv_sigma2/slices/coords/shifts/box (dtype, shape, contiguity, finite
// values, inv_sigma2 >= 0) and return views of them. Raises ValueError.
ModelData check_model_data(const py::array& images, const py::array& ctf,
                           const py::array& inv_sigma2, const py::array& slices,
                           const py::array& coords, const py::array& shifts, int box);

// True if none of the n values is NaN or infinite (vectorised and threaded; x * 0 is NaN
// exactly for non-finite x).
inline bool all_finite(const float* p, size_t n) {
    float check = 0.f;
#pragma omp parallel for simd reduction(+ : check) schedule(static) if (n > (1u << 20))
    for (size_t k = 0; k < n; ++k) check += p[k] * 0.f;
    return !std::isnan(check);
}

// Raise ValueError "<name>: contains NaN or Inf" unless all_finite(p, n).
inline void require_all_finite(const float* p, size_t n, const char* name) {
    if (!all_finite(p, n)) throw py::value_error(std::string(name) + ": contains NaN or Inf");
}

// Phase factors P_tj = exp(-2 pi i (kx_j tx_t + ky_j ty_t) / N) (T x J), evaluated in double
// (same convention as phase_shift, docs/conventions.md "Shifts").
std::vector<cfloat> shift_phases(const ModelData& d);

// y[j] = u[j] * p[j] for n complex values (interleaved floats; vectorises, unlike
// std::complex's operator* with its NaN recovery).
inline void complex_multiply(const cfloat* u, const cfloat* p, cfloat* y, py::ssize_t n) {
    const float* uf = reinterpret_cast<const float*>(u);
    const float* pf = reinterpret_cast<const float*>(p);
    float* yf = reinterpret_cast<float*>(y);
#pragma omp simd
    for (py::ssize_t j = 0; j < n; ++j) {
        const float ur = uf[2 * j], ui = uf[2 * j + 1], pr = pf[2 * j], pi = pf[2 * j + 1];
        yf[2 * j] = ur * pr - ui * pi;
        yf[2 * j + 1] = ur * pi + ui * pr;
    }
}

// exp(x) for x <= 0 in float; relative error ~1e-7, exactly 1 at x = 0, and 0 below -87
// (including -inf). Written without branches or float-to-int conversions (which GCC will not
// if-convert under -ftrapping-math) so that loops over it vectorise.
inline float exp_nonpositive(float x) {
    const float big = x * 1.44269504088896341f + 12582912.0f;  // 1.5 * 2^23 + round(x / ln 2)
    const float n = big - 12582912.0f;
    const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;  // x - n ln 2, Cody-Waite
    float p = 1.9875691500e-4f;  // Cephes expf minimax polynomial on [-ln2/2, ln2/2]
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    uint32_t bits;
    std::memcpy(&bits, &big, sizeof bits);
    bits = (bits - 0x4B400000u + 127u) << 23;  // 2^n from the low mantissa bits of big
    float v;
    std::memcpy(&v, &bits, sizeof v);
    v *= p;
    std::memcpy(&bits, &v, sizeof bits);
    bits &= 0u - (uint32_t)(x >= -87.0f);  // below -87, 2^n is out of range: return 0
    std::memcpy(&v, &bits, sizeof v);
    return v;
}

// Tile sizes of the E-step GEMMs (0 = automatic). They never depend on the thread count, so
// results are bitwise identical for any number of threads.
struct EStepBlocking {
    py::ssize_t rows = 0;  // target rows (image x shift) per tile
    py::ssize_t cols = 0;  // orientations per tile
};

// slice_group (R,) int64 or empty: with several groups (classes) and significant_fraction < 1,
// each group keeps its own significant set (a group below min_group_mass of the total is
// dropped). The E-step. Returns a dict with weights (B,T,R) float32, best_r, best_t, n_significant
// (B,) int64, max_prob, log_marginal, min_diff2 (B,) float64. See bindings.cpp.
py::dict expectation(const py::array& images, const py::array& ctf, const py::array& inv_sigma2,
                     const py::array& slices, const py::array& coords, const py::array& shifts,
                     int box, const py::array& log_prior_rot, const py::array& log_prior_shift,
                     double significant_fraction, py::ssize_t block_rows,
                     py::ssize_t block_cols, const py::array& slice_group,
                     double min_group_mass);

// The E-step over per-image pose subsets: image i is scored against the product of its
// orientations slices[rot_index[rot_ptr[i]:rot_ptr[i+1]]] and its translations
// shifts[shift_index[shift_ptr[i]:shift_ptr[i+1]]], each entry with its own log prior. Returns
// a dict with weights (sum_i T_i R_i,) f32, image i's (T_i x R_i) block starting at
// block_ptr[i]; best_r / best_t as indices into slices / shifts; n_significant, max_prob,
// log_marginal, min_diff2 per image. See bindings.cpp.
py::dict expectation_subsets(const py::array& images, const py::array& ctf,
                             const py::array& inv_sigma2, const py::array& slices,
                             const py::array& coords, const py::array& shifts, int box,
                             const py::array& rot_ptr, const py::array& rot_index,
                             const py::array& rot_log_prior, const py::array& shift_ptr,
                             const py::array& shift_index, const py::array& shift_log_prior,
                             double significant_fraction, const py::array& slice_group,
                             double min_group_mass);

}  // namespace cryomap
