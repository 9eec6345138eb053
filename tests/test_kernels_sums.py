"""M-step sums kernel (core.maximization_sums and em.sums.maximization_sums) against the NumPy
reference."""

from __future__ import annotations

import numpy as np
import pytest

from cryomap import fourier
from cryomap._kernels import core
from cryomap.em import sums
from cryomap.em.estep import KernelInputs
from reference_kernels import make_problem, maximization_sums_ref

SHAPES = [  # (B, T, R, J, box)
    (1, 1, 1, 37, 15),
    (1, 3, 7, 37, 16),
    (5, 1, 11, 50, 16),
    (4, 5, 23, 37, 15),
    (6, 9, 40, 93, 16),
]
METHODS = {"auto": 0, "gemm": 1, "sparse": 2}


def _posterior(p, fraction: float) -> np.ndarray:
    n_img, n_rot, n_shift = p.images.shape[0], p.slices.shape[0], p.shifts.shape[0]
    out = core.expectation(*p.args(), np.zeros(n_rot), np.zeros((n_img, n_shift)), fraction)
    return out["weights"]


def _close(actual: np.ndarray, desired: np.ndarray) -> None:
    """Relative agreement 2e-5, measured against the array's largest value: float32 sums
    against the float64 reference, measured up to 1.7e-6 of the largest value over every call
    here (5.7e-6 element by element); 12x margin."""
    scale = float(np.abs(desired).max()) or 1.0
    np.testing.assert_allclose(actual, desired, rtol=2e-5, atol=2e-5 * scale)


def _run(p, weights, n_shells, method, data=None, wsum=None):
    n_rot, n_pix = p.slices.shape
    if data is None:
        data, wsum = np.zeros((n_rot, n_pix), np.complex64), np.zeros((n_rot, n_pix), np.float32)
    rp = core.maximization_sums(*p.args(), weights, p.shell, n_shells, data, wsum,
                                METHODS[method])
    return data, wsum, rp


@pytest.mark.parametrize("seed", range(len(SHAPES)))
@pytest.mark.parametrize("method", ["gemm", "sparse", "auto"])
@pytest.mark.parametrize("kind", ["dense", "pruned", "random"])
def test_sums_match_reference(seed: int, method: str, kind: str) -> None:
    rng = np.random.default_rng(2000 + seed)
    n_img, n_shift, n_rot, n_pix, box = SHAPES[seed]
    p = make_problem(rng, n_img, n_shift, n_rot, n_pix, box)
    if kind == "random":  # arbitrary nonnegative weights, some images without any
        w = rng.uniform(0, 1, (n_img, n_shift, n_rot)).astype(np.float32)
        w[w < 0.7] = 0
        w[n_img // 2] = 0
    else:
        w = _posterior(p, 1.0 if kind == "dense" else 0.9)
    n_shells = int(p.shell.max()) + 2
    data, wsum, rp = _run(p, w, n_shells, method)
    rdata, rwsum, rrp = maximization_sums_ref(*p.args(), w, p.shell, n_shells)
    assert rp.dtype == np.float64 and rp.shape == (n_img, n_shells)
    _close(data, rdata)
    _close(wsum, rwsum)
    _close(rp, rrp)


@pytest.mark.parametrize("zero_fraction", [0.02, 0.3])
def test_gemm_with_some_zero_rows_and_columns(zero_fraction: float) -> None:
    """Few zero rows/columns: GEMMs over everything; many: over the compressed support."""
    rng = np.random.default_rng(31)
    n_img, n_shift, n_rot = 6, 5, 40
    p = make_problem(rng, n_img, n_shift, n_rot, 45, 16)
    w = rng.uniform(0.1, 1, (n_img, n_shift, n_rot)).astype(np.float32)
    n_zero = max(1, int(zero_fraction * n_rot))
    w[:, :, rng.choice(n_rot, n_zero, replace=False)] = 0
    w[1, rng.choice(n_shift, 1)] = 0
    data, wsum, rp = _run(p, w, 12, "gemm")
    rdata, rwsum, rrp = maximization_sums_ref(*p.args(), w, p.shell, 12)
    _close(data, rdata)
    _close(wsum, rwsum)
    _close(rp, rrp)


def test_accumulates_in_place() -> None:
    rng = np.random.default_rng(3)
    p = make_problem(rng, 4, 3, 9, 41, 16)
    w = _posterior(p, 0.999)
    data0 = (rng.normal(size=p.slices.shape) + 1j * rng.normal(size=p.slices.shape))
    data0 = data0.astype(np.complex64)
    wsum0 = rng.uniform(size=p.slices.shape).astype(np.float32)
    for method in ("gemm", "sparse"):
        data, wsum = data0.copy(), wsum0.copy()
        _run(p, w, 10, method, data, wsum)
        rdata, rwsum, _ = maximization_sums_ref(*p.args(), w, p.shell, 10)
        _close(data, data0 + rdata)
        _close(wsum, wsum0 + rwsum)


def test_sparse_realistic_case() -> None:
    """A few nonzero weights per image spread over many orientations: both paths agree."""
    rng = np.random.default_rng(5)
    n_img, n_shift, n_rot = 12, 9, 300
    p = make_problem(rng, n_img, n_shift, n_rot, 60, 16)
    w = np.zeros((n_img, n_shift, n_rot), np.float32)
    for i in range(n_img):
        k = rng.integers(1, 6)
        w[i, rng.integers(0, n_shift, k), rng.integers(0, n_rot, k)] = rng.uniform(0.1, 1, k)
    w /= w.sum(axis=(1, 2), keepdims=True)
    results = {m: _run(p, w, 12, m) for m in ("gemm", "sparse", "auto")}
    rdata, rwsum, rrp = maximization_sums_ref(*p.args(), w, p.shell, 12)
    for data, wsum, rp in results.values():
        _close(data, rdata)
        _close(wsum, rwsum)
        _close(rp, rrp)


def test_residual_covers_all_pixels_and_not_sigma2() -> None:
    """inv_sigma2 = 0 pixels still count in the residual power; it is not divided by sigma2."""
    rng = np.random.default_rng(7)
    p = make_problem(rng, 3, 2, 5, 30, 16)
    w = _posterior(p, 1.0)
    _, _, rp1 = _run(p, w, 10, "gemm")
    p.inv_sigma2[:] = 0.0
    data, wsum, rp0 = _run(p, w, 10, "gemm")
    np.testing.assert_allclose(rp0, rp1, rtol=1e-6)  # measured 0; allows float rounding
    assert not data.any() and not wsum.any()
    # one image, one pose with weight 1: residual = sum over the shell of |X - CTF A|^2
    w1 = np.zeros_like(w)
    w1[:, 0, 0] = 1.0
    _, _, rp = _run(p, w1, 10, "sparse")
    x0 = p.images[0].astype(np.complex128) * np.exp(
        -2j * np.pi * (p.coords[:, 0] * p.shifts[0, 0] + p.coords[:, 1] * p.shifts[0, 1]) / 16)
    d = x0 - p.ctf[0] * p.slices[0].astype(np.complex128)
    # measured 8.6e-8 relative (float32 kernel); 23x margin
    np.testing.assert_allclose(rp[0], np.bincount(p.shell, np.abs(d) ** 2, 10), rtol=2e-6)


def test_zero_weights_do_nothing() -> None:
    rng = np.random.default_rng(11)
    p = make_problem(rng, 2, 3, 4, 20, 16)
    data, wsum, rp = _run(p, np.zeros((2, 3, 4), np.float32), 9, "auto")
    assert not data.any() and not wsum.any() and not rp.any()


def test_thread_count_independence() -> None:
    rng = np.random.default_rng(13)
    p = make_problem(rng, 9, 5, 600, 60, 16)
    w = _posterior(p, 0.99)
    before = core.max_threads()
    try:
        res = {}
        for n in (1, 2):
            core.set_threads(n)
            res[n] = {m: _run(p, w, 12, m) for m in ("gemm", "sparse")}
    finally:
        core.set_threads(before)
    for m in ("gemm", "sparse"):
        for a, b in zip(res[1][m], res[2][m], strict=True):
            np.testing.assert_array_equal(a, b)


def test_wrapper() -> None:
    rng = np.random.default_rng(17)
    box = 16
    mask = fourier.pixel_mask(box, 6)
    p = make_problem(rng, 3, 4, 7, mask.n_pixels, box, radius=6)
    w = _posterior(p, 0.999)
    acc = sums.SliceSums.empty(7, mask.n_pixels, mask.shell, box // 2 + 1)
    inputs = KernelInputs(p.images.astype(np.complex128), p.ctf, p.inv_sigma2, p.slices,
                          p.shifts, box)
    rp = sums.maximization_sums(inputs, w.astype(np.float64), acc)
    data, wsum = acc.data, acc.weight
    rdata, rwsum, rrp = maximization_sums_ref(*p.args(), w, mask.shell, box // 2 + 1)
    _close(data, rdata)
    _close(wsum, rwsum)
    _close(rp, rrp)
    with pytest.raises(ValueError, match="method"):
        sums.maximization_sums(inputs, w, acc, method="fast")


def _valid_args(rng: np.random.Generator) -> list:
    p = make_problem(rng, 2, 3, 4, 20, 16)
    w = _posterior(p, 1.0)
    data, wsum = np.zeros((4, 20), np.complex64), np.zeros((4, 20), np.float32)
    return [*p.args(), w, p.shell, int(p.shell.max()) + 1, data, wsum, 0]


@pytest.mark.parametrize(
    "index, bad, match",
    [
        (0, lambda a: a.astype(np.complex128), "images: expected dtype"),
        (2, lambda a: a[:, :-1].copy(), "inv_sigma2: expected size"),
        (3, lambda a: a[:, :-1].copy(), "slices: expected size"),
        (7, lambda a: a.astype(np.float64), "weights: expected dtype"),
        (7, lambda a: a[:, :, :-1].copy(), "weights: expected size"),
        (8, lambda a: a.astype(np.int32), "pixel_shell: expected dtype"),
        (8, lambda a: a + 100, "pixel_shell: expected values in"),
        (9, lambda a: 0, "n_shells"),
        (10, lambda a: a.astype(np.complex128), "data_slices: expected dtype"),
        (11, lambda a: np.zeros((4, 40), np.float32)[:, ::2], "weight_slices: expected a C-"),
        (12, lambda a: 3, "method"),
    ],
)
def test_invalid_input_raises(index: int, bad, match: str) -> None:
    args = _valid_args(np.random.default_rng(19))
    args[index] = bad(args[index])
    with pytest.raises(ValueError, match=match):
        core.maximization_sums(*args)


def test_nan_and_aliasing_raise() -> None:
    args = _valid_args(np.random.default_rng(23))
    bad = list(args)
    bad[7] = args[7].copy()
    bad[7][0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="weights: contains NaN"):
        core.maximization_sums(*bad)
    bad = list(args)
    bad[10] = args[3]  # accumulating into the slices being read
    with pytest.raises(ValueError, match="share memory"):
        core.maximization_sums(*bad)
    bad = list(args)
    bad[10] = np.zeros((4, 20), np.complex64)
    bad[10].setflags(write=False)
    with pytest.raises(ValueError, match="writeable"):
        core.maximization_sums(*bad)
