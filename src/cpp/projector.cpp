#include "projector.hpp"

#include <omp.h>

#include <algorithm>

namespace cryomap {

namespace {

struct SliceGeometry {
    py::ssize_t n_rot, n_pix;
};

SliceGeometry check_geometry(const py::array& rotations, const py::array& coords) {
    require<double>(rotations, "rotations", 3);
    require_dim(rotations, "rotations", 1, 3);
    require_dim(rotations, "rotations", 2, 3);
    require_matrix<float>(coords, "coords", -1, 2);
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
    // data (C, nz, ny, nx) or (nz, ny, nx) = one copy: thread c accumulates into copy c only,
    // so no thread waits and no copy is made here; the caller sums the copies.
    if (data.ndim() != 3 && data.ndim() != 4)
        throw py::value_error("data: expected a (nz, ny, nx) volume or a (copies, nz, ny, nx) "
                              "stack, got " + std::to_string(data.ndim()) + " dimensions");
    const int lead = (int)data.ndim() - 3;
    require<cfloat>(data, "data", (int)data.ndim());
    require<float>(weight, "weight", (int)data.ndim());
    for (int ax = 0; ax < data.ndim(); ++ax) require_dim(weight, "weight", ax, data.shape(ax));
    if (!data.writeable() || !weight.writeable())
        throw py::value_error("data, weight: expected writeable arrays");
    const int n_copies = lead ? (int)data.shape(0) : 1;
    if (n_copies < 1) throw py::value_error("data: expected at least one copy");
    const VolumeShape vs = volume_shape_of(data, lead, "data");
    const SliceGeometry g = check_geometry(rotations, coords);
    require_matrix<cfloat>(slices, "slices", g.n_rot, g.n_pix);
    require_matrix<float>(slice_weights, "slice_weights", g.n_rot, g.n_pix);
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
    const size_t n_vox = (size_t)vs.nz * vs.ny * vs.nx;

    py::gil_scoped_release release;
    const bool fast = linear_fast_path(k, g.n_pix, scale, vs, interp, rot, g.n_rot);
    const int64_t sy = vs.nx, sz = (int64_t)vs.ny * vs.nx;
    const int n_threads = std::max(1, std::min<int>(omp_get_max_threads(), n_copies));
#pragma omp parallel num_threads(n_threads)
    {
        const int tid = omp_get_thread_num();
        cfloat* dv = dvol + (size_t)tid * n_vox;
        float* wv = wvol + (size_t)tid * n_vox;
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
    }
}

py::array_t<cfloat> phase_shift(const py::array& images, const py::array& coords,
                                const py::array& shifts, int box) {
    require<cfloat>(images, "images", 2);
    require_matrix<float>(coords, "coords", images.shape(1), 2);
    require_matrix<double>(shifts, "shifts", images.shape(0), 2);
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

namespace cryomap {

py::array_t<cfloat> regularised_average(const py::array& data, const py::array& weight,
                                        const py::array& tau2, double pad, int ndim,
                                        double tau2_fudge, double r_max, int minres_map) {
    require<cfloat>(data, "data", 3);
    require<float>(weight, "weight", 3);
    for (int ax = 0; ax < 3; ++ax) require_dim(weight, "weight", ax, data.shape(ax));
    const VolumeShape vs = volume_shape(data, "data");
    require<double>(tau2, "tau2", tau2.ndim() == 3 ? 3 : 1);
    const bool per_voxel = tau2.ndim() == 3;
    if (per_voxel)
        for (int ax = 0; ax < 3; ++ax) require_dim(tau2, "tau2", ax, data.shape(ax));
    if (!(pad > 0.0) || !(tau2_fudge > 0.0) || !(r_max >= 0.0) || (ndim != 2 && ndim != 3))
        throw py::value_error("pad, tau2_fudge > 0, r_max >= 0 and ndim 2 or 3 expected");
    const py::ssize_t n_tau = per_voxel ? 0 : tau2.shape(0);
    if (!per_voxel && n_tau < 1) throw py::value_error("tau2: expected at least one shell");
    const cfloat* d = static_cast<const cfloat*>(data.data());
    const float* w = static_cast<const float*>(weight.data());
    const double* t2 = static_cast<const double*>(tau2.data());
    py::array_t<cfloat> out({data.shape(0), data.shape(1), data.shape(2)});
    cfloat* o = out.mutable_data();
    const int64_t n_vox = (int64_t)vs.nz * vs.ny * vs.nx;
    const double limit = std::round(r_max * pad);  // inside: |q| < round(r_max * pad)
    const double prior_scale = std::pow(pad, ndim) * tau2_fudge;
    const int n_floor = std::max((int)r_max - 1, 0);  // floor shells are capped at r_max - 1
    const int n_shells = per_voxel ? 1 : (int)n_tau;
    py::gil_scoped_release release;

    // W' = W + 1/(p^d T tau2) at shells >= minres_map; where tau2 is 0, 1/(0.001 W)
    auto w_prime = [&](int64_t v, double r, double wv) {
        const int64_t shell = (int64_t)std::floor(r / pad + 0.5);
        if (shell < minres_map) return wv;
        const double t = per_voxel ? t2[v] : t2[std::min<int64_t>(shell, n_tau - 1)];
        if (t > 0.0) return wv + 1.0 / (prior_scale * t);
        return wv > 1e-20 ? wv + 1.0 / (0.001 * wv) : wv;
    };
    auto radius = [&](int64_t v) {
        const int64_t z = v / ((int64_t)vs.ny * vs.nx), y = (v / vs.nx) % vs.ny, x = v % vs.nx;
        const double kz = (double)(z - vs.cz), ky = (double)(y - vs.cy), kx = (double)x;
        return std::sqrt(kz * kz + ky * ky + kx * kx);
    };
    // per floor shell (inside only): the mean of W', summed per thread then in thread order
    std::vector<double> mean(n_shells, 0.0);
    if (!per_voxel) {
        const int n_threads = omp_get_max_threads();
        std::vector<std::vector<double>> sum(n_threads, std::vector<double>(n_shells, 0.0));
        std::vector<std::vector<int64_t>> cnt(n_threads, std::vector<int64_t>(n_shells, 0));
#pragma omp parallel num_threads(n_threads)
        {
            const int tid = omp_get_thread_num();
#pragma omp for schedule(static)
            for (int64_t v = 0; v < n_vox; ++v) {
                const double r = radius(v);
                if (!(r < limit)) continue;
                const int fs = std::min((int)std::floor(r / pad), n_floor);
                if (fs >= n_shells) continue;
                sum[tid][fs] += w_prime(v, r, (double)w[v]);
                cnt[tid][fs] += 1;
            }
        }
        for (int s = 0; s < n_shells; ++s) {
            double total = 0.0;
            int64_t count = 0;
            for (int t = 0; t < n_threads; ++t) { total += sum[t][s]; count += cnt[t][s]; }
            mean[s] = count > 0 ? total / (double)count : 0.0;
        }
    }
#pragma omp parallel for schedule(static)
    for (int64_t v = 0; v < n_vox; ++v) {
        const double r = radius(v);
        double wp = w_prime(v, r, (double)w[v]);
        if (!per_voxel) {
            const int fs = std::min((int)std::floor(r / pad), n_floor);
            wp = std::max(wp, mean[std::min(fs, n_shells - 1)] / 1000.0);
        }
        o[v] = (r < limit && wp > 0.0)
                   ? cfloat((float)(d[v].real() / wp), (float)(d[v].imag() / wp))
                   : cfloat(0.f, 0.f);
    }
    return out;
}

}  // namespace cryomap

namespace cryomap {

namespace {

// od/ow += S(R k) of the input d/w for voxels |k| <= radius, one operator R (row-major 3x3):
// trilinear, a negative-x point read as the conjugate of its Friedel mate; a signed
// permutation (the 90 and 180 degree turns about x, y, z: all of C4, D4 and O in RELION's
// settings) maps grid points onto grid points: a gather.
template <typename T>
void add_rotated(const std::complex<T>* d, const T* w, std::complex<T>* od, T* ow,
                 const double* a, int m, double r2max) {
    using C = std::complex<T>;
    const int n = 2 * m + 1;
    const int64_t sy = m + 1, sz = (int64_t)n * (m + 1);
    int ia[9];
    bool permutation = true;
    for (int i = 0; i < 9; ++i) {
        ia[i] = (int)std::lround(a[i]);
        permutation = permutation && std::abs(a[i] - ia[i]) < 1e-9;
    }
    if (permutation) {
#pragma omp parallel for schedule(static)
        for (int z = 0; z < n; ++z) {
            const int kz = z - m;
            for (int y = 0; y < n; ++y) {
                const int ky = y - m;
                for (int kx = 0; kx <= m; ++kx) {
                    if ((double)kx * kx + (double)ky * ky + (double)kz * kz > r2max) continue;
                    int px = ia[0] * kx + ia[1] * ky + ia[2] * kz,
                        py = ia[3] * kx + ia[4] * ky + ia[5] * kz,
                        pz = ia[6] * kx + ia[7] * ky + ia[8] * kz;
                    const bool conj = px < 0;
                    if (conj) { px = -px; py = -py; pz = -pz; }
                    const int64_t src = ((int64_t)pz + m) * sz + ((int64_t)py + m) * sy + px;
                    const int64_t v = (int64_t)z * sz + (int64_t)y * sy + kx;
                    od[v] += conj ? std::conj(d[src]) : d[src];
                    ow[v] += w[src];
                }
            }
        }
        return;
    }
    // in tiles of kTile^3 voxels: a rotated tile reads a compact part of the arrays (cache)
    constexpr int kTile = 8;
    const int tz = (n + kTile - 1) / kTile, ty = tz, tx = (m + 1 + kTile - 1) / kTile;
#pragma omp parallel for schedule(dynamic, 4)
    for (int t = 0; t < tz * ty * tx; ++t) {
        const int z0 = (t / (ty * tx)) * kTile, y0 = ((t / tx) % ty) * kTile,
                  x0 = (t % tx) * kTile;
        for (int z = z0; z < std::min(z0 + kTile, n); ++z) {
            const double kz = z - m;
            for (int y = y0; y < std::min(y0 + kTile, n); ++y) {
                const double ky = y - m;
                for (int x = x0; x < std::min(x0 + kTile, m + 1); ++x) {
                    const double kx = x;
                    if (kx * kx + ky * ky + kz * kz > r2max) continue;
                    double p[3] = {a[0] * kx + a[1] * ky + a[2] * kz,
                                   a[3] * kx + a[4] * ky + a[5] * kz,
                                   a[6] * kx + a[7] * ky + a[8] * kz};
                    const bool conj = p[0] < 0.0;
                    if (conj) { p[0] = -p[0]; p[1] = -p[1]; p[2] = -p[2]; }
                    const double fx = std::floor(p[0]), fy = std::floor(p[1]),
                                 fz = std::floor(p[2]);
                    const T dx = (T)(p[0] - fx), dy = (T)(p[1] - fy), dz = (T)(p[2] - fz);
                    const T ex = T(1) - dx, ey = T(1) - dy, ez = T(1) - dz;
                    const int64_t base = ((int64_t)fz + m) * sz + ((int64_t)fy + m) * sy
                                         + (int64_t)fx;
                    const C* q = d + base;
                    const T* u = w + base;
                    C sd = ((q[0] * ex + q[1] * dx) * ey + (q[sy] * ex + q[sy + 1] * dx) * dy)
                               * ez
                           + ((q[sz] * ex + q[sz + 1] * dx) * ey
                              + (q[sz + sy] * ex + q[sz + sy + 1] * dx) * dy) * dz;
                    const T swt = ((u[0] * ex + u[1] * dx) * ey
                                   + (u[sy] * ex + u[sy + 1] * dx) * dy) * ez
                                  + ((u[sz] * ex + u[sz + 1] * dx) * ey
                                     + (u[sz + sy] * ex + u[sz + sy + 1] * dx) * dy) * dz;
                    if (conj) sd = std::conj(sd);
                    const int64_t v = z * sz + y * sy + x;
                    od[v] += sd;
                    ow[v] += swt;
                }
            }
        }
    }
}

// Steps s = 1..S over consecutive groups of `counts[s]` operators: S_s = S_{s-1} +
// sum_{R in group s} S_{s-1}(R k) (S_0 the input; one group of all operators when counts is
// empty); the kernel of symmetrise_sums, in the arrays' precision. Two buffers alternate, so
// a step costs one copy and its operators' passes.
template <typename T>
py::tuple symmetrise_sums_impl(const py::array& data, const py::array& weight,
                               const py::array& operators, double radius,
                               const std::vector<int>& counts) {
    using C = std::complex<T>;
    require<C>(data, "data", 3);
    require<T>(weight, "weight", 3);
    for (int ax = 0; ax < 3; ++ax) require_dim(weight, "weight", ax, data.shape(ax));
    require<double>(operators, "operators", 3);
    require_dim(operators, "operators", 1, 3);
    require_dim(operators, "operators", 2, 3);
    const VolumeShape vs = volume_shape(data, "data");
    const int m = vs.nx - 1;
    if (vs.nz != 2 * m + 1 || vs.ny != 2 * m + 1)
        throw py::value_error("data: expected a 3D centred half-volume");
    if (!(radius >= 0.0) || radius > m - 1)
        throw py::value_error("radius: expected 0 <= radius <= m - 1 = " + std::to_string(m - 1));
    const py::ssize_t n_ops = operators.shape(0);
    std::vector<int> steps = counts.empty() ? std::vector<int>{(int)n_ops} : counts;
    py::ssize_t total = 0;
    for (int c : steps) {
        if (c < 0) throw py::value_error("counts: expected counts >= 0");
        total += c;
    }
    if (total != n_ops)
        throw py::value_error("counts: expected counts summing to the operators' number " +
                              std::to_string(n_ops));
    const C* d = static_cast<const C*>(data.data());
    const T* w = static_cast<const T*>(weight.data());
    const double* ops = static_cast<const double*>(operators.data());
    const size_t size = (size_t)data.size();
    py::array_t<C> out_d({data.shape(0), data.shape(1), data.shape(2)});
    py::array_t<T> out_w({data.shape(0), data.shape(1), data.shape(2)});
    const double r2max = radius * radius + 1e-9;
    {
        py::gil_scoped_release release;
        std::vector<C> scratch_d(steps.size() > 1 ? size : 0);
        std::vector<T> scratch_w(steps.size() > 1 ? size : 0);
        // the last step writes into the returned arrays
        C* bd[2] = {out_d.mutable_data(), scratch_d.data()};
        T* bw[2] = {out_w.mutable_data(), scratch_w.data()};
        const C* in_d = d;
        const T* in_w = w;
        const double* a = ops;
        for (size_t s = 0; s < steps.size(); ++s) {
            const int b = (int)((steps.size() - 1 - s) % 2);
            std::copy(in_d, in_d + size, bd[b]);
            std::copy(in_w, in_w + size, bw[b]);
            for (int o = 0; o < steps[s]; ++o, a += 9)
                add_rotated<T>(in_d, in_w, bd[b], bw[b], a, m, r2max);
            in_d = bd[b];
            in_w = bw[b];
        }
    }
    return py::make_tuple(out_d, out_w);
}

}  // namespace

py::tuple symmetrise_sums(const py::array& data, const py::array& weight,
                          const py::array& operators, double radius,
                          const std::vector<int>& counts) {
    if (data.dtype().is(py::dtype::of<std::complex<double>>()))
        return symmetrise_sums_impl<double>(data, weight, operators, radius, counts);
    return symmetrise_sums_impl<float>(data, weight, operators, radius, counts);
}

}  // namespace cryomap
