"""The class-difference limit of 3D classification (em/classify.py, docs/method.md): the
classes differ only up to the shell where the half-set FSC of their differences from the
consensus is supported; beyond it every class is the consensus map.

Why it exists (bench/classify.py, 3 % share, --skip_align at the true poses): without it the
classes were allowed to differ at every shell up to r_max, noise at high resolution decided the
classes, and one class took 75 % of the particles (74.5 % accuracy); with it, 92.4 %.
"""

from __future__ import annotations

import numpy as np
import pytest

from cryomap import fourier, projector
from cryomap.em.class_differences import (
    difference_fsc,
    extend_difference_shell,
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


def test_limit_differences_keeps_shells_up_to_the_limit_and_the_consensus_beyond():
    rng = np.random.default_rng(2)
    maps = rng.standard_normal((2, BOX, BOX, BOX))
    consensus = rng.standard_normal((BOX, BOX, BOX))
    out = limit_differences(maps, consensus, shell=5)
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
