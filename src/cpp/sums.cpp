// M-step sums (docs/method.md eqs. (13)-(15)) from the posterior weights, by GEMMs over the compressed
// support of the weights, or by a direct loop over the nonzero weights when they are few.
//
// Memory, GEMM path (Ra = orientations with any weight, BTa = (image, shift) rows with any
// weight; no compression when it would save < 10%): shifted images Y (BTa x J complex), the
// compressed weights (BTa x Ra floats) and slices (Ra x J complex) only if compressed, |A|^2
// (Ra x J floats), the shift-summed weights (B x Ra), per-pixel-block partial residuals
// (J/512 x B x n_shells doubles), and per thread one tile of sums (256 x 1536 floats) and of
// weighted-mean slices (~256 rows x 1024 floats) plus Eigen's packing buffers. Sparse path: the
// nonzero weights in two index layouts (2 x 12 bytes per nonzero) and per thread O(J) buffers.
#include "sums.hpp"

#include <omp.h>

#include "eigen_maps.hpp"
#include <algorithm>

namespace cryomap {

namespace {

// Sparse path when nnz * kSparseCost < BTa * Ra (measured on AVX2, B=128 T=21 R=4608 J=800: a
// nonzero weight costs the direct loop about as much as 12 (row, column) cells of the GEMMs).
constexpr double kSparseCost = 12.0;
constexpr py::ssize_t kColBlock = 256;  // orientations per column-phase GEMM
constexpr py::ssize_t kRowBlock = 256;  // target (image, shift) rows per row-phase GEMM
constexpr py::ssize_t kPixBlock = 512;  // complex pixels per tile of either phase

bool overlaps(const py::array& a, const py::array& b) {
    const char* a0 = static_cast<const char*>(a.data());
    const char* b0 = static_cast<const char*>(b.data());
    return a.nbytes() > 0 && b.nbytes() > 0 && a0 < b0 + b.nbytes() && b0 < a0 + a.nbytes();
}

inline const float* as_floats(const cfloat* p) { return reinterpret_cast<const float*>(p); }
inline float* as_floats(cfloat* p) { return reinterpret_cast<float*>(p); }

// Rows (i*T+t) and orientations with any nonzero weight.
struct Support {
    std::vector<int64_t> rows;             // active rows, ascending
    std::vector<int64_t> cols;             // active orientations, ascending
    std::vector<int64_t> row_nnz;          // nonzeros of every row (B*T)
    std::vector<int64_t> image_row_start;  // (B+1): active rows of image i are
                                           // rows[image_row_start[i] : image_row_start[i+1]]
    int64_t nnz = 0;
    bool finite = true;  // no NaN or Inf among the weights
};

Support weight_support(const float* g, py::ssize_t B, py::ssize_t T, py::ssize_t R) {
    Support sp;
    const py::ssize_t BT = B * T;
    sp.row_nnz.assign((size_t)BT, 0);
    std::vector<uint8_t> col((size_t)R, 0);
    float check = 0.f;  // NaN iff some weight is not finite
#pragma omp parallel reduction(+ : check)
    {
        std::vector<uint8_t> mine((size_t)R, 0);
#pragma omp for schedule(static)
        for (py::ssize_t row = 0; row < BT; ++row) {
            const float* gr = g + row * R;
            int n = 0;
            float chk = 0.f;
#pragma omp simd reduction(+ : n, chk)
            for (py::ssize_t r = 0; r < R; ++r) {
                const uint8_t nz = gr[r] != 0.f;
                n += nz;
                mine[r] |= nz;
                chk += gr[r] * 0.f;
            }
            sp.row_nnz[row] = n;
            check += chk;
        }
#pragma omp critical
        for (py::ssize_t r = 0; r < R; ++r) col[r] |= mine[r];
    }
    sp.finite = !std::isnan(check);
    sp.image_row_start.assign((size_t)B + 1, 0);
    for (py::ssize_t row = 0; row < BT; ++row) {
        if (sp.row_nnz[row] > 0) {
            sp.rows.push_back(row);
            sp.nnz += sp.row_nnz[row];
        }
        sp.image_row_start[row / T + 1] = (int64_t)sp.rows.size();
    }
    for (py::ssize_t r = 0; r < R; ++r)
        if (col[r]) sp.cols.push_back(r);
    return sp;
}

// Inputs of both paths: phase table P (T x J), U = CTF X / sigma2 (B x J) and
// W = CTF^2 / sigma2 (B x J).
struct Prepared {
    std::vector<cfloat> phases, u;
    std::vector<float> w;
};

// Add each pixel's value into its shell of res (one image).
inline void bin_shells(const double* acc, const int64_t* shell, py::ssize_t J, double* res) {
    for (py::ssize_t j = 0; j < J; ++j) res[shell[j]] += acc[j];
}

// The support of all rows and orientations (no compression).
Support full_support(py::ssize_t B, py::ssize_t T, py::ssize_t R) {
    Support sp;
    sp.rows.resize((size_t)(B * T));
    sp.cols.resize((size_t)R);
    sp.image_row_start.resize((size_t)B + 1);
    for (py::ssize_t k = 0; k < B * T; ++k) sp.rows[k] = k;
    for (py::ssize_t r = 0; r < R; ++r) sp.cols[r] = r;
    for (py::ssize_t i = 0; i <= B; ++i) sp.image_row_start[i] = i * T;
    return sp;
}

// The nonzero weights by row i*T+t (CSR over B*T rows), orientations ascending within a row.
struct Csr {
    std::vector<int64_t> ptr;  // (B*T + 1)
    std::vector<int64_t> col;  // orientation of each nonzero
    std::vector<float> val;    // its weight
};

Csr csr_from_dense(const float* g, const Support& sp, py::ssize_t BT, py::ssize_t R) {
    Csr m;
    m.ptr.assign((size_t)BT + 1, 0);
    for (py::ssize_t row = 0; row < BT; ++row) m.ptr[row + 1] = m.ptr[row] + sp.row_nnz[row];
    m.col.resize((size_t)sp.nnz);
    m.val.resize((size_t)sp.nnz);
#pragma omp parallel for schedule(static)
    for (py::ssize_t row = 0; row < BT; ++row) {
        int64_t e = m.ptr[row];
        const float* gr = g + row * R;
        // skip all-zero chunks with a vectorised test; stop after the row's last nonzero
        for (py::ssize_t r0 = 0; r0 < R && e < m.ptr[row + 1]; r0 += 64) {
            const py::ssize_t n = std::min<py::ssize_t>(64, R - r0);
            int any = 0;
#pragma omp simd reduction(| : any)
            for (py::ssize_t k = 0; k < n; ++k) any |= gr[r0 + k] != 0.f;
            if (!any) continue;
            for (py::ssize_t r = r0; r < r0 + n; ++r)
                if (gr[r] != 0.f) {
                    m.col[e] = r;
                    m.val[e] = gr[r];
                    ++e;
                }
        }
    }
    return m;
}

// CSR and support of nonzero weights given as (image, shift, orientation, weight) lists.
// Zero weights are dropped; a repeated (image, shift, orientation) is an error.
Csr csr_from_coo(const int64_t* img, const int64_t* shf, const int64_t* rot, const float* val,
                 py::ssize_t nnz, py::ssize_t B, py::ssize_t T, py::ssize_t R, Support& sp) {
    const py::ssize_t BT = B * T;
    Csr m;
    m.ptr.assign((size_t)BT + 1, 0);
    for (py::ssize_t e = 0; e < nnz; ++e)
        if (val[e] != 0.f) ++m.ptr[img[e] * T + shf[e] + 1];
    for (py::ssize_t row = 0; row < BT; ++row) m.ptr[row + 1] += m.ptr[row];
    const int64_t n = m.ptr[BT];
    m.col.resize((size_t)n);
    m.val.resize((size_t)n);
    std::vector<int64_t> fill(m.ptr.begin(), m.ptr.end() - 1);
    for (py::ssize_t e = 0; e < nnz; ++e) {
        if (val[e] == 0.f) continue;
        const int64_t k = fill[img[e] * T + shf[e]]++;
        m.col[k] = rot[e];
        m.val[k] = val[e];
    }
    std::vector<std::pair<int64_t, float>> tmp;
    std::vector<uint8_t> used((size_t)R, 0);
    sp.row_nnz.assign((size_t)BT, 0);
    sp.image_row_start.assign((size_t)B + 1, 0);
    for (py::ssize_t row = 0; row < BT; ++row) {
        const int64_t a = m.ptr[row], b = m.ptr[row + 1];
        tmp.clear();
        for (int64_t k = a; k < b; ++k) tmp.emplace_back(m.col[k], m.val[k]);
        std::sort(tmp.begin(), tmp.end(),
                  [](const auto& x, const auto& y) { return x.first < y.first; });
        for (int64_t k = a; k < b; ++k) {
            m.col[k] = tmp[k - a].first;
            m.val[k] = tmp[k - a].second;
            if (k > a && m.col[k] == m.col[k - 1])
                throw std::invalid_argument("weights: a (image, shift, orientation) is listed twice");
            used[m.col[k]] = 1;
        }
        sp.row_nnz[row] = b - a;
        if (b > a) sp.rows.push_back(row);
        sp.image_row_start[row / T + 1] = (int64_t)sp.rows.size();
    }
    sp.nnz = n;
    for (py::ssize_t r = 0; r < R; ++r)
        if (used[r]) sp.cols.push_back(r);
    return m;
}

// g: the dense (B*T x R) weights when the caller has them (read in place when nothing is
// compressed), else nullptr; csr: the same nonzeros by row.
void sums_gemm(const ModelData& d, const float* g, const Csr& csr, const Support& support,
               const Prepared& pre, const int64_t* shell, py::ssize_t n_shells, cfloat* data,
               float* wsum, double* res) {
    const py::ssize_t B = d.n_img, T = d.n_shift, R = d.n_rot, J = d.n_pix;
    // Compress to the rows and orientations with any weight unless that saves < 10% of the
    // GEMM work (then the copies would cost more than the zeros).
    const double cells = (double)support.rows.size() * (double)support.cols.size();
    const Support full = cells < 0.9 * (double)(B * T) * (double)R ? Support() :
                                                                       full_support(B, T, R);
    const Support& sp = full.rows.empty() ? support : full;
    const py::ssize_t BTa = (py::ssize_t)sp.rows.size(), Ra = (py::ssize_t)sp.cols.size();
    const bool all_cols = Ra == R, all_rows = BTa == B * T;
    // Compressed weights G (BTa x Ra) and slices A (Ra x J).
    std::vector<float> gc;
    const float* G = g;
    if (!(all_cols && all_rows) || g == nullptr) {
        std::vector<int64_t> cpos((size_t)R, -1);  // orientation -> compressed column
        for (py::ssize_t c = 0; c < Ra; ++c) cpos[sp.cols[c]] = c;
        gc.assign((size_t)(BTa * Ra), 0.f);
#pragma omp parallel for schedule(static)
        for (py::ssize_t a = 0; a < BTa; ++a) {
            const int64_t row = sp.rows[a];
            for (int64_t e = csr.ptr[row]; e < csr.ptr[row + 1]; ++e)
                gc[a * Ra + cpos[csr.col[e]]] = csr.val[e];
        }
        G = gc.data();
    }
    std::vector<cfloat> ac;
    const cfloat* A = d.slices;
    if (!all_cols) {
        ac.resize((size_t)(Ra * J));
#pragma omp parallel for schedule(static)
        for (py::ssize_t c = 0; c < Ra; ++c)
            std::copy(d.slices + sp.cols[c] * J, d.slices + (sp.cols[c] + 1) * J,
                      ac.begin() + c * J);
        A = ac.data();
    }
    std::vector<cfloat> y((size_t)(BTa * J));  // Y_it = CTF X_i(t) / sigma2, active rows
    std::vector<float> gbar((size_t)(B * Ra), 0.f);  // sum_t g(i,t,r)
    std::vector<float> asq((size_t)(Ra * J));        // |A_rj|^2
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (py::ssize_t a = 0; a < BTa; ++a) {
            const py::ssize_t i = sp.rows[a] / T, t = sp.rows[a] % T;
            complex_multiply(pre.u.data() + i * J, pre.phases.data() + t * J, y.data() + a * J,
                             J);
        }
#pragma omp for schedule(static)
        for (py::ssize_t i = 0; i < B; ++i)
            for (int64_t a = sp.image_row_start[i]; a < sp.image_row_start[i + 1]; ++a)
                for (py::ssize_t c = 0; c < Ra; ++c) gbar[i * Ra + c] += G[a * Ra + c];
#pragma omp for schedule(static)
        for (py::ssize_t k = 0; k < Ra * J; ++k) asq[k] = std::norm(A[k]);
    }
    const ConstMap Gm(G, BTa, Ra), Gbar(gbar.data(), B, Ra);
    const ConstMap Ym(as_floats(y.data()), BTa, 2 * J), Wm(pre.w.data(), B, J);
    const ConstMap Am(as_floats(A), Ra, 2 * J), Asq(asq.data(), Ra, J);

    // Both phases run over 2D tiles (orientation or image block x pixel block) so that every
    // GEMM packs only a block of its big operand and the tiles balance over the threads.
    const py::ssize_t n_pb = (J + kPixBlock - 1) / kPixBlock;

    // Column phase (eq. 14 sums): data += G^T [Y], weight += Gbar^T W, per (orientation block,
    // pixel block); tiles write disjoint parts of the output.
    const py::ssize_t n_cb = (Ra + kColBlock - 1) / kColBlock;
#pragma omp parallel
    {
        std::vector<float> sblk, wblk;
#pragma omp for schedule(dynamic)
        for (py::ssize_t tile = 0; tile < n_cb * n_pb; ++tile) {
            const py::ssize_t c0 = (tile / n_pb) * kColBlock, nc = std::min(kColBlock, Ra - c0);
            const py::ssize_t j0 = (tile % n_pb) * kPixBlock, nj = std::min(kPixBlock, J - j0);
            const auto gt = Gm.middleCols(c0, nc).transpose();
            const auto gbt = Gbar.middleCols(c0, nc).transpose();
            const auto yb = Ym.middleCols(2 * j0, 2 * nj);
            const auto wb = Wm.middleCols(j0, nj);
            if (all_cols) {  // accumulate straight into the output rows c0..c0+nc
                StridedMap(as_floats(data + c0 * J + j0), nc, 2 * nj,
                           Eigen::OuterStride<>(2 * J)).noalias() += gt * yb;
                StridedMap(wsum + c0 * J + j0, nc, nj, Eigen::OuterStride<>(J)).noalias() +=
                    gbt * wb;
                continue;
            }
            sblk.resize((size_t)(nc * 2 * nj));
            wblk.resize((size_t)(nc * nj));
            MutMap(sblk.data(), nc, 2 * nj).noalias() = gt * yb;
            MutMap(wblk.data(), nc, nj).noalias() = gbt * wb;
            for (py::ssize_t c = 0; c < nc; ++c) {  // scatter to the compressed orientations
                float* dr = as_floats(data + sp.cols[c0 + c] * J + j0);
                float* wr = wsum + sp.cols[c0 + c] * J + j0;
                const float* sr = sblk.data() + c * 2 * nj;
                const float* wbr = wblk.data() + c * nj;
#pragma omp simd
                for (py::ssize_t j = 0; j < 2 * nj; ++j) dr[j] += sr[j];
#pragma omp simd
                for (py::ssize_t j = 0; j < nj; ++j) wr[j] += wbr[j];
            }
        }
    }

    // Row phase (eq. 15 sum): with Abar_it = sum_r g(i,t,r) A_r and Q_i = sum_r gbar_ir |A_r|^2,
    // sum_{t,r} g |X(t) - CTF A_r|^2 = gsum_i |X|^2 - 2 CTF Re(X conj(V_i)) + CTF^2 Q_i,
    // V_i = sum_t Abar_it conj(P_t) (the shift moved from the image onto the mean slice).
    // Tiles (image block x pixel block) add into per-pixel-block partial sums, reduced in a
    // fixed order afterwards (results do not depend on the thread count).
    const py::ssize_t ib = std::max<py::ssize_t>(1, kRowBlock / T);
    const py::ssize_t n_ib = (B + ib - 1) / ib;
    std::vector<double> partial((size_t)(n_pb * B * n_shells), 0.0);
    std::vector<double> gsum((size_t)B, 0.0);
    for (py::ssize_t i = 0; i < B; ++i)
        for (py::ssize_t c = 0; c < Ra; ++c) gsum[i] += gbar[i * Ra + c];
#pragma omp parallel
    {
        std::vector<float> abar, q;
        std::vector<double> acc((size_t)kPixBlock);
        std::vector<cfloat> v((size_t)kPixBlock);
#pragma omp for schedule(dynamic)
        for (py::ssize_t tile = 0; tile < n_ib * n_pb; ++tile) {
            const py::ssize_t i0 = (tile / n_pb) * ib, ni = std::min(ib, B - i0);
            const py::ssize_t pb = tile % n_pb;
            const py::ssize_t j0 = pb * kPixBlock, nj = std::min(kPixBlock, J - j0);
            const int64_t a0 = sp.image_row_start[i0], na = sp.image_row_start[i0 + ni] - a0;
            if (na == 0) continue;
            abar.resize((size_t)(na * 2 * nj));
            q.resize((size_t)(ni * nj));
            MutMap(abar.data(), na, 2 * nj).noalias() =
                Gm.middleRows(a0, na) * Am.middleCols(2 * j0, 2 * nj);
            MutMap(q.data(), ni, nj).noalias() =
                Gbar.middleRows(i0, ni) * Asq.middleCols(j0, nj);
            for (py::ssize_t il = 0; il < ni; ++il) {
                const py::ssize_t i = i0 + il;
                const int64_t b0 = sp.image_row_start[i], b1 = sp.image_row_start[i + 1];
                if (b0 == b1) continue;
                std::fill(v.begin(), v.end(), cfloat(0.f, 0.f));
                float* vf = as_floats(v.data());
                for (int64_t a = b0; a < b1; ++a) {
                    const float* ab = abar.data() + (a - a0) * 2 * nj;
                    const float* pf = as_floats(pre.phases.data() + (sp.rows[a] % T) * J + j0);
#pragma omp simd
                    for (py::ssize_t j = 0; j < nj; ++j) {  // v += Abar conj(P_t)
                        const float ar = ab[2 * j], ai = ab[2 * j + 1];
                        const float pr = pf[2 * j], pi = pf[2 * j + 1];
                        vf[2 * j] += ar * pr + ai * pi;
                        vf[2 * j + 1] += ai * pr - ar * pi;
                    }
                }
                const float* x = as_floats(d.images + i * J + j0);
                const float* f = d.ctf + i * J + j0;
                const float* qi = q.data() + il * nj;
                const double gs = gsum[i];
#pragma omp simd
                for (py::ssize_t j = 0; j < nj; ++j) {
                    const double xr = x[2 * j], xi = x[2 * j + 1], fj = f[j];
                    acc[j] = gs * (xr * xr + xi * xi) + fj * fj * qi[j] -
                             2.0 * fj * (xr * vf[2 * j] + xi * vf[2 * j + 1]);
                }
                bin_shells(acc.data(), shell + j0, nj, partial.data() + (pb * B + i) * n_shells);
            }
        }
    }
    for (py::ssize_t pb = 0; pb < n_pb; ++pb)
        for (py::ssize_t k = 0; k < B * n_shells; ++k) res[k] += partial[pb * B * n_shells + k];
}

void sums_sparse(const ModelData& d, const Csr& csr, const Support& sp, const Prepared& pre,
                 const int64_t* shell, py::ssize_t n_shells, cfloat* data, float* wsum,
                 double* res) {
    const py::ssize_t B = d.n_img, T = d.n_shift, R = d.n_rot, J = d.n_pix;
    const std::vector<int64_t>& row_ptr = csr.ptr;
    const std::vector<int64_t>& row_col = csr.col;
    const std::vector<float>& row_g = csr.val;
    // Nonzeros by orientation (CSC), rows ascending within each orientation.
    std::vector<int64_t> col_ptr((size_t)R + 1, 0);
    for (int64_t e = 0; e < sp.nnz; ++e) ++col_ptr[row_col[e] + 1];
    for (py::ssize_t r = 0; r < R; ++r) col_ptr[r + 1] += col_ptr[r];
    std::vector<int64_t> col_row((size_t)sp.nnz), fill(col_ptr.begin(), col_ptr.end() - 1);
    std::vector<float> col_g((size_t)sp.nnz);
    for (int64_t row : sp.rows)
        for (int64_t e = row_ptr[row]; e < row_ptr[row + 1]; ++e) {
            const int64_t k = fill[row_col[e]]++;
            col_row[k] = row;
            col_g[k] = row_g[e];
        }
    const py::ssize_t Ra = (py::ssize_t)sp.cols.size();
#pragma omp parallel
    {
        // eq. 14 sums, one orientation per iteration (no two threads write one slice)
        std::vector<cfloat> dbuf((size_t)J), ybuf((size_t)J);
        std::vector<float> wbuf((size_t)J);
#pragma omp for schedule(dynamic, 4)
        for (py::ssize_t c = 0; c < Ra; ++c) {
            const py::ssize_t r = sp.cols[c];
            std::fill(dbuf.begin(), dbuf.end(), cfloat(0.f, 0.f));
            std::fill(wbuf.begin(), wbuf.end(), 0.f);
            float* df = as_floats(dbuf.data());
            const float* yf = as_floats(ybuf.data());
            for (int64_t k = col_ptr[r]; k < col_ptr[r + 1]; ++k) {
                const py::ssize_t i = col_row[k] / T, t = col_row[k] % T;
                const float gv = col_g[k];
                complex_multiply(pre.u.data() + i * J, pre.phases.data() + t * J, ybuf.data(), J);
                const float* wi = pre.w.data() + i * J;
#pragma omp simd
                for (py::ssize_t j = 0; j < 2 * J; ++j) df[j] += gv * yf[j];
#pragma omp simd
                for (py::ssize_t j = 0; j < J; ++j) wbuf[j] += gv * wi[j];
            }
            float* dr = as_floats(data + r * J);
            float* wr = wsum + r * J;
#pragma omp simd
            for (py::ssize_t j = 0; j < 2 * J; ++j) dr[j] += df[j];
#pragma omp simd
            for (py::ssize_t j = 0; j < J; ++j) wr[j] += wbuf[j];
        }
        // eq. 15 sum, one image per iteration
        std::vector<double> acc((size_t)J);
        std::vector<cfloat> z((size_t)J);
#pragma omp for schedule(dynamic, 1)
        for (py::ssize_t i = 0; i < B; ++i) {
            const int64_t b0 = sp.image_row_start[i], b1 = sp.image_row_start[i + 1];
            if (b0 == b1) continue;
            std::fill(acc.begin(), acc.end(), 0.0);
            const float* f = d.ctf + i * J;
            for (int64_t a = b0; a < b1; ++a) {
                const int64_t row = sp.rows[a];
                complex_multiply(d.images + i * J, pre.phases.data() + (row % T) * J, z.data(),
                                 J);  // X_i(t)
                const float* zf = as_floats(z.data());
                for (int64_t e = row_ptr[row]; e < row_ptr[row + 1]; ++e) {
                    const float* af = as_floats(d.slices + row_col[e] * J);
                    const float gv = row_g[e];
#pragma omp simd
                    for (py::ssize_t j = 0; j < J; ++j) {  // |X(t) - CTF A_r|^2
                        const float dr = zf[2 * j] - f[j] * af[2 * j];
                        const float di = zf[2 * j + 1] - f[j] * af[2 * j + 1];
                        acc[j] += (double)(gv * (dr * dr + di * di));
                    }
                }
            }
            bin_shells(acc.data(), shell, J, res + i * n_shells);
        }
    }
}

}  // namespace

namespace {

// Validated views of the pixel shells and the two accumulators.
struct SumsOutputs {
    const int64_t* shell;
    cfloat* data;
    float* wsum;
};

SumsOutputs check_sums_outputs(const ModelData& d, const py::array& pixel_shell,
                               py::ssize_t n_shells, py::array& data_slices,
                               py::array& weight_slices,
                               std::initializer_list<const py::array*> inputs, int method) {
    const py::ssize_t R = d.n_rot, J = d.n_pix;
    if (n_shells < 1) throw py::value_error("n_shells: expected >= 1");
    require<int64_t>(pixel_shell, "pixel_shell", 1);
    require_dim(pixel_shell, "pixel_shell", 0, J);
    const int64_t* shell = static_cast<const int64_t*>(pixel_shell.data());
    for (py::ssize_t j = 0; j < J; ++j)
        if (shell[j] < 0 || shell[j] >= n_shells)
            throw py::value_error("pixel_shell: expected values in [0, n_shells)");
    require_matrix<cfloat>(data_slices, "data_slices", R, J);
    require_matrix<float>(weight_slices, "weight_slices", R, J);
    if (!data_slices.writeable() || !weight_slices.writeable())
        throw py::value_error("data_slices, weight_slices: expected writeable arrays");
    for (const py::array* in : inputs) {
        if (overlaps(data_slices, *in) || overlaps(weight_slices, *in))
            throw py::value_error("data_slices, weight_slices: must not share memory with inputs");
    }
    if (overlaps(data_slices, weight_slices))
        throw py::value_error("data_slices, weight_slices: must not share memory");
    if (method < 0 || method > 2)
        throw py::value_error("method: expected 0 (auto), 1 (gemm) or 2 (sparse)");
    return {shell, static_cast<cfloat*>(data_slices.mutable_data()),
            static_cast<float*>(weight_slices.mutable_data())};
}

// Both entry points: choose the path by cost and accumulate. g may be nullptr.
void run_sums(const ModelData& d, const float* g, const Csr& csr, const Support& sp,
              const SumsOutputs& out, py::ssize_t n_shells, int method, double* res) {
    const py::ssize_t B = d.n_img, J = d.n_pix;
    Prepared pre;
    pre.phases = shift_phases(d);
    pre.u.resize((size_t)(B * J));
    pre.w.resize((size_t)(B * J));
#pragma omp parallel for schedule(static)
    for (py::ssize_t k = 0; k < B * J; ++k) {
        const float f = d.ctf[k], s2 = d.inv_sigma2[k];
        pre.u[k] = d.images[k] * (f * s2);
        pre.w[k] = f * f * s2;
    }
    SumsMethod m = static_cast<SumsMethod>(method);
    if (m == SumsMethod::Auto) {
        const double cells = (double)sp.rows.size() * (double)sp.cols.size();
        m = (double)sp.nnz * kSparseCost < cells ? SumsMethod::Sparse : SumsMethod::Gemm;
    }
    if (sp.nnz == 0) return;  // all weights zero: nothing to add
    if (m == SumsMethod::Sparse)
        sums_sparse(d, csr, sp, pre, out.shell, n_shells, out.data, out.wsum, res);
    else
        sums_gemm(d, g, csr, sp, pre, out.shell, n_shells, out.data, out.wsum, res);
}

}  // namespace

py::array_t<double> maximization_sums(const py::array& images, const py::array& ctf,
                                      const py::array& inv_sigma2, const py::array& slices,
                                      const py::array& coords, const py::array& shifts, int box,
                                      const py::array& weights, const py::array& pixel_shell,
                                      py::ssize_t n_shells, py::array& data_slices,
                                      py::array& weight_slices, int method) {
    const ModelData d = check_model_data(images, ctf, inv_sigma2, slices, coords, shifts, box);
    const py::ssize_t B = d.n_img, T = d.n_shift, R = d.n_rot;
    require<float>(weights, "weights", 3);
    require_dim(weights, "weights", 0, B);
    require_dim(weights, "weights", 1, T);
    require_dim(weights, "weights", 2, R);
    const float* g = static_cast<const float*>(weights.data());
    const SumsOutputs out = check_sums_outputs(
        d, pixel_shell, n_shells, data_slices, weight_slices,
        {&images, &ctf, &inv_sigma2, &slices, &coords, &shifts, &weights, &pixel_shell}, method);
    py::array_t<double> residual({B, n_shells});
    double* res = residual.mutable_data();
    std::fill(res, res + B * n_shells, 0.0);
    Support sp;
    {
        py::gil_scoped_release release;
        sp = weight_support(g, B, T, R);
    }
    if (!sp.finite) throw py::value_error("weights: contains NaN or Inf");
    {
        py::gil_scoped_release release;
        const Csr csr = csr_from_dense(g, sp, B * T, R);
        run_sums(d, g, csr, sp, out, n_shells, method, res);
    }
    return residual;
}

py::array_t<double> maximization_sums_coo(
    const py::array& images, const py::array& ctf, const py::array& inv_sigma2,
    const py::array& slices, const py::array& coords, const py::array& shifts, int box,
    const py::array& image_index, const py::array& shift_index, const py::array& slice_index,
    const py::array& weights, const py::array& pixel_shell, py::ssize_t n_shells,
    py::array& data_slices, py::array& weight_slices, int method) {
    const ModelData d = check_model_data(images, ctf, inv_sigma2, slices, coords, shifts, box);
    const py::ssize_t B = d.n_img, T = d.n_shift, R = d.n_rot;
    require<int64_t>(image_index, "image_index", 1);
    const py::ssize_t nnz = image_index.shape(0);
    require<int64_t>(shift_index, "shift_index", 1);
    require_dim(shift_index, "shift_index", 0, nnz);
    require<int64_t>(slice_index, "slice_index", 1);
    require_dim(slice_index, "slice_index", 0, nnz);
    require<float>(weights, "weights", 1);
    require_dim(weights, "weights", 0, nnz);
    const int64_t* ii = static_cast<const int64_t*>(image_index.data());
    const int64_t* ti = static_cast<const int64_t*>(shift_index.data());
    const int64_t* ri = static_cast<const int64_t*>(slice_index.data());
    const float* g = static_cast<const float*>(weights.data());
    for (py::ssize_t e = 0; e < nnz; ++e) {
        if (ii[e] < 0 || ii[e] >= B || ti[e] < 0 || ti[e] >= T || ri[e] < 0 || ri[e] >= R)
            throw py::value_error("image_index, shift_index, slice_index: out of range");
        if (!std::isfinite(g[e])) throw py::value_error("weights: contains NaN or Inf");
    }
    const SumsOutputs out = check_sums_outputs(
        d, pixel_shell, n_shells, data_slices, weight_slices,
        {&images, &ctf, &inv_sigma2, &slices, &coords, &shifts, &image_index, &shift_index,
         &slice_index, &weights, &pixel_shell}, method);
    py::array_t<double> residual({B, n_shells});
    double* res = residual.mutable_data();
    std::fill(res, res + B * n_shells, 0.0);
    Support sp;
    Csr csr;
    try {
        csr = csr_from_coo(ii, ti, ri, g, nnz, B, T, R, sp);
    } catch (const std::invalid_argument& e) {
        throw py::value_error(e.what());
    }
    {
        py::gil_scoped_release release;
        run_sums(d, nullptr, csr, sp, out, n_shells, method, res);
    }
    return residual;
}

}  // namespace cryomap
