// Shared helpers for the cryomap core: array validation and the Fourier volume layout.
//
// Volume layout used by every kernel ("centred half-volume"): a C-contiguous array of shape
// (Z, Y, X) where x = kx >= 0 (0..X-1), y = ky + Y/2, z = kz + Z/2. Y and Z are odd so that the
// grid is symmetric; Z == 1 is a 2D reference (kz = 0 only). Only kx >= 0 is stored: a sample
// at kx < 0 reads conj(V(-k)) (Friedel symmetry of a real map).
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <complex>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace cryomap {

namespace py = pybind11;
using cfloat = std::complex<float>;

// Raise ValueError unless `a` has dtype T, is C-contiguous, and has the given number of dims.
template <typename T>
void require(const py::array& a, const char* name, int ndim) {
    if (!a.dtype().is(py::dtype::of<T>())) {
        throw py::value_error(std::string(name) + ": expected dtype " +
                              std::string(py::str(py::dtype::of<T>())) + ", got " +
                              std::string(py::str(a.dtype())));
    }
    if (!(a.flags() & py::array::c_style)) {
        throw py::value_error(std::string(name) + ": expected a C-contiguous array");
    }
    if (a.ndim() != ndim) {
        throw py::value_error(std::string(name) + ": expected " + std::to_string(ndim) +
                              " dimensions, got " + std::to_string(a.ndim()));
    }
}

inline void require_dim(const py::array& a, const char* name, int axis, py::ssize_t n) {
    if (a.shape(axis) != n) {
        throw py::value_error(std::string(name) + ": expected size " + std::to_string(n) +
                              " on axis " + std::to_string(axis) + ", got " +
                              std::to_string(a.shape(axis)));
    }
}

// A C-contiguous (rows, cols) array of T; a negative extent is not checked.
template <typename T>
void require_matrix(const py::array& a, const char* name, py::ssize_t rows, py::ssize_t cols) {
    require<T>(a, name, 2);
    if (rows >= 0) require_dim(a, name, 0, rows);
    if (cols >= 0) require_dim(a, name, 1, cols);
}

// Raise ValueError if any of the n values is NaN or infinite.
template <typename T>
void require_finite(const T* p, size_t n, const char* name) {
    for (size_t i = 0; i < n; ++i) {
        if (!std::isfinite(p[i])) {
            throw py::value_error(std::string(name) + ": contains NaN or Inf");
        }
    }
}

struct VolumeShape {
    int nz, ny, nx;  // array extents
    int cz, cy;      // index of kz = 0 and ky = 0
};

// The centred half-volume shape of the last three axes of v (`lead` axes before them).
inline VolumeShape volume_shape_of(const py::array& v, int lead, const char* name) {
    VolumeShape s{(int)v.shape(lead), (int)v.shape(lead + 1), (int)v.shape(lead + 2),
                  (int)v.shape(lead) / 2, (int)v.shape(lead + 1) / 2};
    if (s.ny % 2 == 0 || s.nz % 2 == 0) {
        throw py::value_error(std::string(name) +
                              ": centred half-volume needs odd Z and Y extents");
    }
    if (s.nx != s.cy + 1) {
        throw py::value_error(std::string(name) + ": expected X extent = Y//2 + 1");
    }
    if (s.nz != 1 && s.nz != s.ny) {
        throw py::value_error(std::string(name) + ": expected Z extent 1 (2D) or equal to Y");
    }
    return s;
}

inline VolumeShape volume_shape(const py::array& v, const char* name) {
    return volume_shape_of(v, 0, name);
}

enum class Interp { Nearest = 0, Linear = 1 };

inline Interp parse_interp(int v) {
    if (v != 0 && v != 1) throw py::value_error("interp: expected 0 (nearest) or 1 (linear)");
    return static_cast<Interp>(v);
}

// One sample point's voxel footprint: up to 8 voxels with weights, and whether the sample
// reads the Friedel mate (conjugate). Shared by projection and back-projection so the two are
// exact adjoints.
struct Footprint {
    int n = 0;
    int64_t index[8];
    float weight[8];
    bool conj = false;
};

// q = (qx, qy, qz) in padded-grid voxel units.
inline void footprint(float qx, float qy, float qz, const VolumeShape& s, Interp interp,
                      Footprint& f) {
    f.n = 0;
    f.conj = false;
    if (qx < 0.f) {
        qx = -qx;
        qy = -qy;
        qz = -qz;
        f.conj = true;
    }
    if (interp == Interp::Nearest) {
        int x = (int)std::lround(qx), y = (int)std::lround(qy) + s.cy,
            z = (int)std::lround(qz) + s.cz;
        if (x < s.nx && y >= 0 && y < s.ny && z >= 0 && z < s.nz) {
            f.index[0] = ((int64_t)z * s.ny + y) * s.nx + x;
            f.weight[0] = 1.f;
            f.n = 1;
        }
        return;
    }
    const float fx = std::floor(qx), fy = std::floor(qy), fz = std::floor(qz);
    const float dx = qx - fx, dy = qy - fy, dz = qz - fz;
    const int x0 = (int)fx, y0 = (int)fy + s.cy, z0 = (int)fz + s.cz;
    for (int c = 0; c < 8; ++c) {
        const int ox = c & 1, oy = (c >> 1) & 1, oz = (c >> 2) & 1;
        const int x = x0 + ox, y = y0 + oy, z = z0 + oz;
        const float w = (ox ? dx : 1.f - dx) * (oy ? dy : 1.f - dy) * (oz ? dz : 1.f - dz);
        if (w == 0.f || x >= s.nx || y < 0 || y >= s.ny || z < 0 || z >= s.nz) continue;
        f.index[f.n] = ((int64_t)z * s.ny + y) * s.nx + x;
        f.weight[f.n] = w;
        ++f.n;
    }
}

// Rotate an image-plane frequency (kx, ky, 0) into the reference: q = scale * A^T (kx, ky, 0),
// A = RELION's Euler matrix (docs/conventions.md "Euler angles"). `a` is a row-major 3x3 matrix.
inline void rotate_to_reference(const double* a, float kx, float ky, double scale, float& qx,
                                float& qy, float& qz) {
    qx = (float)(scale * (a[0] * kx + a[3] * ky));
    qy = (float)(scale * (a[1] * kx + a[4] * ky));
    qz = (float)(scale * (a[2] * kx + a[5] * ky));
}

}  // namespace cryomap
