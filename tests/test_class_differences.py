"""The class-difference limit of 3D classification (em/classify.py, docs/method.md): the
classes differ only up to the shell where the half-set FSC of their differences from the
consensus is supported; beyond it every class is the consensus map.

Why it exists (bench/classify.py, 3 % share, --skip_align at the true poses): without it the
classes were allowed to differ at every shell up to r_max, noise at high resolution decided the
classes, and one class took 75 % of the particles (74.5 % accuracy); with it, 92.4 %. And the
classes differ only where in the map their two half-sets' differences agree
(`difference_weights`).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from cryomap import fourier, projector
from cryomap.em.class_differences import (
    difference_fsc,
    difference_weights,
    extend_difference_shell,
    extend_difference_shells,
    limit_differences,
)
from cryomap.em.classify import ClassOptions, difference_halves, difference_limited

BOX = 24


def _sums(rng, signal: np.ndarray, weight: np.ndarray, noise: float) -> projector.BackProjector:
    """A back-projector whose sums are D = W * signal + noise (the form of eq. (13)'s sums)."""
    bp = projector.BackProjector(BOX)
    bp.weight = weight.astype(np.float32)
    shape = bp.data.shape
    n = noise * np.sqrt(weight) * (rng.standard_normal(shape) + 1j * rng.standard_normal(shape))
    bp.data = (weight * signal + n).astype(np.complex64)
    return bp


def _half_sets(rng, deltas: list[np.ndarray], noise: float = 1.0):
    """Two half-sets of K classes: class k's sums hold consensus + deltas[k], its own noise."""
    shape = projector.BackProjector(BOX).data.shape
    consensus = rng.standard_normal(shape) + 1j * rng.standard_normal(shape)
    halves = []
    for _ in range(2):
        halves.append([_sums(rng, consensus + d, rng.uniform(1.0, 3.0, shape), noise)
                       for d in deltas])
    return halves


def test_difference_fsc_is_zero_where_classes_do_not_differ():
    rng = np.random.default_rng(0)
    shape = projector.BackProjector(BOX).data.shape
    zero = np.zeros(shape, complex)
    curves = difference_fsc(_half_sets(rng, [zero, zero]), BOX // 2 + 1)
    assert curves.shape == (2, BOX // 2 + 1)
    # pure noise: within a few standard errors of 0 in every shell (shell 0 is 1 by definition)
    # measured: at most 0.0289, mean 0.0100; 15 % margins
    assert np.abs(curves[:, 3:]).max() < 0.033
    assert abs(curves[:, 3:].mean()) < 0.0115


def test_difference_fsc_finds_a_difference_and_its_classes_sum_to_zero():
    rng = np.random.default_rng(1)
    bp = projector.BackProjector(BOX)
    shells = bp.shells()
    delta = 3.0 * (rng.standard_normal(bp.data.shape) + 1j * rng.standard_normal(bp.data.shape))
    delta = np.where(shells <= 6, delta, 0.0)  # the classes differ up to shell 6 only
    halves = _half_sets(rng, [delta, -delta])
    curve = difference_fsc(halves, BOX // 2 + 1).max(axis=0)
    assert curve[2:7].min() > 0.85  # measured 0.924; 8 % margin
    assert np.abs(curve[8:]).max() < 0.009  # measured 0.0079; 15 % margin
    # E_k = D_k - W_k D / W: the classes' differences cancel
    d = sum(b.data.astype(np.complex128) for b in halves[0])
    w = sum(b.weight.astype(np.float64) for b in halves[0])
    mean = np.where(w > 0, d / np.where(w > 0, w, 1), 0)
    total = sum(b.data - b.weight * mean for b in halves[0])
    assert np.abs(total).max() < 1e-14 * np.abs(d).max()  # float rounding: measured 1.3e-16


def test_extend_difference_shell_moves_out_over_supported_shells_only():
    curve = np.array([1.0, 0.9, 0.8, 0.5, 0.3, 0.2, 0.05, 0.5, 0.5])
    assert extend_difference_shell(2, curve, 0.143, radius=8) == 5  # stops at the first gap
    assert extend_difference_shell(5, curve, 0.143, radius=8) == 5
    assert extend_difference_shell(2, curve, 0.143, radius=3) == 3  # never beyond r_max
    # the shells at or inside the limit are not tested (their FSC is not independent)
    assert extend_difference_shell(6, curve, 0.143, radius=8) == 8


def test_extend_difference_shells_per_class_or_one_for_all():
    """Per class: each on its own curve. One for all: from the largest shell, on the largest
    FSC of any class (class 0's support at shells 3-4, class 1's at 5-6: the maximum reaches
    6, though neither class alone does from shell 2)."""
    curves = np.array([[1.0, 1.0, 1.0, 0.5, 0.5, 0.0, 0.0, 0.0, 0.0],
                       [1.0, 1.0, 1.0, 0.0, 0.0, 0.5, 0.5, 0.0, 0.0]])
    shells = np.array([2, 2])
    assert extend_difference_shells(shells, curves, 0.143, 8, per_class=True).tolist() == [4, 2]
    assert extend_difference_shells(shells, curves, 0.143, 8, per_class=False).tolist() == [6, 6]
    # one for all starts from the largest
    assert extend_difference_shells(np.array([2, 7]), curves, 0.143, 8,
                                    per_class=False).tolist() == [7, 7]


def test_limit_differences_keeps_shells_up_to_the_limit_and_the_consensus_beyond():
    rng = np.random.default_rng(2)
    maps = rng.standard_normal((2, BOX, BOX, BOX))
    consensus = rng.standard_normal((BOX, BOX, BOX))
    out = limit_differences(maps, consensus, np.array([5, 5]))
    shells = fourier.shell_index_3d(BOX)
    # float rounding (coefficients up to 0.03): measured at most 2.6e-17, 1.0e-17 and 5.3e-18
    for m, o in zip(maps, out, strict=True):
        ft_in, ft_out = fourier.fft3_centered(m), fourier.fft3_centered(o)
        ft_c = fourier.fft3_centered(consensus)
        assert np.allclose(ft_out[shells <= 5], ft_in[shells <= 5], atol=1e-15)
        assert np.allclose(ft_out[shells > 5], ft_c[shells > 5], atol=1e-15)
    # beyond the limit no class differs from another at all
    diff = fourier.fft3_centered(out[0] - out[1])
    assert np.abs(diff[shells > 5]).max() < 1e-15
    # a shell per class: each class its own
    out = limit_differences(maps, consensus, np.array([3, 5]))
    for m, o, s in zip(maps, out, (3, 5), strict=True):
        ft_in, ft_out = fourier.fft3_centered(m), fourier.fft3_centered(o)
        ft_c = fourier.fft3_centered(consensus)
        assert np.allclose(ft_out[shells <= s], ft_in[shells <= s], atol=1e-15)
        assert np.allclose(ft_out[shells > s], ft_c[shells > s], atol=1e-15)


def test_pooled_adds_sums_and_leaves_the_inputs():
    rng = np.random.default_rng(3)
    shape = projector.BackProjector(BOX).data.shape
    a = _sums(rng, np.ones(shape), np.ones(shape), 0.1)
    b = _sums(rng, np.ones(shape), 2 * np.ones(shape), 0.1)
    a_data = a.data.copy()
    p = projector.BackProjector.pooled([a, b])
    assert np.allclose(p.data, a.data + b.data) and np.allclose(p.weight, 3.0)
    assert np.array_equal(a.data, a_data) and np.allclose(a.weight, 1.0)


def test_difference_halves_and_when_the_limit_applies():
    h = difference_halves(101, seed=7)
    assert set(np.unique(h)) == {1, 2} and abs(int((h == 1).sum()) - 50) <= 1
    assert np.array_equal(h, difference_halves(101, seed=7))
    assert difference_limited(ClassOptions(ndim=3), 2)
    assert not difference_limited(ClassOptions(ndim=3), 1)
    assert not difference_limited(ClassOptions(ndim=2), 2)
    assert not difference_limited(ClassOptions(ndim=3, difference_fsc=0.0), 2)
    assert not difference_limited(ClassOptions(ndim=3, split_halves=True), 2)


@pytest.mark.parametrize("value", [-0.1, 1.0, float("nan")])
def test_bad_class_difference_fsc(value):
    from cryomap.errors import InputError

    with pytest.raises(InputError, match="class_difference_fsc"):
        ClassOptions(difference_fsc=value).validate()


# -- where in the map the classes differ ----------------------------------------------------

WBOX = 32


def _blob(centre: tuple[float, float, float], width: float) -> np.ndarray:
    c = np.arange(WBOX) - WBOX // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    return np.exp(-((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2)
                  / (2.0 * width**2))


def _map_half_sets(rng, maps: list[np.ndarray], noise: float):
    """Two half-sets of K classes: class k's sums are D = W FT(maps[k]) + noise, W = 2."""
    halves = []
    for _ in range(2):
        bps = []
        for v in maps:
            bp = projector.BackProjector(WBOX)
            signal = projector.prepare_reference(v, bp.pad, bp.interp, bp.r_max).data
            w = np.full(bp.data.shape, 2.0)
            n = noise * np.sqrt(w) * (rng.standard_normal(w.shape)
                                      + 1j * rng.standard_normal(w.shape))
            bp.weight, bp.data = w.astype(np.float32), (w * signal + n).astype(np.complex64)
            bps.append(bp)
        halves.append(bps)
    return halves


def _reference_weights(half_bps, tau2, distribution, shells, window: float):
    """Plain NumPy on the map's grid: the halves' class maps minus their consensus (each the
    box-sized regularised map up to the class's shell), their Gaussian-windowed local
    correlation rho, and 2 rho / (1 + rho)."""
    shells = np.broadcast_to(shells, (len(half_bps[0]),))
    diffs = []
    for bps in half_bps:
        pooled = projector.BackProjector.pooled(list(bps))
        diffs.append([bp.reconstruct(t, 1.0, s, 0)
                      - pooled.reconstruct(distribution @ tau2, 1.0, s, 0)
                      for bp, t, s in zip(bps, tau2, shells, strict=True)])
    out = []
    for a, b, s in zip(*diffs, shells, strict=True):
        sigma = window * WBOX / s
        agree = ndimage.gaussian_filter(a * b, sigma, mode="constant")
        power = ndimage.gaussian_filter(0.5 * (a * a + b * b), sigma, mode="constant")
        rho = np.clip(agree / power, 0.0, 1.0)
        out.append(2.0 * rho / (1.0 + rho))
    return np.stack(out)


@pytest.fixture(scope="module")
def two_maps():
    """A consensus-like map and a compact difference (class A = C + d, class B = C - d)."""
    rng = np.random.default_rng(0)
    consensus = ndimage.gaussian_filter(rng.standard_normal((WBOX,) * 3), 2.0) * _blob(
        (0, 0, 0), 8.0)
    consensus /= consensus.std()
    d = _blob((7, 0, 0), 2.0)
    inside = d > 0.5
    c = np.arange(WBOX) - WBOX // 2
    r = np.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2)
    return consensus, d, inside, r < 12  # the particle: radius 12 px


@pytest.mark.parametrize("shell", [4, 6])
def test_difference_weights_match_the_plain_reference(two_maps, shell):
    """The coarse-grid computation (4 shell + 8 voxels, then interpolated) against the same
    weights on the map's grid. Shell 6 at box 32 computes on the full grid (single-precision
    transforms: measured 2.2e-6); shell 4 on 24 voxels (interpolation: measured 0.043 inside
    the particle, where the weights span 0-1)."""
    consensus, d, _, particle = two_maps
    halves = _map_half_sets(np.random.default_rng(1), [consensus + d, consensus - d], 0.1)
    tau2, dist = np.full((2, WBOX // 2 + 1), 1e6), np.array([0.5, 0.5])
    w = difference_weights(halves, tau2, 1.0, dist, shell, 0.5, 0)
    ref = _reference_weights(halves, tau2, dist, shell, 0.5)
    assert w.shape == (2, WBOX, WBOX, WBOX) and w.min() >= 0.0 and w.max() <= 1.0
    assert np.abs(w - ref)[:, particle].max() < (1e-5 if shell == 6 else 0.06)


def test_difference_weights_per_class_shells_match_the_plain_reference(two_maps):
    """A shell per class (4 and 6: the largest decides the grid, here the full one): each
    class's weights from its own shell's differences and window, as the plain reference."""
    consensus, d, _, particle = two_maps
    halves = _map_half_sets(np.random.default_rng(1), [consensus + d, consensus - d], 0.1)
    tau2, dist = np.full((2, WBOX // 2 + 1), 1e6), np.array([0.5, 0.5])
    shells = np.array([4, 6])
    w = difference_weights(halves, tau2, 1.0, dist, shells, 0.5, 0)
    ref = _reference_weights(halves, tau2, dist, shells, 0.5)
    assert np.abs(w - ref)[:, particle].max() < 1e-5
    # not the same as one shell for both
    one = _reference_weights(halves, tau2, dist, 6, 0.5)
    assert np.abs(w[0] - one[0])[particle].max() > 0.05


def test_difference_weights_are_high_where_the_classes_differ_only(two_maps):
    """Where the classes differ the halves agree (measured mean weight 0.998 inside the
    difference); where they do not, the halves' differences are independent noise (measured
    mean 0.079 over the particle, whatever the noise level: the weight is a correlation)."""
    consensus, d, inside, particle = two_maps
    tau2, dist = np.full((2, WBOX // 2 + 1), 1e6), np.array([0.5, 0.5])
    halves = _map_half_sets(np.random.default_rng(1), [consensus + d, consensus - d], 0.1)
    w = difference_weights(halves, tau2, 1.0, dist, 6, 0.5, 0)
    assert w[:, inside].mean() > 0.98
    for noise in (0.05, 0.2):
        same = _map_half_sets(np.random.default_rng(5), [consensus, consensus], noise)
        w = difference_weights(same, tau2, 1.0, dist, 6, 0.5, 0)
        assert w[:, particle].mean() < 0.1


@pytest.mark.parametrize("value", [0.0, 1.0, -0.1, float("nan")])
def test_bad_class_difference_fsc_fixed(value):
    from cryomap.errors import InputError

    with pytest.raises(InputError, match="class_difference_fsc_fixed"):
        ClassOptions(difference_fsc_fixed=value).validate()


@pytest.mark.parametrize("value", [-0.5, 11.0, float("inf")])
def test_bad_class_difference_window(value):
    from cryomap.errors import InputError

    with pytest.raises(InputError, match="class_difference_window"):
        ClassOptions(difference_window=value).validate()
