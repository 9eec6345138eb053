#include "projector.hpp"

#include <omp.h>

namespace cryomap {

namespace {

struct SliceGeometry {
    py::ssize_t n_rot, n_pix;
};

SliceGeometry check_geometry(const py::array& rotations, const py::array& coords) {
    require<double>(rotations, "rotations", 3);
    require_dim(rotations, "rotations", 1, 3);
    require_dim(rotations, "rotations", 2, 3);
    require<float>(coords, "coords", 2);
    require_dim(coords, "coords", 1, 2);
    require_finite(static_cast<const double*>(rotations.data()), rotations.size(), "rotations");
    require_finite(static_cast<const float*>(coords.data()), coords.size(), "coords");
    return {rotations.shape(0), coords.shape(0)};
}

// Largest factor by which a matrix stretches an image frequency (kx, ky, 0): the spectral
// norm of its first two rows (a 2x3 block), 1 for a rotation, != 1 for the magnified matrices
// of anisotropic magnification or another pixel size (ctf.magnified_rotations).
double max_stretch(const double* rot, py::ssize_t n_rot) {
    double out = 0.0;
    for (py::ssize_t r = 0; r < n_rot; ++r) {
        const double* a = rot + 9 * r;
        // G = B B^T with B the rows (a0 a1 a2) and (a3 a4 a5); largest eigenvalue of G
        const double g00 = a[0] * a[0] + a[1] * a[1] + a[2] * a[2];
        const double g11 = a[3] * a[3] + a[4] * a[4] + a[5] * a[5];
        const double g01 = a[0] * a[3] + a[1] * a[4] + a[2] * a[5];
        const double half = 0.5 * (g00 + g11);
        const double d = 0.5 * (g00 - g11);
        out = std::max(out, half + std::sqrt(d * d + g01 * g01));
    }
    return std::sqrt(out);
}

// Trilinear fast path: when every sample lies within radius cy - 1 of the origin (the radius
// the reference was cropped for), its 2x2x2 footprint is always inside the grid, so the eight
// voxels are fixed offsets from one base index and no bounds checks are needed. The sample
// radius is at most scale * |k| * max_stretch (1 for rotations).
bool linear_fast_path(const float* k, py::ssize_t n_pix, double scale, const VolumeShape& vs,
                      Interp interp, const double* rot, py::ssize_t n_rot) {
    if (interp != Interp::Linear || vs.nz == 1) return false;
    double r2 = 0.0;
    for (py::ssize_t j = 0; j < n_pix; ++j)
        r2 = std::max(r2, (double)k[2 * j] * k[2 * j] + (double)k[2 * j + 1] * k[2 * j + 1]);
    // margin for float rounding of q
    return scale * std::sqrt(r2) * max_stretch(rot, n_rot) + 1.01 < vs.cy;
}

// q = scale * A^T (kx, ky, 0) as a float 3x2 matrix per rotation (docs/conventions.md "Projection").
struct SliceRotation {
    float m[6];
    SliceRotation(const double* a, double scale) {
        m[0] = (float)(scale * a[0]); m[1] = (float)(scale * a[3]);
        m[2] = (float)(scale * a[1]); m[3] = (float)(scale * a[4]);
        m[4] = (float)(scale * a[2]); m[5] = (float)(scale * a[5]);
    }
};

// Base voxel index and fractional offsets of an in-grid sample (fast path only).
struct Cell {
    int64_t base;
    float dx, dy, dz;
    bool conj;
};

inline Cell cell_of(const SliceRotation& r, float kx, float ky, const VolumeShape& vs) {
    float qx = r.m[0] * kx + r.m[1] * ky, qy = r.m[2] * kx + r.m[3] * ky,
          qz = r.m[4] * kx + r.m[5] * ky;
    Cell c;
    c.conj = qx < 0.f;
    if (c.conj) { qx = -qx; qy = -qy; qz = -qz; }
    const float fx = std::floor(qx), fy = std::floor(qy), fz = std::floor(qz);
    c.dx = qx - fx; c.dy = qy - fy; c.dz = qz - fz;
    c.base = ((int64_t)((int)fz + vs.cz) * vs.ny + ((int)fy + vs.cy)) * vs.nx + (int)fx;
    return c;
}

}  // namespace

py::array_t<cfloat> project(const py::array& volume_ft, const py::array& rotations,
                            const py::array& coords, double scale, int interp_code) {
    require<cfloat>(volume_ft, "volume_ft", 3);
    const VolumeShape vs = volume_shape(volume_ft, "volume_ft");
    const SliceGeometry g = check_geometry(rotations, coords);
    const Interp interp = parse_interp(interp_code);
    if (!(scale > 0.0)) throw py::value_error("scale: expected a positive padding factor");

    py::array_t<cfloat> out({g.n_rot, g.n_pix});
    const cfloat* vol = static_cast<const cfloat*>(volume_ft.data());
    const double* rot = static_cast<const double*>(rotations.data());
    const float* k = static_cast<const float*>(coords.data());
    cfloat* slices = out.mutable_data();
    {
        py::gil_scoped_release release;
const bool fast = linear_fast_path(k, g.n_pix, scale, vs, interp, rot, g.n_rot);
        const int64_t sy = vs.nx, sz = (int64_t)vs.ny * vs.nx;
#pragma omp parallel for schedule(static)
        for (py::ssize_t r = 0; r < g.n_rot; ++r) {
            cfloat* out_r = slices + r * g.n_pix;
            if (fast) {
                const SliceRotation rr(rot + 9 * r, scale);
                for (py::ssize_t j = 0; j < g.n_pix; ++j) {
                    const Cell c = cell_of(rr, k[2 * j], k[2 * j + 1], vs);
                    const cfloat* v = vol + c.base;
                    const float ex = 1.f - c.dx, ey = 1.f - c.dy;
                    const cfloat c0 = (v[0] * ex + v[1] * c.dx) * ey +
                                      (v[sy] * ex + v[sy + 1] * c.dx) * c.dy;
                    const cfloat c1 = (v[sz] * ex + v[sz + 1] * c.dx) * ey +
                                      (v[sz + sy] * ex + v[sz + sy + 1] * c.dx) * c.dy;
                    const cfloat acc = c0 * (1.f - c.dz) + c1 * c.dz;
                    out_r[j] = c.conj ? std::conj(acc) : acc;
                }
                continue;
            }
            Footprint f;
            const double* a = rot + 9 * r;
            for (py::ssize_t j = 0; j < g.n_pix; ++j) {
                float qx, qy, qz;
                rotate_to_reference(a, k[2 * j], k[2 * j + 1], scale, qx, qy, qz);
                footprint(qx, qy, qz, vs, interp, f);
                cfloat acc(0.f, 0.f);
                for (int c = 0; c < f.n; ++c) acc += f.weight[c] * vol[f.index[c]];
                slices[r * g.n_pix + j] = f.conj ? std::conj(acc) : acc;
            }
        }
    }
    return out;
}

void backproject(py::array& data, py::array& weight, const py::array& slices,
                 const py::array& slice_weights, const py::array& rotations,
                 const py::array& coords, double scale, int interp_code) {
    require<cfloat>(data, "data", 3);
    require<float>(weight, "weight", 3);
    const VolumeShape vs = volume_shape(data, "data");
    for (int ax = 0; ax < 3; ++ax) require_dim(weight, "weight", ax, data.shape(ax));
    if (!data.writeable() || !weight.writeable())
        throw py::value_error("data, weight: expected writeable arrays");
    const SliceGeometry g = check_geometry(rotations, coords);
    require<cfloat>(slices, "slices", 2);
    require_dim(slices, "slices", 0, g.n_rot);
    require_dim(slices, "slices", 1, g.n_pix);
    require<float>(slice_weights, "slice_weights", 2);
    require_dim(slice_weights, "slice_weights", 0, g.n_rot);
    require_dim(slice_weights, "slice_weights", 1, g.n_pix);
    require_finite(static_cast<const float*>(slices.data()), 2 * slices.size(), "slices");
    require_finite(static_cast<const float*>(slice_weights.data()), slice_weights.size(),
                   "slice_weights");
    const Interp interp = parse_interp(interp_code);
    if (!(scale > 0.0)) throw py::value_error("scale: expected a positive padding factor");

    cfloat* dvol = static_cast<cfloat*>(data.mutable_data());
    float* wvol = static_cast<float*>(weight.mutable_data());
    const cfloat* s = static_cast<const cfloat*>(slices.data());
    const float* sw = static_cast<const float*>(slice_weights.data());
    const double* rot = static_cast<const double*>(rotations.data());
    const float* k = static_cast<const float*>(coords.data());
    const size_t n_vox = (size_t)data.size();

    py::gil_scoped_release release;
    const bool fast = linear_fast_path(k, g.n_pix, scale, vs, interp, rot, g.n_rot);
    const int64_t sy = vs.nx, sz = (int64_t)vs.ny * vs.nx;
    // Each thread splats its orientations into a private volume (no atomics), then the private
    // volumes are summed in parallel over voxels. Memory: threads x (8 + 4) bytes x voxels.
    const int n_threads = std::max(1, std::min<int>(omp_get_max_threads(), (int)g.n_rot));
    std::vector<std::vector<cfloat>> dpriv(n_threads - 1);
    std::vector<std::vector<float>> wpriv(n_threads - 1);
#pragma omp parallel num_threads(n_threads)
    {
        const int tid = omp_get_thread_num();
        cfloat* dv = dvol;
        float* wv = wvol;
        if (tid > 0) {
            dpriv[tid - 1].assign(n_vox, cfloat(0.f, 0.f));
            wpriv[tid - 1].assign(n_vox, 0.f);
            dv = dpriv[tid - 1].data();
            wv = wpriv[tid - 1].data();
        }
        Footprint f;
#pragma omp for schedule(static)
        for (py::ssize_t r = 0; r < g.n_rot; ++r) {
            if (fast) {
                const SliceRotation rr(rot + 9 * r, scale);
                for (py::ssize_t j = 0; j < g.n_pix; ++j) {
                    const cfloat val = s[r * g.n_pix + j];
                    const float wt = sw[r * g.n_pix + j];
                    if (val == cfloat(0.f, 0.f) && wt == 0.f) continue;
                    const Cell c = cell_of(rr, k[2 * j], k[2 * j + 1], vs);
                    const cfloat v = c.conj ? std::conj(val) : val;
                    const float ex = 1.f - c.dx, ey = 1.f - c.dy, ez = 1.f - c.dz;
                    const float w[8] = {ex * ey * ez,      c.dx * ey * ez,      ex * c.dy * ez,
                                        c.dx * c.dy * ez,  ex * ey * c.dz,      c.dx * ey * c.dz,
                                        ex * c.dy * c.dz,  c.dx * c.dy * c.dz};
                    const int64_t off[8] = {0, 1, sy, sy + 1, sz, sz + 1, sz + sy, sz + sy + 1};
                    for (int q = 0; q < 8; ++q) {
                        dv[c.base + off[q]] += w[q] * v;
                        wv[c.base + off[q]] += w[q] * wt;
                    }
                }
                continue;
            }
            const double* a = rot + 9 * r;
            for (py::ssize_t j = 0; j < g.n_pix; ++j) {
                const cfloat val = s[r * g.n_pix + j];
                const float wt = sw[r * g.n_pix + j];
                if (val == cfloat(0.f, 0.f) && wt == 0.f) continue;
                float qx, qy, qz;
                rotate_to_reference(a, k[2 * j], k[2 * j + 1], scale, qx, qy, qz);
                footprint(qx, qy, qz, vs, interp, f);
                const cfloat v = f.conj ? std::conj(val) : val;
                for (int c = 0; c < f.n; ++c) {
                    dv[f.index[c]] += f.weight[c] * v;
                    wv[f.index[c]] += f.weight[c] * wt;
                }
            }
        }
        // implicit barrier above; now reduce the private volumes into the output
#pragma omp for schedule(static)
        for (size_t v = 0; v < n_vox; ++v) {
            for (int t = 0; t < n_threads - 1; ++t) {
                dvol[v] += dpriv[t][v];
                wvol[v] += wpriv[t][v];
            }
        }
    }
}

py::array_t<cfloat> phase_shift(const py::array& images, const py::array& coords,
                                const py::array& shifts, int box) {
    require<cfloat>(images, "images", 2);
    require<float>(coords, "coords", 2);
    require_dim(coords, "coords", 0, images.shape(1));
    require_dim(coords, "coords", 1, 2);
    require<double>(shifts, "shifts", 2);
    require_dim(shifts, "shifts", 0, images.shape(0));
    require_dim(shifts, "shifts", 1, 2);
    require_finite(static_cast<const double*>(shifts.data()), shifts.size(), "shifts");
    if (box <= 0) throw py::value_error("box: expected a positive image size");
    const py::ssize_t n_img = images.shape(0), n_pix = images.shape(1);
    py::array_t<cfloat> out({n_img, n_pix});
    const cfloat* x = static_cast<const cfloat*>(images.data());
    const float* k = static_cast<const float*>(coords.data());
    const double* t = static_cast<const double*>(shifts.data());
    cfloat* y = out.mutable_data();
    py::gil_scoped_release release;
#pragma omp parallel for schedule(static)
    for (py::ssize_t b = 0; b < n_img; ++b) {
        const double sx = t[2 * b], sy = t[2 * b + 1];
        for (py::ssize_t j = 0; j < n_pix; ++j) {
            const double ph = -2.0 * M_PI * (k[2 * j] * sx + k[2 * j + 1] * sy) / box;
            y[b * n_pix + j] = x[b * n_pix + j] * cfloat((float)std::cos(ph), (float)std::sin(ph));
        }
    }
    return out;
}

}  // namespace cryomap
