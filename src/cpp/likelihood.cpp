// E-step kernel: pose scores by two float32 GEMMs per tile, then the per-image posterior
// (docs/method.md eq. (17)) with log-sum-exp in float64 and optional significance pruning.
//
// Memory: the (B, T, R) float32 output holds the scores and is turned into the weights in
// place. Scratch: U = CTF inv_sigma2 X and W (B x J each), the phase table (T x J); per thread
// one tile of shifted images Y (about block_rows x 2J floats, default 512 x 2J), |A|^2 of one
// orientation block (block_cols x J floats) and its norm term, Eigen's packing buffers
// (cache-sized); per thread for the pruning, one image's bin indices (T x R uint16), a 4069-bin
// histogram and the entries of one bin (a few, at most T x R when all weights are equal).
// Everything but the output: O(B J + T J + threads x ((block_rows + block_cols) J + T R)).
#include "likelihood.hpp"

#include <omp.h>

#include "eigen_maps.hpp"
#include <algorithm>
#include <string>

namespace cryomap {

namespace {

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// Log priors may be -inf (pose excluded) but neither NaN nor +inf.
void require_log_prior(const double* p, size_t n, const char* name) {
    for (size_t i = 0; i < n; ++i) {
        if (std::isnan(p[i]) || p[i] == std::numeric_limits<double>::infinity())
            throw py::value_error(std::string(name) + ": contains NaN or +inf (-inf is allowed)");
    }
}

// Scores s(i,t,r) = c_i - diff2(i,t,r) = Re sum_j conj(A_rj) Y_it(j) - 1/2 sum_j W_ij |A_rj|^2,
// written to out (B*T x R, row-major). Tiles of (image block x orientation block); per tile
// the cross term is ONE real GEMM [Y] (rows x 2J) * [A]^T (2J x cols), with complex numbers
// kept interleaved on both sides (a permutation of [Re | Im] that leaves the dot product
// unchanged), so A is read in place and never copied.
void pose_scores(const ModelData& d, const std::vector<cfloat>& phases, const cfloat* u,
                 const float* w, EStepBlocking blk, float* out) {
    const py::ssize_t B = d.n_img, T = d.n_shift, R = d.n_rot, J = d.n_pix;
    // Equal blocks near the target sizes (no small remainder block to unbalance threads).
    auto balanced = [](py::ssize_t n, py::ssize_t target) {
        const py::ssize_t blocks = std::max<py::ssize_t>(1, (n + target - 1) / target);
        return std::max<py::ssize_t>(1, (n + blocks - 1) / blocks);
    };
    const py::ssize_t ib = balanced(B, std::max<py::ssize_t>(1, blk.rows / T));
    const py::ssize_t rb = balanced(R, std::max<py::ssize_t>(1, blk.cols));
    const py::ssize_t n_ib = (B + ib - 1) / ib, n_rb = (R + rb - 1) / rb;
    const float* a = reinterpret_cast<const float*>(d.slices);
#pragma omp parallel
    {
        std::vector<cfloat> y((size_t)(ib * T * J));
        std::vector<float> asq((size_t)(rb * J)), nrm((size_t)(ib * rb));
        py::ssize_t built = -1;  // image block whose shifted images are in y
        // Image-block-major order with contiguous static chunks: a thread rebuilds y only when
        // its next tile starts a new image block.
#pragma omp for schedule(static)
        for (py::ssize_t tile = 0; tile < n_ib * n_rb; ++tile) {
            const py::ssize_t ibk = tile / n_rb, rbk = tile % n_rb;
            const py::ssize_t i0 = ibk * ib, ni = std::min(ib, B - i0);
            const py::ssize_t r0 = rbk * rb, nr = std::min(rb, R - r0);
            if (ibk != built) {
                for (py::ssize_t il = 0; il < ni; ++il)
                    for (py::ssize_t t = 0; t < T; ++t)  // Y_it = CTF X_i(t) / sigma2
                        complex_multiply(u + (i0 + il) * J, phases.data() + t * J,
                                         y.data() + (il * T + t) * J, J);
                built = ibk;
            }
            for (py::ssize_t r = 0; r < nr; ++r) {
                const float* ar = a + (r0 + r) * 2 * J;
                float* q = asq.data() + r * J;
#pragma omp simd
                for (py::ssize_t j = 0; j < J; ++j)
                    q[j] = ar[2 * j] * ar[2 * j] + ar[2 * j + 1] * ar[2 * j + 1];
            }
            // norm term: sum_j W_ij |A_rj|^2 = (W (ni x J)) (|A|^2 (nr x J))^T
            MutMap nm(nrm.data(), ni, nr);
            nm.noalias() = ConstMap(w + i0 * J, ni, J) * ConstMap(asq.data(), nr, J).transpose();
            for (py::ssize_t il = 0; il < ni; ++il)
                for (py::ssize_t t = 0; t < T; ++t) {
                    float* o = out + ((i0 + il) * T + t) * R + r0;
                    const float* n = nrm.data() + il * nr;
#pragma omp simd
                    for (py::ssize_t r = 0; r < nr; ++r) o[r] = -0.5f * n[r];
                }
            // cross term: Re sum_j conj(A_rj) Y_it(j), one real GEMM over 2J interleaved values
            StridedMap o(out + i0 * T * R + r0, ni * T, nr, Eigen::OuterStride<>(R));
            o.noalias() += ConstMap(reinterpret_cast<const float*>(y.data()), ni * T, 2 * J) *
                           ConstMap(a + r0 * 2 * J, nr, 2 * J).transpose();
        }
    }
}

struct ImageStats {
    int64_t best_t = -1, best_r = -1, n_significant = 0;
    double max_prob = 0.0, log_marginal = 0.0, min_diff2 = 0.0;
    bool finite = true;
};

// The per-image outputs of the E-step kernels, written by image index from any thread.
struct ImageOutputs {
    py::array_t<int64_t> best_r, best_t, n_sig;
    py::array_t<double> max_prob, log_marginal, min_diff2;

    explicit ImageOutputs(py::ssize_t B)
        : best_r(B), best_t(B), n_sig(B), max_prob(B), log_marginal(B), min_diff2(B) {
        p_r = best_r.mutable_data(); p_t = best_t.mutable_data(); p_n = n_sig.mutable_data();
        p_max = max_prob.mutable_data(); p_log = log_marginal.mutable_data();
        p_min = min_diff2.mutable_data();
    }
    // image i's statistics, with its best orientation and translation as indices r and t
    void store(py::ssize_t i, const ImageStats& st, int64_t r, int64_t t) {
        p_r[i] = r; p_t[i] = t; p_n[i] = st.n_significant;
        p_max[i] = st.max_prob; p_log[i] = st.log_marginal; p_min[i] = st.min_diff2;
    }
    // The kernel's result dict: the weights and these outputs; a ValueError naming the
    // kernel if any squared difference overflowed float32.
    py::dict result(const std::string& kernel, bool scores_finite, py::array weights) const {
        if (!scores_finite)
            throw py::value_error(kernel + ": non-finite squared differences (float32 overflow); "
                                  "rescale the images, slices or inv_sigma2");
        py::dict out;
        out["weights"] = weights;
        out["best_r"] = best_r; out["best_t"] = best_t; out["max_prob"] = max_prob;
        out["n_significant"] = n_sig; out["log_marginal"] = log_marginal;
        out["min_diff2"] = min_diff2;
        return out;
    }

   private:
    int64_t *p_r, *p_t, *p_n;
    double *p_max, *p_log, *p_min;
};

struct Entry {
    float w;
    int64_t index;
};

// Scratch of image_posterior, one per thread: a histogram of the weights over 1/32-octave bins
// (float bits >> 18 is monotone in w >= 0; 4065 bins cover [0, 1]), 4 spare bins for weights
// that are not candidates, each weight's bin (T x R), and the entries of one bin.
struct PruneScratch {
    static constexpr int kBins = (0x3F800000 >> 18) + 1;
    std::vector<double> mass = std::vector<double>(kBins + 4);
    std::vector<int64_t> count = std::vector<int64_t>(kBins + 4);
    std::vector<uint16_t> bin;
    std::vector<Entry> entries;
    // per-group pruning: each group's mass, its entries' flat indices and values
    std::vector<double> group_mass;
    std::vector<int64_t> group_start, group_index;
    std::vector<float> group_values;
};

// v if keep, else +0 (bit mask; a select on computed values would not vectorise).
inline float keep_or_zero(bool keep, float v) {
    uint32_t bits;
    std::memcpy(&bits, &v, sizeof bits);
    bits &= 0u - (uint32_t)keep;
    std::memcpy(&v, &bits, sizeof v);
    return v;
}

// Pass 1 over one row of scores: max_r (s_r + lpr_r), max_r s_r over allowed r, and NaN iff some
// score is not finite (float overflow in the GEMMs).
inline void row_maxima(const float* s, const double* lpr, py::ssize_t R, double& max_v,
                       double& max_s, float& check) {
    double mv = kNegInf, ms = kNegInf;
    float chk = 0.f;
#pragma omp simd reduction(max : mv, ms) reduction(+ : chk)
    for (py::ssize_t r = 0; r < R; ++r) {
        const double v = (double)s[r] + lpr[r];
        mv = std::max(mv, v);
        ms = std::max(ms, lpr[r] == kNegInf ? kNegInf : (double)s[r]);
        chk += s[r] * 0.f;
    }
    max_v = mv;
    max_s = ms;
    check = chk;
}

// Pass 2 over one row: s_r <- exp(((s_r + lpr_r) + pt) - m) in [0, 1]; returns the row sum and
// counts the nonzero weights.
inline double row_weights(float* s, const double* lpr, double pt, double m, py::ssize_t R,
                          int64_t& nonzero) {
    double total = 0.0;
    int nz = 0;
#pragma omp simd reduction(+ : total, nz)
    for (py::ssize_t r = 0; r < R; ++r) {
        const float wv = exp_nonpositive((float)((((double)s[r] + lpr[r]) + pt) - m));
        s[r] = wv;
        total += wv;
        nz += wv > 0.f;
    }
    nonzero += nz;
    return total;
}

// The smallest set of largest weights of w (n values, all in [0, 1], summing to total) whose
// sum reaches fraction * total; ties broken by lower index. Sets every other weight to 0 and
// returns the kept sum; n_kept receives the set's size and threshold its smallest weight.
double prune(float* w, py::ssize_t n, double total, double fraction, PruneScratch& sc,
             int64_t& n_kept, float& threshold) {
    const double target = fraction * total;
    // A weight below (1 - fraction) total / n is never needed: all such weights together hold
    // less than the (1 - fraction) total that may be dropped.
    const float lower = (float)((1.0 - fraction) * total / (double)n * (1.0 - 1e-6));
    sc.bin.resize((size_t)n);
    uint16_t* bin = sc.bin.data();
#pragma omp simd
    for (py::ssize_t k = 0; k < n; ++k) {
        uint32_t bits;
        std::memcpy(&bits, &w[k], sizeof bits);
        const uint32_t spare = PruneScratch::kBins + (uint32_t)(k & 3);
        bin[k] = (uint16_t)((w[k] >= lower) & (w[k] > 0.f) ? bits >> 18 : spare);
    }
    std::fill(sc.mass.begin(), sc.mass.end(), 0.0);
    std::fill(sc.count.begin(), sc.count.end(), 0);
    for (py::ssize_t k = 0; k < n; ++k) {
        sc.mass[bin[k]] += w[k];
        sc.count[bin[k]] += 1;
    }
    double cum = 0.0;
    int64_t above = 0;
    int boundary = -1;
    for (int b = PruneScratch::kBins - 1; b >= 0; --b) {
        if (sc.count[b] > 0 && cum + sc.mass[b] >= target) {
            boundary = b;
            break;
        }
        cum += sc.mass[b];
        above += sc.count[b];
    }
    if (boundary < 0) {  // rounding left the target unreached: keep every weight
        n_kept = above;
        threshold = 0.f;
        return total;
    }
    sc.entries.clear();
    for (py::ssize_t k = 0; k < n; ++k)
        if (bin[k] == boundary) sc.entries.push_back({w[k], (int64_t)k});
    std::sort(sc.entries.begin(), sc.entries.end(), [](const Entry& x, const Entry& y) {
        return x.w > y.w || (x.w == y.w && x.index < y.index);
    });
    size_t k = 0;
    while (k < sc.entries.size()) {
        cum += sc.entries[k++].w;
        if (cum >= target) break;
    }
    threshold = sc.entries[k - 1].w;
    for (size_t e = k; e < sc.entries.size() && sc.entries[e].w == threshold; ++e)
        w[sc.entries[e].index] = 0.f;  // ties with the threshold beyond the kept count
#pragma omp simd
    for (py::ssize_t q = 0; q < n; ++q) w[q] = keep_or_zero(w[q] >= threshold, w[q]);
    n_kept = above + (int64_t)k;
    return cum;
}

// prune() within each group of columns (classes): a group whose mass is below
// min_mass * total is dropped (except the best pose's), each other group keeps the smallest
// set of its largest weights holding `fraction` of its own mass. Returns the kept sum.
double prune_by_group(float* s, py::ssize_t T, py::ssize_t R, const int32_t* group,
                      int n_groups, double total, double fraction, double min_mass,
                      int best_group, PruneScratch& sc, int64_t& n_kept) {
    sc.group_mass.assign((size_t)n_groups, 0.0);
    sc.group_start.assign((size_t)n_groups + 1, 0);
    for (py::ssize_t t = 0; t < T; ++t)
        for (py::ssize_t r = 0; r < R; ++r) {
            sc.group_mass[group[r]] += s[t * R + r];
            ++sc.group_start[group[r] + 1];
        }
    for (int g = 0; g < n_groups; ++g) sc.group_start[g + 1] += sc.group_start[g];
    sc.group_index.resize((size_t)(T * R));
    std::vector<int64_t> fill(sc.group_start.begin(), sc.group_start.end() - 1);
    for (py::ssize_t t = 0; t < T; ++t)
        for (py::ssize_t r = 0; r < R; ++r) sc.group_index[fill[group[r]]++] = t * R + r;
    double kept = 0.0;
    n_kept = 0;
    for (int g = 0; g < n_groups; ++g) {
        const int64_t a = sc.group_start[g], b = sc.group_start[g + 1];
        if (a == b) continue;
        if (g != best_group && sc.group_mass[g] < min_mass * total) {
            for (int64_t k = a; k < b; ++k) s[sc.group_index[k]] = 0.f;
            continue;
        }
        sc.group_values.resize((size_t)(b - a));
        for (int64_t k = a; k < b; ++k) sc.group_values[k - a] = s[sc.group_index[k]];
        int64_t nk = 0;
        float threshold;
        kept += prune(sc.group_values.data(), b - a, sc.group_mass[g], fraction, sc, nk,
                      threshold);
        for (int64_t k = a; k < b; ++k) s[sc.group_index[k]] = sc.group_values[k - a];
        n_kept += nk;
    }
    return kept;
}

// Turn one image's scores s (T x R, row-major) into its posterior in place (docs/method.md eq. (17)):
// g(t,r) = exp(s + log_prior_rot[r] + log_prior_shift[t] - max) / sum, the max subtracted in
// float64 so that the best pose has weight exactly 1 before normalising (sum >= 1). With
// fraction < 1, only the smallest set of largest weights holding >= fraction of the total is
// kept (ties broken by lower flat index t*R+r) and renormalised.
ImageStats image_posterior(float* s, py::ssize_t T, py::ssize_t R, const double* lpr,
                           const double* lps, double c_i, double log_norm, double fraction,
                           PruneScratch& scratch, const int32_t* group = nullptr,
                           int n_groups = 0, double min_group_mass = 0.0) {
    ImageStats st;
    double m = kNegInf, s_max = kNegInf;
    float check = 0.f;
    for (py::ssize_t t = 0; t < T; ++t) {
        double mv, ms;
        float chk;
        row_maxima(s + t * R, lpr, R, mv, ms, chk);
        check += chk;
        if (lps[t] == kNegInf) continue;
        if (mv + lps[t] > m) {
            m = mv + lps[t];
            st.best_t = t;
        }
        s_max = std::max(s_max, ms);
    }
    if (!std::isfinite(m) || std::isnan(check)) {
        st.finite = false;
        return st;
    }
    const float* best_row = s + st.best_t * R;
    for (py::ssize_t r = 0; r < R; ++r)
        if (((double)best_row[r] + lpr[r]) + lps[st.best_t] == m) {
            st.best_r = r;
            break;
        }
    double total = 0.0;  // >= 1: the best pose contributes exp(0) = 1
    for (py::ssize_t t = 0; t < T; ++t) {
        if (lps[t] == kNegInf)
            std::fill(s + t * R, s + (t + 1) * R, 0.f);
        else
            total += row_weights(s + t * R, lpr, lps[t], m, R, st.n_significant);
    }
    double kept = total;
    if (fraction < 1.0 && group != nullptr && n_groups > 1) {
        kept = prune_by_group(s, T, R, group, n_groups, total, fraction, min_group_mass,
                              group[st.best_r], scratch, st.n_significant);
    } else if (fraction < 1.0) {
        float threshold;
        kept = prune(s, T * R, total, fraction, scratch, st.n_significant, threshold);
    }
    const float inv = (float)(1.0 / kept);
    const py::ssize_t N = T * R;
#pragma omp simd
    for (py::ssize_t k = 0; k < N; ++k) s[k] *= inv;
    st.max_prob = 1.0 / kept;  // the best pose's weight is exp(0) = 1 before normalising
    st.log_marginal = m - c_i + std::log(total) + log_norm;
    st.min_diff2 = c_i - s_max;
    return st;
}

// Per-image terms of the scores: U = CTF X / sigma2, W = CTF^2 / sigma2 (B x J each),
// c_i = 1/2 sum_j |X_ij|^2 / sigma2_ij and the complex-Gaussian normalisation
// sum_j log(inv_sigma2_ij / (2 pi)) over the pixels that are not left out; and the phase
// factors of every translation (T x J, shift_phases).
struct ImageTerms {
    std::vector<cfloat> phases;
    std::vector<cfloat> u;
    std::vector<float> w;
    std::vector<double> c, log_norm;
};

ImageTerms image_terms(const ModelData& d) {
    const py::ssize_t B = d.n_img, J = d.n_pix;
    ImageTerms t;
    t.phases = shift_phases(d);
    t.u.resize((size_t)(B * J));
    t.w.resize((size_t)(B * J));
    t.c.resize((size_t)B);
    t.log_norm.resize((size_t)B);
#pragma omp parallel for schedule(static)
    for (py::ssize_t i = 0; i < B; ++i) {
        double ci = 0.0, ln = 0.0;
        for (py::ssize_t j = i * J; j < (i + 1) * J; ++j) {
            const float f = d.ctf[j], s2 = d.inv_sigma2[j];
            t.u[j] = d.images[j] * (f * s2);
            t.w[j] = f * f * s2;
            ci += 0.5 * std::norm(std::complex<double>(d.images[j])) * s2;
            if (s2 > 0.f) ln += std::log((double)s2 / (2.0 * M_PI));  // complex Gaussian
        }
        t.c[i] = ci;
        t.log_norm[i] = ln;
    }
    return t;
}

// Optional column groups (classes) for per-group pruning: an int64 array of one group per
// slice (or empty: none). Returns int32 groups and their count.
std::vector<int32_t> parse_groups(const py::array& slice_group, py::ssize_t n_rot,
                                  int& n_groups) {
    n_groups = 0;
    if (slice_group.size() == 0) return {};
    require<int64_t>(slice_group, "slice_group", 1);
    require_dim(slice_group, "slice_group", 0, n_rot);
    const int64_t* g = static_cast<const int64_t*>(slice_group.data());
    std::vector<int32_t> out((size_t)n_rot);
    for (py::ssize_t r = 0; r < n_rot; ++r) {
        if (g[r] < 0 || g[r] >= (1 << 20))
            throw py::value_error("slice_group: expected values in [0, 2^20)");
        out[r] = (int32_t)g[r];
        n_groups = std::max(n_groups, (int)g[r] + 1);
    }
    return out;
}

}  // namespace

ModelData check_model_data(const py::array& images, const py::array& ctf,
                           const py::array& inv_sigma2, const py::array& slices,
                           const py::array& coords, const py::array& shifts, int box) {
    require<cfloat>(images, "images", 2);
    const py::ssize_t B = images.shape(0), J = images.shape(1);
    require_matrix<float>(ctf, "ctf", B, J);
    require_matrix<float>(inv_sigma2, "inv_sigma2", B, J);
    require_matrix<cfloat>(slices, "slices", -1, J);
    require_matrix<float>(coords, "coords", J, 2);
    require_matrix<double>(shifts, "shifts", -1, 2);
    if (box <= 0) throw py::value_error("box: expected a positive image size");
    if (slices.shape(0) < 1) throw py::value_error("slices: expected at least one orientation");
    if (shifts.shape(0) < 1) throw py::value_error("shifts: expected at least one translation");
    ModelData d;
    d.n_img = B;
    d.n_pix = J;
    d.n_rot = slices.shape(0);
    d.n_shift = shifts.shape(0);
    d.images = static_cast<const cfloat*>(images.data());
    d.ctf = static_cast<const float*>(ctf.data());
    d.inv_sigma2 = static_cast<const float*>(inv_sigma2.data());
    d.slices = static_cast<const cfloat*>(slices.data());
    d.coords = static_cast<const float*>(coords.data());
    d.shifts = static_cast<const double*>(shifts.data());
    d.box = box;
    require_all_finite(reinterpret_cast<const float*>(d.images), 2 * (size_t)(B * J), "images");
    require_all_finite(d.ctf, (size_t)(B * J), "ctf");
    require_all_finite(d.inv_sigma2, (size_t)(B * J), "inv_sigma2");
    for (py::ssize_t k = 0; k < B * J; ++k)
        if (d.inv_sigma2[k] < 0.f) throw py::value_error("inv_sigma2: expected values >= 0");
    require_all_finite(reinterpret_cast<const float*>(d.slices), 2 * (size_t)(d.n_rot * J),
                       "slices");
    require_finite(d.coords, 2 * (size_t)J, "coords");
    require_finite(d.shifts, 2 * (size_t)d.n_shift, "shifts");
    return d;
}

std::vector<cfloat> shift_phases(const ModelData& d) {
    std::vector<cfloat> p((size_t)(d.n_shift * d.n_pix));
    for (py::ssize_t t = 0; t < d.n_shift; ++t) {
        const double tx = d.shifts[2 * t], ty = d.shifts[2 * t + 1];
        for (py::ssize_t j = 0; j < d.n_pix; ++j) {
            const double ph =
                -2.0 * M_PI * (d.coords[2 * j] * tx + d.coords[2 * j + 1] * ty) / d.box;
            p[t * d.n_pix + j] = cfloat((float)std::cos(ph), (float)std::sin(ph));
        }
    }
    return p;
}

py::dict expectation(const py::array& images, const py::array& ctf, const py::array& inv_sigma2,
                     const py::array& slices, const py::array& coords, const py::array& shifts,
                     int box, const py::array& log_prior_rot, const py::array& log_prior_shift,
                     double significant_fraction, py::ssize_t block_rows,
                     py::ssize_t block_cols, const py::array& slice_group,
                     double min_group_mass) {
    const ModelData d = check_model_data(images, ctf, inv_sigma2, slices, coords, shifts, box);
    const py::ssize_t B = d.n_img, T = d.n_shift, R = d.n_rot, J = d.n_pix;
    require<double>(log_prior_rot, "log_prior_rot", 1);
    require_dim(log_prior_rot, "log_prior_rot", 0, R);
    require_matrix<double>(log_prior_shift, "log_prior_shift", B, T);
    const double* lpr = static_cast<const double*>(log_prior_rot.data());
    const double* lps = static_cast<const double*>(log_prior_shift.data());
    require_log_prior(lpr, (size_t)R, "log_prior_rot");
    require_log_prior(lps, (size_t)(B * T), "log_prior_shift");
    if (*std::max_element(lpr, lpr + R) == kNegInf)
        throw py::value_error("log_prior_rot: every orientation is excluded (-inf)");
    for (py::ssize_t i = 0; i < B; ++i) {
        if (*std::max_element(lps + i * T, lps + (i + 1) * T) == kNegInf)
            throw py::value_error("log_prior_shift: image " + std::to_string(i) +
                                  " has every translation excluded (-inf)");
    }
    if (!(significant_fraction > 0.0 && significant_fraction <= 1.0))
        throw py::value_error("significant_fraction: expected a value in (0, 1]");
    if (block_rows < 0 || block_cols < 0)
        throw py::value_error("block sizes: expected >= 0 (0 = automatic)");
    int n_groups = 0;
    const std::vector<int32_t> groups = parse_groups(slice_group, R, n_groups);
    if (!(min_group_mass >= 0.0 && min_group_mass <= 1.0))
        throw py::value_error("min_group_mass: expected a fraction in [0, 1]");
    const EStepBlocking blk{block_rows > 0 ? block_rows : 512, block_cols > 0 ? block_cols : 512};

    py::array_t<float> weights({B, T, R});
    ImageOutputs outputs(B);
    float* w = weights.mutable_data();
    bool scores_finite = true;
    {
        py::gil_scoped_release release;
        const ImageTerms it = image_terms(d);
        pose_scores(d, it.phases, it.u.data(), it.w.data(), blk, w);
#pragma omp parallel
        {
            PruneScratch scratch;
#pragma omp for schedule(dynamic)
            for (py::ssize_t i = 0; i < B; ++i) {
                const ImageStats st = image_posterior(
                    w + i * T * R, T, R, lpr, lps + i * T, it.c[i], it.log_norm[i],
                    significant_fraction, scratch, groups.empty() ? nullptr : groups.data(),
                    n_groups, min_group_mass);
                if (!st.finite) {
#pragma omp atomic write
                    scores_finite = false;
                }
                outputs.store(i, st, st.best_r, st.best_t);
            }
        }
    }
    return outputs.result("expectation", scores_finite, weights);
}

}  // namespace cryomap

namespace cryomap {

namespace {

// A CSR list per image (ptr (B+1), index (n) into a table of `table_size`, log prior (n)):
// validated and viewed.
struct ImageLists {
    const int64_t* ptr = nullptr;
    const int64_t* index = nullptr;
    const double* log_prior = nullptr;
};

ImageLists check_image_lists(const py::array& ptr, const py::array& index,
                             const py::array& log_prior, py::ssize_t n_img,
                             py::ssize_t table_size, const std::string& name) {
    require<int64_t>(ptr, (name + "_ptr").c_str(), 1);
    require_dim(ptr, (name + "_ptr").c_str(), 0, n_img + 1);
    require<int64_t>(index, (name + "_index").c_str(), 1);
    require<double>(log_prior, (name + "_log_prior").c_str(), 1);
    require_dim(log_prior, (name + "_log_prior").c_str(), 0, index.shape(0));
    ImageLists l{static_cast<const int64_t*>(ptr.data()),
                 static_cast<const int64_t*>(index.data()),
                 static_cast<const double*>(log_prior.data())};
    require_log_prior(l.log_prior, (size_t)index.shape(0), (name + "_log_prior").c_str());
    if (l.ptr[0] != 0 || l.ptr[n_img] != index.shape(0))
        throw py::value_error(name + "_ptr: expected 0 first and len(" + name + "_index) last");
    for (py::ssize_t i = 0; i < n_img; ++i) {
        if (l.ptr[i + 1] <= l.ptr[i])
            throw py::value_error(name + "_ptr: image " + std::to_string(i) +
                                  " has no candidates (expected increasing offsets)");
        double best = kNegInf;
        for (int64_t k = l.ptr[i]; k < l.ptr[i + 1]; ++k) {
            if (l.index[k] < 0 || l.index[k] >= table_size)
                throw py::value_error(name + "_index: values must lie in [0, " +
                                      std::to_string(table_size) + ")");
            best = std::max(best, l.log_prior[k]);
        }
        if (best == kNegInf)
            throw py::value_error(name + "_log_prior: image " + std::to_string(i) +
                                  " has every candidate excluded (-inf)");
    }
    return l;
}

}  // namespace

py::dict expectation_subsets(const py::array& images, const py::array& ctf,
                             const py::array& inv_sigma2, const py::array& slices,
                             const py::array& coords, const py::array& shifts, int box,
                             const py::array& rot_ptr, const py::array& rot_index,
                             const py::array& rot_log_prior, const py::array& shift_ptr,
                             const py::array& shift_index, const py::array& shift_log_prior,
                             double significant_fraction, const py::array& slice_group,
                             double min_group_mass) {
    const ModelData d = check_model_data(images, ctf, inv_sigma2, slices, coords, shifts, box);
    int n_groups = 0;
    const std::vector<int32_t> groups = parse_groups(slice_group, d.n_rot, n_groups);
    if (!(min_group_mass >= 0.0 && min_group_mass <= 1.0))
        throw py::value_error("min_group_mass: expected a fraction in [0, 1]");
    const py::ssize_t B = d.n_img, J = d.n_pix;
    const ImageLists rl = check_image_lists(rot_ptr, rot_index, rot_log_prior, B, d.n_rot, "rot");
    const ImageLists sl =
        check_image_lists(shift_ptr, shift_index, shift_log_prior, B, d.n_shift, "shift");
    if (!(significant_fraction > 0.0 && significant_fraction <= 1.0))
        throw py::value_error("significant_fraction: expected a value in (0, 1]");

    // Block i holds the scores/weights of image i as a (T_i x R_i) row-major array.
    py::array_t<int64_t> block_ptr(B + 1);
    int64_t* bp = block_ptr.mutable_data();
    bp[0] = 0;
    py::ssize_t max_r = 0, max_t = 0;
    for (py::ssize_t i = 0; i < B; ++i) {
        const int64_t ri = rl.ptr[i + 1] - rl.ptr[i], ti = sl.ptr[i + 1] - sl.ptr[i];
        bp[i + 1] = bp[i] + ri * ti;
        max_r = std::max<py::ssize_t>(max_r, ri);
        max_t = std::max<py::ssize_t>(max_t, ti);
    }
    py::array_t<float> weights(bp[B]);
    ImageOutputs outputs(B);
    float* w = weights.mutable_data();
    bool scores_finite = true;
    {
        py::gil_scoped_release release;
        const ImageTerms it = image_terms(d);
        const float* a = reinterpret_cast<const float*>(d.slices);
#pragma omp parallel
        {
            PruneScratch scratch;
            std::vector<float> asub, asq, nrm;
            std::vector<int32_t> grp;
            std::vector<cfloat> y((size_t)(max_t * J));
#pragma omp for schedule(dynamic)
            for (py::ssize_t i = 0; i < B; ++i) {
                const int64_t r0 = rl.ptr[i], R = rl.ptr[i + 1] - r0;
                const int64_t t0 = sl.ptr[i], T = sl.ptr[i + 1] - t0;
                // The image's slices: read in place when they are consecutive rows
                bool contiguous = true;
                for (int64_t k = 1; k < R && contiguous; ++k)
                    contiguous = rl.index[r0 + k] == rl.index[r0] + k;
                const float* A = a + rl.index[r0] * 2 * J;
                if (!contiguous) {
                    asub.resize((size_t)(R * 2 * J));
                    for (int64_t k = 0; k < R; ++k)
                        std::memcpy(asub.data() + k * 2 * J, a + rl.index[r0 + k] * 2 * J,
                                    sizeof(float) * 2 * J);
                    A = asub.data();
                }
                asq.resize((size_t)(R * J));
                for (int64_t k = 0; k < R; ++k) {
                    const float* ar = A + k * 2 * J;
                    float* q = asq.data() + k * J;
#pragma omp simd
                    for (py::ssize_t j = 0; j < J; ++j)
                        q[j] = ar[2 * j] * ar[2 * j] + ar[2 * j + 1] * ar[2 * j + 1];
                }
                // norm term n_r = sum_j W_ij |A_rj|^2
                nrm.resize((size_t)R);
                Eigen::Map<Eigen::VectorXf>(nrm.data(), R).noalias() =
                    ConstMap(asq.data(), R, J) *
                    Eigen::Map<const Eigen::VectorXf>(it.w.data() + i * J, J);
                for (int64_t t = 0; t < T; ++t)  // Y_it = CTF X_i(t) / sigma2
                    complex_multiply(it.u.data() + i * J,
                                     it.phases.data() + sl.index[t0 + t] * J, y.data() + t * J, J);
                float* s = w + bp[i];
                for (int64_t t = 0; t < T; ++t) {
#pragma omp simd
                    for (int64_t r = 0; r < R; ++r) s[t * R + r] = -0.5f * nrm[r];
                }
                // cross term: one GEMM (T x 2J) (2J x R) over interleaved complex values
                MutMap(s, T, R).noalias() +=
                    ConstMap(reinterpret_cast<const float*>(y.data()), T, 2 * J) *
                    ConstMap(A, R, 2 * J).transpose();
                if (n_groups > 1) {
                    grp.resize((size_t)R);
                    for (int64_t k = 0; k < R; ++k) grp[k] = groups[rl.index[r0 + k]];
                }
                const ImageStats st = image_posterior(
                    s, T, R, rl.log_prior + r0, sl.log_prior + t0, it.c[i], it.log_norm[i],
                    significant_fraction, scratch, n_groups > 1 ? grp.data() : nullptr,
                    n_groups, min_group_mass);
                if (!st.finite) {
#pragma omp atomic write
                    scores_finite = false;
                    continue;
                }
                outputs.store(i, st, rl.index[r0 + st.best_r], sl.index[t0 + st.best_t]);
            }
        }
    }
    py::dict out = outputs.result("expectation_subsets", scores_finite, weights);
    out["block_ptr"] = block_ptr;
    return out;
}

}  // namespace cryomap
