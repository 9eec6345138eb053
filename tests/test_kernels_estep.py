"""E-step kernel (core.expectation and em.estep.expectation) against the NumPy reference."""

from __future__ import annotations

import numpy as np
import pytest

from cryomap import fourier
from cryomap._kernels import core
from cryomap.em.estep import KernelInputs, Posterior, expectation
from reference_kernels import expectation_ref, make_problem, prune_ref

# (B, T, R, J, box): odd and even boxes, J not a multiple of 8, B = T = R = 1 and bigger
SHAPES = [
    (1, 1, 1, 37, 15),
    (1, 3, 7, 37, 16),
    (5, 1, 11, 50, 16),
    (4, 5, 23, 37, 15),
    (6, 9, 40, 93, 16),
]


def _priors(rng: np.random.Generator, n_img: int, n_shift: int, n_rot: int,
            random: bool) -> tuple[np.ndarray, np.ndarray]:
    if not random:
        return np.zeros(n_rot), np.zeros((n_img, n_shift))
    return rng.normal(0, 1.0, n_rot), rng.normal(0, 1.0, (n_img, n_shift))


def _check(out: dict, ref: dict, fraction: float) -> None:
    # float32 kernel against the float64 reference, measured over the shapes above: weights and
    # max_prob 5.4e-5, log_marginal 1.5e-4 (6.2e-7 relative), min_diff2 2.3e-4 (margins 1.8x,
    # 6.5x, 4.3x: float32 diff2 rounding, amplified by exp)
    np.testing.assert_allclose(out["weights"], ref["weights"], rtol=0, atol=1e-4)
    np.testing.assert_allclose(out["log_marginal"], ref["log_marginal"], rtol=1e-6, atol=1e-3)
    np.testing.assert_allclose(out["min_diff2"], ref["min_diff2"], rtol=1e-6, atol=1e-3)
    np.testing.assert_allclose(out["max_prob"], ref["max_prob"], rtol=0, atol=1e-4)
    np.testing.assert_array_equal(out["best_r"], ref["best_r"])
    np.testing.assert_array_equal(out["best_t"], ref["best_t"])
    if fraction >= 1.0:
        np.testing.assert_array_equal(out["n_significant"], ref["n_significant"])
    else:  # the count may differ by one where the cumulative sum meets the target in rounding
        # (measured 0)
        assert np.all(np.abs(out["n_significant"] - ref["n_significant"]) <= 1)


@pytest.mark.parametrize("seed", range(len(SHAPES)))
@pytest.mark.parametrize("fraction", [1.0, 0.999, 0.9])
def test_expectation_matches_reference(seed: int, fraction: float) -> None:
    rng = np.random.default_rng(1000 + seed)
    n_img, n_shift, n_rot, n_pix, box = SHAPES[seed]
    p = make_problem(rng, n_img, n_shift, n_rot, n_pix, box)
    lpr, lps = _priors(rng, n_img, n_shift, n_rot, random=seed % 2 == 1)
    out = core.expectation(*p.args(), lpr, lps, fraction)
    ref = expectation_ref(*p.args(), lpr, lps, fraction)
    assert out["weights"].dtype == np.float32 and out["weights"].shape == ref["weights"].shape
    assert out["best_r"].dtype == np.int64 and out["log_marginal"].dtype == np.float64
    _check(out, ref, fraction)


def test_posteriors_are_neither_flat_nor_one_hot() -> None:
    """The test problems exercise the interesting regime."""
    rng = np.random.default_rng(7)
    p = make_problem(rng, 8, 5, 23, 60, 16)
    out = core.expectation(*p.args(), np.zeros(23), np.zeros((8, 5)), 1.0)
    assert 0.7 < np.median(out["max_prob"]) < 0.95  # measured 0.850; margins 0.15 and 0.1


def test_pruning_properties() -> None:
    rng = np.random.default_rng(11)
    p = make_problem(rng, 6, 7, 30, 70, 16, gap=0.5)
    lpr, lps = np.zeros(30), np.zeros((6, 7))
    dense = core.expectation(*p.args(), lpr, lps, 1.0)
    for fraction in (0.5, 0.9, 0.999):
        out = core.expectation(*p.args(), lpr, lps, fraction)
        w = out["weights"].reshape(6, -1)
        np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=2e-6)  # measured 1.2e-7 (float32)
        np.testing.assert_array_equal(out["n_significant"], np.count_nonzero(w, axis=1))
        d = dense["weights"].reshape(6, -1).astype(np.float64)
        for i in range(6):
            kept = w[i] > 0
            # kept mass of the dense posterior reaches the fraction (measured: by at least
            # 8.6e-5 relative; 1e-6 allows float32 rounding of the dense weights) ...
            assert d[i][kept].sum() >= fraction * d[i].sum() * (1 - 1e-6)
            # ... every kept weight is at least every dropped one ...
            if (~kept).any():
                assert d[i][kept].min() >= d[i][~kept].max()
            # ... and the set is the smallest such: one weight fewer does not reach it
            _, n = prune_ref(d[i], fraction)
            assert abs(int(kept.sum()) - n) <= 1  # measured 0 (one either way in rounding)
            # renormalised kept weights are proportional to the dense ones: measured 8.1e-8
            # relative (float32 rounding); 25x margin
            np.testing.assert_allclose(w[i][kept], d[i][kept] / d[i][kept].sum(), rtol=2e-6)
        np.testing.assert_array_equal(out["best_r"], dense["best_r"])
        # measured 0 (pruning does not change the marginal); the bound allows float64 rounding
        np.testing.assert_allclose(out["log_marginal"], dense["log_marginal"], rtol=1e-12)


def test_pruning_ties_prefer_lower_index() -> None:
    """Equal weights: the kept set is the first ones in (t, r) order."""
    n_img, n_shift, n_rot, n_pix = 1, 2, 10, 5
    images = np.zeros((n_img, n_pix), np.complex64)
    slices = np.zeros((n_rot, n_pix), np.complex64)  # every diff2 = 0: uniform posterior
    out = core.expectation(images, np.ones((1, n_pix), np.float32),
                           np.ones((1, n_pix), np.float32), slices,
                           np.ones((n_pix, 2), np.float32), np.zeros((n_shift, 2)), 16,
                           np.zeros(n_rot), np.zeros((1, n_shift)), 0.25)
    w = out["weights"].ravel()
    assert out["n_significant"][0] == 5
    np.testing.assert_allclose(w[:5], 0.2, rtol=3e-7)  # measured 1.5e-8 (float32 0.2); 20x
    assert not w[5:].any()


def test_huge_diff2_gives_finite_log_marginal() -> None:
    rng = np.random.default_rng(5)
    p = make_problem(rng, 3, 4, 9, 40, 16)
    p.inv_sigma2 = (p.inv_sigma2 * 1e5).astype(np.float32)  # diff2 ~ 1e6 and more
    lpr, lps = np.zeros(9), np.zeros((3, 4))
    out = core.expectation(*p.args(), lpr, lps, 0.999)
    assert np.all(out["min_diff2"] > 1e5)  # measured 1.15e5; margin 13%
    assert np.all(np.isfinite(out["log_marginal"]))
    np.testing.assert_allclose(out["weights"].sum(axis=(1, 2)), 1.0, atol=1e-6)  # measured 0
    ref = expectation_ref(*p.args(), lpr, lps, 0.999)
    # measured 1.3e-6 relative (float32 diff2 of ~1.5e5); 7.7x margin
    np.testing.assert_allclose(out["log_marginal"], ref["log_marginal"], rtol=1e-5)
    np.testing.assert_array_equal(out["best_r"], ref["best_r"])


def test_float32_overflow_raises() -> None:
    rng = np.random.default_rng(47)
    p = make_problem(rng, 2, 2, 3, 20, 16)
    p.inv_sigma2[:] = 1e30
    p.slices *= np.float32(1e6)
    with pytest.raises(ValueError, match="overflow"):
        core.expectation(*p.args(), np.zeros(3), np.zeros((2, 2)), 1.0)


def test_minus_inf_priors_exclude_poses() -> None:
    rng = np.random.default_rng(13)
    p = make_problem(rng, 4, 5, 12, 45, 15)
    lpr = np.zeros(12)
    lpr[::3] = -np.inf
    lps = np.zeros((4, 5))
    lps[0, 1:] = -np.inf  # image 0 may only have shift 0
    lps[2, :2] = -np.inf
    out = core.expectation(*p.args(), lpr, lps, 1.0)
    ref = expectation_ref(*p.args(), lpr, lps, 1.0)
    _check(out, ref, 1.0)
    assert not out["weights"][:, :, ::3].any()
    assert not out["weights"][0, 1:].any() and not out["weights"][2, :2].any()
    assert out["best_t"][0] == 0
    assert np.all(out["n_significant"] == np.count_nonzero(out["weights"], axis=(1, 2)))


def test_all_excluded_raises() -> None:
    rng = np.random.default_rng(17)
    p = make_problem(rng, 2, 3, 4, 20, 16)
    with pytest.raises(ValueError, match="log_prior_rot"):
        core.expectation(*p.args(), np.full(4, -np.inf), np.zeros((2, 3)), 1.0)
    lps = np.zeros((2, 3))
    lps[1] = -np.inf
    with pytest.raises(ValueError, match="image 1"):
        core.expectation(*p.args(), np.zeros(4), lps, 1.0)


def test_thread_count_independence() -> None:
    rng = np.random.default_rng(19)
    p = make_problem(rng, 7, 6, 700, 60, 16)  # several column tiles
    lpr, lps = rng.normal(size=700), rng.normal(size=(7, 6))
    before = core.max_threads()
    try:
        core.set_threads(1)
        one = core.expectation(*p.args(), lpr, lps, 0.99, 64, 128)
        core.set_threads(2)
        two = core.expectation(*p.args(), lpr, lps, 0.99, 64, 128)
    finally:
        core.set_threads(before)
    for k in one:
        np.testing.assert_array_equal(one[k], two[k], err_msg=k)


def test_block_sizes_do_not_change_results() -> None:
    rng = np.random.default_rng(23)
    p = make_problem(rng, 5, 3, 50, 37, 15)
    lpr, lps = np.zeros(50), np.zeros((5, 3))
    ref = core.expectation(*p.args(), lpr, lps, 1.0)
    for rows, cols in [(1, 1), (7, 13), (1000, 1000)]:
        out = core.expectation(*p.args(), lpr, lps, 1.0, rows, cols)
        # GEMM rounding: measured 2.3e-5; margin 4.3x
        np.testing.assert_allclose(out["weights"], ref["weights"], atol=1e-4)
        np.testing.assert_array_equal(out["best_r"], ref["best_r"])


def test_wrapper_defaults_and_types() -> None:
    rng = np.random.default_rng(29)
    box = 16
    mask = fourier.pixel_mask(box, 5)
    p = make_problem(rng, 3, 4, 6, mask.n_pixels, box, radius=5)
    # wrapper converts dtypes (complex128 images, float64 ctf) and infers the mask coords
    post = expectation(KernelInputs(p.images.astype(np.complex128), p.ctf.astype(np.float64),
                                    p.inv_sigma2, p.slices, p.shifts, box),
                       significant_fraction=1.0)
    assert isinstance(post, Posterior)
    ref = expectation_ref(*p.args(), np.zeros(6), np.zeros((3, 4)), 1.0)
    np.testing.assert_allclose(post.weights, ref["weights"], atol=1e-5)  # measured 5.2e-7; 19x
    # explicit coords, a (T,) shift prior broadcast over images
    lps = np.array([0.0, -1.0, -np.inf, 0.5])
    post = expectation(KernelInputs(p.images, p.ctf, p.inv_sigma2, p.slices, p.shifts, box,
                                    mask.coords), log_prior_shift=lps)
    assert not post.weights[:, 2].any()
    with pytest.raises(ValueError, match="coords"):
        expectation(KernelInputs(p.images[:, :-1], p.ctf[:, :-1], p.inv_sigma2[:, :-1],
                                 p.slices[:, :-1], p.shifts, box))


def test_zero_inv_sigma2_drops_pixels() -> None:
    """inv_sigma2 = 0 removes a pixel from diff2 and from the normalisation."""
    rng = np.random.default_rng(31)
    p = make_problem(rng, 3, 2, 8, 40, 16)
    p.inv_sigma2[:, ::4] = 0.0
    lpr, lps = np.zeros(8), np.zeros((3, 2))
    out = core.expectation(*p.args(), lpr, lps, 1.0)
    ref = expectation_ref(*p.args(), lpr, lps, 1.0)
    _check(out, ref, 1.0)


def _valid_args(rng: np.random.Generator) -> list:
    p = make_problem(rng, 2, 3, 4, 20, 16)
    return [*p.args(), np.zeros(4), np.zeros((2, 3)), 0.999]


@pytest.mark.parametrize(
    "index, bad, match",
    [
        (0, lambda a: a.astype(np.complex128), "images: expected dtype"),
        (1, lambda a: a.astype(np.float64), "ctf: expected dtype"),
        (1, lambda a: a[:, :-1].copy(), "ctf: expected size"),
        (2, lambda a: np.asfortranarray(np.repeat(a, 2, axis=0))[::2], "inv_sigma2"),
        (2, lambda a: -a, "inv_sigma2: expected values >= 0"),
        (3, lambda a: a[None], "slices: expected 2 dimensions"),
        (4, lambda a: a[:-1].copy(), "coords: expected size"),
        (5, lambda a: a[:, :1].copy(), "shifts: expected size"),
        (6, lambda a: 0, "box"),
        (7, lambda a: a[:-1].copy(), "log_prior_rot: expected size"),
        (8, lambda a: a.T.copy(), "log_prior_shift: expected size"),
        (8, lambda a: a + np.inf, "log_prior_shift: contains NaN or \\+inf"),
        (9, lambda a: 0.0, "significant_fraction"),
        (9, lambda a: 1.5, "significant_fraction"),
    ],
)
def test_invalid_input_raises(index: int, bad, match: str) -> None:
    args = _valid_args(np.random.default_rng(37))
    args[index] = bad(args[index])
    with pytest.raises(ValueError, match=match):
        core.expectation(*args)


@pytest.mark.parametrize("index", [0, 1, 2, 3, 5, 7, 8])
def test_nan_raises(index: int) -> None:
    args = _valid_args(np.random.default_rng(41))
    a = args[index].copy()
    a.flat[a.size // 2] = np.nan
    args[index] = a
    with pytest.raises(ValueError, match="NaN"):
        core.expectation(*args)


def test_empty_batch() -> None:
    args = _valid_args(np.random.default_rng(43))
    args[0], args[1], args[2] = args[0][:0], args[1][:0], args[2][:0]
    args[8] = args[8][:0]
    out = core.expectation(*args)
    assert out["weights"].shape == (0, 3, 4) and out["best_r"].shape == (0,)
