// Fourier-slice projection and its adjoint (back-projection) on the centred half-volume.
#pragma once
#include "common.hpp"

namespace cryomap {

// slices[r, j] = V(scale * A_r^T (kx_j, ky_j, 0)), interpolated (nearest or trilinear).
py::array_t<cfloat> project(const py::array& volume_ft, const py::array& rotations,
                            const py::array& coords, double scale, int interp);

// Adjoint of project(): data[v] += sum_{r,j} w_{rjv} * slices[r,j] (conjugated for Friedel
// mates) and weight[v] += sum_{r,j} w_{rjv} * slice_weights[r,j]. Accumulates in place.
void backproject(py::array& data, py::array& weight, const py::array& slices,
                 const py::array& slice_weights, const py::array& rotations,
                 const py::array& coords, double scale, int interp);

// out[b, j] = images[b, j] * exp(-2 pi i (kx_j sx_b + ky_j sy_b) / box): translates image b by
// +(sx_b, sy_b) pixels in RELION's sign convention (docs/conventions.md "Shifts").
py::array_t<cfloat> phase_shift(const py::array& images, const py::array& coords,
                                const py::array& shifts, int box);

}  // namespace cryomap
