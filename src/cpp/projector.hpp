// Fourier-slice projection and its adjoint (back-projection) on the centred half-volume.
#pragma once
#include "common.hpp"

namespace cryomap {

// slices[r, j] = V(scale * A_r^T (kx_j, ky_j, 0)), interpolated (nearest or trilinear).
py::array_t<cfloat> project(const py::array& volume_ft, const py::array& rotations,
                            const py::array& coords, double scale, int interp);

// Adjoint of project(): data[v] += sum_{r,j} w_{rjv} * slices[r,j] (conjugated for Friedel
// mates) and weight[v] += sum_{r,j} w_{rjv} * slice_weights[r,j]. Accumulates in place.
// data and weight may be stacks of copies (C, nz, ny, nx): up to C threads each accumulate
// into their own copy (the sum of the copies is the back-projection).
void backproject(py::array& data, py::array& weight, const py::array& slices,
                 const py::array& slice_weights, const py::array& rotations,
                 const py::array& coords, double scale, int interp);

// RELION's reconstruct on the centred padded grid: V = D / max(W', <W'>_shell / 1000) with
// W' = W + 1/(pad^ndim tau2_fudge tau2) at shells round(|q|/pad) >= minres_map (1/(0.001 W)
// where tau2 is 0), the floor's mean over floor(|q|/pad) (capped at r_max - 1) inside
// |q| < round(r_max pad), V = 0 outside. tau2 (n_shells,) per shell, or per voxel (the
// grid's shape: no floor). Returns complex64 of the grid's shape.
py::array_t<cfloat> regularised_average(const py::array& data, const py::array& weight,
                                        const py::array& tau2, double pad, int ndim,
                                        double tau2_fudge, double r_max, int minres_map);

// Back-projection sums summed over a point group (RELION's applyPointGroupSymmetry): for each
// voxel k of the centred half-volume with |k| <= radius, data/weight + sum over `operators`
// (n, 3, 3; the identity left out) of the sums at R k, trilinear, a point with negative x
// read as the conjugate of its Friedel mate; other voxels as given. With `counts`, in steps:
// step s sums the previous step's result over its counts[s] operators (a group's factors,
// symmetry.transversal_chain). complex64/float32 or complex128/float64 arrays; returns
// (data, weight) new arrays of the same dtypes.
py::tuple symmetrise_sums(const py::array& data, const py::array& weight,
                          const py::array& operators, double radius,
                          const std::vector<int>& counts = {});

// out[b, j] = images[b, j] * exp(-2 pi i (kx_j sx_b + ky_j sy_b) / box): translates image b by
// +(sx_b, sy_b) pixels in RELION's sign convention (docs/conventions.md "Shifts").
py::array_t<cfloat> phase_shift(const py::array& images, const py::array& coords,
                                const py::array& shifts, int box);

}  // namespace cryomap
