"""The E-step over per-image pose subsets (core.expectation_subsets) and the M-step sums from
sparse weights (core.maximization_sums_coo) against the NumPy references."""

from __future__ import annotations

import numpy as np
import pytest

from cryomap._kernels import core, set_threads
from cryomap.em.estep import KernelInputs, expectation, expectation_subsets
from cryomap.em.sums import SliceSums, maximization_sums, maximization_sums_sparse
from reference_kernels import (
    diff2_ref,
    make_problem,
    maximization_sums_ref,
    prune_ref,
)


def _inputs(p) -> KernelInputs:
    """The problem's kernel inputs, with its pixel coordinates."""
    return KernelInputs(p.images, p.ctf, p.inv_sigma2, p.slices, p.shifts, p.box, p.coords)


def random_subsets(rng, n_img, n_shift, n_rot):
    """CSR lists: each image a random subset of the orientations and of the translations (in
    random order), with random priors and one excluded candidate here and there."""
    rot_lists, shift_lists = [], []
    for _ in range(n_img):
        rot_lists.append(rng.permutation(n_rot)[: rng.integers(1, n_rot + 1)])
        shift_lists.append(rng.permutation(n_shift)[: rng.integers(1, n_shift + 1)])
    rot_ptr = np.r_[0, np.cumsum([r.size for r in rot_lists])].astype(np.int64)
    shift_ptr = np.r_[0, np.cumsum([t.size for t in shift_lists])].astype(np.int64)
    rot_index = np.concatenate(rot_lists).astype(np.int64)
    shift_index = np.concatenate(shift_lists).astype(np.int64)
    rot_prior = rng.normal(0, 1, rot_index.size)
    shift_prior = rng.normal(0, 1, shift_index.size)
    # exclude one candidate of images with more than one
    for i in range(n_img):
        if rot_ptr[i + 1] - rot_ptr[i] > 1 and rng.random() < 0.5:
            rot_prior[rot_ptr[i]] = -np.inf
    return rot_ptr, rot_index, rot_prior, shift_ptr, shift_index, shift_prior


def subsets_ref(p, rot_ptr, rot_index, rot_prior, shift_ptr, shift_index, shift_prior,
                fraction):
    """Per image: the posterior over its (translation, orientation) block, pruned and
    normalised as the dense reference does."""
    d2 = diff2_ref(*p.args())
    out = []
    for i in range(p.images.shape[0]):
        r = rot_index[rot_ptr[i]:rot_ptr[i + 1]]
        t = shift_index[shift_ptr[i]:shift_ptr[i + 1]]
        lp = (rot_prior[rot_ptr[i]:rot_ptr[i + 1]][None, :]
              + shift_prior[shift_ptr[i]:shift_ptr[i + 1]][:, None])
        logw = -d2[i][np.ix_(t, r)] + lp
        m = logw.max()
        w = np.exp(logw - m)
        w[logw - m < -87.0] = 0.0
        s2 = p.inv_sigma2[i].astype(np.float64)
        log_marg = m + np.log(w.sum()) + np.sum(np.log(s2[s2 > 0] / (2 * np.pi)))
        if fraction < 1.0:
            w, n_sig = prune_ref(w, fraction)
        else:
            n_sig = int(np.count_nonzero(w))
        w = w / w.sum()
        bt, br = np.unravel_index(np.argmax(logw), logw.shape)
        out.append(dict(weights=w, best_r=r[br], best_t=t[bt], n_significant=n_sig,
                        max_prob=w.max(), log_marginal=log_marg))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("fraction", [1.0, 0.999, 0.9])
def test_expectation_subsets_matches_reference(seed, fraction):
    rng = np.random.default_rng(seed)
    p = make_problem(rng, 6, 5, 17, 61, 16)
    lists = random_subsets(rng, 6, 5, 17)
    got = expectation_subsets(_inputs(p), *lists,
                              fraction)
    want = subsets_ref(p, *lists, fraction)
    shift_ptr = lists[3]
    for i, ref in enumerate(want):
        block = got.block(i, int(shift_ptr[i + 1] - shift_ptr[i]))
        # float32 GEMMs against float64 sums (the dense kernel's tolerances): weights and
        # max_prob measured 5.0e-6 (20x margin), log_marginal 2.1e-5 (10x)
        np.testing.assert_allclose(block, ref["weights"], atol=1e-4)
        assert got.best_r[i] == ref["best_r"] and got.best_t[i] == ref["best_t"]
        # the count may differ by one where the cumulative sum meets the target in rounding
        # (measured 0)
        assert abs(got.n_significant[i] - ref["n_significant"]) <= (0 if fraction == 1 else 1)
        assert got.max_prob[i] == pytest.approx(ref["max_prob"], abs=1e-4)
        assert got.log_marginal[i] == pytest.approx(ref["log_marginal"], rel=1e-6, abs=2e-4)


def test_all_candidates_equal_the_dense_kernel():
    """Every image with every pose (in a shuffled order): the dense kernel's posterior."""
    rng = np.random.default_rng(4)
    p = make_problem(rng, 5, 4, 30, 50, 16)
    lpr, lps = rng.normal(size=30), rng.normal(size=(5, 4))
    dense = expectation(_inputs(p), lpr, lps,
                        0.999)
    rot_index = np.concatenate([rng.permutation(30) for _ in range(5)])
    rot_ptr = np.arange(6) * 30
    shift_index = np.tile(np.arange(4), 5)
    got = expectation_subsets(_inputs(p),
                              rot_ptr, rot_index, lpr[rot_index], np.arange(6) * 4, shift_index,
                              lps.ravel(), 0.999)
    for i in range(5):
        r = rot_index[rot_ptr[i]:rot_ptr[i + 1]]
        # the same products summed in another order: float32 rounding apart (measured 2.1e-5;
        # margin 4.9x)
        np.testing.assert_allclose(got.block(i, 4), dense.weights[i][:, r], atol=1e-4)
    np.testing.assert_array_equal(got.best_r, dense.best_r)
    np.testing.assert_array_equal(got.best_t, dense.best_t)
    np.testing.assert_array_equal(got.n_significant, dense.n_significant)
    # measured 6.4e-5 (4.3e-7 relative, values ~150); 18x margin
    np.testing.assert_allclose(got.log_marginal, dense.log_marginal, rtol=1e-6, atol=1e-3)


def test_subsets_thread_count_independence():
    rng = np.random.default_rng(5)
    p = make_problem(rng, 9, 5, 40, 93, 16)
    lists = random_subsets(rng, 9, 5, 40)
    outs = []
    for threads in (1, 2):
        set_threads(threads)
        outs.append(expectation_subsets(_inputs(p), *lists, 0.999))
    set_threads(None)
    np.testing.assert_array_equal(outs[0].weights, outs[1].weights)
    np.testing.assert_array_equal(outs[0].log_marginal, outs[1].log_marginal)


@pytest.mark.parametrize("case,match", [
    ("empty", "has no candidates"),
    ("range", "values must lie in"),
    ("nan", "NaN"),
    ("excluded", "every candidate excluded"),
    ("ptr", "expected 0 first"),
])
def test_subsets_invalid_input_raises(case, match):
    rng = np.random.default_rng(6)
    p = make_problem(rng, 2, 2, 4, 20, 16)
    rot_ptr, rot_index, rot_prior = np.array([0, 2, 4]), np.array([0, 1, 2, 3]), np.zeros(4)
    shift_ptr, shift_index, shift_prior = np.array([0, 1, 2]), np.array([0, 1]), np.zeros(2)
    if case == "empty":
        rot_ptr = np.array([0, 0, 4])
    elif case == "range":
        rot_index = np.array([0, 1, 2, 4])
    elif case == "nan":
        rot_prior = np.array([0.0, np.nan, 0.0, 0.0])
    elif case == "excluded":
        shift_prior = np.array([-np.inf, 0.0])
    else:
        rot_ptr = np.array([0, 2, 3])
    with pytest.raises(ValueError, match=match):
        expectation_subsets(_inputs(p), rot_ptr,
                            rot_index, rot_prior, shift_ptr, shift_index, shift_prior)


def _sparse_weights(rng, n_img, n_shift, n_rot, density):
    w = rng.random((n_img, n_shift, n_rot)) * (rng.random((n_img, n_shift, n_rot)) < density)
    w[:, 0, 0] += 0.1  # every image has weight somewhere
    return (w / w.sum(axis=(1, 2), keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("method", ["auto", "gemm", "sparse"])
@pytest.mark.parametrize("density", [0.05, 0.6])
def test_sparse_sums_match_reference(method, density):
    rng = np.random.default_rng(7)
    p = make_problem(rng, 5, 4, 13, 41, 16)
    w = _sparse_weights(rng, 5, 4, 13, density)
    b, t, r = np.nonzero(w)
    order = rng.permutation(b.size)  # any order of the list
    b, t, r = b[order], t[order], r[order]
    data = np.zeros(p.slices.shape, np.complex64)
    wsum = np.zeros(p.slices.shape, np.float32)
    res = maximization_sums_sparse(_inputs(p), b,
                                   t, r, w[b, t, r], SliceSums(data, wsum, p.shell, 9),
                                   method=method)
    d_ref, w_ref, r_ref = maximization_sums_ref(*p.args(), w, p.shell, 9)
    # float32 sums against the float64 reference: measured 1.7e-7 and 1.1e-7 of the maxima,
    # 3.2e-7 relative for the shell sums (4.8e-7 absolute); margins 18x, 18x, 15x
    np.testing.assert_allclose(data, d_ref, atol=3e-6 * np.abs(d_ref).max())
    np.testing.assert_allclose(wsum, w_ref, atol=2e-6 * np.abs(w_ref).max())
    np.testing.assert_allclose(res, r_ref, rtol=5e-6, atol=1e-6 * np.abs(r_ref).max())
    # the dense kernel on the same weights gives the same sums (measured 0; the bounds allow
    # float32 sums in another order)
    d2 = np.zeros(p.slices.shape, np.complex64)
    w2 = np.zeros(p.slices.shape, np.float32)
    res2 = maximization_sums(_inputs(p), w,
                             SliceSums(d2, w2, p.shell, 9), method=method)
    np.testing.assert_allclose(data, d2, atol=1e-5 * np.abs(d_ref).max())
    np.testing.assert_allclose(res, res2, rtol=1e-5)


def test_sparse_sums_reject_repeats_and_bad_indices():
    rng = np.random.default_rng(8)
    p = make_problem(rng, 2, 2, 3, 20, 16)
    data = np.zeros(p.slices.shape, np.complex64)
    wsum = np.zeros(p.slices.shape, np.float32)
    one = np.array([0, 0])
    with pytest.raises(ValueError, match="listed twice"):
        maximization_sums_sparse(_inputs(p), one,
                                 one, one, np.array([0.5, 0.5]), SliceSums(data, wsum, p.shell, 9))
    with pytest.raises(ValueError, match="out of range"):
        maximization_sums_sparse(_inputs(p),
                                 np.array([0]), np.array([2]), np.array([0]), np.array([1.0]),
                                 SliceSums(data, wsum, p.shell, 9))
    with pytest.raises(ValueError, match="NaN"):
        maximization_sums_sparse(_inputs(p),
                                 np.array([0]), np.array([0]), np.array([0]),
                                 np.array([np.nan]), SliceSums(data, wsum, p.shell, 9))
    assert not data.any() and not wsum.any()


def test_sparse_sums_accumulate_in_place():
    rng = np.random.default_rng(9)
    p = make_problem(rng, 3, 2, 5, 30, 16)
    w = _sparse_weights(rng, 3, 2, 5, 0.5)
    b, t, r = np.nonzero(w)
    data = np.ones(p.slices.shape, np.complex64)
    wsum = np.ones(p.slices.shape, np.float32)
    core.maximization_sums_coo(p.images, p.ctf, p.inv_sigma2, p.slices, p.coords, p.shifts,
                               p.box, b.astype(np.int64), t.astype(np.int64),
                               r.astype(np.int64), w[b, t, r], p.shell, 9, data, wsum, 0)
    d_ref, w_ref, _ = maximization_sums_ref(*p.args(), w, p.shell, 9)
    # measured 6.4e-8 and 7.3e-8 of the maxima (float32 rounding); margins 31x and 27x
    np.testing.assert_allclose(data, 1 + d_ref, atol=2e-6 * np.abs(d_ref).max())
    np.testing.assert_allclose(wsum, 1 + w_ref, atol=2e-6 * np.abs(w_ref).max())
